"""Wire protocol, version 1: the one module that broker, worker and clients all import.

A message is a ZeroMQ multipart message. Frame 0 is a msgpack map (the header); every array
or image travels as its own raw frame after it and is described in the header by
``{"frame": i, "dtype": "float32", "shape": [...]}`` (i counts from the header, so the first
frame after the header is 1). Arrays are never base64 and never pickled: received arrays are
read-only ``np.frombuffer`` views on the ZeroMQ frame.

Request/reply clients put an empty delimiter frame before the header (a REQ socket adds it
itself; a DEALER client sends it), so any language's plain REQ socket can talk to the broker.
The full specification for client writers is ``docs/protocol.md``; ``SCHEMA`` below is what
the ``describe`` method returns and must agree with it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import msgpack
import numpy as np
import zstandard

VERSION = 1

# --- client methods -------------------------------------------------------------------------
HEALTH = "health"
DESCRIBE = "describe"
STATS = "stats"
POINTCLOUD = "pointcloud"
METRIC_DEPTH = "metric_depth"
REL_DEPTH = "rel_depth"

PREDICT_METHODS = frozenset({POINTCLOUD, METRIC_DEPTH, REL_DEPTH})
BROKER_METHODS = frozenset({HEALTH, DESCRIBE, STATS})
METHODS = PREDICT_METHODS | BROKER_METHODS

# --- error codes (the complete, fixed set) --------------------------------------------------
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_METHOD = "unknown_method"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
WORKER_LOST = "worker_lost"
MODEL_UNAVAILABLE = "model_unavailable"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"

ERROR_CODES = {
    BAD_REQUEST: "the request is malformed or a parameter is invalid; the message says which",
    UNAUTHORIZED: "auth is on and the key is missing or wrong",
    UNSUPPORTED_VERSION: "the header's `v` is not a protocol version this server speaks",
    UNKNOWN_METHOD: "the method is not one of `describe`'s methods",
    TOO_LARGE: "the message or image exceeds a size limit; the message names the limit",
    RATE_LIMITED: "this key sent more requests than its rate limit allows; retry later",
    OVERLOADED: "the wait queue, the byte budget or the stream table is full; retry later",
    TIMEOUT: "the request's deadline (`timeout_ms`) passed before a result was ready",
    WORKER_LOST: "the worker computing the request died or hung; safe to retry",
    MODEL_UNAVAILABLE: "the requested encoder/dataset has no checkpoint on the worker",
    SHUTTING_DOWN: "the server is draining before it exits (SIGTERM/SIGINT); retry on another server or after its restart",
    INTERNAL: "an unexpected server error; the message says what failed",
}

# Codes after which sending the same request again may succeed.
RETRYABLE_CODES = frozenset({OVERLOADED, WORKER_LOST, TIMEOUT, SHUTTING_DOWN})

# --- model names ----------------------------------------------------------------------------
ENCODERS = ("vits", "vitb", "vitl", "vitg")
DATASETS = ("hypersim", "vkitti", "relative")
DEFAULT_ENCODER = "vits"
DEFAULT_DATASET = "hypersim"
METRIC_DATASETS = ("hypersim", "vkitti")
# The range each metric checkpoint was trained for: the default max_depth, in metres.
DEFAULT_MAX_DEPTH = {"hypersim": 20.0, "vkitti": 80.0}
DEFAULT_INPUT_SIZE = 518
PATCH_SIZE = 14
MIN_INPUT_SIZE = 4 * PATCH_SIZE  # 56
MAX_INPUT_SIZE = 128 * PATCH_SIZE  # 1792
# The official pre-processing normalises RGB in [0, 1] with ImageNet's mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FORMATS = ("jpeg", "png", "raw")
OUTPUT_DTYPES = ("float32", "float16", "uint16")
FLOAT16_MAX = 65504.0  # the largest finite IEEE binary16 value

# --- compact depth (uint16 counts) and array compression ------------------------------------
# uint16 depth counts `depth_scale` metres each; 0 means no valid depth (ROS REP 118, 16UC1).
DEFAULT_DEPTH_SCALE = 0.001  # 1 mm, the ROS 16UC1 / RealSense z16 convention
MIN_DEPTH_SCALE = 1e-6
MAX_DEPTH_SCALE = 1000.0
DEPTH_COUNT_MAX = 65535
COMPRESSIONS = ("none", "zstd")
# Pre-filters undone after decompression: delta_row stores each uint16 row as its first value
# followed by differences mod 65536 (smooth depth becomes small numbers that zstd packs well).
FILTERS = ("none", "delta_row")
# Level 1 measured best for latency: higher levels shrink depth by a few % at 2-5x the time
# (bench/compression.py).
ZSTD_LEVEL = 1
# The most bytes one compressed reply frame may inflate to: a float32 (H*W, 3) cloud at the
# 4096x4096 pixel cap is 201 MB.
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024

# --- transport defaults ---------------------------------------------------------------------
DEFAULT_PORT = 5555  # request/reply frontend (ROUTER)
STREAM_PORT_OFFSET = 1  # camera ingress (PULL)
PUB_PORT_OFFSET = 2  # stream results (PUB)
BACKEND_PORT_OFFSET = 3  # workers (ROUTER)
IMAGEZMQ_PORT_OFFSET = 4  # optional imagezmq ingress (REP)


def tcp_endpoint(host: str, port: int) -> str:
    """tcp://HOST:PORT; an IPv6 address goes in brackets (``::1`` or ``[::1]`` -> tcp://[::1]:PORT).
    Sockets that bind or connect to one need the zmq.IPV6 option."""
    host = host.strip("[]")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


FLUSH_LINGER_MS = 1000  # how long the last answers may take to leave a socket closed on shutdown


class Ports(NamedTuple):
    """The ports of one server, from its request port P (`port_layout`)."""

    request: int  # P: request/reply frontend (ROUTER)
    stream: int  # P+1: camera ingress (PULL)
    pub: int  # P+2: stream results (PUB)
    backend: int  # P+3: workers (ROUTER)
    imagezmq: int  # P+4: optional imagezmq ingress (REP)


def port_layout(port: int = DEFAULT_PORT) -> Ports:
    """Every port of a server whose request port is `port`: the one place the layout is spelled."""
    return Ports(
        port, port + STREAM_PORT_OFFSET, port + PUB_PORT_OFFSET, port + BACKEND_PORT_OFFSET, port + IMAGEZMQ_PORT_OFFSET
    )


# --- broker <-> worker (backend) ------------------------------------------------------------
# Frames after the worker's routing id: [WORKER_PROTOCOL, command, ...]
WORKER_PROTOCOL = b"ZDW1"
W_READY = b"\x01"  # worker -> broker: [.., msgpack{device, models, capacity, ...}]
W_REQUEST = b"\x02"  # broker -> worker: [.., msgpack{t: ticket, budget_ms}, header, *frames]
W_REPLY = b"\x03"  # worker -> broker: [.., msgpack{t: ticket}, header, *frames]
W_HEARTBEAT = b"\x04"  # both ways: [..] from the broker, [.., msgpack{models, served}] from the worker
W_DISCONNECT = b"\x05"  # both ways: the peer should forget us (worker: re-register)
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3  # missed intervals before a silent peer counts as dead
HANG_TIMEOUT_S = 120.0  # one compute call longer than this: its worker counts as hung (far above a slow CPU pass)

# --- limits ---------------------------------------------------------------------------------
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAY_DIMS = 4
MAX_ARRAY_DIM = (1 << 31) - 1  # per dimension: numpy refuses far larger ones, even of empty arrays
MAX_FRAMES = 16  # frames in one request after the envelope: the header and a few data frames
MAX_IMAGE_PIXELS = 4096 * 4096  # default cap on raw shapes (broker) and decoded image sizes (worker)
WIRE_DTYPES = frozenset({"uint8", "uint16", "int32", "float16", "float32", "float64"})
STREAM_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
STREAM_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/-]")


class ZDepthError(Exception):
    """An error with one of the protocol's codes; the server sends it back as `error`."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def bad_request(message: str) -> ZDepthError:
    return ZDepthError(BAD_REQUEST, message)


