"""Hostile and careless clients (issue 10): each protection against a real `zdepth broker` or
`zdepth serve`, each test failing when its protection is removed. docs/limits.md lists them."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest
import zmq
import zmq.auth

from bench.attacks import scan_bomb, thin_png
from broker.streams import StreamSlots
from tests.servers import TEST_INPUT_SIZE, Process, Server, free_port_block, health, raw_request
from zdepth import protocol as P
from zdepth.images import encode_png

MB = 1024 * 1024

# --- compute bounded before compute ---------------------------------------------------------


def raw_header(shape: tuple, input_size: int = P.DEFAULT_INPUT_SIZE) -> dict:
    return P.request_header(
        P.METRIC_DEPTH, id="bomb", input_size=input_size, image={"frame": 1, "format": "raw", "shape": list(shape)}
    )


def encoded_header(fmt: str, input_size: int = P.DEFAULT_INPUT_SIZE) -> dict:
    return P.request_header(P.METRIC_DEPTH, id="bomb", input_size=input_size, image={"frame": 1, "format": fmt})


def refused(reply: dict, flag: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == P.TOO_LARGE and flag in reply["error"]["message"], reply


@pytest.fixture
def lone_broker(tmp_path):
    """`zdepth broker` without workers: whatever answers a prediction is the broker itself."""
    port = free_port_block(5)
    process = Process(
        ["broker", "--port", str(port), "--log-level", "ERROR", "--no-worker-grace", "0"], tmp_path / "broker.log"
    )
    endpoint = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while health(endpoint, timeout_s=0.5) is None:
        assert process.proc.poll() is None and time.monotonic() < deadline, process.log()
    yield endpoint
    process.stop()


def test_broker_refuses_raw_compute_bombs(lone_broker):
    thin = np.zeros((1, 600, 3), np.uint8)  # 1,800 bytes; at input 518: 518 x 310,800
    refused(raw_request(lone_broker, raw_header(thin.shape), [thin.tobytes()], timeout_s=2)[0], "--max-aspect")
    wide = np.zeros((300, 1200, 3), np.uint8)  # aspect 4 is fine, but at input 1792: 128 x 512 = 65,536 tokens
    refused(
        raw_request(lone_broker, raw_header(wide.shape, P.MAX_INPUT_SIZE), [wide.tobytes()], timeout_s=2)[0],
        "--max-tokens",
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("hostile"), checkpoint_dir, workers=1)
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "name, data, fmt, input_size, flag",
    [
        ("thin png", thin_png(), "png", P.DEFAULT_INPUT_SIZE, "--max-aspect"),
        (
            "wide png at the largest input",
            encode_png(np.zeros((300, 1200, 3), np.uint8)),
            "png",
            P.MAX_INPUT_SIZE,
            "--max-tokens",
        ),
        ("progressive jpeg of 210 scans", scan_bomb(200, 512), "jpeg", TEST_INPUT_SIZE, "--max-jpeg-scans"),
    ],
)
def test_worker_refuses_compute_bombs_before_the_model(server, name, data, fmt, input_size, flag):
    started = time.monotonic()
    reply, _ = raw_request(server.endpoint, encoded_header(fmt, input_size), [data], timeout_s=10)
    assert time.monotonic() - started < 3.0, f"{name}: answered after {time.monotonic() - started:.2f} s"
    refused(reply, flag)
    image = np.zeros((48, 64, 3), np.uint8)
    started = time.monotonic()
    reply, arrays = raw_request(
        server.endpoint, raw_header(image.shape, TEST_INPUT_SIZE), [image.tobytes()], timeout_s=10
    )
    assert reply["ok"] is True, reply
    assert time.monotonic() - started < 5.0, "the next request waited"


# --- reply budget per client ----------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0


@pytest.fixture
def reply_server(tmp_path, checkpoint_dir):
    srv = Server(tmp_path, checkpoint_dir, workers=1, extra=["--max-client-reply-mb", "4"])
    yield srv
    srv.stop()


def test_client_that_never_reads_is_bounded(reply_server):
    """Attack 1: point clouds with colours (15 MiB each) to a client that reads nothing. Without
    the reply budget the broker holds every reply (12 x 15 MiB); with it, one reply plus 4 MiB."""
    image = np.zeros((1024, 1024, 3), np.uint8)
    header = P.request_header(
        P.POINTCLOUD,
        id="flood",
        input_size=TEST_INPUT_SIZE,
        with_color=True,
        intrinsics={"fx": 500.0, "fy": 500.0, "cx": 512.0, "cy": 512.0},
        image={"frame": 1, "format": "raw", "shape": list(image.shape)},
    )
    ctx = zmq.Context.instance()
    attacker = ctx.socket(zmq.DEALER)
    attacker.setsockopt(zmq.RCVHWM, 1)  # its ZeroMQ stops reading the connection too
    attacker.setsockopt(zmq.RCVBUF, 4096)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(reply_server.endpoint)
    broker_pid = reply_server.process.proc.pid
    try:
        before = rss_mb(broker_pid)
        for _ in range(12):
            attacker.send_multipart([b"", P.packb(header), image.tobytes()])
        # One worker serves in order: when a good client's request is answered, so were the 12.
        small = np.zeros((48, 64, 3), np.uint8)
        reply, _ = raw_request(
            reply_server.endpoint, raw_header(small.shape, TEST_INPUT_SIZE), [small.tobytes()], timeout_s=60
        )
        assert reply["ok"] is True, reply
        time.sleep(0.5)
        grown = rss_mb(broker_pid) - before
        stats, _ = raw_request(reply_server.endpoint, P.request_header(P.STATS, id="s"))
        assert grown < 60, f"broker grew {grown:.0f} MB under a client that never reads ({stats['bytes']})"
        assert stats["counters"].get("replies_dropped", 0) + stats["errors"].get("overloaded", 0) >= 8, stats
    finally:
        attacker.close()


# --- connections ----------------------------------------------------------------------------

ZMTP_GREETING = (
    b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
)  # ZMTP 3.1, NULL, client
ZMTP_READY_DEALER = b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"  # the client's half of the NULL handshake


def start_broker(tmp_path, *flags: str, fd_limit: Optional[tuple] = None) -> tuple:
    """`zdepth broker` on free ports, optionally under an (soft, hard) open-file limit; (process, port)."""
    port = free_port_block(5)
    log = open(tmp_path / f"broker-{port}.log", "ab")
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, fd_limit)) if fd_limit else None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zdepth",
            "broker",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            "--no-worker-grace",
            "0",
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=limit,
    )
    deadline = time.monotonic() + 30
    while health(f"tcp://127.0.0.1:{port}", timeout_s=0.5) is None:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / f"broker-{port}.log").read_text()
    return proc, port


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the peer closes `sock` within `timeout_s`, reading (and ignoring) what it sends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(4096):
                return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
    return False


def test_greeting_only_connections_do_not_lock_clients_out(tmp_path):
    """Attack 5 at a 1024 soft limit: the broker raises it to the hard limit (4096) at start,
    so 1,010 connections that only send a greeting leave room for a real client."""
    proc, port = start_broker(tmp_path, "--handshake-timeout", "60", fd_limit=(1024, 4096))
    idle = []
    try:
        for _ in range(1010):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(ZMTP_GREETING)
            idle.append(sock)
        started = time.monotonic()
        state = health(f"tcp://127.0.0.1:{port}", timeout_s=5.0)
        assert state is not None, "a good client was locked out by 1,010 idle connections"
        assert time.monotonic() - started < 2.0
    finally:
        for sock in idle:
            sock.close()
        proc.kill()  # SIGTERM would drain: wait for queued requests
        proc.wait(10)


def test_unfinished_handshake_and_silent_peer_are_dropped(tmp_path):
    proc, port = start_broker(tmp_path, "--handshake-timeout", "1", "--peer-heartbeat", "0.5")
    try:
        greeting_only = socket.create_connection(("127.0.0.1", port))
        greeting_only.sendall(ZMTP_GREETING)
        silent = socket.create_connection(("127.0.0.1", port))  # finishes the handshake, then answers no PING
        silent.sendall(ZMTP_GREETING + ZMTP_READY_DEALER)
        assert closed_within(greeting_only, 4.0), "a connection that never finished the handshake stayed open"
        assert closed_within(silent, 4.0), "a peer that answers no heartbeat stayed connected"
        assert health(f"tcp://127.0.0.1:{port}") is not None
    finally:
        greeting_only.close()
        silent.close()
        proc.kill()
        proc.wait(10)


# --- camera fairness ------------------------------------------------------------------------


def test_stream_table_gives_a_new_source_a_slot_at_once():
    """Attack 6: one source keeps 4 names fresh in a 4-name table; a camera from elsewhere gets
    the slot of that source's least recently fed name at its first frame (its waiting frame dropped)."""
    slots = StreamSlots(max_streams=4, idle_s=60.0)
    for i in range(4):
        slots.admit(f"junk-{i}", now=float(i), source="address 10.0.0.9")
    slots.put("junk-0", "waiting frame", now=0.0)
    stats, evicted = slots.admit("camera", now=4.0, source="address 10.0.0.2")
    assert stats is not None and evicted == "waiting frame" and "junk-0" not in slots.stats
    assert slots.admit("junk-new", now=5.0, source="address 10.0.0.9")[0] is None, (
        "the newcomer is not pushed out in turn"
    )
    stats, _ = slots.admit("junk-new", now=61.5, source="address 10.0.0.9")  # junk-1 has been silent for idle_s
    assert stats is not None and "camera" in slots.stats and "junk-1" not in slots.stats
    fair = StreamSlots(max_streams=2, idle_s=60.0)  # every source holds one name: the newcomer waits for an idle one
    fair.admit("a", now=0.0, source="address 10.0.0.1")
    fair.admit("b", now=0.0, source="address 10.0.0.2")
    assert fair.admit("c", now=1.0, source="address 10.0.0.3")[0] is None
    assert fair.admit("c", now=61.0, source="address 10.0.0.3")[0] is not None


