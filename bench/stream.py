"""Streaming: cameras publishing faster than the model, latency and drops over time.

    python -m bench stream [--quick] [--duration 10] [--long 60] [--input-size 112]

CameraPublisher -> broker stream ingress -> worker -> broker PUB -> DepthSubscriber, on one
CPU worker (one torch thread) whose model is slower than the cameras (vits at input_size 112
takes longer than a frame period at 30 fps). 1 and 3 cameras at 15, 30 and 60 fps run for `--duration` seconds
each, then one camera at 30 fps for `--long` seconds: the flatness run. The broker keeps only
the newest frame of each stream, so latency must stay flat while frames are dropped, and
every drop must be counted (by the broker in each result's `dropped`, or by the publisher
when its pipe is full).

Latency is capture -> published (`latency_ms`, stamped by the broker); age is capture ->
arrival at the subscriber. Drop ratio = 1 - results / frames offered, also per second.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (
    ZdepthServer,
    compute_ms,
    goal,
    parse_size,
    percentile,
    print_goals,
    print_table,
    progress,
    pyplot,
    sample_jpeg,
    save_figure,
    summarize,
    workdir,
    write_results,
)

DEFAULT_INPUT_SIZE = 112
CAMERAS = (1, 3)
FPS = (15, 30, 60)
LONG_FPS = 30
FLAT_WINDOW_S = 10.0  # compare the first and the last this many seconds of the long run
FLAT_RATIO_GOAL = 1.25  # "flat": the last window's latency p50 at most 25 % above the first's
DRAIN_QUIET_S = 3.0  # after the cameras stop: wait for each stream's last frame, or this long without a result


def run_cameras(
    server: ZdepthServer, name: str, cameras: int, fps: float, duration_s: float, jpeg: bytes, input_size: int
) -> dict:
    """`cameras` publishers at `fps` for `duration_s`, one subscriber receiving every result."""
    from clients import CameraPublisher, DepthSubscriber

    streams = [f"{name}-{i}" for i in range(cameras)]
    offered: dict = {s: [] for s in streams}  # capture times of every frame offered to the publisher
    results: list = []
    stop_cameras, stop_subscriber = threading.Event(), threading.Event()
    subscriber = DepthSubscriber(server.pub, streams)

    def subscribe() -> None:
        while not stop_subscriber.is_set():
            result = subscriber.recv(timeout=0.1)
            if result is not None:
                results.append(
                    {
                        "stream": result.stream,
                        "seq": result.seq,
                        "ok": result.ok,
                        "t_capture": result.t_capture,
                        "latency_ms": result.latency_ms,
                        "age_ms": result.age_ms,
                        "dropped": result.dropped,
                        "compute_ms": compute_ms(result.header.get("timing")),
                    }
                )

    def frames(stream: str):
        while True:
            offered[stream].append(time.time())  # the publisher stamps t_capture right after this
            yield jpeg

    receiver = threading.Thread(target=subscribe, daemon=True)
    receiver.start()
    time.sleep(0.3)  # a SUB socket misses what is published before its subscription arrives
    publishers = [CameraPublisher(server.stream, stream=s, input_size=input_size) for s in streams]
    cameras_threads = [
        threading.Thread(target=p.run, args=(frames(s),), kwargs={"fps": fps, "stop": stop_cameras}, daemon=True)
        for p, s in zip(publishers, streams)
    ]
    t0 = time.time()
    for thread in cameras_threads:
        thread.start()
    time.sleep(duration_s)
    stop_cameras.set()
    for thread in cameras_threads:
        thread.join()
    drain(results, {s: len(times) - 1 for s, times in offered.items()})
    stop_subscriber.set()
    receiver.join()
    local_drops = sum(p.dropped_local for p in publishers)
    for publisher in publishers:
        publisher.close()
    subscriber.close()
    return summarize_run(name, cameras, fps, duration_s, t0, offered, results, local_drops)


def drain(results: list, last_seq: dict) -> None:
    """Wait until the result of each stream's last frame is in (the broker always keeps the
    newest frame), or until no result has arrived for DRAIN_QUIET_S (that frame was dropped)."""
    seen, quiet_since = len(results), time.monotonic()
    while time.monotonic() - quiet_since < DRAIN_QUIET_S:
        if all(any(r["stream"] == s and r["seq"] == seq for r in results) for s, seq in last_seq.items()):
            return
        time.sleep(0.05)
        if len(results) != seen:
            seen, quiet_since = len(results), time.monotonic()


def flatness(ok: list, key: str, t0: float, duration_s: float) -> dict:
    """p50 of `key` in the first and the last window of the run, their ratio, and the slope of a
    straight line through all of it (ms per minute)."""
    times = np.array([r["t_capture"] - t0 for r in ok])
    values = np.array([r[key] for r in ok])
    window = min(FLAT_WINDOW_S, duration_s / 3)
    first = percentile(values[times < window], 50)
    last = percentile(values[times >= duration_s - window], 50)
    slope = float(np.polyfit(times, values, 1)[0] * 60.0) if len(ok) >= 3 else math.nan
    return {
        "first_p50": round(first, 3),
        "last_p50": round(last, 3),
        "last_over_first": round(last / first, 3) if first > 0 else None,
        "slope_ms_per_min": round(slope, 2),
    }


def summarize_run(
    name: str, cameras: int, fps: float, duration_s: float, t0: float, offered: dict, results: list, local_drops: int
) -> dict:
    """Counts, percentiles and a per-second timeline. Each result's latency is split into the
    worker's compute and the rest (`wait`: waiting for the worker, plus transport), because
    compute drifts with whatever else runs on the machine while the wait is the design's."""
    ok = [dict(r, wait_ms=r["latency_ms"] - r["compute_ms"]) for r in results if r["ok"]]
    captures = np.array([t - t0 for times in offered.values() for t in times])
    broker_drops = sum(r["dropped"] for r in results)
    timeline = []
    for second in range(int(np.ceil(duration_s))):
        in_bin = [r for r in ok if second <= r["t_capture"] - t0 < second + 1]
        frames = int(((captures >= second) & (captures < second + 1)).sum())
        row = {
            "t": second,
            "offered": frames,
            "results": len(in_bin),
            "drop_ratio": round(1 - len(in_bin) / frames, 3) if frames else None,
        }
        for key in ("latency_ms", "compute_ms", "wait_ms"):
            row[key.replace("_ms", "_p50")] = round(percentile([r[key] for r in in_bin], 50), 3) if in_bin else None
        timeline.append(row)
    return {
        "name": name,
        "cameras": cameras,
        "fps": fps,
        "duration_s": duration_s,
        "offered": len(captures),
        "results": len(ok),
        "errors": len(results) - len(ok),
        "results_per_s": round(len(ok) / duration_s, 2),
        "drop_ratio": round(1 - len(ok) / len(captures), 3) if len(captures) else None,
        "broker_drops": broker_drops,
        "local_drops": local_drops,
        "unaccounted": len(captures) - len(results) - broker_drops - local_drops,
        **summarize([r["latency_ms"] for r in ok], "latency_"),
        **{k: v for k, v in summarize([r["age_ms"] for r in ok], "age_").items() if k != "age_n"},
        "compute_p50": round(percentile([r["compute_ms"] for r in ok], 50), 3),
        **{k: v for k, v in summarize([r["wait_ms"] for r in ok], "wait_").items() if k != "wait_n"},
        "latency_flatness": flatness(ok, "latency_ms", t0, duration_s),
        "wait_flatness": flatness(ok, "wait_ms", t0, duration_s),
        "timeline": timeline,
        "points": [[round(r["t_capture"] - t0, 3), round(r["latency_ms"], 3)] for r in ok],
    }


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, help="seconds per camera/fps configuration (default 10; --quick: 1)")
    parser.add_argument(
        "--long", type=float, help=f"seconds of the 1-camera {LONG_FPS} fps flatness run (default 60; --quick: 2)"
    )
    parser.add_argument("--size", help="camera frame size WxH (default 640x480; --quick: 160x120)")
    parser.add_argument(
        "--input-size",
        type=int,
        help=f"model input size: the model must be slower than the camera (default {DEFAULT_INPUT_SIZE}; --quick: 56)",
    )