def short_repr(value: Any, limit: int = 80) -> str:
    """repr of a value from the wire, cut short: error messages must not echo 64 kB back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- encoding -------------------------------------------------------------------------------


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes | memoryview) -> Any:
    """Decode a small msgpack frame. Ext types (where other libraries hide pickle) are refused."""
    if len(data) > MAX_HEADER_BYTES:
        raise ZDepthError(TOO_LARGE, f"header frame is {len(data)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ZDepthError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise bad_request(f"header is not valid msgpack ({type(exc).__name__})") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise bad_request(f"msgpack extension type {code} is not allowed")


def describe_array(frame: int, array: np.ndarray) -> dict:
    return {"frame": frame, "dtype": array.dtype.name, "shape": list(array.shape)}


def delta_rows(array: np.ndarray) -> np.ndarray:
    """The `delta_row` filter: uint16 (..., W) -> first value of each row, then differences
    mod 65536. Inverse: `undelta_rows`."""
    deltas = np.empty_like(array)
    deltas[..., :1] = array[..., :1]
    np.subtract(array[..., 1:], array[..., :-1], out=deltas[..., 1:])  # uint16 arithmetic wraps mod 65536
    return deltas


def undelta_rows(deltas: np.ndarray) -> np.ndarray:
    """Undo `delta_rows`: a running sum along each row, mod 65536."""
    return np.cumsum(deltas, axis=-1, dtype=np.uint16)


def pack(
    header: Mapping[str, Any],
    arrays: Optional[Mapping[str, np.ndarray]] = None,
    *,
    compression: str = "none",
    scales: Optional[Mapping[str, float]] = None,
) -> list:
    """Header plus arrays -> frames, the header's ``arrays`` filled in by `pack_arrays`.
    Send the result with ``send_multipart(..., copy=False)``."""
    header = dict(header)
    frames: list = []
    if arrays:
        header["arrays"], frames = pack_arrays(arrays, compression=compression, scales=scales)
    return [packb(header), *frames]


def pack_arrays(
    arrays: Mapping[str, np.ndarray], *, compression: str = "none", scales: Optional[Mapping[str, float]] = None
) -> tuple[dict, list]:
    """Arrays -> (descriptors for the header's ``arrays``, data frames 1..n).

    Each descriptor is {frame, dtype, shape, compression, filter}, plus ``scale`` for the
    arrays named in `scales` (value = stored number x scale). ``compression="none"`` sends
    each array's own memory (zero-copy); ``"zstd"`` sends one zstd frame per array (RFC 8878,
    content size in the frame header), after the `delta_row` filter for 2-D uint16 arrays.
    Raises ValueError for a dtype that cannot go on the wire or an unknown compression."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compression == "zstd" else None
    described, frames = {}, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in WIRE_DTYPES:
            raise ValueError(f"dtype {array.dtype} cannot go on the wire")
        desc = describe_array(len(frames) + 1, array)
        desc["compression"], desc["filter"] = compression, "none"
        if scales and name in scales:
            desc["scale"] = float(scales[name])
        if compressor is not None and array.dtype == np.uint16 and array.ndim == 2:
            array, desc["filter"] = delta_rows(array), "delta_row"
        data = memoryview(array).cast("B") if array.size else b""
        frames.append(compressor.compress(data) if compressor is not None else data)
        described[name] = desc
    return described, frames


