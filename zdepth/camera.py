"""ROS-style camera calibration (`sensor_msgs/CameraInfo`) as a request field: validation and
the intrinsics it gives for an image of another size.

Pure Python (no torch, no numpy) so the broker, the clients and the worker share it.

A `camera_info` map has the CameraInfo fields a pinhole unprojection needs:
``{k: 9 floats row-major [fx 0 cx; 0 fy cy; 0 0 1], width, height, d: [...], distortion_model}``
(`d` and `distortion_model` optional). Other CameraInfo fields (`header`, `r`, `p`) are
ignored; `binning_x/y` and `roi`, when present, must be the full-frame defaults (0 or 1, all 0).

Resizing. `width`/`height` are the calibration resolution. An image of another size must be
the same picture scaled by one factor (the aspect ratios agree to within a pixel of rounding);
each axis then scales by its own exact ratio s = new/old, as `cv2.resize` does, with the
**pixel-centre rule**:

    fx' = fx * sx,  cx' = (cx + 0.5) * sx - 0.5      (y likewise)

because cv::resize (and PIL, and torch with align_corners=False) maps destination pixel
centre u' to source position (u' + 0.5) / s - 0.5 (opencv modules/imgproc/src/resize.cpp), and
zdepth unprojects integer pixel indices, i.e. pixel centres, as ROS's depth_image_proc does.
ROS's image_proc resize writes the plain product cx * s instead (image_proc/src/resize.cpp);
the two differ by 0.5 (s - 1) px: -0.25 px at s = 1/2, +0.5 px at s = 2.

Distortion. zdepth unprojects with the pinhole model only, so a non-zero `d` is refused with
a bad_request (whatever the model) rather than silently ignored: rectify the image first
(image_proc's `image_rect`, or `cv2.undistort`) and send the rectified camera's K (the left
3x3 of CameraInfo `p`) with `d` all zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .protocol import bad_request, short_repr
from .request import Intrinsics, check_intrinsics

# Aspect ratios of calibration and image may differ by this many pixels (rounding of a resize).
ASPECT_TOLERANCE_PX = 1.0
MAX_DISTORTION_COEFFICIENTS = 16  # plumb_bob has 5, rational_polynomial 8, thin-prism models up to 14


@dataclass(frozen=True)
class CameraInfo:
    """A validated camera_info: K's pinhole part at the calibration resolution (pixels)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    distortion_model: str = ""

    def as_dict(self) -> dict:
        """The wire form (`camera_info` request field): k row-major, width, height."""
        return {
            "k": [self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0],
            "width": self.width,
            "height": self.height,
            "d": [],
            "distortion_model": self.distortion_model,
        }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any, what: str, max_len: int) -> list[float]:
    if hasattr(value, "tolist"):  # a numpy array from a local caller or a rosbags message
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) > max_len or not all(_number(x) for x in value):
        raise bad_request(
            f"`camera_info.{what}` must be a list of at most {max_len} finite numbers, got {short_repr(value)}"
        )
    return [float(x) for x in value]


def _size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
        raise bad_request(
            f"`camera_info.{what}` must be an integer from 1 to {1 << 20} (pixels), got {short_repr(value)}"
        )
    return value


