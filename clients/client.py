"""`DepthClient`: one object that asks a zdepth broker for depth, with timeouts and retries.

Modelled on httpx/requests: a few obvious methods, errors as exceptions, numpy arrays back.

    with DepthClient("tcp://gpu-server:5555", key="sk-...") as client:
        result = client.metric_depth("frame.jpg")           # DepthResult
        result.depth                                          # float32 (H, W), metres
        cloud = client.pointcloud(frame_bgr, {"fx": 525, "fy": 525, "cx": 319.5, "cy": 239.5})
        cloud.points                                          # float32 (H*W, 3)

Replies come compact by default (uint16 mm depth, zstd toward other hosts) and are turned
into float32 metres here. Arrays that arrive as uncompressed float32 are read-only
`np.frombuffer` views on the received ZeroMQ frames, with nothing copied on the way in: call
`.copy()` on one before writing to it, and copy what you keep long-term (a view keeps its
whole reply message alive).

Only pyzmq, msgpack, numpy and zstandard are needed; never torch or OpenCV. PIL is imported
lazily, and only to encode arrays as JPEG/PNG or to colour a cloud computed on the client.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import zmq

from zdepth import protocol as P
from zdepth.camera import camera_info_field, resolve_intrinsics
from zdepth.compact import to_metres
from zdepth.geometry import unproject
from zdepth.protocol import ZDepthError
from zdepth.request import Intrinsics, check_intrinsics

from .security import ClientKeysInput, KeyInput, curve_keys

DEFAULT_ENDPOINT = f"tcp://127.0.0.1:{P.DEFAULT_PORT}"
DEFAULT_TIMEOUT = 30.0

# A client has one request in flight, so a deep queue would only hold stale requests.
_HWM = 8
# The deadline sent to the server is this much shorter than the client's wait (at most a
# fifth of it), so the server's own `timeout` answer, which says where the time went,
# arrives before the client stops listening.
_SERVER_MARGIN_S = 0.2
# Backoff before resending after a retryable error: 50 ms, doubling, at most 1 s.
_BACKOFF_S = 0.05
_BACKOFF_MAX_S = 1.0

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, np.ndarray]

_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"))

# The wire form clients ask for by default (docs/protocol.md 3.6): metric depth as uint16
# counts of 1 mm, every array zstd-compressed (lossless) unless the server is on this host.
COMPACT_DEPTH = {"output_dtype": "uint16", "compression": "zstd"}
_LOCAL_HOSTS = ("127.", "localhost", "[::1]", "::1")


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// to a loopback address: there,
    compressing costs more time than the bytes it saves (bench/compression.py)."""
    scheme, _, address = endpoint.partition("://")
    return scheme in ("ipc", "inproc") or scheme == "tcp" and address.startswith(_LOCAL_HOSTS)


def compact_defaults(method: str, endpoint: Optional[str] = None) -> dict:
    """The default wire options for `method` toward `endpoint`: uint16 (metric depth only;
    relative depth and server-side clouds keep their float dtype) and zstd, which is left
    out for a server on this host (`is_local_endpoint`)."""
    defaults = dict(COMPACT_DEPTH) if method == P.METRIC_DEPTH else {"compression": COMPACT_DEPTH["compression"]}
    if endpoint is not None and is_local_endpoint(endpoint):
        defaults["compression"] = "none"
    return defaults


_CHANNELS = ("bgr", "rgb")
_LOST = object()  # `_receive`: the connection dropped while we waited


# --- errors ---------------------------------------------------------------------------------


class ServerError(ZDepthError):
    """The server answered with an error reply. `code` is one of `protocol.ERROR_CODES`."""

    @property
    def retryable(self) -> bool:
        """True for codes after which the same request may succeed (overloaded, worker_lost, timeout)."""
        return self.code in P.RETRYABLE_CODES

    @classmethod
    def from_reply(cls, header: Mapping[str, Any]) -> "ServerError":
        error = header.get("error")
        error = error if isinstance(error, Mapping) else {}
        code, message = error.get("code"), str(error.get("message", ""))
        if code not in P.ERROR_CODES:  # a newer or broken server: keep what it said
            code, message = P.INTERNAL, f"error reply with unknown code {code!r}: {message}"
        return cls(code, message)


