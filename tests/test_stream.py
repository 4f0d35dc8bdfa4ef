"""Stream mode against a real `zdepth serve`: newest frame wins, results on PUB."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq

from clients import CameraPublisher, DepthClient, DepthSubscriber
from tests.servers import TEST_INPUT_SIZE, Server
from zdepth import protocol as P

KEY = "zd-stream-key"
SLOW_SIZE = 140  # a few frames per second on one CPU thread: slower than a 30 fps camera


def frame(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    fields = json.dumps({"method": P.METRIC_DEPTH, "input_size": TEST_INPUT_SIZE})
    srv = Server(
        tmp_path_factory.mktemp("stream"),
        checkpoint_dir,
        workers=1,
        extra=["--api-key", KEY, "--require-auth", "--imagezmq", "--imagezmq-fields", fields],
    )
    yield srv
    srv.stop()


class Collector:
    """A subscriber thread that keeps every result it sees for one or more streams."""

    def __init__(self, endpoint: str, streams=None):
        self.results: list = []
        self._stop = threading.Event()
        self._sub = DepthSubscriber(endpoint, streams=streams)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # PUB/SUB slow joiner: let the subscription reach the broker

    def _run(self) -> None:
        while not self._stop.is_set():
            result = self._sub.latest(timeout=0.1)
            if result is not None:
                self.results.append(result)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()
        return self.results


def stream_stats(server: Server, name: str) -> dict:
    """The broker's counters for one stream (zeros before its first frame arrives)."""
    empty = {"frames_in": 0, "processed": 0, "dropped": 0, "errors": 0, "rejected": 0}
    return (server.health().get("streams") or {}).get(name, empty)


