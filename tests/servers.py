"""Real server processes for integration tests: `zdepth serve`, `zdepth broker`, `zdepth worker`.

Nothing here is a mock: each helper starts the real command as a subprocess on free ports
and waits until the broker answers `health` with the expected number of workers past their warm-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import zmq

from bench.common import free_port_block  # noqa: F401  (re-exported for the tests)
from zdepth import protocol as P

TEST_INPUT_SIZE = 56  # the smallest legal input: keeps CPU forward passes in the tens of ms


def raw_request(endpoint: str, header: dict, frames: list = (), timeout_s: float = 10.0) -> tuple:
    """One request over a fresh DEALER, the bytes exactly as given; returns (header, arrays)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", P.packb(header), *frames])
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s")
        reply = sock.recv_multipart()
        return P.unpack(reply[1:])
    finally:
        sock.close()


def health(endpoint: str, timeout_s: float = 2.0) -> Optional[dict]:
    try:
        header, _ = raw_request(endpoint, P.request_header(P.HEALTH, id="h"), timeout_s=timeout_s)
        return header
    except TimeoutError:
        return None


class Process:
    """A zdepth command as a subprocess, with its log kept for failure messages."""

    def __init__(self, args: list, log_path: Path, env: Optional[dict] = None):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zdepth", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()


class Server:
    """`zdepth serve` on free ports; `endpoint`, `ipc`, `stream`, `pub` are ready to connect to."""

    def __init__(
        self,
        tmp: Path,
        checkpoint_dir: Path,
        workers: int = 1,
        extra: list = (),
        env: Optional[dict] = None,
        wait_workers: Optional[int] = None,
        host: str = "127.0.0.1",
    ):
        self.port = free_port_block(5)
        self.endpoint = P.tcp_endpoint(host, self.port)
        self.ipc = f"ipc://{tmp}/zdepth-{self.port}.ipc"
        ports = P.port_layout(self.port)
        self.stream = P.tcp_endpoint(host, ports.stream)
        self.pub = P.tcp_endpoint(host, ports.pub)
        self.backend = f"tcp://127.0.0.1:{ports.backend}"
        args = [
            "serve",
            "--host",
            host,
            "--port",
            str(self.port),
            "--ipc",
            f"{tmp}/zdepth-{self.port}.ipc",
            "--device",
            "cpu",
            "--workers",
            str(workers),
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--threads",
            "1",
            "--log-level",
            "WARNING",
            *extra,
        ]
        self.process = Process(args, tmp / f"serve-{self.port}.log", env)
        try:
            self.wait_ready(workers if wait_workers is None else wait_workers)
        except BaseException:
            self.process.stop()  # never leave a server behind a failed fixture
            raise

    def wait_ready(self, workers: int, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"zdepth serve exited with {self.process.proc.returncode}:\n{self.process.log()}")
            state = health(self.endpoint, timeout_s=1.0)
            # each worker is past its warm-up: ready, or not ready for a reason it reports (e.g. no checkpoint)
            if state and sum(bool(w.get("ready") or w.get("problem")) for w in state.get("workers", [])) >= workers:
                return state
            time.sleep(0.1)
        raise RuntimeError(f"zdepth serve not ready with {workers} workers in {timeout_s} s:\n{self.process.log()}")

    def health(self) -> dict:
        return health(self.endpoint, timeout_s=5.0)

    def stop(self) -> None:
        self.process.stop()