class Timeout(ZDepthError, TimeoutError):
    """No reply within the client's timeout, after all retries. Also a builtin `TimeoutError`.

    Distinct from a `ServerError` with code ``timeout``, which means the server answered that
    the request's deadline passed on its side."""

    def __init__(self, message: str):
        super().__init__(P.TIMEOUT, message)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Result:
    """What every prediction reply carries besides its arrays."""

    min: Optional[float]
    max: Optional[float]
    model: Optional[str]  # e.g. "vits_hypersim"
    worker: Optional[str]
    timing: dict  # decode_ms, inference_ms, post_ms on the worker
    header: dict = field(repr=False)  # the full reply header

    @staticmethod
    def fields_from(header: Mapping[str, Any]) -> dict:
        return {
            "min": header.get("min"),
            "max": header.get("max"),
            "model": header.get("model"),
            "worker": header.get("worker"),
            "timing": header.get("timing") or {},
            "header": dict(header),
        }


@dataclass(frozen=True, eq=False)
class DepthResult(Result):
    """`depth`: float32 (H, W), metres for metric_depth (0 = no valid depth), 0..1 for rel_depth,
    whatever the wire form was. `counts`: the uint16 counts of `scale` metres as received
    when the reply was uint16 (else None); `out_of_range`: pixels sent as 0 because they did
    not fit in 1..65535 counts."""

    depth: np.ndarray = field(repr=False)
    counts: Optional[np.ndarray] = field(default=None, repr=False)
    scale: float = 1.0
    out_of_range: int = 0

    @property
    def shape(self) -> tuple:
        return self.depth.shape


@dataclass(frozen=True, eq=False)
class PointCloudResult(Result):
    """`points`: float32 (H*W, 3), row-major pixel order, x right, y down, z forward (metres);
    `colors`: uint8 RGB (H*W, 3) when asked for; `depth`: the (H, W) map the points were
    rebuilt from when they were computed on the client (the default), else None. Pixels
    without valid depth (count 0) give the point (0, 0, 0)."""

    points: np.ndarray = field(repr=False)
    colors: Optional[np.ndarray] = field(default=None, repr=False)
    depth: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def shape(self) -> tuple:
        return self.points.shape


# --- arguments -> wire ----------------------------------------------------------------------


def sniff_format(data: Union[bytes, bytearray, memoryview]) -> str:
    """ "jpeg" or "png" from the magic bytes, so callers never have to say which."""
    head = bytes(data[:8])
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    raise ValueError("image bytes are neither JPEG nor PNG; pass a numpy uint8 (H, W, 3) array for raw pixels")


