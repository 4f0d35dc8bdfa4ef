"""Client-side behaviour that needs no zdepth server: argument handling, profiles, the import
rule, and the wire logic (Lazy Pirate retries, stale replies, streams) against bare ZeroMQ
sockets standing in for the broker."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from clients import api
from clients.client import DepthClient, ServerError, Timeout, image_message, intrinsics_dict, sniff_format
from clients.profiles import SAMPLE, client_from_profile, get_profile, load_profiles, profiles_path
from clients.stream import CameraPublisher, DepthSubscriber, stream_endpoints
from zdepth import protocol as P

ROOT = Path(__file__).resolve().parents[1]
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
K = {"fx": 500.0, "fy": 400.0, "cx": 1.5, "cy": 0.5}


def _png(width: int = 4, height: int = 2) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 7, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeBroker:
    """A ROUTER on a random port that answers each request with `handler(header, frames)`:
    a list of (reply header, arrays) pairs, sent in order (empty: never answer)."""

    def __init__(self, handler):
        self.handler = handler
        self.requests: list = []  # (routing id, header, frames after the header)
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if not self.socket.poll(20):
                continue
            identity, _empty, header_frame, *frames = self.socket.recv_multipart()
            header = P.unpackb(header_frame)
            self.requests.append((identity, header, frames))
            for reply, arrays in self.handler(header, frames):
                self.socket.send_multipart([identity, b"", *P.pack(reply, arrays)])

    def close(self):
        self._stop.set()
        self._thread.join()
        self.socket.close(linger=0)


@pytest.fixture
def broker_factory():
    brokers = []

    def make(handler):
        brokers.append(FakeBroker(handler))
        return brokers[-1]

    yield make
    for broker in brokers:
        broker.close()


def depth_reply(header, depth, **fields):
    return P.ok_header(
        header["id"], min=float(depth.min()), max=float(depth.max()), model="vits_hypersim", worker="w0", **fields
    ), {"depth": depth}


# --- arguments ------------------------------------------------------------------------------


def test_bytes_are_sniffed_not_declared():
    assert sniff_format(JPEG) == "jpeg" and sniff_format(PNG) == "png"
    fields, frames = image_message(PNG)
    assert fields == {"image": {"frame": 1, "format": "png"}} and frames == [PNG]
    with pytest.raises(ValueError, match="neither JPEG nor PNG"):
        image_message(b"GIF89a....")


def test_path_is_sent_as_its_bytes(tmp_path):
    path = tmp_path / "frame.jpg"
    path.write_bytes(JPEG)
    for arg in (path, str(path)):
        fields, frames = image_message(arg)
        assert fields["image"]["format"] == "jpeg" and bytes(frames[0]) == JPEG
    assert image_message("https://example.org/a.jpg") == ({"image_url": "https://example.org/a.jpg"}, [])


def test_numpy_goes_raw_without_copy():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    fields, frames = image_message(array)
    assert fields == {"image": {"frame": 1, "format": "raw", "shape": [2, 3, 3], "channels": "bgr"}}
    assert np.shares_memory(np.frombuffer(frames[0], np.uint8), array)
    assert image_message(array, channels="rgb")[0]["image"]["channels"] == "rgb"
    flipped = array[..., ::-1]  # not contiguous: copied once, still correct
    assert bytes(image_message(flipped)[1][0]) == np.ascontiguousarray(flipped).tobytes()
    for bad in (array.astype(np.float32), array[..., 0], np.zeros((2, 3, 4), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            image_message(bad)
    with pytest.raises(ValueError, match="channels"):
        image_message(array, channels="bgra")
    with pytest.raises(TypeError):
        image_message(42)


def test_intrinsics_from_mapping_or_matrix():
    assert intrinsics_dict({k: np.float32(v) for k, v in K.items()}) == K
    matrix = np.array([[500.0, 0, 1.5], [0, 400.0, 0.5], [0, 0, 1]])
    assert intrinsics_dict(matrix) == K
    with pytest.raises(ValueError, match="fx and fy must be > 0"):
        intrinsics_dict(dict(K, fx=0))
    with pytest.raises(ValueError, match="3x3"):
        intrinsics_dict([1, 2, 3])


def test_decode_pointcloud_takes_array_bytes_and_old_base64():
    points = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert np.shares_memory(api.decode_pointcloud(points.ravel()), points)  # reshaped, not copied
    assert np.array_equal(api.decode_pointcloud(points.tobytes()), points)
    old = base64.b64encode(points.tobytes()).decode()
    assert np.array_equal(api.decode_pointcloud(old, [4, 3]), points)
    assert api.decode_pointcloud(old, (2, 2, 3)).shape == (2, 2, 3)


def test_encode_image(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert api.encode_image(path) == PNG and api.encode_image(JPEG) == JPEG
    array = np.zeros((8, 8, 3), np.uint8)
    array[..., 2] = 255  # red in BGR
    assert sniff_format(api.encode_image(array)) == "jpeg"
    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(api.encode_image(array, format="png"))))
    assert decoded[0, 0].tolist() == [255, 0, 0]


# --- profiles -------------------------------------------------------------------------------


def test_profiles_key_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "servers.yaml"
    path.write_text(
        "lab:\n  endpoint: tcp://lab:5555\n  api_key_env: ZD_TEST_KEY\n  model: {encoder: vitl, input_size: 266}\n  timeout: 5\n"
        "open:\n  endpoint: ipc:///tmp/zd\n  api_key: sk-plain\n"
    )
    monkeypatch.delenv("ZD_TEST_KEY", raising=False)
    profiles = load_profiles(path)
    assert sorted(profiles) == ["lab", "open"] and profiles["open"].key() == "sk-plain"
    with pytest.raises(ValueError, match="ZD_TEST_KEY"):
        profiles["lab"].key()
    monkeypatch.setenv("ZD_TEST_KEY", "sk-env")
    assert get_profile("lab", path).client_options() == {
        "endpoint": "tcp://lab:5555",
        "key": "sk-env",
        "encoder": "vitl",
        "input_size": 266,
        "timeout": 5.0,
    }
    with client_from_profile("lab", path, timeout=1) as client:
        assert (client.key, client.timeout, client.defaults) == ("sk-env", 1.0, {"encoder": "vitl", "input_size": 266})
    with pytest.raises(KeyError, match="profiles: \\['lab', 'open'\\]"):
        get_profile("nope", path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("old:\n  base_url: http://x:8000\n", "old HTTP API"),
        ("x:\n  endpoint: localhost\n", "ZeroMQ endpoint"),
        ("x:\n  endpoint: tcp://a:1\n  api_key: k\n  api_key_env: K\n", "not both"),
        ("x:\n  endpoint: tcp://a:1\n  model: depth-anything-v2\n", "`model` must be a mapping"),
        ("x:\n  endpoint: tcp://a:1\n  adress: y\n", "unknown keys"),
    ],
)
def test_profiles_refuse_bad_entries(tmp_path, text, message):
    path = tmp_path / "servers.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_profiles(path)


def test_profiles_search_order(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / ".config" / "zdepth").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("ZDEPTH_SERVERS", raising=False)
    assert profiles_path() == SAMPLE and "local" in load_profiles()
    (home / ".config" / "zdepth" / "servers.yaml").write_text("home: {endpoint: 'tcp://h:1'}\n")
    assert list(load_profiles()) == ["home"]
    (cwd / "servers.yaml").write_text("cwd: {endpoint: 'tcp://c:1'}\n")
    assert list(load_profiles()) == ["cwd"]
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env: {endpoint: 'tcp://e:1'}\n")
    monkeypatch.setenv("ZDEPTH_SERVERS", str(env_file))
    assert list(load_profiles()) == ["env"]
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("explicit: {endpoint: 'tcp://x:1'}\n")
    assert list(load_profiles(explicit)) == ["explicit"]


def test_sample_profiles_parse():
    profiles = load_profiles(SAMPLE)
    assert profiles["local"].endpoint == "tcp://127.0.0.1:5555"
    assert profiles["lab"].api_key_env and profiles["lab"].api_key is None


def test_importing_clients_never_imports_torch_or_cv2():
    code = "import clients, clients.stream, sys; bad = {'torch', 'cv2'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --- request/reply against a stand-in broker ------------------------------------------------


def test_lazy_pirate_gives_up_within_the_timeout(broker_factory):
    broker = broker_factory(lambda header, frames: [])  # never answers
    with DepthClient(broker.endpoint, timeout=0.6, retries=2) as client:
        started = time.monotonic()
        with pytest.raises(Timeout) as caught:
            client.health()
        elapsed = time.monotonic() - started
        assert 0.55 <= elapsed < 1.2, elapsed
        assert isinstance(caught.value, TimeoutError) and caught.value.code == P.TIMEOUT
        with pytest.raises(Timeout):
            client.health(timeout=0.3)
    time.sleep(0.05)
    identities = [identity for identity, _, _ in broker.requests]
    assert (
        len(identities) == 2 and len(set(identities)) == 2
    )  # one try per call (it had the whole budget); a fresh socket after silence
    assert 400 <= broker.requests[0][1]["timeout_ms"] <= 600  # the server is told the whole budget, less a margin


def test_timeout_is_a_total_budget_not_split_across_tries(broker_factory):
    """Before: timeout=4 with retries=2 gave each try 1.33 s, so a 3 s job failed 3 of 3 times
    (and was recomputed each time). Now the one try may wait for all of it."""

    def slow(header, frames):
        time.sleep(1.2)
        return [(P.ok_header(header["id"], status="healthy"), None)]

    broker = broker_factory(slow)
    with DepthClient(broker.endpoint, timeout=2.0, retries=2) as client:
        assert client.health()["status"] == "healthy"
    assert len(broker.requests) == 1


def test_server_timeout_answer_is_not_retried(broker_factory):
    broker = broker_factory(lambda header, frames: [(P.error_header(header["id"], P.TIMEOUT, "deadline passed"), None)])
    with DepthClient(broker.endpoint, timeout=5, retries=2) as client:
        with pytest.raises(ServerError) as caught:
            client.health()
    assert caught.value.code == P.TIMEOUT and len(broker.requests) == 1


def test_stale_reply_is_dropped_and_arrays_are_views(broker_factory):
    depth = np.arange(6, dtype=np.float32).reshape(2, 3)
    stale = P.ok_header("earlier", arrays={})

    def handler(header, frames):
        return [
            (stale, {"depth": np.zeros((5, 5), np.float32)}),
            depth_reply(header, depth, timing={"inference_ms": 1.0}),
        ]

    broker = broker_factory(handler)
    with DepthClient(broker.endpoint, key="sk-1", timeout=5, encoder="vits") as client:
        result = client.metric_depth(PNG, max_depth=10.0, input_size=266)
    assert np.array_equal(result.depth, depth) and result.shape == (2, 3)
    assert not result.depth.flags.owndata  # a view on the received frame, not a copy
    assert (result.min, result.max, result.model, result.worker, result.timing) == (
        0.0,
        5.0,
        "vits_hypersim",
        "w0",
        {"inference_ms": 1.0},
    )
    _, header, frames = broker.requests[0]
    assert header["method"] == "metric_depth" and header["key"] == "sk-1"
    assert (header["encoder"], header["max_depth"], header["input_size"]) == ("vits", 10.0, 266)
    assert header["image"] == {"frame": 1, "format": "png"} and frames == [PNG]


def test_retryable_error_is_retried_on_the_same_socket(broker_factory):
    def handler(header, frames):
        if len(broker.requests) == 1:
            return [(P.error_header(header["id"], P.OVERLOADED, "queue full"), None)]
        return [(P.ok_header(header["id"], status="healthy", workers=[]), None)]

    broker = broker_factory(handler)
    with DepthClient(broker.endpoint, timeout=5) as client:
        assert client.health() == {"status": "healthy", "workers": []}
    assert len(broker.requests) == 2 and broker.requests[0][0] == broker.requests[1][0]
    assert broker.requests[0][1]["id"] == broker.requests[1][1]["id"]


def test_error_reply_raises_server_error(broker_factory):
    broker = broker_factory(lambda header, frames: [(P.error_header(header["id"], P.UNAUTHORIZED, "bad key"), None)])
    with DepthClient(broker.endpoint, timeout=5) as client:
        with pytest.raises(ServerError) as caught:
            client.relative_depth(JPEG)
        assert (caught.value.code, caught.value.message, caught.value.retryable) == ("unauthorized", "bad key", False)
        assert len(broker.requests) == 1
        with pytest.raises(TypeError, match="input_sise"):
            client.metric_depth(JPEG, input_sise=518)


def test_pointcloud_locally_matches_the_formula(broker_factory):
    depth = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    broker = broker_factory(lambda header, frames: [depth_reply(header, depth)])
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 9  # blue in BGR
    with DepthClient(broker.endpoint, timeout=5) as client:
        cloud = client.pointcloud(image, K, with_color=True)
    assert broker.requests[0][1]["method"] == "metric_depth" and "intrinsics" not in broker.requests[0][1]
    v, u = np.mgrid[0:2, 0:3]
    expected = np.stack([(u - K["cx"]) / K["fx"] * depth, (v - K["cy"]) / K["fy"] * depth, depth], -1).reshape(-1, 3)
    np.testing.assert_allclose(cloud.points, expected, rtol=1e-6)
    assert cloud.colors.tolist() == [[0, 0, 9]] * 6 and cloud.depth is not None


def test_server_pointcloud_request(broker_factory):
    points = np.ones((6, 3), np.float32)

    def handler(header, frames):
        return [(P.ok_header(header["id"], min=1.0, max=1.0), {"points": points})]

    broker = broker_factory(handler)
    with DepthClient(broker.endpoint, timeout=5) as client:
        cloud = client.pointcloud(JPEG, np.array([[500.0, 0, 1.5], [0, 400.0, 0.5], [0, 0, 1]]), server_side=True)
    assert np.array_equal(cloud.points, points) and cloud.colors is None
    header = broker.requests[0][1]
    assert header["intrinsics"] == K and header["with_color"] is False


def test_api_functions_use_profiles_and_cache_clients(broker_factory, tmp_path, monkeypatch):
    depth = np.ones((2, 2), np.float32)

    def handler(header, frames):
        if header["method"] == "health":
            return [
                (
                    P.ok_header(
                        header["id"], status="healthy", workers=[{"device": "cuda:0", "models": ["vits_hypersim"]}]
                    ),
                    None,
                )
            ]
        return [depth_reply(header, depth)]

    broker = broker_factory(handler)
    path = tmp_path / "servers.yaml"
    path.write_text(f"fake:\n  endpoint: {broker.endpoint}\n  api_key_env: ZD_TEST_KEY\n  model: {{encoder: vitb}}\n")
    monkeypatch.setenv("ZDEPTH_SERVERS", str(path))
    monkeypatch.setenv("ZD_TEST_KEY", "sk-profile")
    result = api.predict_metric_depth(JPEG, K, server="fake", max_depth=5.0)
    assert (
        result["shape"] == [2, 2] and np.array_equal(result["depth_map"], depth) and result["model"] == "vits_hypersim"
    )
    api.predict_relative_depth(JPEG, server="fake", encoder="vits", timeout=5)
    health = api.get_health("fake")
    assert (health["device"], health["models_loaded"]) == ("cuda:0", ["vits_hypersim"])
    headers = [header for _, header, _ in broker.requests]
    assert [h["encoder"] for h in headers[:2]] == ["vitb", "vits"] and all(h["key"] == "sk-profile" for h in headers)
    assert "intrinsics" not in headers[0]
    assert len({identity for identity, _, _ in broker.requests}) == 1  # one cached client
    assert api._cached_client(broker.endpoint, "sk-profile") is api._cached_client(broker.endpoint, "sk-profile")


# --- streams --------------------------------------------------------------------------------


def test_stream_endpoints():
    assert stream_endpoints("tcp://gpu:5555") == ("tcp://gpu:5556", "tcp://gpu:5557")
    with pytest.raises(ValueError):
        stream_endpoints("ipc:///tmp/zd")


def test_publisher_never_blocks_without_a_broker():
    with CameraPublisher("tcp://127.0.0.1:1", stream="cam0") as pub:  # nobody listens
        started = time.monotonic()
        seqs = [pub.send(np.zeros((4, 4, 3), np.uint8)) for _ in range(5)]
        assert time.monotonic() - started < 0.5
    assert seqs == [0, 1, 2, 3, 4] and pub.sent == 2 and pub.dropped_local == 3  # SNDHWM 2 waits, the rest drop
    with pytest.raises(ValueError, match="stream"):
        CameraPublisher(stream="bad name")
    with pytest.raises(ValueError, match="intrinsics"):
        CameraPublisher(method="pointcloud")


def test_publisher_sends_frames(tmp_path):
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    frame = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    try:
        with CameraPublisher(
            endpoint, stream="cam1", key="sk", method="pointcloud", intrinsics=K, max_depth=8.0
        ) as pub:
            deadline = time.monotonic() + 5
            while not pull.poll(20) and time.monotonic() < deadline:  # wait out the TCP connect
                pub.send(frame, t_capture=123.0)
            header_frame, image = pull.recv_multipart()
            header = P.unpackb(header_frame)
            assert {k: header[k] for k in ("v", "stream", "key", "method", "intrinsics", "max_depth", "t_capture")} == {
                "v": P.VERSION,
                "stream": "cam1",
                "key": "sk",
                "method": "pointcloud",
                "intrinsics": K,
                "max_depth": 8.0,
                "t_capture": 123.0,
            }
            assert (
                header["image"] == {"frame": 1, "format": "raw", "shape": [2, 2, 3], "channels": "bgr"}
                and image == frame.tobytes()
            )
            while pull.poll(100):
                pull.recv_multipart()
            folder = tmp_path / "frames"
            folder.mkdir()
            for name in ("b.png", "a.png", "notes.txt"):
                (folder / name).write_bytes(_png() if name.endswith("png") else b"x")
            assert pub.run(folder, fps=50) == 2
            received = [pull.recv_multipart() for _ in range(2)]
            assert [P.unpackb(h)["image"]["format"] for h, _ in received] == ["png", "png"]
            assert pub.run(iter([frame] * 5), max_frames=3) == 3
    finally:
        pull.close(linger=0)


def test_subscriber_filters_exact_topic_and_keeps_the_newest():
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    depth = np.zeros((2, 2), np.float32)

    def publish(stream, seq, ok=True):
        header = {
            "v": P.VERSION,
            "stream": stream,
            "seq": seq,
            "t_capture": time.time(),
            "latency_ms": 5.0,
            "dropped": seq,
            "ok": ok,
        }
        if not ok:
            header["error"] = {"code": P.TIMEOUT, "message": "late"}
        pub.send_multipart([stream.encode(), *P.pack(header, {"depth": depth} if ok else None)])

    try:
        with DepthSubscriber(endpoint, streams="cam1") as sub:
            deadline = time.monotonic() + 5
            while sub.recv(0.02) is None and time.monotonic() < deadline:  # slow joiner
                publish("cam1", -1)
            while sub.recv(0.2) is not None:
                pass
            skipped = sub.skipped
            publish("cam1", 3)
            publish("cam10", 99)  # prefix match on the wire, filtered here
            publish("cam1", 4, ok=False)
            time.sleep(0.5)
            result = sub.latest(timeout=1)
            assert (result.stream, result.seq, result.ok, result.dropped, result.depth) == ("cam1", 4, False, 4, None)
            assert result.error.code == P.TIMEOUT and result.age_ms >= 0
            assert sub.skipped == skipped + 1 and sub.latest(timeout=0.05) is None
            publish("cam1", 5)
            assert next(iter(sub)).depth.shape == (2, 2)
    finally:
        pub.close(linger=0)


def test_latest_is_the_newest_that_arrived_even_after_a_backlog():
    """Before: `latest()` stopped at the first momentarily empty receive, so behind a backlog it
    returned results seconds old although newer ones were queued."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    depth = np.zeros((512, 512), np.float32)  # 1 MB per result: a backlog fills the socket buffers

    def publish(seq):
        header = {
            "v": P.VERSION,
            "stream": "cam",
            "seq": seq,
            "t_capture": time.time(),
            "latency_ms": 5.0,
            "dropped": 0,
            "ok": True,
        }
        pub.send_multipart([b"cam", *P.pack(header, {"depth": depth})])

    try:
        with DepthSubscriber(endpoint, streams="cam") as sub:
            deadline = time.monotonic() + 5
            while sub.recv(0.02) is None and time.monotonic() < deadline:  # slow joiner
                publish(-1)
            while sub.recv(0.2) is not None:
                pass
            for seq in range(30):  # a subscriber busy elsewhere while 30 results arrive
                publish(seq)
            time.sleep(1.0)
            assert sub.latest(timeout=1).seq == 29
    finally:
        pub.close(linger=0)


