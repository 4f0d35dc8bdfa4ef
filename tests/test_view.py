"""`zdepth view --save` from real streams and `zdepth predict --rrd`; the .rrd files are read
back with rerun's own reader (rerun.chunk.RrdReader)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import cv2
import numpy as np
import pytest

pytest.importorskip("rerun")

from rerun.chunk import RrdReader  # noqa: E402

from tests.cameras import HEIGHT, WIDTH, Camera  # noqa: E402
from tests.servers import TEST_INPUT_SIZE, Server  # noqa: E402

FRAMES = 8


def rows_by_entity(path) -> Counter:
    """entity path -> rows logged (over all chunks) in the recording at `path`."""
    rows: Counter = Counter()
    for chunk in RrdReader(str(path)).stream():
        rows[chunk.entity_path] += chunk.num_rows
    return rows


def test_view_saves_two_streams(tmp_path, checkpoint_dir):
    server = Server(tmp_path, checkpoint_dir, workers=1)
    cameras = [Camera(server.stream, "left", fps=8), Camera(server.stream, "right", fps=8)]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "zdepth", "view", "--stream", "left", "--stream", "right", "--save", str(tmp_path / "run.rrd"),
             "--frames", str(FRAMES), "--pub", server.pub, "--fx", "60", "--fy", "60", "--cx", "31.5", "--cy", "23.5"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        for camera in cameras:
            camera.stop()
        server.stop()
    assert done.returncode == 0, done.stderr
    rows = rows_by_entity(tmp_path / "run.rrd")
    per_stream = {name: {e: n for e, n in rows.items() if e.startswith((f"/world/{name}", f"/metrics/{name}/"))} for name in ("left", "right")}
    for name, entities in per_stream.items():
        assert set(entities) == {f"/world/{name}", f"/world/{name}/cam", f"/world/{name}/cam/depth", f"/world/{name}/points",
                                 f"/metrics/{name}/latency_ms", f"/metrics/{name}/age_ms", f"/metrics/{name}/dropped"}, name
    # every result is logged once: its depth, camera, points and metrics
    assert sum(rows[f"/world/{name}/cam/depth"] for name in per_stream) == FRAMES
    for name in per_stream:
        depth_rows = rows[f"/world/{name}/cam/depth"]
        assert depth_rows >= 1
        assert rows[f"/world/{name}/points"] == rows[f"/world/{name}/cam"] == rows[f"/metrics/{name}/latency_ms"] == depth_rows
    schema = str(RrdReader(str(tmp_path / "run.rrd")).store().schema())
    assert "/world/left/cam/depth:DepthImage:meter" in schema


def test_predict_rrd(tmp_path):
    rng = np.random.default_rng(1)
    images = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        images.append(str(path))
    done = subprocess.run(
        [sys.executable, "-m", "zdepth", "predict", *images, "--random-weights", "--device", "cpu", "--input-size", str(TEST_INPUT_SIZE),
         "--fx", "60", "--out", str(tmp_path / "out"), "--rrd", str(tmp_path / "p.rrd")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = rows_by_entity(tmp_path / "p.rrd")
    for entity in ("/world/predict/cam/depth", "/world/predict/cam/image", "/world/predict/cam", "/world/predict/points"):
        assert rows[entity] == 2, (entity, rows)
