"""What every benchmark shares: statistics, interleaved timing, test images, the processes under
test, results files, tables and plots.

Kept free of torch, fastapi and matplotlib at import time: `bench/gpu.py` runs the latency code
on machines that have only torch, numpy, msgpack, pyzmq and OpenCV, and the bench process
itself should not pay for torch (the servers it starts do the compute).
"""

from __future__ import annotations

import datetime
import http.client
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import msgpack
import numpy as np
import zmq

from clients import DepthClient, ServerError, Timeout
from zdepth import protocol as P

# abspath, not resolve: a checkout reached through a symlink must start its children there too.
REPO = Path(os.path.abspath(__file__)).parents[1]
DEFAULT_OUT_DIR = REPO / "bench" / "results"
PERCENTILES = (50, 90, 99)
COMPUTE_KEYS = ("decode_ms", "pre_ms", "inference_ms", "post_ms")

_T0 = time.monotonic()


# --- progress and statistics ----------------------------------------------------------------


def progress(message: str) -> None:
    """One line per stage, with the time since the bench started, so long runs show where they are."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {message}", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the value of a real sample, never an interpolation)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(values: Sequence[float], prefix: str = "") -> dict:
    """{prefix}p50/p90/p99 and n of a list of milliseconds, rounded for the results file."""
    out = {f"{prefix}p{q}": round(percentile(values, q), 3) for q in PERCENTILES}
    out[f"{prefix}n"] = len(values)
    return out


def compute_ms(timing: Optional[dict]) -> float:
    """The worker's own compute for one request: decode + pre-processing + inference + post-processing.
    Everything else in a round trip is overhead (transport, serialisation, broker, client)."""
    return sum(float((timing or {}).get(key, 0.0)) for key in COMPUTE_KEYS)


@dataclass
class Series:
    """Round trips of one configuration, with the server's compute for each (0 where there is none)."""

    round_trip_ms: list = field(default_factory=list)
    compute_ms: list = field(default_factory=list)

    def add(self, round_trip: float, compute: Optional[float]) -> None:
        self.round_trip_ms.append(round_trip)
        self.compute_ms.append(compute or 0.0)

    @property
    def overhead_ms(self) -> list:
        return [rt - c for rt, c in zip(self.round_trip_ms, self.compute_ms)]

    def samples(self) -> dict:
        return {
            "rt_ms": [round(v, 3) for v in self.round_trip_ms],
            "compute_ms": [round(v, 3) for v in self.compute_ms],
        }

    def summary(self) -> dict:
        """Round-trip and overhead percentiles (overhead per request, then its percentiles) and compute p50."""
        return {
            **summarize(self.round_trip_ms, "rt_"),
            "compute_p50": round(percentile(self.compute_ms, 50), 3),
            **{k: v for k, v in summarize(self.overhead_ms, "overhead_").items() if k != "overhead_n"},
        }


@dataclass(frozen=True)
class Case:
    """One configuration to time: `call` does one request and returns the server's compute in
    ms (None when there is none); `info` are the columns that describe it in the results."""

    label: str
    call: Callable[[], Optional[float]]
    info: dict = field(default_factory=dict)


