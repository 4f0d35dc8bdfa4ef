"""Issue 10's attacks on a real `zdepth serve`, with good clients measured during each.

    python -m bench.attacks [--only NAME ...] [--repo DIR] [--json OUT]

Each attack gets a fresh `zdepth serve --random-weights` (one CPU worker) started from
--repo (default: this checkout; a `git worktree` of an older commit gives the "before"), a
good client sending one small request at a time for the attack's whole duration, and the
broker's and worker's resident memory sampled every 50 ms. One line per attack: peak RSS,
the good client's success rate and p50/p99 latency, and the attack's own figures.

The hostile inputs (`thin_png`, `scan_bomb`) are shared with tests/test_hostile.py: each
is small on the wire and expensive for a server that does not check before it works.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np
import zmq
from PIL import Image

from bench.common import free_port_block, percentile
from zdepth import protocol as P
from zdepth.images import encode_png


def thin_png(height: int = 56, width: int = 2048) -> bytes:
    """A PNG of a few hundred bytes whose resize to input 518 is 518 x 18,942: 50,061 tokens."""
    return encode_png(np.zeros((height, width, 3), np.uint8))


def _scan_end(data: bytes, sos: int) -> int:
    """Where the scan starting at the SOS marker `sos` ends: its header, then entropy-coded data
    up to the first marker that is neither a stuffed 0xFF00 nor a restart marker."""
    i = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    while True:
        i = data.find(b"\xff", i)
        if data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7:
            i += 2
            continue
        return i


def scan_bomb(extra_scans: int = 20_000, side: int = 2048) -> bytes:
    """A progressive JPEG of a flat side x side image whose first (DC) scan is repeated
    `extra_scans` more times before the end marker. libjpeg warns ("inconsistent progression
    sequence") and decodes every scan over the whole image: each repeat is ~12 KB on the
    wire and a full pass of decode work (500 repeats at 2048²: 6 MB, 1.4 s on one core)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    first = data.find(b"\xff\xda")
    end = data.rfind(b"\xff\xd9")
    return data[:end] + data[first : _scan_end(data, first)] * extra_scans + data[end:]


# --- the attacks against a real server ------------------------------------------------------

GOOD_IMAGE = np.zeros((48, 64, 3), np.uint8)
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)


def predict_header(method: str = P.METRIC_DEPTH, image: Optional[dict] = None, input_size: int = 56, **fields) -> dict:
    image = image or {"frame": 1, "format": "raw", "shape": list(GOOD_IMAGE.shape)}
    return P.request_header(method, input_size=input_size, image=image, **fields)


def call(endpoint: str, header: dict, frames: list, timeout_s: float = 30.0, keys: Optional[tuple] = None) -> tuple:
    """(reply header or None on timeout, seconds) over a fresh DEALER, a CURVE client with
    `keys` (public, secret, server public)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.connect(endpoint)
    started = time.monotonic()
    try:
        sock.send_multipart([b"", P.packb(header), *frames], copy=False)
        if not sock.poll(int(timeout_s * 1000)):
            return None, time.monotonic() - started
        return P.decode_header(sock.recv_multipart()[1]), time.monotonic() - started
    finally:
        sock.close()


class Server:
    """`zdepth serve --random-weights` from `repo`, one CPU worker; `limit` (soft, hard) open files."""

    def __init__(self, repo: Path, workdir: Path, extra: tuple = (), limit: Optional[tuple] = None):
        import resource

        self.port = free_port_block(5)
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.keys = None  # a good client's CURVE keys, when serve requires client certificates
        if "--curve-clients" in extra:
            import zmq.auth

            public, secret = zmq.auth.load_certificate(workdir / "clients" / "robot.key_secret")
            self.keys = (public, secret, zmq.auth.load_certificate(workdir / "server" / "server.key")[0])
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(repo))
        argv = [
            sys.executable,
            "-m",
            "zdepth",
            "serve",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--threads",
            "1",
            "--random-weights",
            "--log-level",
            "ERROR",
            *extra,
        ]
        self.log = workdir / f"serve-{self.port}.log"
        preexec = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit)) if limit else None
        self.proc = subprocess.Popen(
            argv,
            cwd=repo,
            env=env,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        deadline = time.monotonic() + 120
        while True:
            state, _ = call(self.endpoint, P.request_header(P.HEALTH, id="h"), [], timeout_s=1.0, keys=self.keys)
            if state and state.get("workers"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"zdepth serve did not start:\n{self.log.read_text()[-3000:]}")
        reply, _ = call(
            self.endpoint, predict_header(id="warm"), [GOOD_IMAGE.tobytes()], 120, self.keys
        )  # the model loads on first use
        assert reply and reply["ok"], reply

    def pids(self) -> dict:
        """{"broker": pid, "worker": pid}: serve's process is the broker; its child the worker."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return {"broker": self.proc.pid, **({"worker": int(children[0])} if children else {})}

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0
    except (OSError, StopIteration):
        return 0.0


