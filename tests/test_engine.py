"""zdepth.engine with real (randomly initialised or saved-and-loaded) models on the CPU.

Plumbing tests use small images and input sizes 56/70 to keep the CPU time low.
"""

import gc
import weakref

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zdepth import geometry
from zdepth import protocol as P
from zdepth.engine import ConfigError, Engine, postprocess, preprocess_exact, preprocess_torch, resized_shape, unproject
from zdepth.model import DepthAnythingV2, random_init_
from zdepth.protocol import ZDepthError
from zdepth.request import Intrinsics

SIZE = 56
K = {"fx": 60.0, "fy": 55.0, "cx": 31.5, "cy": 23.5}


def photo_like(height=48, width=64, seed=0):
    """Natural-ish statistics: smooth shading, a few hard-edged objects and sensor noise."""
    rng = np.random.default_rng(seed)
    shading = cv2.resize(rng.uniform(40, 220, (4, 5, 3)), (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(4):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        shading[y : y + rng.integers(4, height // 2), x : x + rng.integers(4, width // 2)] = rng.uniform(0, 255, 3)
    return np.clip(shading + rng.normal(0, 4, shading.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu", random_weights=True, max_models=2)


# --- pre- and post-processing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, size, expected",
    [
        (480, 640, 518, (518, 686)),
        (720, 1280, 518, (518, 924)),
        (1080, 1920, 518, (518, 924)),
        (200, 300, 518, (518, 784)),  # 777 / 14 = 55.5 rounds half to even: up to 56
        (518, 791, 518, (518, 784)),  # 791 / 14 = 56.5 rounds half to even: down to 56 (not 798)
        (640, 480, 518, (686, 518)),  # portrait
        (510, 510, 510, (518, 518)),  # 510 / 14 = 36.4 rounds to 504 < 510: rounded up instead
        (48, 64, 56, (56, 70)),
    ],
)
def test_resize_rule_matches_the_official_lower_bound(height, width, size, expected):
    assert resized_shape(height, width, size) == expected


def test_torch_preprocessing_matches_the_official_opencv_float64_path():
    for image, size in ((photo_like(480, 640), 518), (photo_like(200, 300, seed=1), 518), (photo_like(48, 64), SIZE)):
        exact = preprocess_exact(image, size)
        fast = preprocess_torch(image, size, torch.device("cpu")).numpy()
        assert exact.shape == fast.shape == (1, 3) + resized_shape(image.shape[0], image.shape[1], size)
        assert exact.dtype == fast.dtype == np.float32
        # float32 rounding of the same maths (mostly of the sample positions, at sharp edges):
        # measured 1.2e-4 at most, where one grey level is 1 / 255 / 0.225 = 0.017 here.
        assert np.abs(fast - exact).max() < 1e-3
    # Channel order and normalisation: a pure blue BGR pixel is high in the last RGB channel.
    blue = np.zeros((56, 56, 3), np.uint8)
    blue[..., 0] = 255
    x = preprocess_torch(blue, SIZE, torch.device("cpu"))[0, :, 0, 0]
    np.testing.assert_allclose(x.numpy(), [-0.485 / 0.229, -0.456 / 0.224, (1 - 0.406) / 0.225], rtol=1e-5)


def test_both_preprocessing_paths_give_the_same_depth(engine):
    assert engine.preprocess == "exact"  # "auto" on the CPU
    fast = Engine(device="cpu", random_weights=True, preprocess="torch")
    image = photo_like(50, 70, seed=3)
    np.testing.assert_allclose(
        fast.metric_depth(image, input_size=70), engine.metric_depth(image, input_size=70), rtol=1e-3, atol=1e-3
    )


def test_postprocessing_returns_the_input_size_with_aligned_corners():
    depth = torch.arange(4 * 5, dtype=torch.float32).reshape(4, 5)
    out = postprocess(depth, 7, 9)
    assert out.shape == (7, 9)
    for (i, j), (k, m) in (((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1))):
        assert out[i, j] == depth[k, m]  # align_corners=True: corners land on corners
    assert out[3, 4] == pytest.approx(depth.mean().item())  # and the centre on the centre
    # Output pixel (1, 1) samples input (0.5, 0.5) with aligned corners; (0.36, 0.33) without.
    assert out[1, 1] == pytest.approx(depth[:2, :2].mean().item())


@pytest.mark.parametrize("height, width", [(48, 64), (47, 61), (64, 30)])
def test_engine_outputs_have_the_image_size(engine, height, width):
    depth = engine.metric_depth(photo_like(height, width), input_size=SIZE)
    assert depth.shape == (height, width) and depth.dtype == np.float32


# --- geometry and the metric/relative relations ---------------------------------------------


def test_torch_unprojection_matches_numpy_on_a_tilted_plane():
    k = Intrinsics(**K)
    v, u = np.mgrid[0:48, 0:64]
    normal, offset = np.array([0.3, 0.2, 1.0]), 4.0
    rays = np.stack([(u - k.cx) / k.fx, (v - k.cy) / k.fy, np.ones(u.shape)], axis=-1)
    depth = (offset / (rays @ normal)).astype(np.float32)
    torch_points = unproject(torch.from_numpy(depth), k).numpy()
    numpy_points = geometry.unproject(depth, k)
    np.testing.assert_allclose(torch_points, numpy_points, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(torch_points @ normal, offset, rtol=1e-5)
    np.testing.assert_array_equal(torch_points[:, 2], depth.ravel())


def test_metric_depth_is_max_depth_times_rel_depth(engine):
    image = photo_like()
    rel = engine.relative_depth(image, input_size=SIZE)  # hypersim model, max_depth 1.0
    assert 0 < rel.min() and rel.max() < 1  # the Sigmoid itself
    for max_depth in (1.0, 7.5, 20.0):
        np.testing.assert_allclose(
            engine.metric_depth(image, max_depth=max_depth, input_size=SIZE), max_depth * rel, rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(engine.metric_depth(image, input_size=SIZE), 20.0 * rel, rtol=1e-5)  # hypersim default
    vkitti_rel = engine.relative_depth(image, dataset="vkitti", input_size=SIZE)
    np.testing.assert_allclose(
        engine.metric_depth(image, dataset="vkitti", input_size=SIZE), 80.0 * vkitti_rel, rtol=1e-5
    )


def test_pointcloud_z_is_the_metric_depth_and_xy_follow_the_intrinsics(engine):
    image = photo_like()
    depth = engine.metric_depth(image, max_depth=10.0, input_size=SIZE)
    points, colors = engine.pointcloud(image, K, max_depth=10.0, input_size=SIZE, with_color=True)
    assert points.shape == (48 * 64, 3) and points.dtype == np.float32
    np.testing.assert_allclose(points[:, 2], depth.ravel(), rtol=1e-6)
    np.testing.assert_allclose(points, geometry.unproject(depth, K), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(colors, image[..., ::-1].reshape(-1, 3))  # RGB, row-major
    assert isinstance(engine.pointcloud(image, Intrinsics(**K), input_size=SIZE), np.ndarray)


def test_relative_dataset_gives_the_raw_relative_output(engine):
    image = photo_like()
    disparity = engine.relative_depth(image, dataset="relative", input_size=SIZE)
    with torch.inference_mode():
        raw = engine.model("vits", "relative")(torch.from_numpy(preprocess_exact(image, SIZE)))
    expected = postprocess(raw[0], 48, 64).numpy()
    np.testing.assert_allclose(disparity, expected, rtol=1e-4, atol=1e-5)
    # max_depth has no meaning for disparity, and metric methods need a metric checkpoint
    with pytest.raises(P.ZDepthError, match="max_depth"):
        engine.predict(P.REL_DEPTH, image, dataset="relative", max_depth=50.0, input_size=SIZE)
    with pytest.raises(P.ZDepthError, match="metric dataset"):
        engine.predict(P.METRIC_DEPTH, image, dataset="relative", input_size=SIZE)


def test_result_fields_and_float16_output(engine):
    image = photo_like()
    result = engine.predict(P.METRIC_DEPTH, image, input_size=SIZE)
    depth = result.arrays["depth"]
    assert result.model == "vits_hypersim"
    assert result.min == pytest.approx(depth.min()) and result.max == pytest.approx(depth.max())
    assert set(result.timing) == {"pre_ms", "inference_ms", "post_ms"} and all(v >= 0 for v in result.timing.values())
    half = engine.predict(P.METRIC_DEPTH, image, input_size=SIZE, output_dtype="float16").arrays["depth"]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), depth, rtol=2e-3)
    points = engine.predict(P.POINTCLOUD, image, input_size=SIZE, intrinsics=K, output_dtype="float16").arrays
    assert points["points"].dtype == np.float16 and "colors" not in points


# --- batching and the model cache -----------------------------------------------------------


def count_batches(model):
    sizes = []
    model.register_forward_hook(lambda _m, inputs, _out: sizes.append(inputs[0].shape[0]))
    return sizes


def test_same_size_requests_share_one_forward_pass_and_match_separate_calls():
    engine = Engine(device="cpu", random_weights=True)
    sizes = count_batches(engine.model("vits", "hypersim"))
    images = [photo_like(seed=s) for s in range(3)]
    requests = [
        engine.request(P.METRIC_DEPTH, image, max_depth=m, input_size=SIZE)
        for image, m in zip(images, (5.0, 10.0, 20.0))
    ]
    batched = engine.run(requests, images)
    assert sizes == [3]
    separate = [engine.run([r], [i])[0] for r, i in zip(requests, images)]
    assert sizes == [3, 1, 1, 1]
    for b, s in zip(batched, separate):
        np.testing.assert_allclose(b.arrays["depth"], s.arrays["depth"], rtol=1e-4, atol=1e-5)
    assert len({r.timing["inference_ms"] for r in batched}) == 1
    # Another size, another input size or another model: separate forward passes, results in order.
    odd = photo_like(40, 64)
    mixed = [
        requests[0],
        engine.request(P.METRIC_DEPTH, odd, input_size=SIZE),
        engine.request(P.METRIC_DEPTH, images[1], input_size=70),
        requests[2],
    ]
    results = engine.run(mixed, [images[0], odd, images[1], images[2]])
    assert sorted(sizes[4:]) == [1, 1, 2]
    assert [r.arrays["depth"].shape for r in results] == [(48, 64), (40, 64), (48, 64), (48, 64)]
    np.testing.assert_allclose(results[3].arrays["depth"], separate[2].arrays["depth"], rtol=1e-4, atol=1e-5)


def test_models_are_an_lru_and_max_depth_and_input_size_are_not_cache_keys():
    engine = Engine(device="cpu", random_weights=True, max_models=1)
    image = photo_like()
    engine.metric_depth(image, input_size=SIZE)
    model = weakref.ref(engine.model("vits", "hypersim"))
    engine.metric_depth(image, max_depth=3.0, input_size=70)
    engine.relative_depth(image, input_size=SIZE)
    engine.pointcloud(image, K, max_depth=50.0, input_size=SIZE)
    assert engine.models_loaded() == ["vits_hypersim"]
    assert engine.model("vits", "hypersim") is model()
    engine.relative_depth(image, dataset="relative", input_size=SIZE)
    assert engine.models_loaded() == ["vits_relative"]  # evicted: max_models=1
    gc.collect()
    assert model() is None  # and really let go, so its memory is free
    assert engine.describe() == {"device": "cpu", "dtype": "fp32", "models": ["vits_relative"], "random_weights": True}


def test_lru_keeps_the_most_recently_used():
    lru = Engine(device="cpu", random_weights=True, max_models=2)
    for dataset in ("hypersim", "vkitti", "hypersim", "relative"):
        lru.model("vits", dataset)
    assert lru.models_loaded() == ["vits_hypersim", "vits_relative"]


# --- checkpoints on disk --------------------------------------------------------------------


def test_a_saved_official_checkpoint_is_loaded_and_follows_the_official_pipeline(checkpoint_dir):
    engine = Engine(checkpoint_dir=checkpoint_dir, device="cpu", preprocess="exact")
    image = photo_like(50, 70)
    depth = engine.metric_depth(image, max_depth=20.0, input_size=70)
    # The official infer_image, step by step, on the model the conftest fixture saved.
    reference = random_init_(DepthAnythingV2("vits", metric=True), seed=1).eval()
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0
    h, w = resized_shape(50, 70, 70)
    rgb = (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.inference_mode():
        out = reference(torch.from_numpy(rgb.transpose(2, 0, 1)[None].astype(np.float32))) * 20.0
        expected = F.interpolate(out[:, None], (50, 70), mode="bilinear", align_corners=True)[0, 0].numpy()
    np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5)
    assert engine.models_loaded() == ["vits_hypersim"]


def test_a_missing_checkpoint_is_model_unavailable_naming_the_file(tmp_path):
    engine = Engine(checkpoint_dir=tmp_path, device="cpu")
    with pytest.raises(ZDepthError) as info:
        engine.metric_depth(photo_like(), dataset="vkitti", input_size=SIZE)
    assert info.value.code == P.MODEL_UNAVAILABLE
    assert "depth_anything_v2_metric_vkitti_vits.pth" in info.value.message
    assert "zdepth weights get vits --dataset vkitti" in info.value.message
    assert engine.models_loaded() == []


# --- every bad input gets a clear error -----------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, i: e.metric_depth(i, encoder="vith"), "`encoder` must be one of"),
        (lambda e, i: e.metric_depth(i, dataset="nyu"), "`dataset` must be one of"),
        (lambda e, i: e.metric_depth(i, input_size=100), "`input_size` must be a multiple of 14"),
        (lambda e, i: e.metric_depth(i, input_size=42), "`input_size` must be a multiple of 14 from 56"),
        (lambda e, i: e.metric_depth(i, input_size=1806), "to 1792, got 1806"),
        (lambda e, i: e.metric_depth(i, input_size=True), "got True"),
        (lambda e, i: e.metric_depth(i, input_size=56.0), "got 56.0"),
        (lambda e, i: e.metric_depth(i, max_depth=0), "`max_depth` must be a finite number > 0, got 0"),
        (lambda e, i: e.metric_depth(i, max_depth=-5.0), "got -5.0"),
        (lambda e, i: e.metric_depth(i, max_depth=float("nan")), "got nan"),
        (lambda e, i: e.metric_depth(i, max_depth=float("inf")), "got inf"),
        (lambda e, i: e.pointcloud(i, dict(K, fx=float("nan"))), "`intrinsics.fx` must be a finite number"),
        (lambda e, i: e.pointcloud(i, dict(K, cy=float("inf"))), "`intrinsics.cy` must be a finite number"),
        (lambda e, i: e.pointcloud(i, dict(K, fx=0.0)), "fx and fy must be > 0"),
        (lambda e, i: e.pointcloud(i, dict(K, fy=-1.0)), "fx and fy must be > 0"),
        (lambda e, i: e.pointcloud(i, {"fx": 1.0, "fy": 1.0}), r"lacks \['cx', 'cy'\]"),
        (lambda e, i: e.pointcloud(i, None), "pointcloud needs `intrinsics`"),
        (lambda e, i: e.pointcloud(i, K, dataset="relative"), "pointcloud needs a metric dataset"),
        (lambda e, i: e.metric_depth(i[..., 0]), r"shape \(H, W, 3\).*\(48, 64\)"),
        (lambda e, i: e.metric_depth(np.dstack([i, i[..., :1]])), r"\(48, 64, 4\)"),
        (lambda e, i: e.metric_depth(i.astype(np.float32)), "uint8, got float32"),
        (lambda e, i: e.run([e.request(P.METRIC_DEPTH, i)], [i.astype(np.float64)]), "uint8, got float64"),
    ],
)
def test_bad_parameters_and_images_are_bad_requests(call, message):
    fresh = Engine(device="cpu", random_weights=True)
    with pytest.raises(ZDepthError, match=message) as info:
        call(fresh, photo_like())
    assert info.value.code == P.BAD_REQUEST
    assert fresh.models_loaded() == []  # refused before any model was touched


def test_device_and_dtype_configuration_errors():
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        Engine(device="cpu", dtype="fp16")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Engine(device="cpu", dtype="fp8")
    with pytest.raises(ConfigError, match="device must be"):
        Engine(device="tpu")
    with pytest.raises(ConfigError, match="max_models"):
        Engine(device="cpu", max_models=0)
    with pytest.raises(ConfigError, match="preprocess"):
        Engine(device="cpu", preprocess="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            Engine(device="cuda:0")
        assert Engine(device="auto").device == torch.device("cpu")


def test_bf16_on_the_cpu_is_close_to_fp32(engine):
    image = photo_like()
    bf16 = Engine(device="cpu", dtype="bf16", random_weights=True)
    low = bf16.metric_depth(image, input_size=SIZE)
    assert low.dtype == np.float32  # results are float32 whatever the compute dtype
    error = np.abs(low - engine.metric_depth(image, input_size=SIZE)).mean()
    assert 0 < error < 0.01 * 20  # measured ~0.05 m of 20 m: bf16 really ran, and stayed close


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu_batches_and_unprojects_there(engine):
    images = [photo_like(seed=s) for s in range(3)]
    reference = engine.metric_depth(images[0], input_size=70)
    for dtype, tolerance in (("fp32", 0.02), ("fp16", 0.2), ("bf16", 0.5)):  # metres, of max_depth 20
        gpu = Engine(device="cuda", dtype=dtype, random_weights=True)
        assert gpu.preprocess == "torch"  # "auto" on CUDA
        error = np.abs(gpu.metric_depth(images[0], input_size=70) - reference)
        print(f"cuda {dtype} vs cpu fp32: mean |diff| {error.mean():.2e} m, max {error.max():.2e} m")
        assert error.mean() < tolerance
    gpu = Engine(device="cuda", random_weights=True)
    requests = [gpu.request(P.POINTCLOUD, image, intrinsics=K, input_size=70) for image in images]
    batched = gpu.run(requests, images)
    for request, image, result in zip(requests, images, batched):
        alone = gpu.run([request], [image])[0].arrays["points"]
        # cuDNN picks other (TF32) convolution kernels for another batch size: ~1e-3 relative.
        np.testing.assert_allclose(result.arrays["points"], alone, rtol=1e-2, atol=1e-2)
        depth = result.arrays["points"][:, 2].reshape(48, 64)
        np.testing.assert_allclose(result.arrays["points"], geometry.unproject(depth, K), rtol=1e-5, atol=1e-5)
    assert (
        gpu.predict(P.METRIC_DEPTH, images[0], output_dtype="float16", input_size=70).arrays["depth"].dtype
        == np.float16
    )
