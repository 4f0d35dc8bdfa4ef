"""Limits in bytes, pixels, frame sizes and request rates: each refused with a clear error
that names its flag, and the server keeps serving afterwards (docs/limits.md lists them).

Most run against `zdepth broker` alone: with no worker attached, requests stay queued (so
their bytes stay held) and any answer must have come from the broker itself.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from bench.fuzz import png_bomb
from broker.limits import ByteBudget, RateLimiter
from broker.streams import StreamSlots
from tests.servers import TEST_INPUT_SIZE, Process, Server, free_port_block, health
from zdepth import protocol as P

KEY_A, KEY_B = "zd-limits-a", "zd-limits-b"
MB = 1024 * 1024
IMAGE = np.zeros((600, 500, 3), np.uint8)  # 0.86 MB raw: two fit under a 2 MB per-client cap, not three


class Broker:
    """`zdepth broker` on free ports, no workers."""

    def __init__(self, tmp, *flags: str):
        self.port = free_port_block(5)
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.stream = f"tcp://127.0.0.1:{self.port + P.STREAM_PORT_OFFSET}"
        # --no-worker-grace 0: without workers, requests stay queued (holding their bytes) until their deadline
        self.process = Process(
            ["broker", "--port", str(self.port), "--log-level", "ERROR", "--no-worker-grace", "0", *flags],
            tmp / f"broker-{self.port}.log",
        )
        deadline = time.monotonic() + 30
        while health(self.endpoint, timeout_s=0.5) is None:
            if self.process.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"zdepth broker did not start:\n{self.process.log()}")

    def socket(self) -> "Client":
        return Client(self.endpoint)

    def stats(self, key: str = KEY_A) -> dict:
        with self.socket() as c:
            return c.call(P.request_header(P.STATS, id="s", key=key))

    def wait_held(self, requests: int) -> None:
        """Until `requests` images are held: messages on different connections arrive in any order."""
        deadline = time.monotonic() + 5
        while self.stats()["bytes"]["held"] < requests * IMAGE.nbytes:
            assert time.monotonic() < deadline, self.stats()["bytes"]
            time.sleep(0.02)

    def stop(self) -> None:
        self.process.stop()


class Client:
    """One DEALER: one client identity, as the broker sees it."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, header: dict, frames: list = ()) -> None:
        self.sock.send_multipart([b"", P.packb(header), *frames])

    def recv(self, timeout_s: float = 5.0) -> dict:
        assert self.sock.poll(int(timeout_s * 1000)), "no reply"
        return P.decode_header(self.sock.recv_multipart()[1])

    def call(self, header: dict, frames: list = (), timeout_s: float = 5.0) -> dict:
        self.send(header, frames)
        return self.recv(timeout_s)

    def silent(self, timeout_s: float = 0.5) -> bool:
        return not self.sock.poll(int(timeout_s * 1000))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def predict(i: int, key: str = KEY_A, image: np.ndarray = IMAGE, timeout_ms: int = 60_000) -> tuple:
    header = P.request_header(
        P.METRIC_DEPTH,
        id=i,
        key=key,
        timeout_ms=timeout_ms,
        input_size=TEST_INPUT_SIZE,
        image={"frame": 1, "format": "raw", "shape": list(image.shape)},
    )
    return header, [image.tobytes()]


def error(reply: dict) -> tuple:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


# --- bytes in flight --------------------------------------------------------------------


@pytest.fixture
def byte_broker(tmp_path):
    b = Broker(
        tmp_path,
        "--api-key",
        KEY_A,
        "--api-key",
        KEY_B,
        "--require-auth",
        "--max-request-mb",
        "4",
        "--max-client-inflight-mb",
        "2",
        "--max-inflight-mb",
        "3",
        "--max-image-pixels",
        "400000",
    )
    yield b
    b.stop()


def test_per_client_byte_cap(byte_broker):
    with byte_broker.socket() as a:
        for i in range(2):
            a.send(*predict(i))
        assert a.silent(), "two requests fit: they wait for a worker"
        code, message = error(a.call(*predict(2)))
    assert code == P.OVERLOADED and "--max-client-inflight-mb" in message and "client" in message
    with byte_broker.socket() as other:  # another connection (and key) is not affected
        other.send(*predict(3, key=KEY_B))
        assert other.silent()


