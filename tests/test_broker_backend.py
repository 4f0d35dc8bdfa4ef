"""The broker's backend protocol, driven by a hand-written worker over a real socket.

A worker in another language speaks exactly this: READY, then REQUEST in and REPLY out.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from broker.broker import Broker, BrokerConfig
from tests.servers import free_port_block
from zdepth import protocol as P
from zdepth.auth import KeyStore

KEY = "zd-backend-secret"


@pytest.fixture
def broker():
    port = free_port_block(4)
    config = BrokerConfig(
        frontends=[f"tcp://127.0.0.1:{port}"],
        backend=f"tcp://127.0.0.1:{port + 3}",
        keys=KeyStore([KEY], use_env=False),
        require_auth=True,
    )
    instance = Broker(config, zmq.Context())
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    yield instance, port
    instance.stop()
    thread.join(5)


def test_a_key_never_reaches_a_worker_and_replies_pass_through(broker):
    instance, port = broker
    ctx = zmq.Context.instance()
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(f"tcp://127.0.0.1:{port + 3}")
    worker.send_multipart(
        [P.WORKER_PROTOCOL, P.W_READY, P.packb({"name": "hand-written", "device": "cpu", "capacity": 1})]
    )
    deadline = time.monotonic() + 5
    while not instance.workers and time.monotonic() < deadline:
        time.sleep(0.01)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{port}")
    image = np.zeros((4, 4, 3), np.uint8)
    header = P.request_header(
        P.METRIC_DEPTH, id="r1", key=KEY, input_size=56, image={"frame": 1, "format": "raw", "shape": [4, 4, 3]}
    )
    client.send_multipart([b"", P.packb(header), image.tobytes()])

    while True:  # heartbeats may come first
        assert worker.poll(5000), "the request never reached the worker"
        frames = worker.recv_multipart()
        if frames[1] == P.W_REQUEST:
            break
    assert frames[0] == P.WORKER_PROTOCOL
    meta = P.unpackb(frames[2])
    forwarded = P.decode_header(frames[3])
    assert "key" not in forwarded and KEY.encode() not in b"".join(frames), "the API key was forwarded to a worker"
    assert forwarded["id"] == "r1" and frames[4] == image.tobytes()
    assert 0 < meta["budget_ms"] <= 30_000

    depth = np.full((4, 4), 2.5, np.float32)
    reply = P.pack(
        P.ok_header("r1", min=2.5, max=2.5, model="vits_hypersim", worker="hand-written", timing={}), {"depth": depth}
    )
    worker.send_multipart([P.WORKER_PROTOCOL, P.W_REPLY, P.packb({"t": meta["t"]}), *reply])
    assert client.poll(5000)
    head, arrays = P.unpack(client.recv_multipart()[1:])
    assert head["ok"] and head["id"] == "r1" and head["worker"] == "hand-written"
    np.testing.assert_array_equal(arrays["depth"], depth)
    worker.close()
    client.close()


def test_a_warming_worker_gets_no_request_until_it_says_it_is_warm(broker):
    """A worker building its compiled graphs (READY and heartbeats say `warming`) would hold a
    request for the whole build: the broker keeps the request queued until it is warm."""
    instance, port = broker
    ctx = zmq.Context.instance()
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(f"tcp://127.0.0.1:{port + 3}")
    worker.send_multipart(
        [P.WORKER_PROTOCOL, P.W_READY, P.packb({"name": "warming", "device": "cpu", "capacity": 1, "warming": True})]
    )
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{port}")
    header = P.request_header(
        P.METRIC_DEPTH, id="r1", key=KEY, input_size=56, image={"frame": 1, "format": "raw", "shape": [4, 4, 3]}
    )
    client.send_multipart([b"", P.packb(header), np.zeros((4, 4, 3), np.uint8).tobytes()])

    def next_command(timeout_s: float):
        end = time.monotonic() + timeout_s
        while worker.poll(max(0, int((end - time.monotonic()) * 1000))):
            frames = worker.recv_multipart()
            if frames[1] != P.W_HEARTBEAT:
                return frames
            worker.send_multipart([P.WORKER_PROTOCOL, P.W_HEARTBEAT, P.packb({"warming": warming})])
        return None

    warming = True
    assert next_command(1.5) is None, "a warming worker was sent a request"
    assert instance.health()["workers"][0]["warming"] is True and len(instance.queue) == 1
    warming = False
    worker.send_multipart([P.WORKER_PROTOCOL, P.W_HEARTBEAT, P.packb({"warming": False})])
    frames = next_command(5)
    assert frames is not None and frames[1] == P.W_REQUEST, "the request never reached the warm worker"
    worker.close()
    client.close()
