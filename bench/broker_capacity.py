"""Broker capacity: requests/s and MB/s one broker relays when its workers take no time at all.

    python -m bench broker [--quick] [--sizes 100,200000,1228800,3686400] [--workers 1,4] [--clients 4] [--window 4]
                           [--duration 6] [--rounds 3] [--capacity 8]

When does one broker become the limit? The real broker (`zdepth broker`, its own process) is
fed by stand-in workers: small bench processes (not a product mode) that speak the worker
protocol of docs/protocol.md section 11 (READY, then each REQUEST answered at once with a
REPLY, HEARTBEAT every second) and answer every request with a preallocated reply of the size
its `reply_bytes` field asks for (one uint8 array; the broker passes the field through like any
unknown field). No model, no compute: what is left is the broker relaying frames. Replies of
100 B (a small reply), 0.2 MB (compact depth), 1.2 MB (float32 depth) and 3.7 MB (a float32
640x480 point cloud), through a broker with 1 and with 4 stand-in workers.

Load: `--clients` client processes, each a DEALER keeping `--window` requests in flight (a
small JPEG each), all started once and told by the bench, over a control socket, when to run
which configuration, so windows start together. Each configuration runs `--duration` seconds
in total, split over `--rounds` interleaved rounds. The CPU time of the broker, the workers and
the clients during the windows comes from /proc: the broker's share of a core, and the requests
per second one broker core would relay at that CPU cost per request.

All these processes share the machine's cores: on a 2-core machine the clients and workers
take cores the broker would otherwise use, so the requests/s measured here are a lower bound
on the broker's own limit; the broker's CPU time per request says what it would do with a core
to itself.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from bench.common import (
    Child,
    cpu_seconds,
    free_port_block,
    print_table,
    progress,
    pyplot,
    sample_jpeg,
    save_figure,
    summarize,
    workdir,
    write_results,
)
from zdepth import protocol as P

DEFAULT_SIZES = "100,200000,1228800,3686400"
DEFAULT_WORKERS = "1,4"
REQUEST_IMAGE_SIZE = (32, 24)  # a tiny JPEG: the requests stay small, the replies are what is measured
REPLY_TIMEOUT_S = 30.0  # a window's last replies must arrive within this
START_DELAY_S = 0.2  # from the bench's command to the window's start: every client has it by then


# --- stand-in worker (its own process) ------------------------------------------------------


def stand_in_worker(endpoint: str, capacity: int) -> None:
    """A zero-compute worker: READY with `capacity`, then every REQUEST answered at once with an
    `ok` reply carrying one uint8 array of the request's `reply_bytes` (preallocated per size,
    sent zero-copy), and a HEARTBEAT every HEARTBEAT_INTERVAL_S. DISCONNECT: register again.
    Runs until killed."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    ready = [
        P.WORKER_PROTOCOL,
        P.W_READY,
        P.packb({"name": f"stand-in-{os.getpid()}", "device": "none", "capacity": capacity, "pid": os.getpid()}),
    ]
    sock.send_multipart(ready)
    payloads: dict = {}
    next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL_S
    while True:
        if sock.poll(max(0.0, next_beat - time.monotonic()) * 1000.0):
            frames = sock.recv_multipart(copy=False)
            command = frames[1].bytes if len(frames) > 1 else b""
            if command == P.W_REQUEST:
                meta, header = P.unpackb(frames[2].buffer), P.unpackb(frames[3].buffer)
                size = int(header.get("reply_bytes", 0))
                payload = payloads.setdefault(size, np.zeros(size, np.uint8))
                reply = P.pack(P.ok_header(P.safe_id(header)), {"data": payload})
                sock.send_multipart([P.WORKER_PROTOCOL, P.W_REPLY, P.packb({"t": meta["t"]}), *reply], copy=False)
            elif command == P.W_DISCONNECT:
                sock.send_multipart(ready)
        if time.monotonic() >= next_beat:
            sock.send_multipart([P.WORKER_PROTOCOL, P.W_HEARTBEAT])
            next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL_S


# --- load client (its own process) ----------------------------------------------------------


