"""Pre- and post-processing cost next to the model's forward pass, for one 640x480 frame.

Compares the engine's torch pre-processing (uint8 to the device, resize and normalise there)
with the official OpenCV float64 path (`preprocess="exact"`), and the post-processing
(bilinear upsampling, metric scale, back-projection, copy to numpy) with numpy's unproject,
against the vits forward pass at 518x686. Every round runs each step once, in turn
(interleaved, so a slow spell on a shared machine hits all rows alike); the table shows medians.
It also reports how far the torch path's input and the depth it leads to are from the exact path.

    .venv/bin/python bench/prepost.py [--rounds 7] [--threads 2] [--device auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from zdepth.engine import Engine, postprocess, preprocess_exact, preprocess_torch, resized_shape, unproject
from zdepth.geometry import unproject as unproject_numpy
from zdepth.request import Intrinsics

HEIGHT, WIDTH, INPUT_SIZE = 480, 640, 518
K = Intrinsics(fx=525.0, fy=525.0, cx=319.5, cy=239.5)


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like BGR frame: smooth shading, hard-edged objects, fine texture and noise."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.uniform(30, 225, (6, 8, 3)), (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(25):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        image[y : y + rng.integers(8, height // 3), x : x + rng.integers(8, width // 3)] = rng.uniform(0, 255, 3)
    v, u = np.mgrid[0:height, 0:width]
    image += 12 * np.sin(u / 3.0)[..., None] * (v > height // 2)[..., None]  # a striped floor
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--json", default="bench/results/prepost.json", help="where to write the results")
    args = parser.parse_args()

    engine = Engine(device=args.device, dtype=args.dtype, random_weights=True, threads=args.threads)
    device = engine.device
    model = engine.model("vits", "hypersim")
    image = scene(HEIGHT, WIDTH)
    shape = resized_shape(HEIGHT, WIDTH, INPUT_SIZE)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        x = preprocess_torch(image, INPUT_SIZE, device)
        output = model(x.to(engine.dtype))[0].float()
        depth = postprocess(output * 20.0, HEIGHT, WIDTH)
        depth_numpy = depth.cpu().numpy()
        steps = {
            "pre: torch on device": lambda: preprocess_torch(image, INPUT_SIZE, device),
            "pre: exact (cv2 float64)": lambda: torch.from_numpy(preprocess_exact(image, INPUT_SIZE)).to(device),
            "forward vits": lambda: model(x.to(engine.dtype)),
            "post: depth (upsample, scale, to numpy)": lambda: postprocess(output * 20.0, HEIGHT, WIDTH).cpu().numpy(),
            "post: points torch (+ to numpy)": lambda: unproject(depth, K).cpu().numpy(),
            "post: points numpy unproject": lambda: unproject_numpy(depth_numpy, K),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
            for name, step in steps.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                if round_:
                    times[name].append((time.perf_counter() - start) * 1000)

        exact = torch.from_numpy(preprocess_exact(image, INPUT_SIZE)).to(device)
        input_diff = (x - exact).abs().max().item()
        depth_exact = postprocess(model(exact.to(engine.dtype))[0].float() * 20.0, HEIGHT, WIDTH)
        depth_diff = (depth - depth_exact).abs().max().item()

    medians = {name: statistics.median(values) for name, values in times.items()}
    forward = medians["forward vits"]
    print(
        f"640x480 frame -> {shape[1]}x{shape[0]} input; {device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds, medians"
    )
    print(f"{'step':42s} {'ms':>9s} {'% of forward':>13s}")
    for name, value in medians.items():
        print(f"{name:42s} {value:9.2f} {100 * value / forward:12.1f}%")
    print(f"torch vs exact pre-processing: max |diff| {input_diff:.2e} (normalised input; one grey level is ~1.7e-02)")
    print(f"  -> metric depth (random vits weights, max_depth 20): max |diff| {depth_diff:.2e} m")

    results = {
        "frame": [HEIGHT, WIDTH],
        "input": list(shape),
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "median_ms": medians,
        "input_max_abs_diff": input_diff,
        "depth_max_abs_diff_m": depth_diff,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
