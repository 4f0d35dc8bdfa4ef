"""Operating a server: drain on SIGTERM/SIGINT, readiness, hung workers replaced, no-worker
grace, configuration errors, busy ports, key reloads, IPv6. Real `zdepth serve` and `zdepth
broker` processes on free ports (tests/servers.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from clients import DepthClient, DepthSubscriber
from tests.servers import Process, Server, free_port_block, health
from zdepth import protocol as P

SLOW_INPUT = 196  # about 0.3-0.5 s per request on one CPU thread: long enough to be in flight at the signal
IMAGE = np.zeros((240, 320, 3), np.uint8)


def send(endpoint: str, i: int, input_size: int = SLOW_INPUT, timeout_ms: int = 60_000) -> zmq.Socket:
    """One metric_depth request on its own DEALER; the socket to read the answer from."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)
    header = P.request_header(
        P.METRIC_DEPTH,
        id=i,
        timeout_ms=timeout_ms,
        input_size=input_size,
        image={"frame": 1, "format": "raw", "shape": list(IMAGE.shape)},
    )
    sock.send_multipart([b"", P.packb(header), IMAGE.tobytes()])
    return sock


def answer(sock: zmq.Socket, timeout_s: float) -> str:
    """ "ok", an error code, or "none" when nothing came within `timeout_s`."""
    try:
        if not sock.poll(int(timeout_s * 1000)):
            return "none"
        header = P.decode_header(sock.recv_multipart()[1])
        return "ok" if header["ok"] else header["error"]["code"]
    finally:
        sock.close()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def zdepth(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zdepth", *args], capture_output=True, text=True, timeout=timeout)


# --- drain -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_requests_in_flight(tmp_path, checkpoint_dir, sig):
    """Before: SIGTERM with 12 in flight left all 12 unanswered. Now each one is computed."""
    server = Server(tmp_path, checkpoint_dir, workers=1)
    ipc_file = Path(tempfile.gettempdir()) / f"zdepth-{server.port}-{server.process.proc.pid}-workers.ipc"
    try:
        assert ipc_file.exists()
        sockets = [send(server.endpoint, i) for i in range(6)]
        time.sleep(0.3)
        os.kill(server.process.proc.pid, sig)
        time.sleep(0.1)
        late = send(server.endpoint, 99)  # arrives during the drain
        outcomes = [answer(s, 60) for s in sockets]
        assert answer(late, 10) == P.SHUTTING_DOWN
        assert outcomes == ["ok"] * 6
        assert server.process.proc.wait(30) == 0
        log = server.process.log()
        assert "terminate called" not in log and "Traceback" not in log, log
        assert not ipc_file.exists(), "serve must remove its workers' ipc file"
    finally:
        server.stop()


def test_second_signal_stops_at_once_and_answers_everything(tmp_path, checkpoint_dir):
    server = Server(tmp_path, checkpoint_dir, workers=1)
    try:
        sockets = [send(server.endpoint, i) for i in range(6)]
        time.sleep(0.3)
        os.kill(server.process.proc.pid, signal.SIGTERM)
        time.sleep(0.1)
        started = time.monotonic()
        os.kill(server.process.proc.pid, signal.SIGTERM)
        outcomes = [answer(s, 10) for s in sockets]
        assert server.process.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert set(outcomes) <= {"ok", P.SHUTTING_DOWN} and P.SHUTTING_DOWN in outcomes, outcomes
    finally:
        server.stop()


def test_drain_timeout_answers_what_is_left(tmp_path, checkpoint_dir):
    server = Server(tmp_path, checkpoint_dir, workers=1, extra=["--drain-timeout", "0.5"])
    try:
        sockets = [send(server.endpoint, i) for i in range(8)]
        time.sleep(0.3)
        os.kill(server.process.proc.pid, signal.SIGTERM)
        outcomes = [answer(s, 20) for s in sockets]
        assert server.process.proc.wait(20) == 0
        assert "none" not in outcomes and P.SHUTTING_DOWN in outcomes, outcomes
    finally:
        server.stop()


# --- workers: hung, missing, misconfigured ----------------------------------------------


def test_hung_worker_is_replaced_and_requests_answered_promptly(tmp_path, checkpoint_dir):
    """Before: a SIGSTOPped worker was dropped but never restarted, and requests waited their
    whole 30 s deadline for `timeout`."""
    server = Server(tmp_path, checkpoint_dir, workers=1, extra=["--no-worker-grace", "1"])
    try:
        old_pid = server.health()["workers"][0]["pid"]
        os.kill(old_pid, signal.SIGSTOP)
        started = time.monotonic()
        outcome = answer(send(server.endpoint, 1, input_size=56, timeout_ms=30_000), 30)
        assert outcome in ("ok", P.WORKER_LOST) and time.monotonic() - started < 15, (
            outcome,
            time.monotonic() - started,
        )
        new = wait_for(lambda: [w for w in server.health()["workers"] if w["pid"] != old_pid], 90, "a restarted worker")
        assert new and wait_for(lambda: _gone(old_pid), 10, "the hung worker killed")
        with DepthClient(server.endpoint, timeout=60) as client:
            assert client.metric_depth(IMAGE, input_size=56).depth.shape == (240, 320)
    finally:
        try:
            os.kill(old_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.stop()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie: killed, not yet reaped


def test_without_workers_requests_fail_fast_with_a_retryable_error(tmp_path):
    port = free_port_block(5)
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = Process(
        ["broker", "--port", str(port), "--no-worker-grace", "0.5", "--log-level", "ERROR"], tmp_path / "broker.log"
    )
    try:
        wait_for(lambda: health(endpoint, 0.5), 30, "the broker")
        queued = send(endpoint, 1, timeout_ms=30_000)
        started = time.monotonic()
        assert answer(queued, 10) == P.WORKER_LOST and time.monotonic() - started < 3
        started = time.monotonic()
        assert answer(send(endpoint, 2, timeout_ms=30_000), 10) == P.WORKER_LOST and time.monotonic() - started < 1
        assert P.WORKER_LOST in P.RETRYABLE_CODES
    finally:
        broker.stop()


def test_configuration_error_stops_serve(tmp_path):
    """Before: `--dtype fp16 --device cpu` logged "serving" and restarted its worker forever."""
    port = free_port_block(5)
    result = zdepth("serve", "--port", str(port), "--device", "cpu", "--dtype", "fp16", "--random-weights", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "fp16" in result.stderr and "configuration error" in result.stderr
    assert result.stderr.count("restarting") == 0


# --- readiness ---------------------------------------------------------------------------


def test_health_tells_live_from_ready_and_exit_codes(tmp_path, checkpoint_dir):
    empty = tmp_path / "no-checkpoints"
    empty.mkdir()
    probes = free_port_block(1)
    unready = Server(tmp_path, empty, workers=1, extra=["--metrics-port", str(probes)])
    ready = Server(tmp_path, checkpoint_dir, workers=1)
    try:
        state = wait_for(lambda: (h := unready.health())["workers"][0]["problem"] and h, 60, "the warm-up to fail")
        assert state["status"] == "not_ready" and state["live"] is True and state["ready"] is False
        assert "checkpoint" in state["workers"][0]["problem"] or "model_unavailable" in state["workers"][0]["problem"]
        assert zdepth("health", "--server", unready.endpoint).returncode == 1
        assert (
            http_status(f"http://127.0.0.1:{probes}/healthz") == 200
            and http_status(f"http://127.0.0.1:{probes}/readyz") == 503
        )

        state = wait_for(lambda: (h := ready.health())["status"] == "healthy" and h, 60, "the worker ready")
        assert state["ready"] is True and state["workers"][0]["ready"] is True
        assert zdepth("health", "--server", ready.endpoint).returncode == 0

        os.kill(ready.process.proc.pid, signal.SIGTERM)  # drained and gone: unreachable
        ready.process.proc.wait(30)
        assert zdepth("health", "--server", ready.endpoint, "--timeout", "1").returncode == 2
    finally:
        unready.stop()
        ready.stop()


# --- rough edges -------------------------------------------------------------------------


def test_busy_port_is_one_line_naming_it_and_the_layout(tmp_path):
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = free_port_block(5)
    sock.bind(f"tcp://127.0.0.1:{port + P.PUB_PORT_OFFSET}")
    try:
        result = zdepth("serve", "--port", str(port), "--device", "cpu", "--random-weights")
    finally:
        sock.close(linger=0)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert f"cannot bind tcp://127.0.0.1:{port + P.PUB_PORT_OFFSET}: Address already in use" in errors[0]
    assert f"{port}..{port + 4}" in errors[0]


def test_failed_key_reload_is_an_error_and_in_stats(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice zd-alice-key\n")
    port = free_port_block(5)
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = Process(
        ["broker", "--port", str(port), "--api-key-file", str(keys), "--require-auth", "--host", "0.0.0.0"],
        tmp_path / "b.log",
    )
    try:
        wait_for(lambda: health(endpoint, 0.5), 30, "the broker")
        keys.write_text("this line is not a key entry at all\n")
        broker.signal(signal.SIGHUP)
        with DepthClient(endpoint, key="zd-alice-key", timeout=5) as client:  # the old keys stay in force
            stats = wait_for(lambda: (s := client.stats())["key_reload_error"] and s, 10, "the reload error in stats")
        assert "line 1" in stats["key_reload_error"]
        log = broker.log()
        assert "ERROR" in log and "reload failed" in log and "reloaded keys" not in log
    finally:
        broker.stop()


def test_open_bind_without_auth_warns(tmp_path):
    port = free_port_block(5)
    broker = Process(["broker", "--port", str(port), "--host", "0.0.0.0"], tmp_path / "b.log")
    try:
        wait_for(lambda: health(f"tcp://127.0.0.1:{port}", 0.5), 30, "the broker")
        assert "beyond loopback" in broker.log()
    finally:
        broker.stop()


def test_stream_names_are_matched_whole():
    with pytest.raises(P.ZDepthError):
        P.check_stream_name("cam1\n")
    assert P.check_stream_name("cam1") == "cam1"


def test_ipv6_everywhere(tmp_path, checkpoint_dir):
    """Before: `--host ::1` crashed (no brackets) and no socket set zmq.IPV6."""
    probes = free_port_block(1)
    server = Server(tmp_path, checkpoint_dir, workers=1, host="::1", extra=["--metrics-port", str(probes)])
    try:
        wait_for(lambda: http_status(f"http://[::1]:{probes}/readyz") == 200, 60, "/readyz over IPv6")
        assert (
            http_status(f"http://[::1]:{probes}/healthz") == 200
            and http_status(f"http://[::1]:{probes}/metrics") == 200
        )
        with DepthClient(f"tcp://[::1]:{server.port}", timeout=30) as client:
            assert client.metric_depth(IMAGE, input_size=56).depth.shape == (240, 320)
        from clients import CameraPublisher

        with (
            DepthSubscriber(f"tcp://[::1]:{server.port + P.PUB_PORT_OFFSET}", "v6") as sub,
            CameraPublisher(f"tcp://[::1]:{server.port + P.STREAM_PORT_OFFSET}", stream="v6", input_size=56) as pub,
        ):
            deadline = time.monotonic() + 30
            result = None
            while result is None and time.monotonic() < deadline:
                pub.send(IMAGE)
                result = sub.recv(timeout=1.0)
            assert result is not None and result.ok and result.stream == "v6"
    finally:
        server.stop()


# --- examples ----------------------------------------------------------------------------


def test_examples_wait_for_their_results(tmp_path, checkpoint_dir):
    """Before: camera_loop.py exited about 2 s after the last frame was sent, before a slow
    server's results came ("0 results for 4 frames")."""
    import cv2

    server = Server(tmp_path, checkpoint_dir, workers=1)
    frames, out = tmp_path / "frames", tmp_path / "out"
    frames.mkdir()
    for i in range(4):
        cv2.imwrite(str(frames / f"{i}.jpg"), np.full((120, 160, 3), 40 * i, np.uint8))
    examples = Path(__file__).resolve().parents[1] / "clients" / "examples"
    env = dict(os.environ, PYTHONPATH=str(examples.parents[1]))
    try:
        loop = subprocess.run(
            [
                sys.executable,
                str(examples / "camera_loop.py"),
                "--server",
                server.endpoint,
                "--source",
                str(frames),
                "--fps",
                "20",
                "--save",
                str(out),
                "--input-size",
                str(P.DEFAULT_INPUT_SIZE),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert loop.returncode == 0, loop.stderr
        assert (out / "cam0_000003.png").exists(), (
            loop.stdout
        )  # the last frame's result: the broker always computes the newest
        robot = subprocess.run(
            [
                sys.executable,
                str(examples / "robot_controller_req.py"),
                "--server",
                server.endpoint,
                "--image",
                str(frames / "1.jpg"),
                "--iterations",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert robot.returncode == 0 and robot.stdout.count("points, nearest ahead") == 1, robot.stdout + robot.stderr
    finally:
        server.stop()