def wait_idle(server: Server, name: str, timeout_s: float = 30.0) -> dict:
    """Stats once the stream has nothing pending or in flight."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = stream_stats(server, name)
        if stats["frames_in"] and stats["frames_in"] == stats["processed"] + stats["dropped"] + stats["errors"]:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"stream {name} never settled: {stream_stats(server, name)}")


def test_fast_camera_latency_stays_bounded(server):
    collector = Collector(server.pub, streams=["fast"])
    camera = CameraPublisher(server.stream, stream="fast", key=KEY, input_size=SLOW_SIZE)
    fps, seconds = 30.0, 6.0
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        camera.send(frame(sent))
        sent += 1
        time.sleep(max(0.0, start + sent / fps - time.monotonic()))
    stats = wait_idle(server, "fast")
    time.sleep(0.3)
    results = collector.stop()
    camera.close()

    assert stats["frames_in"] + camera.dropped_local == sent
    assert stats["frames_in"] == stats["processed"] + stats["dropped"] + stats["errors"], stats
    assert stats["dropped"] > 0, "a 30 fps camera into a slower model must drop frames"
    assert stats["processed"] >= 5 and len(results) >= 5
    assert all(r.ok for r in results)
    inference_ms = float(np.median([r.header["timing"]["inference_ms"] for r in results]))
    latencies = np.array([r.latency_ms for r in results])
    # newest frame wins: a frame waits at most one inference behind the one in flight
    assert latencies.max() < 2.5 * inference_ms + 250, (latencies, inference_ms)
    third = len(latencies) // 3
    assert latencies[-third:].mean() < latencies[:third].mean() * 1.5 + 100, "latency grew over the run"
    assert [r.seq for r in results] == sorted(r.seq for r in results)
    assert sum(r.dropped for r in results) <= stats["dropped"]


def test_three_streams_share_one_worker(server):
    collector = Collector(server.pub)
    cameras = {
        name: CameraPublisher(server.stream, stream=name, key=KEY, input_size=TEST_INPUT_SIZE)
        for name in ("a", "b", "c")
    }
    rates = {"a": 30.0, "b": 10.0, "c": 3.0}
    start = time.monotonic()
    sent = dict.fromkeys(rates, 0)
    while time.monotonic() - start < 4.0:
        now = time.monotonic() - start
        for name, rate in rates.items():
            if sent[name] < now * rate:
                cameras[name].send(frame(sent[name]))
                sent[name] += 1
        time.sleep(0.005)
    for name in rates:
        wait_idle(server, name)
    results = collector.stop()
    for camera in cameras.values():
        camera.close()
    per_stream = {name: [r for r in results if r.stream == name] for name in rates}
    assert all(len(items) >= 3 for items in per_stream.values()), {k: len(v) for k, v in per_stream.items()}


def test_streams_and_requests_both_progress(server):
    camera = CameraPublisher(server.stream, stream="busy", key=KEY, input_size=SLOW_SIZE)
    stop = threading.Event()

    def pump():
        i = 0
        while not stop.is_set():
            camera.send(frame(i))
            i += 1
            time.sleep(1 / 30)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        before = stream_stats(server, "busy")["processed"]
        with DepthClient(server.endpoint, key=KEY, timeout=30, input_size=TEST_INPUT_SIZE) as client:
            for i in range(5):
                assert client.metric_depth(frame(i)).depth.shape == (48, 64)
        time.sleep(1.0)
        assert stream_stats(server, "busy")["processed"] > before
    finally:
        stop.set()
        thread.join()
        camera.close()
        wait_idle(server, "busy")


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def test_stalled_and_late_subscribers_hurt_nobody(server):
    ctx = zmq.Context.instance()
    stalled = ctx.socket(zmq.SUB)  # subscribes and never reads
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(server.pub)
    camera = CameraPublisher(server.stream, stream="big", key=KEY, input_size=TEST_INPUT_SIZE)
    broker_pid = server.health()["pid"]
    try:
        for i in range(20):  # warm up, then measure the broker's memory under a stalled reader
            camera.send(frame(i, 240, 320))
            time.sleep(0.05)
        wait_idle(server, "big")
        rss_before = _rss_kb(broker_pid)
        collector = Collector(server.pub, streams=["big"])  # a late joiner
        for i in range(60):
            camera.send(frame(i, 240, 320))
            time.sleep(0.05)
        wait_idle(server, "big")
        time.sleep(0.3)
        results = collector.stop()
        assert len(results) >= 5, "the late subscriber must still get fresh results"
        assert _rss_kb(broker_pid) - rss_before < 60_000, "a stalled subscriber grew the broker's memory"
        assert server.health()["status"] in ("healthy", "degraded")
    finally:
        stalled.close(linger=0)
        camera.close()


def test_imagezmq_sender_drives_a_stream(server):
    imagezmq = pytest.importorskip("imagezmq")
    collector = Collector(server.pub, streams=["izmq-cam"])
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{server.port + P.IMAGEZMQ_PORT_OFFSET}")
    try:
        import cv2

        for i in range(5):
            assert sender.send_image("izmq-cam", frame(i)) == b"OK"
            ok, jpg = cv2.imencode(".jpg", frame(i + 10))
            assert sender.send_jpg("izmq-cam", jpg.tobytes()) == b"OK"
            time.sleep(0.1)
        wait_idle(server, "izmq-cam")
        time.sleep(0.3)
    finally:
        sender.close()
    results = collector.stop()
    assert results and all(r.ok and r.stream == "izmq-cam" for r in results)
    assert results[-1].depth.shape == (48, 64)


def test_bad_key_and_bad_frames_are_counted_and_harmless(server):
    good = CameraPublisher(server.stream, stream="good", key=KEY, input_size=TEST_INPUT_SIZE)
    good.send(frame(0))
    wait_idle(server, "good")
    bad_key = CameraPublisher(server.stream, stream="good", key="not-the-key", input_size=TEST_INPUT_SIZE)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(server.stream)
    with DepthClient(server.endpoint, key=KEY) as client:
        rejected_before = client.stats()["counters"].get("stream_rejected", 0)
    try:
        bad_key.send(frame(1))
        push.send_multipart([b"\x00garbage"])
        header = P.request_header(
            P.METRIC_DEPTH,
            key=KEY,
            stream="good",
            seq=1,
            t_capture=time.time(),
            input_size=TEST_INPUT_SIZE,
            image={"frame": 1, "format": "raw", "shape": [48, 64, 3]},
        )
        push.send_multipart([P.packb(header), b"short"])  # raw shape disagrees with bytes
        collector = Collector(server.pub, streams=["good"])
        for i in range(3):
            good.send(frame(i))
            time.sleep(0.2)
        wait_idle(server, "good")
        time.sleep(0.3)
        assert collector.stop(), "a good stream keeps working beside bad frames"
        with DepthClient(server.endpoint, key=KEY) as client:
            stats = client.stats()
        assert stats["counters"]["stream_rejected"] - rejected_before == 3
        assert stats["streams"]["good"]["rejected"] >= 2
    finally:
        push.close()
        good.close()
        bad_key.close()
