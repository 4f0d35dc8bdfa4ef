"""`zdepth predict` and `zdepth weights` as real subprocesses, on small generated images."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from zdepth.geometry import read_ply
from zdepth.images import encode_jpeg, encode_png

ZDEPTH = [sys.executable, "-m", "zdepth"]
SCRIPT = Path(sys.executable).with_name("zdepth")  # the console script setup.cfg installs


def zdepth(*args, cwd=None, command=ZDEPTH):
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    v, u = np.mgrid[0:48, 0:64]
    scene = np.stack([u * 4, v * 5, (u + v) * 2], axis=-1).astype(np.uint8)
    (folder / "scene.jpg").write_bytes(encode_jpeg(scene))
    (folder / "tall.png").write_bytes(encode_png(scene[:, :40].copy()))
    return folder


def test_predict_with_random_weights_writes_depth_png_and_ply(images, tmp_path):
    out = tmp_path / "out"
    run = zdepth(
        "predict",
        images / "scene.jpg",
        images / "tall.png",
        "--random-weights",
        "--input-size",
        56,
        "--fx",
        50,
        "--cx",
        30.5,
        "--with-color",
        "--out",
        out,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert (
        len(lines) == 2
        and "scene.jpg: 64x48 depth" in lines[0]
        and " m, ms: pre" in lines[0]
        and "tall.png: 40x48" in lines[1]
    )
    for stem, shape in (("scene", (48, 64)), ("tall", (48, 40))):
        depth = np.load(out / f"{stem}_depth.npy")
        assert depth.shape == shape and depth.dtype == np.float32 and 0 < depth.min() < depth.max() < 20
        png = cv2.imread(str(out / f"{stem}_depth.png"))
        assert png.shape == shape + (3,) and png.std() > 0
        points, colors = read_ply(out / f"{stem}.ply")
        assert points.shape == (shape[0] * shape[1], 3) and colors.shape == points.shape
        np.testing.assert_array_equal(points[:, 2], depth.ravel())
        # x follows --fx 50 and --cx 30.5; y the defaults fy = fx and cy = height / 2.
        u, v = np.tile(np.arange(shape[1]), shape[0]), np.repeat(np.arange(shape[0]), shape[1])
        np.testing.assert_allclose(points[:, 0], (u - 30.5) / 50 * points[:, 2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(points[:, 1], (v - shape[0] / 2) / 50 * points[:, 2], rtol=1e-5, atol=1e-6)


def test_predict_relative_without_intrinsics_writes_no_ply(images, tmp_path):
    run = zdepth(
        "predict",
        images / "scene.jpg",
        "--random-weights",
        "--dataset",
        "relative",
        "--input-size",
        56,
        "--out",
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "(disparity)" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene_depth.npy", "scene_depth.png"]


def test_a_checkpoint_saved_in_the_official_format_is_used(images, tmp_path, checkpoint_dir):
    from zdepth.engine import Engine
    from zdepth.images import read_image

    run = zdepth(
        "predict",
        images / "scene.jpg",
        "--checkpoint-dir",
        checkpoint_dir,
        "--max-depth",
        10,
        "--input-size",
        56,
        "--out",
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    expected = Engine(checkpoint_dir, device="cpu").metric_depth(
        read_image(images / "scene.jpg"), max_depth=10.0, input_size=56
    )
    np.testing.assert_allclose(np.load(tmp_path / "scene_depth.npy"), expected, rtol=1e-5, atol=1e-6)


def test_a_missing_checkpoint_exits_2_naming_the_file_to_download(images, tmp_path):
    command = [str(SCRIPT)] if SCRIPT.exists() else ZDEPTH
    run = zdepth(
        "predict",
        images / "scene.jpg",
        "--checkpoint-dir",
        tmp_path,
        "--dataset",
        "vkitti",
        "--input-size",
        56,
        command=command,
    )
    assert run.returncode == 2
    assert (
        "depth_anything_v2_metric_vkitti_vits.pth" in run.stderr
        and "zdepth weights get vits --dataset vkitti" in run.stderr
    )
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-size", "57"], "`input_size` must be a multiple of 14"),
        (["--fx", "0"], "fx and fy must be > 0"),
        (["--fy", "50"], "--fy, --cx and --cy need --fx"),
        (["--with-color"], "--with-color colours the point cloud, which needs --fx"),
        (["--dtype", "fp16", "--device", "cpu"], "fp16 is for CUDA"),
    ],
)
def test_bad_options_exit_2_with_one_clear_message(images, tmp_path, args, message):
    run = zdepth("predict", images / "scene.jpg", "--random-weights", "--out", tmp_path, *args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_unreadable_images_exit_2(images, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for path, message in ((tmp_path / "bad.jpg", "not a readable JPEG or PNG"), (tmp_path / "none.jpg", "cannot read")):
        run = zdepth("predict", path, "--random-weights", "--input-size", 56, "--out", tmp_path)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_weights_list_and_get_errors(tmp_path):
    (tmp_path / "depth_anything_v2_vits.pth").write_bytes(b"x")
    (tmp_path / "depth_anything_v2_metric_vkitti_vits.pth.part").write_bytes(b"x")
    run = zdepth("weights", "list", "--checkpoint-dir", tmp_path)
    assert run.returncode == 0, run.stderr
    rows = {tuple(line.split()[:2]): line for line in run.stdout.splitlines()}
    assert rows[("vits", "relative")].endswith("yes") and "99.2 MB" in rows[("vits", "relative")]
    assert rows[("vits", "vkitti")].endswith("partial") and rows[("vits", "hypersim")].endswith("no")
    assert "(not released)" in rows[("vitg", "relative")]
    run = zdepth("weights", "get", "vitg", "--dataset", "relative", "--checkpoint-dir", tmp_path)
    assert run.returncode == 2 and "never released officially" in run.stderr and "Traceback" not in run.stderr
    assert zdepth("weights").returncode == 2  # an action is required


def test_importing_the_cli_stays_light():
    code = "import sys, zdepth.cli; print(sorted(m for m in ('torch', 'cv2', 'zdepth.engine') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
    assert "predict" in zdepth("--help").stdout


def test_predict_goes_on_past_bad_files_and_names_them(images, tmp_path):
    """Before: `predict a.jpg notes.txt b.jpg` stopped at notes.txt without naming it, and b.jpg was skipped silently."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    run = zdepth(
        "predict",
        images / "scene.jpg",
        notes,
        tmp_path / "missing.jpg",
        images / "tall.png",
        "--random-weights",
        "--input-size",
        56,
        "--out",
        tmp_path / "out",
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert (tmp_path / "out" / "scene_depth.npy").exists() and (tmp_path / "out" / "tall_depth.npy").exists()
    assert f"2 of 4 images failed: {notes}, {tmp_path / 'missing.jpg'}" in run.stderr
    assert f"cannot read {notes}" in run.stderr