def run(args) -> dict:
    size = parse_size(args.size or ("160x120" if args.quick else "640x480"))
    duration = args.duration or (1.0 if args.quick else 10.0)
    long_s = args.long or (2.0 if args.quick else 60.0)
    input_size = args.input_size or (56 if args.quick else DEFAULT_INPUT_SIZE)
    jpeg = sample_jpeg(*size)
    plan = [(c, f, duration) for c in CAMERAS for f in ((LONG_FPS,) if args.quick else FPS)] + [(1, LONG_FPS, long_s)]
    runs = []
    with workdir() as tmp:
        progress("starting zdepth serve (1 CPU worker, 1 torch thread)")
        with ZdepthServer(Path(tmp), workers=1, threads=1) as server:
            progress("warming up the model with a 1 s stream")
            run_cameras(server, "warmup", 1, 10, 1.0, jpeg, input_size)
            for i, (cameras, fps, seconds) in enumerate(plan):
                progress(f"{cameras} camera(s) at {fps} fps for {seconds:g} s")
                runs.append(run_cameras(server, f"run{i}", cameras, fps, seconds, jpeg, input_size))
    title = (
        f"Streaming, 1 CPU worker (1 thread), {size[0]}x{size[1]} JPEG -> metric_depth, vits input_size {input_size}"
    )
    columns = [
        "cameras",
        "fps",
        "s",
        "offered",
        "results/s",
        "drop ratio",
        "broker drops",
        "local drops",
        "unaccounted",
        "compute p50",
        "latency p50",
        "p90",
        "p99",
        "age p50",
        "wait p50",
        "wait p99",
        "latency first/last p50",
        "wait first/last p50",
    ]
    table = print_table(
        f"{title} (latency: capture -> published; wait = latency - compute; ms)",
        columns,
        [
            (
                r["cameras"],
                r["fps"],
                r["duration_s"],
                r["offered"],
                r["results_per_s"],
                r["drop_ratio"],
                r["broker_drops"],
                r["local_drops"],
                r["unaccounted"],
                r["compute_p50"],
                r["latency_p50"],
                r["latency_p90"],
                r["latency_p99"],
                r["age_p50"],
                r["wait_p50"],
                r["wait_p99"],
                _first_last(r["latency_flatness"]),
                _first_last(r["wait_flatness"]),
            )
            for r in runs
        ],
    )
    goals = flatness_goals(runs[-1], long_s)
    print_goals(goals)
    plot(runs, args.out_dir, title)
    config = {
        "size": f"{size[0]}x{size[1]}",
        "image_bytes": len(jpeg),
        "input_size": input_size,
        "workers": 1,
        "duration_s": duration,
        "long_s": long_s,
        "quick": args.quick,
    }
    write_results(args.out_dir, "stream", {"config": config, "runs": runs, "goals": goals, "table": table})
    return {"runs": runs, "goals": goals}


