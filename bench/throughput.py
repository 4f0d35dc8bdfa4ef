"""Throughput and scaling: N concurrent clients against M CPU workers.

    python -m bench throughput [--quick] [--clients 1,2,4,8] [--duration 20] [--rounds 5] [--input-size 112]
    python -m bench scaling    [--quick] [--max-workers 2]   [--duration 20] [--rounds 5] [--input-size 112]

Each client is a thread with its own `DepthClient`, sending 640x480 JPEG -> metric depth
requests back to back for a fixed window; throughput is the requests completed in the window
divided by its length. `throughput` loads one server (as many workers as cores) with more and
more clients: requests/s and how latency grows with queueing. `scaling` runs 1, 2, ...
workers with twice as many clients as workers (so no worker waits for a client) and reports
the speed-up over one worker (all servers run at once, idle but one). Configurations take
turns in short windows, round by round, so that the load other processes put on a shared
machine falls on all of them alike. The CPU time used by the client, the broker and the
workers during the windows is read from /proc to show where the cores went.

Every worker runs one torch thread: on a shared 2-core machine two OpenMP threads in one
process collapse as soon as anything else wants a core (measured here: a forward pass 4-12x
slower with 2 threads than with 1 while other processes were busy).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    ZdepthServer,
    child_pids,
    compute_ms,
    cpu_seconds,
    goal,
    parse_size,
    percentile,
    print_goals,
    print_table,
    progress,
    pyplot,
    sample_jpeg,
    save_figure,
    summarize,
    workdir,
    write_results,
)
from clients import DepthClient

DEFAULT_INPUT_SIZE = 112  # large enough that compute, which is what workers scale, dominates
SCALING_GOAL = 1.7  # 2 CPU workers >= 1.7x the throughput of 1 (on 2 cores)


@dataclass
class Load:
    """What one (server, clients) configuration did in its measurement windows, summed over rounds."""

    clients: int
    workers: int
    seconds: float = 0.0
    samples: list = field(default_factory=list)  # (round trip ms, compute ms) of requests completed in a window
    errors: list = field(default_factory=list)
    cpu_seconds: Counter = field(default_factory=Counter)  # client / broker / workers

    def summary(self) -> dict:
        """Requests/s, latency percentiles, CPU use, and requests per second of CPU the workers
        actually got: on a shared machine the cores a worker count asks for may not be there."""
        rps = len(self.samples) / self.seconds if self.seconds else 0.0
        worker_cores = self.cpu_seconds["workers"] / self.seconds if self.seconds else 0.0
        return {
            "workers": self.workers,
            "clients": self.clients,
            "requests": len(self.samples),
            "window_s": round(self.seconds, 2),
            "rps": round(rps, 2),
            "rps_per_worker_core": round(rps / worker_cores, 2) if worker_cores else None,
            **summarize([s[0] for s in self.samples], "rt_"),
            "compute_p50": round(percentile([s[1] for s in self.samples], 50), 3),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "cpu_percent": {name: round(100.0 * used / self.seconds, 1) for name, used in self.cpu_seconds.items()},
        }


def warm(server: ZdepthServer, jpeg: bytes, input_size: int) -> None:
    """The broker hands sequential requests to each worker in turn: every worker loads the model."""
    with DepthClient(server.endpoint, timeout=120.0) as client:
        for _ in range(2 * server.workers):
            client.metric_depth(jpeg, input_size=input_size)


def measure_window(server: ZdepthServer, load: Load, duration_s: float, jpeg: bytes, input_size: int) -> None:
    """`load.clients` threads send requests back to back; the requests that complete within the
    next `duration_s` seconds, and the CPU each process uses meanwhile, are added to `load`."""
    stop = threading.Event()
    start = threading.Barrier(load.clients + 1)
    samples: list = []  # (t_done, round trip ms, compute ms)

    def client_loop() -> None:
        with DepthClient(server.endpoint, timeout=120.0) as client:
            try:
                client.metric_depth(jpeg, input_size=input_size)  # its connection is up before the window opens
            except Exception as exc:
                load.errors.append(f"warm-up: {type(exc).__name__}: {exc}")
                start.abort()  # the window cannot start: wake everyone
                return
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    result = client.metric_depth(jpeg, input_size=input_size)
                except Exception as exc:  # counted and reported: a benchmark must finish
                    load.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                done = time.perf_counter()
                samples.append((done, (done - began) * 1000.0, compute_ms(result.timing)))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(load.clients)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        raise RuntimeError(
            f"a client failed before the window: {load.errors[0] if load.errors else 'unknown'}"
        ) from None
    pids = {"client": [os.getpid()], "broker": [server.proc.pid], "workers": child_pids(server.proc.pid)}
    cpu_before = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
    t0 = time.perf_counter()
    time.sleep(duration_s)
    t1 = time.perf_counter()
    for name, group in pids.items():
        load.cpu_seconds[name] += sum(map(cpu_seconds, group)) - cpu_before[name]
    stop.set()
    for thread in threads:
        thread.join()
    load.seconds += t1 - t0
    load.samples += [(rt, compute) for done, rt, compute in samples if t0 <= done <= t1]


def measure_interleaved(
    configs: list, rounds: int, duration_s: float, jpeg: bytes, input_size: int, label: str
) -> list:
    """[(server, clients)] -> [Load]: each round gives every configuration a window of
    duration_s / rounds in turn, so the load other processes put on a shared machine falls on
    all configurations alike and their ratios stay meaningful."""
    loads = [Load(clients, server.workers) for server, clients in configs]
    for server in {id(server): server for server, _ in configs}.values():
        warm(server, jpeg, input_size)
    for r in range(rounds):
        for (server, _), load in zip(configs, loads):
            measure_window(server, load, duration_s / rounds, jpeg, input_size)
        progress(f"{label}: round {r + 1}/{rounds} done")
    return loads


def _cpu_text(row: dict) -> str:
    cpu = row["cpu_percent"]
    return f"{cpu['client']:.0f}/{cpu['broker']:.0f}/{cpu['workers']:.0f}"


def _common_arguments(parser, duration: float) -> None:
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds of measurement per configuration, over all rounds (default {duration:g}; --quick: 1)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick: 1)")
    parser.add_argument("--size", help="image size WxH (default 640x480; --quick: 160x120)")
    parser.add_argument("--input-size", type=int, help=f"model input size (default {DEFAULT_INPUT_SIZE}; --quick: 56)")


def _workload(args, duration: float) -> tuple:
    size = parse_size(args.size or ("160x120" if args.quick else "640x480"))
    input_size = args.input_size or (56 if args.quick else DEFAULT_INPUT_SIZE)
    rounds = args.rounds or (1 if args.quick else 5)
    return size, sample_jpeg(*size), input_size, args.duration or (1.0 if args.quick else duration), rounds


# --- throughput -----------------------------------------------------------------------------


def add_throughput_arguments(parser) -> None:
    parser.add_argument("--clients", help="concurrent client counts, comma-separated (default 1,2,4,8; --quick: 1,2)")
    parser.add_argument("--workers", type=int, help="CPU workers (default: one per core)")
    _common_arguments(parser, 20.0)


def run_throughput(args) -> dict:
    size, jpeg, input_size, duration, rounds = _workload(args, 20.0)
    client_counts = [int(n) for n in (args.clients or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    workers = args.workers or os.cpu_count() or 1
    with workdir() as tmp:
        progress(f"starting zdepth serve with {workers} CPU worker(s), 1 torch thread each")
        with ZdepthServer(Path(tmp), workers=workers, threads=1) as server:
            progress(
                f"{client_counts} clients x {workers} worker(s), {duration:g} s each in {rounds} interleaved rounds"
            )
            rows = [
                load.summary()
                for load in measure_interleaved(
                    [(server, n) for n in client_counts], rounds, duration, jpeg, input_size, "throughput"
                )
            ]
    title = f"Throughput, {workers} CPU worker(s) x 1 thread, {size[0]}x{size[1]} JPEG -> metric_depth, vits input_size {input_size}, {duration:g} s per row"
    table = print_table(
        title,
        [
            "clients",
            "req/s",
            "rt p50",
            "rt p90",
            "rt p99",
            "compute p50",
            "queueing p50",
            "errors",
            "CPU % client/broker/workers",
            "req/s per worker core",
        ],
        [
            (
                r["clients"],
                r["rps"],
                r["rt_p50"],
                r["rt_p90"],
                r["rt_p99"],
                r["compute_p50"],
                round(r["rt_p50"] - r["compute_p50"], 3),
                r["errors"],
                _cpu_text(r),
                r["rps_per_worker_core"],
            )
            for r in rows
        ],
    )
    plot_throughput(rows, args.out_dir, title)
    config = {
        "workers": workers,
        "threads_per_worker": 1,
        "size": f"{size[0]}x{size[1]}",
        "input_size": input_size,
        "duration_s": duration,
        "rounds": rounds,
        "quick": args.quick,
    }
    write_results(args.out_dir, "throughput", {"config": config, "rows": rows, "table": table})
    return {"rows": rows}


def plot_throughput(rows: list, out_dir, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, rps_axis = plt.subplots(figsize=(8, 5))
    clients = [r["clients"] for r in rows]
    rps_axis.plot(clients, [r["rps"] for r in rows], "o-", color="#2e86ab", label="requests/s")
    rps_axis.set_xlabel("concurrent clients")
    rps_axis.set_ylabel("requests/s")
    latency_axis = rps_axis.twinx()
    latency_axis.plot(clients, [r["rt_p50"] for r in rows], "s--", color="#d1495b", label="latency p50")
    latency_axis.plot(clients, [r["rt_p90"] for r in rows], "^:", color="#d1495b", label="latency p90")
    latency_axis.set_ylabel("ms")
    rps_axis.set_ylim(bottom=0)
    latency_axis.set_ylim(bottom=0)
    handles = rps_axis.get_legend_handles_labels()[0] + latency_axis.get_legend_handles_labels()[0]
    rps_axis.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    rps_axis.set_title(title, fontsize=8)
    save_figure(plt, figure, out_dir, "throughput")


# --- scaling --------------------------------------------------------------------------------


def add_scaling_arguments(parser) -> None:
    parser.add_argument(
        "--max-workers", type=int, help="largest worker count (default: the number of cores, at least 2)"
    )
    _common_arguments(parser, 20.0)


def run_scaling(args) -> dict:
    size, jpeg, input_size, duration, rounds = _workload(args, 20.0)
    max_workers = args.max_workers or max(2, os.cpu_count() or 1)
    with workdir() as tmp, contextlib.ExitStack() as stack:
        servers = []
        for workers in range(1, max_workers + 1):  # all at once: an idle server costs nothing but memory
            progress(f"starting zdepth serve with {workers} CPU worker(s), 1 torch thread each")
            servers.append(stack.enter_context(ZdepthServer(Path(tmp), workers=workers, threads=1)))
        progress(f"1..{max_workers} workers with 2 clients each, {duration:g} s each in {rounds} interleaved rounds")
        rows = [
            load.summary()
            for load in measure_interleaved(
                [(s, 2 * s.workers) for s in servers], rounds, duration, jpeg, input_size, "scaling"
            )
        ]
    for row in rows:
        row["speedup"] = round(row["rps"] / rows[0]["rps"], 2) if rows[0]["rps"] else None
        row["efficiency"] = round(row["speedup"] / row["workers"], 2) if row["speedup"] else None
    title = f"Scaling on {os.cpu_count()} cores, 1 torch thread per worker, 2 clients per worker, {size[0]}x{size[1]} -> metric_depth, input_size {input_size}"
    table = print_table(
        title,
        [
            "workers",
            "clients",
            "req/s",
            "speed-up",
            "efficiency",
            "rt p50",
            "rt p90",
            "compute p50",
            "errors",
            "CPU % client/broker/workers",
            "req/s per worker core",
        ],
        [
            (
                r["workers"],
                r["clients"],
                r["rps"],
                r["speedup"],
                r["efficiency"],
                r["rt_p50"],
                r["rt_p90"],
                r["compute_p50"],
                r["errors"],
                _cpu_text(r),
                r["rps_per_worker_core"],
            )
            for r in rows
        ],
    )
    goals = []
    two = next((r for r in rows if r["workers"] == 2), None)
    if two is not None:
        goals.append(
            goal(
                f"2 CPU workers >= {SCALING_GOAL}x the throughput of 1 ({os.cpu_count()} cores)",
                f"{two['speedup']:.2f}x ({two['rps']:.2f} vs {rows[0]['rps']:.2f} req/s); the workers got "
                f"{two['cpu_percent']['workers']:.0f} % vs {rows[0]['cpu_percent']['workers']:.0f} % of a core",
                two["speedup"] >= SCALING_GOAL,
            )
        )
    print_goals(goals)
    plot_scaling(rows, args.out_dir, title)
    config = {
        "max_workers": max_workers,
        "threads_per_worker": 1,
        "clients_per_worker": 2,
        "size": f"{size[0]}x{size[1]}",
        "input_size": input_size,
        "duration_s": duration,
        "rounds": rounds,
        "quick": args.quick,
    }
    write_results(args.out_dir, "scaling", {"config": config, "rows": rows, "goals": goals, "table": table})
    return {"rows": rows, "goals": goals}


def plot_scaling(rows: list, out_dir, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(7, 5))
    workers = [r["workers"] for r in rows]
    axis.plot(workers, [r["rps"] for r in rows], "o-", color="#2e86ab", label="measured")
    axis.plot(workers, [rows[0]["rps"] * w for w in workers], "--", color="grey", label="linear (ideal)")
    axis.plot(
        workers,
        [rows[0]["rps"] * (1 + (SCALING_GOAL - 1) * (w - 1)) for w in workers],
        ":",
        color="#d1495b",
        label=f"goal ({SCALING_GOAL}x at 2)",
    )
    for r in rows:
        axis.annotate(
            f"{r['speedup']}x, workers got {r['cpu_percent']['workers']:.0f} % of a core",
            (r["workers"], r["rps"]),
            textcoords="offset points",
            xytext=(-60, -14),
            fontsize=8,
        )
    axis.set_xticks(workers)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("CPU workers (1 torch thread each)")
    axis.set_ylabel("requests/s")
    axis.set_title(title, fontsize=7)
    axis.legend()
    axis.grid(True, alpha=0.3)
    save_figure(plt, figure, out_dir, "scaling")
