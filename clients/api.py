"""The old HTTP client's functions (`client/depth_client.py`), same names and meanings, over ZeroMQ.

    from clients.api import encode_image, predict_pointcloud, decode_pointcloud

    result = predict_pointcloud("frame.jpg", {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5},
                                server="lab", max_depth=10.0)
    points = decode_pointcloud(result["pointcloud"], result["shape"])   # already an ndarray

What changed for callers migrating from the HTTP API:
- `server` replaces `base_url`: a ZeroMQ endpoint (``tcp://host:5555``) or a profile name from
  servers.yaml (see `clients.profiles`).
- Images are bytes, a file path or a numpy array; no base64. `encode_image` returns bytes.
- Results hold numpy arrays (`pointcloud`, `depth_map`) instead of base64 strings and PNG
  data URLs; `decode_pointcloud` still accepts the old base64 strings.

Each function is a thin wrapper over `DepthClient`, so `timeout` (seconds) is the call's whole
budget, retries included, as there. One client per (endpoint, key, CURVE
keys) is cached and reused, so calling these in a loop does not reconnect. `server_key` and
`client_keys` turn on CURVE encryption (see `clients.security`); a profile's own
`server_key_file` / `client_key_file` are used when they are not given.
"""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .client import DEFAULT_ENDPOINT, DEFAULT_TIMEOUT, DepthClient, DepthResult, ImageInput, Result, encode_array
from .profiles import get_profile
from .security import ClientKeysInput, KeyInput

DEFAULT_SERVER = DEFAULT_ENDPOINT

_clients: dict[tuple, DepthClient] = {}
_clients_pid = os.getpid()
_clients_lock = threading.Lock()


def encode_image(image: ImageInput, format: str = "jpeg", channels: str = "bgr", quality: int = 90) -> bytes:
    """Image bytes ready to send: a file path gives the file's bytes as they are; a numpy uint8
    (H, W, 3) array is encoded as JPEG or PNG with PIL (`channels`: its order, bgr or rgb);
    bytes come back unchanged. (The HTTP client returned base64; bytes are what goes on the wire.)"""
    if isinstance(image, np.ndarray):
        return encode_array(image, format=format, channels=channels, quality=quality)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def predict_pointcloud(
    image: ImageInput,
    camera_intrinsics: Any,
    server: str = DEFAULT_SERVER,
    max_depth: Optional[float] = None,
    api_key: Optional[str] = None,
    encoder: Optional[str] = None,
    dataset: Optional[str] = None,
    model_input_size: Optional[int] = None,
    timeout: Optional[float] = None,
    server_key: Optional[KeyInput] = None,
    client_keys: Optional[ClientKeysInput] = None,
) -> dict:
    """Point cloud, like ``POST /pc``: {pointcloud: float32 (H*W, 3), shape, min, max, model, timing}.

    Unset model options come from the server profile, then the server's defaults (input 518)."""
    client, opts, timeout = _resolve(
        server, api_key, timeout, server_key, client_keys, encoder=encoder, dataset=dataset, input_size=model_input_size
    )
    result = client.pointcloud(image, camera_intrinsics, max_depth, timeout=timeout, **opts)
    return {"pointcloud": result.points, "shape": list(result.points.shape), **_summary(result)}


def predict_metric_depth(
    image: ImageInput,
    camera_intrinsics: Any = None,
    server: str = DEFAULT_SERVER,
    max_depth: Optional[float] = None,
    api_key: Optional[str] = None,
    encoder: Optional[str] = None,
    dataset: Optional[str] = None,
    model_input_size: Optional[int] = None,
    timeout: Optional[float] = None,
    server_key: Optional[KeyInput] = None,
    client_keys: Optional[ClientKeysInput] = None,
) -> dict:
    """Metric depth, like ``POST /metric_depth``: {depth_map: float32 (H, W) metres, shape, min,
    max, model, timing}. `camera_intrinsics` is accepted for compatibility; depth does not use it."""
    client, opts, timeout = _resolve(
        server, api_key, timeout, server_key, client_keys, encoder=encoder, dataset=dataset, input_size=model_input_size
    )
    return _depth_dict(client.metric_depth(image, max_depth, timeout=timeout, **opts))


