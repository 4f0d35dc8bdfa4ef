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

from tests.cameras import HEIGHT, WIDTH, Camera, camera_frames  # noqa: E402
from tests.servers import TEST_INPUT_SIZE, Server  # noqa: E402
from zdepth import protocol as P  # noqa: E402

FRAMES = 8


def rows_by_entity(path) -> Counter:
    """entity path -> rows logged (over all chunks) in the recording at `path`."""
    rows: Counter = Counter()
    for chunk in RrdReader(str(path)).stream():
        rows[chunk.entity_path] += chunk.num_rows
    return rows


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("view"), checkpoint_dir, workers=1)
    yield srv
    srv.stop()


def view(server: Server, out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zdepth", "view", "--save", str(out), "--pub", server.pub, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_view_saves_two_streams(server, tmp_path):
    cameras = [Camera(server.stream, "left", fps=8), Camera(server.stream, "right", fps=8)]
    try:
        done = view(
            server,
            tmp_path / "run.rrd",
            "--stream",
            "left",
            "--stream",
            "right",
            "--frames",
            str(FRAMES),
            "--fx",
            "60",
            "--fy",
            "60",
            "--cx",
            "31.5",
            "--cy",
            "23.5",
        )
    finally:
        for camera in cameras:
            camera.stop()
    assert done.returncode == 0, done.stderr
    rows = rows_by_entity(tmp_path / "run.rrd")
    per_stream = {
        name: {e: n for e, n in rows.items() if e.startswith((f"/world/{name}", f"/metrics/{name}/"))}
        for name in ("left", "right")
    }
    for name, entities in per_stream.items():
        assert set(entities) == {
            f"/world/{name}",
            f"/world/{name}/cam",
            f"/world/{name}/cam/depth",
            f"/world/{name}/points",
            f"/metrics/{name}/latency_ms",
            f"/metrics/{name}/age_ms",
            f"/metrics/{name}/dropped",
        }, name
    # every result is logged once: its depth, camera, points and metrics
    assert sum(rows[f"/world/{name}/cam/depth"] for name in per_stream) == FRAMES
    for name in per_stream:
        depth_rows = rows[f"/world/{name}/cam/depth"]
        assert depth_rows >= 1
        assert (
            rows[f"/world/{name}/points"]
            == rows[f"/world/{name}/cam"]
            == rows[f"/metrics/{name}/latency_ms"]
            == depth_rows
        )
    schema = str(RrdReader(str(tmp_path / "run.rrd")).store().schema())
    assert "/world/left/cam/depth:DepthImage:meter" in schema


def test_pointcloud_stream_points_carry_the_camera_colours(server, tmp_path):
    intrinsics = {"fx": 60.0, "fy": 60.0, "cx": 31.5, "cy": 23.5}
    camera = Camera(server.stream, "pc", fps=8, method=P.POINTCLOUD, intrinsics=intrinsics, with_color=True)
    try:
        done = view(server, tmp_path / "pc.rrd", "--stream", "pc", "--frames", "2")
    finally:
        camera.stop()
    assert done.returncode == 0, done.stderr
    rows = rows_by_entity(tmp_path / "pc.rrd")
    assert rows["/world/pc/points"] == 2 and "/world/pc/cam/depth" not in rows
    for chunk in RrdReader(str(tmp_path / "pc.rrd")).stream():
        if chunk.entity_path != "/world/pc/points":
            continue
        batch = chunk.to_record_batch()
        for seq, colors in zip(batch.column("frame").to_pylist(), batch.column("Points3D:colors").to_pylist()):
            rgba = np.asarray(colors, dtype=np.uint32)
            rgb = np.stack([(rgba >> 24) & 255, (rgba >> 16) & 255, (rgba >> 8) & 255], axis=1)
            sent = camera_frames(seq + 1)[seq]  # the frame with this seq, regenerated: BGR
            np.testing.assert_array_equal(rgb, sent[..., ::-1].reshape(-1, 3))


def test_predict_rrd(tmp_path):
    rng = np.random.default_rng(1)
    images = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        images.append(str(path))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "zdepth",
            "predict",
            *images,
            "--random-weights",
            "--device",
            "cpu",
            "--input-size",
            str(TEST_INPUT_SIZE),
            "--fx",
            "60",
            "--out",
            str(tmp_path / "out"),
            "--rrd",
            str(tmp_path / "p.rrd"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = rows_by_entity(tmp_path / "p.rrd")
    for entity in (
        "/world/predict/cam/depth",
        "/world/predict/cam/image",
        "/world/predict/cam",
        "/world/predict/points",
    ):
        assert rows[entity] == 2, (entity, rows)
