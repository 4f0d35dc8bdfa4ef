"""The README runs: each of its Python and shell blocks, against a real `zdepth serve`.

A block runs unless the HTML comment right before it opts out, with a reason the test
report shows:

    <!-- not-run: downloads from Hugging Face -->

`<!-- background: WHY -->` starts a block and keeps it running while the blocks after it
run (a camera streaming while a subscriber reads); it is stopped when the module ends and
must still have been running. Every block runs as its own process (Python blocks with this
interpreter, shell blocks with `bash -e`), in a fresh folder that holds `frame.jpg`, with the
README's placeholders replaced (PLACEHOLDERS): a copied snippet must work as written once a
reader puts in their own server, key and camera.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from tests.servers import Server, health
from zdepth import protocol as P

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KEY = "zd-readme-test-key"
BLOCK_TIMEOUT_S = 180
FENCE = re.compile(
    r"(?:<!--\s*(?P<marker>not-run|background):\s*(?P<why>.*?)\s*-->\s*\n)?```(?P<lang>python|bash|sh)\n(?P<code>.*?)```",
    re.S,
)


@dataclass
class Block:
    line: int
    lang: str
    code: str
    marker: Optional[str]
    why: str

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """Every ```python / ```bash block of `text`, with the marker comment right before it."""
    return [
        Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["marker"], m["why"] or "")
        for m in FENCE.finditer(text)
    ]


BLOCKS = readme_blocks(README.read_text())


def placeholders(server: Server) -> list[tuple[str, str]]:
    """(pattern, replacement) pairs: the README's example server, key and camera -> the test's."""
    return [
        (r"tcp://gpu-server:(\d+)", lambda m: P.tcp_endpoint("127.0.0.1", server.port + int(m[1]) - P.DEFAULT_PORT)),
        (r'"zd-\.\.\."', repr(KEY).replace("'", '"')),
        # camera 0 -> frame.jpg's bytes over and over (CameraPublisher.run takes any iterable of frames)
        (r"\.run\(0,", '.run(__import__("itertools").repeat(open("frame.jpg", "rb").read()),'),
    ]


PLACEHOLDERS = "the server tcp://gpu-server:PORT, the key zd-..., camera 0"


def substitute(code: str, server: Server) -> str:
    for pattern, replacement in placeholders(server):
        code = re.sub(pattern, replacement, code)
    return code


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(
        tmp_path_factory.mktemp("readme-serve"), checkpoint_dir, workers=1, extra=["--api-key", KEY, "--require-auth"]
    )
    deadline = time.monotonic() + 60
    while (health(srv.endpoint) or {}).get(
        "status"
    ) != "healthy":  # the README's `zdepth health` expects a ready server
        assert time.monotonic() < deadline, srv.process.log()
        time.sleep(0.2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("readme-run")
    v, u = np.mgrid[0:96, 0:128]
    cv2.imwrite(str(folder / "frame.jpg"), np.stack([u * 2, v * 2, u + v], axis=-1).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def background():
    processes: list = []
    yield processes
    for block, process in processes:
        alive = process.poll() is None
        if alive:
            process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        assert alive, f"{block.id} (background) stopped early:\n{out}"


def command(block: Block, code: str) -> list[str]:
    return [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-e", "-c", code]


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `zdepth` console script
    return env


def test_the_readme_has_runnable_blocks():
    assert sum(block.marker != "not-run" for block in BLOCKS) >= 5
    assert all(block.why for block in BLOCKS if block.marker), "a marker needs its reason"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block, server, workdir, background):
    if block.marker == "not-run":
        pytest.skip(f"{block.id} not-run: {block.why}")
    code = substitute(block.code, server)
    if block.marker == "background":
        process = subprocess.Popen(
            command(block, code),
            cwd=workdir,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        background.append((block, process))
        return
    run = subprocess.run(
        command(block, code), cwd=workdir, env=environment(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    assert run.returncode == 0, (
        f"{block.id} failed (placeholders: {PLACEHOLDERS}):\n{code}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
    )
