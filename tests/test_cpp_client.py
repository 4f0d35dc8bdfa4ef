"""The C++ client (clients/cpp), built once per session with CMake and run as its example
programs against a real `zdepth serve --random-weights`, a CURVE server, and small ROUTER stubs
that craft replies or swallow a request.

Without cmake, a compiler or the Debian packages these tests skip, saying which is missing;
with the environment variable CI set they fail instead (CI installs everything: `.ci/run`).
A compile error always fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import zmq
import zmq.auth
import zstandard

from bench.common import REPO
from bench.cpp_client import BuildUnavailable, build
from clients import CameraPublisher, DepthClient
from tests.servers import TEST_INPUT_SIZE, Process, Server, free_port_block
from zdepth import protocol as P

KEY = "zd-cpp-test-key"
K = {"fx": 50.0, "fy": 60.0, "cx": 31.5, "cy": 23.5}
IMAGE = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)

# Every method in every output form the server has, asked for explicitly by both clients.
FORMS = [
    ("metric_depth", "float32", "none"),
    ("metric_depth", "float16", "none"),
    ("metric_depth", "uint16", "none"),
    ("metric_depth", "float32", "zstd"),
    ("metric_depth", "float16", "zstd"),
    ("metric_depth", "uint16", "zstd"),
    ("rel_depth", "float32", "none"),
    ("rel_depth", "float16", "none"),
    ("rel_depth", "float32", "zstd"),
    ("rel_depth", "float16", "zstd"),
    ("pointcloud", "float32", "none"),
    ("pointcloud", "float16", "none"),
    ("pointcloud", "float32", "zstd"),
    ("pointcloud", "float16", "zstd"),
]


def unavailable(reason: str):
    """Skip outside CI; in CI the C++ client must be tested, so this is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the C++ client tests must run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cpp(tmp_path_factory) -> Path:
    """The folder with `depth_request`, `stream_subscriber` and `points`: one configure + build per session."""
    try:
        return build(tmp_path_factory.mktemp("cpp-build"))["bin"]
    except BuildUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    from PIL import Image

    folder = tmp_path_factory.mktemp("cpp-inputs")
    Image.fromarray(IMAGE[..., ::-1]).save(folder / "frame.png")  # IMAGE is BGR, like a camera's buffer
    np.save(folder / "frame.npy", IMAGE)
    return {"png": folder / "frame.png", "npy": folder / "frame.npy", "out": folder}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(
        tmp_path_factory.mktemp("cpp-serve"),
        tmp_path_factory.mktemp("no-checkpoints"),
        extra=["--random-weights", "--api-key", KEY, "--require-auth"],
    )
    try:
        yield srv
    finally:
        srv.stop()


def depth_request(
    cpp: Path, endpoint: str, image: Path, out: Path, *args, timeout: float = 60.0
) -> subprocess.CompletedProcess:
    argv = [
        cpp / "depth_request",
        "--server",
        endpoint,
        "--image",
        image,
        "--out",
        out,
        "--input-size",
        TEST_INPUT_SIZE,
        *args,
    ]
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout + 30)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


# --- against the real server ----------------------------------------------------------------


@pytest.mark.parametrize("method,output_dtype,compression", FORMS)
def test_arrays_equal_the_python_clients_bit_for_bit(cpp, files, server, method, output_dtype, compression):
    out = files["out"] / f"{method}-{output_dtype}-{compression}.npy"
    args = ["--method", method, "--key", KEY, "--output-dtype", output_dtype, "--compression", compression]
    args += ["--fx", K["fx"], "--fy", K["fy"], "--cx", K["cx"], "--cy", K["cy"]] if method == "pointcloud" else []
    run = depth_request(cpp, server.endpoint, files["png"], out, *args)
    assert run.returncode == 0, run.stderr
    assert f"wire={output_dtype} compression={compression}" in run.stdout
    wire = {"output_dtype": output_dtype, "compression": compression, "input_size": TEST_INPUT_SIZE}
    with DepthClient(server.endpoint, key=KEY, timeout=60) as client:
        png = files["png"].read_bytes()
        if method == "pointcloud":
            expected = client.pointcloud(png, K, server_side=True, **wire).points
        else:
            expected = (client.metric_depth if method == "metric_depth" else client.relative_depth)(png, **wire).depth
    assert same_bits(np.load(out), np.asarray(expected))