class Watch:
    """While active: peak RSS of the broker and worker, and a good client's requests, one at a time."""

    def __init__(self, server: Server):
        self.server = server
        self.peak: dict = {}
        self.latencies: list = []
        self.failures: dict = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._client, daemon=True),
        ]

    def __enter__(self) -> "Watch":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for role, pid in self.server.pids().items():
                self.peak[role] = max(self.peak.get(role, 0.0), _rss_mb(pid))

    def _client(self) -> None:
        while not self._stop.is_set():
            reply, seconds = call(
                self.server.endpoint,
                predict_header(id="good", timeout_ms=10_000),
                [GOOD_IMAGE.tobytes()],
                12,
                self.server.keys,
            )
            if reply is not None and reply.get("ok"):
                self.latencies.append(seconds * 1000.0)
            else:
                code = "no reply" if reply is None else reply["error"]["code"]
                self.failures[code] = self.failures.get(code, 0) + 1
            self._stop.wait(0.2)

    def figures(self) -> dict:
        total = len(self.latencies) + sum(self.failures.values())
        return {
            "broker_peak_mb": round(self.peak.get("broker", 0.0), 1),
            "worker_peak_mb": round(self.peak.get("worker", 0.0), 1),
            "good_ok": f"{len(self.latencies)}/{total}",
            "good_failures": self.failures,
            "good_p50_ms": round(percentile(self.latencies, 50), 1) if self.latencies else None,
            "good_p99_ms": round(percentile(self.latencies, 99), 1) if self.latencies else None,
        }