def load_client(control: str, endpoints: list, window: int) -> None:
    """A DEALER per broker; runs the windows the bench's control socket asks for
    ({broker, reply_bytes, start_at, duration_s}; `stop` ends it) and answers each with its counts."""
    context = zmq.Context.instance()
    commands = context.socket(zmq.DEALER)
    commands.connect(control)
    sockets = []
    for endpoint in endpoints:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sockets.append(sock)
    image = sample_jpeg(*REQUEST_IMAGE_SIZE)
    commands.send(P.packb({"ready": True}))
    while True:
        command = P.unpackb(commands.recv())
        if command.get("stop"):
            return
        result = run_window(
            sockets[command["broker"]],
            image,
            command["reply_bytes"],
            window,
            command["start_at"],
            command["duration_s"],
        )
        commands.send(P.packb(result))


def run_window(
    sock: zmq.Socket, image: bytes, reply_bytes: int, window: int, start_at: float, duration_s: float
) -> dict:
    """From wall-clock `start_at`, keep `window` requests in flight for `duration_s`; count the
    replies that arrive in that time, then wait for the rest (not counted)."""
    fields = {
        "v": P.VERSION,
        "method": P.METRIC_DEPTH,
        "image": {"frame": 1, "format": "jpeg"},
        "reply_bytes": reply_bytes,
    }
    ids, sent = itertools.count(), {}

    def send() -> None:
        request_id = next(ids)
        sent[request_id] = time.perf_counter()
        sock.send_multipart([b"", P.packb({**fields, "id": request_id}), image], copy=False)

    time.sleep(max(0.0, start_at - time.time()))
    end = time.perf_counter() + duration_s
    for _ in range(window):
        send()
    replies, relayed, latencies, errors = 0, 0, [], Counter()
    while sent:
        if not sock.poll(REPLY_TIMEOUT_S * 1000.0):
            errors["no reply"] += len(sent)
            break
        frames = sock.recv_multipart(copy=False)[1:]
        header = P.unpackb(frames[0].buffer)
        began, now = sent.pop(header["id"]), time.perf_counter()
        if now > end:
            continue
        if header.get("ok"):
            replies += 1
            relayed += sum(len(frame.buffer) for frame in frames)
            latencies.append((now - began) * 1000.0)
        else:
            errors[header["error"]["code"]] += 1
        send()
    return {"replies": replies, "bytes": relayed, "latencies_ms": latencies, "errors": dict(errors)}


# --- the bench ------------------------------------------------------------------------------


@dataclass
class Config:
    """One configuration's windows, summed over rounds."""

    reply_bytes: int
    workers: int
    seconds: float = 0.0
    replies: int = 0
    relayed: int = 0
    latencies: list = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    cpu: Counter = field(default_factory=Counter)  # broker / workers / clients, CPU seconds

    def summary(self) -> dict:
        rps = self.replies / self.seconds if self.seconds else 0.0
        broker_per_request_us = 1e6 * self.cpu["broker"] / self.replies if self.replies else None
        return {
            "reply_bytes": self.reply_bytes,
            "workers": self.workers,
            "requests": self.replies,
            "window_s": round(self.seconds, 2),
            "rps": round(rps, 1),
            "mb_per_s": round(self.relayed / self.seconds / 1e6, 1) if self.seconds else 0.0,
            **summarize(self.latencies, "rt_"),
            "cpu_percent": {name: round(100.0 * used / self.seconds, 1) for name, used in self.cpu.items()},
            "broker_cpu_us_per_request": round(broker_per_request_us, 1) if broker_per_request_us else None,
            "rps_per_broker_core": round(1e6 / broker_per_request_us) if broker_per_request_us else None,
            "errors": dict(self.errors),
        }


class Broker(Child):
    """`zdepth broker` on free ports with `workers` stand-in workers, ready once health lists them."""

    def __init__(self, tmp: Path, workers: int, capacity: int):
        port = free_port_block(5)
        self.endpoint = P.tcp_endpoint("127.0.0.1", port)
        super().__init__(
            f"broker-{port}", [sys.executable, "-m", "zdepth", "broker", "--port", port, "--log-level", "WARNING"], tmp
        )
        backend = P.tcp_endpoint("127.0.0.1", P.port_layout(port).backend)
        self.workers = []
        try:
            for i in range(workers):
                self.workers.append(
                    Child(
                        f"stand-in-{port}-{i}",
                        [
                            sys.executable,
                            "-m",
                            "bench.broker_capacity",
                            "--stand-in-worker",
                            backend,
                            "--capacity",
                            capacity,
                        ],
                        tmp,
                    )
                )
            self.wait_until(lambda: self._ready(workers), 60, f"listing {workers} stand-in worker(s)")
        except BaseException:
            self.stop()
            raise

    def _ready(self, workers: int) -> bool:
        from clients import DepthClient, ServerError, Timeout

        try:
            with DepthClient(self.endpoint, timeout=1.0, retries=0) as client:
                return len(client.health().get("workers", [])) >= workers
        except (Timeout, ServerError):
            return False

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        super().stop()


