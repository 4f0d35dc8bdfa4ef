"""The worker process: one device, resident models, the broker's backend protocol.

Modelled on the ZeroMQ Guide's Paranoid Pirate worker, with one change: the model runs in a
compute thread, so the I/O thread keeps heartbeating through a 2-second CPU forward pass and
the broker never mistakes a slow worker for a dead one. A compute call stuck longer than
`hang_timeout_s` makes the worker exit (status 3) so its supervisor restarts it; the broker
notices the same hang on its side and answers the client.

The worker reconnects by itself: when the broker goes silent for `liveness` heartbeat
intervals, or tells it to DISCONNECT (a restarted broker does not know it), it opens a fresh
socket and registers again with READY.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import zmq

from . import protocol as P
from .compact import wire_arrays
from .config import WorkerOptions
from .request import parse_predict
from .resize import ComputeLimits

log = logging.getLogger("zdepth.worker")

HANG_EXIT_STATUS = 3
WARM_UP_SHAPE = (64, 64, 3)  # the warm-up frame: uint8 BGR, its content irrelevant


def warm_up_engine(
    engine: Any,
    preload: list,
    image_sizes: Sequence[tuple[int, int, int]] = (),
    default_dataset: str = P.DEFAULT_DATASET,
) -> None:
    """Run every `preload` model ("ENCODER:DATASET"; without any, the default encoder's
    `default_dataset` model) at each image size (height, width, input_size) and each batch bucket
    (`Engine.warm_up`: with --compile this builds the graphs), then one whole frame at the first
    size through the first model, so the first request pays no first-call cost. Without
    `image_sizes` (--warmup-shapes), one 64x64 frame at the default input size on a GPU, where
    the first call builds kernels for that size, and at the smallest on a CPU, where only the
    path needs checking.
    Raises what loading or running raises (e.g. `model_unavailable` when no checkpoint exists)."""
    models = [
        (encoder, dataset or default_dataset) for encoder, _, dataset in (item.partition(":") for item in preload)
    ]
    models = models or [(engine.default_encoder, default_dataset)]
    if not image_sizes:
        image_sizes = [(*WARM_UP_SHAPE[:2], P.MIN_INPUT_SIZE if engine.device.type == "cpu" else P.DEFAULT_INPUT_SIZE)]
    for row in engine.warm_up(image_sizes, models):
        log.info("warm-up: %s at %dx%d, batch %d: %.0f ms", row["model"], *row["shape"], row["batch"], row["ms"])
    (encoder, dataset), (height, width, size) = models[0], image_sizes[0]
    method = P.REL_DEPTH if dataset == "relative" else P.METRIC_DEPTH
    engine.predict(method, np.zeros((height, width, 3), np.uint8), encoder=encoder, dataset=dataset, input_size=size)


@dataclass
class Task:
    ticket: Any
    frames: list  # request header frame first, then data frames
    deadline: Optional[float]  # monotonic, from the broker's remaining budget


class Worker:
    def __init__(
        self,
        connect: str,
        engine: Any,
        name: Optional[str] = None,
        max_batch: int = WorkerOptions.max_batch,
        batch_wait_ms: float = WorkerOptions.batch_wait_ms,
        heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S,
        liveness: int = P.HEARTBEAT_LIVENESS,
        hang_timeout_s: Optional[float] = None,
        max_image_pixels: int = P.MAX_IMAGE_PIXELS,
        compute: ComputeLimits = ComputeLimits(),
        curve_keys: Optional[tuple] = None,
        fetch_url: Optional[Callable[[str], bytes]] = None,
        context: Optional[zmq.Context] = None,
        warm_up: Optional[Callable[[], None]] = None,
        parent_pid: Optional[int] = None,
    ):
        self.connect = connect
        self.engine = engine
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.hang_timeout_s = hang_timeout_s
        self.max_image_pixels = max_image_pixels
        self.compute = compute
        self.curve_keys = curve_keys  # (public, secret, server public), Z85: CURVE to a broker's --worker-keys port
        self.fetch_url = fetch_url
        self.context = context or zmq.Context.instance()
        self.served = 0
        self.warm_up = warm_up  # run first in the compute thread; the worker is ready once it returns
        self.ready = warm_up is None
        self.warming = warm_up is not None  # until the warm-up returns: the broker sends no work meanwhile
        self.problem: Optional[str] = None  # why the worker is not ready (its warm-up failed)
        self.parent_pid = parent_pid  # serve's pid: the worker stops when its parent is gone
        self._tasks: queue.Queue = queue.Queue()
        self._busy_since: Optional[float] = None
        self._stop = threading.Event()
        self._results_endpoint = f"inproc://zdepth-worker-results-{id(self)}"
        self._socket: Optional[zmq.Socket] = None

    # --- the I/O thread -------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`; then finish the batch being computed, send its replies and
        DISCONNECT (the broker re-queues what this worker had not started)."""
        results = self.context.socket(zmq.PAIR)
        results.setsockopt(zmq.LINGER, 0)
        results.bind(self._results_endpoint)
        compute = threading.Thread(target=self._compute_loop, name="zdepth-compute", daemon=True)
        compute.start()
        self._connect()
        poller = zmq.Poller()
        poller.register(results, zmq.POLLIN)
        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        try:
            while (
                not self._stop.is_set() or compute.is_alive()
            ):  # after stop: heartbeats and replies until the batch is done
                poller.register(self._socket, zmq.POLLIN)
                events = dict(poller.poll(max(0, int((next_heartbeat - time.monotonic()) * 1000))))
                if self._socket in events:
                    self._on_broker()
                if results in events:
                    while True:
                        try:
                            reply = results.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.served += 1
                        self._send([P.W_REPLY, *reply])
                now = time.monotonic()
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat_interval_s
                    self._send([P.W_HEARTBEAT, P.packb(self._state())])
                    self._check_hang(now)
                    self._check_parent()
                if now > self._broker_expiry:
                    log.warning("broker silent for %.1f s; reconnecting", self.heartbeat_interval_s * self.liveness)
                    poller.unregister(self._socket)
                    self._connect()
        finally:
            self._stop.set()
            if self._socket is not None:
                self._send([P.W_DISCONNECT])
                self._socket.close(linger=P.FLUSH_LINGER_MS)
            results.close(linger=0)

    def stop(self) -> None:
        """Finish the current batch, then leave (safe from a signal handler). Called again: exit at once."""
        if self._stop.is_set():
            log.warning("second stop signal: exiting without finishing the batch")
            os._exit(1)
        self._stop.set()

    def _state(self) -> dict:
        """What READY and each heartbeat tell the broker (broker/workers.py `worker_state`)."""
        return {
            "models": self.engine.models_loaded(),
            "served": self.served,
            "ready": self.ready,
            "warming": self.warming,
            "problem": self.problem,
            "graphs": self.engine.graphs_built(),
        }

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid and not self._stop.is_set():
            log.warning("parent process %d is gone; stopping", self.parent_pid)
            self._stop.set()

    def _connect(self) -> None:
        """A fresh DEALER and a READY: after a broker restart the old socket's state is useless."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._drop_queued_tasks()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)  # a broker at tcp://[v6 address]:P
        if self.curve_keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve_keys
        sock.connect(self.connect)
        self._socket = sock
        self._broker_expiry = time.monotonic() + self.heartbeat_interval_s * self.liveness
        info = dict(
            self.engine.describe(),
            **self._state(),
            name=self.name,
            capacity=self.max_batch,
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        self._send([P.W_READY, P.packb(info)])
        log.info("worker %s registering with %s", self.name, self.connect)

    def _drop_queued_tasks(self) -> None:
        """Tasks from a broker we lost: that broker answered or retried them already."""
        while True:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                return

    def _send(self, frames: list) -> None:
        try:
            self._socket.send_multipart([P.WORKER_PROTOCOL, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("broker not accepting messages; dropped a %r", frames[0])

    def _on_broker(self) -> None:
        frames = self._socket.recv_multipart(copy=False)
        self._broker_expiry = time.monotonic() + self.heartbeat_interval_s * self.liveness
        if len(frames) < 2 or frames[0].bytes != P.WORKER_PROTOCOL:
            log.warning("malformed message from the broker dropped")
            return
        command = frames[1].bytes
        if command == P.W_REQUEST and len(frames) >= 4:
            try:
                meta = P.unpackb(frames[2].buffer)
                budget_ms = meta.get("budget_ms")
                deadline = time.monotonic() + budget_ms / 1000.0 if budget_ms else None
                self._tasks.put(Task(meta["t"], frames[3:], deadline))
            except (P.ZDepthError, KeyError, TypeError, AttributeError):
                log.warning("malformed request from the broker dropped")
        elif command == P.W_DISCONNECT:
            log.info("broker asked us to register again")
            self._connect()

    def _check_hang(self, now: float) -> None:
        busy_since = self._busy_since
        if self.hang_timeout_s and busy_since is not None and now - busy_since > self.hang_timeout_s:
            log.critical(
                "compute stuck for %.0f s (over --hang-timeout); exiting so the supervisor restarts us",
                now - busy_since,
            )
            os._exit(HANG_EXIT_STATUS)

    # --- the compute thread ---------------------------------------------------------------

    def _compute_loop(self) -> None:
        out = self.context.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, P.FLUSH_LINGER_MS)
        out.connect(self._results_endpoint)
        try:
            self._warm_up()
            while not self._stop.is_set():
                try:
                    batch = [self._tasks.get(timeout=0.2)]
                except queue.Empty:
                    continue
                batch += self._gather(self.max_batch - 1)
                self._busy_since = time.monotonic()
                try:
                    replies = self.handle(batch)
                finally:
                    self._busy_since = None
                for ticket, frames in replies:
                    out.send_multipart([P.packb({"t": ticket}), *frames], copy=False)
        finally:
            out.close(linger=0)

    def _warm_up(self) -> None:
        if self.warm_up is None:
            return
        started = time.monotonic()
        try:
            self.warm_up()
        except Exception as exc:  # the worker still serves: requests for other models may work
            self.problem = (
                f"warm-up failed: {exc.message if isinstance(exc, P.ZDepthError) else f'{type(exc).__name__}: {exc}'}"
            )
            log.error("%s; the worker serves but is not ready", self.problem)
            return
        finally:
            self.warming = False
        self.ready = True
        log.info("worker %s ready (warm-up %.1f s)", self.name, time.monotonic() - started)

    def _gather(self, room: int) -> list:
        """More tasks for the same forward pass: whatever arrives within the batch window."""
        extra: list = []
        end = time.monotonic() + self.batch_wait_s
        while len(extra) < room:
            try:
                extra.append(self._tasks.get(timeout=max(0.0, end - time.monotonic())))
            except queue.Empty:
                break
        return extra

    def handle(self, batch: list) -> list:
        """Tasks -> [(ticket, reply frames)], exactly one reply per task, whatever fails."""
        replies = []
        ready = []  # (task, request id, request, image, decode_ms)
        for task in batch:
            request_id = None
            try:
                header = P.decode_header(task.frames[0])
                request_id = P.safe_id(header)
                if task.deadline is not None and time.monotonic() > task.deadline:
                    raise P.ZDepthError(P.TIMEOUT, "deadline passed before compute started")
                request = parse_predict(
                    header, task.frames, default_encoder=self.engine.default_encoder, max_pixels=self.max_image_pixels
                )
                started = time.perf_counter()
                image = self._image(request, task.frames)
                self.compute.check(image.shape[0], image.shape[1], request.input_size)  # before the model runs
                request.intrinsics_for(
                    image.shape[0], image.shape[1]
                )  # a camera_info that does not fit fails here, not its batch
                ready.append((task, request_id, request, image, (time.perf_counter() - started) * 1000.0))
            except Exception as exc:
                replies.append((task.ticket, self._error_frames(request_id, exc)))
        groups: dict = {}
        for item in ready:
            groups.setdefault(item[2].model_key, []).append(item)
        for items in groups.values():
            try:
                results = self.engine.run([item[2] for item in items], [item[3] for item in items])
            except Exception as exc:
                replies += [(item[0].ticket, self._error_frames(item[1], exc)) for item in items]
                continue
            for (task, request_id, request, _, decode_ms), result in zip(items, results):
                try:
                    replies.append((task.ticket, self._reply_frames(request_id, request, result, decode_ms)))
                except Exception as exc:
                    replies.append((task.ticket, self._error_frames(request_id, exc)))
        return replies

    def _reply_frames(self, request_id: Any, request: Any, result: Any, decode_ms: float) -> list:
        """A result in the wire form the request asked for (dtype, depth_scale, compression)."""
        started = time.perf_counter()
        arrays, scales, fields = wire_arrays(request, result.arrays)
        described, data = P.pack_arrays(arrays, compression=request.compression, scales=scales)
        timing = {"decode_ms": decode_ms, **result.timing, "encode_ms": (time.perf_counter() - started) * 1000.0}
        header = P.ok_header(
            request_id,
            arrays=described,
            min=result.min,
            max=result.max,
            model=result.model,
            worker=self.name,
            timing={k: round(v, 3) for k, v in timing.items()},
            **fields,
        )
        return [P.packb(header), *data]

    def _image(self, request: Any, frames: list) -> Any:
        from .images import decode_image  # cv2 lives in the worker only

        if request.image.url is not None:
            if self.fetch_url is None:
                raise P.bad_request(
                    "`image_url` is disabled on this server (the operator enables it with --allow-url-host)"
                )
            data = self.fetch_url(request.image.url)
            spec = dataclasses.replace(request.image, frame=1, format="png" if data[:4] == b"\x89PNG" else "jpeg")
            return decode_image(spec, [None, data], self.max_image_pixels, self.compute.max_jpeg_scans)
        return decode_image(request.image, frames, self.max_image_pixels, self.compute.max_jpeg_scans)

    def _error_frames(self, request_id: Any, exc: Exception) -> list:
        if isinstance(exc, P.ZDepthError):
            return P.error_frames(request_id, exc)
        log.exception("request failed")
        return P.error_frames(request_id, P.ZDepthError(P.INTERNAL, f"{type(exc).__name__}: {exc}"))