def _settle(server: Server, timeout_s: float) -> None:
    """Until the broker has nothing queued or computing (or `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats, _ = call(server.endpoint, P.request_header(P.STATS, id="s"), [], 5)
        if stats and stats.get("queue") == 0 and stats.get("in_flight") == 0:
            return
        time.sleep(0.5)


def attack_never_reads(server: Server, side: int = 4096, count: int = 10) -> dict:
    """1. Point clouds with colours of a side² PNG (48 KB for 4096²) to a client that reads nothing."""
    png = cv2.imencode(".png", np.zeros((side, side, 3), np.uint8))[1].tobytes()
    header = predict_header(
        P.POINTCLOUD,
        {"frame": 1, "format": "png"},
        with_color=True,
        timeout_ms=120_000,
        intrinsics={"fx": 500.0, "fy": 500.0, "cx": side / 2, "cy": side / 2},
    )
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    for i in range(count):
        sock.send_multipart([b"", P.packb(dict(header, id=i)), png])
    time.sleep(2.0)
    _settle(server, 240)
    time.sleep(2.0)
    stats, _ = call(server.endpoint, P.request_header(P.STATS, id="s"), [], 5)
    sock.close()
    return {"png_bytes": len(png), "replies_dropped": (stats or {}).get("counters", {}).get("replies_dropped", 0)}


def attack_bytes_before_auth(server: Server, frames: int = 24, frame_mib: int = 60, connections: int = 2) -> dict:
    """2. Messages of frames × frame_mib MiB without a key, on several connections."""
    blob = bytes(frame_mib * 1024 * 1024)
    socks, codes = [], []
    for i in range(connections):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send_multipart([b"", P.packb(predict_header(id=i)), *([blob] * (frames - 1))], copy=False)
        socks.append(sock)
    for sock in socks:
        codes.append(P.decode_header(sock.recv_multipart()[1])["error"]["code"] if sock.poll(60_000) else "no reply")
        sock.close()
    return {"replies": codes}


def curve_flags(workdir: Path) -> tuple:
    """Serve flags for CURVE with client certificates: a server pair and one allowed client (not the attacker)."""
    for name, folder in (("server", "server"), ("robot", "clients")):
        if not (workdir / folder / f"{name}.key").exists():
            subprocess.run(
                [sys.executable, "-m", "zdepth", "keygen", name, "--dir", str(workdir / folder)],
                check=True,
                capture_output=True,
            )
    return (
        "--curve-secret-file",
        str(workdir / "server" / "server.key_secret"),
        "--curve-clients",
        str(workdir / "clients"),
    )


def attack_bytes_before_auth_curve(server: Server) -> dict:
    """2 with CURVE client certificates on: the attacker has no allowed key, so libzmq reads no message from it."""
    blob = bytes(60 * 1024 * 1024)
    socks = []
    for i in range(2):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send_multipart([b"", P.packb(predict_header(id=i)), *([blob] * 23)], copy=False)
        socks.append(sock)
    time.sleep(10.0)
    for sock in socks:
        sock.close()
    return {"attacker": "no allowed CURVE key: handshake refused, no reply (as designed)"}


def attack_compute_bombs(server: Server) -> dict:
    """3. Small inputs, huge compute: each bomb's answer and time, and the next good request's time."""
    bombs = {
        "thin_png_56x2048": (predict_header(image={"frame": 1, "format": "png"}, input_size=518), thin_png()),
        "raw_1x600": (
            predict_header(image={"frame": 1, "format": "raw", "shape": [1, 600, 3]}, input_size=518),
            bytes(1800),
        ),
        "progressive_jpeg_2010_scans": (predict_header(image={"frame": 1, "format": "jpeg"}), scan_bomb(2000, 2048)),
        "png_4096sq_reply": (
            predict_header(image={"frame": 1, "format": "png"}),
            cv2.imencode(".png", np.zeros((4096, 4096, 3), np.uint8))[1].tobytes(),
        ),
    }
    out = {}
    for name, (header, data) in bombs.items():
        reply, seconds = call(server.endpoint, dict(header, id=name, timeout_ms=300_000), [data], 300)
        after, after_s = call(server.endpoint, predict_header(id="next"), [GOOD_IMAGE.tobytes()], 300)
        out[name] = {
            "bytes": len(data),
            "answer": "none" if reply is None else ("ok" if reply["ok"] else reply["error"]["code"]),
            "answer_s": round(seconds, 2),
            "next_ok": bool(after and after["ok"]),
            "next_s": round(after_s, 2),
        }
    return out


def attack_rogue_worker(server: Server, requests: int = 10) -> dict:
    """4. A process registers on the TCP worker port P+3 under the real worker's name and pid and forges depth."""
    real = call(server.endpoint, P.request_header(P.HEALTH, id="h"), [])[0]["workers"][0]
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(f"tcp://127.0.0.1:{server.port + P.BACKEND_PORT_OFFSET}")
    rogue.send_multipart(
        [
            P.WORKER_PROTOCOL,
            P.W_READY,
            P.packb({"name": real["name"], "pid": real["pid"], "device": "cpu", "capacity": 1}),
        ]
    )
    stop = threading.Event()

    def forge() -> None:
        while not stop.is_set():
            if rogue.poll(100):
                frames = rogue.recv_multipart()
                if frames[1] == P.W_REQUEST:
                    request = P.decode_header(frames[3])
                    rogue.send_multipart(
                        [
                            P.WORKER_PROTOCOL,
                            P.W_REPLY,
                            frames[2],
                            P.packb(P.ok_header(request.get("id"), model="FORGED", min=0.0, max=0.0)),
                        ]
                    )
                elif frames[1] == P.W_HEARTBEAT:
                    rogue.send_multipart([P.WORKER_PROTOCOL, P.W_HEARTBEAT])

    thread = threading.Thread(target=forge, daemon=True)
    thread.start()
    time.sleep(1.0)
    forged = ok = 0
    for i in range(requests):
        reply, _ = call(server.endpoint, predict_header(id=i), [GOOD_IMAGE.tobytes()], 30)
        ok += bool(reply and reply["ok"])
        forged += bool(reply and reply.get("model") == "FORGED")
    state = call(server.endpoint, P.request_header(P.HEALTH, id="h"), [])[0]
    stop.set()
    thread.join()
    rogue.close()
    return {
        "ok": f"{ok}/{requests}",
        "forged": forged,
        "workers_in_health": len(state["workers"]),
        "duplicate_worker_names": state.get("duplicate_worker_names"),
    }


