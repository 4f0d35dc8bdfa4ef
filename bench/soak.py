"""Soak with faults: many clients and cameras for minutes while workers and the broker are killed.

    python -m bench.soak [--seconds 180] [--clients 8] [--cameras 2] [--workers 2]
                         [--kill-every 15] [--broker-every 60] [--max-requests N] [--out FILE]

Loopback only. A `zdepth broker` and N separate `zdepth worker` processes (random weights
unless --checkpoint-dir); client threads, each with its own `DepthClient` (retries on), send
small requests (64x48 images, input size 56) back to back; camera threads push frames and
subscriber threads collect the results. Meanwhile a chaos thread SIGKILLs a random worker
every --kill-every seconds (and starts it again), and SIGKILLs and restarts the broker on the
same ports every --broker-every seconds.

Every request ends in exactly one of: a result, an error reply (counted by code), or `lost`
(the client got no answer at all after its retries: `Timeout`, or any other exception). The
client's timeout is sized to outlast a broker restart and a worker's death detection, so a
correct server loses nothing: `lost` must be 0. Peak memory is the largest VmHWM
(/proc/PID/status) seen for the broker and for any worker, read every half second and just
before each kill.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from bench.common import Child, free_port_block
from bench.fuzz import proc_status_kb
from clients import CameraPublisher, DepthClient, DepthSubscriber, ServerError, Timeout
from zdepth import protocol as P

INPUT_SIZE = 56
IMAGE_SHAPE = (48, 64, 3)
INTRINSICS = {"fx": 50.0, "fy": 50.0, "cx": 31.5, "cy": 23.5}


@dataclass
class SoakConfig:
    seconds: float = 180.0  # how long requests are sent; in-flight ones finish after
    clients: int = 8
    cameras: int = 2
    camera_fps: float = 5.0
    workers: int = 2
    kill_every_s: float = 15.0  # SIGKILL a worker this often (0: never)
    broker_every_s: float = 60.0  # SIGKILL and restart the broker this often (0: never)
    max_requests: Optional[int] = None  # stop sending after this many requests in all
    checkpoint_dir: Optional[str] = None  # None: --random-weights
    client_timeout_s: float = 40.0  # per request, retries included: outlasts a restart or a death detection
    client_retries: int = 4


@dataclass
class SoakReport:
    seconds: float = 0.0
    sent: int = 0
    answered_ok: int = 0
    errors: dict = field(default_factory=dict)  # code -> count
    lost: int = 0
    lost_examples: list = field(default_factory=list)
    worker_kills: int = 0
    broker_restarts: int = 0
    stream_frames_sent: int = 0
    stream_frames_dropped_locally: int = 0
    stream_results: int = 0
    stream_results_dropped_by_broker: int = 0  # sum of each result's `dropped`
    broker_peak_kb: int = 0
    worker_peak_kb: int = 0

    @property
    def answered_with_errors(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> str:
        return "\n".join(
            [
                f"duration {self.seconds:.1f} s, {self.worker_kills} worker kills (SIGKILL), {self.broker_restarts} broker restarts (SIGKILL)",
                f"requests: sent {self.sent}, answered with results {self.answered_ok}, answered with errors {self.answered_with_errors} "
                f"{dict(sorted(self.errors.items()))}, lost {self.lost}",
                f"streams: frames sent {self.stream_frames_sent} (+{self.stream_frames_dropped_locally} dropped in the publisher), "
                f"results {self.stream_results}, dropped by the broker (newest frame wins) {self.stream_results_dropped_by_broker}",
                f"peak memory (VmHWM): broker {self.broker_peak_kb / 1024:.1f} MB, worker {self.worker_peak_kb / 1024:.1f} MB",
            ]
            + [f"lost: {example}" for example in self.lost_examples]
        )


class Cluster:
    """A broker and its workers as separate processes on fixed ports, killed and restarted at will."""

    def __init__(self, workdir: Path, config: SoakConfig):
        self.workdir = workdir
        self.config = config
        self.port = free_port_block(5)
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        ports = P.port_layout(self.port)
        self.stream = f"tcp://127.0.0.1:{ports.stream}"
        self.pub = f"tcp://127.0.0.1:{ports.pub}"
        self.backend = f"tcp://127.0.0.1:{ports.backend}"
        self.lock = threading.Lock()
        self.starts = collections.Counter()
        self.broker = self._start_broker()
        self.workers = [self._start_worker(i) for i in range(config.workers)]
        self.peak_kb = {"broker": 0, "worker": 0}
        self.wait_workers(config.workers)

    def _child(self, name: str, args: list) -> Child:
        self.starts[name] += 1
        return Child(
            f"{name}-{self.starts[name]}",
            [sys.executable, "-m", "zdepth", *args, "--log-level", "WARNING"],
            self.workdir,
        )

    def _start_broker(self) -> Child:
        return self._child("broker", ["broker", "--port", str(self.port)])

    def _start_worker(self, i: int) -> Child:
        weights = (
            ["--checkpoint-dir", self.config.checkpoint_dir] if self.config.checkpoint_dir else ["--random-weights"]
        )
        return self._child(
            f"worker{i}",
            ["worker", "--connect", self.backend, "--device", "cpu", "--threads", "1", "--name", f"soak-{i}", *weights],
        )

    def health(self) -> Optional[dict]:
        try:
            with DepthClient(self.endpoint, timeout=1.0, retries=0) as client:
                return client.health()
        except (Timeout, ServerError):
            return None

    def wait_workers(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len((self.health() or {}).get("workers", [])) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} workers not registered within {timeout_s:.0f} s:\n{self.broker.log_tail()}")
            time.sleep(0.2)

    def sample_memory(self) -> None:
        with self.lock:
            self._sample("broker", self.broker)
            for worker in self.workers:
                self._sample("worker", worker)

    def _sample(self, role: str, child: Child) -> None:
        self.peak_kb[role] = max(self.peak_kb[role], proc_status_kb(child.proc.pid, "VmHWM"))

    def kill_worker(self, rng: random.Random) -> None:
        with self.lock:
            i = rng.randrange(len(self.workers))
            self._sample("worker", self.workers[i])
            self.workers[i].proc.send_signal(signal.SIGKILL)
            self.workers[i].stop()
            self.workers[i] = self._start_worker(i)

    def restart_broker(self) -> None:
        with self.lock:
            self._sample("broker", self.broker)
            self.broker.proc.send_signal(signal.SIGKILL)
            self.broker.stop()
            self.broker = self._start_broker()

    def stop(self) -> None:
        with self.lock:
            for child in [self.broker, *self.workers]:
                child.stop()


class Tally:
    """Outcomes of every request, from many client threads."""

    def __init__(self, max_requests: Optional[int]):
        self.lock = threading.Lock()
        self.max_requests = max_requests
        self.sent = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.lost_examples: list = []

    def take_ticket(self) -> bool:
        with self.lock:
            if self.max_requests is not None and self.sent >= self.max_requests:
                return False
            self.sent += 1
            return True

    def record(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "lost" and len(self.lost_examples) < 5:
                self.lost_examples.append(detail)


def client_loop(endpoint: str, config: SoakConfig, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with DepthClient(
        endpoint, timeout=config.client_timeout_s, retries=config.client_retries, input_size=INPUT_SIZE
    ) as client:
        while not stop.is_set() and tally.take_ticket():
            image = rng.integers(0, 255, IMAGE_SHAPE, dtype=np.uint8)
            method = rng.integers(3)
            try:
                if method == 0:
                    client.metric_depth(image)
                elif method == 1:
                    client.relative_depth(image)
                else:
                    client.pointcloud(image, INTRINSICS)
                tally.record("ok")
            except ServerError as error:
                tally.record(error.code)
            except Exception as exc:  # Timeout, or anything else: no answer reached the caller
                tally.record("lost", f"{type(exc).__name__}: {exc}")


def camera_loop(endpoint: str, name: str, fps: float, stop: threading.Event, counts: dict) -> None:
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    frames = (rng.integers(0, 255, IMAGE_SHAPE, dtype=np.uint8) for _ in iter(int, 1))
    with CameraPublisher(endpoint, stream=name, input_size=INPUT_SIZE) as camera:
        camera.run(frames, fps=fps, stop=stop)
        counts[name] = (camera.sent, camera.dropped_local)


def subscriber_loop(endpoint: str, names: list, stop: threading.Event, results: list) -> None:
    with DepthSubscriber(endpoint, streams=names) as subscriber:
        while not stop.is_set():
            result = subscriber.recv(timeout=0.2)
            if result is not None:
                results.append(result.dropped)


def run_soak(config: SoakConfig, log=print) -> SoakReport:
    """Run the soak; returns its report. Processes live in a temporary folder and are stopped at the end."""
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="zdepth-soak-") as tmp:
        cluster = Cluster(Path(tmp), config)
        report = SoakReport()
        tally = Tally(config.max_requests)
        stop_sending, stop_streams = threading.Event(), threading.Event()
        names = [f"soak-cam{i}" for i in range(config.cameras)]
        stream_counts: dict = {}
        stream_results: list = []
        threads = [
            threading.Thread(target=client_loop, args=(cluster.endpoint, config, tally, stop_sending, i), daemon=True)
            for i in range(config.clients)
        ]
        streams = [
            threading.Thread(
                target=camera_loop,
                args=(cluster.stream, name, config.camera_fps, stop_streams, stream_counts),
                daemon=True,
            )
            for name in names
        ]
        if names:
            streams.append(
                threading.Thread(
                    target=subscriber_loop, args=(cluster.pub, names, stop_streams, stream_results), daemon=True
                )
            )
        try:
            start = time.monotonic()
            for thread in threads + streams:
                thread.start()
            next_kill = start + config.kill_every_s if config.kill_every_s else float("inf")
            next_broker = start + config.broker_every_s if config.broker_every_s else float("inf")
            while time.monotonic() - start < config.seconds and any(t.is_alive() for t in threads):
                now = time.monotonic()
                if now >= next_broker:
                    log(f"[{now - start:6.1f} s] SIGKILL broker, restarting it")
                    cluster.restart_broker()
                    report.broker_restarts += 1
                    next_broker = now + config.broker_every_s
                    next_kill = max(next_kill, now + config.kill_every_s / 2)  # one fault at a time
                elif now >= next_kill:
                    log(f"[{now - start:6.1f} s] SIGKILL a worker, restarting it")
                    cluster.kill_worker(rng)
                    report.worker_kills += 1
                    next_kill = now + config.kill_every_s
                cluster.sample_memory()
                time.sleep(0.5)
            stop_sending.set()
            for thread in threads:  # each finishes its request in flight: at most the client timeout
                while thread.is_alive():
                    cluster.sample_memory()
                    thread.join(0.5)
            report.seconds = time.monotonic() - start
            stop_streams.set()
            for thread in streams:
                thread.join(10)
            cluster.sample_memory()
        finally:
            stop_sending.set()
            stop_streams.set()
            cluster.stop()
    report.sent = tally.sent
    report.answered_ok = tally.outcomes.pop("ok", 0)
    report.lost = tally.outcomes.pop("lost", 0)
    report.lost_examples = tally.lost_examples
    report.errors = dict(tally.outcomes)
    report.stream_frames_sent = sum(sent for sent, _ in stream_counts.values())
    report.stream_frames_dropped_locally = sum(dropped for _, dropped in stream_counts.values())
    report.stream_results = len(stream_results)
    report.stream_results_dropped_by_broker = sum(stream_results)
    report.broker_peak_kb, report.worker_peak_kb = cluster.peak_kb["broker"], cluster.peak_kb["worker"]
    return report


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = SoakConfig()
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--cameras", type=int, default=defaults.cameras)
    parser.add_argument("--camera-fps", type=float, default=defaults.camera_fps)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument(
        "--kill-every", type=float, default=defaults.kill_every_s, help="seconds between worker kills (0: none)"
    )
    parser.add_argument(
        "--broker-every", type=float, default=defaults.broker_every_s, help="seconds between broker restarts (0: none)"
    )
    parser.add_argument("--max-requests", type=int, help="stop after this many requests")
    parser.add_argument("--checkpoint-dir", help="real checkpoints (default: --random-weights)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds,
        clients=args.clients,
        cameras=args.cameras,
        camera_fps=args.camera_fps,
        workers=args.workers,
        kill_every_s=args.kill_every,
        broker_every_s=args.broker_every,
        max_requests=args.max_requests,
        checkpoint_dir=args.checkpoint_dir,
    )
    report = run_soak(config)
    print(report.summary())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": asdict(config), "report": asdict(report)}, indent=2))
    return 1 if report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
