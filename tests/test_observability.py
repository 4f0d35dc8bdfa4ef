"""What an operator sees: the `stats` method, the Prometheus endpoint and structured logs,
against a real `zdepth serve` after real traffic."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import numpy as np
import pytest

from clients import CameraPublisher, DepthClient, ServerError
from tests.servers import TEST_INPUT_SIZE, Server, free_port_block, raw_request
from zdepth import protocol as P
from zdepth.logs import JsonFormatter, TextFormatter

KEY = "zd-observe-secret-key"
IMAGE = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def observed(tmp_path_factory, checkpoint_dir):
    metrics_port = free_port_block(1)
    srv = Server(
        tmp_path_factory.mktemp("observe"),
        checkpoint_dir,
        workers=1,
        extra=[
            "--api-key",
            KEY,
            "--require-auth",
            "--metrics-port",
            str(metrics_port),
            "--log-level",
            "DEBUG",
            "--log-format",
            "json",
        ],
    )
    srv.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield srv
    srv.stop()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def traffic(server: Server) -> None:
    """Two results, one bad request, one unauthorised request and a few camera frames."""
    with DepthClient(server.endpoint, key=KEY, timeout=30, input_size=TEST_INPUT_SIZE) as client:
        client.metric_depth(IMAGE)
        client.pointcloud(IMAGE, {"fx": 50.0, "fy": 50.0, "cx": 32.0, "cy": 24.0}, server_side=True)
        with pytest.raises(ServerError):
            client.metric_depth(IMAGE, max_depth=-1.0)
    head, _ = raw_request(server.endpoint, P.request_header(P.STATS, id=1, key="wrong"))
    assert head["error"]["code"] == P.UNAUTHORIZED
    camera = CameraPublisher(server.stream, stream="obs-cam", key=KEY, input_size=TEST_INPUT_SIZE)
    for _ in range(10):
        camera.send(IMAGE)
        time.sleep(0.01)
    camera.close()
    deadline = time.monotonic() + 20
    while True:
        streams = (server.health().get("streams") or {}).get("obs-cam", {})
        if (
            streams
            and streams["frames_in"] == streams["processed"] + streams["dropped"] + streams["errors"]
            and streams["processed"]
        ):
            return
        assert time.monotonic() < deadline, streams
        time.sleep(0.1)


def test_stats_after_traffic(observed):
    traffic(observed)
    with DepthClient(observed.endpoint, key=KEY, timeout=10) as client:
        stats = client.stats()
    assert stats["requests"][P.METRIC_DEPTH] >= 2 and stats["requests"][P.POINTCLOUD] >= 1
    assert stats["outcomes"][P.METRIC_DEPTH]["ok"] >= 1 and stats["outcomes"][P.METRIC_DEPTH][P.BAD_REQUEST] >= 1
    assert stats["errors"][P.BAD_REQUEST] >= 1 and stats["errors"][P.UNAUTHORIZED] >= 1
    latency = stats["latency"][P.METRIC_DEPTH]
    assert latency["n"] >= 2 and 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    assert stats["queue"] == 0 and stats["queue_limit"] > 0 and stats["in_flight"] == 0
    assert stats["bytes"]["held"] == 0 and stats["bytes"]["limit"] > 0 and stats["bytes"]["client_limit"] > 0
    frames = stats["stream_frames"]
    assert frames["in"] >= 1 and frames["in"] == frames["processed"] + frames["dropped"] + frames["errors"], frames
    assert "dropped" in stats["streams"]["obs-cam"]
    assert stats["keys"]["cli-1"] >= 4, "requests are counted per key name"
    assert KEY not in json.dumps(stats, default=str), "stats name keys, never show them"
    assert stats["workers"] == 1 and stats["uptime_s"] > 0


def test_prometheus_endpoint(observed):
    before = scrape(observed.metrics_url)
    for name in (
        "zdepth_requests_total",
        "zdepth_errors_total",
        "zdepth_request_latency_seconds_bucket",
        "zdepth_request_latency_seconds_count",
        "zdepth_queue_depth",
        "zdepth_workers",
        "zdepth_in_flight",
        "zdepth_bytes_held",
        "zdepth_stream_frames_total",
        "process_resident_memory_bytes",
    ):
        assert f"\n{name}" in before, f"{name} missing from /metrics"
    assert sample(before, "zdepth_workers") == 1
    with DepthClient(observed.endpoint, key=KEY, timeout=30, input_size=TEST_INPUT_SIZE) as client:
        client.relative_depth(IMAGE)
    after = scrape(observed.metrics_url)
    assert (
        sample(after, "zdepth_requests_total", method=P.REL_DEPTH, outcome="ok")
        == sample(before, "zdepth_requests_total", method=P.REL_DEPTH, outcome="ok") + 1
    )
    assert sample(after, "zdepth_request_latency_seconds_count", method=P.REL_DEPTH) >= 1
    assert KEY not in after and "cli-1" not in after, "the unauthenticated endpoint shows neither keys nor key names"


def test_request_log_lines(observed):
    """One JSON line per request from the broker: id, key name (never the key), method, worker, timings, outcome."""
    with DepthClient(observed.endpoint, key=KEY, timeout=30, input_size=TEST_INPUT_SIZE) as client:
        client.metric_depth(IMAGE)
    head, _ = raw_request(observed.endpoint, P.request_header(P.STATS, id="bad-key", key="not-the-key"))
    time.sleep(0.3)
    log = observed.process.log_path.read_text(errors="replace")
    assert KEY not in log, "a key was logged"
    records = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the worker's own lines
        if record.get("logger") == "zdepth.broker" and record.get("msg") == "request":
            records.append(record)
    done = [r for r in records if r["method"] == P.METRIC_DEPTH and r["outcome"] == "ok"]
    assert done, records[-5:]
    assert done[-1]["level"] == "DEBUG" and done[-1]["key"] == "cli-1" and done[-1]["worker"]
    assert done[-1]["total_ms"] > 0 and "inference_ms" in done[-1] and "wait_ms" in done[-1]
    refused = [r for r in records if r["id"] == "bad-key"]
    assert refused and refused[0]["level"] == "WARNING" and refused[0]["outcome"] == P.UNAUTHORIZED


def test_text_format_quotes_network_values():
    record = logging.LogRecord("zdepth.broker", logging.WARNING, __file__, 1, "request", None, None)
    record.fields = {"id": 'x" outcome=ok\nforged line', "key": "robot-arm", "total_ms": 1.5}
    line = TextFormatter().format(record)
    assert "\n" not in line and "key=robot-arm total_ms=1.5" in line
    assert 'id="x\\" outcome=ok\\nforged line"' in line
    assert json.loads(JsonFormatter().format(record))["id"] == 'x" outcome=ok\nforged line'
