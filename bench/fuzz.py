"""Fuzz a running zdepth server with malformed messages on every socket it listens on.

    python -m bench.fuzz [--server tcp://HOST:PORT --key KEY] [--count 20000] [--seconds 300] [--seed 1]

Without `--server` it starts its own `zdepth serve --random-weights` (one CPU worker). Three
kinds of peers send garbage:

- clients on the frontend ROUTER: random frames, random msgpack, valid headers with fields
  of the wrong type, huge declared shapes, truncated and misordered frames, too many frames,
  corrupt and bomb images that reach a worker, and messages without the envelope delimiter;
- cameras on the stream PULL socket: the same, with stream headers;
- a fake worker on the backend ROUTER: garbage READY, HEARTBEAT, REPLY and unknown commands,
  and garbage replies to real requests the broker dispatched to it.

Checks: the broker and its workers stay up (same pids, health answers, a real request still
succeeds), every answerable frontend message gets exactly one reply and the others none, the
broker's `internal_errors` counter stays at zero (a handler raised: a bug), every stream
frame is counted, and the broker's resident memory stays flat. Exit status 1 on any problem.
Importable: `run_fuzz` is what tests/test_fuzz_broker.py calls for its bounded run.
"""

from __future__ import annotations

import argparse
import collections
import copy
import random
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import zmq

from zdepth import protocol as P

INPUT_SIZE = 56  # requests that reach a worker cost a tiny forward pass, never a slow one
WINDOW = 64  # answerable requests in flight at once: the broker's per-client pipe must never fill
SETTLE_S = 30.0  # time left for the last replies (some reach a worker)
MAX_RSS_GROWTH_KB = 64 * 1024

# Values of the wrong type for any field; never None (absent means "use the default").
WRONG_VALUES: tuple = (
    True,
    False,
    -1,
    0,
    2**63,
    -(2**63),
    1e308,
    float("nan"),
    float("-inf"),
    "",
    "x" * 300,
    "vits\x00",
    b"\xff\xfe",
    [],
    [1, "a"],
    {},
    {"frame": 1},
    [[[[[]]]]],
)
HUGE_SHAPES: tuple = (
    [2**31, 2**31, 3],
    [2**32, 2**32, 3],
    [10**6, 10**6, 3],
    [0, 2**40, 3],
    [2**63, 1, 3],
    [65535, 65535, 3],
    [1, 1, 3, 1, 1, 1],
    [-1, 8, 3],
    [8, 8, 4],
    [8, 8],
)


def endpoints_of(server: str) -> dict:
    """The broker's frontend, stream and backend endpoints from its tcp request endpoint."""
    scheme, _, address = server.partition("://")
    host, _, port = address.rpartition(":")
    if scheme != "tcp" or not port.isdigit():
        raise ValueError(f"--server must be tcp://HOST:PORT, got {server!r}")
    ports = P.port_layout(int(port))
    return {
        "frontend": server,
        "stream": f"tcp://{host}:{ports.stream}",
        "backend": f"tcp://{host}:{ports.backend}",
    }


# --- what to send -------------------------------------------------------------------------