def check_camera_info(value: Any) -> CameraInfo:
    """A `camera_info` map (or a CameraInfo) -> CameraInfo. Raises ZDepthError(bad_request) for a
    missing or malformed field, an uncalibrated K (fx = 0), skew, a non-zero distortion, or a
    binning/ROI other than the full frame."""
    if isinstance(value, CameraInfo):
        return value
    if not isinstance(value, Mapping):
        raise bad_request("`camera_info` must be a map {k, width, height, d, distortion_model}")
    missing = [name for name in ("k", "width", "height") if value.get(name) is None]
    if missing:
        raise bad_request(f"`camera_info` lacks {missing}")
    k = _numbers(value["k"], "k", 9)
    if len(k) != 9:
        raise bad_request(f"`camera_info.k` must have 9 numbers (3x3 row-major), got {len(k)}")
    fx, skew, cx, zero_a, fy, cy, zero_b, zero_c, one = k
    if fx == 0 and fy == 0:
        raise bad_request("`camera_info.k` is all zero: the camera is uncalibrated (REP 104 / CameraInfo: K[0] == 0)")
    if fx <= 0 or fy <= 0:
        raise bad_request(f"`camera_info.k`: fx and fy must be > 0 (pixels), got fx={fx} fy={fy}")
    if skew != 0 or (zero_a, zero_b, zero_c, one) != (0, 0, 0, 1):
        raise bad_request(f"`camera_info.k` must be [fx 0 cx; 0 fy cy; 0 0 1] (no skew), got {k}")
    width, height = _size(value["width"], "width"), _size(value["height"], "height")
    model = value.get("distortion_model") or ""
    if not isinstance(model, str) or len(model) > 64:
        raise bad_request(f"`camera_info.distortion_model` must be a short string, got {short_repr(model)}")
    d = _numbers([] if value.get("d") is None else value["d"], "d", MAX_DISTORTION_COEFFICIENTS)
    if any(d):
        raise bad_request(
            f"`camera_info.d` is non-zero ({model or 'no model'}: {d}); zdepth unprojects with the pinhole model only: "
            "send a rectified image with the rectified K (CameraInfo p's left 3x3) and d all zero"
        )
    for name in ("binning_x", "binning_y"):
        if value.get(name) not in (None, 0, 1):
            raise bad_request(
                f"`camera_info.{name}` must be 0 or 1 (scale the image instead), got {short_repr(value.get(name))}"
            )
    roi = value.get("roi")
    if roi is not None:
        fields = roi if isinstance(roi, Mapping) else getattr(roi, "__dict__", {})
        if any(fields.get(name) for name in ("x_offset", "y_offset", "height", "width")):
            raise bad_request(
                "`camera_info.roi` must be the full frame (all zero); crop-aware intrinsics are not supported"
            )
    return CameraInfo(fx, fy, cx, cy, width, height, model)


def scaled_intrinsics(camera_info: CameraInfo, height: int, width: int) -> Intrinsics:
    """The pinhole intrinsics of `camera_info` for an image of (height, width) pixels, by the
    pixel-centre rule in the module docstring. Raises ZDepthError(bad_request) when the image
    is not the calibration resolution scaled uniformly (aspect ratios differ by more than
    ASPECT_TOLERANCE_PX pixels)."""
    sx, sy = width / camera_info.width, height / camera_info.height
    if (
        abs(camera_info.width * sy - width) > ASPECT_TOLERANCE_PX
        and abs(camera_info.height * sx - height) > ASPECT_TOLERANCE_PX
    ):
        raise bad_request(
            f"the image is {width}x{height} but `camera_info` is {camera_info.width}x{camera_info.height}: "
            "not one uniform scale (the aspect ratios differ); send intrinsics for this image instead"
        )
    return Intrinsics(
        fx=camera_info.fx * sx,
        fy=camera_info.fy * sy,
        cx=(camera_info.cx + 0.5) * sx - 0.5,
        cy=(camera_info.cy + 0.5) * sy - 0.5,
    )


def resolve_intrinsics(intrinsics: Any, camera_info: Any, height: int, width: int) -> Intrinsics:
    """The intrinsics to unproject a (height, width) depth map with, from exactly one of
    `intrinsics` ({fx, fy, cx, cy} for this very size) or `camera_info` (any uniform scale of
    it). Raises ZDepthError(bad_request) if both, neither, or an invalid one is given."""
    if (intrinsics is None) == (camera_info is None):
        raise bad_request("give exactly one of `intrinsics` {fx, fy, cx, cy} and `camera_info` {k, width, height}")
    if camera_info is not None:
        return scaled_intrinsics(check_camera_info(camera_info), height, width)
    return check_intrinsics(intrinsics)


def load_camera_info_yaml(text: str) -> CameraInfo:
    """A ROS camera_info YAML file (camera_calibration_parsers format: image_width,
    image_height, camera_matrix {rows, cols, data}, distortion_model, distortion_coefficients)
    -> CameraInfo. Raises ZDepthError(bad_request) for a file that is not one."""
    import yaml

    doc = yaml.safe_load(text)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("camera_matrix"), Mapping):
        raise bad_request("a camera_info YAML needs image_width, image_height and camera_matrix {rows, cols, data}")
    distortion = doc.get("distortion_coefficients")
    return check_camera_info(
        {
            "k": doc["camera_matrix"].get("data"),
            "width": doc.get("image_width"),
            "height": doc.get("image_height"),
            "d": distortion.get("data") if isinstance(distortion, Mapping) else None,
            "distortion_model": doc.get("distortion_model"),
        }
    )


def camera_info_field(camera_info: Optional[Any]) -> Optional[dict]:
    """The `camera_info` request field for a client option: a CameraInfo, a map, or None; validated here
    so that a mistake shows where it is made."""
    return None if camera_info is None else check_camera_info(camera_info).as_dict()
