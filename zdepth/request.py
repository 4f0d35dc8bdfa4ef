"""Prediction parameters: validation in one place, shared by the engine, the worker and the broker.

Pure Python and numpy (no torch), so the broker can refuse a bad request before it ever
reaches a worker, and the engine gives the same message when called directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from . import protocol as P
from .protocol import bad_request


def check_encoder(encoder: Any) -> str:
    if encoder not in P.ENCODERS:
        raise bad_request(f"`encoder` must be one of {list(P.ENCODERS)}, got {encoder!r}")
    return encoder


def check_dataset(dataset: Any) -> str:
    if dataset not in P.DATASETS:
        raise bad_request(f"`dataset` must be one of {list(P.DATASETS)}, got {dataset!r}")
    return dataset


def check_input_size(size: Any) -> int:
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or size % P.PATCH_SIZE
        or not P.MIN_INPUT_SIZE <= size <= P.MAX_INPUT_SIZE
    ):
        raise bad_request(
            f"`input_size` must be a multiple of {P.PATCH_SIZE} from {P.MIN_INPUT_SIZE} to {P.MAX_INPUT_SIZE}, got {size!r}"
        )
    return size


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_max_depth(max_depth: Any) -> float:
    if not _finite(max_depth) or max_depth <= 0:
        raise bad_request(f"`max_depth` must be a finite number > 0, got {max_depth!r}")
    return float(max_depth)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of the image as sent."""

    fx: float
    fy: float
    cx: float
    cy: float


def check_intrinsics(value: Any) -> Intrinsics:
    if isinstance(value, Intrinsics):
        value = value.__dict__
    if not isinstance(value, Mapping):
        raise bad_request("`intrinsics` must be a map {fx, fy, cx, cy}")
    missing = [k for k in ("fx", "fy", "cx", "cy") if k not in value]
    if missing:
        raise bad_request(f"`intrinsics` lacks {missing}")
    for name in ("fx", "fy", "cx", "cy"):
        if not _finite(value[name]):
            raise bad_request(f"`intrinsics.{name}` must be a finite number, got {value[name]!r}")
    if value["fx"] <= 0 or value["fy"] <= 0:
        raise bad_request(f"`intrinsics` fx and fy must be > 0 (pixels), got fx={value['fx']!r} fy={value['fy']!r}")
    return Intrinsics(float(value["fx"]), float(value["fy"]), float(value["cx"]), float(value["cy"]))


@dataclass(frozen=True)
class ImageSpec:
    """Where the image is: a frame (jpeg/png bytes or a raw uint8 array) or a URL."""

    frame: Optional[int] = None
    format: Optional[str] = None
    shape: Optional[tuple] = None  # raw only: (H, W, 3)
    channels: str = "bgr"  # raw only
    url: Optional[str] = None


def check_image(header: Mapping[str, Any], frames: Sequence, max_pixels: int) -> ImageSpec:
    url = header.get("image_url")
    desc = header.get("image")
    if desc is None and url is None:
        raise bad_request("missing `image` (a frame) or `image_url`")
    if desc is None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
            raise bad_request("`image_url` must be an http(s) URL of at most 2048 characters")
        return ImageSpec(url=url)
    index = P.frame_index(desc, len(frames), "`image`")
    fmt = desc.get("format")
    if fmt not in P.IMAGE_FORMATS:
        raise bad_request(f"`image.format` must be one of {list(P.IMAGE_FORMATS)}, got {fmt!r}")
    size = len(P.frame_buffer(frames[index]))
    if size == 0:
        raise bad_request("the image frame is empty")
    if fmt != "raw":
        return ImageSpec(frame=index, format=fmt)
    shape = P.check_shape(desc.get("shape"), "`image`")
    if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
        raise bad_request(f"a raw image must have shape [H, W, 3], got {list(shape)}")
    if shape[0] * shape[1] > max_pixels:
        raise P.ZDepthError(P.TOO_LARGE, f"image has {shape[0] * shape[1]} pixels; the limit is {max_pixels}")
    if desc.get("dtype", "uint8") != "uint8":
        raise bad_request("a raw image must be uint8")
    if size != shape[0] * shape[1] * 3:
        raise bad_request(f"raw image shape {list(shape)} needs {shape[0] * shape[1] * 3} bytes, the frame has {size}")
    channels = desc.get("channels", "bgr")
    if channels not in ("bgr", "rgb"):
        raise bad_request(f"`image.channels` must be bgr or rgb, got {channels!r}")
    return ImageSpec(frame=index, format="raw", shape=shape, channels=channels)


