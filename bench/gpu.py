"""GPU benchmark: the model and the served round trip on a CUDA machine.

Runs offline on a machine with torch preinstalled (random weights: timing does not depend
on the values). Writes one JSON results file and prints tables.

  python bench/gpu.py --out bench/results/gpu.json [--quick]

1. Model forward, vits/vitb/vitl at 518x518, fp32 / fp16 / bf16, batch 1 and 8: ms per
   image (median of timed iterations after warm-up, CUDA-synchronised).
2. Engine, one 640x480 frame: pre-processing, forward and post-processing for metric depth
   and a point cloud, per dtype (vits).
3. Served round trip (needs pyzmq): `zdepth serve --device cuda --random-weights` with a
   client over tcp and ipc, 640x480 JPEG -> point cloud, split into worker compute and
   overhead, next to a bare ZeroMQ round trip carrying the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def median_ms(fn, iterations: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(encoders, batches, iterations: int) -> list:
    from zdepth.model import DepthAnythingV2, random_init_

    rows = []
    for encoder in encoders:
        base = random_init_(DepthAnythingV2(encoder, metric=True), seed=0).eval()
        for dtype_name, dtype in DTYPES.items():
            model = base.to("cuda", dtype)
            for batch in batches:
                x = torch.randn(batch, 3, 518, 518, device="cuda", dtype=dtype)
                with torch.inference_mode():
                    ms = median_ms(lambda: model(x), iterations, warmup=3)
                rows.append({"encoder": encoder, "dtype": dtype_name, "batch": batch, "ms_per_batch": round(ms, 3), "ms_per_image": round(ms / batch, 3)})
                print(f"model {encoder} {dtype_name:5s} batch {batch}: {ms:8.2f} ms/batch {ms / batch:8.2f} ms/image", flush=True)
        del base, model
        torch.cuda.empty_cache()
    return rows


def bench_engine(iterations: int) -> list:
    from zdepth.engine import Engine

    rows = []
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    intrinsics = {"fx": 500.0, "fy": 500.0, "cx": 320.0, "cy": 240.0}
    for dtype_name in DTYPES:
        engine = Engine(device="cuda", dtype=dtype_name, random_weights=True)
        for method in ("metric_depth", "pointcloud"):
            fields = {"intrinsics": intrinsics} if method == "pointcloud" else {}
            timings = []
            for i in range(iterations + 3):
                result = engine.predict(method, frame, **fields)
                if i >= 3:
                    timings.append(result.timing)
            row = {"dtype": dtype_name, "method": method, **{k: round(statistics.median(t[k] for t in timings), 3) for k in timings[0]}}
            rows.append(row)
            print("engine", row, flush=True)
    return rows


def bench_served(iterations: int) -> dict:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return {"skipped": "pyzmq not installed"}
    from bench.latency import served_vs_bare  # the same code the CPU bench uses

    return served_vs_bare(device="cuda", dtype="fp16", iterations=iterations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--quick", action="store_true", help="vits only, few iterations")
    parser.add_argument("--skip-served", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    iterations = 5 if args.quick else 30
    encoders = ["vits"] if args.quick else ["vits", "vitb", "vitl"]
    results = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": bench_model(encoders, [1, 8], iterations),
        "engine": bench_engine(iterations),
    }
    if not args.skip_served:
        results["served"] = bench_served(max(20, iterations))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
