"""Forward time of zdepth's DepthAnythingV2 vs transformers' DepthAnythingForDepthEstimation.

Same config and the same random weights in both (ours -> save_hf -> from_pretrained), fp32,
batch 1, ``torch.inference_mode``. Rounds are interleaved (ours/HF alternate, order flipped
every round, all sizes in every round) so that load from other processes on a shared machine
hits both sides alike. The table reports medians (and minima), the ours/HF ratio of the
medians, and the median of the per-round ours/HF ratios ("paired").

    .venv/bin/python bench/model_vs_transformers.py [--encoder vits] [--rounds 9] [--threads 2]
                                                     [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zdepth.model import DepthAnythingV2, random_init_, save_hf  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vits", choices=["vits", "vitb", "vitl"])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(518, 518), (518, 686)], help="HxW")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="both models in channels_last memory format (as zdepth's engine runs)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ours = random_init_(DepthAnythingV2(args.encoder), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        hf = transformers.DepthAnythingForDepthEstimation.from_pretrained(tmp).eval()
    hf.config.backbone_config._attn_implementation = args.attn
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    ours.to(device, memory_format=memory_format)
    hf.to(device, memory_format=memory_format)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    runners = {
        "ours": lambda x: ours(x),
        "transformers": lambda x: hf(pixel_values=x).predicted_depth,
    }
    inputs = {s: torch.randn(1, 3, *s, generator=torch.Generator().manual_seed(0)).to(device) for s in args.sizes}
    times: dict[tuple[str, tuple[int, int]], list[float]] = {(n, s): [] for n in runners for s in args.sizes}

    with torch.inference_mode():
        for size, x in inputs.items():  # warm-up, also checks that both run at this size
            for _ in range(args.warmup):
                for run in runners.values():
                    run(x)
        sync()
        order = list(runners)
        for r in range(args.rounds):
            for size, x in inputs.items():
                for name in order if r % 2 == 0 else order[::-1]:
                    sync()
                    t0 = time.perf_counter()
                    runners[name](x)
                    sync()
                    times[(name, size)].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(
        f"\n{args.encoder}, fp32, batch 1, device {device}, torch threads {args.threads}, {memory_format}, "
        f"transformers {transformers.__version__} ({args.attn} attention), torch {torch.__version__}, "
        f"{args.rounds} interleaved rounds, median (min) in ms\n"
    )
    print(f"{'input HxW':>10} | {'ours':>16} | {'transformers':>16} | {'ours/HF':>7} | {'paired':>6}")
    print("-" * 69)
    rows = []
    for size in args.sizes:
        a, b = times[("ours", size)], times[("transformers", size)]
        ma, mb = statistics.median(a), statistics.median(b)
        # Same-round pairs ran back to back, so their ratio cancels most of the outside load.
        paired = statistics.median(x / y for x, y in zip(a, b))
        rows.append(
            {
                "size": list(size),
                "ours_ms": [t * 1e3 for t in a],
                "hf_ms": [t * 1e3 for t in b],
                "ours_median_ms": ma * 1e3,
                "hf_median_ms": mb * 1e3,
                "ratio": ma / mb,
                "paired_ratio_median": paired,
            }
        )
        print(
            f"{size[0]:>4}x{size[1]:<5} | {ma * 1e3:8.1f} ({min(a) * 1e3:6.1f}) | {mb * 1e3:8.1f} ({min(b) * 1e3:6.1f}) "
            f"| {ma / mb:7.3f} | {paired:6.3f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "encoder": args.encoder,
                    "device": str(device),
                    "threads": args.threads,
                    "channels_last": args.channels_last,
                    "attn": args.attn,
                    "rounds": args.rounds,
                    "results": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
