"""The engine: one device, its resident models, and everything between a BGR image and a result.

Pre-processing reproduces the official `infer_image` (fact sheet §3): BGR -> RGB, /255,
"lower bound" resize to multiples of 14 with bicubic, ImageNet normalisation. Two equivalent
implementations (they differ by float32 rounding only, at most 2.6e-4 of the normalised input,
~1/65 of a grey level): "torch" runs on the engine's device, "exact" is the official OpenCV
float64 code. `preprocess="auto"` picks torch on CUDA, where it is ~30x faster (0.5 ms against
15 ms for a 640x480 frame on an H100 host), and the exact path on the CPU, where neither is
reliably faster (19 vs 29 ms on an idle 2-core VM, 79 vs 41 ms on a busy one) and both are
under 1% of a vits forward pass. `bench/prepost.py` measures it.
Post-processing (bilinear upsampling with align_corners=True back to the image size, the
max_depth scale, back-projection to points) also runs on the device, and each result crosses to
the host once.

Models are loaded once per (encoder, dataset) and kept in a small LRU; max_depth and input
size are per-request parameters, never cache keys.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import protocol as P
from .images import check_bgr
from .model import DepthAnythingV2, random_init_
from .model.checkpoints import CheckpointError, load_model
from .request import Intrinsics, PredictRequest, check_dataset, check_encoder, parse_predict

MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB order
STD = (0.229, 0.224, 0.225)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREPROCESS = ("auto", "torch", "exact")
GRID_CACHE_SIZE = 16


class ConfigError(ValueError):
    """The engine was configured with something this machine cannot do (no CUDA, fp16 on CPU...)."""


@dataclass
class Result:
    """One request's answer: the arrays to send, depth min/max, the model, and timings in ms."""

    arrays: dict[str, np.ndarray]
    min: float
    max: float
    model: str
    timing: dict[str, float] = field(default_factory=dict)


# --- pre- and post-processing ---------------------------------------------------------------


def resized_shape(height: int, width: int, input_size: int) -> tuple[int, int]:
    """The official "lower_bound" resize: both sides scaled by the larger of S/h and S/w, each
    rounded (numpy, half to even) to a multiple of 14, or rounded up if that falls below S."""
    scale = max(input_size / height, input_size / width)

    def side(length: int) -> int:
        target = scale * length
        rounded = int(np.round(target / P.PATCH_SIZE) * P.PATCH_SIZE)
        if rounded < input_size:
            rounded = int(np.ceil(target / P.PATCH_SIZE) * P.PATCH_SIZE)
        return rounded

    return side(height), side(width)


def preprocess_exact(image_bgr: np.ndarray, input_size: int) -> np.ndarray:
    """The official pre-processing, operation for operation (OpenCV on float64): (1, 3, h, w) float32."""
    height, width = resized_shape(image_bgr.shape[0], image_bgr.shape[1], input_size)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB) / 255.0
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    rgb = (rgb - np.array(MEAN)) / np.array(STD)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, shaped (1, 3, 1, 1), kept on the device."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def preprocess_torch(image_bgr: np.ndarray, input_size: int, device: torch.device) -> torch.Tensor:
    """The same steps in float32 torch on `device`: the uint8 image crosses once (3x smaller than
    float32) and the resize runs there. torch's bicubic uses the same kernel as OpenCV's
    INTER_CUBIC (a = -0.75, half-pixel centres, no antialias, clamped borders), so this differs
    from `preprocess_exact` by float32 rounding only. Returns (1, 3, h, w) float32."""
    height, width = resized_shape(image_bgr.shape[0], image_bgr.shape[1], input_size)
    # torch wants a writable array with positive strides; a frame's read-only view is copied once.
    x = torch.from_numpy(np.require(image_bgr, np.uint8, ("C", "W"))).to(device)
    x = x.permute(2, 0, 1).flip(0).unsqueeze(0).float()  # BGR HWC -> RGB NCHW
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    mean, std = _normalisation(device)
    return (x - mean) / std


def postprocess(depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h', w') model output -> (height, width): bilinear, align_corners=True, as the official code."""
    return F.interpolate(depth[None, None], size=(height, width), mode="bilinear", align_corners=True)[0, 0]


def unproject(depth: torch.Tensor, intrinsics: Intrinsics, columns: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`geometry.unproject` in torch, on the depth's device: x = (u - cx) / fx * z,
    y = (v - cy) / fy * z; (H*W, 3), v outer, u inner. `columns`/`rows` are the float32 pixel
    indices (arange(W), arange(H)) if the caller keeps them."""
    height, width = depth.shape
    if columns is None or rows is None:
        columns = torch.arange(width, dtype=torch.float32, device=depth.device)
        rows = torch.arange(height, dtype=torch.float32, device=depth.device)
    points = torch.empty(height, width, 3, dtype=depth.dtype, device=depth.device)
    torch.mul(((columns - intrinsics.cx) / intrinsics.fx)[None, :], depth, out=points[..., 0])
    torch.mul(((rows - intrinsics.cy) / intrinsics.fy)[:, None], depth, out=points[..., 1])
    points[..., 2] = depth
    return points.reshape(-1, 3)


