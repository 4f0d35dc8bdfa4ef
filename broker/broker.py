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
from typing import Any, Callable, Optional

import zmq

import zdepth
from zdepth import protocol as P
from zdepth.auth import KeyStore
from zdepth.errors import ConfigError
from zdepth.request import parse_predict
from zdepth.resize import ComputeLimits

from . import imagezmq
from .limits import MB, ByteBudget, RateLimiter, ReplyBudget
from .metrics import INVALID_METHOD, OK, Metrics, PrometheusExporter, outcome_of
from .security import WORKER_ZAP_DOMAIN, CurveConfig, CurveServer
from .streams import StreamSlots
from .workers import WorkerRecord, worker_capacity, worker_info, worker_state

log = logging.getLogger("zdepth.broker")

PUB_MAX_INBOUND_BYTES = 1024  # what a subscriber sends the PUB socket: subscriptions to stream names
PUBLIC_RCVHWM = 16  # whole messages libzmq queues per connection on a public socket before the broker reads them
# health `status`: `ready` is true for the first two (docs/protocol.md section 8).
HEALTHY = "healthy"  # every expected worker ready, queue under 80 %
DEGRADED = "degraded"  # serving, but fewer ready workers than serve started, or the queue at least 80 % full
NOT_READY = (
    "not_ready"  # workers connected, none ready yet (loading, warming up, or its warm-up failed: see workers[].problem)
)
NO_WORKERS = "no_workers"  # no worker connected
DRAINING = "draining"  # SIGTERM/SIGINT received: finishing accepted work, refusing new work
HEALTH_STATUSES = (HEALTHY, DEGRADED, NOT_READY, NO_WORKERS, DRAINING)
LOOP_STALL_S = 5.0  # /healthz fails when the poll loop has not turned for this long (it turns at least every 0.1 s)


DRAIN_TIMEOUT_S = 30.0  # SIGTERM/SIGINT: how long accepted work may take to finish (--drain-timeout)
NO_WORKER_GRACE_S = 5.0  # no worker for this long: queued and new requests get worker_lost (--no-worker-grace; 0: off)


class BindError(Exception):
    """An endpoint could not be bound (most often: its port is in use)."""


