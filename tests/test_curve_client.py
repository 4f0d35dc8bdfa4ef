"""Client-side CURVE: `server_key` / `client_keys` on DepthClient, the stream classes, profiles
and the api functions, against real CURVE sockets that authenticate clients with `zmq.auth`
(ThreadAuthenticator, a directory of allowed client certificates or any client), and against
a real `zdepth serve --curve-secret-file ...` with `--curve-clients DIR` or `--curve-allow-any`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from clients import CameraPublisher, DepthClient, DepthSubscriber, Timeout, api, client_from_profile
from clients.profiles import load_profiles
from clients.security import CurveKeys, curve_keys
from tests.servers import TEST_INPUT_SIZE, Server
from zdepth import protocol as P


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """server, alice (allowed), mallory (not allowed); allowed/ holds alice's public key only."""
    folder = tmp_path_factory.mktemp("certs")
    for name in ("server", "alice", "mallory"):
        zmq.auth.create_certificates(folder, name)
        (folder / f"{name}.key_secret").chmod(0o600)
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "alice.key").write_bytes((folder / "alice.key").read_bytes())
    return folder


class CurveServer:
    """A CURVE ROUTER that answers `health` (with the caller's authenticated key as
    `user_id`), a CURVE PULL and a CURVE PUB: the three socket kinds clients connect to.
    `drop` requests are left unanswered first, to make a client retry."""

    def __init__(self, certs: Path, allow_any: bool, drop: int = 0):
        self.context = zmq.Context()
        self.auth = ThreadAuthenticator(self.context)
        self.auth.start()
        self.auth.configure_curve(
            domain="zdepth", location=zmq.auth.CURVE_ALLOW_ANY if allow_any else str(certs / "allowed")
        )
        self.public, secret = zmq.auth.load_certificate(certs / "server.key_secret")
        self.router, self.endpoint = self._bind(zmq.ROUTER, secret)
        self.pull, self.ingress = self._bind(zmq.PULL, secret)
        self.pub, self.results = self._bind(zmq.PUB, secret)
        self.drop = drop
        self.requests: list[str] = []  # the User-Id (client public key) of each request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _bind(self, kind: int, secret: bytes) -> tuple[zmq.Socket, str]:
        sock = self.context.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.zap_domain = b"zdepth"
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        return sock, f"tcp://127.0.0.1:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            frames = self.router.recv_multipart(copy=False)
            self.requests.append(frames[-1].get("User-Id"))
            if len(self.requests) <= self.drop:
                continue
            header = P.decode_header(frames[-1])
            reply = P.ok_header(header.get("id"), status="healthy", user_id=frames[-1].get("User-Id"))
            self.router.send_multipart([frames[0].bytes, b"", P.packb(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.auth.stop()
        self.context.destroy(linger=0)


@pytest.fixture
def ironhouse(certs):
    """Only clients whose public key is in certs/allowed (alice)."""
    server = CurveServer(certs, allow_any=False)
    yield server
    server.close()


@pytest.fixture
def stonehouse(certs):
    """Any client key, still encrypted (the server's --curve-allow-any)."""
    server = CurveServer(certs, allow_any=True)
    yield server
    server.close()


def public_key(path: Path) -> str:
    return zmq.auth.load_certificate(path)[0].decode()


def health(endpoint: str, timeout: float = 5.0, retries: int = 0, **curve) -> dict:
    with DepthClient(endpoint, timeout=timeout, retries=retries, **curve) as client:
        return client.health()


# --- request/reply -----------------------------------------------------------------------


def test_allowed_client_certificate_works(ironhouse, certs):
    reply = health(ironhouse.endpoint, server_key=certs / "server.key", client_keys=certs / "alice.key_secret")
    assert reply["status"] == "healthy" and reply["user_id"] == public_key(certs / "alice.key")
    # the same keys as Z85 strings and a (public, secret) pair; the path as a plain str too
    alice = tuple(k.decode() for k in zmq.auth.load_certificate(certs / "alice.key_secret"))
    assert health(ironhouse.endpoint, server_key=ironhouse.public.decode(), client_keys=alice)["user_id"] == alice[0]
    assert (
        health(ironhouse.endpoint, server_key=str(certs / "server.key"), client_keys=list(alice))["status"] == "healthy"
    )


def test_any_client_with_an_ephemeral_key_pair(stonehouse, certs):
    first = health(stonehouse.endpoint, server_key=certs / "server.key")
    second = health(stonehouse.endpoint, server_key=certs / "server.key")
    assert first["status"] == "healthy" and first["user_id"] != second["user_id"]  # a fresh pair per client


@pytest.mark.parametrize(
    "curve",
    [
        pytest.param({}, id="no-curve"),
        pytest.param({"server_key": "mallory.key", "client_keys": "alice.key_secret"}, id="wrong-server-key"),
        pytest.param({"server_key": "server.key", "client_keys": "mallory.key_secret"}, id="client-not-allowed"),
        pytest.param({"server_key": "server.key"}, id="ephemeral-not-allowed"),
    ],
)
def test_refused_handshakes_time_out(ironhouse, certs, curve):
    curve = {name: certs / file for name, file in curve.items()}
    with pytest.raises(Timeout) as err:
        health(ironhouse.endpoint, timeout=1.0, retries=1, **curve)
    assert ("CURVE is on" in str(err.value)) == bool(curve)
    assert ironhouse.requests == []  # nothing got past the handshake
    assert (
        health(ironhouse.endpoint, server_key=certs / "server.key", client_keys=certs / "alice.key_secret")["status"]
        == "healthy"
    )


def test_fresh_sockets_carry_the_same_keys(certs):
    """Lazy Pirate: the first request goes unanswered, so the client replaces its socket (each
    try may use the whole budget: a silent server is not resent to within one call); the next
    call goes out on the fresh socket, which must carry the same CURVE keys to get through."""
    server = CurveServer(certs, allow_any=False, drop=1)
    try:
        with DepthClient(
            server.endpoint,
            timeout=1.0,
            retries=1,
            server_key=certs / "server.key",
            client_keys=certs / "alice.key_secret",
        ) as client:
            with pytest.raises(Timeout):
                client.health()
            reply = client.health()
        alice = public_key(certs / "alice.key")
        assert reply["status"] == "healthy" and server.requests == [alice, alice]
    finally:
        server.close()


# --- streams -----------------------------------------------------------------------------


def test_stream_publisher_and_subscriber(ironhouse, certs):
    curve = {"server_key": certs / "server.key", "client_keys": certs / "alice.key_secret"}
    with CameraPublisher(ironhouse.ingress, stream="cam0", **curve) as publisher:
        publisher.send(np.zeros((4, 6, 3), np.uint8))
        assert ironhouse.pull.poll(5000)
        frames = ironhouse.pull.recv_multipart(copy=False)
    assert P.decode_header(frames[0])["stream"] == "cam0" and frames[0].get("User-Id") == public_key(
        certs / "alice.key"
    )

    with DepthSubscriber(ironhouse.results, "cam0", **curve) as subscriber:
        result = None
        for seq in range(50):  # a SUB joins late: publish until its subscription has arrived
            ironhouse.pub.send_multipart([b"cam0", P.packb(P.ok_header(None, stream="cam0", seq=seq))])
            result = subscriber.recv(timeout=0.1)
            if result is not None:
                break
    assert result is not None and result.ok and result.stream == "cam0"

    with CameraPublisher(
        ironhouse.ingress, stream="cam1", server_key=certs / "server.key", client_keys=certs / "mallory.key_secret"
    ) as intruder:
        intruder.send(np.zeros((4, 6, 3), np.uint8))
        assert not ironhouse.pull.poll(500)


# --- profiles and the api functions ------------------------------------------------------


def test_profiles_and_api_functions(ironhouse, certs, tmp_path, monkeypatch):
    config = tmp_path / "servers.yaml"
    config.write_text(
        f"secure:\n  endpoint: {ironhouse.endpoint}\n  server_key_file: {certs / 'server.key'}\n"
        f"  client_key_file: {certs.name}/alice.key_secret\n"  # relative: from the file's folder
        f"inline:\n  endpoint: {ironhouse.endpoint}\n  server_key: '{ironhouse.public.decode()}'\n"
    )
    (tmp_path / certs.name).symlink_to(certs)
    profiles = load_profiles(config)
    assert profiles["secure"].client_key_file == tmp_path / certs.name / "alice.key_secret"
    with client_from_profile("secure", config, timeout=5, retries=0) as client:
        assert client.health()["user_id"] == public_key(certs / "alice.key")
    with client_from_profile("inline", config, timeout=1, retries=0) as client:
        with pytest.raises(Timeout):  # an ephemeral key: not in allowed/
            client.health()

    monkeypatch.setenv("ZDEPTH_SERVERS", str(config))
    assert api.get_health("secure", timeout=5)["user_id"] == public_key(certs / "alice.key")
    explicit = api.get_health(
        ironhouse.endpoint, timeout=5, server_key=certs / "server.key", client_keys=certs / "alice.key_secret"
    )
    assert explicit["status"] == "healthy"


@pytest.mark.parametrize(
    "entry, words",
    [
        ("server_key: abc\n  server_key_file: s.key", "not both"),
        ("client_key_file: c.key_secret", "needs `server_key`"),
        ("server_key: [1, 2]", "must be a string"),
    ],
)
def test_profile_mistakes(tmp_path, entry, words):
    config = tmp_path / "servers.yaml"
    config.write_text(f"p:\n  endpoint: tcp://h:1\n  {entry}\n")
    with pytest.raises(ValueError, match=words):
        load_profiles(config)


# --- key arguments -----------------------------------------------------------------------


def test_key_arguments(certs):
    server = certs / "server.key"
    assert curve_keys() is None
    keys = curve_keys(server, certs / "alice.key_secret")
    assert isinstance(keys, CurveKeys) and keys.secret.decode() not in repr(keys)
    assert keys.server_public.decode() == public_key(server)
    assert curve_keys(certs / "server.key_secret").server_public == keys.server_public  # its public half
    alice_public, alice_secret = zmq.auth.load_certificate(certs / "alice.key_secret")
    mallory_public = zmq.auth.load_certificate(certs / "mallory.key")[0]
    mistakes = [
        ({"client_keys": certs / "alice.key_secret"}, "needs server_key"),
        ({"server_key": server, "client_keys": certs / "alice.key"}, "public certificate"),
        ({"server_key": certs / "missing.key"}, "cannot read"),
        ({"server_key": "too-short"}, "40-character"),
        ({"server_key": "~" * 40}, "not valid Z85"),
        ({"server_key": server, "client_keys": (mallory_public, alice_secret)}, "does not belong"),
        ({"server_key": server, "client_keys": (alice_public,)}, "pair"),
        ({"server_key": server, "client_keys": "no-such.key_secret"}, "no certificate file"),
    ]
    for kwargs, words in mistakes:
        with pytest.raises(ValueError, match=words):
            curve_keys(**kwargs)
    with pytest.raises(ValueError, match="needs server_key"):  # checked before any socket is made
        DepthClient("tcp://127.0.0.1:1", client_keys=certs / "alice.key_secret")


# --- a real `zdepth serve` with CURVE ----------------------------------------------------


class CurveServe(Server):
    """`zdepth serve` whose client sockets need CURVE: readiness is asked with `curve` keys."""

    def __init__(self, tmp: Path, curve: dict, extra: list):
        self.curve = curve
        super().__init__(tmp, tmp, extra=["--random-weights", *extra])

    def wait_ready(self, workers: int, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"zdepth serve exited with {self.process.proc.returncode}:\n{self.process.log()}")
            try:
                state = health(self.endpoint, timeout=1.0, **self.curve)
                if len(state.get("workers", [])) >= workers:
                    return state
            except Timeout:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"zdepth serve with CURVE not ready in {timeout_s} s:\n{self.process.log()}")


def test_real_server_with_allowed_client_certificates(tmp_path, certs):
    alice = {"server_key": certs / "server.key", "client_keys": certs / "alice.key_secret"}
    server = CurveServe(
        tmp_path,
        alice,
        ["--curve-secret-file", str(certs / "server.key_secret"), "--curve-clients", str(certs / "allowed")],
    )
    try:
        with DepthClient(server.endpoint, timeout=30, input_size=TEST_INPUT_SIZE, **alice) as client:
            assert client.health()["encrypted"] is True
            assert client.metric_depth(np.zeros((24, 32, 3), np.uint8)).depth.shape == (24, 32)
        for curve in (
            {},
            {"server_key": certs / "mallory.key", "client_keys": certs / "alice.key_secret"},
            {"server_key": certs / "server.key", "client_keys": certs / "mallory.key_secret"},
            {"server_key": certs / "server.key"},
        ):
            with pytest.raises(Timeout):
                health(server.endpoint, timeout=1.0, **curve)

        with (
            DepthSubscriber(server.pub, "cam0", **alice) as subscriber,
            CameraPublisher(server.stream, stream="cam0", input_size=TEST_INPUT_SIZE, **alice) as camera,
        ):
            result = None
            for _ in range(60):  # the SUB joins late: send until a result comes back
                camera.send(np.zeros((24, 32, 3), np.uint8))
                result = subscriber.recv(timeout=0.5)
                if result is not None:
                    break
        assert result is not None and result.ok and result.depth.shape == (24, 32)
    finally:
        server.stop()


def test_real_server_allowing_any_client(tmp_path, certs):
    server = CurveServe(
        tmp_path,
        {"server_key": certs / "server.key"},
        ["--curve-secret-file", str(certs / "server.key_secret"), "--curve-allow-any"],
    )
    try:
        assert health(server.endpoint, server_key=certs / "server.key")["encrypted"] is True  # an ephemeral key pair
        with pytest.raises(Timeout):
            health(server.endpoint, timeout=1.0)  # still no plain-text clients
    finally:
        server.stop()