def unpack(frames: Sequence) -> tuple[dict, dict[str, np.ndarray]]:
    """Frames (header first) -> (header, arrays). The inverse of `pack`."""
    header = decode_header(frames[0])
    arrays = {}
    described = header.get("arrays") or {}
    if not isinstance(described, dict):
        raise bad_request("`arrays` must be a map")
    for name, desc in described.items():
        arrays[name] = array_from_frames(desc, frames, what=f"array {name!r}")
    return header, arrays


def decode_header(frame: Any) -> dict:
    header = unpackb(frame_buffer(frame))
    if not isinstance(header, dict):
        raise bad_request(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def frame_buffer(frame: Any) -> memoryview | bytes:
    """bytes, or the zero-copy buffer of a zmq.Frame."""
    return frame.buffer if hasattr(frame, "buffer") else frame


def frame_index(desc: Any, n_frames: int, what: str) -> int:
    if not isinstance(desc, dict):
        raise bad_request(f"{what} must be a map like {{frame, dtype, shape}}")
    index = desc.get("frame")
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index < n_frames:
        raise bad_request(f"{what}: `frame` must be an integer from 1 to {n_frames - 1}, got {index!r}")
    return index


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= MAX_ARRAY_DIMS:
        raise bad_request(f"{what}: `shape` must be a list of 1 to {MAX_ARRAY_DIMS} integers")
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_ARRAY_DIM for n in shape):
        raise bad_request(f"{what}: `shape` must hold integers from 0 to {MAX_ARRAY_DIM}, got {short_repr(shape)}")
    return tuple(shape)