@pytest.mark.parametrize("socket", ["dealer", "req"])
def test_raw_pixels_colours_and_depth_scale_match_python(cpp, files, server, socket):
    """A raw BGR buffer (.npy) with its shape, with_color, and uint16 with a chosen depth_scale."""
    out, colors = files["out"] / f"raw-{socket}.npy", files["out"] / f"colors-{socket}.npy"
    run = depth_request(
        cpp,
        server.endpoint,
        files["npy"],
        out,
        "--method",
        "pointcloud",
        "--key",
        KEY,
        "--socket",
        socket,
        "--fx",
        K["fx"],
        "--fy",
        K["fy"],
        "--cx",
        K["cx"],
        "--cy",
        K["cy"],
        "--colors-out",
        colors,
    )
    assert run.returncode == 0, run.stderr
    depth_out = files["out"] / f"raw-depth-{socket}.npy"
    run = depth_request(
        cpp,
        server.endpoint,
        files["npy"],
        depth_out,
        "--method",
        "metric_depth",
        "--key",
        KEY,
        "--socket",
        socket,
        "--output-dtype",
        "uint16",
        "--depth-scale",
        "0.002",
        "--compression",
        "zstd",
        "--max-depth",
        "30",
    )
    assert run.returncode == 0, run.stderr
    with DepthClient(server.endpoint, key=KEY, timeout=60, input_size=TEST_INPUT_SIZE) as client:
        cloud = client.pointcloud(
            IMAGE, K, with_color=True, server_side=True, output_dtype="float32", compression="none"
        )
        depth = client.metric_depth(IMAGE, 30.0, output_dtype="uint16", depth_scale=0.002, compression="zstd")
    assert same_bits(np.load(out), np.asarray(cloud.points))
    assert np.array_equal(np.load(colors), cloud.colors) and np.load(colors).dtype == np.uint8
    assert depth.scale == 0.002 and same_bits(np.load(depth_out), np.asarray(depth.depth))


def test_camera_info_matches_python(cpp, files, server):
    """A ROS CameraInfo at 640x480 instead of intrinsics: the server scales K to the 64x48 image."""
    info = {
        "k": [500.0, 0.0, 319.5, 0.0, 510.0, 239.5, 0.0, 0.0, 1.0],
        "width": 640,
        "height": 480,
        "d": [0.0] * 5,
        "distortion_model": "plumb_bob",
    }
    out = files["out"] / "camera-info.npy"
    run = depth_request(
        cpp,
        server.endpoint,
        files["png"],
        out,
        "--method",
        "pointcloud",
        "--key",
        KEY,
        "--camera-k",
        ",".join(map(str, info["k"])),
        "--camera-size",
        "640x480",
        "--camera-d",
        "0,0,0,0,0",
        "--distortion-model",
        "plumb_bob",
        "--output-dtype",
        "float32",
        "--compression",
        "zstd",
    )
    assert run.returncode == 0, run.stderr
    with DepthClient(server.endpoint, key=KEY, timeout=60, input_size=TEST_INPUT_SIZE) as client:
        expected = client.pointcloud(
            files["png"].read_bytes(), camera_info=info, server_side=True, output_dtype="float32", compression="zstd"
        )
    assert same_bits(np.load(out), np.asarray(expected.points))


def test_wrong_key_exits_1_with_unauthorized(cpp, files, server):
    run = depth_request(
        cpp, server.endpoint, files["png"], files["out"] / "x.npy", "--method", "metric_depth", "--key", "not-the-key"
    )
    assert run.returncode == 1 and "unauthorized" in run.stderr, (run.returncode, run.stderr)


def test_bad_request_exits_1_with_the_code(cpp, files, server):
    run = depth_request(
        cpp,
        server.endpoint,
        files["png"],
        files["out"] / "x.npy",
        "--method",
        "rel_depth",
        "--key",
        KEY,
        "--output-dtype",
        "uint16",
    )
    assert run.returncode == 1 and "bad_request" in run.stderr, (run.returncode, run.stderr)


