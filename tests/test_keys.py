"""`zdepth keys` / `zdepth keygen`, and hashed key files on a running server: keys added
while it runs work within about a second (or at once on SIGHUP), removed keys stop working,
and no key ever appears in the file, `health`, `stats` or the server's log."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zmq.auth

from clients import DepthClient, ServerError
from tests.servers import TEST_INPUT_SIZE, Server
from zdepth import cli
from zdepth.auth import hashed_line, parse_key_file


def zdepth(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the real `zdepth` command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def add_key(capsys, name: str, path: Path) -> str:
    code, out, err = zdepth(capsys, "keys", "add", name, "--file", str(path))
    assert code == 0, err
    return out.strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the commands ------------------------------------------------------------------------


def test_keys_add_stores_only_a_hash_and_prints_the_key_once(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    code, out, err = zdepth(capsys, "keys", "add", "robot-arm", "--file", str(path))
    key = out.strip()
    assert code == 0 and out == key + "\n" and key.startswith("zd-") and len(key) > 30
    assert key not in err and "robot-arm" in err
    text = path.read_text()
    assert key not in text and text == hashed_line("robot-arm", key) + "\n"
    assert mode(path) == 0o600
    assert parse_key_file(text) and list(parse_key_file(text).values()) == ["robot-arm"]

    path.write_text(text + "# a comment\nnotebook sk-plain-key")  # hand-edited, no final newline
    other = add_key(capsys, "ci.runner_2", path)
    assert other != key and other not in path.read_text()
    assert zdepth(capsys, "keys", "list", "--file", str(path))[1].split() == ["robot-arm", "notebook", "ci.runner_2"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["keys", "add", "robot-arm", "--file", "{keys}"], "already has a key named 'robot-arm'"),
        (["keys", "add", "two words", "--file", "{keys}"], "invalid name"),
        (["keys", "add", "../escape", "--file", "{keys}"], "invalid name"),
        (["keys", "list", "--file", "{missing}"], "no key file"),
        (["keys", "add", "x", "--file", "{broken}"], "line 1"),
        (["keygen", "../escape", "--dir", "{dir}"], "invalid name"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, capsys, argv, words):
    keys = tmp_path / "keys.txt"
    add_key(capsys, "robot-arm", keys)
    (tmp_path / "broken.txt").write_text("too many fields here\n")
    paths = {"keys": keys, "missing": tmp_path / "nope.txt", "broken": tmp_path / "broken.txt", "dir": tmp_path}
    before = keys.read_text()
    code, out, err = zdepth(capsys, *[arg.format(**paths) for arg in argv])
    assert code == 2 and out == "" and words in err and "Traceback" not in err
    assert keys.read_text() == before


def test_keygen_writes_a_certificate_pair(tmp_path, capsys):
    folder = tmp_path / "certs"
    code, out, err = zdepth(capsys, "keygen", "lab-server", "--dir", str(folder))
    assert code == 0
    public, secret = folder / "lab-server.key", folder / "lab-server.key_secret"
    assert mode(secret) == 0o600 and mode(public) == 0o644 and mode(folder) == 0o700
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert out.strip() == public_key.decode() == same_public.decode() and no_secret is None
    assert zmq.curve_public(secret_key) == public_key and secret_key.decode() not in out + err
    code, _, err = zdepth(capsys, "keygen", "lab-server", "--dir", str(folder))  # never overwrites a pair
    assert code == 2 and "already exist" in err
    assert zmq.auth.load_certificate(secret)[1] == secret_key


# --- a running server --------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_key_file_changes_reach_a_running_server(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    alpha = add_key(capsys, "alpha", path)
    server = Server(
        tmp_path,
        tmp_path,
        extra=["--random-weights", "--require-auth", "--api-key-file", str(path), "--log-level", "DEBUG"],
    )
    keys = [alpha]

    def accepted(key: str) -> bool:
        with DepthClient(server.endpoint, key=key, timeout=5, retries=0) as client:
            try:
                client.stats()
                return True
            except ServerError as exc:
                assert exc.code == "unauthorized"
                return False

    try:
        assert accepted(alpha) and not accepted("zd-not-a-key") and not accepted(hashed_line("alpha", alpha).split()[1])
        with DepthClient(server.endpoint, key=alpha, timeout=30, input_size=TEST_INPUT_SIZE) as client:
            assert client.metric_depth(np.zeros((24, 32, 3), np.uint8)).depth.shape == (24, 32)

        beta = add_key(capsys, "beta", path)  # picked up from the file's new modification time
        keys.append(beta)
        assert wait_for(lambda: accepted(beta), 3.0)

        # SIGHUP: a line added while the modification time stays put is loaded only on the signal.
        before = path.stat()
        gamma = add_key(capsys, "gamma", path)
        keys.append(gamma)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        time.sleep(1.5)
        assert not accepted(gamma)
        worker_pids = [w["pid"] for w in server.health()["workers"]]
        server.process.signal(signal.SIGHUP)  # to the whole process group, as a terminal would
        assert wait_for(lambda: accepted(gamma), 3.0)
        time.sleep(0.5)  # time for the supervisor to notice a worker the signal killed
        for pid in worker_pids:
            os.kill(pid, 0)  # raises if the worker died: workers ignore SIGHUP

        path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith("alpha ")))
        assert wait_for(lambda: not accepted(alpha), 3.0)
        assert accepted(beta) and accepted(gamma)

        with DepthClient(server.endpoint, key=beta, timeout=5) as client:
            stats = client.stats()
            seen = repr(client.health()) + repr(stats)
        assert {"alpha", "beta", "gamma"} <= set(stats["keys"])  # requests counted by key name
    finally:
        server.stop()
    log = server.process.log_path.read_text(errors="replace")
    assert "key=alpha" in log  # DEBUG request lines name the key's owner ...
    for key in keys:  # ... and no key appears anywhere
        assert key not in seen and key not in log and key not in path.read_text()
