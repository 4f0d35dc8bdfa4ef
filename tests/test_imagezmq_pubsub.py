"""imagezmq's PUB/SUB mode: unchanged `ImageSender(..., REQ_REP=False)` senders bind a PUB
socket, and `zdepth serve --imagezmq-sub ENDPOINT` subscribes to them (real imagezmq package)."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

imagezmq = pytest.importorskip("imagezmq")

from clients import DepthSubscriber  # noqa: E402
from tests.servers import TEST_INPUT_SIZE, Server, free_port_block, raw_request  # noqa: E402
from zdepth import protocol as P  # noqa: E402

HEIGHT, WIDTH = 48, 64


def first_result(subscriber: DepthSubscriber, stream: str, send, timeout_s: float = 30.0):
    """Send a frame every 0.2 s (PUB/SUB drops what is sent before the subscription is made)
    until a result of `stream` arrives."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        send()
        result = subscriber.recv(timeout=0.2)
        if result is not None and result.stream == stream:
            return result
    raise AssertionError("no result from the imagezmq PUB sender")


def test_pub_senders_are_subscribed(tmp_path, checkpoint_dir):
    ports = [free_port_block(1), free_port_block(1)]
    # two unchanged imagezmq senders in PUB mode: each binds its own port, as on two cameras
    senders = [imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}", REQ_REP=False) for port in ports]
    fields = json.dumps({"method": P.METRIC_DEPTH, "input_size": TEST_INPUT_SIZE})
    extra = ["--imagezmq-fields", fields, *(a for port in ports for a in ("--imagezmq-sub", f"tcp://127.0.0.1:{port}"))]
    server = Server(tmp_path, checkpoint_dir, workers=1, extra=extra)
    image = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    try:
        with DepthSubscriber(server.pub, ["pub_raw", "pub_jpg"]) as subscriber:
            time.sleep(0.3)
            raw = first_result(subscriber, "pub_raw", lambda: senders[0].send_image("pub_raw", image))
            assert raw.ok and raw.depth.shape == (HEIGHT, WIDTH)
            # garbage on a subscribed PUB is rejected and counted; the next frame still works
            senders[1].zmq_socket.send_multipart([b"not json", b"x"])
            jpeg = cv2.imencode(".jpg", image)[1].tobytes()
            jpg = first_result(subscriber, "pub_jpg", lambda: senders[1].send_jpg("pub_jpg", jpeg))
            assert jpg.ok and jpg.depth.shape == (HEIGHT, WIDTH)
        assert server.health()["streams"]["pub_raw"]["processed"] >= 1
    finally:
        server.stop()
        for sender in senders:
            sender.close()


def test_oversized_pub_frames_never_reach_the_broker(tmp_path, checkpoint_dir):
    """MAXMSGSIZE on the SUB socket: a message over the frame cap (2 x 1 MiB + 1 MiB here) is
    dropped by libzmq with its connection, which libzmq then never reconnects by itself (a
    protocol error); the broker's monitor connects again and normal frames work."""
    port = free_port_block(1)
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}", REQ_REP=False)
    fields = json.dumps({"method": P.METRIC_DEPTH, "input_size": TEST_INPUT_SIZE})
    server = Server(
        tmp_path,
        checkpoint_dir,
        workers=1,
        extra=["--imagezmq-fields", fields, "--imagezmq-sub", f"tcp://127.0.0.1:{port}", "--max-request-mb", "1"],
    )
    big = np.zeros((1100, 1000, 3), np.uint8)  # 3.3 MB
    small = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    try:
        with DepthSubscriber(server.pub, ["big", "small"]) as subscriber:
            time.sleep(0.5)
            for _ in range(5):
                sender.send_image("big", big)
                time.sleep(0.2)
            result = first_result(subscriber, "small", lambda: sender.send_image("small", small))
            assert result.ok
        assert "big" not in (server.health().get("streams") or {})
        stats, _ = raw_request(server.endpoint, P.request_header(P.STATS, id="s"))
        assert stats["counters"]["imagezmq_reconnects"] >= 1  # libzmq alone would never have reconnected
    finally:
        server.stop()
        sender.close()
