"""`zdepth record` against a real server and camera stream; the MCAP file is read back with
rosbags (not zdepth code) and checked field by field."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")
pytest.importorskip("mcap")

from rosbags.highlevel import AnyReader  # noqa: E402

from tests.cameras import HEIGHT, WIDTH, Camera  # noqa: E402
from tests.servers import Server  # noqa: E402

# A calibration at twice the size of the frames the camera sends.
CAMERA_YAML = """image_width: 128
image_height: 96
camera_name: test
camera_matrix: {rows: 3, cols: 3, data: [110.0, 0.0, 63.0, 0.0, 112.0, 47.6, 0.0, 0.0, 1.0]}
distortion_model: plumb_bob
distortion_coefficients: {rows: 1, cols: 5, data: [0.0, 0.0, 0.0, 0.0, 0.0]}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("record"), checkpoint_dir, workers=1)
    yield srv
    srv.stop()


def record(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zdepth", "record", *args], capture_output=True, text=True, timeout=timeout
    )


def read_bag(path: Path) -> dict:
    """topic -> [(msgtype, log time, message)], with rosbags only."""
    topics: dict = {}
    with AnyReader([path]) as reader:
        for connection, timestamp, raw in reader.messages(connections=reader.connections):
            topics.setdefault(connection.topic, []).append(
                (connection.msgtype, timestamp, reader.deserialize(raw, connection.msgtype))
            )
    return topics


def test_mcap_from_a_real_stream(server, tmp_path):
    (tmp_path / "cam.yaml").write_text(CAMERA_YAML)
    camera = Camera(server.stream, "front/left")
    try:
        done = record(
            "--stream",
            "front/left",
            "--mcap",
            str(tmp_path / "run.mcap"),
            "--frames",
            "4",
            "--pub",
            server.pub,
            "--camera-info",
            str(tmp_path / "cam.yaml"),
            "--depth-encoding",
            "both",
        )
    finally:
        camera.stop()
    assert done.returncode == 0, done.stderr
    topics = read_bag(tmp_path / "run.mcap")
    prefix = "/zdepth/front/left/depth"
    assert {t: {m[0] for m in msgs} for t, msgs in topics.items()} == {
        f"{prefix}/image": {"sensor_msgs/msg/Image"},
        f"{prefix}/image_raw": {"sensor_msgs/msg/Image"},
        f"{prefix}/camera_info": {"sensor_msgs/msg/CameraInfo"},
        f"{prefix}/points": {"sensor_msgs/msg/PointCloud2"},
    }
    assert all(len(msgs) == 4 for msgs in topics.values())

    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m in topics[f"{prefix}/image"]]
    assert all(a < b for a, b in zip(stamps, stamps[1:])), "stamps must increase"
    assert [t for _, t, _ in topics[f"{prefix}/image"]] == stamps  # log time = capture stamp

    # the calibration is at twice the frame size: K scaled by 1/2 with the pixel-centre rule
    fx, fy, cx, cy = 110.0 / 2, 112.0 / 2, (63.0 + 0.5) / 2 - 0.5, (47.6 + 0.5) / 2 - 0.5
    for (_, _, image), (_, _, raw), (_, _, info), (_, _, cloud) in zip(
        *(topics[f"{prefix}/{n}"] for n in ("image", "image_raw", "camera_info", "points"))
    ):
        for message in (image, raw, info, cloud):
            assert message.header.frame_id == "front/left_optical_frame"
            assert message.header.stamp == image.header.stamp
        assert (image.encoding, image.height, image.width, image.step, image.is_bigendian) == (
            "32FC1",
            HEIGHT,
            WIDTH,
            4 * WIDTH,
            0,
        )
        z = np.frombuffer(image.data.tobytes(), dtype="<f4").reshape(HEIGHT, WIDTH)
        assert np.isfinite(z).all() and (z > 0).all()  # random weights still give depth in (0, max_depth)
        assert (raw.encoding, raw.step) == ("16UC1", 2 * WIDTH)
        mm = np.frombuffer(raw.data.tobytes(), dtype="<u2").reshape(HEIGHT, WIDTH)
        np.testing.assert_array_equal(mm, np.floor(z.astype(np.float64) * 1000 + 0.5).astype(np.uint16))

        assert (info.width, info.height, info.distortion_model) == (WIDTH, HEIGHT, "plumb_bob")
        np.testing.assert_allclose(info.k, [fx, 0, cx, 0, fy, cy, 0, 0, 1])
        np.testing.assert_allclose(info.p, [fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0])
        assert not np.any(info.d)

        assert (cloud.height, cloud.width, cloud.is_dense, cloud.is_bigendian) == (HEIGHT, WIDTH, False, False)
        assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
            ("x", 0, 7, 1),
            ("y", 4, 7, 1),
            ("z", 8, 7, 1),
        ]
        assert (cloud.point_step, cloud.row_step, len(cloud.data)) == (12, 12 * WIDTH, 12 * WIDTH * HEIGHT)
        xyz = np.frombuffer(cloud.data.tobytes(), dtype="<f4").reshape(HEIGHT, WIDTH, 3)
        for v, u in ((0, 0), (7, 50), (HEIGHT - 1, WIDTH - 1), (30, 3)):
            assert xyz[v, u, 2] == z[v, u]
            assert xyz[v, u, 0] == pytest.approx((u - cx) / fx * z[v, u], rel=1e-5, abs=1e-6)
            assert xyz[v, u, 1] == pytest.approx((v - cy) / fy * z[v, u], rel=1e-5, abs=1e-6)


def test_record_stops_cleanly_on_ctrl_c(server, tmp_path):
    camera = Camera(server.stream, "ctrlc")
    path = tmp_path / "ctrlc.mcap"
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zdepth",
                "record",
                "--stream",
                "ctrlc",
                "--mcap",
                str(path),
                "--pub",
                server.pub,
                "--fx",
                "50",
                "--fy",
                "50",
                "--cx",
                "31.5",
                "--cy",
                "23.5",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = 30.0
            while deadline > 0 and (not path.exists() or path.stat().st_size < 50_000):  # a few frames written
                time.sleep(0.2)
                deadline -= 0.2
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    finally:
        camera.stop()
    assert proc.returncode == 0, stderr
    topics = read_bag(path)  # a complete file: rosbags reads the summary written on close
    assert len(topics["/zdepth/ctrlc/depth/image"]) >= 1
    assert len(topics["/zdepth/ctrlc/depth/points"]) == len(topics["/zdepth/ctrlc/depth/image"])


def test_bad_camera_options_are_one_line_errors(tmp_path):
    done = record("--stream", "x", "--mcap", str(tmp_path / "x.mcap"), "--fx", "50", timeout=30)
    assert done.returncode == 2 and "go together" in done.stderr and "Traceback" not in done.stderr
    done = record(
        "--stream", "x", "--mcap", str(tmp_path / "x.mcap"), "--camera-info", str(tmp_path / "missing.yaml"), timeout=30
    )
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_a_missing_extra_is_named(tmp_path):
    """Without rosbags (hidden from the child's importlib.util.find_spec), the command names
    the extra instead of failing with a traceback."""
    stub = (
        "import sys, importlib.util as u; find = u.find_spec; u.find_spec = lambda n, *a: None if n == 'rosbags' else find(n, *a); "
        "from zdepth.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", stub, "record", "--stream", "x", "--mcap", str(tmp_path / "x.mcap")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "pip install 'zdepth[ros]'" in done.stderr, done.stderr