def add_arguments(parser) -> None:
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"reply sizes in bytes, comma-separated (default {DEFAULT_SIZES})"
    )
    parser.add_argument(
        "--workers",
        default=DEFAULT_WORKERS,
        help=f"stand-in worker counts, comma-separated (default {DEFAULT_WORKERS})",
    )
    parser.add_argument("--clients", type=int, help="client processes (default 4; --quick: 2)")
    parser.add_argument("--window", type=int, help="requests each client keeps in flight (default 4; --quick: 2)")
    parser.add_argument(
        "--capacity",
        type=int,
        default=8,
        help="requests the broker may have on one stand-in worker at once (default 8)",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of load per configuration, over all rounds (default 6; --quick: 0.3)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick: 1)")


def run(args) -> dict:
    sizes = [int(n) for n in args.sizes.split(",")]
    worker_counts = [int(n) for n in args.workers.split(",")]
    clients = args.clients or (2 if args.quick else 4)
    window = args.window or (2 if args.quick else 4)
    duration = args.duration or (0.3 if args.quick else 6.0)
    rounds = args.rounds or (1 if args.quick else 3)
    configs = [Config(size, workers) for size in sizes for workers in worker_counts]
    with workdir() as tmp:
        tmp = Path(tmp)
        progress(
            f"starting {len(worker_counts)} brokers with {worker_counts} stand-in worker(s) (capacity {args.capacity} each) "
            f"and {clients} client processes ({window} requests in flight each)"
        )
        brokers = []
        try:
            for workers in worker_counts:
                brokers.append(Broker(tmp, workers, args.capacity))
            measure(brokers, configs, worker_counts, clients, window, duration / rounds, rounds, tmp)
        finally:
            for broker in brokers:
                broker.stop()
    rows = [c.summary() for c in configs]
    title = (
        f"One broker, zero-compute stand-in workers (capacity {args.capacity}), {clients} client processes x {window} in flight, "
        f"{duration:g} s per row in {rounds} rounds, {os.cpu_count()} cores shared by all"
    )
    table = print_table(
        title,
        [
            "reply bytes",
            "workers",
            "req/s",
            "MB/s relayed",
            "rt p50 ms",
            "rt p99 ms",
            "broker CPU %",
            "CPU % workers / clients",
            "broker CPU us / request",
            "req/s per broker core",
            "errors",
        ],
        [
            (
                r["reply_bytes"],
                r["workers"],
                r["rps"],
                r["mb_per_s"],
                r["rt_p50"],
                r["rt_p99"],
                r["cpu_percent"]["broker"],
                f"{r['cpu_percent']['workers']:.0f} / {r['cpu_percent']['clients']:.0f}",
                r["broker_cpu_us_per_request"],
                r["rps_per_broker_core"],
                sum(r["errors"].values()),
            )
            for r in rows
        ],
    )
    plot(rows, worker_counts, args.out_dir, title)
    config = {
        "sizes": sizes,
        "workers": worker_counts,
        "clients": clients,
        "window": window,
        "capacity": args.capacity,
        "duration_s": duration,
        "rounds": rounds,
        "quick": args.quick,
        "request_image": f"{REQUEST_IMAGE_SIZE[0]}x{REQUEST_IMAGE_SIZE[1]} JPEG",
    }
    write_results(args.out_dir, "broker", {"config": config, "rows": rows, "table": table})
    return {"rows": rows}