@dataclass(frozen=True)
class PredictRequest:
    """A validated prediction request, ready for the engine."""

    method: str
    image: ImageSpec
    encoder: str
    dataset: str
    input_size: int
    max_depth: float  # 1.0 for rel_depth on a metric dataset
    intrinsics: Optional[Intrinsics]
    output_dtype: str = "float32"
    with_color: bool = False
    depth_scale: Optional[float] = None  # metres per count: set when output_dtype is uint16
    compression: str = "none"
    camera_info: Any = None  # a zdepth.camera.CameraInfo, instead of `intrinsics`

    @property
    def model_key(self) -> tuple:
        return (self.encoder, self.dataset)

    def intrinsics_for(self, height: int, width: int) -> Optional[Intrinsics]:
        """The pinhole intrinsics for the (height, width) image: `intrinsics` as sent, or
        `camera_info` scaled to this size (zdepth.camera.scaled_intrinsics; bad_request if it
        does not fit)."""
        if self.camera_info is None:
            return self.intrinsics
        from .camera import scaled_intrinsics  # zdepth.camera imports this module

        return scaled_intrinsics(self.camera_info, height, width)


def default_max_depth(dataset: str) -> float:
    return P.DEFAULT_MAX_DEPTH.get(dataset, 1.0)


def default_depth_scale(max_depth: float) -> float:
    """1 mm, or the smallest multiple of 1 mm whose 65535 counts reach `max_depth` metres
    (2 mm for vkitti's 80 m), so the default never loses the far end of the model's range."""
    steps = max(1, math.ceil(max_depth / (P.DEPTH_COUNT_MAX * P.DEFAULT_DEPTH_SCALE)))
    return steps * P.DEFAULT_DEPTH_SCALE


def check_depth_scale(scale: Any) -> float:
    if not _finite(scale) or not P.MIN_DEPTH_SCALE <= scale <= P.MAX_DEPTH_SCALE:
        raise bad_request(
            f"`depth_scale` must be a number of metres per count in [{P.MIN_DEPTH_SCALE:g}, {P.MAX_DEPTH_SCALE:g}], got {P.short_repr(scale)}"
        )
    return float(scale)


def _camera_info(header: Mapping[str, Any], image: ImageSpec) -> Any:
    """The validated `camera_info` field (zdepth.camera.CameraInfo) or None. It excludes
    `intrinsics`; for a raw image, whose size is known here, it must also fit that size."""
    if header.get("camera_info") is None:
        return None
    if header.get("intrinsics") is not None:
        raise bad_request("give `intrinsics` or `camera_info`, not both")
    from .camera import check_camera_info, scaled_intrinsics  # zdepth.camera imports this module

    camera_info = check_camera_info(header["camera_info"])
    if image.shape is not None:
        scaled_intrinsics(camera_info, image.shape[0], image.shape[1])
    return camera_info


def _field(header: Mapping[str, Any], name: str, default: Any) -> Any:
    """A field's value; absent and nil both mean the default, as for every optional field."""
    value = header.get(name)
    return default if value is None else value