def array_from_frames(desc: Any, frames: Sequence, what: str = "array") -> np.ndarray:
    """The array the descriptor `desc` points at, read-only, after checking dtype, shape and size.

    Uncompressed: a view on the frame. ``compression: "zstd"``: the frame is inflated to at
    most the declared dtype x shape bytes, never more (anything else is `bad_request`), then
    the `filter` is undone. Values are as stored: multiply by ``desc["scale"]`` for metres."""
    index = frame_index(desc, len(frames), what)
    dtype = desc.get("dtype")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise bad_request(f"{what}: `dtype` must be one of {sorted(WIRE_DTYPES)}, got {short_repr(dtype)}")
    shape = check_shape(desc.get("shape"), what)
    compression = desc.get("compression") or "none"
    filter_ = desc.get("filter") or "none"
    if compression not in COMPRESSIONS:
        raise bad_request(f"{what}: `compression` must be one of {list(COMPRESSIONS)}, got {short_repr(compression)}")
    if filter_ not in FILTERS or filter_ == "delta_row" and dtype != "uint16":
        raise bad_request(
            f"{what}: `filter` must be none, or delta_row on uint16, got {short_repr(filter_)} on {dtype}"
        )
    buffer = frame_buffer(frames[index])
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: a huge shape cannot wrap to a small size
    if compression == "zstd":
        buffer = _inflate(buffer, expected, f"{what} (frame {index})")
    elif len(buffer) != expected:
        raise bad_request(
            f"{what}: shape {list(shape)} of {dtype} needs {expected} bytes, frame {index} has {len(buffer)}"
        )
    try:
        array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. [0, 2**30, 2**30, 2**30]: no bytes, but numpy refuses the shape itself
        raise bad_request(f"{what}: numpy cannot make an array of shape {short_repr(list(shape))}") from None
    if filter_ == "delta_row":
        array = undelta_rows(array)
    array.flags.writeable = False  # a view on the message (or on our only copy): copy it to write
    return array


