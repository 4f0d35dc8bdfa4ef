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
import logging
import threading
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
from .compiled import CompiledGraphs, GraphKey, batch_bucket, batch_buckets
from .config import COMPILE_MODES, DEFAULT_MAX_GRAPHS, DTYPE_NAMES, WorkerOptions
from .errors import CheckpointError, ConfigError
from .images import check_bgr
from .model import DepthAnythingV2, random_init_
from .model.checkpoints import load_model
from .request import ImageSpec, Intrinsics, PredictRequest, check_dataset, check_encoder, check_predict
from .resize import resized_shape

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))  # fp32, fp16, bf16
PREPROCESS = ("auto", "torch", "exact")
GRID_CACHE_SIZE = 16

log = logging.getLogger("zdepth.engine")


@dataclass
class Result:
    """One request's answer: the arrays to send, depth min/max, the model, and timings in ms."""

    arrays: dict[str, np.ndarray]
    min: float
    max: float
    model: str
    timing: dict[str, float] = field(default_factory=dict)


# --- pre- and post-processing ---------------------------------------------------------------


def preprocess_exact(image_bgr: np.ndarray, input_size: int) -> np.ndarray:
    """The official pre-processing, operation for operation (OpenCV on float64): (1, 3, h, w) float32."""
    height, width = resized_shape(image_bgr.shape[0], image_bgr.shape[1], input_size)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB) / 255.0
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    rgb = (rgb - np.array(P.IMAGENET_MEAN)) / np.array(P.IMAGENET_STD)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, shaped (1, 3, 1, 1), kept on the device."""
    mean = torch.tensor(P.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(P.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def preprocess_torch(image_bgr: np.ndarray, input_size: int, device: torch.device) -> torch.Tensor:
    """The same steps in float32 torch on `device`: the uint8 image crosses once (3x smaller than
    float32) and the resize runs there. torch's bicubic uses the same kernel as OpenCV's
    INTER_CUBIC (a = -0.75, half-pixel centres, no antialias, clamped borders), so this differs
    from `preprocess_exact` by float32 rounding only. Returns (1, 3, h, w) float32."""
    height, width = resized_shape(image_bgr.shape[0], image_bgr.shape[1], input_size)
    # torch wants a writable array with positive strides; a frame's read-only view is copied once.
    x = to_device(np.require(image_bgr, np.uint8, ("C", "W")), device)
    x = x.permute(2, 0, 1).flip(0).unsqueeze(0).float()  # BGR HWC -> RGB NCHW
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    mean, std = _normalisation(device)
    return (x - mean) / std


def postprocess(depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h', w') model output -> (height, width): bilinear, align_corners=True, as the official code."""
    return F.interpolate(depth[None, None], size=(height, width), mode="bilinear", align_corners=True)[0, 0]


