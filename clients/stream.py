"""Live camera streams: a `CameraPublisher` pushes frames, a `DepthSubscriber` receives depth.

    camera --PUSH--> broker stream ingress (port+1) --> workers --> broker PUB (port+2) --SUB--> you

No replies and no waiting: the broker keeps only the newest frame of each stream and drops the
rest (counted in each result's `dropped`), so latency stays flat when the camera is faster
than the model. Both ends follow the same rule locally: the publisher drops a frame rather
than block the camera loop, and `DepthSubscriber.latest()` skips results that were already
superseded when you asked.

    pub = CameraPublisher("tcp://gpu:5556", stream="front")   # thread 1
    pub.run(0, fps=15)                                         # camera 0, cv2 imported lazily
    for result in DepthSubscriber("tcp://gpu:5557", ["front"]):  # thread 2
        print(result.seq, result.latency_ms, result.depth.shape)

ZeroMQ sockets are not thread-safe: use each object from one thread at a time.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import zmq

from zdepth import protocol as P
from zdepth.camera import camera_info_field
from zdepth.compact import to_metres
from zdepth.protocol import ZDepthError

from .client import (
    ImageInput,
    ServerError,
    check_channels,
    compact_defaults,
    encode_array,
    image_message,
    intrinsics_dict,
)
from .security import ClientKeysInput, KeyInput, curve_keys

DEFAULT_INGRESS = f"tcp://127.0.0.1:{P.port_layout().stream}"
DEFAULT_RESULTS = f"tcp://127.0.0.1:{P.port_layout().pub}"

# A frame is 1 MB raw: two in the pipe is enough to keep the link busy, more is only delay.
_PUSH_HWM = 2
# Results waiting in the subscriber; older ones are worthless once a newer one arrives.
_SUB_HWM = 4
# ZeroMQ's I/O thread stops reading the connection while the subscriber's queue is full and
# refills it only as it empties, so an empty queue after a backlog does not mean nothing newer
# has arrived. `latest` then waits this long for the refill (at most _REFILL_BUDGET_S in all).
_REFILL_WAIT_S = 0.02
_REFILL_BUDGET_S = 0.5
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Source = Union[int, str, os.PathLike, Iterable]


def stream_endpoints(endpoint: str) -> tuple[str, str]:
    """(camera ingress, results) endpoints of a broker given its tcp request endpoint:
    ``tcp://host:5555`` -> (``tcp://host:5556``, ``tcp://host:5557``)."""
    scheme, _, address = endpoint.partition("://")
    host, colon, port = address.rpartition(":")
    if scheme != "tcp" or not colon or not port.isdigit():
        raise ValueError(f"cannot derive stream endpoints from {endpoint!r}; give them explicitly")
    ports = P.port_layout(int(port))
    return f"tcp://{host}:{ports.stream}", f"tcp://{host}:{ports.pub}"