def test_stream_frames_count_against_their_source_address(tmp_path):
    """Without auth, one sender's camera frames fill at most its per-source share of the bytes
    (--max-client-inflight-mb), so a good client's request still fits in the total."""
    image = np.zeros((600, 500, 3), np.uint8)  # 0.86 MB: two fit under 2 MB, four fill 4 MB
    proc, port = start_broker(
        tmp_path,
        "--max-request-mb",
        "4",
        "--max-client-inflight-mb",
        "2",
        "--max-inflight-mb",
        "4",
        "--max-image-pixels",
        "400000",
    )
    ctx = zmq.Context.instance()
    camera = ctx.socket(zmq.PUSH)
    camera.setsockopt(zmq.LINGER, 0)
    camera.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port + P.STREAM_PORT_OFFSET}")  # from another loopback address
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        for i in range(6):
            header = P.request_header(
                P.METRIC_DEPTH,
                stream=f"cam-{i}",
                seq=0,
                input_size=TEST_INPUT_SIZE,
                image={"frame": 1, "format": "raw", "shape": list(image.shape)},
            )
            camera.send_multipart([P.packb(header), image.tobytes()])
        deadline = time.monotonic() + 5
        while True:  # until all six are counted, admitted or rejected
            stats, _ = raw_request(endpoint, P.request_header(P.STATS, id="s"))
            if stats["stream_frames"]["in"] + stats["stream_frames"]["rejected"] >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert stats["bytes"]["held"] <= 2 * MB, stats["bytes"]
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(endpoint)
        header = P.request_header(
            P.METRIC_DEPTH,
            id="good",
            input_size=TEST_INPUT_SIZE,
            image={"frame": 1, "format": "raw", "shape": list(image.shape)},
        )
        client.send_multipart([b"", P.packb(header), image.tobytes()])
        assert not client.poll(500), "the good request was refused, not queued for a worker"
        client.close()
    finally:
        camera.close()
        proc.kill()
        proc.wait(10)