def _inflate(buffer: Any, expected: int, what: str) -> bytes:
    """One zstd frame -> exactly `expected` bytes; never allocates or writes more than that."""
    if expected > MAX_DECOMPRESSED_BYTES:
        raise ZDepthError(TOO_LARGE, f"{what}: {expected} bytes declared; the limit is {MAX_DECOMPRESSED_BYTES}")
    try:
        declared = zstandard.frame_content_size(buffer)
        if declared not in (-1, expected):
            raise bad_request(f"{what}: the zstd frame holds {declared} bytes, but dtype x shape is {expected}")
        # With a declared size, zstd decodes into a buffer of exactly that size and fails on overflow;
        # without one, max_output_size caps the output.
        data = zstandard.ZstdDecompressor().decompress(buffer, max_output_size=max(expected, 1), allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise bad_request(f"{what}: not one valid zstd frame of at most {expected} bytes ({exc})") from None
    if len(data) != expected:
        raise bad_request(f"{what}: inflated to {len(data)} bytes, but dtype x shape is {expected}")
    return data


# --- headers --------------------------------------------------------------------------------


def request_header(
    method: str, id: Any = None, key: Optional[str] = None, timeout_ms: Optional[int] = None, **fields: Any
) -> dict:
    header = {"v": VERSION, "method": method, "id": id}
    if key is not None:
        header["key"] = key
    if timeout_ms is not None:
        header["timeout_ms"] = int(timeout_ms)
    header.update({k: v for k, v in fields.items() if v is not None})
    return header


def ok_header(id: Any, **fields: Any) -> dict:
    return {"v": VERSION, "id": id, "ok": True, **fields}


def error_header(id: Any, code: str, message: str) -> dict:
    if code not in ERROR_CODES:
        code, message = INTERNAL, f"unknown error code {code!r}: {message}"
    return {"v": VERSION, "id": id, "ok": False, "error": {"code": code, "message": message}}


def error_frames(id: Any, error: ZDepthError) -> list:
    return [packb(error_header(id, error.code, error.message))]


def safe_id(header: Any) -> Any:
    """The correlation id to echo: only plain scalars, so a reply can always be encoded."""
    if isinstance(header, dict):
        value = header.get("id")
        if value is None or isinstance(value, (int, str, bytes, float)) and not isinstance(value, bool):
            if not isinstance(value, (str, bytes)) or len(value) <= 256:
                return value
    return None


def check_envelope_header(header: dict) -> str:
    """The checks every request passes before anything else: version and method. Returns the method."""
    version = header.get("v")
    if version != VERSION:
        raise ZDepthError(
            UNSUPPORTED_VERSION,
            f"protocol version {short_repr(version)} is not supported; this server speaks v{VERSION}",
        )
    method = header.get("method")
    if not isinstance(method, str):
        raise bad_request("`method` must be a string")
    if method not in METHODS:
        raise ZDepthError(UNKNOWN_METHOD, f"unknown method {short_repr(method)}; methods are {sorted(METHODS)}")
    timeout_ms = header.get("timeout_ms")
    if timeout_ms is not None and (
        not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool) or not 0 < timeout_ms <= 3_600_000
    ):
        raise bad_request(f"`timeout_ms` must be a number in (0, 3600000], got {short_repr(timeout_ms)}")
    key = header.get("key")
    if key is not None and not isinstance(key, str):
        raise bad_request("`key` must be a string")
    return method


def split_envelope(frames: Sequence) -> tuple[list, list]:
    """ROUTER frames -> (envelope up to and including the empty delimiter, body)."""
    for i, frame in enumerate(frames):
        if len(frame_buffer(frame)) == 0:
            return list(frames[: i + 1]), list(frames[i + 1 :])
        if i >= 8:  # no sane route is this deep
            break
    raise bad_request("no empty delimiter frame before the header")


# --- the schema `describe` returns ----------------------------------------------------------

_METRIC_DATASET = {"type": "str", "enum": list(METRIC_DATASETS), "default": "hypersim"}
# uint16 counts are metric depth's form only: relative depth and clouds keep a float dtype.
_FLOAT_OUTPUT = {"type": "str", "enum": [d for d in OUTPUT_DTYPES if d.startswith("float")], "default": "float32"}
_PREDICT_FIELDS = {
    "image": {
        "type": "map",
        "required": "unless image_url",
        "doc": "{frame, format: jpeg|png|raw, shape: [H, W, 3] for raw, channels: bgr|rgb (raw only, default bgr)}",
    },
    "image_url": {"type": "str", "doc": "http(s) URL fetched by the worker; only when the operator allows the host"},
    "encoder": {"type": "str", "enum": list(ENCODERS), "default": "the server's --encoder"},
    "dataset": {"type": "str", "enum": list(DATASETS), "default": "hypersim"},
    "max_depth": {"type": "float", "doc": "> 0; default: 20 for hypersim, 80 for vkitti (metres)"},
    "input_size": {
        "type": "int",
        "default": DEFAULT_INPUT_SIZE,
        "doc": f"multiple of {PATCH_SIZE} in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}]",
    },
    "output_dtype": {
        "type": "str",
        "enum": list(OUTPUT_DTYPES),
        "default": "float32",
        "doc": "uint16: metric_depth only, counts of depth_scale metres, 0 = invalid; float16: refused when values exceed 65504",
    },
    "depth_scale": {
        "type": "float",
        "doc": f"metres per uint16 count, in [{MIN_DEPTH_SCALE:g}, {MAX_DEPTH_SCALE:g}]; default {DEFAULT_DEPTH_SCALE} "
        f"(1 mm), or the smallest multiple of it that holds max_depth in {DEPTH_COUNT_MAX} counts",
    },
    "compression": {
        "type": "str",
        "enum": list(COMPRESSIONS),
        "default": "none",
        "doc": "zstd: every reply array as one zstd frame",
    },
}