def check_pixels(array: np.ndarray) -> np.ndarray:
    """A C-contiguous uint8 (H, W, 3) array (copied only when the input is not contiguous)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"an image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def check_channels(channels: str) -> str:
    if channels not in _CHANNELS:
        raise ValueError(f"channels must be 'bgr' or 'rgb', got {channels!r}")
    return channels


def image_message(image: ImageInput, channels: str = "bgr") -> tuple[dict, list]:
    """An image argument -> (header fields, frames after the header).

    - bytes: JPEG or PNG, format sniffed from the magic bytes, sent as they are.
    - str / Path: a file, read and sent as it is (no decode, no re-encode); a str starting
      with http:// or https:// goes as `image_url` (the server must allow URL fetching).
    - numpy uint8 (H, W, 3): sent as a raw frame without copying; `channels` says whether
      it is BGR (OpenCV's order, the default) or RGB. Do not write to the array until the
      call returns.
    """
    if isinstance(image, np.ndarray):
        array = check_pixels(image)
        desc = {"frame": 1, "format": "raw", "shape": list(array.shape), "channels": check_channels(channels)}
        return {"image": desc}, [memoryview(array).cast("B")]
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return {"image_url": image}, []
    if isinstance(image, (str, os.PathLike)):
        data: Any = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = image
    else:
        raise TypeError(f"image must be JPEG/PNG bytes, a file path or a numpy uint8 array, got {type(image).__name__}")
    return {"image": {"frame": 1, "format": sniff_format(data)}}, [data]


def encode_array(array: np.ndarray, format: str = "jpeg", channels: str = "bgr", quality: int = 90) -> bytes:
    """A uint8 (H, W, 3) array -> JPEG or PNG bytes, with PIL (imported here, so it stays optional).

    Worth it over a slow link: a 640x480 JPEG is ~50 kB against 921 kB raw."""
    array = check_pixels(array)
    if check_channels(channels) == "bgr":
        array = np.ascontiguousarray(array[..., ::-1])
    fmt = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}.get(format.lower())
    if fmt is None:
        raise ValueError(f"format must be 'jpeg' or 'png', got {format!r}")
    from PIL import Image  # optional dependency: only needed to encode arrays

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": int(quality)} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def rgb_pixels(fields: Mapping[str, Any], frames: Sequence) -> np.ndarray:
    """The colours of an image message as uint8 RGB (H*W, 3), pixel for pixel what the server's
    decoder (OpenCV IMREAD_COLOR, `zdepth.images`) gives, for clouds computed on the client:
    JPEG EXIF orientation applied, grey replicated, alpha dropped, 16-bit samples reduced to
    their high byte. Encoded images need Pillow (the `image` extra)."""
    desc = fields.get("image")
    if desc is None:
        raise ValueError("colours need the image itself; an image_url cannot be coloured on the client")
    if desc["format"] == "raw":
        pixels = np.frombuffer(frames[0], dtype=np.uint8).reshape(desc["shape"])
        if desc["channels"] == "bgr":
            pixels = pixels[..., ::-1]
        return np.ascontiguousarray(pixels).reshape(-1, 3)
    from PIL import Image, ImageOps  # optional dependency: only needed to decode for colours

    with Image.open(io.BytesIO(bytes(frames[0]))) as decoded:
        if decoded.format == "JPEG":
            decoded = ImageOps.exif_transpose(decoded)  # OpenCV applies the orientation tag to JPEGs
        if decoded.mode.startswith("I"):  # 16-bit grey: Pillow would clip to 255 where OpenCV keeps the high byte
            grey = (np.asarray(decoded).astype(np.uint32) >> 8).astype(np.uint8)
            pixels = np.repeat(grey[..., None], 3, axis=2)
        else:
            pixels = np.asarray(decoded.convert("RGB"))
    return np.ascontiguousarray(pixels).reshape(-1, 3)


def intrinsics_dict(value: Any) -> dict:
    """{fx, fy, cx, cy} as plain floats, from a mapping, an `Intrinsics`, or a 3x3 camera matrix K.

    Checked here with the server's own rules, so a bad value fails before any bytes are sent."""
    if isinstance(value, Intrinsics):
        value = dataclasses.asdict(value)
    elif isinstance(value, Mapping):
        value = {k: v.item() if isinstance(v, np.generic) else v for k, v in value.items()}
    else:
        k = np.asarray(value, dtype=np.float64)
        if k.shape != (3, 3):
            raise ValueError("intrinsics must be a mapping {fx, fy, cx, cy} or a 3x3 camera matrix K")
        value = {"fx": float(k[0, 0]), "fy": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2])}
    try:
        return dataclasses.asdict(check_intrinsics(value))
    except ZDepthError as exc:
        raise ValueError(exc.message) from None


