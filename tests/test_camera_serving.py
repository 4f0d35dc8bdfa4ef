"""camera_info through a real server: DepthClient.pointcloud (local and server-side clouds),
a JPEG whose size does not fit answered bad_request alone, and a pointcloud camera stream."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from clients import CameraPublisher, DepthClient, DepthSubscriber
from clients.client import ServerError
from tests.servers import TEST_INPUT_SIZE, Server
from zdepth import protocol as P
from zdepth.geometry import unproject
from zdepth.request import Intrinsics

HEIGHT, WIDTH = 48, 64
# calibrated at twice the frame size
CAMERA_INFO = {
    "k": [110.0, 0.0, 63.0, 0.0, 112.0, 47.6, 0.0, 0.0, 1.0],
    "width": 128,
    "height": 96,
    "d": [0.0] * 5,
    "distortion_model": "plumb_bob",
}
# the same camera for the (48, 64) frames, computed here: fx * 1/2, (c + 0.5) * 1/2 - 0.5
HALF = Intrinsics(fx=55.0, fy=56.0, cx=31.25, cy=23.55)


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("camera"), checkpoint_dir, workers=1)
    yield srv
    srv.stop()


def jpeg(height: int = HEIGHT, width: int = WIDTH) -> bytes:
    image = np.random.default_rng(height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_client_pointcloud_with_camera_info(server):
    with DepthClient(server.endpoint, input_size=TEST_INPUT_SIZE) as client:
        local = client.pointcloud(jpeg(), camera_info=CAMERA_INFO)
        np.testing.assert_allclose(local.points, unproject(local.depth, HALF), rtol=1e-6)
        exact = client.pointcloud(jpeg(), camera_info=CAMERA_INFO, server_side=True)
        z = exact.points[:, 2].reshape(HEIGHT, WIDTH)
        np.testing.assert_allclose(exact.points, unproject(z, HALF), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="exactly one"):
            client.pointcloud(jpeg(), HALF.__dict__, camera_info=CAMERA_INFO)


def test_a_jpeg_that_does_not_fit_is_refused_and_the_server_keeps_serving(server):
    with DepthClient(server.endpoint, input_size=TEST_INPUT_SIZE) as client:
        with pytest.raises(ServerError, match="not one uniform scale") as info:
            client.pointcloud(jpeg(HEIGHT, HEIGHT), camera_info=CAMERA_INFO, server_side=True)  # decoded on the worker
        assert info.value.code == P.BAD_REQUEST
        assert client.pointcloud(jpeg(), camera_info=CAMERA_INFO, server_side=True).points.shape == (HEIGHT * WIDTH, 3)


def test_pointcloud_stream_with_camera_info(server):
    with DepthSubscriber(server.pub, ["caminfo"]) as subscriber:
        time.sleep(0.3)
        with CameraPublisher(
            server.stream, stream="caminfo", method=P.POINTCLOUD, camera_info=CAMERA_INFO, input_size=TEST_INPUT_SIZE
        ) as camera:
            result = None
            deadline = time.monotonic() + 30
            while result is None and time.monotonic() < deadline:
                camera.send(jpeg())
                result = subscriber.recv(timeout=0.3)
    assert result is not None and result.ok, result
    points = np.asarray(result.points, dtype=np.float32)
    np.testing.assert_allclose(points, unproject(points[:, 2].reshape(HEIGHT, WIDTH), HALF), rtol=1e-3, atol=1e-3)


def test_a_camera_info_that_does_not_fit_fails_alone_in_its_batch(tmp_path, checkpoint_dir):
    """The worker checks camera_info against each decoded image before the batch's forward
    pass: the other requests batched with it are answered normally."""
    import zmq

    srv = Server(tmp_path, checkpoint_dir, workers=1, extra=["--max-batch", "4", "--batch-wait-ms", "300"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    try:
        for i, data in enumerate((jpeg(), jpeg(HEIGHT, HEIGHT), jpeg())):  # the middle one is square: no uniform scale
            header = P.request_header(
                P.POINTCLOUD,
                id=i,
                camera_info=CAMERA_INFO,
                input_size=TEST_INPUT_SIZE,
                image={"frame": 1, "format": "jpeg"},
            )
            sock.send_multipart([b"", P.packb(header), data])
        replies = {}
        for _ in range(3):
            assert sock.poll(60_000)
            head = P.decode_header(sock.recv_multipart()[1])
            replies[head["id"]] = head
    finally:
        sock.close()
        srv.stop()
    assert replies[0]["ok"] and replies[2]["ok"], replies
    assert replies[1]["error"]["code"] == P.BAD_REQUEST and "uniform scale" in replies[1]["error"]["message"]
    assert replies[0]["timing"]["inference_ms"] == replies[2]["timing"]["inference_ms"]  # batched together