# --- authenticated workers ------------------------------------------------------------------


def test_serve_binds_no_tcp_worker_port(server):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port + P.BACKEND_PORT_OFFSET), timeout=2).close()


def fake_worker(endpoint: str, name: str, keys: Optional[tuple] = None) -> zmq.Socket:
    """A DEALER that registers as worker `name`, with CURVE (public, secret, server public) keys if given."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.connect(endpoint)
    sock.send_multipart([P.WORKER_PROTOCOL, P.W_READY, P.packb({"name": name, "device": "cpu", "pid": 1})])
    return sock


def wait_for(condition, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


def test_only_workers_with_allowed_keys_register(tmp_path):
    for name, folder in (("server", "server"), ("gpu-1", "workers"), ("rogue", "rogue")):
        assert (
            subprocess.run(
                [sys.executable, "-m", "zdepth", "keygen", name, "--dir", str(tmp_path / folder)], capture_output=True
            ).returncode
            == 0
        )
    proc, port = start_broker(
        tmp_path,
        "--curve-secret-file",
        str(tmp_path / "server" / "server.key_secret"),
        "--worker-keys",
        str(tmp_path / "workers"),
    )
    endpoint = f"tcp://127.0.0.1:{port}"
    backend = f"tcp://127.0.0.1:{port + P.BACKEND_PORT_OFFSET}"
    server_public, _ = zmq.auth.load_certificate(tmp_path / "server" / "server.key")
    rogue_public, rogue_secret = zmq.auth.load_certificate(tmp_path / "rogue" / "rogue.key_secret")
    worker = Process(
        [
            "worker",
            "--connect",
            backend,
            "--name",
            "gpu-1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--random-weights",
            "--curve-secret-file",
            str(tmp_path / "workers" / "gpu-1.key_secret"),
            "--curve-server-key",
            str(tmp_path / "server" / "server.key"),
        ],
        tmp_path / "worker.log",
    )
    impostors = [
        fake_worker(backend, "gpu-1"),
        fake_worker(backend, "gpu-1", (rogue_public, rogue_secret, server_public)),
    ]
    try:
        workers = wait_for(lambda: health(endpoint)["workers"], 90)
        assert [w["name"] for w in workers] == ["gpu-1"], worker.log()
        gpu_public, _ = zmq.auth.load_certificate(tmp_path / "workers" / "gpu-1.key")
        assert workers[0]["key"] == gpu_public.decode()
        time.sleep(1.0)  # the impostors had time to register, and did not
        state = health(endpoint)
        assert len(state["workers"]) == 1 and "duplicate_worker_names" not in state
        image = np.zeros((48, 64, 3), np.uint8)
        reply, _ = raw_request(endpoint, raw_header(image.shape, TEST_INPUT_SIZE), [image.tobytes()], timeout_s=60)
        assert reply["ok"] is True and reply["worker"] == "gpu-1", reply
    finally:
        for sock in impostors:
            sock.close()
        worker.stop()
        proc.kill()
        proc.wait(10)


def test_health_flags_duplicate_worker_names(lone_broker):
    port = int(lone_broker.rsplit(":", 1)[1])
    twins = [fake_worker(f"tcp://127.0.0.1:{port + P.BACKEND_PORT_OFFSET}", "gpu-0") for _ in range(2)]
    try:
        state = wait_for(lambda: (lambda h: h if len(h["workers"]) == 2 else None)(health(lone_broker)), 10)
        assert state["duplicate_worker_names"] == ["gpu-0"]
    finally:
        for sock in twins:
            sock.close()
