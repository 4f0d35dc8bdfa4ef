"""zdepth.geometry: back-projection against a known plane, PLY round trip, colour maps."""

import math
import subprocess
import sys

import numpy as np
import pytest

from zdepth import geometry
from zdepth.protocol import ZDepthError
from zdepth.request import Intrinsics

INTRINSICS = Intrinsics(fx=50.0, fy=40.0, cx=31.5, cy=23.0)


def plane_depth(height, width, k, normal=(0.2, -0.3, 1.0), offset=3.0):
    """z-depth of the plane n . X = offset seen through intrinsics k: z = d / (n . ray)."""
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    ray = np.stack([(u - k.cx) / k.fx, (v - k.cy) / k.fy, np.ones_like(u, dtype=float)], axis=-1)
    return (offset / (ray @ np.asarray(normal))).astype(np.float32)


def test_tilted_plane_points_lie_on_the_plane_and_follow_the_intrinsics():
    normal, offset = np.array([0.2, -0.3, 1.0]), 3.0
    depth = plane_depth(48, 64, INTRINSICS, normal, offset)
    points = geometry.unproject(depth, INTRINSICS)
    assert points.shape == (48 * 64, 3) and points.dtype == np.float32
    np.testing.assert_allclose(points @ normal, offset, rtol=1e-5)
    # Row-major pixel order: point index = v * W + u.
    v, u = 17, 40
    x, y, z = points[v * 64 + u]
    assert z == depth[v, u]
    assert math.isclose(x, (u - INTRINSICS.cx) / INTRINSICS.fx * z, rel_tol=1e-6)
    assert math.isclose(y, (v - INTRINSICS.cy) / INTRINSICS.fy * z, rel_tol=1e-6)
    # The principal point's ray is the optical axis; x grows right, y grows down.
    centre = points.reshape(48, 64, 3)[23, 31]
    assert abs(centre[1]) < 1e-6 and centre[0] < 0  # u = 31 < cx = 31.5
    assert (np.diff(points.reshape(48, 64, 3)[..., 0] / depth, axis=1) > 0).all()
    assert (np.diff(points.reshape(48, 64, 3)[..., 1] / depth, axis=0) > 0).all()


def test_unproject_accepts_a_mapping_and_refuses_bad_input():
    depth = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(geometry.unproject(depth, INTRINSICS.__dict__), geometry.unproject(depth, INTRINSICS))
    with pytest.raises(ZDepthError, match="fx and fy must be > 0"):
        geometry.unproject(depth, {"fx": 0, "fy": 1, "cx": 0, "cy": 0})
    with pytest.raises(ZDepthError, match="finite"):
        geometry.unproject(depth, {"fx": float("nan"), "fy": 1, "cx": 0, "cy": 0})
    with pytest.raises(ValueError, match="2-D"):
        geometry.unproject(np.ones((2, 3, 1)), INTRINSICS)


def test_ply_round_trip_with_and_without_colour(tmp_path):
    rng = np.random.default_rng(1)
    points = rng.normal(size=(100, 3)).astype(np.float32)
    colors = rng.integers(0, 256, size=(100, 3), dtype=np.uint8)
    geometry.write_ply(tmp_path / "c.ply", points, colors)
    geometry.write_ply(tmp_path / "p.ply", points)
    header = (tmp_path / "c.ply").read_bytes()[:200].decode("ascii", "replace")
    assert header.startswith("ply\nformat binary_little_endian 1.0\nelement vertex 100\n")
    assert (tmp_path / "c.ply").stat().st_size == header.index("end_header\n") + 11 + 100 * 15
    got_points, got_colors = geometry.read_ply(tmp_path / "c.ply")
    np.testing.assert_array_equal(got_points, points)
    np.testing.assert_array_equal(got_colors, colors)
    got_points, got_colors = geometry.read_ply(tmp_path / "p.ply")
    np.testing.assert_array_equal(got_points, points)
    assert got_colors is None
    with pytest.raises(ValueError, match="uint8"):
        geometry.write_ply(tmp_path / "x.ply", points, colors.astype(np.float32))


def test_colorize_normalises_per_image_and_is_nan_safe():
    depth = np.array([[1.0, 2.0], [3.0, np.nan]], np.float32)
    image = geometry.colorize(depth)
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], geometry.TURBO[0])
    np.testing.assert_array_equal(image[1, 0], geometry.TURBO[255])
    np.testing.assert_array_equal(image[1, 1], [0, 0, 0])
    # Scale-free: 10x the depth gives the same picture; invert swaps the ends.
    np.testing.assert_array_equal(geometry.colorize(depth * 10), image)
    np.testing.assert_array_equal(geometry.colorize(depth, invert=True)[0, 0], geometry.TURBO[255])
    flat = geometry.colorize(np.full((2, 2), 5.0))  # constant map: one colour, no NaN warning
    assert (flat == flat[0, 0]).all()
    assert geometry.colorize(np.full((2, 2), np.nan)).max() == 0
    # Turbo runs from blue through green to red.
    blue, green, red = geometry.TURBO[32], geometry.TURBO[110], geometry.TURBO[224]
    assert blue.argmax() == 2 and green.argmax() == 1 and red.argmax() == 0


def test_geometry_imports_neither_torch_nor_opencv():
    code = "import sys, zdepth.geometry; print(any(m in sys.modules for m in ('torch', 'cv2')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
