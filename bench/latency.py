"""Latency: every method over tcp and ipc, split into worker compute and overhead, next to the
bare ZeroMQ round trip of the same bytes.

    python -m bench latency [--quick] [--sizes 640x480,1280x720] [--iterations 60] [--input-size 56]

A round trip runs from the call in the client to a numpy array in the caller's hands. The
worker reports its own compute in each reply (`timing`: decode + pre + inference + post);
overhead is the rest: client, request and reply encoding, the broker hop, the wire. The floor
is a DEALER talking straight to a ROUTER echo process that answers with a preallocated array
of the reply's size (no broker, no model): what the wire alone costs on this machine.

`served_vs_bare(device, dtype, iterations)` is the same measurement for one 640x480 JPEG ->
point cloud, used by `bench/gpu.py` on CUDA machines (only torch, numpy, msgpack, pyzmq and
OpenCV needed there).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional, Sequence

import msgpack
import numpy as np
import zmq

from bench.common import (
    Case,
    EchoServer,
    ZdepthServer,
    compute_ms,
    goal,
    interleave,
    intrinsics_for,
    parse_size,
    print_goals,
    print_table,
    progress,
    pyplot,
    sample_jpeg,
    save_figure,
    split_iterations,
    workdir,
    write_results,
)
from clients import DepthClient

PREDICT_METHODS = ("metric_depth", "rel_depth", "pointcloud")
# Options the issue asks to measure as rows of their own, not to assume.
# The plain rows ask for the exact float32 arrays (the floor's bytes); the variants are smaller forms.
VARIANTS = {
    "float16": "output_dtype float16 (half the reply bytes)",
    "compact": "the client's default: uint16 mm + zstd depth, the cloud rebuilt in the client",
}
EXACT = {"output_dtype": "float32", "compression": "none"}
DEFAULT_SIZES = "640x480,1280x720"
QUICK_SIZES = "160x120"
DEFAULT_INPUT_SIZE = 56  # the smallest legal input: compute is subtracted, so keep it short
# The goals for the wire, as numbers.
FLOOR_RATIO_GOAL = 1.5  # zdepth's point cloud overhead within 1.5x of the bare ZeroMQ round trip
BROKER_ADDS_GOAL_MS = 0.2  # the broker adds at most this (p50) to a small message


class BareClient:
    """The floor's client: a DEALER that sends [b"", header, *frames] zero-copy and receives
    zero-copy, with nothing of zdepth's client around it."""

    def __init__(self, endpoint: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self._ids = itertools.count()

    def request(self, fields: dict, frames: Sequence = ()) -> list:
        """One request; returns the reply frames after the empty delimiter."""
        header = msgpack.packb({"v": 1, "id": next(self._ids), **fields})
        self.socket.send_multipart([b"", header, *frames], copy=False)
        return self.socket.recv_multipart(copy=False)[1:]

    def close(self) -> None:
        self.socket.close(linger=0)


def reply_bytes(method: str, width: int, height: int, variant: Optional[str] = None) -> int:
    """Bytes of the result arrays a request brings back (0 for health)."""
    if method == "health":
        return 0
    values = width * height * (3 if method == "pointcloud" and variant != "compact" else 1)
    return values * (2 if variant in ("float16", "compact") else 4)  # compact: before zstd


def zdepth_case(
    client, transport: str, method: str, size: tuple, jpeg: bytes, input_size: int, variant: Optional[str] = None
) -> Case:
    """One zdepth request through the real `DepthClient`, returning the worker's compute."""
    width, height = size
    intrinsics = intrinsics_for(width, height)
    options = {"input_size": input_size, **({} if variant == "compact" else EXACT)}
    if variant == "float16":
        options["output_dtype"] = "float16"
    if method == "health":

        def call():
            client.health()
            return None
    elif method == "pointcloud":

        def call():
            return compute_ms(client.pointcloud(jpeg, intrinsics, server_side=variant != "compact", **options).timing)
    elif method == "metric_depth":

        def call():
            return compute_ms(client.metric_depth(jpeg, **options).timing)
    else:

        def call():
            return compute_ms(client.relative_depth(jpeg, **options).timing)

    image = "" if method == "health" else f"{width}x{height}"
    label = " ".join(filter(None, ["zdepth", transport, image, method, variant]))
    info = {
        "path": "zdepth",
        "transport": transport,
        "image": image,
        "method": method,
        "variant": variant,
        "reply_bytes": reply_bytes(method, width, height, variant),
    }
    return Case(label, call, info)


def floor_case(bare: BareClient, transport: str, size: tuple, jpeg: bytes, method: str) -> Case:
    """The bare ZeroMQ round trip of the same request bytes and a reply of `method`'s size."""
    width, height = size
    shape = [width * height, 3] if method == "pointcloud" else [height, width]

    def call():
        frames = bare.request({"method": method, "reply_shape": shape}, [jpeg])
        msgpack.unpackb(frames[0].buffer)
        np.frombuffer(frames[1].buffer, np.float32).reshape(shape)
        return None

    info = {
        "path": "floor",
        "transport": transport,
        "image": f"{width}x{height}",
        "method": method,
        "variant": None,
        "reply_bytes": reply_bytes(method, width, height),
    }
    return Case(f"floor {transport} {width}x{height} {method}-sized reply", call, info)


def rows_of(results: list) -> list:
    """[(case, series)] -> result rows (with their raw samples, for plots and later analysis); each
    row also gets its overhead over the floor of the same transport, image and reply size, where
    that floor was measured."""
    rows = [
        {"label": case.label, **case.info, **series.summary(), "samples": series.samples()} for case, series in results
    ]
    floors = {(r["transport"], r["image"], r["reply_bytes"]): r["rt_p50"] for r in rows if r["path"] == "floor"}
    for r in rows:
        floor = floors.get((r["transport"], r["image"], r["reply_bytes"]))
        if r["path"] != "floor" and floor:
            r["overhead_vs_floor"] = round(r["overhead_p50"] / floor, 2)
    return rows


# Table column -> how to read it from a row.
ROW_COLUMNS = {
    "configuration": lambda r: r["label"],
    "reply MB": lambda r: round(r["reply_bytes"] / 1e6, 2),
    "rt p50": lambda r: r["rt_p50"],
    "rt p90": lambda r: r["rt_p90"],
    "rt p99": lambda r: r["rt_p99"],
    "compute p50": lambda r: r["compute_p50"],
    "overhead p50": lambda r: r["overhead_p50"],
    "overhead p90": lambda r: r["overhead_p90"],
    "overhead p99": lambda r: r["overhead_p99"],
    "overhead / floor": lambda r: r.get("overhead_vs_floor"),
}


def print_rows(title: str, rows: list, columns: Sequence[str] = tuple(ROW_COLUMNS)) -> str:
    """The rows as a table of the named `ROW_COLUMNS` (all by default), times in ms."""
    table = [tuple(ROW_COLUMNS[c](r) for c in columns) for r in rows]
    return print_table(f"{title} (ms)", list(columns), table)


def client_only_case(client, transport: str, size: tuple, jpeg: bytes, input_size: int) -> Case:
    """`DepthClient` asking the echo for a point cloud: zdepth's client and one hop of the wire,
    without the broker, the worker and the second hop."""
    case = zdepth_case(client, transport, "pointcloud", size, jpeg, input_size)
    return Case(
        f"DepthClient {transport} -> echo {size[0]}x{size[1]} pointcloud (no broker, no worker)",
        case.call,
        {**case.info, "path": "client"},
    )


def small_case(bare: BareClient, path: str, transport: str, size_bytes: int) -> Case:
    """A `health` request over a bare DEALER: through the broker (which answers it itself) or to
    the echo, which answers with a header of `size_bytes`, the size of the broker's answer."""

    def call():
        msgpack.unpackb(bare.request({"method": "health", "reply_bytes": size_bytes})[0].buffer)
        return None

    info = {"path": path, "transport": transport, "image": "", "method": "health", "variant": None, "reply_bytes": 0}
    label = (
        f"health through the broker, {transport}"
        if path == "broker"
        else f"floor {transport}: echo of a {size_bytes} B reply"
    )
    return Case(label, call, info)


class Connections:
    """Everything a round-trip comparison talks to, per transport: `DepthClient`s to zdepth
    (`zdepth`) and to the echo (`client_only`), bare DEALERs to the broker (`broker`) and to the
    echo (`floor`)."""

    TRANSPORTS = ("tcp", "ipc")

    def __init__(self, server: ZdepthServer, echo: EchoServer):
        self.zdepth = {
            t: DepthClient(server.endpoint if t == "tcp" else server.ipc, timeout=120.0) for t in self.TRANSPORTS
        }
        self.client_only = {t: DepthClient(echo.endpoints[t], timeout=120.0) for t in self.TRANSPORTS}
        self.broker = {t: BareClient(server.endpoint if t == "tcp" else server.ipc) for t in self.TRANSPORTS}
        self.floor = {t: BareClient(echo.endpoints[t]) for t in self.TRANSPORTS}

    def wire_cases(self, size: tuple, jpeg: bytes, input_size: int) -> list:
        """Where a point cloud's overhead goes, per transport: the floor of its bytes, `DepthClient`
        to the echo, and small messages through the broker against the echo of the same size."""
        health_bytes = len(self.broker["tcp"].request({"method": "health"})[0].bytes)
        cases = []
        for t in self.TRANSPORTS:
            cases.append(floor_case(self.floor[t], t, size, jpeg, "pointcloud"))
            cases.append(client_only_case(self.client_only[t], t, size, jpeg, input_size))
            cases.append(small_case(self.broker[t], "broker", t, health_bytes))
            cases.append(small_case(self.floor[t], "floor", t, health_bytes))
        return cases

    def close(self) -> None:
        for group in (self.zdepth, self.client_only, self.broker, self.floor):
            for client in group.values():
                client.close()


def find(rows: list, path: str, method: str, transport: str = "tcp", variant=None) -> Optional[dict]:
    return next(
        (
            r
            for r in rows
            if r["path"] == path and r["method"] == method and r["transport"] == transport and r["variant"] == variant
        ),
        None,
    )


def print_breakdown(rows: list) -> str:
    """Where a point cloud's overhead goes (p50, so the differences are indicative): the wire's
    one hop, what `DepthClient` adds to it, and what the broker, the worker and the second hop
    of the payload add on top."""
    table = []
    for t in Connections.TRANSPORTS:
        floor, client, zdepth = (
            find(rows, "floor", "pointcloud", t),
            find(rows, "client", "pointcloud", t),
            find(rows, "zdepth", "pointcloud", t),
        )
        table.append(
            (
                t,
                floor["rt_p50"],
                client["overhead_p50"],
                zdepth["overhead_p50"],
                round(client["overhead_p50"] - floor["rt_p50"], 3),
                round(zdepth["overhead_p50"] - client["overhead_p50"], 3),
            )
        )
    columns = [
        "transport",
        "floor: 1 hop",
        "DepthClient -> echo",
        "zdepth",
        "DepthClient's own cost",
        "broker + worker + 2nd hop",
    ]
    return print_table("Where the point cloud overhead goes (p50, ms)", columns, table)


def wire_goals(rows: list, image: str) -> list:
    """The goals that need no HTTP baseline: zdepth's point cloud overhead against the floor, and
    what the broker adds to a small message."""
    goals = []
    for t in Connections.TRANSPORTS:
        row, floor = find(rows, "zdepth", "pointcloud", t), find(rows, "floor", "pointcloud", t)
        ratio = row["overhead_p50"] / floor["rt_p50"]
        goals.append(
            goal(
                f"{image} point cloud overhead, zdepth {t}: within {FLOOR_RATIO_GOAL:g}x of the bare ZeroMQ round trip ({t})",
                f"{ratio:.2f}x ({row['overhead_p50']:.2f} vs {floor['rt_p50']:.2f} ms p50)",
                ratio <= FLOOR_RATIO_GOAL,
            )
        )
    for t in Connections.TRANSPORTS:
        broker, echo = find(rows, "broker", "health", t), find(rows, "floor", "health", t)
        added = broker["rt_p50"] - echo["rt_p50"]
        goals.append(
            goal(
                f"broker adds <= {BROKER_ADDS_GOAL_MS} ms p50 to a small message ({t})",
                f"+{added:.3f} ms ({broker['rt_p50']:.3f} vs {echo['rt_p50']:.3f} ms direct)",
                added <= BROKER_ADDS_GOAL_MS,
            )
        )
    return goals


def served_vs_bare(
    device: str, dtype: str, iterations: int, input_size: int = 518, threads: Optional[int] = None
) -> dict:
    """zdepth serving 640x480 JPEG -> point cloud on `device`/`dtype` over tcp and ipc, with the
    float16 and unproject-in-the-client options, next to the bare ZeroMQ floor, `DepthClient`
    talking to the echo, and small messages through the broker; prints the tables and returns
    {device, dtype, input_size, image_bytes, rows, goals}."""
    size = (640, 480)
    jpeg = sample_jpeg(*size)
    with workdir() as tmp:
        tmp = Path(tmp)
        progress(f"starting zdepth serve on {device} ({dtype}) and the echo floor")
        with (
            ZdepthServer(tmp, device=device, dtype=dtype, threads=threads) as server,
            EchoServer(tmp, image_size=size) as echo,
        ):
            connections = Connections(server, echo)
            try:
                cases = [
                    zdepth_case(connections.zdepth[t], t, "pointcloud", size, jpeg, input_size)
                    for t in Connections.TRANSPORTS
                ]
                cases += [
                    zdepth_case(connections.zdepth["tcp"], "tcp", "pointcloud", size, jpeg, input_size, v)
                    for v in VARIANTS
                ]
                cases += connections.wire_cases(size, jpeg, input_size)
                rounds, per_round = split_iterations(iterations)
                results = interleave(cases, rounds, per_round, warmup=3, label="served vs bare")
            finally:
                connections.close()
    rows = rows_of(results)
    print_rows(f"640x480 JPEG ({len(jpeg)} B) -> point cloud on {device} {dtype}, input_size {input_size}", rows)
    print_breakdown(rows)
    goals = wire_goals(rows, "640x480")
    print_goals(goals)
    return {
        "device": device,
        "dtype": dtype,
        "input_size": input_size,
        "image_bytes": len(jpeg),
        "rows": rows,
        "goals": goals,
    }


# --- the `latency` benchmark ----------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--sizes", help=f"image sizes WxH, comma-separated (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})"
    )
    parser.add_argument("--iterations", type=int, help="requests per configuration (default 60; --quick: 2)")
    parser.add_argument(
        "--input-size",
        type=int,
        default=DEFAULT_INPUT_SIZE,
        help=f"model input size (default {DEFAULT_INPUT_SIZE}: compute is subtracted)",
    )