class CameraPublisher:
    """Pushes camera frames to the broker's stream ingress, never blocking the camera loop.

    The prediction options (method, intrinsics, max_depth, encoder, dataset, input_size,
    output_dtype, depth_scale, compression) are fixed per stream. Results come in the compact
    form by default (`compact_defaults`: uint16 mm + zstd for metric depth, zstd otherwise;
    zstd even toward this host, since subscribers may be anywhere);
    `DepthSubscriber` turns every form back into float32 metres. `jpeg_quality` (1-95)
    JPEG-encodes numpy frames with PIL before sending: ~20x fewer bytes, for Wi-Fi links; without it frames go raw (no encode cost, best on a
    LAN or the same host). `channels` is the order of numpy frames (OpenCV gives bgr).
    `server_key` / `client_keys` turn on CURVE encryption, as for `DepthClient`.
    `camera_info` (instead of `intrinsics`): a ROS CameraInfo-shaped map {k, width, height, d,
    distortion_model} or a zdepth.camera.CameraInfo; the worker scales K to each frame's size.
    `with_color`: pointcloud streams also publish each pixel's RGB (`StreamResult.colors`).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_INGRESS,
        stream: str = "cam0",
        key: Optional[str] = None,
        method: str = P.METRIC_DEPTH,
        intrinsics: Any = None,
        max_depth: Optional[float] = None,
        encoder: Optional[str] = None,
        dataset: Optional[str] = None,
        input_size: Optional[int] = None,
        jpeg_quality: Optional[int] = None,
        *,
        output_dtype: Optional[str] = None,
        depth_scale: Optional[float] = None,
        compression: Optional[str] = None,
        camera_info: Any = None,
        with_color: bool = False,
        channels: str = "bgr",
        server_key: Optional[KeyInput] = None,
        client_keys: Optional[ClientKeysInput] = None,
        context: Optional[zmq.Context] = None,
    ):
        if method not in P.PREDICT_METHODS:
            raise ValueError(f"method must be one of {sorted(P.PREDICT_METHODS)}, got {method!r}")
        if method == P.POINTCLOUD and intrinsics is None and camera_info is None:
            raise ValueError("a pointcloud stream needs intrinsics {fx, fy, cx, cy} or camera_info")
        if intrinsics is not None and camera_info is not None:
            raise ValueError("give intrinsics or camera_info, not both")
        try:
            P.check_stream_name(stream)
        except ZDepthError as exc:
            raise ValueError(exc.message) from None
        curve = curve_keys(server_key, client_keys)
        self.endpoint = endpoint
        self.stream = stream
        self.jpeg_quality = jpeg_quality
        self.channels = check_channels(channels)
        options = {
            "key": key,
            "intrinsics": intrinsics_dict(intrinsics) if intrinsics is not None else None,
            "camera_info": camera_info_field(camera_info),
            "with_color": True if with_color else None,
            "max_depth": max_depth,
            "encoder": encoder,
            "dataset": dataset,
            "input_size": input_size,
            **compact_defaults(method),
            **{
                k: v
                for k, v in (("output_dtype", output_dtype), ("depth_scale", depth_scale), ("compression", compression))
                if v is not None
            },
        }
        self._header = {
            "v": P.VERSION,
            "stream": stream,
            "method": method,
            **{k: v for k, v in options.items() if v is not None},
        }
        self._seqs = itertools.count()
        self.sent = 0
        self.dropped_local = 0  # frames dropped here because the pipe to the broker was full
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        # While the connection is still being made (or the broker restarts) at most this many
        # frames wait in the pipe; the rest are dropped here, and the broker keeps the newest.
        self._socket.setsockopt(zmq.SNDHWM, _PUSH_HWM)
        self._socket.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.connect(endpoint)

    def __enter__(self) -> "CameraPublisher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(linger=0)

    def send(self, frame: ImageInput, t_capture: Optional[float] = None) -> int:
        """Offer one frame (numpy BGR/RGB array, JPEG/PNG bytes or an image file path); returns
        its seq. Never blocks: when the pipe is full the frame is dropped and counted in
        `dropped_local` (its seq is used up, so the gap shows downstream). `t_capture`
        defaults to now (time.time()). Raw arrays are copied into the message, because the
        send completes later and cameras often reuse their buffers."""
        is_array = isinstance(frame, np.ndarray)
        if is_array and self.jpeg_quality is not None:
            frame, is_array = encode_array(frame, "jpeg", self.channels, self.jpeg_quality), False
        fields, frames = image_message(frame, self.channels)
        if "image" not in fields:
            raise ValueError("a stream frame must be the image itself, not a URL")
        seq = next(self._seqs)
        header = {
            **self._header,
            **fields,
            "seq": seq,
            "t_capture": time.time() if t_capture is None else float(t_capture),
        }
        try:
            self._socket.send_multipart([P.packb(header), *frames], flags=zmq.NOBLOCK, copy=is_array)
            self.sent += 1
        except zmq.Again:
            self.dropped_local += 1
        return seq

    def run(
        self,
        source: Source,
        fps: Optional[float] = None,
        max_frames: Optional[int] = None,
        *,
        stop: Optional[threading.Event] = None,
    ) -> int:
        """Send frames from `source` until it ends, `max_frames` were offered or `stop` is set;
        returns the number offered.

        `source`: a camera index (int), a video file, a folder of .jpg/.png images (sent as
        their bytes, in name order), or any iterable of frames. OpenCV is imported only for
        cameras and videos. With `fps` the loop waits between frames and a late frame does not
        cause a burst; without it, a camera's own rate paces the loop and files go as fast as
        the pipe takes them (the rest are dropped locally).
        """
        stop = stop or threading.Event()
        period = 1.0 / fps if fps else 0.0
        next_at = time.monotonic()
        frames = _frames(source)
        count = 0
        try:
            while (max_frames is None or count < max_frames) and not stop.is_set():
                if period:  # wait before grabbing, so t_capture is the time the frame was taken
                    if stop.wait(max(0.0, next_at - time.monotonic())):
                        break
                    next_at = max(next_at + period, time.monotonic())
                frame = next(frames, None)
                if frame is None:
                    break
                self.send(frame)
                count += 1
        finally:
            frames.close()  # releases a camera or video file
        return count


def _frames(source: Source) -> Iterator:
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        yield from _folder_frames(Path(source))
    elif isinstance(source, (int, str, os.PathLike)):
        yield from _capture_frames(source)
    else:
        yield from source


def _folder_frames(folder: Path) -> Iterator[bytes]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(_IMAGE_SUFFIXES)} images in {folder}")
    for path in files:
        yield path.read_bytes()


def _capture_frames(source: Union[int, str, os.PathLike]) -> Iterator[np.ndarray]:
    import cv2  # only cameras and video files need OpenCV

    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    try:
        if not capture.isOpened():
            raise OSError(f"cannot open camera or video {source!r}")
        if isinstance(source, int):
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a driver backlog
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


@dataclass(frozen=True, eq=False)
class StreamResult:
    """One published result. Times are time.time() seconds: `t_capture` on the camera's clock,
    `t_received`/`t_done` on the broker's, `t_arrived` on this machine's. `latency_ms` is
    capture to done; `dropped` counts this stream's frames the broker skipped since the
    previous result. Arrays are read-only views (`.copy()` to write)."""

    stream: str
    seq: Optional[int]
    t_capture: Optional[float]
    t_received: Optional[float]
    t_done: Optional[float]
    latency_ms: Optional[float]
    dropped: int
    ok: bool
    depth: Optional[np.ndarray] = field(repr=False)
    points: Optional[np.ndarray] = field(repr=False)
    colors: Optional[np.ndarray] = field(repr=False)
    error: Optional[ServerError]
    t_arrived: float
    header: dict = field(repr=False)

    @property
    def age_ms(self) -> Optional[float]:
        """Capture to arrival here, in ms: what a control loop acting on this result lives with."""
        return None if self.t_capture is None else (self.t_arrived - self.t_capture) * 1000.0


class DepthSubscriber:
    """Receives stream results from the broker's PUB socket.

    `streams`: the stream names to receive (None: all). ZeroMQ subscriptions match prefixes
    ("cam1" also matches "cam10"), so topics are also checked for equality here.
    `server_key` / `client_keys` turn on CURVE encryption, as for `DepthClient`.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_RESULTS,
        streams: Union[str, Sequence[str], None] = None,
        *,
        server_key: Optional[KeyInput] = None,
        client_keys: Optional[ClientKeysInput] = None,
        context: Optional[zmq.Context] = None,
    ):
        if isinstance(streams, str):
            streams = [streams]
        curve = curve_keys(server_key, client_keys)
        self.endpoint = endpoint
        self.streams = frozenset(streams) if streams else None
        self.received = 0
        self.skipped = 0  # results `latest()` passed over because a newer one was waiting
        self.malformed = 0
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, _SUB_HWM)
        self._socket.setsockopt(zmq.IPV6, 1)
        for name in self.streams or [""]:
            self._socket.setsockopt(zmq.SUBSCRIBE, name.encode())
        if curve is not None:
            curve.apply(self._socket)
        self._socket.connect(endpoint)

    def __enter__(self) -> "DepthSubscriber":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(linger=0)

    def recv(self, timeout: Optional[float] = None) -> Optional[StreamResult]:
        """The next result in arrival order, or None after `timeout` seconds (None: wait).
        Use this to see every result (e.g. for statistics); use `latest` to act on the newest."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(wait_ms, zmq.POLLIN):
                return None
            result = self._parse(self._socket.recv_multipart(copy=False))
            if result is not None:
                return result

    def latest(self, timeout: Optional[float] = None) -> Optional[StreamResult]:
        """Wait up to `timeout` seconds (None: forever) for a result, then read everything that
        has arrived and return only the newest; older ones are counted in `skipped`.

        After a backlog (half the socket's queue read at once, or a refill that came) the queue
        may only look empty while ZeroMQ refills it from the connection, so it is given
        _REFILL_WAIT_S to refill before the newest is decided (for at most _REFILL_BUDGET_S in
        all); a caller that keeps up pays no wait."""
        newest = self.recv(timeout)
        refill_until = time.monotonic() + _REFILL_BUDGET_S
        read, backlog = 1, False
        while newest is not None:
            newer = self.recv(0)
            if newer is None and (backlog or read >= _SUB_HWM // 2) and time.monotonic() < refill_until:
                newer = self.recv(_REFILL_WAIT_S)
                backlog = newer is not None
            if newer is None:
                break
            self.skipped += 1
            read += 1
            newest = newer
        return newest

    def __iter__(self) -> Iterator[StreamResult]:
        """The newest result each time round, forever; a slow loop body never falls behind."""
        while True:
            result = self.latest()
            if result is not None:
                yield result

    def run(self, callback: Callable[[StreamResult], Any], stop: Optional[threading.Event] = None) -> None:
        """Call `callback` with the newest result each time, until `stop` is set."""
        while stop is None or not stop.is_set():
            result = self.latest(timeout=0.1)  # wake up now and then to look at `stop`
            if result is not None:
                callback(result)

    def _parse(self, frames: Sequence) -> Optional[StreamResult]:
        topic = frames[0].bytes
        if self.streams is not None and topic.decode("utf-8", "replace") not in self.streams:
            return None  # a prefix match, e.g. cam10 for a cam1 subscription
        try:
            if len(frames) < 2:
                raise P.bad_request("no header frame after the topic")
            header, arrays = P.unpack(frames[1:])
            depth, points = (
                to_metres(arrays[n], header["arrays"][n]) if n in arrays else None for n in ("depth", "points")
            )
        except ZDepthError:
            self.malformed += 1
            return None
        self.received += 1
        ok = header.get("ok") is True
        return StreamResult(
            stream=str(header.get("stream", topic.decode("utf-8", "replace"))),
            seq=header.get("seq"),
            t_capture=header.get("t_capture"),
            t_received=header.get("t_received"),
            t_done=header.get("t_done"),
            latency_ms=header.get("latency_ms"),
            dropped=int(header.get("dropped") or 0),
            ok=ok,
            depth=depth,
            points=points,
            colors=arrays.get("colors"),
            error=None if ok else ServerError.from_reply(header),
            t_arrived=time.time(),
            header=header,
        )