def _first_last(flat: dict) -> str:
    return f"{flat['first_p50']:.1f} / {flat['last_p50']:.1f}"


def flatness_goals(long_run: dict, long_s: float) -> list:
    """The issue's streaming goal, judged twice: the whole latency may grow by at most 25 % from
    the first to the last window; the part the design controls (latency minus the worker's
    compute, which drifts with the machine's other load, and is naturally anywhere between 0
    and one frame period) by at most one frame period."""
    context = (
        f"model {long_run['results_per_s']} results/s vs camera {LONG_FPS} fps; {long_run['broker_drops']} broker + "
        f"{long_run['local_drops']} local drops counted, {long_run['unaccounted']} unaccounted"
    )
    latency, wait = long_run["latency_flatness"], long_run["wait_flatness"]
    period_ms = 1000.0 / LONG_FPS
    growth = wait["last_p50"] - wait["first_p50"]
    window = f"last {FLAT_WINDOW_S:g} s p50 vs first"
    return [
        goal(
            f"latency flat over a {long_s:g} s run at {LONG_FPS} fps with a slower model ({window} <= {FLAT_RATIO_GOAL}x)",
            f"{latency['first_p50']:.1f} -> {latency['last_p50']:.1f} ms ({latency['last_over_first']}x), slope {latency['slope_ms_per_min']} ms/min; "
            f"compute p50 {long_run['compute_p50']:.1f} ms; {context}",
            None if latency["last_over_first"] is None else latency["last_over_first"] <= FLAT_RATIO_GOAL,
        ),
        goal(
            f"latency minus compute flat over the same run ({window} + one frame period, {period_ms:.0f} ms)",
            f"{wait['first_p50']:.1f} -> {wait['last_p50']:.1f} ms ({growth:+.1f} ms), slope {wait['slope_ms_per_min']} ms/min",
            growth <= period_ms,
        ),
    ]