def run(args) -> dict:
    sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")]
    iterations = args.iterations or (2 if args.quick else 60)
    images = {size: sample_jpeg(*size) for size in sizes}
    with workdir() as tmp:
        tmp = Path(tmp)
        progress("starting zdepth serve (1 CPU worker, 1 thread, random weights) and the echo floor")
        with ZdepthServer(tmp, threads=1) as server, EchoServer(tmp) as echo:
            connections = Connections(server, echo)
            try:
                cases = []
                for transport in Connections.TRANSPORTS:
                    cases.append(
                        zdepth_case(connections.zdepth[transport], transport, "health", sizes[0], b"", args.input_size)
                    )
                    for size in sizes:
                        for method in PREDICT_METHODS:
                            cases.append(
                                zdepth_case(
                                    connections.zdepth[transport],
                                    transport,
                                    method,
                                    size,
                                    images[size],
                                    args.input_size,
                                )
                            )
                        for method in ("metric_depth", "pointcloud"):  # rel_depth's reply is metric_depth's size
                            cases.append(
                                floor_case(connections.floor[transport], transport, size, images[size], method)
                            )
                rounds, per_round = split_iterations(iterations)
                progress(f"timing {len(cases)} configurations, {rounds} interleaved rounds x {per_round}")
                results = interleave(cases, rounds, per_round, warmup=1 if args.quick else 2, label="latency")
            finally:
                connections.close()
    rows = rows_of(results)
    title = f"Latency, 1 CPU worker (1 thread), vits input_size {args.input_size}, random weights"
    table = print_rows(title, rows)
    plot(rows, args.out_dir)
    config = {
        "sizes": [f"{w}x{h}" for w, h in sizes],
        "image_bytes": {f"{w}x{h}": len(images[(w, h)]) for w, h in sizes},
        "iterations": rounds * per_round,
        "input_size": args.input_size,
        "workers": 1,
        "threads": 1,
        "quick": args.quick,
    }
    write_results(args.out_dir, "latency", {"config": config, "rows": rows, "table": table})
    return {"rows": rows}