SCHEMA = {
    "version": VERSION,
    "common_fields": {
        "v": {"type": "int", "required": True, "doc": f"protocol version, {VERSION}"},
        "method": {"type": "str", "required": True},
        "id": {"type": "int|str|null", "doc": "correlation id, echoed in the reply"},
        "key": {"type": "str", "doc": "API key when auth is on (not needed for health/describe)"},
        "timeout_ms": {"type": "number", "doc": "deadline from the broker's receipt; past it the reply is `timeout`"},
    },
    "methods": {
        HEALTH: {"doc": "broker and worker status; no key needed", "fields": {}},
        DESCRIBE: {"doc": "this schema; no key needed", "fields": {}},
        STATS: {"doc": "counters, error counts by code, latency percentiles, queues, streams", "fields": {}},
        METRIC_DEPTH: {
            "doc": "metric depth in metres (Sigmoid x max_depth), arrays.depth float (H, W), plus min/max",
            "fields": dict(
                _PREDICT_FIELDS,
                dataset=_METRIC_DATASET,
                intrinsics={"type": "map", "doc": "optional {fx, fy, cx, cy}; ignored"},
                camera_info={"type": "map", "doc": "optional, as for pointcloud; validated, ignored"},
            ),
        },
        REL_DEPTH: {
            "doc": "metric model with max_depth = 1.0 (depth / max_depth); dataset relative: the relative checkpoint's disparity",
            "fields": dict(_PREDICT_FIELDS, output_dtype=_FLOAT_OUTPUT),
        },
        POINTCLOUD: {
            "doc": "arrays.points float (H*W, 3), row-major pixels, x right, y down, z forward; arrays.colors uint8 RGB when with_color",
            "fields": dict(
                _PREDICT_FIELDS,
                dataset=_METRIC_DATASET,
                output_dtype=_FLOAT_OUTPUT,
                intrinsics={
                    "type": "map",
                    "required": "unless camera_info",
                    "doc": "{fx, fy, cx, cy} in pixels of the image as sent; fx, fy > 0",
                },
                camera_info={
                    "type": "map",
                    "doc": "instead of intrinsics: ROS CameraInfo {k: 9 floats row-major, width, height, d, distortion_model}; "
                    "scaled to the image when it is a uniform resize (cx' = (cx + 0.5) s - 0.5); non-zero d refused",
                },
                with_color={"type": "bool", "default": False},
            ),
        },
    },
    "reply": {
        "ok": "bool",
        "id": "the request's id",
        "arrays": "map name -> {frame, dtype, shape, compression, filter, scale (depth and points: metres per stored unit)}",
        "out_of_range": "int, uint16 replies: pixels set to 0 because their depth did not fit in 1..65535 counts",
        "min": "float",
        "max": "float",
        "model": "str, e.g. vits_hypersim",
        "worker": "str",
        "timing": "map decode_ms, pre_ms, inference_ms, post_ms",
        "error": "map {code, message} when ok is false",
    },
    "error_codes": ERROR_CODES,
}


def check_stream_name(name: Any) -> str:
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
        raise bad_request("`stream` must be 1-64 characters from A-Z a-z 0-9 _ . : / -")
    return name