def plot(runs: list, out_dir, title: str) -> None:
    """Top: the long run, every result's latency and, per second, the p50 of latency, compute and
    their difference; middle: latency p50 per second of the short runs; bottom: drop ratio per
    second. Flat lines while most frames are dropped are the point."""
    plt = pyplot()
    if plt is None:
        return
    figure, (long_axis, short_axis, drop_axis) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    long_run = runs[-1]
    points = np.array(long_run["points"]).reshape(-1, 2)
    long_axis.plot(points[:, 0], points[:, 1], ".", markersize=3, color="#bbbbbb", label="each result's latency")
    for key, style, label in (
        ("latency_p50", "-", "latency p50"),
        ("compute_p50", "--", "worker compute p50"),
        ("wait_p50", ":", "latency - compute p50"),
    ):
        bins = [b for b in long_run["timeline"] if b[key] is not None]
        long_axis.plot([b["t"] + 0.5 for b in bins], [b[key] for b in bins], style, linewidth=2, label=label)
    long_axis.set_ylabel("ms")
    long_axis.set_ylim(bottom=0)
    long_axis.set_title(
        f"{title}\n1 camera x {long_run['fps']} fps for {long_run['duration_s']:g} s (capture -> published)", fontsize=9
    )
    long_axis.legend(fontsize=7)
    for r in runs:
        label = f"{r['cameras']} cam x {r['fps']} fps" + (f" ({r['duration_s']:g} s run)" if r is long_run else "")
        bins = [b for b in r["timeline"] if b["drop_ratio"] is not None]
        drop_axis.plot(
            [b["t"] + 0.5 for b in bins],
            [b["drop_ratio"] for b in bins],
            "-",
            linewidth=2 if r is long_run else 1,
            label=label,
        )
        if r is not long_run:
            bins = [b for b in r["timeline"] if b["latency_p50"] is not None]
            short_axis.plot(
                [b["t"] + 0.5 for b in bins], [b["latency_p50"] for b in bins], "o-", markersize=3, label=label
            )
    short_axis.set_ylabel("latency p50 per second, ms")
    short_axis.set_ylim(bottom=0)
    short_axis.legend(fontsize=7, ncol=3)
    drop_axis.set_ylabel("drop ratio per second")
    drop_axis.set_xlabel("seconds since the cameras started")
    drop_axis.set_ylim(0, 1)
    drop_axis.legend(fontsize=7, ncol=3)
    save_figure(plt, figure, out_dir, "stream")
