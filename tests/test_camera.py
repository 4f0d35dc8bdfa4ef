"""camera_info: validation, K for a resized image (checked against what cv2.resize does to
pixel positions), refusal of distortion, and the request/engine wiring."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from zdepth import protocol as P
from zdepth.camera import check_camera_info, load_camera_info_yaml, resolve_intrinsics, scaled_intrinsics
from zdepth.protocol import ZDepthError
from zdepth.request import Intrinsics, parse_predict

# A 640x480 calibration with an off-centre principal point, as a ROS CameraInfo message has it.
CAMERA_INFO = {
    "k": [525.0, 0.0, 319.2, 0.0, 523.0, 241.7, 0.0, 0.0, 1.0],
    "width": 640,
    "height": 480,
    "d": [0.0, 0.0, 0.0, 0.0, 0.0],
    "distortion_model": "plumb_bob",
}


def sampled_source_positions(
    width: int, height: int, new_width: int, new_height: int, interpolation: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where in the source image each destination pixel of cv2.resize samples: resize images
    whose values are their own column / row index (a linear ramp is reproduced exactly by
    linear interpolation away from the borders)."""
    columns = np.tile(np.arange(width, dtype=np.float32), (height, 1))
    rows = np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width))
    u = cv2.resize(columns, (new_width, new_height), interpolation=interpolation)[new_height // 2]
    v = cv2.resize(rows, (new_width, new_height), interpolation=interpolation)[:, new_width // 2]
    return u.astype(np.float64), v.astype(np.float64)


def pinhole_from_resize(cx: float, cy: float, fx: float, fy: float, u_src: np.ndarray, v_src: np.ndarray) -> Intrinsics:
    """The intrinsics of the resized image, measured: fit source position = a * dst + b on
    interior pixels, then the dst pixel that sees the principal point is (c - b) / a and the
    focal length shrinks by a source pixels per destination pixel."""
    inner = slice(2, -2)
    au, bu = np.polyfit(np.arange(len(u_src))[inner], u_src[inner], 1)
    av, bv = np.polyfit(np.arange(len(v_src))[inner], v_src[inner], 1)
    return Intrinsics(fx=fx / au, fy=fy / av, cx=(cx - bu) / au, cy=(cy - bv) / av)


@pytest.mark.parametrize(
    "size, interpolation",
    [
        ((320, 240), cv2.INTER_LINEAR),  # the CameraInfo is at twice the image size
        ((320, 240), cv2.INTER_AREA),
        ((1280, 960), cv2.INTER_LINEAR),  # twice the calibration size
        ((518, 388), cv2.INTER_LINEAR),  # 480 * 518 / 640 = 388.5: rounding makes sx != sy slightly
    ],
)
def test_k_follows_what_cv2_resize_does_to_pixels(size, interpolation):
    info = check_camera_info(CAMERA_INFO)
    new_width, new_height = size
    got = scaled_intrinsics(info, new_height, new_width)
    u_src, v_src = sampled_source_positions(640, 480, new_width, new_height, interpolation)
    expected = pinhole_from_resize(info.cx, info.cy, info.fx, info.fy, u_src, v_src)
    for name in ("fx", "fy", "cx", "cy"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name), abs=1e-3), name


def test_half_size_values_computed_by_hand():
    got = scaled_intrinsics(check_camera_info(CAMERA_INFO), 240, 320)
    # numpy, independently: K scaled by 0.5 with the half-pixel shift
    k = np.array(CAMERA_INFO["k"]).reshape(3, 3)
    scale = np.diag([0.5, 0.5, 1.0])
    shift = np.array([[1, 0, 0.5 * 0.5 - 0.5], [0, 1, 0.5 * 0.5 - 0.5], [0, 0, 1]])
    expected = shift @ scale @ k
    assert (got.fx, got.fy, got.cx, got.cy) == pytest.approx(
        (expected[0, 0], expected[1, 1], expected[0, 2], expected[1, 2])
    )
    assert (got.cx, got.cy) == pytest.approx((159.35, 120.6))  # (319.2 + 0.5) / 2 - 0.5


def test_a_3d_point_lands_on_the_same_ray_after_resizing():
    """A point projected at full resolution, moved to the half-size image by cv2.resize's
    pixel mapping, unprojects with the scaled K to the original ray."""
    info = check_camera_info(CAMERA_INFO)
    k = np.array(CAMERA_INFO["k"]).reshape(3, 3)
    point = np.array([0.31, -0.22, 2.5])
    image_points, _ = cv2.projectPoints(point[None], np.zeros(3), np.zeros(3), k, np.zeros(5))
    u, v = image_points[0, 0]
    s = 0.5
    u2, v2 = (u + 0.5) * s - 0.5, (v + 0.5) * s - 0.5  # cv::resize: src = (dst + 0.5) / s - 0.5
    half = scaled_intrinsics(info, 240, 320)
    ray = np.array([(u2 - half.cx) / half.fx, (v2 - half.cy) / half.fy])
    assert ray == pytest.approx(point[:2] / point[2], abs=1e-9)


def test_same_size_is_k_itself():
    got = scaled_intrinsics(check_camera_info(CAMERA_INFO), 480, 640)
    assert got == Intrinsics(525.0, 523.0, 319.2, 241.7)


def test_non_uniform_resize_is_refused():
    with pytest.raises(ZDepthError, match="not one uniform scale") as info:
        scaled_intrinsics(check_camera_info(CAMERA_INFO), 480, 320)
    assert info.value.code == P.BAD_REQUEST


@pytest.mark.parametrize(
    "change, message",
    [
        ({"d": [0.1, 0.0, 0.0, 0.0, 0.0]}, "non-zero"),
        ({"k": [0.0] * 9}, "uncalibrated"),
        ({"k": [525.0, 1.0, 319.2, 0.0, 523.0, 241.7, 0.0, 0.0, 1.0]}, "no skew"),
        ({"k": [525.0, 0.0, 319.2]}, "9 numbers"),
        ({"k": [float("nan")] * 9}, "finite"),
        ({"width": 0}, "width"),
        ({"height": 2.5}, "height"),
        ({"width": None}, "lacks"),
        ({"binning_x": 2}, "binning_x"),
        ({"roi": {"x_offset": 10, "y_offset": 0, "height": 100, "width": 100, "do_rectify": False}}, "roi"),
        ({"distortion_model": 7}, "distortion_model"),
    ],
)
def test_bad_camera_info_is_a_clear_bad_request(change, message):
    with pytest.raises(ZDepthError, match=message) as info:
        check_camera_info({**CAMERA_INFO, **change})
    assert info.value.code == P.BAD_REQUEST


def test_distortion_is_refused_even_when_small():
    """Not silently ignored: a plumb_bob d moves pixels by more than zero (OpenCV says how much)."""
    d = np.array([1e-3, 0.0, 0.0, 0.0, 0.0])
    k = np.array(CAMERA_INFO["k"]).reshape(3, 3)
    corner = cv2.undistortPoints(np.array([[[0.0, 0.0]]]), k, d, P=k)[0, 0]
    assert np.abs(corner).max() > 0.05  # a corner pixel's ray moves by a visible amount
    with pytest.raises(ZDepthError, match="pinhole model only"):
        check_camera_info({**CAMERA_INFO, "d": d})


def test_resolve_needs_exactly_one():
    assert resolve_intrinsics({"fx": 1.0, "fy": 2.0, "cx": 3.0, "cy": 4.0}, None, 10, 10) == Intrinsics(
        1.0, 2.0, 3.0, 4.0
    )
    assert resolve_intrinsics(None, CAMERA_INFO, 240, 320) == scaled_intrinsics(
        check_camera_info(CAMERA_INFO), 240, 320
    )
    for both in ((None, None), ({"fx": 1.0, "fy": 2.0, "cx": 3.0, "cy": 4.0}, CAMERA_INFO)):
        with pytest.raises(ZDepthError, match="exactly one"):
            resolve_intrinsics(*both, 240, 320)


def test_ros_yaml_file():
    text = """
image_width: 640
image_height: 480
camera_name: front
camera_matrix: {rows: 3, cols: 3, data: [525.0, 0.0, 319.2, 0.0, 523.0, 241.7, 0.0, 0.0, 1.0]}
distortion_model: plumb_bob
distortion_coefficients: {rows: 1, cols: 5, data: [0.0, 0.0, 0.0, 0.0, 0.0]}
rectification_matrix: {rows: 3, cols: 3, data: [1, 0, 0, 0, 1, 0, 0, 0, 1]}
projection_matrix: {rows: 3, cols: 4, data: [525.0, 0, 319.2, 0, 0, 523.0, 241.7, 0, 0, 0, 1, 0]}
"""
    assert load_camera_info_yaml(text) == check_camera_info(CAMERA_INFO)


# --- the request field ------------------------------------------------------------------------


def raw_frames(height: int, width: int) -> list:
    return [b"", np.zeros((height, width, 3), np.uint8).tobytes()]


def header(height: int, width: int, **fields) -> dict:
    return {
        "v": 1,
        "method": P.POINTCLOUD,
        "image": {"frame": 1, "format": "raw", "shape": [height, width, 3]},
        **fields,
    }


def test_parse_predict_takes_camera_info_instead_of_intrinsics():
    request = parse_predict(header(240, 320, camera_info=CAMERA_INFO), raw_frames(240, 320))
    assert request.intrinsics is None
    assert request.intrinsics_for(240, 320) == scaled_intrinsics(check_camera_info(CAMERA_INFO), 240, 320)


def test_parse_predict_refusals():
    with pytest.raises(ZDepthError, match="not both"):
        parse_predict(
            header(240, 320, camera_info=CAMERA_INFO, intrinsics={"fx": 1, "fy": 1, "cx": 0, "cy": 0}),
            raw_frames(240, 320),
        )
    with pytest.raises(ZDepthError, match="not one uniform scale"):  # a raw image's size is known before decoding
        parse_predict(header(240, 240, camera_info=CAMERA_INFO), raw_frames(240, 240))
    with pytest.raises(ZDepthError, match="or `camera_info`"):
        parse_predict(header(240, 320), raw_frames(240, 320))


def test_engine_pointcloud_with_camera_info_equals_scaled_intrinsics():
    torch = pytest.importorskip("torch")
    from zdepth.engine import Engine

    torch.manual_seed(0)
    engine = Engine(device="cpu", random_weights=True)
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    info = {**CAMERA_INFO, "width": 160, "height": 120, "k": [100.0, 0, 79.0, 0, 101.0, 60.5, 0, 0, 1]}
    with_info = engine.predict(P.POINTCLOUD, image, camera_info=info, input_size=56).arrays["points"]
    k = scaled_intrinsics(check_camera_info(info), 60, 80)
    with_k = engine.predict(P.POINTCLOUD, image, intrinsics=k.__dict__, input_size=56).arrays["points"]
    np.testing.assert_array_equal(with_info, with_k)
    z = with_info[:, 2].reshape(60, 80)
    assert with_info.reshape(60, 80, 3)[7, 11, 0] == pytest.approx(
        (11 - (79.0 + 0.5) / 2 + 0.5) / 50.0 * z[7, 11], rel=1e-5
    )
