"""Smoke tests for bench/: each benchmark runs end to end in --quick mode and writes its results.

No timing is asserted (timing goals are measured by the benchmarks, never in unit tests); these
only check that every benchmark still starts its processes, measures, and writes JSON (and a
PNG where matplotlib is installed). Quick mode uses tiny images and 1-2 s windows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_HTTP = all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "httpx"))


def run_bench(name: str, out_dir: Path, *extra: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", "--out-dir", str(out_dir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, (
        f"python -m bench {name} --quick failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    if f"{name} bench skipped:" in result.stdout:  # e.g. root without the right to create network namespaces
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert "|---" in result.stdout, "no table printed"
    document = json.loads((out_dir / f"{name}.json").read_text())
    assert document["benchmark"] == name
    assert document["machine"]["cpu_count"] >= 1
    if HAVE_MATPLOTLIB:
        assert (out_dir / f"{name}.png").stat().st_size > 0
    return document


def test_latency(tmp_path):
    document = run_bench("latency", tmp_path)
    paths = {(r["path"], r["transport"], r["method"]) for r in document["rows"]}
    for transport in ("tcp", "ipc"):
        for method in ("health", "metric_depth", "rel_depth", "pointcloud"):
            assert ("zdepth", transport, method) in paths
        assert ("floor", transport, "pointcloud") in paths
    pointcloud = next(r for r in document["rows"] if r["path"] == "zdepth" and r["method"] == "pointcloud")
    assert pointcloud["compute_p50"] > 0 and pointcloud["rt_p50"] >= pointcloud["compute_p50"]


def test_overhead(tmp_path):
    document = run_bench("overhead", tmp_path)
    paths = {r["path"] for r in document["rows"]}
    assert {"zdepth", "floor", "broker"} <= paths
    assert {r["variant"] for r in document["rows"]} >= {"float16", "compact"}
    if HAVE_HTTP:
        assert {"http-json", "http-binary"} <= paths
        assert all(g["met"] is not None for g in document["goals"])
    else:
        assert any("HTTP rows left out" in note for note in document["notes"])


def test_compression(tmp_path):
    document = run_bench("compression", tmp_path)
    forms = {(r["scene"], r["form"]) for r in document["rows"]}
    assert ("smooth room", "uint16 zstd") in forms and ("model, input 56", "float32 none") in forms
    for row in document["rows"]:
        assert row["bytes"] > 0 and row["encode_ms"] > 0 and row["decode_ms"] > 0
        assert row["max_error_m"] <= (0.0005 + 1e-5 if row["form"].startswith("uint16") else 0.01)


def test_throughput(tmp_path):
    document = run_bench("throughput", tmp_path, "--workers", "1")
    assert [r["clients"] for r in document["rows"]] == [1, 2]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in document["rows"])


def test_scaling(tmp_path):
    document = run_bench("scaling", tmp_path)
    assert [r["workers"] for r in document["rows"]][:2] == [1, 2]
    assert document["goals"] and document["goals"][0]["met"] is not None


def test_stream(tmp_path):
    document = run_bench("stream", tmp_path)
    assert [(r["cameras"], r["fps"]) for r in document["runs"]] == [(1, 30), (3, 30), (1, 30)]
    for run in document["runs"]:
        assert run["results"] > 0
        assert run["offered"] >= run["results"]


def test_served_vs_bare_on_cpu(monkeypatch):
    """The function bench/gpu.py calls on CUDA machines, on the CPU with a tiny model input."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.latency import served_vs_bare

    result = served_vs_bare(device="cpu", dtype="fp32", iterations=2, input_size=56, threads=1)
    paths = {(r["path"], r["transport"]) for r in result["rows"]}
    assert paths >= {("zdepth", "tcp"), ("zdepth", "ipc"), ("floor", "tcp"), ("floor", "ipc")}