def plot(rows: list, out_dir) -> None:
    """Left: compute and overhead (p50) of each prediction; right: overhead CDFs of point clouds
    against the floor of the same bytes."""
    plt = pyplot()
    if plt is None:
        return
    figure, (bars, cdf) = plt.subplots(1, 2, figsize=(15, 6))
    predictions = [r for r in rows if r["path"] == "zdepth" and r["method"] != "health"]
    labels = [r["label"].replace("zdepth ", "") for r in predictions]
    compute = [r["compute_p50"] for r in predictions]
    overhead = [r["overhead_p50"] for r in predictions]
    bars.barh(labels, compute, color="#9bb7d4", label="worker compute p50")
    bars.barh(labels, overhead, left=compute, color="#d1495b", label="overhead p50")
    bars.set_xlabel("ms")
    bars.set_title("round trip = compute + overhead")
    bars.legend()
    bars.invert_yaxis()
    colours: dict = {}  # one colour per transport and size: zdepth solid, its floor dashed
    for r in rows:
        if r["method"] == "pointcloud" and r["variant"] is None:
            values = np.sort(np.subtract(r["samples"]["rt_ms"], r["samples"]["compute_ms"]))
            colour = colours.setdefault((r["transport"], r["image"]), f"C{len(colours)}")
            cdf.plot(
                values,
                np.arange(1, len(values) + 1) / len(values),
                "-" if r["path"] == "zdepth" else "--",
                color=colour,
                label=r["label"],
            )
    cdf.set_xscale("log")
    cdf.xaxis.set_major_locator(plt.LogLocator(subs=(1.0, 2.0, 5.0)))
    cdf.xaxis.set_major_formatter(plt.ScalarFormatter())
    cdf.xaxis.set_minor_formatter(plt.NullFormatter())
    cdf.set_xlabel("ms (zdepth: overhead; floor: whole round trip)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("point cloud overhead vs the bare ZeroMQ floor")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(fontsize=8)
    save_figure(plt, figure, out_dir, "latency")
