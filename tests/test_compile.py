"""Compiled graphs (zdepth/compiled.py): parity with eager, the LRU bound, the fallback to eager,
background builds, and warm-up through a real server.

torch.compile with inductor takes about 20 s per vits graph on the 2-core CPU (a few s when
inductor's on-disk cache already holds the same graph), so these tests use the smallest input
(56) and share graphs where they can; the batching and LRU tests use dynamo's "eager" backend,
which exercises the same code and cache without inductor's C++ compile.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
import weakref

import numpy as np
import pytest
import torch

from tests.servers import TEST_INPUT_SIZE, Server, raw_request
from tests.test_engine import photo_like
from zdepth import protocol as P
from zdepth.compiled import CompiledGraphs, GraphKey, batch_bucket, batch_buckets, fresh_forward
from zdepth.config import parse_image_sizes
from zdepth.engine import ConfigError, Engine

# Square (56x56 -> 56x56) and non-square (48x64 -> 56x70) images at input size 56.
SIZES = {"square": (56, 56), "non-square": (48, 64)}
PARITY_RTOL = 1e-5  # compiled vs eager, fp32 on the CPU: relative to the largest value


@pytest.fixture(scope="module")
def compiled():
    return Engine(device="cpu", random_weights=True, compile="default")


@pytest.fixture(scope="module")
def eager():
    return Engine(device="cpu", random_weights=True)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dataset", ["hypersim", "relative"])
@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_compiled_matches_eager_in_fp32(compiled, eager, dataset, size):
    image = photo_like(*SIZES[size], seed=5)
    method = P.REL_DEPTH if dataset == "relative" else P.METRIC_DEPTH
    first = compiled.predict(method, image, dataset=dataset, input_size=TEST_INPUT_SIZE)
    again = compiled.predict(method, image, dataset=dataset, input_size=TEST_INPUT_SIZE)
    reference = eager.predict(method, image, dataset=dataset, input_size=TEST_INPUT_SIZE)
    assert "compile_ms" in first.timing and first.timing["compile_ms"] <= first.timing["inference_ms"]
    assert "compile_ms" not in again.timing  # the graph is held: built once
    assert "compile_ms" not in reference.timing
    assert compiled.graphs.failure is None
    for result in (first, again):
        assert relative_error(result.arrays["depth"], reference.arrays["depth"]) <= PARITY_RTOL


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16/bf16 compiled graphs and CUDA graphs)"
)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compiled_cuda_graphs_match_eager_in_half_precision(dtype):
    """reduce-overhead (CUDA graphs) against eager: metric at a non-square frame, relative square."""
    eager_cuda = Engine(device="cuda", dtype=dtype, random_weights=True)
    compiled_cuda = Engine(
        device="cuda", dtype=dtype, random_weights=True, compile="reduce-overhead", compile_in_background=True
    )
    assert compiled_cuda.graphs.cuda_graphs and not compiled_cuda.compile_in_background  # CUDA graphs: built inline
    for dataset, (height, width) in (("hypersim", (480, 640)), ("relative", (518, 518))):
        method = P.REL_DEPTH if dataset == "relative" else P.METRIC_DEPTH
        image = photo_like(height, width, seed=2)
        compiled_cuda.warm_up([(height, width, P.DEFAULT_INPUT_SIZE)], [("vits", dataset)])
        reference = eager_cuda.predict(method, image, dataset=dataset).arrays["depth"]
        for _ in range(3):  # the graph is recorded, then replayed
            result = compiled_cuda.predict(method, image, dataset=dataset)
            assert "compile_ms" not in result.timing
            assert relative_error(result.arrays["depth"], reference) <= 1e-3


def eager_backend(model, mode):
    """dynamo's tracing and guards without inductor's C++ compile: seconds instead of tens of them."""
    return torch.compile(fresh_forward(model), backend="eager", dynamic=False, fullgraph=True)


def test_batches_are_padded_to_buckets_and_match_single_calls(eager):
    assert [batch_bucket(n, 8) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 9]
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(1) == [1]
    engine = Engine(device="cpu", random_weights=True, compile="default", max_batch=4)
    engine.graphs = CompiledGraphs("default", engine.device, compiler=eager_backend)
    images = [photo_like(48, 64, seed=s) for s in range(3)]
    requests = [engine.request(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE) for image in images]
    batch = engine.run(requests, images)  # 3 requests -> one padded batch of 4
    assert [key.batch for key in engine.graphs.keys()] == [4]
    assert all("compile_ms" in result.timing for result in batch)
    for image, result in zip(images, batch):
        single = eager.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE).arrays["depth"]
        assert relative_error(result.arrays["depth"], single) <= PARITY_RTOL
    again = engine.run(requests, images)  # the held graph: no build
    assert not any("compile_ms" in result.timing for result in again)
    pair = engine.run(requests[:2], images[:2])  # bucket 2: a graph of its own
    assert [key.batch for key in engine.graphs.keys()] == [4, 2] and "compile_ms" in pair[0].timing


def test_the_graph_lru_holds_at_most_max_graphs_and_frees_what_it_drops():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    built = []

    def tracked(module, mode):
        graph = eager_backend(module, mode)
        built.append(weakref.ref(graph))
        return graph

    graphs = CompiledGraphs("default", torch.device("cpu"), max_graphs=2, compiler=tracked)
    keys = [GraphKey("vits", "hypersim", (side, side), 1, "fp32") for side in (8, 10, 12)]
    with torch.inference_mode():
        for key in keys:
            x = torch.randn(1, 3, *key.shape)
            output, build_ms = graphs.run(key, model, x)
            assert build_ms is not None and torch.allclose(output, model(x))
        assert graphs.keys() == keys[1:]  # the oldest was dropped
        gc.collect()
        assert built[0]() is None, "a dropped graph must not stay alive"
        assert graphs.run(keys[1], model, torch.randn(1, 3, 10, 10))[1] is None  # held: no build
        assert graphs.keys() == [keys[2], keys[1]]  # ...and now the most recently used
        assert graphs.run(keys[0], model, torch.randn(1, 3, 8, 8))[1] is not None  # rebuilt
        assert graphs.keys() == [keys[1], keys[0]] and len(built) == 4
    assert graphs.failure is None


def test_a_model_dropped_from_the_model_lru_takes_its_graphs_along():
    engine = Engine(device="cpu", random_weights=True, compile="default", max_models=1)
    engine.graphs = CompiledGraphs("default", engine.device, compiler=eager_backend)
    image = photo_like(48, 64)
    engine.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE)
    model = weakref.ref(engine.model("vits", "hypersim"))
    assert engine.graphs_built() == ["vits_hypersim:56x70:b1:fp32"]
    engine.predict(P.REL_DEPTH, image, dataset="relative", input_size=TEST_INPUT_SIZE)
    assert engine.models_loaded() == ["vits_relative"] and engine.graphs_built() == ["vits_relative:56x70:b1:fp32"]
    gc.collect()
    assert model() is None, "a graph kept the evicted model alive"


def test_a_compile_failure_falls_back_to_eager_with_one_warning(eager, caplog):
    # A machine without a working C++ compiler: inductor's CPU backend cannot build its kernels
    # (and no cached kernels hide it). torch's own patch() restores the config afterwards.
    import torch._inductor.config as inductor_config

    engine = Engine(device="cpu", random_weights=True, compile="default")
    caplog.set_level(logging.WARNING, logger="zdepth.compiled")
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        for size in SIZES.values():
            image = photo_like(*size, seed=1)
            result = engine.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE)
            reference = eager.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE)
            np.testing.assert_array_equal(result.arrays["depth"], reference.arrays["depth"])
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert engine.graphs.keys() == [] and engine.graphs_built() == []  # nothing pretends to be compiled
    assert "cxx" in engine.graphs.failure.lower() or "compiler" in engine.graphs.failure.lower(), engine.graphs.failure


def test_a_new_shape_builds_in_the_background_while_its_requests_run_eagerly(eager):
    engine = Engine(device="cpu", random_weights=True, compile="default", compile_in_background=True)
    image = photo_like(48, 64, seed=5)  # the parity test's shape: inductor's disk cache makes it quick
    first = engine.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE)
    assert "compile_ms" not in first.timing
    reference = eager.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE).arrays["depth"]
    np.testing.assert_array_equal(first.arrays["depth"], reference)  # eager: the very same numbers
    deadline = time.monotonic() + 300
    while not engine.graphs.keys() and engine.graphs.failure is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.graphs.failure is None
    assert [key.shape for key in engine.graphs.keys()] == [(56, 70)]
    later = engine.predict(P.METRIC_DEPTH, image, input_size=TEST_INPUT_SIZE)
    assert "compile_ms" not in later.timing
    assert relative_error(later.arrays["depth"], reference) <= PARITY_RTOL


def test_configuration_errors():
    with pytest.raises(ConfigError, match="compile must be one of"):
        Engine(device="cpu", random_weights=True, compile="fast")
    with pytest.raises(ConfigError, match="at least 1"):
        Engine(device="cpu", random_weights=True, compile="default", max_graphs=0)
    assert parse_image_sizes("480x640, 720x1280@518,48x64@56") == [(480, 640, 518), (720, 1280, 518), (48, 64, 56)]
    for bad in ("640", "480x640@500", "0x640", "axb", "480x640,"):
        with pytest.raises(ValueError, match="image size"):
            parse_image_sizes(bad)


def test_warm_up_reports_warming_then_serves_the_first_request_as_fast_as_later_ones(tmp_path, checkpoint_dir):
    """A served worker with --compile and --warmup-shapes: health shows it warming while it builds
    its graph, and once ready the first request needs no compile and takes no longer than the
    later ones (compared within this run). Without the warm-up, `graphs` would be empty when the
    worker turns ready, and its first requests would run eagerly while the graph built."""
    # 2 threads like the parity tests' engines: the graph is then the one they built, and inductor's
    # disk cache makes the warm-up quick when they ran first.
    server = Server(
        tmp_path,
        checkpoint_dir,
        extra=[
            "--compile",
            "default",
            "--warmup-shapes",
            f"48x64@{TEST_INPUT_SIZE}",
            "--preload",
            "vits:hypersim",
            "--threads",
            "2",
        ],
        wait_workers=0,
    )
    try:
        seen_warming = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            workers = server.health()["workers"]
            if not workers:  # not registered yet
                time.sleep(0.1)
                continue
            worker = workers[0]
            seen_warming |= worker["warming"]
            if worker["ready"] and not worker["warming"]:
                break
            time.sleep(0.1)
        assert seen_warming, "health never showed the worker warming"
        assert worker["ready"], server.process.log()
        built = ["vits_hypersim:56x70:b1:fp32"]  # 48x64 at input 56: the model input is 56x70
        assert worker["graphs"] == built  # built before the worker took any request
        image = photo_like(48, 64, seed=7)
        header = P.request_header(
            P.METRIC_DEPTH,
            id=1,
            image={"frame": 1, "format": "raw", "shape": list(image.shape)},
            input_size=TEST_INPUT_SIZE,
            timeout_ms=60_000,
        )
        timings = []
        for _ in range(6):
            reply, _ = raw_request(server.endpoint, header, [image.tobytes()], timeout_s=60)
            assert reply["ok"], reply
            timings.append(reply["timing"])
        assert not any("compile_ms" in t for t in timings), timings
        assert server.health()["workers"][0]["graphs"] == built  # nothing new was compiled
        later = statistics.median(t["inference_ms"] for t in timings[1:])
        assert timings[0]["inference_ms"] <= 3 * later + 20, timings  # a compile would be ~100x
    finally:
        server.stop()