def test_broker_capacity(tmp_path):
    document = run_bench("broker", tmp_path, "--sizes", "100,200000")
    assert [(r["reply_bytes"], r["workers"]) for r in document["rows"]] == [
        (100, 1),
        (100, 4),
        (200000, 1),
        (200000, 4),
    ]
    for row in document["rows"]:
        assert row["requests"] > 0 and not row["errors"], row
    assert (
        sum(row["cpu_percent"]["broker"] for row in document["rows"]) > 0
    )  # clock ticks: one short window may see none
    big = next(r for r in document["rows"] if r["reply_bytes"] == 200000)
    assert big["mb_per_s"] >= big["rps"] * 0.2  # each counted reply carried its 0.2 MB


def namespaces() -> list:
    listing = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


NETWORK_TOOLS = os.geteuid() == 0 and all(shutil.which(tool) is not None for tool in ("ip", "tc", "ss"))


@pytest.mark.skipif(not NETWORK_TOOLS, reason="the network bench needs root, ip, tc and ss")
def test_network(tmp_path):
    before = set(namespaces())
    document = run_bench("network", tmp_path)
    assert set(namespaces()) <= before, "the bench left its network namespaces behind"
    rows = {(r["link"], r["key"]) for r in document["rows"]}
    keys = {"cloud_f32", "depth_f32", "depth_f16", "depth_u16", "depth_u16_zstd", "cloud_default"} | (
        {"http_binary", "http_json"} if HAVE_HTTP else set()
    )
    assert rows == {(link, key) for link in ("1gbit", "100mbit") for key in keys}
    by_key = {r["key"]: r for r in document["rows"] if r["link"] == "100mbit"}
    # bytes counted on the link: the compact forms are smaller than float32, the cloud largest
    assert (
        by_key["depth_u16_zstd"]["reply_bytes"]
        < by_key["depth_u16"]["reply_bytes"]
        < by_key["depth_f32"]["reply_bytes"]
        < by_key["cloud_f32"]["reply_bytes"]
    )
    assert by_key["cloud_default"]["reply_bytes"] == pytest.approx(by_key["depth_u16_zstd"]["reply_bytes"], rel=0.2)
    for row in document["rows"]:
        assert row["rt_n"] >= 1 and row["floor_ms"] > 0 and row["overhead_vs_floor"] > 0
    config = document["config"]
    assert config["added_delay_ms"] == 0.0 and config["links"]["100mbit"]["rtt_ms"] > 0
    depth_scale = config["links"]["100mbit"]["depth_scale"]
    # half a count, plus float32 rounding of z and of count x scale (an ulp is 1.9e-6 m at 16-32 m)
    assert config["links"]["100mbit"]["max_z_error_m"] <= depth_scale / 2 + 4e-6
    assert {g["met"] for g in document["goals"]} <= {True, False}


def pids_running(text: bytes) -> list:
    """Processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not NETWORK_TOOLS, reason="the network bench needs root, ip, tc and ss")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_network_cleans_up_when_interrupted(tmp_path, sig, monkeypatch):
    """Ctrl-C or a kill while the client loop runs: namespaces and every process it started are gone."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.network import SERVER_ADDRESS

    started = {SERVER_ADDRESS.encode(), b"--client-mode"}  # in the command lines of its servers and of its client loop
    before = set(namespaces())
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "network", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # not ignored, even under nohup
    try:
        deadline = time.monotonic() + 60
        while not pids_running(b"--client-mode"):
            assert bench.poll() is None and time.monotonic() < deadline, "the bench never started its client loop"
            time.sleep(0.2)
        bench.send_signal(sig)
        assert bench.wait(60) != 0
    finally:
        if bench.poll() is None:
            bench.kill()
    assert set(namespaces()) <= before, "namespaces left behind"
    assert not [pid for text in started for pid in pids_running(text)], "processes left behind"


def test_compile(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "compile", "--quick", "--no-batching", "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"python -m bench compile --quick failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    assert "|---" in result.stdout, "no table printed"
    document = json.loads((tmp_path / "compile-fp32.json").read_text())
    single = document["single"]
    assert single["compile_failed"] is None and single["eager_ms"] > 0 and single["compiled_ms"] > 0
    assert document["goals"][0]["met"] is None  # a --quick run measures no goal