def measure(
    brokers: list,
    configs: list,
    worker_counts: list,
    clients: int,
    window: int,
    window_s: float,
    rounds: int,
    tmp: Path,
) -> None:
    """Start the client processes, then give every configuration a window per round, in turn
    (the first configuration rotating), adding counts and CPU seconds to `configs`."""
    control = zmq.Context.instance().socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    port = control.bind_to_random_port("tcp://127.0.0.1")
    argv = [
        sys.executable,
        "-m",
        "bench.broker_capacity",
        "--load-client",
        f"tcp://127.0.0.1:{port}",
        "--window",
        window,
        *[b.endpoint for b in brokers],
    ]
    children = [Child(f"load-client-{i}", argv, tmp) for i in range(clients)]
    try:
        identities = [collect(control, children, 60.0)[0] for _ in children]
        for r in range(rounds):
            shift = r % len(configs)
            for config in configs[shift:] + configs[:shift]:
                broker = brokers[worker_counts.index(config.workers)]
                pids = {
                    "broker": [broker.proc.pid],
                    "workers": [w.proc.pid for w in broker.workers],
                    "clients": [c.proc.pid for c in children],
                }
                start_at = time.time() + START_DELAY_S
                command = P.packb(
                    {
                        "broker": brokers.index(broker),
                        "reply_bytes": config.reply_bytes,
                        "start_at": start_at,
                        "duration_s": window_s,
                    }
                )
                for identity in identities:
                    control.send_multipart([identity, command])
                time.sleep(max(0.0, start_at - time.time()))
                before = {name: sum(map(cpu_seconds, group)) for name, group in pids.items()}
                time.sleep(window_s)
                for name, group in pids.items():
                    config.cpu[name] += sum(map(cpu_seconds, group)) - before[name]
                config.seconds += window_s
                for _ in children:
                    result = P.unpackb(collect(control, children, window_s + REPLY_TIMEOUT_S + 30.0)[1])
                    config.replies += result["replies"]
                    config.relayed += result["bytes"]
                    config.latencies += result["latencies_ms"]
                    config.errors.update(result["errors"])
            progress(f"broker: round {r + 1}/{rounds} done")
        for identity in identities:
            control.send_multipart([identity, P.packb({"stop": True})])
    finally:
        for child in children:
            child.stop()
        control.close()


def collect(control: zmq.Socket, children: list, timeout_s: float) -> list:
    """The next [identity, message] from a client; fails with its log if one died or none answers in time."""
    deadline = time.monotonic() + timeout_s
    while not control.poll(200):
        dead = next((c for c in children if c.proc.poll() is not None), None)
        if dead is not None:
            raise RuntimeError(f"{dead.name} exited with {dead.proc.returncode}:\n{dead.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the load clients within {timeout_s:.0f} s")
    return control.recv_multipart()


def plot(rows: list, worker_counts: list, out_dir, title: str) -> None:
    """Requests/s and MB/s against reply size, one line per worker count; broker CPU % annotated."""
    plt = pyplot()
    if plt is None:
        return
    figure, (rps_axis, mb_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for workers in worker_counts:
        chosen = [r for r in rows if r["workers"] == workers]
        sizes = [r["reply_bytes"] for r in chosen]
        rps_axis.plot(sizes, [r["rps"] for r in chosen], "o-", label=f"{workers} stand-in worker(s)")
        mb_axis.plot(sizes, [r["mb_per_s"] for r in chosen], "o-", label=f"{workers} stand-in worker(s)")
        for r in chosen:
            rps_axis.annotate(
                f"broker {r['cpu_percent']['broker']:.0f} %",
                (r["reply_bytes"], r["rps"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    for axis, label in ((rps_axis, "requests/s"), (mb_axis, "MB/s relayed (replies)")):
        axis.set_xscale("log")
        axis.set_xlabel("reply bytes")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=8)
    save_figure(plt, figure, out_dir, "broker")


def main(argv: list) -> int:
    """The bench's helper processes: `--stand-in-worker BACKEND` or `--load-client CONTROL BROKER...`."""
    parser = argparse.ArgumentParser(prog="python -m bench.broker_capacity")
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--stand-in-worker", metavar="BACKEND")
    role.add_argument("--load-client", metavar="CONTROL")
    parser.add_argument("--capacity", type=int, default=1)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("brokers", nargs="*")
    args = parser.parse_args(argv)
    if args.stand_in_worker:
        stand_in_worker(args.stand_in_worker, args.capacity)
    else:
        load_client(args.load_client, args.brokers, args.window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