def test_no_server_exits_2_within_the_timeout(cpp, files):
    endpoint = f"tcp://127.0.0.1:{free_port_block(1)}"  # nothing listens there
    start = time.monotonic()
    run = depth_request(
        cpp, endpoint, files["png"], files["out"] / "x.npy", "--method", "metric_depth", "--timeout", "1.5", timeout=1.5
    )
    elapsed = time.monotonic() - start
    assert run.returncode == 2 and "timeout" in run.stderr, (run.returncode, run.stderr)
    assert "(1 try)" in run.stderr, "without --try-timeout one try waits for the whole budget"
    assert 1.4 <= elapsed < 2.5, f"{elapsed:.2f} s for a 1.5 s timeout"


class SwallowFirst:
    """A ROUTER in front of the real server that swallows the first request and forwards the
    rest (a one-request outage): the client's first try times out, its retry must succeed."""

    def __init__(self, backend: str):
        self.context = zmq.Context()
        self.front = self.context.socket(zmq.ROUTER)
        self.front.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{self.front.bind_to_random_port('tcp://127.0.0.1')}"
        self.back = self.context.socket(zmq.DEALER)
        self.back.linger = 0
        self.back.connect(backend)
        self.seen: list = []  # (routing id of the connection, request id) per request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(50))
            if self.front in ready:
                frames = self.front.recv_multipart()
                self.seen.append((frames[0], P.decode_header(frames[2])["id"]))
                if len(self.seen) > 1:
                    self.back.send_multipart(frames)  # [routing id, b"", header, image]: the broker echoes the route
            if self.back in ready:
                self.front.send_multipart(self.back.recv_multipart())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.context.destroy(linger=0)


@pytest.mark.parametrize("socket", ["req", "dealer"])
def test_timeout_then_success_on_a_new_socket(cpp, files, server, socket):
    stub = SwallowFirst(server.endpoint)
    out = files["out"] / f"retry-{socket}.npy"
    try:
        run = depth_request(
            cpp,
            stub.endpoint,
            files["png"],
            out,
            "--method",
            "metric_depth",
            "--key",
            KEY,
            "--socket",
            socket,
            "--output-dtype",
            "float32",
            "--compression",
            "none",
            "--timeout",
            "10",
            "--try-timeout",
            "2",
        )
    finally:
        stub.close()
    assert run.returncode == 0, run.stderr
    assert "sends=2" in run.stdout
    (first_route, first_id), (second_route, second_id) = stub.seen
    assert first_route != second_route, "the retry must come from a new socket (Lazy Pirate)"
    assert first_id == second_id, "a resend keeps the request id"
    with DepthClient(server.endpoint, key=KEY, timeout=60, input_size=TEST_INPUT_SIZE) as client:
        expected = client.metric_depth(files["png"].read_bytes(), output_dtype="float32", compression="none").depth
    assert same_bits(np.load(out), np.asarray(expected)), "the answer is the real server's"


