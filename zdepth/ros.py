"""ROS 2 messages from zdepth results, without ROS: `sensor_msgs/msg/Image` (32FC1 and 16UC1),
`sensor_msgs/msg/PointCloud2` and `sensor_msgs/msg/CameraInfo`, built with the `rosbags`
type store (the `ros` extra) and serialised to ROS 2 CDR by it; and `McapWriter`, which writes
them to an MCAP file (profile ros2, schema encoding ros2msg, message encoding cdr) that
rosbag2, Foxglove and rosbags read.

Conventions (REP 118, sensor_msgs/msg/*.msg, depth_image_proc):
- 32FC1: metres along +Z; invalid (non-finite or <= 0) is NaN.
- 16UC1: millimetres, floor(z * 1000 + 0.5) (depth_image_proc's rounding); 0 = invalid, and
  depths that do not fit (> 65.535 m, e.g. vkitti's far range) are 0 too, since REP 118 has
  no out-of-range value for 16UC1.
- PointCloud2: organised (height = H rows, width = W), fields x y z FLOAT32 at 0, 4, 8 and,
  with colours, rgb at 12 (uint32 0x00RRGGBB bit-copied into a FLOAT32 field, as PCL packs
  it): point_step 12 or 16, row_step = point_step * W, little-endian; invalid pixels keep their
  slot with x = y = z = NaN and is_dense is false. x = (u - cx) / fx * z, y = (v - cy) / fy * z.
- frame_id is an optical frame: x right, y down, z forward. Stamps are the capture time.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, BinaryIO, Optional

import numpy as np

from .geometry import unproject
from .request import Intrinsics

# Humble's and Jazzy's sensor_msgs definitions of these messages are identical.
DEFAULT_DISTRO = "ROS2_HUMBLE"
DEPTH_ENCODINGS = ("32FC1", "16UC1")
MM_PER_M = 1000.0
UINT16_MAX = 65535


@functools.lru_cache(maxsize=None)
def typestore(distro: str = DEFAULT_DISTRO) -> Any:
    """rosbags' type store for a ROS 2 distribution name (a rosbags `Stores` member name)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(getattr(Stores, distro))


def _types() -> Any:
    return typestore().types


def stamp_ns(stamp: float) -> int:
    """A time.time() stamp in seconds as integer nanoseconds (the fraction rounded on its own,
    which keeps the precision a float of the whole count would lose)."""
    sec = math.floor(stamp)
    return sec * 1_000_000_000 + min(int(round((stamp - sec) * 1e9)), 999_999_999)


def header(stamp: float, frame_id: str) -> Any:
    """std_msgs/msg/Header for a time.time() stamp in seconds."""
    types = _types()
    sec, nanosec = divmod(stamp_ns(stamp), 1_000_000_000)
    return types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id
    )


def _valid(depth: np.ndarray) -> np.ndarray:
    return np.isfinite(depth) & (depth > 0)


def depth_to_millimetres(depth: np.ndarray) -> np.ndarray:
    """float metres (H, W) -> uint16 millimetres by the 16UC1 rule above (0 = invalid)."""
    depth = np.asarray(depth, dtype=np.float64)
    mm = np.floor(np.where(_valid(depth), depth, 0.0) * MM_PER_M + 0.5)
    return np.where(mm <= UINT16_MAX, mm, 0).astype(np.uint16)


def depth_image(depth: np.ndarray, stamp: float, frame_id: str, encoding: str = "32FC1") -> Any:
    """sensor_msgs/msg/Image from a depth map in metres, float (H, W). `encoding`: 32FC1 or 16UC1.
    Raises ValueError for another encoding or shape."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    if encoding == "32FC1":
        pixels = np.where(_valid(depth), depth, np.float32(np.nan)).astype("<f4")
    elif encoding == "16UC1":
        pixels = depth_to_millimetres(depth).astype("<u2")
    else:
        raise ValueError(f"encoding must be one of {DEPTH_ENCODINGS}, got {encoding!r}")
    height, width = depth.shape
    return _types()["sensor_msgs/msg/Image"](
        header=header(stamp, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * pixels.itemsize,
        data=np.ascontiguousarray(pixels).view(np.uint8).reshape(-1),
    )


def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 (...) whose bits are 0x00RRGGBB (PCL's packed rgb)."""
    colors = np.asarray(colors, dtype=np.uint32)
    return ((colors[..., 0] << 16) | (colors[..., 1] << 8) | colors[..., 2]).view(np.float32)


