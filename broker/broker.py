"""The broker: one process, one poll loop, no model and no image decoding.

Modelled on the ZeroMQ Guide's Majordomo broker. Clients talk to a frontend ROUTER, cameras
push frames to a stream PULL socket, results for cameras go out on a PUB socket, and workers
(one per device) connect to a backend ROUTER. The broker parses only the small msgpack
header: it checks the version, the method and the key, answers `health`/`describe`/`stats`
itself, and passes the frames it received straight on to a worker without copying them.

Every request gets exactly one reply: a worker's result, or an error (`timeout` when its
deadline passes, `overloaded` when the queue is full, `worker_lost` when its worker dies and
no retry fits in the deadline). Replies that arrive after the client was already answered
are counted and dropped.

Failure detection, documented in docs/protocol.md:
- a dead worker process is noticed when its heartbeats stop: within
  `heartbeat_interval_s * liveness` (3 s by default);
- a hung worker (its compute thread stuck while its I/O thread still heartbeats) is noticed
  when one request has been on it longer than `hang_timeout_s` (120 s by default, far above
  a slow CPU forward pass of a few seconds, which is never mistaken for a hang).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import zmq

import zdepth
from zdepth import protocol as P
from zdepth.auth import KeyStore
from zdepth.request import parse_predict

from .streams import StreamSlots

log = logging.getLogger("zdepth.broker")

LATENCY_WINDOW = 2048  # recent round trips kept per method for percentiles


@dataclass
class BrokerConfig:
    frontends: list = field(default_factory=lambda: [f"tcp://127.0.0.1:{P.DEFAULT_PORT}"])
    backend: str = f"tcp://127.0.0.1:{P.DEFAULT_PORT + P.BACKEND_PORT_OFFSET}"
    stream: Optional[str] = None  # camera ingress (PULL)
    pub: Optional[str] = None  # stream results (PUB)
    imagezmq: Optional[str] = None  # optional ingress for unchanged imagezmq senders (REP)
    imagezmq_fields: dict = field(default_factory=lambda: {"method": P.METRIC_DEPTH})  # prediction fields for them
    keys: Optional[KeyStore] = None
    require_auth: bool = False
    max_queue: int = 64  # requests waiting for a worker; beyond it `overloaded` at once
    default_timeout_ms: int = 30_000
    max_request_bytes: int = 32 * 1024 * 1024  # larger requests are answered `too_large`
    max_image_pixels: int = 4096 * 4096
    hang_timeout_s: float = 120.0
    heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S
    liveness: int = P.HEARTBEAT_LIVENESS
    max_retries: int = 1  # re-sends of a request whose worker died, within its deadline
    max_streams: int = 64
    pub_hwm: int = 4  # results queued per subscriber before PUB drops for it
    expect_workers: int = 0  # health says degraded below this


@dataclass
class Job:
    """One unit of work: a client request or a camera frame."""

    ticket: int
    method: str
    header: dict
    frames: list  # the header frame first, then data frames, as received (never copied)
    deadline: float  # monotonic seconds
    received: float  # monotonic seconds
    envelope: Optional[list] = None  # client route, for request/reply
    stream: Optional[str] = None  # stream name, for camera frames
    t_received: float = 0.0  # wall clock, published to stream subscribers
    key_name: Optional[str] = None
    attempts: int = 0
    dispatched: float = 0.0
    answered: bool = False


@dataclass
class WorkerRecord:
    identity: bytes
    info: dict
    capacity: int
    expiry: float
    inflight: dict = field(default_factory=dict)  # ticket -> Job
    served: int = 0
    last_dispatch: float = 0.0

    @property
    def name(self) -> str:
        return str(self.info.get("name", self.identity.hex()))

    @property
    def free(self) -> bool:
        return len(self.inflight) < self.capacity

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "device": self.info.get("device"),
            "models": self.info.get("models", []),
            "random_weights": bool(self.info.get("random_weights")),
            "capacity": self.capacity,
            "busy": len(self.inflight),
            "served": self.served,
            "host": self.info.get("host"),
            "pid": self.info.get("pid"),
        }


class Broker:
    def __init__(self, config: BrokerConfig, context: Optional[zmq.Context] = None):
        self.config = config
        self.context = context or zmq.Context.instance()
        self.keys = config.keys or KeyStore(use_env=False)
        if config.require_auth and not len(self.keys):
            raise ValueError("--require-auth needs at least one key (--api-key, --api-key-file or $ZDEPTH_API_KEYS)")
        self.workers: dict[bytes, WorkerRecord] = {}
        self.queue: collections.deque = collections.deque()
        self.streams = StreamSlots(config.max_streams)
        self.tickets = itertools.count(1)
        self.counters: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.latency_ms: dict = collections.defaultdict(lambda: collections.deque(maxlen=LATENCY_WINDOW))
        self.started = time.monotonic()
        self._streams_turn = False
        self._next_heartbeat = 0.0
        self._stop = threading.Event()
        self._sockets: list = []
        self.frontend = self._socket(zmq.ROUTER, config.frontends, public=True)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend = self._socket(zmq.ROUTER, [config.backend], public=False)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.stream = self._socket(zmq.PULL, [config.stream], public=True) if config.stream else None
        self.pub = self._socket(zmq.PUB, [config.pub], public=False) if config.pub else None
        if self.pub is not None:
            self.pub.setsockopt(zmq.SNDHWM, config.pub_hwm)
        self.imagezmq = self._socket(zmq.REP, [config.imagezmq], public=True) if config.imagezmq else None
        self._imagezmq_seq = collections.Counter()
        self.poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.stream, self.imagezmq):
            if sock is not None:
                self.poller.register(sock, zmq.POLLIN)

    def _socket(self, kind: int, endpoints: list, public: bool) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.SNDHWM, 1000)
        if public:  # far beyond the soft limit: drop the connection rather than buffer it
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.max_request_bytes + (1 << 20))
        for endpoint in endpoints:
            sock.bind(endpoint)
        self._sockets.append(sock)
        return sock

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()` or SIGINT/SIGTERM (when run in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: self.stop())
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            if hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, lambda *_: self.keys.reload())
        log.info("broker up: frontend %s backend %s stream %s pub %s", self.config.frontends, self.config.backend, self.config.stream, self.config.pub)
        try:
            while not self._stop.is_set():
                self.poll_once()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self, max_wait_s: float = 0.1) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms(max_wait_s)))
        if self.backend in events:
            self._drain(self.backend, self._on_backend)
        if self.frontend in events:
            self._drain(self.frontend, self._on_frontend)
        if self.stream is not None and self.stream in events:
            self._drain(self.stream, self._on_stream)
        if self.imagezmq is not None and self.imagezmq in events:
            self._drain(self.imagezmq, self._on_imagezmq, limit=1)  # REP: one request, one reply
        now = time.monotonic()
        self._tick(now)
        self._dispatch(now)

    def _poll_timeout_ms(self, max_wait_s: float) -> int:
        """Sleep until the next heartbeat or the earliest deadline, so timeouts are answered on time."""
        now = time.monotonic()
        wake = min(self._next_heartbeat, now + max_wait_s)
        for job in self.queue:
            wake = min(wake, job.deadline)
        for worker in self.workers.values():
            for job in worker.inflight.values():
                if not job.answered:
                    wake = min(wake, job.deadline)
        return max(0, math.ceil((wake - now) * 1000))

    def _drain(self, sock: zmq.Socket, handler, limit: int = 256) -> None:
        """Handle what is waiting on a socket, a bounded number at a time so no socket starves."""
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # one bad message must never take the broker down
                self.counters["internal_errors"] += 1
                log.exception("unexpected error handling a message")

    def close(self) -> None:
        for identity in list(self.workers):
            self._send_worker(identity, [P.W_DISCONNECT])
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()

    # --- frontend: clients ----------------------------------------------------------------

    def _on_frontend(self, frames: list) -> None:
        now = time.monotonic()
        self.counters["requests"] += 1
        try:
            envelope, body = P.split_envelope(frames)
        except P.ZDepthError:
            self.counters["malformed"] += 1  # no route to answer on
            return
        header: Any = None
        try:
            if not body:
                raise P.bad_request("no header frame after the empty delimiter")
            header = P.decode_header(body[0])
            method = P.check_envelope_header(header)
            size = sum(len(P.frame_buffer(frame)) for frame in body)
            if size > self.config.max_request_bytes:
                raise P.ZDepthError(P.TOO_LARGE, f"request is {size} bytes; the limit is {self.config.max_request_bytes}")
            if method == P.HEALTH:
                return self._reply(envelope, P.ok_header(P.safe_id(header), **self.health()))
            if method == P.DESCRIBE:
                return self._reply(envelope, P.ok_header(P.safe_id(header), schema=P.SCHEMA))
            key_name = self._authorize(header)
            if method == P.STATS:
                return self._reply(envelope, P.ok_header(P.safe_id(header), **self.stats()))
            parse_predict(header, body, max_pixels=self.config.max_image_pixels)
            timeout_ms = header.get("timeout_ms") or self.config.default_timeout_ms
            job = Job(next(self.tickets), method, header, body, now + timeout_ms / 1000.0, now, envelope=envelope, key_name=key_name)
            self._enqueue(job)
        except P.ZDepthError as error:
            self._reply_error(envelope, P.safe_id(header), error)

    def _authorize(self, header: dict) -> Optional[str]:
        if not self.config.require_auth:
            return None
        name = self.keys.check(header.get("key"))
        if name is None:
            self.counters["unauthorized"] += 1
            raise P.ZDepthError(P.UNAUTHORIZED, "a valid `key` is required" if header.get("key") else "missing `key`: this server requires an API key")
        return name

    def _enqueue(self, job: Job) -> None:
        if len(self.queue) >= self.config.max_queue:
            raise P.ZDepthError(P.OVERLOADED, f"{len(self.queue)} requests are already waiting (limit {self.config.max_queue}); retry later")
        self.queue.append(job)

    def _reply(self, envelope: list, header: dict, data: list = ()) -> None:
        if not header.get("ok", True):
            self.errors[header["error"]["code"]] += 1
        self._send_client(envelope, [P.packb(header), *data])

    def _reply_error(self, envelope: list, request_id: Any, error: P.ZDepthError) -> None:
        self._reply(envelope, P.error_header(request_id, error.code, error.message))

    def _send_client(self, envelope: list, frames: list) -> None:
        try:
            self.frontend.send_multipart(envelope + frames, zmq.NOBLOCK, copy=False)
            self.counters["replies"] += 1
        except zmq.ZMQError:  # client gone (EHOSTUNREACH) or not reading (EAGAIN at its HWM)
            self.counters["unroutable_replies"] += 1

    def _answer(self, job: Job, header: dict, data: list = (), raw_header: Any = None) -> None:
        """Give a job its one answer: to its client, or to its stream's subscribers."""
        if job.answered:
            return
        job.answered = True
        ok = bool(header.get("ok"))
        if not ok:
            self.errors[header.get("error", {}).get("code", P.INTERNAL)] += 1
        if job.stream is not None:
            self._publish(job, header, data)
            return
        self.latency_ms[job.method].append((time.monotonic() - job.received) * 1000.0)
        self._send_client(job.envelope, [raw_header if raw_header is not None else P.packb(header), *data])

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._answer(job, P.error_header(P.safe_id(job.header), code, message))

    # --- stream ingress -------------------------------------------------------------------

    def _on_stream(self, frames: list) -> None:
        self.counters["stream_frames"] += 1
        name = None
        try:
            header = P.decode_header(frames[0])
            if isinstance(header.get("stream"), str) and P.STREAM_NAME.match(header["stream"]):
                name = header["stream"]
            self._admit_stream_frame(header, frames)
        except P.ZDepthError as error:
            self._reject_stream_frame(name, error)

    def _on_imagezmq(self, frames: list) -> None:
        """An unchanged imagezmq ImageSender (REQ/REP): JSON {msg, dtype, shape} or {msg} + jpg.

        The sender's message text names the stream; the prediction fields come from the
        broker's configuration, since imagezmq has no place for them (nor for a key: bind
        this port only where the senders are trusted)."""
        self.imagezmq.send(b"OK")  # the sender blocks until answered, whatever happens next
        self.counters["imagezmq_frames"] += 1
        name = None
        try:
            if len(frames) != 2 or len(frames[0]) > P.MAX_HEADER_BYTES:
                raise P.bad_request("imagezmq messages are [json, image]")
            try:
                meta = json.loads(frames[0].bytes)
            except ValueError:
                raise P.bad_request("imagezmq metadata is not JSON") from None
            if not isinstance(meta, dict):
                raise P.bad_request("imagezmq metadata must be a JSON object")
            name = P.STREAM_NAME_UNSAFE.sub("_", str(meta.get("msg") or "imagezmq"))[:64]
            if "shape" in meta:
                if meta.get("dtype") != "uint8":
                    raise P.bad_request("imagezmq arrays must be uint8 BGR images")
                image = {"frame": 1, "format": "raw", "shape": meta["shape"]}
            else:
                image = {"frame": 1, "format": "png" if frames[1].bytes[:4] == b"\x89PNG" else "jpeg"}
            self._imagezmq_seq[name] += 1
            header = dict(self.config.imagezmq_fields, v=P.VERSION, stream=name, seq=self._imagezmq_seq[name], t_capture=time.time(), image=image)
            self._admit_stream_frame(header, [P.packb(header), frames[1]], authorized=True)
        except P.ZDepthError as error:
            self._reject_stream_frame(name, error)

    def _admit_stream_frame(self, header: dict, frames: list, authorized: bool = False) -> None:
        method = P.check_envelope_header(header)
        name = P.check_stream_name(header.get("stream"))
        if method not in P.PREDICT_METHODS:
            raise P.bad_request(f"streams carry prediction methods, not {method!r}")
        key_name = None if authorized else self._authorize(header)
        parse_predict(header, frames, max_pixels=self.config.max_image_pixels)
        if self.streams.admit(name) is None:
            raise P.ZDepthError(P.OVERLOADED, f"stream table full ({self.config.max_streams} streams)")
        now = time.monotonic()
        job = Job(next(self.tickets), method, header, frames, float("inf"), now, stream=name, t_received=time.time(), key_name=key_name)
        self.streams.put(name, job, now)

    def _reject_stream_frame(self, name: Optional[str], error: P.ZDepthError) -> None:
        self.counters["stream_rejected"] += 1
        self.errors[error.code] += 1
        self.streams.count_rejected(name)
        log.debug("stream frame of %r rejected: %s", name, error)

    def _publish(self, job: Job, header: dict, data: list) -> None:
        t_done = time.time()
        t_capture = job.header.get("t_capture")
        if not isinstance(t_capture, (int, float)) or isinstance(t_capture, bool):
            t_capture = job.t_received
        latency_ms = (t_done - t_capture) * 1000.0
        seq = job.header.get("seq")
        dropped = self.streams.record_result(job.stream, latency_ms, seq, bool(header.get("ok")))
        header = dict(
            header,
            stream=job.stream,
            seq=seq,
            t_capture=t_capture,
            t_received=job.t_received,
            t_done=t_done,
            latency_ms=latency_ms,
            dropped=dropped,
        )
        if self.pub is None:
            return
        try:
            self.pub.send_multipart([job.stream.encode(), P.packb(header), *data], zmq.NOBLOCK, copy=False)
            self.counters["published"] += 1
        except zmq.ZMQError:
            self.counters["publish_failed"] += 1

    # --- backend: workers -----------------------------------------------------------------

    def _on_backend(self, frames: list) -> None:
        now = time.monotonic()
        identity = frames[0].bytes
        if len(frames) < 3 or frames[1].bytes != P.WORKER_PROTOCOL:
            self.counters["malformed_worker"] += 1
            return
        command = frames[2].bytes
        if command == P.W_READY:
            self._register(identity, frames[3:], now)
            return
        worker = self.workers.get(identity)
        if worker is None:
            if command != P.W_DISCONNECT:
                self._send_worker(identity, [P.W_DISCONNECT])  # unknown to us: make it register again
            return
        worker.expiry = now + self._liveness_s
        if command == P.W_REPLY:
            self._on_reply(worker, frames[3:])
        elif command == P.W_HEARTBEAT:
            self._on_heartbeat(worker, frames[3:])
        elif command == P.W_DISCONNECT:
            self._remove_worker(worker, "it disconnected", now)
        else:
            self.counters["malformed_worker"] += 1

    @property
    def _liveness_s(self) -> float:
        return self.config.heartbeat_interval_s * self.config.liveness

    def _register(self, identity: bytes, rest: list, now: float) -> None:
        try:
            info = P.unpackb(rest[0].buffer) if rest else {}
            if not isinstance(info, dict):
                raise P.bad_request("READY info must be a map")
        except P.ZDepthError:
            self.counters["malformed_worker"] += 1
            return
        old = self.workers.get(identity)
        if old is not None:  # re-registered: whatever it was computing is gone
            self._remove_worker(old, "it registered again", now)
        capacity = info.get("capacity", 1)
        capacity = capacity if isinstance(capacity, int) and 1 <= capacity <= 256 else 1
        self.workers[identity] = WorkerRecord(identity, info, capacity, now + self._liveness_s)
        log.info("worker %s ready: device %s, capacity %d", info.get("name"), info.get("device"), capacity)

    def _on_reply(self, worker: WorkerRecord, rest: list) -> None:
        try:
            meta = P.unpackb(rest[0].buffer)
            ticket = meta["t"]
            header = P.decode_header(rest[1])
        except (P.ZDepthError, KeyError, TypeError, IndexError):
            self.counters["malformed_worker"] += 1
            return
        job = worker.inflight.pop(ticket, None)
        worker.served += 1
        if job is None or job.answered:
            self.counters["late_replies"] += 1  # already answered (deadline) or unknown ticket
            return
        self._answer(job, header, rest[2:], raw_header=rest[1])

    def _on_heartbeat(self, worker: WorkerRecord, rest: list) -> None:
        """Heartbeats carry the worker's resident models, which change as its LRU evicts."""
        if not rest:
            return
        try:
            status = P.unpackb(rest[0].buffer)
        except P.ZDepthError:
            self.counters["malformed_worker"] += 1
            return
        if isinstance(status, dict) and isinstance(status.get("models"), list):
            worker.info["models"] = status["models"]

    def _send_worker(self, identity: bytes, frames: list) -> bool:
        try:
            self.backend.send_multipart([identity, P.WORKER_PROTOCOL, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:
            return False

    def _remove_worker(self, worker: WorkerRecord, reason: str, now: float) -> None:
        self.workers.pop(worker.identity, None)
        log.warning("worker %s removed: %s; %d request(s) in flight", worker.name, reason, len(worker.inflight))
        self.counters["workers_lost"] += 1
        for job in worker.inflight.values():
            if job.answered:
                continue
            if job.stream is None and job.attempts <= self.config.max_retries and job.deadline > now:
                self.counters["retried"] += 1
                self.queue.appendleft(job)  # first in line: it has waited longest
            else:
                self._fail(job, P.WORKER_LOST, f"worker {worker.name} was lost ({reason}) while computing this request")
        worker.inflight.clear()

    # --- scheduling -----------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        while True:
            worker = self._free_worker()
            if worker is None:
                return
            job = self._next_job(now)
            if job is None:
                return
            job.attempts += 1
            job.dispatched = now
            budget_ms = None if job.deadline == float("inf") else max(1, int((job.deadline - now) * 1000))
            meta = P.packb({"t": job.ticket, "budget_ms": budget_ms})
            if self._send_worker(worker.identity, [P.W_REQUEST, meta, *job.frames]):
                worker.inflight[job.ticket] = job
                worker.last_dispatch = now
            else:
                self._remove_worker(worker, "unreachable", now)
                if job.stream is None:
                    self.queue.appendleft(job)
                else:
                    self._fail(job, P.WORKER_LOST, "worker unreachable")

    def _free_worker(self) -> Optional[WorkerRecord]:
        """The free worker that was given work least recently (LRU)."""
        free = [w for w in self.workers.values() if w.free]
        return min(free, key=lambda w: w.last_dispatch) if free else None

    def _next_job(self, now: float) -> Optional[Job]:
        """Requests and streams take turns when both wait, so neither starves the other."""
        while self.queue or self.streams.has_work():
            take_stream = self.streams.has_work() and (not self.queue or self._streams_turn)
            self._streams_turn = not take_stream
            if take_stream:
                return self.streams.take()
            job = self.queue.popleft()
            if job.deadline <= now:
                self._fail(job, P.TIMEOUT, "the deadline passed while the request waited for a worker")
                continue
            return job
        return None

    def _tick(self, now: float) -> None:
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            for identity in list(self.workers):
                self._send_worker(identity, [P.W_HEARTBEAT])
            self.keys.maybe_reload(now)
        for worker in list(self.workers.values()):
            if worker.expiry < now:
                self._remove_worker(worker, f"silent for over {self._liveness_s:.1f} s", now)
            elif any(now - job.dispatched > self.config.hang_timeout_s for job in worker.inflight.values()):
                self._send_worker(worker.identity, [P.W_DISCONNECT])
                self._remove_worker(worker, f"one request ran over {self.config.hang_timeout_s:.0f} s (hung)", now)
            else:
                for job in worker.inflight.values():
                    if not job.answered and job.deadline <= now:
                        self._fail(job, P.TIMEOUT, f"the deadline passed while worker {worker.name} computed the request")
        expired = [job for job in self.queue if job.deadline <= now]
        if expired:
            self.queue = collections.deque(job for job in self.queue if job.deadline > now)
            for job in expired:
                self._fail(job, P.TIMEOUT, "the deadline passed while the request waited for a worker")

    # --- health and stats -----------------------------------------------------------------

    def health(self) -> dict:
        workers = [w.as_dict() for w in self.workers.values()]
        if not workers:
            status = "no_workers"
        elif len(workers) < self.config.expect_workers or len(self.queue) >= 0.8 * self.config.max_queue:
            status = "degraded"
        else:
            status = "healthy"
        random_weights = any(w["random_weights"] for w in workers)
        health = {
            "status": status,
            "version": zdepth.__version__,
            "device": sorted({str(w["device"]) for w in workers}),
            "models_loaded": sorted({m for w in workers for m in w["models"]}),
            "workers": workers,
            "queue": len(self.queue),
            "queue_limit": self.config.max_queue,
            "auth": self.config.require_auth,
            "random_weights": random_weights,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
        }
        if random_weights:
            health["warning"] = "serving RANDOM WEIGHTS (--random-weights): outputs are not real depth"
        if self.streams.stats:
            health["streams"] = self.streams.as_dict()
        return health

    def stats(self) -> dict:
        latency = {}
        for method, samples in self.latency_ms.items():
            if samples:
                ordered = sorted(samples)
                latency[method] = {"n": len(ordered), **{f"p{q}_ms": _percentile(ordered, q) for q in (50, 90, 99)}}
        return {
            "counters": dict(self.counters),
            "errors": dict(self.errors),
            "latency": latency,
            "queue": len(self.queue),
            "in_flight": sum(len(w.inflight) for w in self.workers.values()),
            "workers": len(self.workers),
            "streams": self.streams.as_dict(),
            "stream_pending": self.streams.pending_count(),
        }


def _percentile(ordered: list, q: int) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)