def unproject(
    depth: torch.Tensor,
    intrinsics: Intrinsics,
    columns: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
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
    """ "auto" is the first CUDA device if there is one, else the CPU; "cpu", "cuda", "cuda:N" as named."""
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


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` (sharing the array's memory on the CPU). To CUDA it goes through
    pinned (page-locked) host memory and a non-blocking copy: the copy engine reads pinned memory
    directly, and the copy is queued on the stream instead of stalling the host."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array, copied once (not at all when it is already on the CPU). From
    CUDA it lands in pinned host memory (a non-blocking copy, then one wait for the stream); the
    array keeps that block alive until the reply is sent, then torch's host allocator reuses it."""
    if tensor.device.type != "cuda":
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


# --- the engine -----------------------------------------------------------------------------


class Engine:
    """Owns one device and up to `max_models` resident models; turns requests + images into results."""

    def __init__(
        self,
        checkpoint_dir: str | Path = WorkerOptions.checkpoint_dir,
        device: str = WorkerOptions.device,
        dtype: str = WorkerOptions.dtype,
        max_models: int = WorkerOptions.max_models,
        random_weights: bool = False,
        default_encoder: str = WorkerOptions.encoder,
        threads: Optional[int] = None,
        preprocess: str = "auto",
        compile: str = "off",
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        max_batch: int = WorkerOptions.max_batch,
        compile_in_background: bool = False,
    ):
        """`compile` (zdepth/compiled.py): "off" runs the model eagerly; "default", "reduce-overhead"
        or "max-autotune" run it through torch.compile graphs, one per (model, input shape, batch
        bucket, dtype), at most `max_graphs` held. Batches are padded to the buckets of
        `max_batch` (1, 2, 4, ... max_batch). A graph not built yet is built inline (the results'
        timing then has `compile_ms`) or, with `compile_in_background` (the worker's choice), in a
        background thread while the batches that need it run eagerly: no request waits for a
        build, though on a CPU the build takes cores from them meanwhile. CUDA graphs are always
        built inline (they are recorded per thread). `warm_up` builds graphs ahead of traffic."""
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
        if compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {list(COMPILE_MODES)}, got {compile!r}")
        if max_batch < 1 or max_graphs < 1:
            raise ConfigError(f"max_batch and max_graphs must be at least 1, got {max_batch} and {max_graphs}")
        self.max_batch = max_batch
        self.graphs = None if compile == "off" else CompiledGraphs(compile, self.device, max_graphs)
        self.compile_in_background = compile_in_background and self.graphs is not None and not self.graphs.cuda_graphs
        self._building: set[GraphKey] = set()  # graphs a background thread is building or will build
        self._building_lock = threading.Lock()
        self._one_build_at_a_time = threading.Lock()

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
            dropped, _ = self._models.popitem(last=False)
            if self.graphs is not None:
                self.graphs.forget(*dropped)  # its graphs hold it too
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

    def graphs_built(self) -> list[str]:
        """The compiled graphs held, least recently used first, e.g. "vits_hypersim:518x686:b1:fp16"."""
        return [str(key) for key in self.graphs.keys()] if self.graphs is not None else []

    def models_loaded(self) -> list[str]:
        return [f"{encoder}_{dataset}" for encoder, dataset in self._models]

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": self.dtype_name,
            "models": self.models_loaded(),
            "random_weights": self.random_weights,
        }

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

    def _run_batch(
        self, model: DepthAnythingV2, requests: list[PredictRequest], images: list[np.ndarray]
    ) -> list[Result]:
        pre_ms, inputs = [], []
        for request, image in zip(requests, images):
            start = time.perf_counter()
            inputs.append(self._preprocess(image, request.input_size))
            _sync(self.device)
            pre_ms.append(_ms(start))
        start = time.perf_counter()
        output, compile_ms = self._forward(requests[0].model_key, model, torch.cat(inputs).to(self.dtype))
        _sync(self.device)
        inference_ms = _ms(start)
        extra = {} if compile_ms is None else {"compile_ms": round(compile_ms, 3)}  # inference_ms includes it
        results = []
        for i, (request, image) in enumerate(zip(requests, images)):
            start = time.perf_counter()
            result = self._finish(request, image, output[i])
            result.timing = {"pre_ms": pre_ms[i], "inference_ms": inference_ms, **extra, "post_ms": _ms(start)}
            results.append(result)
        return results

    # --- compiled graphs (zdepth/compiled.py) ---

    def _forward(
        self, model_key: tuple[str, str], model: DepthAnythingV2, x: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[float]]:
        """`model(x)` for x (n, 3, h, w) in the engine's dtype, eagerly or through the compiled graph
        of its key, padded to the batch bucket (repeating the last input) and cut back to n:
        (output (n, h, w), the ms spent building the graph in this call, or None)."""
        if self.graphs is None:
            return model(x), None
        n = x.shape[0]
        key = GraphKey(
            *model_key, shape=tuple(x.shape[2:]), batch=batch_bucket(n, self.max_batch), dtype=self.dtype_name
        )
        if self.compile_in_background and key not in self.graphs:
            if self.graphs.failure is None:
                self._build_later(key, model)
            return model(x), None
        if key.batch > n:
            x = torch.cat([x, x[-1:].expand(key.batch - n, -1, -1, -1)])
        output, build_ms = self.graphs.run(key, model, x)
        return output[:n], build_ms

    def _build_later(self, key: GraphKey, model: DepthAnythingV2) -> None:
        """Build `key`'s graph in a daemon thread (one build at a time; a process that exits
        mid-build does not wait for it), once per key, at most `max_graphs` queued."""
        with self._building_lock:
            if key in self._building or len(self._building) >= self.graphs.max_graphs:
                return
            self._building.add(key)
        threading.Thread(
            target=self._build_in_background, args=(key, model), name="zdepth-compile", daemon=True
        ).start()

    def _build_in_background(self, key: GraphKey, model: DepthAnythingV2) -> None:
        try:
            with self._one_build_at_a_time:
                self._build(key, model)
        except Exception:  # the graph falls back to eager inside CompiledGraphs; this is anything else
            log.exception("building %s in the background failed", key)
        finally:
            with self._building_lock:
                self._building.discard(key)

    def _build(self, key: GraphKey, model: DepthAnythingV2) -> Optional[float]:
        """Build `key`'s graph by running it once on zeros; the ms it took, None if it was held."""
        x = torch.zeros(key.batch, 3, *key.shape, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            if self.graphs is None:
                model(x)
                _sync(self.device)
                return None
            _, build_ms = self.graphs.run(key, model, x)
            _sync(self.device)
        return build_ms

    def warm_up(
        self, image_sizes: Sequence[tuple[int, int, int]], models: Sequence[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        """Run each model once at each image size (height, width, input_size) and each batch
        bucket, so that no request pays a first call: with `compile`, this builds the graphs;
        without, it runs one eager forward pass per shape and batch.
        Returns one row per (model, input shape, batch) with the ms it took."""
        rows = []
        for encoder, dataset in models:
            model = self.model(encoder, dataset)
            for shape in dict.fromkeys(resized_shape(*size) for size in image_sizes):
                for batch in batch_buckets(self.max_batch):
                    key = GraphKey(encoder, dataset, shape, batch, self.dtype_name)
                    start = time.perf_counter()
                    self._build(key, model)
                    rows.append(
                        {"model": f"{encoder}_{dataset}", "shape": list(shape), "batch": batch, "ms": _ms(start)}
                    )
        return rows

    def _preprocess(self, image: np.ndarray, input_size: int) -> torch.Tensor:
        if self.preprocess == "exact":
            return to_device(preprocess_exact(image, input_size), self.device)
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
            arrays["points"] = to_host(points.to(out_dtype))
            if request.with_color:
                arrays["colors"] = np.ascontiguousarray(image[..., ::-1]).reshape(-1, 3)
        else:
            arrays["depth"] = to_host(depth.to(out_dtype))
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

    # --- the local API (the CLI, scripts, notebooks): `request` builds a validated PredictRequest
    # for `run`; `predict` and the old API's names run one image ---

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
        """A PredictRequest for a local BGR uint8 (H, W, 3) image, checked by the validator the
        server uses (`request.check_predict`), so a bad parameter gives the same message here as
        on the wire. The image is already in memory: no pixel limit applies."""
        fields = dict(
            method=method,
            encoder=encoder,
            dataset=dataset,
            max_depth=max_depth,
            input_size=input_size,
            intrinsics=intrinsics,
            with_color=with_color,
            output_dtype=output_dtype,
            camera_info=camera_info,
        )
        image = ImageSpec(format="raw", shape=check_bgr(image_bgr).shape)
        return check_predict(fields, image, self.default_encoder)

    def predict(self, method: str, image_bgr: np.ndarray, **fields: Any) -> Result:
        """One image, one request: `run` with a request built by `request(method, image_bgr, **fields)`."""
        return self.run([self.request(method, image_bgr, **fields)], [image_bgr])[0]

    def metric_depth(
        self,
        image_bgr: np.ndarray,
        encoder: Optional[str] = None,
        dataset: str = "hypersim",
        max_depth: Optional[float] = None,
        input_size: int = P.DEFAULT_INPUT_SIZE,
    ) -> np.ndarray:
        """Depth in metres, float32 (H, W); max_depth defaults to the dataset's (20 hypersim, 80 vkitti)."""
        result = self.predict(
            P.METRIC_DEPTH, image_bgr, encoder=encoder, dataset=dataset, max_depth=max_depth, input_size=input_size
        )
        return result.arrays["depth"]

    def relative_depth(
        self,
        image_bgr: np.ndarray,
        encoder: Optional[str] = None,
        dataset: str = "hypersim",
        input_size: int = P.DEFAULT_INPUT_SIZE,
    ) -> np.ndarray:
        """The old API's rel_depth: a metric model's depth with max_depth = 1.0; with
        dataset="relative", the relative checkpoint's disparity (larger is nearer)."""
        return self.predict(P.REL_DEPTH, image_bgr, encoder=encoder, dataset=dataset, input_size=input_size).arrays[
            "depth"
        ]

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
            P.POINTCLOUD,
            image_bgr,
            encoder=encoder,
            dataset=dataset,
            max_depth=max_depth,
            input_size=input_size,
            intrinsics=intrinsics,
            with_color=with_color,
        )
        if with_color:
            return result.arrays["points"], result.arrays["colors"]
        return result.arrays["points"]