def subscribe_while_sending(cpp: Path, camera: CameraPublisher, *args, frame=IMAGE) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `stream_subscriber ARGS`, run while `camera` sends `frame`
    every 0.2 s until the subscriber exits (60 s at most)."""
    argv = [str(a) for a in [cpp / "stream_subscriber", "--timeout", 60, *args]]
    subscriber = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with camera:
            deadline = time.monotonic() + 60
            while subscriber.poll() is None and time.monotonic() < deadline:
                camera.send(frame)
                time.sleep(0.2)
        out, err = subscriber.communicate(timeout=10)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait()
    return subscriber.returncode, out, err


def test_subscriber_receives_n_results_from_a_camera_stream(cpp, server):
    stream, count = "cpp-cam", 3
    camera = CameraPublisher(server.stream, stream=stream, key=KEY, input_size=TEST_INPUT_SIZE)
    returncode, out, err = subscribe_while_sending(
        cpp, camera, "--server", server.endpoint, "--stream", stream, "--count", count
    )
    assert returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == count
    seqs = [int(line.split("seq=")[1].split()[0]) for line in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == count
    assert all(f"stream={stream} " in line and "latency_ms=" in line and "shape=[48, 64]" in line for line in lines)


def test_subscriber_reports_error_results_with_their_code(cpp, server):
    """A frame the worker cannot decode is published as an error: printed with its code, exit 1."""
    camera = CameraPublisher(server.stream, stream="cpp-broken-cam", key=KEY, input_size=TEST_INPUT_SIZE)
    returncode, out, err = subscribe_while_sending(
        cpp,
        camera,
        "--server",
        server.endpoint,
        "--stream",
        "cpp-broken-cam",
        "--count",
        1,
        frame=b"\xff\xd8\xff" + bytes(64),
    )  # a JPEG signature, then nothing
    assert returncode == 1 and out == "" and "stream=cpp-broken-cam" in err and "error bad_request" in err, (
        returncode,
        err,
    )


def test_protocol_doc_example_is_the_compiled_program(cpp, files, server):
    """docs/protocol.md's C++ example is examples/points.cpp verbatim, and it works."""
    doc = (REPO / "docs" / "protocol.md").read_text()
    section = re.search(r"^## \d+\. Reading reply arrays.*?(?=^## )", doc, re.S | re.M).group(0)
    block = re.search(r"```cpp\n(.*?)```", section, re.S).group(1)
    assert block == (REPO / "clients" / "cpp" / "examples" / "points.cpp").read_text()
    run = subprocess.run(
        [str(cpp / "points"), server.endpoint, str(files["png"]), KEY, str(TEST_INPUT_SIZE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.startswith(f"{IMAGE.shape[0] * IMAGE.shape[1]} points"), run.stderr


def test_subscriber_without_results_exits_2(cpp, server):
    run = subprocess.run(
        [
            str(cpp / "stream_subscriber"),
            "--server",
            server.endpoint,
            "--stream",
            "nobody-sends",
            "--count",
            "1",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "timeout" in run.stderr


def test_bench_runs_with_this_build(cpp, tmp_path):
    """`python -m bench cpp --quick` end to end, on the session's build."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "cpp",
            "--quick",
            "--iterations",
            "2",
            "--build-dir",
            str(cpp),
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "cpp_client.json").read_text())["results"]
    assert {r["client"] for r in results} == {"C++ depth_request", "Python DepthClient"}
    assert all(r["overhead_n"] > 0 and r["round_trip_p50"] > 0 for r in results)


# --- CURVE ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """`zdepth serve` with CURVE, allowing only `robot`'s key; `stranger` has a key pair too."""
    root = tmp_path_factory.mktemp("cpp-curve")
    for folder in ("server", "clients", "outsiders"):
        (root / folder).mkdir()
    zmq.auth.create_certificates(root / "server", "server")
    zmq.auth.create_certificates(root / "clients", "robot")
    zmq.auth.create_certificates(root / "outsiders", "stranger")
    port = free_port_block(5)
    process = Process(
        [
            str(a)
            for a in [
                "serve",
                "--port",
                port,
                "--device",
                "cpu",
                "--workers",
                "1",
                "--threads",
                "1",
                "--random-weights",
                "--checkpoint-dir",
                root,
                "--log-level",
                "WARNING",
                "--curve-secret-file",
                root / "server" / "server.key_secret",
                "--curve-clients",
                root / "clients",
            ]
        ],
        root / "serve.log",
    )
    keys = {
        "endpoint": f"tcp://127.0.0.1:{port}",
        "server": root / "server" / "server.key",
        "robot": root / "clients" / "robot.key_secret",
        "stranger": root / "outsiders" / "stranger.key_secret",
    }
    try:
        with DepthClient(
            keys["endpoint"], timeout=60, retries=30, server_key=keys["server"], client_keys=keys["robot"]
        ) as client:
            deadline = time.monotonic() + 60
            while not client.health()["workers"]:
                assert process.proc.poll() is None and time.monotonic() < deadline, process.log()
                time.sleep(0.2)
        yield keys
    finally:
        process.stop()


def test_curve_right_keys_work(cpp, files, curve):
    run = depth_request(
        cpp,
        curve["endpoint"],
        files["png"],
        files["out"] / "curve.npy",
        "--method",
        "metric_depth",
        "--server-key",
        curve["server"],
        "--client-cert",
        curve["robot"],
    )
    assert run.returncode == 0, run.stderr
    assert np.load(files["out"] / "curve.npy").shape == IMAGE.shape[:2]


@pytest.mark.parametrize("who", ["stranger", "wrong_server_key", "plain"])
def test_curve_wrong_keys_time_out(cpp, files, curve, who):
    args = {
        "stranger": ["--server-key", curve["server"], "--client-cert", curve["stranger"]],
        "wrong_server_key": ["--server-key", curve["stranger"], "--client-cert", curve["robot"]],
        "plain": [],
    }[who]
    run = depth_request(
        cpp,
        curve["endpoint"],
        files["png"],
        files["out"] / "x.npy",
        "--method",
        "metric_depth",
        "--timeout",
        "1.5",
        "--retries",
        "0",
        *args,
        timeout=1.5,
    )
    assert run.returncode == 2 and "timeout" in run.stderr, (run.returncode, run.stderr)


def test_curve_subscriber_receives_with_the_right_keys(cpp, curve):
    stream = "cpp-secure-cam"
    host, port = curve["endpoint"].rsplit(":", 1)
    camera = CameraPublisher(
        f"{host}:{int(port) + P.STREAM_PORT_OFFSET}",
        stream=stream,
        input_size=TEST_INPUT_SIZE,
        server_key=curve["server"],
        client_keys=curve["robot"],
    )
    returncode, out, err = subscribe_while_sending(
        cpp,
        camera,
        "--server",
        curve["endpoint"],
        "--stream",
        stream,
        "--count",
        1,
        "--server-key",
        curve["server"],
        "--client-cert",
        curve["robot"],
    )
    assert returncode == 0 and f"stream={stream} " in out, err


# --- reply decoding, against crafted replies ------------------------------------------------


class Stub:
    """A ROUTER that answers every request with one crafted reply: (descriptor, frame).
    `stale`: a reply with another id comes first, as a late answer to an old request would.
    `errors`: the first requests are answered with these error codes instead, one each."""

    def __init__(self, descriptor: dict, frame: bytes, stale: Optional[tuple] = None, errors: tuple = ()):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.reply = (descriptor, frame)
        self.stale = stale
        self.errors = list(errors)
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            frames = self.router.recv_multipart()
            request_id = P.decode_header(frames[2])["id"]
            self.requests += 1
            if self.errors:
                self.router.send_multipart(
                    [frames[0], b"", P.packb(P.error_header(request_id, self.errors.pop(0), "stub"))]
                )
                continue
            for reply_id, (descriptor, frame) in ([(request_id + 1000, self.stale)] if self.stale else []) + [
                (request_id, self.reply)
            ]:
                header = P.ok_header(reply_id, arrays={"depth": descriptor}, min=0.0, max=1.0, timing={})
                self.router.send_multipart([frames[0], b"", P.packb(header), frame])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.context.destroy(linger=0)


def ask_stub(cpp: Path, files: dict, descriptor: dict, frame: bytes, stale: Optional[tuple] = None) -> tuple:
    stub = Stub(descriptor, frame, stale)
    out = files["out"] / "stub.npy"
    out.unlink(missing_ok=True)
    try:
        run = depth_request(cpp, stub.endpoint, files["png"], out, "--method", "metric_depth", "--timeout", "10")
    finally:
        stub.close()
    return run, (np.load(out) if run.returncode == 0 else None)


def test_dealer_drops_replies_with_another_id(cpp, files):
    depth = np.arange(8, dtype=np.float32).reshape(2, 4)
    desc = {"frame": 1, "dtype": "float32", "shape": [2, 4]}
    run, got = ask_stub(cpp, files, desc, depth.tobytes(), stale=(desc, (depth + 100).tobytes()))
    assert run.returncode == 0, run.stderr
    assert same_bits(got, depth)


@pytest.mark.parametrize(
    "errors,returncode,requests",
    [
        (("overloaded", "worker_lost", "shutting_down"), 0, 4),  # early retryable answers: resent (retries 3)
        (("timeout",), 1, 1),  # the server's timeout: the try's time is spent, not resent
        (("bad_request",), 1, 1),
        (("overloaded",) * 4, 1, 4),  # retries used up: the last error, with its code
    ],
)
def test_resends_follow_the_error_code(cpp, files, errors, returncode, requests):
    stub = Stub({"frame": 1, "dtype": "float32", "shape": [2]}, bytes(8), errors=errors)
    try:
        run = depth_request(
            cpp, stub.endpoint, files["png"], files["out"] / "x.npy", "--method", "metric_depth", "--retries", 3
        )
    finally:
        stub.close()
    assert run.returncode == returncode and stub.requests == requests, (run.returncode, stub.requests, run.stderr)
    if returncode:
        assert f"error {errors[-1]}: stub" in run.stderr


def test_float16_converts_exactly(cpp, files):
    """Every float16 bit pattern but NaNs (whose payload conversion may differ by CPU): zeros,
    subnormals, normals, the largest finite values, infinities."""
    bits = np.arange(65536, dtype=np.uint16)
    half = bits.view(np.float16)
    half = half[~np.isnan(half)]
    run, got = ask_stub(cpp, files, {"frame": 1, "dtype": "float16", "shape": list(half.shape)}, half.tobytes())
    assert run.returncode == 0, run.stderr
    assert same_bits(got, half.astype(np.float32))


def test_uint16_delta_row_zstd_undone_with_wraparound(cpp, files):
    counts = np.array([[0, 65535, 1, 40000, 0], [7, 7, 65000, 3, 65535]], dtype=np.uint16)
    frame = zstandard.ZstdCompressor().compress(P.delta_rows(counts).tobytes())
    desc = {
        "frame": 1,
        "dtype": "uint16",
        "shape": [2, 5],
        "compression": "zstd",
        "filter": "delta_row",
        "scale": 0.001,
    }
    run, got = ask_stub(cpp, files, desc, frame)
    assert run.returncode == 0, run.stderr
    assert same_bits(got, counts.astype(np.float32) * np.float32(0.001))


def _zstd(data: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


@pytest.mark.parametrize(
    "case,frame",
    [
        ("more bytes than the shape", _zstd(bytes(64))),
        ("fewer bytes than the shape", _zstd(bytes(16))),
        ("more bytes, no content size in the frame", _zstd(bytes(4096), content_size=False)),
        ("fewer bytes, no content size in the frame", _zstd(bytes(16), content_size=False)),
        ("trailing data after the frame", _zstd(bytes(32)) + b"\0"),
        ("two frames", _zstd(bytes(16)) + _zstd(bytes(16))),
        ("not zstd at all", bytes(32)),
        ("a truncated frame", _zstd(np.random.default_rng(0).bytes(32))[:-3]),
    ],
)
def test_zstd_frame_of_the_wrong_size_is_a_clear_error(cpp, files, case, frame):
    """float32 [2, 4] needs 32 bytes: anything else is an `internal` error naming the array."""
    run, _ = ask_stub(cpp, files, {"frame": 1, "dtype": "float32", "shape": [2, 4], "compression": "zstd"}, frame)
    assert run.returncode == 1, (case, run.stdout, run.stderr)
    assert "internal" in run.stderr and "array 'depth'" in run.stderr, run.stderr


@pytest.mark.parametrize(
    "descriptor,frame",
    [
        ({"frame": 1, "dtype": "float32", "shape": [2, 4]}, bytes(31)),  # one byte short, uncompressed
        ({"frame": 2, "dtype": "float32", "shape": [2, 4]}, bytes(32)),  # points past the last frame
        ({"frame": 1, "dtype": "float64", "shape": [2, 2]}, bytes(32)),  # not a dtype depth comes in
        ({"frame": 1, "dtype": "float32", "shape": [65536, 65536, 65536]}, bytes(32)),  # far past max_array_bytes
        ({"frame": 1, "dtype": "float32", "shape": [8], "filter": "delta_row"}, bytes(32)),  # delta_row is for uint16
        ({"frame": 1, "dtype": "uint16", "shape": [16], "scale": -1.0}, bytes(32)),
    ],
    ids=["short frame", "frame past the end", "float64", "huge shape", "delta_row on float32", "negative scale"],
)
def test_inconsistent_descriptors_are_refused(cpp, files, descriptor, frame):
    run, _ = ask_stub(cpp, files, descriptor, frame)
    assert run.returncode == 1 and "internal" in run.stderr, (descriptor, run.stderr)