def parse_predict(
    header: Mapping[str, Any],
    frames: Sequence,
    default_encoder: str = P.DEFAULT_ENCODER,
    max_pixels: int = P.MAX_IMAGE_PIXELS,
) -> PredictRequest:
    """Validate a prediction header (frames: header first). Raises ZDepthError(bad_request...)."""
    _check_method(header)
    return check_predict(header, check_image(header, frames, max_pixels), default_encoder)


def _check_method(header: Mapping[str, Any]) -> str:
    method = header.get("method")
    if not isinstance(method, str) or method not in P.PREDICT_METHODS:  # a list is unhashable: check the type first
        raise P.ZDepthError(P.UNKNOWN_METHOD, f"{P.short_repr(method)} is not a prediction method")
    return method


def check_predict(
    header: Mapping[str, Any], image: ImageSpec, default_encoder: str = P.DEFAULT_ENCODER
) -> PredictRequest:
    """A PredictRequest from prediction fields (`method`, `encoder`, `max_depth`... with the wire's
    names, types and defaults; None means the default) for an image already located: the wire's
    `parse_predict`, and local callers such as `Engine.request` with the image in memory. Raises
    ZDepthError(bad_request or unknown_method)."""
    method = _check_method(header)
    encoder = check_encoder(header.get("encoder") or default_encoder)
    dataset = check_dataset(header.get("dataset") or P.DEFAULT_DATASET)
    input_size = check_input_size(_field(header, "input_size", P.DEFAULT_INPUT_SIZE))
    if dataset == "relative":
        if method != P.REL_DEPTH:
            raise bad_request(
                f"{method} needs a metric dataset (hypersim or vkitti): the relative checkpoint gives disparity, not depth"
            )
        if header.get("max_depth") is not None:
            raise bad_request(
                "`max_depth` has no meaning for dataset relative: its output is disparity-like, not metres"
            )
        max_depth = 1.0
    elif method == P.REL_DEPTH:
        max_depth = 1.0  # the old API's /rel_depth: the metric model with max_depth = 1
    elif header.get("max_depth") is not None:
        max_depth = check_max_depth(header["max_depth"])
    else:
        max_depth = default_max_depth(dataset)
    intrinsics = None
    camera_info = _camera_info(header, image)
    if method == P.POINTCLOUD:
        if header.get("intrinsics") is None and camera_info is None:
            raise bad_request("pointcloud needs `intrinsics` {fx, fy, cx, cy} or `camera_info` {k, width, height}")
        intrinsics = None if camera_info is not None else check_intrinsics(header["intrinsics"])
    elif header.get("intrinsics") is not None:
        check_intrinsics(header["intrinsics"])
    output_dtype = _field(header, "output_dtype", "float32")
    if not isinstance(output_dtype, str) or output_dtype not in P.OUTPUT_DTYPES:
        raise bad_request(f"`output_dtype` must be one of {list(P.OUTPUT_DTYPES)}, got {P.short_repr(output_dtype)}")
    depth_scale = None if header.get("depth_scale") is None else check_depth_scale(header["depth_scale"])
    if output_dtype == "uint16":
        if method != P.METRIC_DEPTH:
            raise bad_request(
                f"`output_dtype` uint16 is for metric_depth only (counts of depth_scale metres); {method} takes float32 or float16"
            )
        depth_scale = depth_scale or default_depth_scale(max_depth)
    else:
        depth_scale = None  # validated above, meaningful only for uint16
    compression = _field(header, "compression", "none")
    if not isinstance(compression, str) or compression not in P.COMPRESSIONS:
        raise bad_request(f"`compression` must be one of {list(P.COMPRESSIONS)}, got {P.short_repr(compression)}")
    with_color = _field(header, "with_color", False)
    if not isinstance(with_color, bool):
        raise bad_request("`with_color` must be true or false")
    return PredictRequest(
        method,
        image,
        encoder,
        dataset,
        input_size,
        max_depth,
        intrinsics,
        output_dtype,
        with_color,
        depth_scale,
        compression,
        camera_info=camera_info,
    )