class Cases:
    """Seeded generators of malformed messages: same seed, same messages."""

    def __init__(self, seed: int, key: Optional[str]):
        self.rng = random.Random(seed)
        self.key = key

    def _bytes(self, low: int = 0, high: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def _value(self, depth: int = 0) -> Any:
        """A random msgpack-encodable value."""
        kind = self.rng.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return self.rng.random() < 0.5
        if kind == 2:
            return self.rng.choice([self.rng.randint(-(2**63), 2**64 - 1), self.rng.randint(-5, 5)])
        if kind == 3:
            return self.rng.choice([self.rng.uniform(-1e9, 1e9), float("nan"), float("inf")])
        if kind == 4:
            return "".join(chr(self.rng.randint(32, 0x2FF)) for _ in range(self.rng.randint(0, 12)))
        if kind == 5:
            return self._bytes(0, 16)
        if kind in (6, 7):
            return [self._value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {
            self.rng.choice(["v", "method", "id", "key", "image", "frame", "shape", "stream", "x"]): self._value(
                depth + 1
            )
            for _ in range(self.rng.randint(0, 4))
        }

    def _image(self) -> tuple[dict, bytes]:
        h, w = self.rng.randint(1, 8), self.rng.randint(1, 8)
        return {"frame": 1, "format": "raw", "shape": [h, w, 3]}, self.rng.randbytes(h * w * 3)

    def _header(self, **extra: Any) -> tuple[dict, bytes]:
        """A valid small prediction request (key included), and its image frame."""
        image, pixels = self._image()
        method = self.rng.choice(sorted(P.PREDICT_METHODS))
        header = P.request_header(
            method, id=self.rng.randint(0, 10**6), key=self.key, input_size=INPUT_SIZE, image=image, **extra
        )
        if method == P.POINTCLOUD:
            header["intrinsics"] = {"fx": 10.0, "fy": 10.0, "cx": 4.0, "cy": 4.0}
        return header, pixels

    def _mutated(self, header: dict) -> dict:
        """The header with one to three fields (or image fields) set to values of the wrong type."""
        header = dict(header, image=dict(header["image"]))
        for _ in range(self.rng.randint(1, 3)):
            target = header["image"] if self.rng.random() < 0.3 and isinstance(header["image"], dict) else header
            field_name = self.rng.choice(
                sorted(target) + ["dtype", "channels", "intrinsics", "max_depth", "encoder", "timeout_ms"]
            )
            target[field_name] = copy.deepcopy(
                self.rng.choice(WRONG_VALUES)
            )  # a shared list or map could end up inside itself
        return header

    def bodies(self, fields: Callable[[], dict]) -> Iterator[tuple[str, list]]:
        """(kind, frames after the envelope) for the frontend and the stream socket alike;
        `fields()` gives each case's extra header fields (a stream name, for cameras)."""
        kinds: list[tuple[str, Callable[[dict], list]]] = [
            ("random_frames", lambda extra: [self._bytes(1) for _ in range(self.rng.randint(1, 5))]),
            (
                "random_msgpack",
                lambda extra: [P.packb(self._value())] + [self._bytes() for _ in range(self.rng.randint(0, 2))],
            ),
            (
                "random_map",
                lambda extra: [
                    P.packb({k: self._value() for k in self.rng.sample(sorted(self._header(**extra)[0]), 4)})
                ],
            ),
            ("wrong_types", self._wrong_types),
            ("huge_shape", self._huge_shape),
            ("truncated_array", self._truncated),
            ("wrong_order", self._wrong_order),
            (
                "too_many_frames",
                lambda extra: [P.packb(self._header(**extra)[0])] + [b"x"] * self.rng.randint(P.MAX_FRAMES, 40),
            ),
            ("deep_msgpack", lambda extra: [b"\x91" * self.rng.randint(100, 5000) + b"\xc0"]),
            ("bad_image", self._bad_image),
        ]
        while True:
            kind, make = self.rng.choice(kinds)
            yield kind, make(fields())

    def _wrong_types(self, extra: dict) -> list:
        header, pixels = self._header(**extra)
        return [P.packb(self._mutated(header)), pixels]

    def _huge_shape(self, extra: dict) -> list:
        header, pixels = self._header(**extra)
        header["image"]["shape"] = self.rng.choice(HUGE_SHAPES)
        return [P.packb(header), pixels[: self.rng.randint(0, len(pixels))]]

    def _truncated(self, extra: dict) -> list:
        header, pixels = self._header(**extra)
        return [P.packb(header), pixels[: self.rng.randrange(len(pixels))]]

    def _wrong_order(self, extra: dict) -> list:
        header, pixels = self._header(**extra)
        choice = self.rng.randrange(3)
        if choice == 0:
            return [pixels, P.packb(header)]  # the image where the header belongs
        header["image"]["frame"] = 2
        if choice == 1:
            return [P.packb(header), pixels]  # points past the last frame
        return [P.packb(header), pixels, b""]  # points at an empty frame

    def _bad_image(self, extra: dict) -> list:
        """Encoded images that pass the broker and fail in a worker's decoder."""
        header, _ = self._header(**extra)
        header["image"] = {"frame": 1, "format": self.rng.choice(["jpeg", "png"])}
        data = self.rng.choice(
            [
                b"\xff\xd8\xff\xe0" + self._bytes(1, 200),  # JPEG magic, garbage after
                png_bomb(
                    self.rng.choice([100_000, 1 << 20]), self.rng.choice([100_000, 1 << 20])
                ),  # tiny file, huge declared size
                b"\x89PNG\r\n\x1a\n" + self._bytes(1, 100),
                b"GIF89a" + self._bytes(1, 50),
                self._bytes(1, 200),
            ]
        )
        return [P.packb(header), data]

    def frontend(self) -> Iterator[tuple[str, list, bool]]:
        """(kind, DEALER frames, answerable): the DEALER adds no envelope, so the delimiter is ours to send."""
        bodies = self.bodies(dict)
        while True:
            if self.rng.random() < 0.1:  # nothing before the header marks where the route ends
                frames = [self._bytes(1) for _ in range(self.rng.randint(1, 9))]
                yield "missing_delimiter", frames, False
                continue
            kind, body = next(bodies)
            yield kind, [b"", *body], True

    def stream(self) -> Iterator[tuple[str, list]]:
        names = [f"fuzz-{i}" for i in range(4)] + ["bad name!", "x" * 100, None]
        yield from self.bodies(
            lambda: {"stream": self.rng.choice(names), "seq": self.rng.choice([1, "one", [1], 2**64 - 1, None])}
        )

    def backend(self) -> Iterator[tuple[str, list]]:
        """Frames a fake worker's DEALER sends (the broker's ROUTER adds its identity)."""
        tag = P.WORKER_PROTOCOL
        commands = [P.W_READY, P.W_REPLY, P.W_HEARTBEAT, P.W_DISCONNECT]
        while True:
            kind = self.rng.randrange(7)
            if kind == 0:
                yield "random_frames", [self._bytes(0, 16) for _ in range(self.rng.randint(1, 4))]
            elif kind == 1:
                yield (
                    "unknown_command",
                    [tag, self.rng.choice([b"", b"\x00", b"\x09", self._bytes(2, 8)]), self._bytes()],
                )
            elif kind == 2:
                info = (
                    self._value()
                    if self.rng.random() < 0.5
                    else {
                        "name": self._value(),
                        "models": self._value(),
                        "capacity": self._value(),
                        "device": self._value(),
                        "pid": self._value(),
                        "random_weights": self._value(),
                    }
                )
                yield "ready", [tag, P.W_READY, P.packb(info)]
            elif kind == 3:
                status = (
                    {"models": self._value(), "served": self._value()} if self.rng.random() < 0.5 else self._value()
                )
                yield "heartbeat", [tag, P.W_HEARTBEAT, P.packb(status)]
            elif kind == 4:
                yield (
                    "reply",
                    [
                        tag,
                        P.W_REPLY,
                        *[
                            self.rng.choice([P.packb(self._value()), self._bytes()])
                            for _ in range(self.rng.randint(0, 3))
                        ],
                    ],
                )
            elif kind == 5:
                yield "garbage_command", [tag, self.rng.choice(commands), self._bytes(1)]
            else:
                yield "short", [tag] if self.rng.random() < 0.5 else [self._bytes(1)]

    def garbage_reply_header(self) -> bytes:
        """What a broken worker might answer a real request with."""
        return self.rng.choice(
            [
                P.packb({"ok": False, "error": self._value()}),
                P.packb({"ok": False, "error": {"code": self._value(), "message": self._value()}}),
                P.packb(self._value()),
                self._bytes(),
                P.packb({"v": 1, "ok": True, "arrays": self._value()}),
            ]
        )


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with one empty IDAT: a few
    dozen bytes that claim gigapixels. The worker must refuse it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


# --- the run ------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    cases: collections.Counter = field(default_factory=collections.Counter)  # "socket:kind" -> sent
    answerable: int = 0
    replies: int = 0
    unexpected_replies: int = 0  # replies to messages that had no route to answer on
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # "ok" or error code
    stream_sent: int = 0
    stream_counted: int = 0
    backend_sent: int = 0
    dispatched_to_fake: int = 0
    internal_errors: int = 0
    worker_pids_before: list = field(default_factory=list)
    worker_pids_after: list = field(default_factory=list)
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    rss_peak_kb: int = 0
    seconds: float = 0.0
    serving_after: bool = False
    problems: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def summary(self) -> str:
        lines = [
            f"cases sent: {self.total} in {self.seconds:.1f} s "
            f"(frontend {self.answerable} answerable + {sum(n for k, n in self.cases.items() if k == 'frontend:missing_delimiter')} unanswerable, "
            f"stream {self.stream_sent}, backend {self.backend_sent}, garbage replies to {self.dispatched_to_fake} dispatched requests)",
            f"replies: {self.replies} of {self.answerable} answerable, {self.unexpected_replies} to unanswerable; outcomes {dict(self.outcomes.most_common())}",
            f"stream frames counted by the broker: {self.stream_counted} of {self.stream_sent}",
            f"broker internal errors: {self.internal_errors}; worker pids {self.worker_pids_before} -> {self.worker_pids_after}",
            f"broker RSS: {self.rss_before_kb / 1024:.1f} MB -> {self.rss_after_kb / 1024:.1f} MB (peak {self.rss_peak_kb / 1024:.1f} MB)",
            f"real request served afterwards: {self.serving_after}",
            "by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.cases.items())),
        ]
        lines.append("PROBLEMS:\n  " + "\n  ".join(self.problems) if self.problems else "no problems found")
        return "\n".join(lines)


def proc_status_kb(pid: int, field_name: str) -> int:
    """A memory field (VmRSS, VmHWM) of /proc/PID/status in kB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Peer:
    """A socket of the fuzzer's, polled and closed the same way everywhere."""

    def __init__(self, kind: int, endpoint: str):
        self.socket = zmq.Context.instance().socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 10_000)
        self.socket.setsockopt(zmq.RCVHWM, 10_000)
        self.socket.connect(endpoint)

    def recv(self, timeout_ms: int) -> Optional[list]:
        if self.socket.poll(timeout_ms, zmq.POLLIN):
            return self.socket.recv_multipart()
        return None

    def close(self) -> None:
        self.socket.close(linger=0)


def request(endpoint: str, header: dict, frames: list = (), timeout_s: float = 10.0) -> Optional[dict]:
    """One request on a fresh socket; the reply header, or None when none came."""
    peer = Peer(zmq.DEALER, endpoint)
    try:
        peer.socket.send_multipart([b"", P.packb(header), *frames])
        reply = peer.recv(int(timeout_s * 1000))
        return P.decode_header(reply[1]) if reply else None
    finally:
        peer.close()


class Fuzzer:
    def __init__(self, server: str, key: Optional[str] = None, seed: int = 1):
        self.endpoints = endpoints_of(server)
        self.key = key
        self.cases = Cases(seed, key)
        self.report = FuzzReport()
        self.broker_pid = 0

    # -- observing the server --

    def health(self) -> Optional[dict]:
        return request(self.endpoints["frontend"], P.request_header(P.HEALTH, id="fuzz"), timeout_s=5.0)

    def stats(self) -> dict:
        reply = request(self.endpoints["frontend"], P.request_header(P.STATS, id="fuzz", key=self.key), timeout_s=5.0)
        if not reply or not reply.get("ok"):
            raise RuntimeError(f"stats refused ({reply}); pass the server's --key")
        return reply

    def worker_pids(self) -> list:
        health = self.health() or {}
        return sorted(w["pid"] for w in health.get("workers", []) if isinstance(w.get("pid"), int))

    def serving(self) -> bool:
        """A real prediction succeeds."""
        header, pixels = Cases(0, self.key)._header()
        reply = request(self.endpoints["frontend"], header, [pixels], timeout_s=60.0)
        return bool(reply and reply.get("ok"))

    def _rss(self) -> int:
        rss = proc_status_kb(self.broker_pid, "VmRSS")
        self.report.rss_peak_kb = max(self.report.rss_peak_kb, rss)
        return rss

    # -- the phases --

    def run(self, count: int, seconds: float) -> FuzzReport:
        report = self.report
        health = self.health()
        if health is None:
            raise RuntimeError(f"no health answer from {self.endpoints['frontend']}")
        self.broker_pid = health.get("pid", 0)
        report.worker_pids_before = self.worker_pids()
        internal_before = self.stats()["counters"].get("internal_errors", 0)
        stream_before = self.stats()["counters"].get("stream_frames", 0)
        self.serving()  # warm the model, so the first RSS sample is the steady state
        report.rss_before_kb = self._rss()
        start = time.monotonic()
        end = start + seconds
        # frontend 70%, stream 20%, backend 10% of the cases
        self.frontend(int(count * 0.7), start + seconds * 0.7)
        self.stream(int(count * 0.2), min(end, time.monotonic() + seconds * 0.2))
        self.backend(count - report.total, end)
        report.seconds = time.monotonic() - start
        self._wait_fake_worker_gone(report.worker_pids_before)
        report.serving_after = self.serving()
        report.worker_pids_after = self.worker_pids()
        stats = self.stats()
        report.internal_errors = stats["counters"].get("internal_errors", 0) - internal_before
        report.stream_counted = stats["counters"].get("stream_frames", 0) - stream_before
        report.rss_after_kb = self._rss()
        self._judge()
        return report

    def frontend(self, count: int, until: float) -> None:
        report = self.report
        answerable, unanswerable = (
            Peer(zmq.DEALER, self.endpoints["frontend"]),
            Peer(zmq.DEALER, self.endpoints["frontend"]),
        )
        outstanding = 0
        cases = self.cases.frontend()
        try:
            for i in range(count):
                if time.monotonic() > until:
                    break
                kind, frames, can_answer = next(cases)
                report.cases[f"frontend:{kind}"] += 1
                if not can_answer:
                    unanswerable.socket.send_multipart(frames)
                    continue
                answerable.socket.send_multipart(frames)
                report.answerable += 1
                outstanding += 1
                while outstanding and (outstanding >= WINDOW or answerable.socket.poll(0, zmq.POLLIN)):
                    got = self._collect(answerable, 10_000)
                    if not got:
                        break  # a full window unanswered for 10 s: counted as missing at the end
                    outstanding -= got
                if i % 500 == 0:
                    self._rss()
            deadline = time.monotonic() + SETTLE_S
            while outstanding > 0 and time.monotonic() < deadline:
                outstanding -= self._collect(answerable, 500)
            time.sleep(0.3)
            while unanswerable.recv(0) is not None:
                report.unexpected_replies += 1
        finally:
            answerable.close()
            unanswerable.close()

    def _collect(self, peer: Peer, timeout_ms: int) -> int:
        reply = peer.recv(timeout_ms)
        if reply is None:
            return 0
        self.report.replies += 1
        try:
            _, body = P.split_envelope(reply)
            header = P.decode_header(body[0])
            self.report.outcomes["ok" if header.get("ok") else header["error"]["code"]] += 1
        except (P.ZDepthError, KeyError, TypeError, IndexError):
            self.report.outcomes["unreadable reply"] += 1
        return 1

    def stream(self, count: int, until: float) -> None:
        camera = Peer(zmq.PUSH, self.endpoints["stream"])
        camera.socket.setsockopt(zmq.SNDTIMEO, 5000)
        cases = self.cases.stream()
        try:
            for _ in range(count):
                if time.monotonic() > until:
                    break
                kind, frames = next(cases)
                camera.socket.send_multipart(frames)
                self.report.cases[f"stream:{kind}"] += 1
                self.report.stream_sent += 1
        finally:
            time.sleep(0.5)  # let the last frames leave before the socket closes
            camera.close()

    def backend(self, count: int, until: float) -> None:
        """A fake worker: garbage on the backend, interleaved with requests on the frontend:
        health after each READY or HEARTBEAT (what it said must not break health), and real
        requests, some of which get dispatched to it so it can answer them with garbage."""
        fake = Peer(zmq.DEALER, self.endpoints["backend"])
        client = Peer(zmq.DEALER, self.endpoints["frontend"])
        cases = self.cases.backend()
        sent_requests = 0
        try:
            for i in range(count):
                if time.monotonic() > until:
                    break
                kind, frames = next(cases)
                fake.socket.send_multipart(frames)
                self.report.cases[f"backend:{kind}"] += 1
                self.report.backend_sent += 1
                if kind in ("ready", "heartbeat"):
                    client.socket.send_multipart([b"", P.packb(P.request_header(P.HEALTH, id=i))])
                    sent_requests += 1
                if kind == "ready":  # maybe registered now: give it work
                    header, pixels = self.cases._header()
                    client.socket.send_multipart([b"", P.packb(header), pixels])
                    sent_requests += 1
                while (message := fake.recv(0)) is not None:
                    self._answer_as_fake(fake, message)
            deadline = time.monotonic() + SETTLE_S
            answered = 0
            while answered < sent_requests and time.monotonic() < deadline:
                while (message := fake.recv(0)) is not None:
                    self._answer_as_fake(fake, message)
                if client.recv(100) is not None:
                    answered += 1
            if answered < sent_requests:
                self.report.problems.append(
                    f"{sent_requests - answered} of {sent_requests} requests sent during the backend phase got no reply"
                )
        finally:
            fake.close()
            client.close()

    def _answer_as_fake(self, fake: Peer, message: list) -> None:
        if len(message) >= 3 and message[0] == P.WORKER_PROTOCOL and message[1] == P.W_REQUEST:
            self.report.dispatched_to_fake += 1
            fake.socket.send_multipart([P.WORKER_PROTOCOL, P.W_REPLY, message[2], self.cases.garbage_reply_header()])

    def _wait_fake_worker_gone(self, real_pids: list, timeout_s: float = 15.0) -> None:
        """The fake worker's registration expires after the broker's liveness period."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = self.health() or {}
            if sorted(w.get("pid") or 0 for w in health.get("workers", [])) == real_pids:
                return
            time.sleep(0.2)

    def _judge(self) -> None:
        report = self.report
        if self.health() is None:
            report.problems.append("the broker stopped answering health")
        missing = report.answerable - report.replies
        if missing:
            report.problems.append(
                f"{missing} answerable frontend messages got no reply" if missing > 0 else f"{-missing} extra replies"
            )
        if report.unexpected_replies:
            report.problems.append(f"{report.unexpected_replies} replies to messages without a delimiter")
        if report.internal_errors:
            report.problems.append(f"{report.internal_errors} unexpected exceptions in broker handlers (see its log)")
        if report.stream_counted != report.stream_sent:
            report.problems.append(f"the broker counted {report.stream_counted} of {report.stream_sent} stream frames")
        if report.worker_pids_after != report.worker_pids_before:
            report.problems.append(
                f"workers changed (crashed and restarted?): {report.worker_pids_before} -> {report.worker_pids_after}"
            )
        if not report.serving_after:
            report.problems.append("a real request failed after fuzzing")
        if report.rss_after_kb - report.rss_before_kb > MAX_RSS_GROWTH_KB:
            report.problems.append(f"broker RSS grew by {(report.rss_after_kb - report.rss_before_kb) / 1024:.0f} MB")


def run_fuzz(server: str, count: int, seconds: float, key: Optional[str] = None, seed: int = 1) -> FuzzReport:
    """Fuzz the server at `server` (tcp://HOST:PORT) with about `count` cases in at most `seconds`."""
    return Fuzzer(server, key, seed).run(count, seconds)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server", help="tcp://HOST:PORT of a running server; default: start `zdepth serve --random-weights`"
    )
    parser.add_argument("--key", help="an API key of that server (needed for stats when it requires auth)")
    parser.add_argument("--count", type=int, default=20_000, help="cases to send (default %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=300.0, help="stop sending after this long (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.server:
        report = run_fuzz(args.server, args.count, args.seconds, args.key, args.seed)
    else:
        from bench.common import Child, free_port_block

        with tempfile.TemporaryDirectory(prefix="zdepth-fuzz-") as tmp:
            port = free_port_block(5)
            argv_serve = [
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
                "ERROR",
                "--backend-host",
                "127.0.0.1",
            ]  # a TCP worker port for the fake worker
            with Child(f"zdepth-serve-{port}", argv_serve, Path(tmp)) as server:
                endpoint = f"tcp://127.0.0.1:{port}"
                server.wait_until(lambda: bool((Fuzzer(endpoint).health() or {}).get("workers")), 120, "serving")
                report = run_fuzz(endpoint, args.count, args.seconds, None, args.seed)
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
