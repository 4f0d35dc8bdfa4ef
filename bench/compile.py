"""Compiled graphs against eager on this machine's CPU, side by side in one run.

    python -m bench compile [--quick] [--input 518x518] [--threads 2] [--iterations 10] [--mode default]
                            [--dtype fp32|bf16] [--no-batching]

1. vits (random weights, --dtype, channels-last as the engine runs it) at --input, batch 1: the
   eager forward pass and the compiled graph (zdepth/compiled.py, the engine's own code path),
   timed in alternation so that load from other processes hits both alike; median ms each, and
   the ratio compiled / eager (the goal: <= 0.85). The graph's build time is reported too.
2. Dynamic batching with compiled graphs, at --batch-input (smaller, to bound the time): a batch
   of 3 through a graph built for 3, against the same batch padded to the bucket of 4 (what the
   engine does), next to the eager batch of 3. Padding costs compute per call; a graph per batch
   size costs a build (and memory) per size.

Every part is bounded: a few iterations, and one build per graph (tens of seconds each on a
2-core machine). `--quick` uses input 56 and 3 iterations: a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import goal, parse_size, print_goals, print_table, progress, write_results

RATIO_GOAL = 0.85  # compiled / eager forward time, vits at 518x518 on 2 CPU threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", default="518x518", help="model input WxH, multiples of 14 (default 518x518)")
    parser.add_argument(
        "--batch-input", default="224x224", help="model input WxH for the batching comparison (default 224x224)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--iterations", type=int, default=10, help="timed forward passes per variant (default 10)")
    parser.add_argument(
        "--mode", default="default", choices=["default", "max-autotune"], help="torch.compile mode (default: default)"
    )
    parser.add_argument("--encoder", default="vits")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute precision (default fp32)")
    parser.add_argument("--no-batching", action="store_true", help="skip part 2 (the batch padding comparison)")


def _median_ms(calls: dict, iterations: int) -> dict:
    """Each callable once per round, in turn, `iterations` rounds: {name: median ms}."""
    times: dict = {name: [] for name in calls}
    for _ in range(iterations):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def run(args: argparse.Namespace) -> dict:
    import torch

    from zdepth.compiled import CompiledGraphs, GraphKey
    from zdepth.engine import Engine

    if args.quick:
        args.input, args.batch_input, args.iterations = "56x56", "56x56", 3
    engine = Engine(
        device="cpu", dtype=args.dtype, random_weights=True, threads=args.threads
    )  # eager; channels-last like a served model
    model = engine.model(args.encoder, "hypersim")
    graphs = CompiledGraphs(args.mode, engine.device, max_graphs=4)

    def forward(width: int, height: int, batch: int, graph_batch: int = 0):
        x = torch.randn(batch, 3, height, width, dtype=engine.dtype)
        if not graph_batch:
            return lambda: model(x)
        key = GraphKey(args.encoder, "hypersim", (height, width), graph_batch, args.dtype)
        padded = torch.cat([x, x[-1:].expand(graph_batch - batch, -1, -1, -1)]) if graph_batch > batch else x
        return lambda: graphs.run(key, model, padded)

    def build(call) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1000.0

    rows, results = (
        [],
        {"threads": torch.get_num_threads(), "mode": args.mode, "encoder": args.encoder, "dtype": args.dtype},
    )
    with torch.inference_mode():
        width, height = parse_size(args.input)
        eager, compiled = forward(width, height, 1), forward(width, height, 1, graph_batch=1)
        progress(f"building the {width}x{height} graph (mode {args.mode})")
        build_ms = build(compiled)
        progress(f"timing eager and compiled, {args.iterations} rounds")
        ms = _median_ms({"eager": eager, "compiled": compiled}, args.iterations)
        ratio = ms["compiled"] / ms["eager"]
        results["single"] = {
            "input": [height, width],
            "eager_ms": round(ms["eager"], 2),
            "compiled_ms": round(ms["compiled"], 2),
            "ratio": round(ratio, 3),
            "build_s": round(build_ms / 1000, 1),
            "compile_failed": graphs.failure,
        }
        rows.append((f"{args.encoder} {width}x{height} batch 1", ms["eager"], ms["compiled"], ratio, build_ms / 1000))

        if not args.no_batching:
            width, height = parse_size(args.batch_input)
            variants = {
                "eager batch 3": forward(width, height, 3),
                "graph for 3": forward(width, height, 3, graph_batch=3),
                "padded to 4": forward(width, height, 3, graph_batch=4),
            }
            builds = {}
            for name in ("graph for 3", "padded to 4"):
                progress(f"building the {width}x{height} {name} graph")
                builds[name] = build(variants[name])
            ms = _median_ms(variants, args.iterations)
            results["batch3"] = {
                "input": [height, width],
                **{name.replace(" ", "_"): round(v, 2) for name, v in ms.items()},
                **{f"build_s_{name.replace(' ', '_')}": round(v / 1000, 1) for name, v in builds.items()},
            }
            for name in ("graph for 3", "padded to 4"):
                rows.append(
                    (
                        f"{args.encoder} {width}x{height} batch 3, {name}",
                        ms["eager batch 3"],
                        ms[name],
                        ms[name] / ms["eager batch 3"],
                        builds[name] / 1000,
                    )
                )

    print_table(
        f"Compiled ({args.mode}) vs eager, {results['threads']} CPU threads, {args.dtype}, median ms per forward pass",
        ["case", "eager ms", "compiled ms", "compiled / eager", "build s"],
        rows,
    )
    single = results["single"]
    goals = [
        goal(
            f"CPU, {results['threads']} threads, {args.encoder} {args.dtype} at {args.input}: compiled <= {RATIO_GOAL}x eager",
            f"{single['ratio']:.2f}x ({single['compiled_ms']:.0f} vs {single['eager_ms']:.0f} ms)",
            None if args.quick or graphs.failure else single["ratio"] <= RATIO_GOAL,
        )
    ]
    print_goals(goals)
    write_results(args.out_dir, f"compile-{args.dtype}", {**results, "goals": goals})
    return {"goals": goals}