def test_a_request_lost_with_a_dropped_connection_is_resent_at_once():
    """A broker that dies holding the request (its connection drops) and comes back on the same
    port: the client resends on a fresh socket at once instead of waiting out its budget."""
    ctx = zmq.Context.instance()
    first = ctx.socket(zmq.ROUTER)
    first.setsockopt(zmq.LINGER, 0)
    port = first.bind_to_random_port("tcp://127.0.0.1")
    seen = []

    def broker():
        assert first.poll(10_000)
        seen.append(P.unpackb(first.recv_multipart()[2]))
        first.close()  # dies with the request
        time.sleep(0.3)
        second = ctx.socket(zmq.ROUTER)
        second.setsockopt(zmq.LINGER, 2000)  # the reply must leave before the socket closes
        second.bind(f"tcp://127.0.0.1:{port}")
        try:
            assert second.poll(10_000)
            identity, _, header, *_ = second.recv_multipart()
            seen.append(P.unpackb(header))
            second.send_multipart([identity, b"", P.packb(P.ok_header(seen[-1]["id"], status="healthy"))])
            answered.wait(10)  # stay up until the client has its reply
        finally:
            second.close()

    answered = threading.Event()
    thread = threading.Thread(target=broker)
    thread.start()
    try:
        with DepthClient(f"tcp://127.0.0.1:{port}", timeout=20, retries=2) as client:
            started = time.monotonic()
            assert client.health()["status"] == "healthy"
            assert time.monotonic() - started < 5, "the lost request must be resent at once, not after the budget"
    finally:
        answered.set()
        thread.join()
    assert len(seen) == 2 and seen[0]["id"] == seen[1]["id"]
