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
4. Compiled graphs (zdepth/compiled.py, the engine's code path) against eager, fp16 and bf16,
   batch 1/4/8, vits/vitb/vitl at 518x518 and 518x686 (a 640x480 frame): ms per image. Rows
   run in order of importance (the goals first) until --compile-budget-s is spent; the rest
   are listed as skipped.
5. Served round trip with compiled graphs: `zdepth serve --compile reduce-overhead
   --warmup-shapes 480x640`, 640x480 JPEG -> metric depth in the client's default (compact)
   form over loopback tcp: p50 round trip, the worker's compute, and the rest (client, broker
   and wire).
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

from zdepth.engine import DTYPES  # noqa: E402


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
                rows.append(
                    {
                        "encoder": encoder,
                        "dtype": dtype_name,
                        "batch": batch,
                        "ms_per_batch": round(ms, 3),
                        "ms_per_image": round(ms / batch, 3),
                    }
                )
                print(
                    f"model {encoder} {dtype_name:5s} batch {batch}: {ms:8.2f} ms/batch {ms / batch:8.2f} ms/image",
                    flush=True,
                )
        base = model = None  # freed before the next encoder's model
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
            row = {
                "dtype": dtype_name,
                "method": method,
                **{k: round(statistics.median(t[k] for t in timings), 3) for k in timings[0]},
            }
            rows.append(row)
            print("engine", row, flush=True)
    return rows


def compiled_cases(quick: bool) -> list:
    """(encoder, dtype, (height, width), batch) in order of importance: the goals' rows first."""
    square, frame = (518, 518), (518, 686)
    first = [
        ("vits", "fp16", square, 1),
        ("vitl", "fp16", square, 1),
        ("vits", "bf16", square, 1),
        ("vits", "fp16", frame, 1),
        ("vits", "fp16", square, 4),
        ("vits", "fp16", square, 8),
    ]
    if quick:
        return first[:1]
    rest = [
        (e, d, s, b)
        for e in ("vits", "vitb", "vitl")
        for d in ("fp16", "bf16")
        for s in (square, frame)
        for b in (1, 4, 8)
    ]
    return first + [case for case in rest if case not in first]


def bench_compiled(cases: list, mode: str, iterations: int, budget_s: float) -> list:
    """Eager and compiled ms per image for each case until `budget_s` is spent (a vits graph
    builds in tens of seconds, vitl in more)."""
    from zdepth.compiled import CompiledGraphs, GraphKey
    from zdepth.model import DepthAnythingV2, random_init_

    started = time.monotonic()
    rows, models = [], {}
    for encoder, dtype_name, shape, batch in cases:
        if time.monotonic() - started > budget_s:
            rows.append(
                {
                    "encoder": encoder,
                    "dtype": dtype_name,
                    "shape": list(shape),
                    "batch": batch,
                    "skipped": f"over the {budget_s:.0f} s budget",
                }
            )
            continue
        key = (encoder, dtype_name)
        if key not in models:
            models.clear()  # one model on the GPU at a time
            torch.cuda.empty_cache()
            models[key] = (
                random_init_(DepthAnythingV2(encoder, metric=True), seed=0).eval().to("cuda", DTYPES[dtype_name])
            )
        model = models[key]
        graphs = CompiledGraphs(mode, torch.device("cuda"), max_graphs=1)
        graph_key = GraphKey(encoder, "hypersim", shape, batch, dtype_name)
        x = torch.randn(batch, 3, *shape, device="cuda", dtype=DTYPES[dtype_name])
        with torch.inference_mode():
            build_start = time.perf_counter()
            graphs.run(graph_key, model, x)
            torch.cuda.synchronize()
            build_s = time.perf_counter() - build_start
            eager_ms = median_ms(lambda: model(x), iterations, warmup=3)
            compiled_ms = median_ms(lambda: graphs.run(graph_key, model, x), iterations, warmup=3)
        row = {
            "encoder": encoder,
            "dtype": dtype_name,
            "shape": list(shape),
            "batch": batch,
            "mode": mode,
            "eager_ms_per_image": round(eager_ms / batch, 3),
            "compiled_ms_per_image": round(compiled_ms / batch, 3),
            "ratio": round(compiled_ms / eager_ms, 3),
            "build_s": round(build_s, 1),
            "compile_failed": graphs.failure,
        }
        rows.append(row)
        print("compiled", row, flush=True)
    models.clear()
    torch.cuda.empty_cache()
    return rows


def bench_served_compiled(iterations: int, mode: str) -> dict:
    """640x480 JPEG -> metric depth (the client's default form) through `zdepth serve --compile`."""
    try:
        from bench.common import ZdepthServer, compute_ms, percentile, sample_jpeg, workdir
        from clients import DepthClient
    except ImportError as exc:
        return {"skipped": f"{exc}"}
    jpeg = sample_jpeg(640, 480)
    extra = ["--compile", mode, "--warmup-shapes", "480x640", "--preload", "vits:hypersim"]
    with workdir() as tmp, ZdepthServer(Path(tmp), device="cuda", dtype="fp16", extra=extra) as server:
        with DepthClient(server.endpoint, timeout=60.0) as client:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                worker = client.health()["workers"][0]
                if worker["ready"] and not worker["warming"]:
                    break
                time.sleep(0.2)
            warm_up_s = round(300 - (deadline - time.monotonic()), 1)
            round_trips, computes, compiled_now = [], [], 0
            for i in range(iterations + 3):
                start = time.perf_counter()
                result = client.metric_depth(jpeg)
                elapsed = (time.perf_counter() - start) * 1000.0
                compiled_now += "compile_ms" in result.timing
                if i >= 3:
                    round_trips.append(elapsed)
                    computes.append(compute_ms(result.timing))
    overhead = [rt - c for rt, c in zip(round_trips, computes)]
    row = {
        "mode": mode,
        "dtype": "fp16",
        "warm_up_s": warm_up_s,
        "replies_that_compiled": compiled_now,
        "round_trip_p50_ms": round(percentile(round_trips, 50), 3),
        "round_trip_p90_ms": round(percentile(round_trips, 90), 3),
        "worker_compute_p50_ms": round(percentile(computes, 50), 3),
        "client_broker_wire_p50_ms": round(percentile(overhead, 50), 3),
        "n": len(round_trips),
    }
    print("served compiled", row, flush=True)
    return row


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
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        help="torch.compile mode for parts 4 and 5 (default: reduce-overhead)",
    )
    parser.add_argument("--compile-budget-s", type=float, default=90.0, help="seconds for part 4's rows (default: 90)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    iterations = 5 if args.quick else 30
    encoders = ["vits"] if args.quick else ["vits", "vitb", "vitl"]
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Most important first, and the file rewritten after each part: a run cut short by a time
    # limit keeps what it measured.
    parts = [
        ("model", lambda: bench_model(encoders, [1, 8], iterations)),
        (
            "compiled",
            lambda: bench_compiled(compiled_cases(args.quick), args.compile_mode, iterations, args.compile_budget_s),
        ),
        ("served_compiled", lambda: bench_served_compiled(max(50, iterations), args.compile_mode)),
        ("engine", lambda: bench_engine(iterations)),
        ("served", lambda: bench_served(max(20, iterations))),
    ]
    for name, part in parts:
        if args.skip_served and name.startswith("served"):
            continue
        results[name] = part()
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out} ({name})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