def test_per_key_byte_cap_spans_connections(byte_broker):
    with byte_broker.socket() as a1, byte_broker.socket() as a2, byte_broker.socket() as b:
        a1.send(*predict(1))
        a2.send(*predict(2))
        byte_broker.wait_held(2)
        code, message = error(a2.call(*predict(3)))  # a2 holds one, but key A holds two
        assert code == P.OVERLOADED and "key 'cli-1'" in message, message
        b.send(*predict(4, key=KEY_B))  # another key is not affected
        assert b.silent()
        assert byte_broker.stats()["bytes"]["held"] > 3 * IMAGE.nbytes


def test_total_byte_cap_and_release(byte_broker):
    with byte_broker.socket() as a, byte_broker.socket() as b, byte_broker.socket() as c:
        a.send(*predict(1, timeout_ms=1500))
        a.send(*predict(2, timeout_ms=1500))
        b.send(*predict(3, key=KEY_B, timeout_ms=1500))
        byte_broker.wait_held(3)
        code, message = error(c.call(*predict(4, key=KEY_B)))
        assert code == P.OVERLOADED and "--max-inflight-mb" in message, message
        # the queued requests time out (no worker): their bytes are released and c gets in
        for sock in (a, a, b):
            assert error(sock.recv(10))[0] == P.TIMEOUT
        assert byte_broker.stats()["bytes"]["held"] == 0
        c.send(*predict(5, key=KEY_B))
        assert c.silent(), "accepted again once the bytes were released"


def test_request_larger_than_client_cap_is_too_large(byte_broker):
    header = P.request_header(P.METRIC_DEPTH, id=1, key=KEY_A, image={"frame": 1, "format": "jpeg"})
    with byte_broker.socket() as a:  # 3 MB: under --max-request-mb 4, over the 2 MB per-client cap
        code, message = error(a.call(header, [b"\xff\xd8\xff" + bytes(3 * MB)]))
    assert code == P.TOO_LARGE and "--max-client-inflight-mb" in message


def test_stream_frames_count_in_the_total(byte_broker):
    with byte_broker.socket() as a, byte_broker.socket() as b:
        a.send(*predict(1))
        a.send(*predict(2))
        b.send(*predict(3, key=KEY_B))
        byte_broker.wait_held(3)
        camera = zmq.Context.instance().socket(zmq.PUSH)
        camera.setsockopt(zmq.LINGER, 0)
        camera.connect(byte_broker.stream)
        header, frames = predict(4, key=KEY_B)
        camera.send_multipart([P.packb(dict(header, stream="cam", seq=1)), *frames])
        deadline = time.monotonic() + 5
        while byte_broker.stats()["stream_frames"]["rejected"] == 0:
            assert time.monotonic() < deadline, "the stream frame over the total cap was not refused"
            time.sleep(0.05)
        camera.close()
    assert byte_broker.stats()["errors"][P.OVERLOADED] >= 1


# --- pixels and frame sizes -------------------------------------------------------------


def test_broker_checks_raw_shape_pixels(byte_broker):
    with byte_broker.socket() as a:  # no worker attached: this answer is the broker's own
        code, message = error(a.call(*predict(1, image=np.zeros((700, 700, 3), np.uint8))))
    assert code == P.TOO_LARGE and "490000 pixels" in message and "400000" in message


def test_oversize_frame_drops_the_connection_not_the_server(byte_broker):
    """MAXMSGSIZE: a frame far over --max-request-mb is refused by libzmq before it is buffered."""
    with byte_broker.socket() as a:
        header, _ = predict(1)
        a.send(header, [bytes(10 * MB)])  # over 2 x 4 MB + 1 MB
        assert a.silent(1.0), "MAXMSGSIZE must cut the peer off; without it the broker answers too_large"
    with byte_broker.socket() as a:
        header, _ = predict(1)
        code, message = error(a.call(header, [bytes(5 * MB)]))  # over the limit, under MAXMSGSIZE: answered
        assert code == P.TOO_LARGE and "--max-request-mb" in message
    assert health(byte_broker.endpoint)["ok"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("limits"), checkpoint_dir, workers=1, extra=["--max-image-pixels", "10000"])
    yield srv
    srv.stop()


def test_worker_checks_decoded_pixels(server):
    """An encoded image's size is only known to the worker's decoder: a 70-byte PNG declaring
    200x200 pixels is refused there, before any pixel is decoded."""
    with Client(server.endpoint) as c:
        header = P.request_header(P.METRIC_DEPTH, id=1, input_size=TEST_INPUT_SIZE, image={"frame": 1, "format": "png"})
        code, message = error(c.call(header, [png_bomb(200, 200)], timeout_s=30))
        assert code == P.TOO_LARGE and "200x200" in message
        ok = c.call(*predict(2, key=None, image=np.zeros((48, 64, 3), np.uint8)), timeout_s=30)
    assert ok["ok"], "the worker keeps serving"


