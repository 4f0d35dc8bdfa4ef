"""zdepth.ros messages for the cases a live stream rarely shows: invalid pixels, far depth,
colours. Decoded with rosbags' own CDR deserialiser and numpy, not with zdepth code."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rosbags")

from rosbags.typesys import Stores, get_typestore  # noqa: E402

from zdepth import ros  # noqa: E402
from zdepth.request import Intrinsics  # noqa: E402

TS = get_typestore(Stores.ROS2_JAZZY)  # written with Humble's definitions: Jazzy reads the same bytes
DEPTH = np.array([[1.0, np.nan, 0.0], [np.inf, 2.0004999, 70.0]], dtype=np.float32)  # 70 m: beyond 16UC1's 65.535 m
K = Intrinsics(fx=2.0, fy=4.0, cx=1.0, cy=0.5)


def roundtrip(message):
    return TS.deserialize_cdr(ros.serialize(message), message.__msgtype__)


def test_invalid_pixels_in_both_encodings():
    image = roundtrip(ros.depth_image(DEPTH, 12.25, "cam"))
    z = np.frombuffer(image.data.tobytes(), "<f4").reshape(2, 3)
    np.testing.assert_array_equal(np.isnan(z), [[False, True, True], [True, False, False]])
    raw = roundtrip(ros.depth_image(DEPTH, 12.25, "cam", "16UC1"))
    mm = np.frombuffer(raw.data.tobytes(), "<u2").reshape(2, 3)
    np.testing.assert_array_equal(mm, [[1000, 0, 0], [0, 2000, 0]])  # 2000.4999 mm rounds down; 70 m does not fit: 0
    assert (image.header.stamp.sec, image.header.stamp.nanosec) == (12, 250_000_000)


def test_organised_cloud_with_colours():
    colors = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[1, 2, 3], [10, 20, 30], [200, 100, 50]]], dtype=np.uint8
    )
    cloud = roundtrip(ros.pointcloud2(DEPTH, K, 1.0, "cam", colors))
    assert [(f.name, f.offset) for f in cloud.fields] == [("x", 0), ("y", 4), ("z", 8), ("rgb", 12)]
    assert (cloud.point_step, cloud.row_step, cloud.is_dense) == (16, 48, False)
    points = np.frombuffer(
        cloud.data.tobytes(), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")]
    ).reshape(2, 3)
    assert np.isnan(points["x"][0, 1]) and np.isnan(points["z"][1, 0]) and np.isnan(points["y"][0, 2])
    assert points["x"][1, 2] == pytest.approx((2 - 1.0) / 2.0 * 70.0) and points["y"][1, 2] == pytest.approx(
        (1 - 0.5) / 4.0 * 70.0
    )
    # PCL packing: bytes B, G, R, 0 in little-endian order
    assert points["rgb"][1, 2] == (200 << 16) | (100 << 8) | 50
    assert cloud.data.tobytes()[16 * 5 + 12 : 16 * 5 + 16] == bytes([50, 100, 200, 0])


def test_camera_info_message():
    info = roundtrip(ros.camera_info(K, 2, 3, 1.0, "cam"))
    assert (info.height, info.width, info.distortion_model) == (2, 3, "plumb_bob")
    np.testing.assert_array_equal(np.asarray(info.k).reshape(3, 3), [[2, 0, 1], [0, 4, 0.5], [0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(info.p).reshape(3, 4)[:, :3], np.asarray(info.k).reshape(3, 3))