def test_predict_bad_out_is_one_line(images):
    run = zdepth("predict", images / "scene.jpg", "--random-weights", "--input-size", 56, "--out", "/proc/nope")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("zdepth: error: cannot create the output folder /proc/nope")


def test_keys_list_defaults_its_file_as_the_readme_shows(tmp_path):
    """Before: `zdepth keys list` as the README shows it failed: it needed --file."""
    added = zdepth("keys", "add", "robot", cwd=tmp_path)
    assert added.returncode == 0 and (tmp_path / "keys.txt").exists(), added.stderr
    listed = zdepth("keys", "list", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.split() == ["robot"]


def test_weights_offline_error_says_what_to_do_and_list_shows_every_size(tmp_path):
    """Before: offline, `weights get` printed a bare network error; `weights list` showed `?` for sizes the README knows."""
    run = zdepth(
        "weights",
        "get",
        "vits",
        "--dataset",
        "hypersim",
        "--checkpoint-dir",
        tmp_path,
        "--url",
        "http://127.0.0.1:9/x.pth",
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "copy it into the checkpoint folder" in run.stderr and "--url" in run.stderr
    listing = zdepth("weights", "list", "--checkpoint-dir", tmp_path)
    rows = listing.stdout.splitlines()[1:]
    assert len(rows) == 10 and all(" MB " in row or " GB " in row for row in rows) and " ? " not in listing.stdout