@dataclass
class BrokerConfig:
    frontends: list = field(default_factory=lambda: [f"tcp://127.0.0.1:{P.DEFAULT_PORT}"])
    backend: Optional[str] = f"tcp://127.0.0.1:{P.port_layout().backend}"  # None: no TCP worker port
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
    max_client_reply_bytes: int = 64 * MB  # replies queued toward one client identity that it has not read
    handshake_s: float = 5.0  # public sockets: a connection must finish the ZMTP handshake within this
    peer_heartbeat_s: float = 10.0  # public sockets: ZMTP PING interval; a peer silent for 3 of them is dropped; 0: off
    rate_limit: float = 0.0  # requests/s per key name (per client identity without auth); 0: off
    rate_burst: Optional[int] = None  # tokens a bucket holds; default max(1, rate_limit)
    max_image_pixels: int = P.MAX_IMAGE_PIXELS
    compute: ComputeLimits = field(default_factory=ComputeLimits)  # tokens and aspect of raw images
    hang_timeout_s: float = P.HANG_TIMEOUT_S
    heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S
    liveness: int = P.HEARTBEAT_LIVENESS
    max_retries: int = 1  # re-sends of a request whose worker died, within its deadline
    max_streams: int = 64
    stream_idle_s: float = 5.0  # a full stream table gives a stream silent this long to a new name
    pub_hwm: int = 4  # results queued per subscriber before PUB drops for it
    expect_workers: int = 0  # health says degraded below this
    curve: Optional[CurveConfig] = None  # CURVE on the frontend, stream, PUB and imagezmq sockets
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None  # Prometheus endpoint; None: off, 0: any free port
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    no_worker_grace_s: float = NO_WORKER_GRACE_S


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
            raise ConfigError("--require-auth needs at least one key (--api-key, --api-key-file or $ZDEPTH_API_KEYS)")
        self.workers: dict[bytes, WorkerRecord] = {}
        self.queue: collections.deque = collections.deque()
        self.streams = StreamSlots(config.max_streams, config.stream_idle_s)
        self.tickets = itertools.count(1)
        self.metrics = Metrics()
        self.budget = ByteBudget(config.max_inflight_bytes, config.max_client_inflight_bytes)
        self.replies = ReplyBudget(config.max_client_reply_bytes)
        self.rates = RateLimiter(config.rate_limit, config.rate_burst) if config.rate_limit > 0 else None
        self.started = time.monotonic()
        self._streams_turn = False
        self._next_heartbeat = 0.0
        self._stop = threading.Event()
        self._drain_requested = threading.Event()
        self._draining_since: Optional[float] = None
        self._no_worker_since: Optional[float] = self.started  # monotonic; None while a worker is connected
        self._reload = threading.Event()
        self._reported_reload_error: Optional[str] = None
        self._loop_seen = self.started  # monotonic: the poll loop's last turn (the exporter's /healthz)
        self.on_worker_lost: Optional[Callable[[WorkerRecord, str], None]] = (
            None  # serve: restart a dead or hung worker
        )
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
        # Workers: a plain socket for the ipc endpoint of this host's workers (and for the TCP one
        # when no worker keys are configured), and with --worker-keys a CURVE socket for the TCP
        # one that admits only workers whose public key is in that folder.
        remote = config.backend if config.curve is not None and config.curve.workers_dir else None
        plain = [e for e in (None if remote else config.backend, config.local_backend) if e]
        self.backend = self._worker_socket(plain)
        self.remote_backend = self._worker_socket([remote], secure=True) if remote else None
        self.stream = self._socket(zmq.PULL, [config.stream], frame_cap) if config.stream else None
        self.pub = (
            self._socket(zmq.PUB, [config.pub], PUB_MAX_INBOUND_BYTES, sndhwm=config.pub_hwm) if config.pub else None
        )
        self.imagezmq = self._socket(zmq.REP, [config.imagezmq], frame_cap) if config.imagezmq else None
        try:
            self.imagezmq_pub = imagezmq.PubSenders(self.context, config.imagezmq_sub, frame_cap)
        except zmq.ZMQError as exc:
            raise BindError(f"cannot connect to imagezmq senders {list(config.imagezmq_sub)}: {exc.strerror}") from None
        self._sockets += self.imagezmq_pub.sockets()
        self._imagezmq_seq: collections.Counter = collections.Counter()
        self.poller = zmq.Poller()
        for sock in (
            self.frontend,
            self.backend,
            self.remote_backend,
            self.stream,
            self.imagezmq,
            *self.imagezmq_pub.sockets(),
        ):
            if sock is not None:
                self.poller.register(sock, zmq.POLLIN)
        if config.metrics_port is not None:
            self.exporter = PrometheusExporter(self.metrics, self.gauges, config.metrics_host, config.metrics_port)

    def _worker_socket(self, endpoints: list, secure: bool = False) -> zmq.Socket:
        sock = self._socket(zmq.ROUTER, endpoints, None, zap_domain=WORKER_ZAP_DOMAIN if secure else None)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        return sock

    def _socket(
        self, kind: int, endpoints: list, max_frame: Optional[int], sndhwm: int = 1000, zap_domain: Optional[str] = None
    ) -> zmq.Socket:
        """A bound socket. `max_frame` marks a public socket: it gets MAXMSGSIZE, handshake and
        heartbeat timeouts and, when configured, CURVE; a worker socket (max_frame None) is a
        CURVE server only with `zap_domain` (the remote workers' one)."""
        sock = self.context.socket(kind)
        self._sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1000 if max_frame is None else PUBLIC_RCVHWM)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:P and dual-stack hosts
        if max_frame is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
            # A connection that never finishes the ZMTP handshake (a bare greeting) is closed after
            # handshake_s, and one whose peer stops answering PINGs after 3 heartbeat intervals.
            sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.config.handshake_s * 1000))
            if self.config.peer_heartbeat_s > 0:
                sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.config.peer_heartbeat_s * 1000))
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.config.peer_heartbeat_s * 3000))
                sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.config.peer_heartbeat_s * 3000))
            if self.curve is not None and self.curve.config.secures_clients:
                self.curve.secure(sock)
        if zap_domain is not None:
            self.curve.secure(sock, zap_domain)
        for endpoint in endpoints:
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise BindError(f"cannot bind {endpoint}: {os.strerror(exc.errno)}") from None
        return sock

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`, or until a drain (`drain()`, SIGTERM or SIGINT in the main
        thread) has finished; a second SIGTERM/SIGINT stops at once. Whatever is unanswered
        when the loop ends is answered `shutting_down`."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: self.drain())
            signal.signal(signal.SIGTERM, lambda *_: self.drain())
            if hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        log.info(
            "broker up: frontend %s backend %s stream %s pub %s%s",
            self.config.frontends,
            self.config.backend,
            self.config.stream,
            self.config.pub,
            " (CURVE)" if self.curve else "",
        )
        try:
            while not self._stop.is_set() and not self._drained(time.monotonic()):
                self.poll_once()
        finally:
            self._answer_leftovers()
            self.close()

    def stop(self) -> None:
        """Stop at once: the loop ends within one poll, and unanswered work is answered `shutting_down`."""
        self._stop.set()

    def drain(self) -> None:
        """Stop taking work (new requests and camera frames are answered `shutting_down`), let
        accepted work finish within `drain_timeout_s`, then stop. Called again: stop at once.
        Safe from a signal handler or another thread."""
        if self._drain_requested.is_set():
            self.stop()
        self._drain_requested.set()

    @property
    def stopped(self) -> bool:
        """True when `stop()` (a second signal, or serve's supervisor) ended the loop rather than a finished drain."""
        return self._stop.is_set()

    @property
    def draining(self) -> bool:
        return self._drain_requested.is_set()

    def _drained(self, now: float) -> bool:
        """True once a drain has nothing left to wait for, or its time is up."""
        if not self._drain_requested.is_set():
            return False
        if self._draining_since is None:
            self._draining_since = now
            log.warning(
                "draining: %d queued, %d computing; new work is answered shutting_down (up to %.0f s, --drain-timeout)",
                len(self.queue) + self.streams.pending_count(),
                self._in_flight(),
                self.config.drain_timeout_s,
            )
        idle = not self.queue and not self.streams.has_work() and not self._in_flight()
        return idle or now - self._draining_since >= self.config.drain_timeout_s

    def _in_flight(self) -> int:
        return sum(1 for w in self.workers.values() for job in w.inflight.values() if not job.answered)

    def _answer_leftovers(self) -> None:
        """Answer every queued, waiting or computing job `shutting_down` (their workers' late replies are dropped)."""
        message = "the server is shutting down; this request was not finished"
        for job in self._take_waiting() + [job for w in self.workers.values() for job in w.inflight.values()]:
            self._fail(job, P.SHUTTING_DOWN, message)

    def _take_waiting(self) -> list:
        """Every queued request and waiting camera frame, taken out of the queue and the stream slots."""
        jobs = list(self.queue)
        self.queue.clear()
        while self.streams.has_work():
            jobs.append(self.streams.take())
        return jobs

    def poll_once(self, max_wait_s: float = 0.1) -> None:
        self._loop_seen = time.monotonic()
        events = dict(self.poller.poll(self._poll_timeout_ms(max_wait_s)))
        if self.backend in events:
            self._drain(self.backend, self._on_backend)
        if self.remote_backend is not None and self.remote_backend in events:
            self._drain(self.remote_backend, lambda frames: self._on_backend(frames, self.remote_backend))
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
            log.warning(
                "imagezmq sender %s disconnected (stopped, or sent a message over the size cap): connecting again",
                endpoint,
            )
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
        for sock in self._sockets:  # answers already sent to clients and subscribers get a moment to leave
            sock.close(
                linger=P.FLUSH_LINGER_MS if sock in (getattr(self, "frontend", None), getattr(self, "pub", None)) else 0
            )
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
            raise P.ZDepthError(
                P.TOO_LARGE, f"request is {size} bytes; the limit is {self.config.max_request_bytes} (--max-request-mb)"
            )
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
        self.replies.check(client[1])
        self._check_predict(job.header, body)
        self._check_accepting(now)
        if len(self.queue) >= self.config.max_queue:
            raise P.ZDepthError(
                P.OVERLOADED,
                f"{len(self.queue)} requests are already waiting (limit {self.config.max_queue}, --max-queue); retry later",
            )
        owners = (client, ("key", job.key_name)) if job.key_name else (client,)
        self.budget.reserve(owners, size)
        job.size, job.owners, job.frames = size, owners, _without_key(job.header, body)
        job.ticket = next(self.tickets)
        job.deadline = now + (job.header.get("timeout_ms") or self.config.default_timeout_ms) / 1000.0
        self.queue.append(job)

    def _check_accepting(self, now: float) -> None:
        """New work is refused while draining, and while no worker has been connected for the grace period."""
        if self.draining:
            raise P.ZDepthError(
                P.SHUTTING_DOWN,
                "the server is shutting down and takes no new work; retry on another server or after its restart",
            )
        if self._no_workers_for(now) is not None:
            raise P.ZDepthError(
                P.WORKER_LOST, f"no worker has been connected for {self._no_workers_for(now):.1f} s; retry later"
            )

    def _no_workers_for(self, now: float) -> Optional[float]:
        """Seconds without any worker, once that exceeds `no_worker_grace_s` (else None)."""
        since, grace = self._no_worker_since, self.config.no_worker_grace_s
        if since is None or grace <= 0 or now - since < grace:
            return None
        return now - since

    def _check_predict(self, header: dict, frames: list) -> None:
        """A prediction's fields, and for a raw image (its shape is in the header) the model's
        work after the resize: refused here, before it costs a worker anything."""
        request = parse_predict(header, frames, max_pixels=self.config.max_image_pixels)
        if request.image.shape is not None:
            self.config.compute.check(request.image.shape[0], request.image.shape[1], request.input_size)

    def _authorize(self, header: dict) -> Optional[str]:
        if not self.config.require_auth:
            return None
        name = self.keys.check(header.get("key"))
        if name is None:
            self.metrics.count("unauthorized")
            raise P.ZDepthError(
                P.UNAUTHORIZED,
                "a valid `key` is required" if header.get("key") else "missing `key`: this server requires an API key",
            )
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
            size = sum(len(P.frame_buffer(frame)) for frame in data)
            if data and not self.replies.fits(job.envelope[0].bytes, size):  # a client that does not read its replies
                header, data, raw_header = self._dropped_reply(job, size), (), None
                outcome = outcome_of(header)
            self.metrics.answered(job.method, outcome, latency_s)
            self._send_client(job.envelope, [raw_header if raw_header is not None else P.packb(header), *data], size)
        self._log_answer(job, header, outcome, latency_s)

    def _dropped_reply(self, job: Job, size: int) -> dict:
        """The small error that stands in for a reply dropped over the client's reply budget."""
        self.metrics.count("replies_dropped")
        pending = self.replies.pending(job.envelope[0].bytes)
        return P.error_header(
            P.safe_id(job.header),
            P.OVERLOADED,
            (
                f"reply of {size} bytes dropped: this client has {pending} bytes of replies it has not read; "
                f"the limit is {self.config.max_client_reply_bytes} (--max-client-reply-mb)"
            ),
        )

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._answer(job, P.error_header(P.safe_id(job.header), code, message))

    def _release(self, job: Job) -> None:
        if job.size:
            self.budget.release(job.owners, job.size)
            job.size = 0

    def _send_client(self, envelope: list, frames: list, size: int = 0) -> None:
        """Send a reply; one with data frames (`size` bytes) is tracked in the client's reply budget."""
        try:
            if len(frames) > 1:  # all but the last frame as send_multipart would; the last one tracked
                for frame in envelope + frames[:-1]:
                    self.frontend.send(frame, zmq.SNDMORE | zmq.NOBLOCK, copy=False)
                last = zmq.Frame(P.frame_buffer(frames[-1]), copy=False, track=True)
                self.replies.add(envelope[0].bytes, self.frontend.send(last, zmq.NOBLOCK, copy=False, track=True), size)
            else:
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
        fields = {
            "id": P.safe_id(job.header),
            "method": job.method,
            "key": job.key_name,
            "outcome": outcome,
            "total_ms": round(latency_s * 1000.0, 3),
        }
        if job.stream is not None:
            fields.update(stream=job.stream, seq=_seq(job.header))
        if job.worker is not None:
            fields.update(
                worker=job.worker, attempts=job.attempts, wait_ms=round((job.dispatched - job.received) * 1000.0, 3)
            )
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
            if isinstance(header.get("stream"), str) and P.STREAM_NAME.fullmatch(header["stream"]):
                name = header["stream"]
            self._admit_stream_frame(header, frames, _peer_address(frames[0]))
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
            header, image = imagezmq.stream_frame(
                meta, frames, name, self._imagezmq_seq[name], self.config.imagezmq_fields
            )
            self._admit_stream_frame(header, [P.packb(header), image], _peer_address(frames[0]), authorized=True)
        except P.ZDepthError as error:
            self._reject_stream_frame(name, error)

    def _admit_stream_frame(self, header: dict, frames: list, peer: str, authorized: bool = False) -> None:
        """Admit a camera frame from `peer` (its address) into its stream's slot, or raise."""
        method = P.check_envelope_header(header)
        name = P.check_stream_name(header.get("stream"))
        if method not in P.PREDICT_METHODS:
            raise P.bad_request(f"streams carry prediction methods, not {method!r}")
        if len(frames) > P.MAX_FRAMES:
            raise P.bad_request(f"{len(frames)} frames; a stream frame has at most {P.MAX_FRAMES}")
        key_name = None if authorized else self._authorize(header)
        size = sum(len(P.frame_buffer(frame)) for frame in frames)
        if size > self.config.max_request_bytes:
            raise P.ZDepthError(
                P.TOO_LARGE,
                f"stream frame is {size} bytes; the limit is {self.config.max_request_bytes} (--max-request-mb)",
            )
        self._check_predict(header, frames)
        now = time.monotonic()
        self._check_accepting(now)
        owners = (("key", key_name) if key_name else ("address", peer),)  # a PULL socket cannot tell connections apart
        self.budget.reserve(owners, size)
        stats, evicted = self.streams.admit(name, now, "{} {}".format(*owners[0]))
        if evicted is not None:
            self._release(evicted)
        if stats is None:
            self.budget.release(owners, size)
            raise P.ZDepthError(
                P.OVERLOADED,
                f"stream table full ({self.config.max_streams} streams, each source holding at most as many as yours)",
            )
        job = Job(
            method,
            header,
            now,
            stream=name,
            frames=_without_key(header, frames),
            ticket=next(self.tickets),
            key_name=key_name,
            size=size,
            owners=owners,
            t_received=time.time(),
        )
        replaced = self.streams.put(name, job, now)
        if replaced is not None:
            self._release(replaced)

    def _reject_stream_frame(self, name: Optional[str], error: P.ZDepthError) -> None:
        self.metrics.count("stream_rejected")
        self.metrics.error(error.code)
        self.streams.count_rejected(name)
        log.warning(
            "stream frame rejected", extra={"fields": {"stream": name, "outcome": error.code, "error": error.message}}
        )

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

    def _on_backend(self, frames: list, sock: Optional[zmq.Socket] = None) -> None:
        """A worker's message on `sock` (the plain worker socket unless given)."""
        now = time.monotonic()
        sock = sock or self.backend
        identity = frames[0].bytes
        if len(frames) < 3 or frames[1].bytes != P.WORKER_PROTOCOL:
            self.metrics.count("malformed_worker")
            return
        command = frames[2].bytes
        if command == P.W_READY:
            self._register(
                identity, frames[3:], now, sock, _curve_key(frames[0]) if sock is self.remote_backend else None
            )
            return
        worker = self.workers.get(identity)
        if worker is None or worker.sock is not sock:
            if command != P.W_DISCONNECT:
                self._send_worker(identity, [P.W_DISCONNECT], sock)  # unknown to us: make it register again
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

    def _register(self, identity: bytes, rest: list, now: float, sock: zmq.Socket, key: Optional[str]) -> None:
        """A worker's READY on `sock`; `key` is the CURVE public key it proved it holds (remote workers)."""
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
        worker = WorkerRecord(
            identity,
            dict(worker_info(info), key=key),
            worker_capacity(info.get("capacity")),
            now + self._liveness_s,
            sock=sock,
        )
        self.workers[identity] = worker
        self._no_worker_since = None
        log.info(
            "worker ready",
            extra={"fields": {"worker": worker.name, "device": worker.info["device"], "capacity": worker.capacity}},
        )

    def _on_reply(self, worker: WorkerRecord, rest: list) -> None:
        try:
            meta = P.unpackb(rest[0].buffer) if rest else None
        except P.ZDepthError:
            meta = None
        ticket = meta.get("t") if isinstance(meta, dict) else None
        job = worker.inflight.pop(ticket, None) if isinstance(ticket, int) else None
        if job is None or job.answered:
            self.metrics.count(
                "malformed_worker" if job is None else "late_replies"
            )  # garbage, or answered at its deadline
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
        if isinstance(status, dict):
            worker.info.update(worker_state(status))

    def _send_worker(self, identity: bytes, frames: list, sock: Optional[zmq.Socket] = None) -> bool:
        """Send to a worker on its socket (`sock` for one not registered)."""
        worker = self.workers.get(identity)
        sock = sock or (worker.sock if worker is not None else self.backend)
        try:
            sock.send_multipart([identity, P.WORKER_PROTOCOL, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError:
            return False

    def _remove_worker(self, worker: WorkerRecord, reason: str, now: float) -> None:
        self.workers.pop(worker.identity, None)
        if not self.workers:
            self._no_worker_since = now
        log.warning(
            "worker removed",
            extra={"fields": {"worker": worker.name, "reason": reason, "in_flight": len(worker.inflight)}},
        )
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

    def _lose_worker(self, worker: WorkerRecord, reason: str, now: float) -> None:
        """A worker declared dead or hung: removed, and handed to `on_worker_lost` (serve restarts it)."""
        self._remove_worker(worker, reason, now)
        if self.on_worker_lost is not None:
            self.on_worker_lost(worker, reason)

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
            try:  # a client that stopped reading its replies gets no more computed for it
                self.replies.check(job.envelope[0].bytes)
            except P.ZDepthError as error:
                self._fail(job, error.code, error.message)
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
            self.replies.prune()
            for name in [
                n for n in self._imagezmq_seq if n not in self.streams.stats
            ]:  # senders gone from the stream table
                del self._imagezmq_seq[name]
        if self._reload.is_set():  # SIGHUP: keys and CURVE client certificates
            self._reload.clear()
            self.keys.reload()
            if self.curve is not None:
                self.curve.reload()
            if self.keys.reload_error is None:
                log.info("reloaded keys%s", " and CURVE client certificates" if self.curve else "")
            self._reported_reload_error = None  # a failed SIGHUP is always reported
        if self.keys.reload_error is not None and self.keys.reload_error != self._reported_reload_error:
            log.error("key file reload failed, the previous keys stay in force: %s", self.keys.reload_error)
        self._reported_reload_error = self.keys.reload_error
        for worker in list(self.workers.values()):
            if worker.expiry < now:
                self._lose_worker(worker, f"silent for over {self._liveness_s:.1f} s", now)
            elif any(now - job.dispatched > self.config.hang_timeout_s for job in worker.inflight.values()):
                self._send_worker(worker.identity, [P.W_DISCONNECT])
                self._lose_worker(worker, f"one request ran over {self.config.hang_timeout_s:.0f} s (hung)", now)
            else:
                for job in worker.inflight.values():
                    if not job.answered and job.deadline <= now:
                        self._fail(
                            job, P.TIMEOUT, f"the deadline passed while worker {worker.name} computed the request"
                        )
        without_workers = self._no_workers_for(now)
        if without_workers is not None and (self.queue or self.streams.has_work()):
            for job in self._take_waiting():
                self._fail(job, P.WORKER_LOST, f"no worker has been connected for {without_workers:.1f} s; retry later")
        expired = [job for job in self.queue if job.deadline <= now]
        if expired:
            self.queue = collections.deque(job for job in self.queue if job.deadline > now)
            for job in expired:
                self._fail(job, P.TIMEOUT, "the deadline passed while the request waited for a worker")

    # --- health and stats -----------------------------------------------------------------

    def status(self) -> str:
        """One of `HEALTH_STATUSES` (docs/protocol.md section 8). Reads only: safe from the exporter's thread."""
        workers = list(self.workers.values())
        ready = sum(1 for w in workers if w.ready)
        if self.draining:
            return DRAINING
        if not workers:
            return NO_WORKERS
        if not ready:
            return NOT_READY
        if ready < self.config.expect_workers or len(self.queue) >= 0.8 * self.config.max_queue:
            return DEGRADED
        return HEALTHY

    def health(self) -> dict:
        """The broker's answer to `health`."""
        workers = [w.as_dict() for w in self.workers.values()]
        status = self.status()
        random_weights = any(w["random_weights"] for w in workers)
        health = {
            "status": status,
            "live": True,
            "ready": status in (HEALTHY, DEGRADED),
            "version": zdepth.__version__,
            "device": sorted({str(w["device"]) for w in workers}),
            "models_loaded": sorted({m for w in workers for m in w["models"]}),
            "workers": workers,
            "queue": len(self.queue),
            "queue_limit": self.config.max_queue,
            "auth": self.config.require_auth,
            "encrypted": self.curve is not None and self.curve.config.secures_clients,
            "random_weights": random_weights,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
        }
        if random_weights:
            health["warning"] = "serving RANDOM WEIGHTS (--random-weights): outputs are not real depth"
        names = collections.Counter(w["name"] for w in workers)
        duplicates = sorted(name for name, count in names.items() if count > 1)
        if duplicates:  # two processes claim one name: a misconfiguration, or one of them is an impostor
            health["duplicate_worker_names"] = duplicates
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
                "replies_pending": self.replies.total,
                "reply_clients": len(self.replies),
                "client_reply_limit": self.config.max_client_reply_bytes,
                "owners": len(self.budget.by_owner),
            },
            "key_reload_error": self.keys.reload_error,
            "rate_limit": None
            if self.rates is None
            else {"rps": self.rates.rate, "burst": self.rates.burst, "buckets": len(self.rates)},
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
            "status": (status := self.status()),
            "live": time.monotonic() - self._loop_seen < LOOP_STALL_S,
            "ready": status in (HEALTHY, DEGRADED),
        }

    def _stream_totals(self) -> dict:
        totals = dict(self.streams.totals)
        return {state: totals.get(state, 0) for state in ("in", "processed", "dropped", "errors", "rejected")}


def _seq(header: Optional[dict]) -> Optional[int]:
    """A stream frame's sequence number, if it is an integer: it is echoed in health and on the
    PUB socket, so nothing else a camera sends may ride along."""
    seq = header.get("seq") if isinstance(header, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _curve_key(frame: zmq.Frame) -> Optional[str]:
    """The CURVE public key (Z85) a peer authenticated with: the ZAP handler's User-Id."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def _peer_address(frame: zmq.Frame) -> str:
    """The address a message came from (libzmq's Peer-Address: the IP for tcp), "" if unknown."""
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return ""


def _without_key(header: dict, frames: list) -> list:
    """The frames to pass to a worker: a key never leaves the broker, so the header frame is
    re-packed without it (a few microseconds; the data frames still pass untouched)."""
    if "key" not in header:
        return frames
    return [P.packb({name: value for name, value in header.items() if name != "key"}), *frames[1:]]