def depth_result(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> DepthResult:
    """A `metric_depth` / `rel_depth` reply in any wire form -> `DepthResult` in float32."""
    depth, desc = arrays["depth"], header["arrays"]["depth"]
    counts = depth if depth.dtype == np.uint16 else None
    return DepthResult(
        depth=to_metres(depth, desc),
        counts=counts,
        scale=float(desc.get("scale", 1.0)),
        out_of_range=int(header.get("out_of_range") or 0),
        **Result.fields_from(header),
    )


def _public(header: Mapping[str, Any]) -> dict:
    """A reply header without the envelope fields every reply has."""
    return {k: v for k, v in header.items() if k not in ("v", "id", "ok")}


# --- the client -----------------------------------------------------------------------------


class DepthClient:
    """A connection to a zdepth broker: request/reply over a DEALER socket.

    `timeout` (seconds) is each call's total budget, retries included, and each try may use
    all of the time that is left: a slow result is waited for, not cut short and recomputed.
    Every method is idempotent, so a call is sent again, up to `retries` times, when the
    server answers with a retryable code that comes back early (overloaded, worker_lost,
    shutting_down), after a backoff. Its `timeout` answer is not retried: it means the budget
    is spent. Each try tells the server a slightly shorter deadline (`timeout_ms`), so it
    drops work nobody waits for any more and its `timeout` answer still reaches us. When the
    connection drops while a reply is awaited (a broker restart loses what it held), the
    request is sent again at once on a fresh socket, as a retry. When no reply comes at all,
    the socket is replaced by a fresh one for the next call (the Lazy Pirate pattern), since
    the peer may be gone.

    `encoder`, `dataset` and `input_size` are defaults for every prediction; a call's own
    options win. `server_key` / `client_keys` turn on CURVE encryption (see
    `clients.security`); every socket the client makes, including the fresh ones of a
    retry, uses the same keys. Safe to share between threads (calls are serialised); use
    one client per thread to run requests concurrently.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        key: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        encoder: Optional[str] = None,
        dataset: Optional[str] = None,
        input_size: Optional[int] = None,
        *,
        server_key: Optional[KeyInput] = None,
        client_keys: Optional[ClientKeysInput] = None,
        context: Optional[zmq.Context] = None,
    ):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.endpoint = endpoint
        self.key = key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.defaults = {
            k: v for k, v in (("encoder", encoder), ("dataset", dataset), ("input_size", input_size)) if v is not None
        }
        self._curve = curve_keys(server_key, client_keys)
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._socket: Optional[zmq.Socket] = self._connect()

    def __repr__(self) -> str:
        return f"DepthClient({self.endpoint!r}, timeout={self.timeout:g}, retries={self.retries})"

    def __enter__(self) -> "DepthClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket at once, dropping anything unsent (LINGER 0). Idempotent."""
        with self._lock:
            self._close_socket()

    # -- broker methods ----------------------------------------------------------------------

    def health(self, *, timeout: Optional[float] = None) -> dict:
        """status ("healthy" | "degraded" | "not_ready" | "no_workers" | "draining"), live, ready,
        workers, queue (docs/protocol.md section 8). Needs no key."""
        return _public(self.request(P.HEALTH, timeout=timeout)[0])

    def describe(self, *, timeout: Optional[float] = None) -> dict:
        """The protocol schema the server speaks: methods, fields, error codes. Needs no key."""
        return self.request(P.DESCRIBE, timeout=timeout)[0].get("schema", {})

    def stats(self, *, timeout: Optional[float] = None) -> dict:
        """Counters, error counts by code, latency percentiles, queues and streams."""
        return _public(self.request(P.STATS, timeout=timeout)[0])

    # -- predictions -------------------------------------------------------------------------

    def metric_depth(
        self,
        image: ImageInput,
        max_depth: Optional[float] = None,
        *,
        channels: str = "bgr",
        timeout: Optional[float] = None,
        **opts: Any,
    ) -> DepthResult:
        """Depth in metres, float32 (H, W). `max_depth` defaults to the dataset's range (20 m
        hypersim, 80 m vkitti). `opts`: encoder, dataset, input_size, output_dtype,
        depth_scale, compression.

        By default the depth travels compact: uint16 counts of 1 mm (2 mm for max_depth over
        65.535 m), half of float32's bytes, and zstd on top (a sixth or less) unless the server
        is on this host; at most half a count off (`result.counts`, `result.scale`).
        ``output_dtype="float32", compression="none"`` gets the model's exact float32 output."""
        opts = {**compact_defaults(P.METRIC_DEPTH, self.endpoint), **opts}
        return depth_result(
            *self._predict(P.METRIC_DEPTH, image_message(image, channels), timeout, max_depth=max_depth, **opts)
        )

    def relative_depth(
        self, image: ImageInput, *, channels: str = "bgr", timeout: Optional[float] = None, **opts: Any
    ) -> DepthResult:
        """Relative depth, float32 (H, W): the metric model scaled to 0..1 (max_depth = 1), or
        the relative checkpoint's disparity with ``dataset="relative"``. Sent zstd-compressed
        (lossless) by default unless the server is on this host; uint16 is refused for relative depth."""
        opts = {**compact_defaults(P.REL_DEPTH, self.endpoint), **opts}
        return depth_result(*self._predict(P.REL_DEPTH, image_message(image, channels), timeout, **opts))

    def pointcloud(
        self,
        image: ImageInput,
        intrinsics: Any = None,
        max_depth: Optional[float] = None,
        with_color: bool = False,
        *,
        camera_info: Any = None,
        server_side: bool = False,
        channels: str = "bgr",
        timeout: Optional[float] = None,
        **opts: Any,
    ) -> PointCloudResult:
        """A point cloud, float32 (H*W, 3) in metres. `intrinsics`: {fx, fy, cx, cy} or a 3x3
        matrix K, in pixels of the image as sent; or, instead, `camera_info`: a ROS CameraInfo-shaped
        map {k, width, height, d, distortion_model} whose K is scaled to the image's size by
        `zdepth.camera.resolve_intrinsics` (the rule the server applies; bad_request if the sizes
        differ by more than one uniform scale or d is non-zero).

        By default the server sends compact depth (uint16 mm, + zstd, see `metric_depth`) and
        the cloud is rebuilt here with `zdepth.geometry.unproject`, the server's own formula:
        a twentieth of the bytes of a float32 cloud. Each point is then off by at most half a
        count in z (0.5 mm by default) and the same relative amount in x and y; pixels without
        valid depth are (0, 0, 0). `with_color` colours come from decoding the image here
        exactly as the server does (Pillow for JPEG/PNG; needs the `image` extra).

        ``server_side=True`` asks for the server's float32 cloud instead (exact, 3.7 MB for
        640x480; `opts` may add output_dtype float16 and compression)."""
        if (intrinsics is None) == (camera_info is None):
            raise ValueError("give exactly one of intrinsics and camera_info")
        camera = (
            {"camera_info": camera_info_field(camera_info)}
            if camera_info is not None
            else {"intrinsics": intrinsics_dict(intrinsics)}
        )
        message = image_message(image, channels)
        if not server_side:
            colors = (
                rgb_pixels(*message) if with_color else None
            )  # before the request: a decode error costs no round trip
            opts = {**compact_defaults(P.METRIC_DEPTH, self.endpoint), **opts}
            depth = depth_result(*self._predict(P.METRIC_DEPTH, message, timeout, max_depth=max_depth, **opts))
            fields = Result.fields_from(depth.header)
            k = resolve_intrinsics(camera.get("intrinsics"), camera.get("camera_info"), *depth.depth.shape)
            return PointCloudResult(points=unproject(depth.depth, k), colors=colors, depth=depth.depth, **fields)
        header, arrays = self._predict(
            P.POINTCLOUD, message, timeout, **camera, max_depth=max_depth, with_color=bool(with_color), **opts
        )
        points = to_metres(arrays["points"], header["arrays"]["points"])
        return PointCloudResult(points=points, colors=arrays.get("colors"), **Result.fields_from(header))

    def _predict(
        self, method: str, message: tuple[dict, list], timeout: Optional[float], **opts: Any
    ) -> tuple[dict, dict]:
        allowed = set(P.SCHEMA["methods"][method]["fields"]) - {"image", "image_url"}
        unknown = sorted(set(opts) - allowed)
        if unknown:  # a typo like input_sise would otherwise be silently ignored by the server
            raise TypeError(f"{method} got unknown option(s) {unknown}; options are {sorted(allowed)}")
        image_fields, frames = message
        fields = {**self.defaults, **{k: v for k, v in opts.items() if v is not None}, **image_fields}
        return self.request(method, fields, frames, timeout=timeout)

    # -- the wire ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        header_fields: Optional[Mapping[str, Any]] = None,
        frames: Iterable = (),
        *,
        timeout: Optional[float] = None,
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """Send one request and return the reply's (header, arrays).

        `header_fields` go into the request header next to v, method, id, key and timeout_ms;
        `frames` follow the header (the first is frame 1 in `{frame: 1, ...}` descriptors).
        Raises `ServerError` for an error reply and `Timeout` when no reply comes in time.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        frames = list(frames)
        tries = self.retries + 1
        with self._lock:
            if self._socket is None:
                raise RuntimeError("the client is closed")
            request_id = next(self._ids)
            last_error: Optional[ServerError] = None
            sent = 0
            for attempt in range(tries):
                wait = deadline - time.monotonic()  # every try may use all the time left
                if wait <= 0:
                    break
                server_wait = wait - min(_SERVER_MARGIN_S, wait / 5)
                header = P.request_header(
                    method,
                    id=request_id,
                    key=self.key,
                    timeout_ms=max(1, int(server_wait * 1000)),
                    **(header_fields or {}),
                )
                self._socket.send_multipart([b"", P.packb(header), *frames], copy=False)
                sent += 1
                reply = self._receive(request_id, wait)
                if reply is None or reply is _LOST:
                    # Lazy Pirate: a fresh socket. After a timeout the budget is spent; after the
                    # connection dropped (a broker restart loses what it held) the request is resent.
                    self._close_socket()
                    self._socket = self._connect()
                    if reply is None:
                        break
                    continue
                header, arrays = reply
                if header.get("ok") is True:
                    return header, arrays
                last_error = ServerError.from_reply(header)
                if (
                    not last_error.retryable or last_error.code == P.TIMEOUT
                ):  # the server's timeout: the budget is spent
                    raise last_error
                time.sleep(max(0.0, min(_BACKOFF_S * 2**attempt, _BACKOFF_MAX_S, deadline - time.monotonic())))
            if last_error is not None:
                raise last_error
            hint = (
                " (CURVE is on: a wrong server_key or a client key the server does not allow also looks like this)"
                if self._curve
                else ""
            )
            raise Timeout(
                f"no reply from {self.endpoint} to {method} within {timeout:g} s ({sent} {'try' if sent == 1 else 'tries'}){hint}"
            )

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        socket.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:P and IPv6 host names
        if self._curve is not None:
            self._curve.apply(socket)
        try:
            socket.connect(self.endpoint)
        except zmq.ZMQError:
            socket.close(linger=0)
            raise
        # Tells us when an established connection drops, so a request the broker took with it is resent.
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return socket

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None

    def _receive(self, request_id: int, wait: float) -> Any:
        """The reply to `request_id` within `wait` seconds; `_LOST` when the connection dropped
        meanwhile; None when the time ran out. Replies with another id (to a request given up
        on earlier) are stale and dropped."""
        deadline = time.monotonic() + wait
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            events = dict(poller.poll(math.ceil(remaining * 1000))) if remaining > 0 else {}
            if not events:
                return None
            if self._monitor in events:
                self._monitor.recv_multipart()
                return _LOST
            frames = self._socket.recv_multipart(copy=False)
            try:
                _, body = P.split_envelope(frames)
                header, arrays = P.unpack(body)
            except ZDepthError as exc:
                raise ServerError(P.INTERNAL, f"malformed reply from {self.endpoint}: {exc.message}") from None
            if header.get("id") == request_id:
                return header, arrays
