"""CURVE on the broker's client-facing sockets: only clients with the right keys get answers.

A failed CURVE handshake is silent in ZeroMQ, so "cannot talk" means: no reply within a
timeout, while a client with the right keys gets one at once from the same server.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from clients import DepthClient, Timeout
from tests.servers import TEST_INPUT_SIZE, Process, free_port_block
from zdepth import protocol as P

IMAGE = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
SILENCE_S = 1.5


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """Certificates as `zdepth keygen` writes them: the server's, an allowed client's (in the
    clients folder) and an outsider's (not in it)."""
    root = tmp_path_factory.mktemp("curve")
    for folder in ("server", "clients", "outsiders"):
        (root / folder).mkdir()
    zmq.auth.create_certificates(root / "server", "server")
    zmq.auth.create_certificates(root / "clients", "robot")
    zmq.auth.create_certificates(root / "outsiders", "stranger")
    return {
        "root": root,
        "server_secret": root / "server" / "server.key_secret",
        "server_public": zmq.auth.load_certificate(root / "server" / "server.key")[0],
        "clients": root / "clients",
        "robot": zmq.auth.load_certificate(root / "clients" / "robot.key_secret"),
        "stranger": zmq.auth.load_certificate(root / "outsiders" / "stranger.key_secret"),
    }


