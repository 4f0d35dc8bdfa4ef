"""`zdepth serve` as a real subprocess, spoken to over real sockets (tcp and ipc)."""

from __future__ import annotations

import math
import signal
import time

import numpy as np
import pytest
import zmq

from clients import DepthClient, ServerError
from tests.servers import TEST_INPUT_SIZE, Process, Server, free_port_block, health, raw_request
from zdepth import protocol as P

KEY = "zd-test-key-123"
INTRINSICS = {"fx": 50.0, "fy": 60.0, "cx": 31.5, "cy": 23.5}


def image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", img)
    assert ok
    return data.tobytes()


def predict_header(method: str, **fields) -> dict:
    return P.request_header(method, id=fields.pop("id", 7), input_size=TEST_INPUT_SIZE, **fields)


def raw_image_desc(img: np.ndarray) -> dict:
    return {"frame": 1, "format": "raw", "shape": list(img.shape)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(
        tmp_path_factory.mktemp("serve"), checkpoint_dir, workers=2, extra=["--api-key", KEY, "--require-auth"]
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with DepthClient(server.endpoint, key=KEY, timeout=30, input_size=TEST_INPUT_SIZE) as c:
        yield c


# --- every method, tcp and ipc ----------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_every_method_and_geometry(server, transport):
    endpoint = server.endpoint if transport == "tcp" else server.ipc
    img = image()
    with DepthClient(endpoint, key=KEY, timeout=30, input_size=TEST_INPUT_SIZE) as c:
        assert c.health()["status"] in ("healthy", "degraded")
        assert c.describe()["version"] == P.VERSION
        # The exact forms (the client's default is compact: tests/test_compact.py)
        metric = c.metric_depth(img, max_depth=20.0, output_dtype="float32", compression="none")
        rel = c.relative_depth(img)
        cloud = c.pointcloud(img, INTRINSICS, max_depth=20.0, server_side=True)
    depth = metric.depth
    assert depth.shape == (48, 64) and depth.dtype == np.float32
    assert float(depth.std()) > 1e-3, "random weights must give a non-constant depth"
    assert math.isclose(metric.min, float(depth.min()), rel_tol=1e-5) and math.isclose(
        metric.max, float(depth.max()), rel_tol=1e-5
    )
    np.testing.assert_allclose(rel.depth, depth / 20.0, rtol=1e-4, atol=1e-6)
    points = cloud.points
    assert points.shape == (48 * 64, 3)
    np.testing.assert_allclose(points[:, 2], depth.reshape(-1), rtol=1e-5, atol=1e-6)
    v, u = np.mgrid[0:48, 0:64]
    z = depth.reshape(-1)
    np.testing.assert_allclose(points[:, 0], (u.reshape(-1) - 31.5) / 50.0 * z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(points[:, 1], (v.reshape(-1) - 23.5) / 60.0 * z, rtol=1e-4, atol=1e-5)


def test_jpeg_and_raw_inputs_agree_in_shape(client):
    img = image(40, 30)
    by_jpeg = client.metric_depth(jpeg(img))
    by_raw = client.metric_depth(img)
    assert by_jpeg.depth.shape == by_raw.depth.shape == (40, 30)


def test_reply_reports_worker_timing(client):
    result = client.metric_depth(image())
    assert result.worker and result.model == "vits_hypersim"
    assert {"decode_ms", "inference_ms", "post_ms"} <= set(result.timing)


def test_bare_req_socket(server):
    """Any language's plain REQ socket works: REQ adds the empty delimiter itself."""
    img = image()
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        header = predict_header(P.POINTCLOUD, key=KEY, image=raw_image_desc(img), intrinsics=INTRINSICS)
        sock.send_multipart([P.packb(header), img.tobytes()])
        assert sock.poll(30_000)
        reply = sock.recv_multipart()
    finally:
        sock.close()
    head, arrays = P.unpack(reply)
    assert head["ok"] and head["id"] == 7
    assert arrays["points"].shape == (img.shape[0] * img.shape[1], 3)


def test_two_workers_share_load(server):
    before = {w["name"]: w["served"] for w in server.health()["workers"]}
    assert len(before) == 2
    img = image()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    for i in range(8):
        sock.send_multipart(
            [b"", P.packb(predict_header(P.METRIC_DEPTH, id=i, key=KEY, image=raw_image_desc(img))), img.tobytes()]
        )
    ids = set()
    for _ in range(8):
        assert sock.poll(60_000)
        head, _ = P.unpack(sock.recv_multipart()[1:])
        assert head["ok"], head
        ids.add(head["id"])
    sock.close()
    assert ids == set(range(8))
    after = {w["name"]: w["served"] for w in server.health()["workers"]}
    assert all(after[name] > before[name] for name in before), (before, after)


# --- auth -----------------------------------------------------------------------------


def test_auth(server):
    img = image()
    served_before = sum(w["served"] for w in server.health()["workers"])
    for key, expected in ((None, P.UNAUTHORIZED), ("wrong-key", P.UNAUTHORIZED)):
        header = predict_header(P.METRIC_DEPTH, key=key, image=raw_image_desc(img))
        head, _ = raw_request(server.endpoint, header, [img.tobytes()])
        assert not head["ok"] and head["error"]["code"] == expected
        assert "wrong-key" not in head["error"]["message"]
    head, _ = raw_request(server.endpoint, P.request_header(P.STATS, id=1))
    assert head["error"]["code"] == P.UNAUTHORIZED
    assert health(server.endpoint)["ok"], "health needs no key"
    served_after = sum(w["served"] for w in server.health()["workers"])
    assert served_after == served_before, "an unauthorised request reached a worker"
    head, _ = raw_request(
        server.endpoint, predict_header(P.METRIC_DEPTH, key=KEY, image=raw_image_desc(img)), [img.tobytes()]
    )
    assert head["ok"]
    stats, _ = raw_request(server.endpoint, P.request_header(P.STATS, id=1, key=KEY))
    assert stats["ok"] and stats["counters"]["unauthorized"] >= 3


# --- bad input ------------------------------------------------------------------------

IMG = image(8, 8)
GOOD_RAW = raw_image_desc(IMG)


def _bad_cases():
    nan = float("nan")
    yield "garbage header", [b"\xc1\xff\x00garbage"], P.BAD_REQUEST
    yield "non-map header", [P.packb([1, 2, 3])], P.BAD_REQUEST
    yield "method not a string", [P.packb({"v": 1, "method": 5, "key": KEY})], P.BAD_REQUEST
    yield "unknown method", [P.packb({"v": 1, "method": "explode", "key": KEY})], P.UNKNOWN_METHOD
    yield "unsupported version", [P.packb({"v": 99, "method": "health"})], P.UNSUPPORTED_VERSION
    yield "missing image", [P.packb(predict_header(P.METRIC_DEPTH, key=KEY))], P.BAD_REQUEST
    yield "image frame absent", [P.packb(predict_header(P.METRIC_DEPTH, key=KEY, image=GOOD_RAW))], P.BAD_REQUEST
    yield (
        "corrupt jpeg",
        [
            P.packb(predict_header(P.METRIC_DEPTH, key=KEY, image={"frame": 1, "format": "jpeg"})),
            b"\xff\xd8\xff\xe0not a jpeg at all",
        ],
        P.BAD_REQUEST,
    )
    yield (
        "raw shape disagrees",
        [
            P.packb(predict_header(P.METRIC_DEPTH, key=KEY, image={"frame": 1, "format": "raw", "shape": [9, 8, 3]})),
            IMG.tobytes(),
        ],
        P.BAD_REQUEST,
    )
    yield (
        "wrong type max_depth",
        [P.packb(predict_header(P.METRIC_DEPTH, key=KEY, image=GOOD_RAW, max_depth="far")), IMG.tobytes()],
        P.BAD_REQUEST,
    )
    yield (
        "nan intrinsics",
        [
            P.packb(predict_header(P.POINTCLOUD, key=KEY, image=GOOD_RAW, intrinsics=dict(INTRINSICS, fx=nan))),
            IMG.tobytes(),
        ],
        P.BAD_REQUEST,
    )
    yield (
        "negative intrinsics",
        [
            P.packb(predict_header(P.POINTCLOUD, key=KEY, image=GOOD_RAW, intrinsics=dict(INTRINSICS, fy=-3.0))),
            IMG.tobytes(),
        ],
        P.BAD_REQUEST,
    )
    yield (
        "absurd input size",
        [P.packb(dict(predict_header(P.METRIC_DEPTH, key=KEY, image=GOOD_RAW), input_size=140000)), IMG.tobytes()],
        P.BAD_REQUEST,
    )
    yield (
        "unknown encoder",
        [P.packb(predict_header(P.METRIC_DEPTH, key=KEY, image=GOOD_RAW, encoder="vitx")), IMG.tobytes()],
        P.BAD_REQUEST,
    )
    yield (
        "too large message",
        [
            P.packb(predict_header(P.METRIC_DEPTH, key=KEY, image={"frame": 1, "format": "jpeg"})),
            b"\xff" * (3 * 1024 * 1024),
        ],
        P.TOO_LARGE,
    )


@pytest.mark.parametrize("name,frames,code", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_input_gets_error_and_server_keeps_serving(tmp_path_factory, bad_server, name, frames, code):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bad_server.endpoint)
    try:
        sock.send_multipart([b"", *frames])
        assert sock.poll(30_000), f"no reply to {name}"
        head = P.decode_header(sock.recv_multipart()[1])
    finally:
        sock.close()
    assert head["ok"] is False and head["error"]["code"] == code, head
    assert head["error"]["message"]
    assert bad_server.health()["status"] in ("healthy", "degraded")


@pytest.fixture(scope="module")
def bad_server(tmp_path_factory, checkpoint_dir):
    """One worker, auth on, a 2 MB request limit so 'too large' is cheap to provoke."""
    srv = Server(
        tmp_path_factory.mktemp("bad"),
        checkpoint_dir,
        workers=1,
        extra=["--api-key", KEY, "--require-auth", "--max-request-mb", "2"],
    )
    yield srv
    srv.stop()


def test_envelope_without_delimiter_is_dropped_not_fatal(bad_server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bad_server.endpoint)
    sock.send_multipart([P.packb({"v": 1, "method": "health"})])  # no empty frame: unanswerable
    assert not sock.poll(300)
    sock.close()
    assert bad_server.health()["ok"]


# --- faults ---------------------------------------------------------------------------


def _slow_header(i: int, img: np.ndarray, **fields) -> dict:
    return P.request_header(P.METRIC_DEPTH, id=i, key=KEY, input_size=518, image=raw_image_desc(img), **fields)


def test_deadline_expiry(bad_server):
    img = image()
    head, _ = raw_request(bad_server.endpoint, _slow_header(1, img, timeout_ms=30), [img.tobytes()])
    assert head["error"]["code"] == P.TIMEOUT
    head, _ = raw_request(
        bad_server.endpoint,
        predict_header(P.METRIC_DEPTH, key=KEY, image=raw_image_desc(img)),
        [img.tobytes()],
        timeout_s=60,
    )
    assert head["ok"], "server keeps serving after a timeout"


def test_queue_overflow(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("q"), checkpoint_dir, workers=1, extra=["--max-queue", "2"])
    try:
        img = image()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.endpoint)
        n = 8
        for i in range(n):
            sock.send_multipart([b"", P.packb(_slow_header(i, img)), img.tobytes()])
        codes = []
        for _ in range(n):
            assert sock.poll(120_000)
            head = P.decode_header(sock.recv_multipart()[1])
            codes.append("ok" if head["ok"] else head["error"]["code"])
        sock.close()
        assert codes.count(P.OVERLOADED) >= n - 3, codes  # 1 computing + 2 queued at most
        assert codes.count("ok") >= 1, codes
        assert len(codes) == n, "every request gets exactly one answer"
    finally:
        srv.stop()


def test_worker_killed_mid_request(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("kill"), checkpoint_dir, workers=2)
    try:
        img = image()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.endpoint)
        sock.send_multipart([b"", P.packb(_slow_header(1, img, timeout_ms=60_000)), img.tobytes()])
        victim = None
        deadline = time.monotonic() + 10
        while victim is None and time.monotonic() < deadline:
            busy = [w for w in srv.health()["workers"] if w["busy"]]
            victim = busy[0] if busy else None
            time.sleep(0.05)
        assert victim, "request never reached a worker"
        import os

        os.kill(victim["pid"], signal.SIGKILL)
        assert sock.poll(90_000), "a killed worker's client must get an answer"
        head = P.decode_header(sock.recv_multipart()[1])
        sock.close()
        assert head["ok"] or head["error"]["code"] == P.WORKER_LOST, head
        # the broker keeps serving with the other worker, and the killed one is restarted
        head, _ = raw_request(
            srv.endpoint, predict_header(P.METRIC_DEPTH, image=raw_image_desc(img)), [img.tobytes()], timeout_s=60
        )
        assert head["ok"]
        srv.wait_ready(2, timeout_s=60)
        assert victim["pid"] not in {w["pid"] for w in srv.health()["workers"]}
    finally:
        srv.stop()


def test_broker_restart(tmp_path, checkpoint_dir):
    port = free_port_block(5)
    endpoint = f"tcp://127.0.0.1:{port}"
    broker_args = ["broker", "--port", str(port), "--log-level", "WARNING"]
    broker = Process(broker_args, tmp_path / "broker1.log")
    worker = Process(
        [
            "worker",
            "--connect",
            f"tcp://127.0.0.1:{port + P.BACKEND_PORT_OFFSET}",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--checkpoint-dir",
            str(checkpoint_dir),
            "--log-level",
            "WARNING",
        ],
        tmp_path / "worker.log",
    )
    try:
        _wait_workers(endpoint, 1, worker)
        img = image()
        with DepthClient(endpoint, timeout=40, retries=5, input_size=TEST_INPUT_SIZE) as c:
            assert c.metric_depth(img).depth.shape == img.shape[:2]
            broker.signal(signal.SIGKILL)
            broker.proc.wait(5)
            broker = Process(broker_args, tmp_path / "broker2.log")
            result = c.metric_depth(img)  # the client retries; the worker re-registers by itself
            assert result.depth.shape == img.shape[:2]
        _wait_workers(endpoint, 1, worker)
    finally:
        broker.stop()
        worker.stop()


def _wait_workers(endpoint: str, n: int, worker: Process, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = health(endpoint, timeout_s=1.0)
        if state and len(state["workers"]) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker did not register:\n{worker.log()}")


def test_error_reply_raises_server_error(client):
    with pytest.raises(ServerError) as info:  # no vkitti checkpoint in the test folder
        client.metric_depth(image(), dataset="vkitti")
    assert info.value.code == P.MODEL_UNAVAILABLE
    assert (
        "depth_anything_v2_metric_vkitti_vits.pth" in info.value.message and "zdepth weights get" in info.value.message
    )


def test_dynamic_batching_shares_one_forward_pass(tmp_path_factory, checkpoint_dir):
    """A worker announcing capacity 4 gets concurrent requests at once and runs same-size
    images in one forward pass: their replies carry the same inference time."""
    srv = Server(
        tmp_path_factory.mktemp("batch"),
        checkpoint_dir,
        workers=1,
        extra=["--max-batch", "4", "--batch-wait-ms", "200"],
    )
    try:
        assert srv.health()["workers"][0]["capacity"] == 4
        img = image()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.endpoint)
        for i in range(4):
            sock.send_multipart(
                [b"", P.packb(predict_header(P.METRIC_DEPTH, id=i, image=raw_image_desc(img))), img.tobytes()]
            )
        timings = []
        for _ in range(4):
            assert sock.poll(60_000)
            head = P.decode_header(sock.recv_multipart()[1])
            assert head["ok"], head
            timings.append(head["timing"]["inference_ms"])
        sock.close()
        assert len(set(timings)) < len(timings), f"no two requests shared a forward pass: {timings}"
    finally:
        srv.stop()