def _subscription_dropped(endpoint: str, topic: bytes, timeout_s: float) -> bool:
    """Whether the broker drops a SUB connection that subscribes to `topic` within `timeout_s`.

    The socket monitor is attached before the connection is made, so the disconnect cannot
    happen before anyone watches (it did when the monitor came after the subscription)."""
    from zmq.utils.monitor import recv_monitor_message

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, topic)  # sent as soon as the connection is up
        sub.connect(endpoint)
        return (
            bool(monitor.poll(int(timeout_s * 1000)))
            and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        )
    finally:
        sub.disable_monitor()
        monitor.close()
        sub.close()


@pytest.mark.parametrize("topic_bytes,dropped", [(64, False), (4096, True)])
def test_pub_socket_cuts_off_oversize_subscriptions(byte_broker, topic_bytes, dropped):
    """MAXMSGSIZE on PUB: a subscriber sends only subscriptions, never more than a stream name."""
    endpoint = f"tcp://127.0.0.1:{byte_broker.port + P.PUB_PORT_OFFSET}"
    assert _subscription_dropped(endpoint, b"x" * topic_bytes, 2.0) == dropped


# --- request rates ----------------------------------------------------------------------


def test_rate_limit_per_key(tmp_path):
    b = Broker(
        tmp_path, "--api-key", KEY_A, "--api-key", KEY_B, "--require-auth", "--rate-limit", "2", "--rate-burst", "3"
    )
    try:
        with b.socket() as a1, b.socket() as a2, b.socket() as other:
            replies = [
                sock.call(P.request_header(P.STATS, id=i, key=KEY_A)) for i, sock in enumerate([a1, a2, a1, a2, a1])
            ]
            assert [r["ok"] for r in replies] == [True, True, True, False, False], (
                "a key's bucket spans its connections"
            )
            code, message = error(replies[3])
            assert (
                code == P.RATE_LIMITED
                and "2 requests/s" in message
                and "bursts of 3" in message
                and "--rate-limit" in message
            )
            assert other.call(P.request_header(P.STATS, id=9, key=KEY_B))["ok"], "other keys are not limited"
            assert a1.call(P.request_header(P.HEALTH, id=10))["ok"], "health is never rate limited"
            time.sleep(0.6)  # one token back at 2/s
            assert a1.call(P.request_header(P.STATS, id=11, key=KEY_A))["ok"], "served again once the bucket refills"
            stats = other.call(P.request_header(P.STATS, id=12, key=KEY_B))
        assert stats["errors"][P.RATE_LIMITED] == 2 and stats["rate_limit"]["rps"] == 2
    finally:
        b.stop()


def test_rate_limit_per_client_without_auth(tmp_path):
    b = Broker(tmp_path, "--rate-limit", "1", "--rate-burst", "2")
    try:
        with b.socket() as first, b.socket() as second:
            codes = [first.call(P.request_header(P.STATS, id=i)).get("error", {}).get("code") for i in range(3)]
            assert codes == [None, None, P.RATE_LIMITED]
            assert second.call(P.request_header(P.STATS, id=3))["ok"], "another client identity has its own bucket"
    finally:
        b.stop()


# --- the tables behind the limits -----------------------------------------------------


def test_byte_budget_releases_and_forgets():
    budget = ByteBudget(total_limit=100, owner_limit=60)
    budget.reserve([("client", b"a"), ("key", "k")], 50)
    with pytest.raises(P.ZDepthError) as info:
        budget.reserve([("client", b"b"), ("key", "k")], 20)
    assert info.value.code == P.OVERLOADED and budget.total == 50, "a refused request counts nothing"
    budget.release([("client", b"a"), ("key", "k")], 50)
    assert budget.total == 0 and budget.by_owner == {}, "owners at zero are forgotten"


def test_rate_limiter_forgets_full_buckets():
    limiter = RateLimiter(rate=10, burst=2)
    for i in range(1000):
        limiter.take(("client", i), now=0.0)
    assert len(limiter) == 1000
    limiter.prune(now=0.3)  # 2 tokens at 10/s: full again after 0.2 s
    assert len(limiter) == 0


def test_idle_streams_give_their_place():
    slots = StreamSlots(max_streams=2, idle_s=60.0)
    assert slots.admit("a", now=0.0)[0] and slots.admit("b", now=0.0)[0]
    assert slots.admit("c", now=30.0)[0] is None, "the table is full of active streams"
    slots.put("b", object(), now=0.0)  # b has a frame waiting: never evicted
    assert slots.admit("c", now=61.0)[0] is not None and "a" not in slots.stats and "b" in slots.stats
