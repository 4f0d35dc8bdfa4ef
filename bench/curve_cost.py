"""What CURVE encryption costs per round trip: health and a 640x480 point cloud, plain tcp vs CURVE.

    python -m bench.curve_cost [--iterations 60] [--size 640x480] [--input-size 56] [--out-dir bench/results]

Two `zdepth serve --random-weights` servers with one CPU worker each, one plain and one with
`--curve-secret-file` and `--curve-clients`; `DepthClient`s to both (the CURVE one with its
keys). All four cases are interleaved round by round, so the machine's drifts hit them alike.
A point cloud request carries the raw image (0.9 MB) and its reply 3.7 MB of float32 points,
both encrypted under CURVE; the worker's own compute is subtracted, so `overhead` is what the
wire, the broker and the client cost, and `CURVE adds` is the difference of the medians.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import zmq.auth

from bench.common import (
    DEFAULT_OUT_DIR,
    Case,
    Child,
    compute_ms,
    free_port_block,
    interleave,
    intrinsics_for,
    parse_size,
    print_table,
    progress,
    write_results,
)
from clients import DepthClient, ServerError, Timeout


class Serve(Child):
    """`zdepth serve --random-weights` with one worker; ready when a client with `keys` gets health."""

    def __init__(self, workdir: Path, name: str, input_size: int, flags: list, keys: dict):
        port = free_port_block(5)
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.keys = keys
        argv = [
            sys.executable,
            "-m",
            "zdepth",
            "serve",
            "--port",
            port,
            "--device",
            "cpu",
            "--workers",
            "1",
            "--threads",
            "1",
            "--random-weights",
            "--log-level",
            "WARNING",
            *flags,
        ]
        super().__init__(f"{name}-{port}", argv, workdir)
        self.wait_until(self._ready, 180, "serving")

    def client(self, input_size: int, timeout: float = 30.0) -> DepthClient:
        return DepthClient(self.endpoint, timeout=timeout, retries=0, input_size=input_size, **self.keys)

    def _ready(self) -> bool:
        try:
            with self.client(56, timeout=1.0) as client:
                return bool(client.health()["workers"])
        except (Timeout, ServerError):
            return False


def run(iterations: int, size: tuple, input_size: int, out_dir: Optional[Path]) -> dict:
    width, height = size
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    intrinsics = intrinsics_for(width, height)
    with tempfile.TemporaryDirectory(prefix="zdepth-curve-") as tmp:
        root = Path(tmp)
        (root / "server").mkdir()
        (root / "clients").mkdir()
        zmq.auth.create_certificates(root / "server", "server")
        zmq.auth.create_certificates(root / "clients", "bench")
        curve_keys = {
            "server_key": root / "server" / "server.key",
            "client_keys": root / "clients" / "bench.key_secret",
        }
        progress("starting a plain and a CURVE server")
        plain = Serve(root, "plain", input_size, [], {})
        curve = Serve(
            root,
            "curve",
            input_size,
            ["--curve-secret-file", root / "server" / "server.key_secret", "--curve-clients", root / "clients"],
            curve_keys,
        )
        try:
            clients = {"plain tcp": plain.client(input_size), "CURVE": curve.client(input_size)}
            cases = []
            for transport, client in clients.items():
                cases.append(
                    Case(
                        f"health, {transport}",
                        lambda c=client: (c.health(), None)[1],
                        {"call": "health", "transport": transport},
                    )
                )
            for transport, client in clients.items():
                cases.append(
                    Case(
                        f"pointcloud {width}x{height}, {transport}",
                        lambda c=client: compute_ms(c.pointcloud(image, intrinsics).timing),
                        {"call": f"pointcloud {width}x{height}", "transport": transport},
                    )
                )
            rounds = min(10, iterations)
            timed = interleave(cases, rounds, max(1, iterations // rounds), warmup=3, label="curve cost")
            for client in clients.values():
                client.close()
        finally:
            plain.stop()
            curve.stop()
    summaries = {case.label: {**case.info, **series.summary()} for case, series in timed}
    rows, comparison = [], {}
    for call in dict.fromkeys(case.info["call"] for case, _ in timed):
        base, enc = (
            next(s for s in summaries.values() if s["call"] == call and s["transport"] == t)
            for t in ("plain tcp", "CURVE")
        )
        added = enc["overhead_p50"] - base["overhead_p50"]
        comparison[call] = {
            "plain_overhead_p50_ms": base["overhead_p50"],
            "curve_overhead_p50_ms": enc["overhead_p50"],
            "curve_adds_ms": round(added, 3),
            "round_trip_ratio": round(enc["rt_p50"] / base["rt_p50"], 2),
        }
        for transport, s in (("plain tcp", base), ("CURVE", enc)):
            rows.append(
                [
                    call,
                    transport,
                    s["rt_p50"],
                    s["rt_p90"],
                    s["compute_p50"],
                    s["overhead_p50"],
                    added if transport == "CURVE" else None,
                ]
            )
    print_table(
        "CURVE vs plain tcp (ms, medians of interleaved rounds)",
        ["call", "transport", "round trip p50", "p90", "worker compute p50", "overhead p50", "CURVE adds"],
        rows,
    )
    payload = {
        "iterations": iterations,
        "size": f"{width}x{height}",
        "input_size": input_size,
        "cases": summaries,
        "comparison": comparison,
    }
    if out_dir is not None:
        write_results(out_dir, "curve_cost", payload)
    return payload


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.curve_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=60, help="requests per case (default %(default)s)")
    parser.add_argument(
        "--size", type=parse_size, default=(640, 480), help="point cloud image size WxH (default 640x480)"
    )
    parser.add_argument(
        "--input-size", type=int, default=56, help="model input size: small, so compute does not drown the wire"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    start = time.monotonic()
    run(args.iterations, args.size, args.input_size, args.out_dir)
    progress(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