def curve_socket(kind: int, endpoint: str, server_public: bytes = None, pair: tuple = None) -> zmq.Socket:
    """A raw socket, encrypted when given the server's public key and a client key pair."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if server_public is not None:
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = pair
    sock.connect(endpoint)
    return sock


def ask_health(endpoint: str, server_public: bytes = None, pair: tuple = None, timeout_s: float = 5.0):
    """The health reply, or None when none came (the handshake failed)."""
    sock = curve_socket(zmq.DEALER, endpoint, server_public, pair)
    try:
        sock.send_multipart([b"", P.packb(P.request_header(P.HEALTH, id=1))])
        return P.decode_header(sock.recv_multipart()[1]) if sock.poll(int(timeout_s * 1000)) else None
    finally:
        sock.close()


class Running:
    """`zdepth broker` or `zdepth serve` on free ports; `wait` until a client with the given
    keys gets health with `workers` workers (tests/servers.Server asks in plain text)."""

    def __init__(self, tmp: Path, command: str, *flags):
        self.port = free_port_block(5)
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.stream = f"tcp://127.0.0.1:{self.port + P.STREAM_PORT_OFFSET}"
        self.pub = f"tcp://127.0.0.1:{self.port + P.PUB_PORT_OFFSET}"
        args = [command, "--port", str(self.port), "--log-level", "WARNING", *map(str, flags)]
        self.process = Process(args, tmp / f"{command}-{self.port}.log")

    def wait(self, server_public: bytes = None, pair: tuple = None, workers: int = 0) -> "Running":
        deadline = time.monotonic() + 60
        while True:
            state = ask_health(self.endpoint, server_public, pair, timeout_s=0.5)
            if state is not None and len(state["workers"]) >= workers:
                return self
            assert self.process.proc.poll() is None and time.monotonic() < deadline, self.process.log()

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir, keys):
    srv = Running(
        tmp_path_factory.mktemp("curve-serve"),
        "serve",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--threads",
        "1",
        "--checkpoint-dir",
        checkpoint_dir,
        "--curve-secret-file",
        keys["server_secret"],
        "--curve-clients",
        keys["clients"],
    )
    try:
        yield srv.wait(keys["server_public"], keys["robot"], workers=1)
    finally:
        srv.stop()


def test_allowed_client_is_served(server, keys):
    state = ask_health(server.endpoint, keys["server_public"], keys["robot"])
    assert state["ok"] and state["encrypted"] is True
    with DepthClient(
        server.endpoint,
        timeout=30,
        input_size=TEST_INPUT_SIZE,
        server_key=keys["server_public"],
        client_keys=keys["robot"],
    ) as client:
        assert client.metric_depth(IMAGE).depth.shape == IMAGE.shape[:2]


@pytest.mark.parametrize("who", ["plain", "unknown_client_key", "wrong_server_key"])
def test_others_get_no_answer(server, keys, who):
    args = {
        "plain": (None, None),
        "unknown_client_key": (keys["server_public"], keys["stranger"]),
        "wrong_server_key": (keys["stranger"][0], keys["robot"]),
    }[who]
    assert ask_health(server.endpoint, *args, timeout_s=SILENCE_S) is None
    assert ask_health(server.endpoint, keys["server_public"], keys["robot"])["ok"], (
        "the server still serves allowed clients"
    )


def test_depth_client_without_keys_times_out(server, keys):
    with DepthClient(server.endpoint, timeout=SILENCE_S, retries=0) as client:
        with pytest.raises(Timeout):
            client.health()


def test_stream_and_pub_are_encrypted(server, keys):
    """A camera and a subscriber with keys get depth; a plain subscriber gets nothing."""
    sub = curve_socket(zmq.SUB, server.pub, keys["server_public"], keys["robot"])
    plain_sub = curve_socket(zmq.SUB, server.pub)
    camera = curve_socket(zmq.PUSH, server.stream, keys["server_public"], keys["robot"])
    try:
        for s in (sub, plain_sub):
            s.setsockopt(zmq.SUBSCRIBE, b"secure-cam")
        time.sleep(0.5)
        header = P.request_header(
            P.METRIC_DEPTH,
            stream="secure-cam",
            seq=1,
            input_size=TEST_INPUT_SIZE,
            image={"frame": 1, "format": "raw", "shape": list(IMAGE.shape)},
        )
        got = None
        for seq in range(10):
            camera.send_multipart([P.packb(dict(header, seq=seq)), IMAGE.tobytes()])
            if sub.poll(2000):
                got = sub.recv_multipart()
                break
        assert got is not None and got[0] == b"secure-cam" and P.decode_header(got[1])["ok"]
        assert not plain_sub.poll(500), "a plain subscriber must not see results"
    finally:
        for s in (sub, plain_sub, camera):
            s.close()


def test_allow_any_encrypts_without_client_list(tmp_path, keys):
    broker = Running(tmp_path, "broker", "--curve-secret-file", keys["server_secret"], "--curve-allow-any")
    try:
        broker.wait(keys["server_public"], keys["stranger"])
        assert ask_health(broker.endpoint, keys["server_public"], zmq.curve_keypair())["ok"], "any key pair will do"
        assert ask_health(broker.endpoint, timeout_s=SILENCE_S) is None, "but plain text will not"
    finally:
        broker.stop()


def test_sighup_reloads_client_certificates(tmp_path, keys):
    clients = tmp_path / "clients"
    shutil.copytree(keys["clients"], clients)
    broker = Running(tmp_path, "broker", "--curve-secret-file", keys["server_secret"], "--curve-clients", clients)
    try:
        broker.wait(keys["server_public"], keys["robot"])
        assert ask_health(broker.endpoint, keys["server_public"], keys["stranger"], timeout_s=SILENCE_S) is None
        shutil.copy(keys["root"] / "outsiders" / "stranger.key", clients / "stranger.key")
        broker.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while ask_health(broker.endpoint, keys["server_public"], keys["stranger"], timeout_s=0.5) is None:
            assert time.monotonic() < deadline, "SIGHUP did not admit the new client certificate"
    finally:
        broker.stop()


def test_curve_off_still_plain(tmp_path):
    broker = Running(tmp_path, "broker")
    try:
        broker.wait()
        state = ask_health(broker.endpoint)
        assert state["ok"] and state["encrypted"] is False
    finally:
        broker.stop()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--curve-secret-file", "{public}", "--curve-allow-any"], "holds no secret key"),
        (
            ["--curve-secret-file", "{secret}"],
            "CURVE needs --curve-clients DIR, --curve-allow-any or --worker-keys DIR",
        ),
        (["--curve-allow-any"], "need --curve-secret-file"),
    ],
)
def test_bad_curve_flags_fail_at_start(keys, flags, message):
    flags = [f.format(public=keys["root"] / "server" / "server.key", secret=keys["server_secret"]) for f in flags]
    port = free_port_block(5)
    out = subprocess.run(
        [sys.executable, "-m", "zdepth", "broker", "--port", str(port), *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr  # a one-line error