def pointcloud2(
    depth: np.ndarray, intrinsics: Intrinsics, stamp: float, frame_id: str, colors: Optional[np.ndarray] = None
) -> Any:
    """sensor_msgs/msg/PointCloud2, organised H x W, from a depth map in metres (H, W) and the
    intrinsics of that map; `colors`: optional uint8 RGB (H, W, 3) or (H*W, 3) -> an rgb field."""
    depth = np.asarray(depth, dtype=np.float32)
    height, width = depth.shape
    names = ["x", "y", "z"] + (["rgb"] if colors is not None else [])
    points = np.empty((height, width), dtype=[(name, "<f4") for name in names])
    xyz = unproject(np.where(_valid(depth), depth, np.float32(np.nan)), intrinsics).reshape(height, width, 3)
    for axis, name in enumerate("xyz"):
        points[name] = xyz[..., axis]
    if colors is not None:
        points["rgb"] = pack_rgb(np.asarray(colors).reshape(height, width, 3))
    types = _types()
    field = types["sensor_msgs/msg/PointField"]
    fields = [field(name=name, offset=4 * i, datatype=field.FLOAT32, count=1) for i, name in enumerate(names)]
    point_step = points.dtype.itemsize
    return types["sensor_msgs/msg/PointCloud2"](
        header=header(stamp, frame_id),
        height=height,
        width=width,
        fields=fields,
        is_bigendian=False,
        point_step=point_step,
        row_step=point_step * width,
        data=points.view(np.uint8).reshape(-1),
        is_dense=False,
    )


def camera_info(intrinsics: Intrinsics, height: int, width: int, stamp: float, frame_id: str) -> Any:
    """sensor_msgs/msg/CameraInfo of the (rectified, distortion-free) depth image: K from the
    intrinsics, R = I, P = [K | 0], plumb_bob with d = 0, no binning, full-frame ROI."""
    types = _types()
    fx, fy, cx, cy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    roi = types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return types["sensor_msgs/msg/CameraInfo"](
        header=header(stamp, frame_id),
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=np.array([fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]),
        r=np.eye(3).reshape(-1),
        p=np.array([fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]),
        binning_x=0,
        binning_y=0,
        roi=roi,
    )


def serialize(message: Any) -> bytes:
    """A message as ROS 2 CDR bytes (little-endian), as rosbag2 stores it."""
    return bytes(typestore().serialize_cdr(message, message.__msgtype__))


class McapWriter:
    """Writes ROS 2 messages to one MCAP file; a channel per topic, made on first use.
    Use as a context manager: the file is complete (summary, index) only after `close`."""

    def __init__(self, path: str | os.PathLike):
        from mcap.writer import CompressionType, Writer

        self._file: BinaryIO = open(path, "wb")
        self._writer = Writer(self._file, compression=CompressionType.ZSTD)
        self._writer.start(profile="ros2", library="zdepth")
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self.messages = 0

    def __enter__(self) -> "McapWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def write(self, topic: str, message: Any, log_time_ns: int) -> None:
        msgtype = message.__msgtype__
        if topic not in self._channels:
            if msgtype not in self._schemas:
                text, _ = typestore().generate_msgdef(msgtype, ros_version=2)
                self._schemas[msgtype] = self._writer.register_schema(
                    name=msgtype, encoding="ros2msg", data=text.encode()
                )
            self._channels[topic] = self._writer.register_channel(
                topic=topic, message_encoding="cdr", schema_id=self._schemas[msgtype]
            )
        self._writer.add_message(
            self._channels[topic], log_time=log_time_ns, data=serialize(message), publish_time=log_time_ns
        )
        self.messages += 1

    def close(self) -> None:
        if not self._file.closed:
            self._writer.finish()
            self._file.close()
