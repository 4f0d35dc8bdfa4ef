"""Watch zdepth streams: per-stream latency p50/p99 and drop statistics every few seconds.

    python clients/examples/stream_stats.py --server tcp://gpu:5555 [--streams cam0 cam1] [--interval 5]

For each stream and interval it prints:
- results/s and errors,
- latency p50/p99: capture to result ready on the broker (`latency_ms`; camera and broker
  clocks must agree when they are different machines),
- age p50/p99: capture to arrival here, what a control loop acting on the result lives with,
- dropped: frames the broker replaced by newer ones (latest frame wins, by design),
- lost (since start): frames whose seq never came back and that the broker did not count as
  dropped: dropped at the camera (full pipe), results dropped on the way here, or frames
  still in flight. A result's `dropped` counts drops since the previous result was published,
  which can include frames newer than its own seq, so this is only balanced over time.
Every result is counted (`DepthSubscriber.recv`), not only the newest.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from clients import DepthSubscriber, StreamResult
from clients.stream import stream_endpoints


@dataclass
class Window:
    """One stream: this interval's results, plus totals since the first result."""

    latency_ms: list = field(default_factory=list)
    age_ms: list = field(default_factory=list)
    errors: int = 0
    dropped: int = 0
    first_seq: Optional[int] = None
    last_seq: Optional[int] = None
    results_total: int = 0
    dropped_total: int = 0

    def add(self, result: StreamResult) -> None:
        if result.ok:
            if result.latency_ms is not None:
                self.latency_ms.append(result.latency_ms)
            if result.age_ms is not None:
                self.age_ms.append(result.age_ms)
        else:
            self.errors += 1
        self.dropped += result.dropped
        self.results_total += 1
        self.dropped_total += result.dropped
        if result.seq is not None:
            self.first_seq = result.seq if self.first_seq is None else min(self.first_seq, result.seq)
            self.last_seq = result.seq if self.last_seq is None else max(self.last_seq, result.seq)

    @property
    def lost(self) -> int:
        if self.first_seq is None:
            return 0
        return max(0, self.last_seq - self.first_seq + 1 - self.results_total - self.dropped_total)

    def line(self, name: str, seconds: float) -> str:
        count = len(self.latency_ms) + self.errors
        return (
            f"{name:<16} {count / seconds:6.1f}/s  latency p50 {_pct(self.latency_ms, 50)} p99 {_pct(self.latency_ms, 99)}  "
            f"age p50 {_pct(self.age_ms, 50)} p99 {_pct(self.age_ms, 99)}  dropped {self.dropped}  errors {self.errors}  "
            f"lost since start {self.lost}"
        )

    def reset(self) -> None:
        """Start a new interval; the totals carry on."""
        self.latency_ms, self.age_ms, self.errors, self.dropped = [], [], 0, 0


def _pct(values: list, q: float) -> str:
    return f"{np.percentile(values, q):7.1f} ms" if values else "      - ms"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", default="tcp://127.0.0.1:5555", help="broker request endpoint; results are on port + 2"
    )
    parser.add_argument("--results", default=None, help="results endpoint (default: derived from --server)")
    parser.add_argument("--streams", nargs="*", default=None, help="stream names (default: all)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reports")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    args = parser.parse_args(argv)

    endpoint = args.results or stream_endpoints(args.server)[1]
    windows: dict[str, Window] = {}
    started = last_report = time.monotonic()
    print(f"listening on {endpoint} for {', '.join(args.streams) if args.streams else 'all streams'}")
    with DepthSubscriber(endpoint, args.streams) as subscriber:
        try:
            while args.duration is None or time.monotonic() - started < args.duration:
                result = subscriber.recv(timeout=max(0.0, last_report + args.interval - time.monotonic()))
                if result is not None:
                    windows.setdefault(result.stream, Window()).add(result)
                now = time.monotonic()
                if now - last_report >= args.interval:
                    print(f"--- {time.strftime('%H:%M:%S')} ({len(windows)} streams)")
                    for name in sorted(windows):
                        print(windows[name].line(name, now - last_report))
                        windows[name].reset()
                    last_report = now
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
