"""The README's quick start for real: `make serve` in this checkout, asked with `zdepth depth`.

Runs in the checkout's .venv, the one `make test` (and so CI) sets up, and checks that a second
`make` run finds nothing to install before it starts the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.servers import TEST_INPUT_SIZE, free_port_block, health
from zdepth.geometry import read_ply
from zdepth.images import encode_jpeg

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
ZDEPTH = VENV / "bin" / "zdepth"

pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make (.ci/run installs it)"),
    pytest.mark.skipif(
        Path(sys.prefix).resolve() != VENV.resolve(), reason="runs in the checkout's .venv, which `make test` sets up"
    ),
]


def make(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs
    )


@pytest.fixture()
def image(tmp_path) -> Path:
    v, u = np.mgrid[0:48, 0:64]
    path = tmp_path / "frame.jpg"
    path.write_bytes(encode_jpeg(np.stack([u * 4, v * 5, (u + v) * 2], axis=-1).astype(np.uint8)))
    return path


def test_make_serve_then_zdepth_depth(tmp_path, image):
    port = free_port_block(5)
    args = f"--random-weights --port {port} --device cpu --workers 1 --threads 1 --log-level WARNING"
    planned = make("-n", "serve", f"ARGS={args}")
    assert planned.returncode == 0, planned.stderr
    # The set-up `make test` did is reused: the only thing left to run is the server itself.
    assert planned.stdout.splitlines() == [f".venv/bin/python -m zdepth serve --fetch-weights {args}"], (
        "the set-up is out of date (setup.cfg or pyproject.toml changed): run `make test` to reinstall"
    )

    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        ["make", "serve", f"ARGS={args}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while not (health(f"tcp://127.0.0.1:{port}", timeout_s=1.0) or {}).get("workers"):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "make serve not ready in 90 s:\n" + (tmp_path / "serve.log").read_text()
            time.sleep(0.2)

        out = tmp_path / "out"
        query = [
            str(ZDEPTH),
            "depth",
            str(image),
            "--server",
            f"tcp://127.0.0.1:{port}",
            "--input-size",
            str(TEST_INPUT_SIZE),
        ]
        run = subprocess.run([*query, "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"{image}: 64x48 depth ") and " m, ms: decode" in run.stdout
        depth = np.load(out / "frame_depth.npy")
        assert (
            depth.shape == (48, 64)
            and depth.dtype == np.float32
            and sorted(p.name for p in out.iterdir()) == ["frame_depth.npy", "frame_depth.png"]
        )

        # The same numbers as `zdepth predict --random-weights` (the same seeded model, computed here).
        from zdepth.engine import Engine
        from zdepth.images import read_image

        local = Engine(device="cpu", random_weights=True).metric_depth(read_image(image), input_size=TEST_INPUT_SIZE)
        np.testing.assert_allclose(depth, local, rtol=1e-4, atol=1e-5)

        run = subprocess.run(
            [*query, "--fx", "50", "--with-color", "--out", str(out)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        points, colors = read_ply(out / "frame.ply")
        assert points.shape == (48 * 64, 3) and colors.shape == points.shape
        np.testing.assert_allclose(points[:, 2], np.load(out / "frame_depth.npy").ravel(), rtol=1e-6)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)  # a drain may take up to --drain-timeout (30 s); test_operability times it
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()


def test_make_serve_without_weights_says_what_to_do(tmp_path):
    # A mirror that refuses connections stands in for a machine without network.
    closed = free_port_block(1)
    env = dict(os.environ, ZDEPTH_WEIGHTS_URL=f"http://127.0.0.1:{closed}")
    run = make("serve", f"ARGS=--checkpoint-dir {tmp_path} --port {free_port_block(5)}", env=env)
    assert run.returncode != 0
    message = run.stderr
    assert f"put the file at {tmp_path}/depth_anything_v2_metric_hypersim_vits.pth" in message
    assert f"zdepth weights get vits --dataset hypersim --checkpoint-dir {tmp_path}" in message
    assert "make serve ARGS=--random-weights" in message and "Traceback" not in message


def test_zdepth_depth_without_a_server_exits_2(tmp_path, image):
    port = free_port_block(1)
    run = subprocess.run(
        [
            str(ZDEPTH),
            "depth",
            str(image),
            "--server",
            f"tcp://127.0.0.1:{port}",
            "--timeout",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "zdepth: error:" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == [image]