def predict_relative_depth(
    image: ImageInput,
    camera_intrinsics: Any = None,
    server: str = DEFAULT_SERVER,
    api_key: Optional[str] = None,
    encoder: Optional[str] = None,
    dataset: Optional[str] = None,
    model_input_size: Optional[int] = None,
    timeout: Optional[float] = None,
    server_key: Optional[KeyInput] = None,
    client_keys: Optional[ClientKeysInput] = None,
) -> dict:
    """Relative depth, like ``POST /rel_depth`` (max_depth = 1): same keys as `predict_metric_depth`.
    `camera_intrinsics` is accepted for compatibility and unused."""
    client, opts, timeout = _resolve(
        server, api_key, timeout, server_key, client_keys, encoder=encoder, dataset=dataset, input_size=model_input_size
    )
    return _depth_dict(client.relative_depth(image, timeout=timeout, **opts))


def get_health(
    server: str = DEFAULT_SERVER,
    api_key: Optional[str] = None,
    timeout: Optional[float] = None,
    server_key: Optional[KeyInput] = None,
    client_keys: Optional[ClientKeysInput] = None,
) -> dict:
    """Server status, like ``GET /health`` (no key needed): status, workers, queue, plus the old
    API's `device` and `models_loaded`, summarised over the workers."""
    client, _, timeout = _resolve(server, api_key, timeout, server_key, client_keys)
    health = client.health(timeout=timeout)
    workers = [w for w in health.get("workers") or [] if isinstance(w, dict)]
    health.setdefault("device", ", ".join(sorted({str(w["device"]) for w in workers if "device" in w})) or None)
    health.setdefault("models_loaded", sorted({str(m) for w in workers for m in w.get("models") or []}))
    return health


def decode_pointcloud(
    pointcloud: Union[np.ndarray, bytes, bytearray, memoryview, str], shape: Optional[Sequence[int]] = None
) -> np.ndarray:
    """A point cloud as a float32 ndarray of `shape` (default (N, 3)).

    Takes the ndarray the new API returns (reshaped, not copied), raw float32 bytes, or the
    base64 string the HTTP API returned, so migrated code keeps working unchanged."""
    if isinstance(pointcloud, str):
        pointcloud = base64.b64decode(pointcloud, validate=True)
    if isinstance(pointcloud, (bytes, bytearray, memoryview)):
        pointcloud = np.frombuffer(pointcloud, dtype=np.float32)
    return np.asarray(pointcloud).reshape(tuple(shape) if shape is not None else (-1, 3))


def _summary(result: Result) -> dict:
    return {"min": result.min, "max": result.max, "model": result.model, "timing": result.timing}


def _depth_dict(result: DepthResult) -> dict:
    return {"depth_map": result.depth, "shape": list(result.depth.shape), **_summary(result)}


def _resolve(
    server: str,
    api_key: Optional[str],
    timeout: Optional[float],
    server_key: Optional[KeyInput] = None,
    client_keys: Optional[ClientKeysInput] = None,
    **model: Any,
) -> tuple[DepthClient, dict, float]:
    """(cached client, model options, timeout) for an endpoint or a profile name; explicit
    arguments win over the profile (CURVE keys as a whole: an explicit `server_key`
    replaces the profile's server and client keys)."""
    curve = {"server_key": server_key, "client_keys": client_keys}
    if "://" in server:
        endpoint, key, options, default_timeout = server, api_key, {}, DEFAULT_TIMEOUT
    else:
        profile = get_profile(server)
        endpoint, options = profile.endpoint, dict(profile.model)
        key = api_key if api_key is not None else profile.key()
        default_timeout = profile.timeout or DEFAULT_TIMEOUT
        if server_key is None and client_keys is None:
            curve = profile.curve_options()
    options.update({k: v for k, v in model.items() if v is not None})
    return _cached_client(endpoint, key, **curve), options, timeout if timeout is not None else default_timeout


def _cached_client(
    endpoint: str,
    key: Optional[str],
    server_key: Optional[KeyInput] = None,
    client_keys: Optional[ClientKeysInput] = None,
) -> DepthClient:
    global _clients_pid
    with _clients_lock:
        if _clients_pid != os.getpid():  # a forked child must not use its parent's sockets
            _clients.clear()
            _clients_pid = os.getpid()
        # A (public, secret) list becomes a tuple, so it can be part of the cache key.
        cache_key = (endpoint, key, server_key, tuple(client_keys) if isinstance(client_keys, list) else client_keys)
        client = _clients.get(cache_key)
        if client is None:
            client = _clients[cache_key] = DepthClient(
                endpoint, key=key, server_key=server_key, client_keys=client_keys
            )
        return client