# --- devices --------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """"auto" is the first CUDA device if there is one, else the CPU; "cpu", "cuda", "cuda:N" as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 is for CUDA devices; on the CPU use fp32 or bf16")
    return DTYPES[name]


def _sync(device: torch.device) -> None:
    """Wait for the device, so that a timing covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


# --- the engine -----------------------------------------------------------------------------


class Engine:
    """Owns one device and up to `max_models` resident models; turns requests + images into results."""

    def __init__(
        self,
        checkpoint_dir: str | Path = "checkpoints",
        device: str = "auto",
        dtype: str = "fp32",
        max_models: int = 2,
        random_weights: bool = False,
        default_encoder: str = "vits",
        threads: Optional[int] = None,
        preprocess: str = "auto",
    ):
        if max_models < 1:
            raise ConfigError(f"max_models must be at least 1, got {max_models}")
        if preprocess not in PREPROCESS:
            raise ConfigError(f"preprocess must be one of {list(PREPROCESS)}, got {preprocess!r}")
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: the engine owns the process's compute
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.dtype_name = dtype
        self.max_models = max_models
        self.random_weights = random_weights
        self.default_encoder = check_encoder(default_encoder)
        if preprocess == "auto":
            preprocess = "torch" if self.device.type == "cuda" else "exact"
        self.preprocess = preprocess
        self._models: OrderedDict[tuple[str, str], DepthAnythingV2] = OrderedDict()
        self._grids: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    # --- models ---

    def model(self, encoder: str, dataset: str) -> DepthAnythingV2:
        """The resident model for (encoder, dataset), loaded on first use; the least recently
        used one is dropped when more than `max_models` would be resident."""
        key = (check_encoder(encoder), check_dataset(dataset))
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = self._load(encoder, dataset)
        if self.device.type == "cpu":
            # oneDNN's fast convolution layout, for the DPT head: about 9 % less forward time on
            # the 2-core CPU at 518x686, outputs equal to 3e-6. On an H100 a quick run showed no
            # gain (bf16 even slower), so GPUs keep the default layout.
            model = model.to(memory_format=torch.channels_last)
        self._models[key] = model
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return model

    def _load(self, encoder: str, dataset: str) -> DepthAnythingV2:
        if self.random_weights:
            # A fixed seed per (encoder, dataset): the same fake model in every process and run.
            seed = P.ENCODERS.index(encoder) * len(P.DATASETS) + P.DATASETS.index(dataset)
            model = random_init_(DepthAnythingV2(encoder, metric=dataset != "relative"), seed=seed)
            return model.to(self.device, self.dtype).eval()
        try:
            model = load_model(self.checkpoint_dir, encoder, dataset, device=self.device, dtype=self.dtype)
        except CheckpointError as exc:
            raise P.ZDepthError(P.MODEL_UNAVAILABLE, str(exc)) from None
        return model.eval()

    def models_loaded(self) -> list[str]:
        return [f"{encoder}_{dataset}" for encoder, dataset in self._models]

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": self.dtype_name, "models": self.models_loaded(), "random_weights": self.random_weights}

    # --- the core call ---

    def run(self, requests: Sequence[PredictRequest], images: Sequence[np.ndarray]) -> list[Result]:
        """Results for validated requests, in order. Requests for the same model whose images
        resize to the same shape share one forward pass. A ZDepthError (an invalid image, a
        model that cannot be loaded) fails the whole call."""
        if len(requests) != len(images):
            raise ValueError(f"{len(requests)} requests but {len(images)} images")
        groups: dict[tuple, list[int]] = {}
        for i, (request, image) in enumerate(zip(requests, images)):
            check_bgr(image)
            shape = resized_shape(image.shape[0], image.shape[1], request.input_size)
            groups.setdefault((request.model_key, shape), []).append(i)
        results: list[Optional[Result]] = [None] * len(requests)
        for ((encoder, dataset), _), indices in groups.items():
            model = self.model(encoder, dataset)  # loaded outside inference mode: usable anywhere
            with torch.inference_mode():
                batch = self._run_batch(model, [requests[i] for i in indices], [images[i] for i in indices])
            for i, result in zip(indices, batch):
                results[i] = result
        return results  # type: ignore[return-value]

    def _run_batch(self, model: DepthAnythingV2, requests: list[PredictRequest], images: list[np.ndarray]) -> list[Result]:
        pre_ms, inputs = [], []
        for request, image in zip(requests, images):
            start = time.perf_counter()
            inputs.append(self._preprocess(image, request.input_size))
            _sync(self.device)
            pre_ms.append(_ms(start))
        start = time.perf_counter()
        output = model(torch.cat(inputs).to(self.dtype))
        _sync(self.device)
        inference_ms = _ms(start)
        results = []
        for i, (request, image) in enumerate(zip(requests, images)):
            start = time.perf_counter()
            result = self._finish(request, image, output[i])
            result.timing = {"pre_ms": pre_ms[i], "inference_ms": inference_ms, "post_ms": _ms(start)}
            results.append(result)
        return results

    def _preprocess(self, image: np.ndarray, input_size: int) -> torch.Tensor:
        if self.preprocess == "exact":
            return torch.from_numpy(preprocess_exact(image, input_size)).to(self.device)
        return preprocess_torch(image, input_size, self.device)

    def _finish(self, request: PredictRequest, image: np.ndarray, output: torch.Tensor) -> Result:
        """One model output -> the request's arrays, on the device until the single copy to the host."""
        output = output.float()
        if request.dataset != "relative":
            output = output * request.max_depth  # the model gives the Sigmoid, in (0, 1)
        depth = postprocess(output, image.shape[0], image.shape[1])
        low, high = torch.stack(torch.aminmax(depth)).tolist()
        out_dtype = torch.float16 if request.output_dtype == "float16" else torch.float32
        arrays = {}
        if request.method == P.POINTCLOUD:
            points = unproject(depth, request.intrinsics_for(*depth.shape), *self._pixel_grid(*depth.shape))
            arrays["points"] = points.to(out_dtype).cpu().numpy()
            if request.with_color:
                arrays["colors"] = np.ascontiguousarray(image[..., ::-1]).reshape(-1, 3)
        else:
            arrays["depth"] = depth.to(out_dtype).cpu().numpy()
        return Result(arrays, low, high, f"{request.encoder}_{request.dataset}")

    def _pixel_grid(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column and row indices as float32 on the device, kept for the last few image sizes."""
        key = (height, width)
        if key not in self._grids:
            self._grids[key] = (
                torch.arange(width, dtype=torch.float32, device=self.device),
                torch.arange(height, dtype=torch.float32, device=self.device),
            )
            if len(self._grids) > GRID_CACHE_SIZE:
                self._grids.popitem(last=False)
        self._grids.move_to_end(key)
        return self._grids[key]

    # --- the old API's calls, for the CLI and notebooks ---

    def request(
        self,
        method: str,
        image_bgr: np.ndarray,
        *,
        encoder: Optional[str] = None,
        dataset: Optional[str] = None,
        max_depth: Optional[float] = None,
        input_size: Optional[int] = None,
        intrinsics: Any = None,
        with_color: bool = False,
        output_dtype: Optional[str] = None,
        camera_info: Any = None,
    ) -> PredictRequest:
        """A PredictRequest for a local image, built by the same validator the server uses
        (`request.parse_predict`), so a bad parameter gives the same message here as on the wire."""
        image = np.ascontiguousarray(check_bgr(image_bgr))
        header = P.request_header(
            method,
            image={"frame": 1, "format": "raw", "shape": list(image.shape)},
            encoder=encoder,
            dataset=dataset,
            max_depth=max_depth,
            input_size=input_size,
            intrinsics=intrinsics,
            with_color=with_color,
            output_dtype=output_dtype,
            camera_info=camera_info,
        )
        # The array is already in memory, so no pixel limit applies to local calls.
        frames = [b"", memoryview(image).cast("B")]
        return parse_predict(header, frames, default_encoder=self.default_encoder, max_pixels=image.shape[0] * image.shape[1])

    def predict(self, method: str, image_bgr: np.ndarray, **fields: Any) -> Result:
        """One image, one request: `run` with a request built by `request(method, image_bgr, **fields)`."""
        return self.run([self.request(method, image_bgr, **fields)], [image_bgr])[0]

    def metric_depth(self, image_bgr: np.ndarray, encoder: Optional[str] = None, dataset: str = "hypersim", max_depth: Optional[float] = None, input_size: int = P.DEFAULT_INPUT_SIZE) -> np.ndarray:
        """Depth in metres, float32 (H, W); max_depth defaults to the dataset's (20 hypersim, 80 vkitti)."""
        result = self.predict(P.METRIC_DEPTH, image_bgr, encoder=encoder, dataset=dataset, max_depth=max_depth, input_size=input_size)
        return result.arrays["depth"]

    def relative_depth(self, image_bgr: np.ndarray, encoder: Optional[str] = None, dataset: str = "hypersim", input_size: int = P.DEFAULT_INPUT_SIZE) -> np.ndarray:
        """The old API's rel_depth: a metric model's depth with max_depth = 1.0; with
        dataset="relative", the relative checkpoint's disparity (larger is nearer)."""
        return self.predict(P.REL_DEPTH, image_bgr, encoder=encoder, dataset=dataset, input_size=input_size).arrays["depth"]

    def pointcloud(
        self,
        image_bgr: np.ndarray,
        intrinsics: Any,
        encoder: Optional[str] = None,
        dataset: str = "hypersim",
        max_depth: Optional[float] = None,
        input_size: int = P.DEFAULT_INPUT_SIZE,
        with_color: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Points float32 (H*W, 3) from metric depth and pinhole intrinsics {fx, fy, cx, cy};
        with `with_color`, (points, colors) where colors are the pixels' uint8 RGB."""
        result = self.predict(
            P.POINTCLOUD, image_bgr, encoder=encoder, dataset=dataset, max_depth=max_depth,
            input_size=input_size, intrinsics=intrinsics, with_color=with_color,
        )
        if with_color:
            return result.arrays["points"], result.arrays["colors"]
        return result.arrays["points"]
