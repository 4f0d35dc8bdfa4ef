"""`python -m bench NAME [--quick] [--out-dir DIR]`: one entry point for every benchmark;
`all` runs each in turn with its defaults, then prints every goal in one table.

`--quick` is a smoke run (tiny images, a few requests, 1-2 s streams): it checks that a
benchmark works end to end, its numbers mean little. Results go to bench/results/NAME.json
(and NAME.png) unless --out-dir says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import (
    broker_capacity,
    compression,
    cpp_client,
    latency,
    network,
    overhead,
    stream,
    throughput,
)
from bench import compile as compiled  # renamed: not to shadow the builtin
from bench.common import DEFAULT_OUT_DIR, print_goals, progress

# name -> (one line of help, add its options to a parser, run it with the parsed arguments)
BENCHMARKS = {
    "latency": (
        "every method over tcp and ipc: round trip = worker compute + overhead",
        latency.add_arguments,
        latency.run,
    ),
    "overhead": (
        "zdepth against the HTTP designs it replaces and the bare ZeroMQ floor",
        overhead.add_arguments,
        overhead.run,
    ),
    "throughput": (
        "N concurrent clients on all CPU workers: requests/s and latency",
        throughput.add_throughput_arguments,
        throughput.run_throughput,
    ),
    "scaling": (
        "requests/s from 1 to as many workers as the machine has cores",
        throughput.add_scaling_arguments,
        throughput.run_scaling,
    ),
    "stream": ("1 and 3 cameras at 15/30/60 fps: latency and drops over time", stream.add_arguments, stream.run),
    "broker": (
        "requests/s and MB/s one broker relays with zero-compute stand-in workers",
        broker_capacity.add_arguments,
        broker_capacity.run,
    ),
    "network": (
        "reply forms and HTTP baselines over a shaped veth link between network namespaces (root)",
        network.add_arguments,
        network.run,
    ),
    "compression": (
        "bytes and codec time of every wire form of a 640x480 depth map",
        compression.add_arguments,
        compression.run,
    ),
    "cpp": (
        "the C++ client's build time, and its overhead next to DepthClient's",
        cpp_client.add_arguments,
        cpp_client.run,
    ),
    "compile": (
        "compiled graphs against eager on this CPU (vits at 518x518, 2 threads), and batch padding",
        compiled.add_arguments,
        compiled.run,
    ),
}


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny images, few requests, short streams")
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"where results go (default {DEFAULT_OUT_DIR})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (text, add_arguments, run) in BENCHMARKS.items():
        sub = names.add_parser(
            name,
            help=text,
            description=sys.modules[run.__module__].__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_common(sub)
        add_arguments(sub)
        sub.set_defaults(run=run)
    add_common(names.add_parser("all", help="every benchmark in turn, with its defaults"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark != "all":
        args.run(args)
        return 0
    shared = ["--out-dir", str(args.out_dir)] + (["--quick"] if args.quick else [])
    goals = []
    for name in BENCHMARKS:
        progress(f"=== {name} ===")
        sub_args = parser.parse_args([name, *shared])
        goals += sub_args.run(sub_args).get("goals", [])
    print_goals(goals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
