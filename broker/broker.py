"""The broker: one process, one poll loop, no model and no image decoding.

Modelled on the ZeroMQ Guide's Majordomo broker. Clients talk to a frontend ROUTER, cameras
push frames to a stream PULL socket, results for cameras go out on a PUB socket, and workers
(one per device) connect to a backend ROUTER. The broker parses only the small msgpack
header: it checks the version, the method, the key, the rate and byte limits, answers
`health`/`describe`/`stats` itself, and passes the frames it received straight on to a
worker without copying them.

Every request gets exactly one reply, always through `_answer`: a worker's result, or an
error (`timeout` when its deadline passes, `overloaded` when the queue or the byte budget is
full, `rate_limited`, `worker_lost` when its worker dies and no retry fits in the deadline).
Replies that arrive after the client was already answered are counted and dropped. A
message too broken to answer (no envelope delimiter) is counted and dropped, and nothing a
peer sends (client, camera or worker) may raise out of a handler.

Failure detection, documented in docs/protocol.md:
- a dead worker process is noticed when its heartbeats stop: within
  `heartbeat_interval_s * liveness` (3 s by default);
- a hung worker (its compute thread stuck while its I/O thread still heartbeats) is noticed
  when one request has been on it longer than `hang_timeout_s` (120 s by default, far above
  a slow CPU forward pass of a few seconds, which is never mistaken for a hang).

The limits and their flags are listed in docs/limits.md.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
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

from . import imagezmq
from .limits import MB, ByteBudget, RateLimiter
from .metrics import INVALID_METHOD, OK, Metrics, PrometheusExporter, outcome_of
from .security import CurveConfig, CurveServer
from .streams import StreamSlots
from .workers import WorkerRecord, worker_capacity, worker_info, worker_models

log = logging.getLogger("zdepth.broker")

PUB_MAX_INBOUND_BYTES = 1024  # what a subscriber sends the PUB socket: subscriptions to stream names


@dataclass
class BrokerConfig:
    frontends: list = field(default_factory=lambda: [f"tcp://127.0.0.1:{P.DEFAULT_PORT}"])
    backend: str = f"tcp://127.0.0.1:{P.DEFAULT_PORT + P.BACKEND_PORT_OFFSET}"
    local_backend: Optional[str] = None  # also bound: an ipc endpoint for workers on this host
    stream: Optional[str] = None  # camera ingress (PULL)
    pub: Optional[str] = None  # stream results (PUB)
    imagezmq: Optional[str] = None  # optional ingress for unchanged imagezmq senders (REP)
    imagezmq_fields: dict = field(default_factory=lambda: {"method": P.METRIC_DEPTH})  # prediction fields for them
    imagezmq_sub: tuple = ()  # endpoints of imagezmq PUB senders (REQ_REP=False: they bind) the broker subscribes to
    keys: Optional[KeyStore] = None
    require_auth: bool = False
    max_queue: int = 64  # requests waiting for a worker; beyond it `overloaded` at once
    default_timeout_ms: int = 30_000
    max_request_bytes: int = 32 * MB  # larger requests are answered `too_large`
    max_inflight_bytes: int = 1024 * MB  # all requests and camera frames held, queued or on workers
    max_client_inflight_bytes: int = 256 * MB  # the same, per client identity and per key name
    rate_limit: float = 0.0  # requests/s per key name (per client identity without auth); 0: off
    rate_burst: Optional[int] = None  # tokens a bucket holds; default max(1, rate_limit)
    max_image_pixels: int = 4096 * 4096
    hang_timeout_s: float = 120.0
    heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S
    liveness: int = P.HEARTBEAT_LIVENESS
    max_retries: int = 1  # re-sends of a request whose worker died, within its deadline
    max_streams: int = 64
    pub_hwm: int = 4  # results queued per subscriber before PUB drops for it
    expect_workers: int = 0  # health says degraded below this
    curve: Optional[CurveConfig] = None  # CURVE on the frontend, stream, PUB and imagezmq sockets
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None  # Prometheus endpoint; None: off, 0: any free port


@dataclass
class Job:
    """One request or camera frame, from receipt to its one answer."""

    method: str
    header: Optional[dict]  # None until the header frame decodes
    received: float  # monotonic seconds
    envelope: Optional[list] = None  # client route, for request/reply
    stream: Optional[str] = None  # stream name, for camera frames
    frames: list = field(default_factory=list)  # the header frame first, then data frames, as received (never copied)
    ticket: int = 0
    deadline: float = math.inf  # monotonic seconds
    key_name: Optional[str] = None
    size: int = 0  # bytes counted against `owners` in the byte budget until answered
    owners: tuple = ()
    t_received: float = 0.0  # wall clock, published to stream subscribers
    attempts: int = 0
    dispatched: float = 0.0
    worker: Optional[str] = None
    answered: bool = False


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
        self.metrics = Metrics()
        self.budget = ByteBudget(config.max_inflight_bytes, config.max_client_inflight_bytes)
        self.rates = RateLimiter(config.rate_limit, config.rate_burst) if config.rate_limit > 0 else None
        self.started = time.monotonic()
        self._streams_turn = False
        self._next_heartbeat = 0.0
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._sockets: list = []
        self.curve: Optional[CurveServer] = None
        self.exporter: Optional[PrometheusExporter] = None
        try:
            self._open(config)
        except Exception:
            self.close()
            raise

    def _open(self, config: BrokerConfig) -> None:
        if config.curve is not None:
            self.curve = CurveServer(self.context, config.curve)
        # MAXMSGSIZE applies per frame: a peer sending a larger frame is disconnected before the
        # frame is buffered. Frames between the limit and this cap are answered `too_large`.
        frame_cap = 2 * config.max_request_bytes + MB
        self.frontend = self._socket(zmq.ROUTER, config.frontends, frame_cap)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend = self._socket(zmq.ROUTER, [config.backend] + ([config.local_backend] if config.local_backend else []), None)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.stream = self._socket(zmq.PULL, [config.stream], frame_cap) if config.stream else None
        self.pub = self._socket(zmq.PUB, [config.pub], PUB_MAX_INBOUND_BYTES, sndhwm=config.pub_hwm) if config.pub else None
        self.imagezmq = self._socket(zmq.REP, [config.imagezmq], frame_cap) if config.imagezmq else None
        try:
            self.imagezmq_pub = imagezmq.PubSenders(self.context, config.imagezmq_sub, frame_cap)
        except zmq.ZMQError as exc:
            raise BindError(f"cannot connect to imagezmq senders {list(config.imagezmq_sub)}: {exc.strerror}") from None
        self._sockets += self.imagezmq_pub.sockets()
        self._imagezmq_seq: collections.Counter = collections.Counter()
        self.poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.stream, self.imagezmq, *self.imagezmq_pub.sockets()):
            if sock is not None:
                self.poller.register(sock, zmq.POLLIN)
        if config.metrics_port is not None:
            self.exporter = PrometheusExporter(self.metrics, self.gauges, config.metrics_host, config.metrics_port)

    def _socket(self, kind: int, endpoints: list, max_frame: Optional[int], sndhwm: int = 1000) -> zmq.Socket:
        """A bound socket. `max_frame` marks a public socket: it gets MAXMSGSIZE and, when
        configured, CURVE; the backend (max_frame None) stays plain for workers."""
        sock = self.context.socket(kind)
        self._sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        if max_frame is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
            if self.curve is not None:
                self.curve.secure(sock)
        for endpoint in endpoints:
            sock.bind(endpoint)
        return sock

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()` or SIGINT/SIGTERM (when run in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: self.stop())
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            if hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        log.info("broker up: frontend %s backend %s stream %s pub %s%s", self.config.frontends, self.config.backend,
                 self.config.stream, self.config.pub, " (CURVE)" if self.curve else "")
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
        for sock in self.imagezmq_pub.readable(events):
            self._drain(sock, self._on_imagezmq_frame)
        for endpoint in self.imagezmq_pub.reconnect(events):
            self.metrics.count("imagezmq_reconnects")
            log.warning("imagezmq sender %s disconnected (stopped, or sent a message over the size cap): connecting again", endpoint)
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
            except Exception:  # a bug, never a peer's fault: counted, logged, and the loop goes on
                self.metrics.count("internal_errors")
                log.exception("unexpected error handling a message")

    def close(self) -> None:
        for identity in list(self.workers):
            self._send_worker(identity, [P.W_DISCONNECT])
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        if self.curve is not None:
            self.curve.close()
            self.curve = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    # --- frontend: clients ----------------------------------------------------------------

    def _on_frontend(self, frames: list) -> None:
        now = time.monotonic()
        self.metrics.count("requests")
        try:
            envelope, body = P.split_envelope(frames)
        except P.ZDepthError:
            self.metrics.count("malformed")  # no route to answer on
            return
        job = Job(INVALID_METHOD, None, now, envelope=envelope)
        try:
            self._admit_request(job, body, now)
        except P.ZDepthError as error:
            self._fail(job, error.code, error.message)

    def _admit_request(self, job: Job, body: list, now: float) -> None:
        """Check a request in the order of what each check costs, then answer it here or queue it."""
        if not body:
            raise P.bad_request("no header frame after the empty delimiter")
        if len(body) > P.MAX_FRAMES:
            raise P.bad_request(f"{len(body)} frames after the delimiter; a request has at most {P.MAX_FRAMES}")
        job.header = P.decode_header(body[0])
        job.method = P.check_envelope_header(job.header)
        size = sum(len(P.frame_buffer(frame)) for frame in body)
        if size > self.config.max_request_bytes:
            raise P.ZDepthError(P.TOO_LARGE, f"request is {size} bytes; the limit is {self.config.max_request_bytes} (--max-request-mb)")
        request_id = P.safe_id(job.header)
        if job.method == P.HEALTH:
            return self._answer(job, P.ok_header(request_id, **self.health()))
        if job.method == P.DESCRIBE:
            return self._answer(job, P.ok_header(request_id, schema=P.SCHEMA))
        job.key_name = self._authorize(job.header)
        client = ("client", job.envelope[0].bytes)
        if self.rates is not None:
            self.rates.take(("key", job.key_name) if job.key_name else client, now)
        if job.method == P.STATS:
            return self._answer(job, P.ok_header(request_id, **self.stats()))
        parse_predict(job.header, body, max_pixels=self.config.max_image_pixels)
        if len(self.queue) >= self.config.max_queue:
            raise P.ZDepthError(P.OVERLOADED, f"{len(self.queue)} requests are already waiting (limit {self.config.max_queue}, --max-queue); retry later")
        owners = (client, ("key", job.key_name)) if job.key_name else (client,)
        self.budget.reserve(owners, size)
        job.size, job.owners, job.frames = size, owners, _without_key(job.header, body)
        job.ticket = next(self.tickets)
        job.deadline = now + (job.header.get("timeout_ms") or self.config.default_timeout_ms) / 1000.0
        self.queue.append(job)

    def _authorize(self, header: dict) -> Optional[str]:
        if not self.config.require_auth:
            return None
        name = self.keys.check(header.get("key"))
        if name is None:
            self.metrics.count("unauthorized")
            raise P.ZDepthError(P.UNAUTHORIZED, "a valid `key` is required" if header.get("key") else "missing `key`: this server requires an API key")
        self.metrics.keyed(name)
        return name

    def _answer(self, job: Job, header: dict, data: list = (), raw_header: Any = None) -> None:
        """Give a job its one answer: to its client, or to its stream's subscribers."""
        if job.answered:
            return
        job.answered = True
        self._release(job)
        outcome = outcome_of(header)
        latency_s = time.monotonic() - job.received
        if job.stream is not None:
            if outcome != OK:
                self.metrics.error(outcome)
            self._publish(job, header, data)
        else:
            self.metrics.answered(job.method, outcome, latency_s)
            self._send_client(job.envelope, [raw_header if raw_header is not None else P.packb(header), *data])
        self._log_answer(job, header, outcome, latency_s)

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._answer(job, P.error_header(P.safe_id(job.header), code, message))

    def _release(self, job: Job) -> None:
        if job.size:
            self.budget.release(job.owners, job.size)
            job.size = 0

    def _send_client(self, envelope: list, frames: list) -> None:
        try:
            self.frontend.send_multipart(envelope + frames, zmq.NOBLOCK, copy=False)
            self.metrics.count("replies")
        except zmq.ZMQError:  # client gone (EHOSTUNREACH) or not reading (EAGAIN at its HWM)
            self.metrics.count("unroutable_replies")

    def _log_answer(self, job: Job, header: dict, outcome: str, latency_s: float) -> None:
        """One line per request: DEBUG when it succeeded, WARNING when it failed. The key's
        name is logged, never the key."""
        level = logging.DEBUG if outcome == OK else logging.WARNING
        if not log.isEnabledFor(level):
            return
        fields = {"id": P.safe_id(job.header), "method": job.method, "key": job.key_name, "outcome": outcome, "total_ms": round(latency_s * 1000.0, 3)}
        if job.stream is not None:
            fields.update(stream=job.stream, seq=_seq(job.header))
        if job.worker is not None:
            fields.update(worker=job.worker, attempts=job.attempts, wait_ms=round((job.dispatched - job.received) * 1000.0, 3))
        timing = header.get("timing")
        if outcome == OK and isinstance(timing, dict):
            fields.update({k: v for k, v in timing.items() if isinstance(k, str) and isinstance(v, (int, float))})
        if outcome != OK:
            error = header.get("error")
            fields["error"] = P.short_repr(error.get("message") if isinstance(error, dict) else error, 200)
        log.log(level, "request", extra={"fields": fields})

    # --- stream ingress -------------------------------------------------------------------

    def _on_stream(self, frames: list) -> None:
        self.metrics.count("stream_frames")
        name = None
        try:
            header = P.decode_header(frames[0])
            if isinstance(header.get("stream"), str) and P.STREAM_NAME.match(header["stream"]):
                name = header["stream"]
            self._admit_stream_frame(header, frames)
        except P.ZDepthError as error:
            self._reject_stream_frame(name, error)

    def _on_imagezmq(self, frames: list) -> None:
        """An unchanged imagezmq sender (REQ/REP, see broker/imagezmq.py): no key there, so
        bind this port only where the senders are trusted."""
        self.imagezmq.send(b"OK")  # the sender blocks until answered, whatever happens next
        self._on_imagezmq_frame(frames)

    def _on_imagezmq_frame(self, frames: list) -> None:
        """One imagezmq message, from the REP port or from a subscribed PUB sender: a stream frame."""
        self.metrics.count("imagezmq_frames")
        name = None
        try:
            meta = imagezmq.metadata(frames)
            name = imagezmq.stream_name(meta)
            self._imagezmq_seq[name] += 1
            header, image = imagezmq.stream_frame(meta, frames, name, self._imagezmq_seq[name], self.config.imagezmq_fields)
            self._admit_stream_frame(header, [P.packb(header), image], authorized=True)
        except P.ZDepthError as error:
            self._reject_stream_frame(name, error)

    def _admit_stream_frame(self, header: dict, frames: list, authorized: bool = False) -> None:
        method = P.check_envelope_header(header)
        name = P.check_stream_name(header.get("stream"))
        if method not in P.PREDICT_METHODS:
            raise P.bad_request(f"streams carry prediction methods, not {method!r}")
        if len(frames) > P.MAX_FRAMES:
            raise P.bad_request(f"{len(frames)} frames; a stream frame has at most {P.MAX_FRAMES}")
        key_name = None if authorized else self._authorize(header)
        size = sum(len(P.frame_buffer(frame)) for frame in frames)
        if size > self.config.max_request_bytes:
            raise P.ZDepthError(P.TOO_LARGE, f"stream frame is {size} bytes; the limit is {self.config.max_request_bytes} (--max-request-mb)")
        parse_predict(header, frames, max_pixels=self.config.max_image_pixels)
        now = time.monotonic()
        if self.streams.admit(name, now) is None:
            raise P.ZDepthError(P.OVERLOADED, f"stream table full ({self.config.max_streams} active streams)")
        owners = (("key", key_name),) if key_name else ()
        self.budget.reserve(owners, size)
        job = Job(method, header, now, stream=name, frames=_without_key(header, frames), ticket=next(self.tickets), key_name=key_name,
                  size=size, owners=owners, t_received=time.time())
        replaced = self.streams.put(name, job, now)
        if replaced is not None:
            self._release(replaced)

    def _reject_stream_frame(self, name: Optional[str], error: P.ZDepthError) -> None:
        self.metrics.count("stream_rejected")
        self.metrics.error(error.code)
        self.streams.count_rejected(name)
        log.warning("stream frame rejected", extra={"fields": {"stream": name, "outcome": error.code, "error": error.message}})

    def _publish(self, job: Job, header: dict, data: list) -> None:
        t_done = time.time()
        t_capture = job.header.get("t_capture")
        if not isinstance(t_capture, (int, float)) or isinstance(t_capture, bool):
            t_capture = job.t_received
        latency_ms = (t_done - t_capture) * 1000.0
        seq = _seq(job.header)
        dropped = self.streams.record_result(job.stream, latency_ms, seq, header.get("ok") is True)
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
            self.metrics.count("published")
        except zmq.ZMQError:
            self.metrics.count("publish_failed")

    # --- backend: workers -----------------------------------------------------------------

    def _on_backend(self, frames: list) -> None:
        now = time.monotonic()
        identity = frames[0].bytes
        if len(frames) < 3 or frames[1].bytes != P.WORKER_PROTOCOL:
            self.metrics.count("malformed_worker")
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
            self.metrics.count("malformed_worker")

    @property
    def _liveness_s(self) -> float:
        return self.config.heartbeat_interval_s * self.config.liveness

    def _register(self, identity: bytes, rest: list, now: float) -> None:
        try:
            info = P.unpackb(rest[0].buffer) if rest else {}
            if not isinstance(info, dict):
                raise P.bad_request("READY info must be a map")
        except P.ZDepthError:
            self.metrics.count("malformed_worker")
            return
        old = self.workers.get(identity)
        if old is not None:  # re-registered: whatever it was computing is gone
            self._remove_worker(old, "it registered again", now)
        worker = WorkerRecord(identity, worker_info(info), worker_capacity(info.get("capacity")), now + self._liveness_s)
        self.workers[identity] = worker
        log.info("worker ready", extra={"fields": {"worker": worker.name, "device": worker.info["device"], "capacity": worker.capacity}})

    def _on_reply(self, worker: WorkerRecord, rest: list) -> None:
        try:
            meta = P.unpackb(rest[0].buffer) if rest else None
        except P.ZDepthError:
            meta = None
        ticket = meta.get("t") if isinstance(meta, dict) else None
        job = worker.inflight.pop(ticket, None) if isinstance(ticket, int) else None
        if job is None or job.answered:
            self.metrics.count("malformed_worker" if job is None else "late_replies")  # garbage, or answered at its deadline
            return
        worker.served += 1
        try:
            header = P.decode_header(rest[1])
        except (P.ZDepthError, IndexError):
            self.metrics.count("malformed_worker")
            self._fail(job, P.INTERNAL, f"worker {worker.name} sent a malformed reply")
            return
        self._answer(job, header, rest[2:], raw_header=rest[1])

    def _on_heartbeat(self, worker: WorkerRecord, rest: list) -> None:
        """Heartbeats carry the worker's resident models, which change as its LRU evicts."""
        if not rest:
            return
        try:
            status = P.unpackb(rest[0].buffer)
        except P.ZDepthError:
            self.metrics.count("malformed_worker")
            return
        if isinstance(status, dict) and "models" in status:
            worker.info["models"] = worker_models(status["models"])

    def _send_worker(self, identity: bytes, frames: list) -> bool:
        try:
            self.backend.send_multipart([identity, P.WORKER_PROTOCOL, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:
            return False

    def _remove_worker(self, worker: WorkerRecord, reason: str, now: float) -> None:
        self.workers.pop(worker.identity, None)
        log.warning("worker removed", extra={"fields": {"worker": worker.name, "reason": reason, "in_flight": len(worker.inflight)}})
        self.metrics.count("workers_lost")
        for job in worker.inflight.values():
            if job.answered:
                continue
            if job.stream is None and job.attempts <= self.config.max_retries and job.deadline > now:
                self.metrics.count("retried")
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
            job.worker = worker.name
            budget_ms = None if job.deadline == math.inf else max(1, int((job.deadline - now) * 1000))
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
            if self.rates is not None:
                self.rates.prune(now)
        if self._reload.is_set():  # SIGHUP: keys and CURVE client certificates
            self._reload.clear()
            self.keys.reload()
            if self.curve is not None:
                self.curve.reload()
            log.info("reloaded keys%s", " and CURVE client certificates" if self.curve else "")
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
            "encrypted": self.curve is not None,
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
        """Counters, requests and outcomes per method, errors by code, latency percentiles, and
        the broker's state: queue, bytes held, workers, streams (with drops), requests per key name."""
        return {
            **self.metrics.snapshot(),
            "queue": len(self.queue),
            "queue_limit": self.config.max_queue,
            "in_flight": sum(len(w.inflight) for w in self.workers.values()),
            "bytes": {
                "held": self.budget.total,
                "limit": self.config.max_inflight_bytes,
                "client_limit": self.config.max_client_inflight_bytes,
                "owners": len(self.budget.by_owner),
            },
            "rate_limit": None if self.rates is None else {"rps": self.rates.rate, "burst": self.rates.burst, "buckets": len(self.rates)},
            "workers": len(self.workers),
            "streams": self.streams.as_dict(),
            "stream_frames": self._stream_totals(),
            "stream_pending": self.streams.pending_count(),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }

    def gauges(self) -> dict:
        """Live numbers for the Prometheus exporter, read from its HTTP thread: reads only."""
        return {
            "queue_depth": len(self.queue),
            "workers": len(self.workers),
            "in_flight": sum(len(w.inflight) for w in list(self.workers.values())),
            "bytes_held": self.budget.total,
            "stream_frames": self._stream_totals(),
        }

    def _stream_totals(self) -> dict:
        totals = dict(self.streams.totals)
        return {state: totals.get(state, 0) for state in ("in", "processed", "dropped", "errors", "rejected")}


def _seq(header: Optional[dict]) -> Optional[int]:
    """A stream frame's sequence number, if it is an integer: it is echoed in health and on the
    PUB socket, so nothing else a camera sends may ride along."""
    seq = header.get("seq") if isinstance(header, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _without_key(header: dict, frames: list) -> list:
    """The frames to pass to a worker: a key never leaves the broker, so the header frame is
    re-packed without it (a few microseconds; the data frames still pass untouched)."""
    if "key" not in header:
        return frames
    return [P.packb({name: value for name, value in header.items() if name != "key"}), *frames[1:]]