def attack_connections(server: Server, count: int = 1010, hold_s: float = 10.0) -> dict:
    """5. `count` TCP connections that send only the ZMTP greeting (serve started at a 1024 soft limit)."""
    idle, refused = [], 0
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
            sock.sendall(GREETING)
            idle.append(sock)
        except OSError:
            refused += 1
    cpu = _cpu_s(server.proc.pid)
    time.sleep(hold_s)
    cpu_percent = round((_cpu_s(server.proc.pid) - cpu) / hold_s * 100.0, 1)
    for sock in idle:
        sock.close()
    return {"opened": len(idle), "refused": refused, "broker_cpu_percent": cpu_percent}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attack_cameras(server: Server, names: int = 64, frame_mb: int = 16, imagezmq_names: int = 100_000) -> dict:
    """6. From 127.0.0.2: 64 stream names with 16 MB frames; then the 64 names (a full table) kept fresh while a new camera
    from 127.0.0.1 asks for a slot; then `imagezmq_names` imagezmq sender names (serve needs --imagezmq)."""
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://127.0.0.2:0;127.0.0.1:{server.port + P.STREAM_PORT_OFFSET}")
    side = int((frame_mb * 1024 * 1024 / 3) ** 0.5)
    big = bytes(side * side * 3)

    def frame(name: str, data: bytes, shape: list) -> list:
        return [
            P.packb(
                P.request_header(
                    P.METRIC_DEPTH,
                    stream=name,
                    seq=0,
                    input_size=56,
                    image={"frame": 1, "format": "raw", "shape": shape},
                )
            ),
            data,
        ]

    for i in range(names):
        push.send_multipart(frame(f"junk-{i}", big, [side, side, 3]), copy=False)
    time.sleep(3.0)
    stats, _ = call(server.endpoint, P.request_header(P.STATS, id="s"), [], 5)
    held_mb = round(stats["bytes"]["held"] / 2**20, 1)
    camera = ctx.socket(zmq.PUSH)
    camera.setsockopt(zmq.LINGER, 0)
    camera.connect(f"tcp://127.0.0.1:{server.port + P.STREAM_PORT_OFFSET}")
    small = GOOD_IMAGE.tobytes()
    started, admitted_after = time.monotonic(), None
    while time.monotonic() - started < 15.0:
        for i in range(names):
            push.send_multipart(frame(f"junk-{i}", small, list(GOOD_IMAGE.shape)))
        camera.send_multipart(frame("new-camera", small, list(GOOD_IMAGE.shape)))
        state, _ = call(server.endpoint, P.request_header(P.HEALTH, id="h"), [], 5)
        if state and "new-camera" in state.get("streams", {}):
            admitted_after = round(time.monotonic() - started, 2)
            break
        time.sleep(1.0)
    push.close()
    camera.close()
    rss_before = _rss_mb(server.proc.pid)
    sender = ctx.socket(zmq.REQ)
    sender.setsockopt(zmq.LINGER, 0)
    sender.connect(f"tcp://127.0.0.1:{server.port + P.IMAGEZMQ_PORT_OFFSET}")
    tiny = np.zeros((1, 1, 3), np.uint8).tobytes()
    for i in range(imagezmq_names):
        sender.send_multipart([json.dumps({"msg": f"sender-{i}", "dtype": "uint8", "shape": [1, 1, 3]}).encode(), tiny])
        sender.recv()
    sender.close()
    time.sleep(1.5)
    return {
        "held_mb_after_64_big_frames": held_mb,
        "new_camera_admitted_after_s": admitted_after,
        f"broker_growth_mb_after_{imagezmq_names}_imagezmq_names": round(_rss_mb(server.proc.pid) - rss_before, 1),
    }


def attack_float16(server: Server) -> dict:
    """7. metric_depth with max_depth 1e5 as float16 (the model's output times 1e5 overflows 65,504)."""
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)
    header = predict_header(
        image={"frame": 1, "format": "raw", "shape": list(image.shape)}, id="f16", max_depth=1e5, output_dtype="float16"
    )
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    sock.send_multipart([b"", P.packb(header), image.tobytes()])
    reply = sock.recv_multipart() if sock.poll(60_000) else None
    sock.close()
    if reply is None:
        return {"answer": "none"}
    header, arrays = P.unpack(reply[1:])
    if not header["ok"]:
        return {"answer": header["error"]["code"], "message": header["error"]["message"][:120]}
    depth = next(iter(arrays.values()))
    return {
        "answer": "ok",
        "inf_pixels": int(np.isinf(depth.astype(np.float32)).sum()),
        "pixels": int(depth.size),
        "max": header.get("max"),
    }


# name -> (attack, serve flags or a function of the work folder giving them, open-file limit)
ATTACKS: dict[str, tuple[Callable, Any, Optional[tuple]]] = {
    "never_reads": (attack_never_reads, (), None),
    "bytes_before_auth": (attack_bytes_before_auth, (), None),
    "bytes_before_auth_curve": (attack_bytes_before_auth_curve, curve_flags, None),
    "compute_bombs": (attack_compute_bombs, ("--timeout-ms", "300000"), None),
    "rogue_worker": (attack_rogue_worker, (), None),
    "connections": (attack_connections, (), (1024, 4096)),
    "cameras": (attack_cameras, ("--imagezmq",), None),
    "float16": (attack_float16, (), None),
}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", choices=list(ATTACKS), help="run only these attacks (repeatable)")
    parser.add_argument(
        "--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout whose zdepth serve is attacked"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="zdepth-attacks-") as tmp:
        for name in args.only or list(ATTACKS):
            attack, flags, limit = ATTACKS[name]
            server = Server(args.repo, Path(tmp), flags(Path(tmp)) if callable(flags) else flags, limit)
            try:
                with Watch(server) as watch:
                    figures = attack(server)
                results[name] = {**watch.figures(), **figures}
            except Exception as exc:  # one attack failing (e.g. the old server lacks a flag) does not stop the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                server.stop()
            print(name, json.dumps(results[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