def interleave(cases: Sequence[Case], rounds: int, per_round: int, warmup: int = 2, label: str = "") -> list:
    """Time every case round by round: each round runs `per_round` calls of every case in turn
    (the starting case rotates), so slow drifts of a shared 2-core machine hit all cases alike
    and ratios between them stay meaningful. Returns [(case, Series)] in the order given."""
    for case in cases:
        for _ in range(warmup):
            case.call()
    series = [Series() for _ in cases]
    order = list(range(len(cases)))
    report_every = max(1, rounds // 5)
    for r in range(rounds):
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:
            call, samples = cases[i].call, series[i]
            for _ in range(per_round):
                start = time.perf_counter()
                compute = call()
                samples.add((time.perf_counter() - start) * 1000.0, compute)
        if label and ((r + 1) % report_every == 0 or r + 1 == rounds):
            progress(f"{label}: round {r + 1}/{rounds} done")
    return list(zip(cases, series))


def split_iterations(iterations: int, max_rounds: int = 10) -> tuple:
    """`iterations` requests per case as (rounds, per_round): up to `max_rounds` interleaved rounds."""
    rounds = max(1, min(max_rounds, iterations))
    return rounds, max(1, math.ceil(iterations / rounds))


# --- test images ----------------------------------------------------------------------------


def parse_size(text: str) -> tuple:
    """'640x480' -> (640, 480): width x height, as cameras are described."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def sample_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic BGR uint8 picture with smooth shading, edges and mild sensor noise, so
    its JPEG is the size of a real camera frame (not of white noise, not of a flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 180 + 40, y / height * 160 + 50, (x + y) / (width + height) * 120 + 60], axis=-1)
    for _ in range(12):  # boxes of other colours: edges for the codec to keep
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 16 + 1, width // 3 + 2), rng.integers(height // 16 + 1, height // 3 + 2)
        image[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 255, 3)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(image_bgr: np.ndarray, quality: int = 90) -> bytes:
    import cv2  # only the bench process needs it, to make its test images

    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode the test image")
    return data.tobytes()


def sample_jpeg(width: int, height: int) -> bytes:
    return jpeg_bytes(sample_image(width, height))


def intrinsics_for(width: int, height: int) -> dict:
    """Plausible pinhole intrinsics for an image of this size (about a 65 degree field of view)."""
    focal = 0.78 * width
    return {"fx": focal, "fy": focal, "cx": (width - 1) / 2, "cy": (height - 1) / 2}


# --- processes under test -------------------------------------------------------------------


def free_port_block(count: int) -> int:
    """A base port whose `count` consecutive ports are free right now (zdepth uses port..port+3)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        held = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no block of free ports found")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc; 0 where unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list:
    """The direct children of a process (Linux /proc), e.g. the workers of `zdepth serve`."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return children


class Child:
    """A helper process in its own process group (so its own children stop with it), its output
    kept in a log file that is shown when it fails to start."""

    def __init__(self, name: str, argv: list, workdir: Path):
        self.name = name
        self.log_path = Path(workdir) / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        self.argv = [str(a) for a in argv]
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before {what}:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name}: not {what} within {timeout_s:.0f} s ({shlex.join(self.argv)}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM to the whole group (a server's workers too, even if the server itself died), then SIGKILL."""
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class ZdepthServer(Child):
    """`python -m zdepth serve` with random weights on free ports, ready once health lists
    all its workers. `endpoint` (tcp), `ipc`, `stream` and `pub` are ready to connect to."""

    def __init__(
        self,
        workdir: Path,
        workers: int = 1,
        threads: Optional[int] = None,
        device: str = "cpu",
        dtype: str = "fp32",
        extra: Sequence[str] = (),
    ):
        port = free_port_block(5)
        ipc_path = Path(workdir) / f"zdepth-{port}.ipc"
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.ipc = f"ipc://{ipc_path}"
        ports = P.port_layout(port)
        self.stream = f"tcp://127.0.0.1:{ports.stream}"
        self.pub = f"tcp://127.0.0.1:{ports.pub}"
        self.workers = workers
        argv = [
            sys.executable,
            "-m",
            "zdepth",
            "serve",
            "--port",
            port,
            "--ipc",
            ipc_path,
            "--device",
            device,
            "--dtype",
            dtype,
            "--workers",
            workers,
            "--random-weights",
            "--log-level",
            "WARNING",
        ]
        if threads:
            argv += ["--threads", threads]
        argv += list(extra)  # more `zdepth serve` flags
        super().__init__(f"zdepth-serve-{port}", argv, workdir)
        self.wait_until(self._ready, 180, f"serving with {workers} worker(s)")

    def _ready(self) -> bool:
        try:
            with DepthClient(self.endpoint, timeout=1.0, retries=0) as client:
                return len(client.health().get("workers", [])) >= self.workers
        except (Timeout, ServerError):
            return False


class HttpServer(Child):
    """`bench/http_baseline.py`: the FastAPI design zdepth replaces, same engine, own process."""

    def __init__(self, workdir: Path, threads: Optional[int] = None, device: str = "cpu", dtype: str = "fp32"):
        self.port = free_port_block(1)
        argv = [
            sys.executable,
            REPO / "bench" / "http_baseline.py",
            "--port",
            self.port,
            "--random-weights",
            "--device",
            device,
            "--dtype",
            dtype,
        ]
        if threads:
            argv += ["--threads", threads]
        super().__init__(f"http-baseline-{self.port}", argv, workdir)
        self.wait_until(self._ready, 120, "answering GET /health")

    def _ready(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()


def echo_server(endpoints: Sequence[str], image_size: Optional[tuple] = None) -> None:
    """The physical floor: a ROUTER with no broker and no model. A prediction request is
    answered with [header, a preallocated float32 array] sent zero-copy, as a worker sends its
    result: `points` (H*W, 3) for pointcloud, `depth` (H, W) otherwise, for the `reply_shape`
    the header asks for or else for an image of `image_size` (W, H), so that `DepthClient`
    itself can talk to it. Any other request gets a header of `reply_bytes` (the size of a
    broker's health reply), so small messages compare like with like."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    for endpoint in endpoints:
        sock.bind(endpoint)
    arrays: dict = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        route, header = frames[:2], msgpack.unpackb(frames[2].buffer)
        method = header.get("method")
        shape = header.get("reply_shape")
        if not shape and image_size and method in P.PREDICT_METHODS:
            width, height = image_size
            shape = [width * height, 3] if method == P.POINTCLOUD else [height, width]
        if shape:
            array = arrays.setdefault(tuple(shape), np.zeros(shape, np.float32))
            name = "points" if method == P.POINTCLOUD else "depth"
            reply = P.pack({"v": 1, "id": header.get("id"), "ok": True}, {name: array})
        else:
            reply = [
                P.packb({"v": 1, "id": header.get("id"), "ok": True, "pad": bytes(int(header.get("reply_bytes", 0)))})
            ]
        sock.send_multipart(route + reply, copy=False)


class EchoServer(Child):
    """`echo_server` in its own process, on a tcp port and an ipc path (`endpoints`)."""

    def __init__(self, workdir: Path, image_size: Optional[tuple] = None):
        port = free_port_block(1)
        self.endpoints = {"tcp": f"tcp://127.0.0.1:{port}", "ipc": f"ipc://{Path(workdir) / f'echo-{port}.ipc'}"}
        code = (
            "import sys, json; from bench.common import echo_server; echo_server(sys.argv[2:], json.loads(sys.argv[1]))"
        )
        super().__init__(
            f"echo-{port}", [sys.executable, "-c", code, json.dumps(image_size), *self.endpoints.values()], workdir
        )
        self.wait_until(self._ready, 30, "echoing")

    def _ready(self) -> bool:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoints["tcp"])
            sock.send_multipart([b"", msgpack.packb({"id": 0})])
            return bool(sock.poll(500))
        finally:
            sock.close()


def workdir() -> tempfile.TemporaryDirectory:
    """A short-lived folder for ipc sockets and process logs (short path: ipc paths have a length limit)."""
    return tempfile.TemporaryDirectory(prefix="zdepth-bench-")


# --- results --------------------------------------------------------------------------------


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """Where the numbers come from: CPU, cores, Python and the libraries on the measured path."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    packages = ("torch", "numpy", "pyzmq", "msgpack", "opencv-python-headless", "fastapi", "uvicorn", "httpx")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],  # a shared machine: how busy it was when the run ended
        "libzmq": zmq.zmq_version(),
        "packages": {name: _version(name) for name in packages},
        "git": _git_revision(),
    }


def _git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{'+dirty' if dirty else ''}" if rev else None


def write_results(out_dir: Path, name: str, payload: dict) -> Path:
    """bench/results/<name>.json with the machine, the command line and the time next to the numbers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    document = {
        "benchmark": name,
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=str))
    progress(f"wrote {path}")
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable in a terminal, pasteable into RESULTS.md); returns its text."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return "" if value is None else str(value)

    lines = [f"\n### {title}\n", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def goal(text: str, measured: str, met: Optional[bool]) -> dict:
    """One of the issue's goals next to what was measured; met None when it could not be measured."""
    return {"goal": text, "measured": measured, "met": met}


def print_goals(goals: Sequence[dict]) -> None:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    print_table(
        "Goals", ["goal", "measured", "verdict"], [(g["goal"], g["measured"], verdict[g["met"]]) for g in goals]
    )


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed
    (the numbers still go to the JSON file)."""
    try:
        import matplotlib
    except ImportError:
        progress("matplotlib is not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, out_dir: Path, name: str) -> Path:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    progress(f"wrote {path}")
    return path
