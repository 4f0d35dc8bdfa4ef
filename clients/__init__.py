"""zdepth clients: ask a zdepth server for depth from anywhere, with pyzmq, msgpack, numpy and zstandard only.

    from clients import DepthClient
    with DepthClient("tcp://gpu-server:5555") as client:
        depth = client.metric_depth("frame.jpg").depth

- `DepthClient`: request/reply with timeouts and retries (`clients.client`).
- The old HTTP client's functions: `predict_pointcloud`, `predict_metric_depth`,
  `predict_relative_depth`, `get_health`, `encode_image`, `decode_pointcloud` (`clients.api`).
- Live cameras: `CameraPublisher` and `DepthSubscriber` (`clients.stream`).
- Named servers from servers.yaml: `load_profiles`, `client_from_profile` (`clients.profiles`).

Importing this package never imports torch or OpenCV.
"""

from .api import (
    decode_pointcloud,
    encode_image,
    get_health,
    predict_metric_depth,
    predict_pointcloud,
    predict_relative_depth,
)
from .client import DepthClient, DepthResult, PointCloudResult, ServerError, Timeout
from .profiles import client_from_profile, load_profiles
from .stream import CameraPublisher, DepthSubscriber, StreamResult

__all__ = [
    "DepthClient",
    "DepthResult",
    "PointCloudResult",
    "ServerError",
    "Timeout",
    "encode_image",
    "predict_pointcloud",
    "predict_metric_depth",
    "predict_relative_depth",
    "get_health",
    "decode_pointcloud",
    "CameraPublisher",
    "DepthSubscriber",
    "StreamResult",
    "load_profiles",
    "client_from_profile",
]
