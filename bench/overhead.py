"""Overhead: zdepth against the HTTP designs it replaces and the bare ZeroMQ floor, in one run.

    python -m bench overhead [--quick] [--size 640x480] [--iterations 50] [--input-size 56]

Overhead is everything in a round trip but the worker's own compute, up to a numpy array in
the caller's hands. Every design runs the same engine on the same JPEG, in its own process,
and all configurations are interleaved round by round, so the ratios share the same noise:

- zdepth over tcp and ipc (`DepthClient`), and its options as rows of their own:
  `output_dtype` float16, and the client's compact default (uint16 mm + zstd depth, the cloud rebuilt in the client);
- the lab API it replaces: FastAPI + uvicorn, base64 JSON, PNG data URLs, httpx keep-alive;
- the strongest HTTP design: raw binary bodies over a keep-alive `http.client` connection;
- the floor: a DEALER straight to a ROUTER echo answering with a preallocated array;
- small messages: `health` through the broker against the echo of a message of the same size;
- where zdepth's overhead goes: `DepthClient` talking straight to the echo (client library
  + one hop), and zdepth's point cloud over a bare DEALER (everything but `DepthClient`).

Without fastapi/uvicorn/httpx installed the HTTP rows are left out and said so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bench.common import (
    Case,
    EchoServer,
    HttpServer,
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
from bench.latency import (
    DEFAULT_INPUT_SIZE,
    PREDICT_METHODS,
    ROW_COLUMNS,
    VARIANTS,
    BareClient,
    Connections,
    find,
    floor_case,
    print_breakdown,
    print_rows,
    reply_bytes,
    rows_of,
    wire_goals,
    zdepth_case,
)

HTTP_PACKAGES = ("fastapi", "uvicorn", "httpx")
DESIGNS = {  # path -> what it is, for tables and the plot
    "zdepth": "zdepth (ZeroMQ, msgpack + raw frames)",
    "http-json": "HTTP JSON/base64 (FastAPI + httpx): the old lab API",
    "http-binary": "HTTP raw binary body (FastAPI + http.client)",
    "client": "DepthClient -> echo (no broker, no worker)",
    "floor": "bare ZeroMQ DEALER -> ROUTER echo",
    "broker": "health through the broker",
}
HTTP_JSON_RATIO_GOAL = 25.0  # zdepth's point cloud overhead at least 25x smaller than HTTP JSON/base64
BARE_VARIANT = "bare DEALER, no DepthClient"


def missing_http_packages() -> list:
    return [name for name in HTTP_PACKAGES if importlib.util.find_spec(name) is None]


def http_case(client, design: str, method: str, size: tuple, jpeg: bytes, input_size: int) -> Case:
    intrinsics = intrinsics_for(*size)

    def call():
        return client.call(method, jpeg, intrinsics, input_size)[1]

    width, height = size
    info = {
        "path": design,
        "transport": "tcp",
        "image": f"{width}x{height}",
        "method": method,
        "variant": None,
        "reply_bytes": reply_bytes(method, width, height),
    }
    return Case(f"{design} {width}x{height} {method}", call, info)


def bare_zdepth_case(bare: BareClient, size: tuple, jpeg: bytes, input_size: int) -> Case:
    """A point cloud from zdepth over a bare DEALER with `protocol.unpack`: zdepth's wire without
    `DepthClient`, to show what the client library itself costs."""
    from zdepth import protocol as P

    fields = {
        "method": "pointcloud",
        "image": {"frame": 1, "format": "jpeg"},
        "intrinsics": intrinsics_for(*size),
        "input_size": input_size,
    }

    def call():
        header, arrays = P.unpack(bare.request(fields, [jpeg]))
        if not header.get("ok"):
            raise RuntimeError(f"zdepth answered {header.get('error')}")
        return compute_ms(header.get("timing"))

    width, height = size
    info = {
        "path": "zdepth",
        "transport": "tcp",
        "image": f"{width}x{height}",
        "method": "pointcloud",
        "variant": BARE_VARIANT,
        "reply_bytes": reply_bytes("pointcloud", width, height),
    }
    return Case(f"zdepth tcp {width}x{height} pointcloud, bare DEALER + protocol.unpack", call, info)


def add_arguments(parser) -> None:
    parser.add_argument("--size", help="image size WxH (default 640x480; --quick: 160x120)")
    parser.add_argument("--iterations", type=int, help="requests per configuration (default 50; --quick: 2)")
    parser.add_argument(
        "--input-size",
        type=int,
        default=DEFAULT_INPUT_SIZE,
        help=f"model input size (default {DEFAULT_INPUT_SIZE}: compute is subtracted)",
    )


def run(args) -> dict:
    size = parse_size(args.size or ("160x120" if args.quick else "640x480"))
    iterations = args.iterations or (2 if args.quick else 50)
    jpeg = sample_jpeg(*size)
    missing = missing_http_packages()
    notes = [f"HTTP rows left out: {', '.join(missing)} not installed (pip install -e '.[bench]')"] if missing else []
    for note in notes:
        progress(note)
    with workdir() as tmp:
        tmp = Path(tmp)
        progress("starting zdepth serve (1 CPU worker, 1 thread), the HTTP baseline (1 thread) and the echo floor")
        with ZdepthServer(tmp, threads=1) as server, EchoServer(tmp, image_size=size) as echo:
            http_server = None if missing else HttpServer(tmp, threads=1)
            connections = Connections(server, echo)
            http_clients = {}
            try:
                if http_server is not None:
                    from bench.http_baseline import BinaryClient, JsonClient

                    http_clients = {
                        "http-json": JsonClient(http_server.port),
                        "http-binary": BinaryClient(http_server.port),
                    }
                cases = []
                for method in PREDICT_METHODS:
                    cases += [
                        zdepth_case(connections.zdepth[t], t, method, size, jpeg, args.input_size)
                        for t in Connections.TRANSPORTS
                    ]
                    cases += [
                        http_case(client, design, method, size, jpeg, args.input_size)
                        for design, client in http_clients.items()
                    ]
                cases += [
                    zdepth_case(connections.zdepth["tcp"], "tcp", "pointcloud", size, jpeg, args.input_size, v)
                    for v in VARIANTS
                ]
                cases.append(bare_zdepth_case(connections.broker["tcp"], size, jpeg, args.input_size))
                cases += [
                    floor_case(connections.floor[t], t, size, jpeg, "metric_depth") for t in Connections.TRANSPORTS
                ]
                cases += connections.wire_cases(size, jpeg, args.input_size)
                rounds, per_round = split_iterations(iterations)
                progress(f"timing {len(cases)} configurations, {rounds} interleaved rounds x {per_round}")
                results = interleave(cases, rounds, per_round, warmup=1 if args.quick else 2, label="overhead")
            finally:
                for client in http_clients.values():
                    client.close()
                connections.close()
                if http_server is not None:
                    http_server.stop()
    rows = rows_of(results)
    width, height = size
    title = f"Overhead, {width}x{height} JPEG ({len(jpeg)} B), vits input_size {args.input_size}, 1 worker thread per server"
    table = print_rows(title, rows, [c for c in ROW_COLUMNS if c not in ("rt p90", "rt p99")])
    summary = print_summary(rows)
    breakdown = print_breakdown(rows)
    bare, client = find(rows, "zdepth", "pointcloud", variant=BARE_VARIANT), find(rows, "zdepth", "pointcloud")
    print(
        f"Cross-check of DepthClient's cost: zdepth tcp point cloud over a bare DEALER {bare['overhead_p50']:.3f} ms "
        f"vs DepthClient {client['overhead_p50']:.3f} ms p50.\n",
        flush=True,
    )
    goals = http_goals(rows, f"{width}x{height}") + wire_goals(rows, f"{width}x{height}")
    print_goals(goals)
    plot(rows, args.out_dir, title)
    config = {
        "size": f"{width}x{height}",
        "image_bytes": len(jpeg),
        "iterations": rounds * per_round,
        "input_size": args.input_size,
        "quick": args.quick,
        "designs": DESIGNS,
    }
    write_results(
        args.out_dir,
        "overhead",
        {
            "config": config,
            "rows": rows,
            "goals": goals,
            "notes": notes,
            "table": table,
            "summary": summary,
            "breakdown": breakdown,
        },
    )
    return {"rows": rows, "goals": goals}


def print_summary(rows: list) -> str:
    """Per method: overhead p50 of each design, and how many times zdepth's (tcp) it is."""
    columns = [
        "method",
        "zdepth tcp",
        "zdepth ipc",
        "HTTP JSON",
        "HTTP binary",
        "floor tcp",
        "HTTP JSON / zdepth",
        "HTTP binary / zdepth",
        "zdepth / floor",
    ]
    table = []
    for method in PREDICT_METHODS:
        zdepth, ipc = find(rows, "zdepth", method), find(rows, "zdepth", method, "ipc")
        json_, binary = find(rows, "http-json", method), find(rows, "http-binary", method)
        floor = find(rows, "floor", "metric_depth" if method == "rel_depth" else method)
        base = zdepth["overhead_p50"]
        table.append(
            (
                method,
                base,
                ipc["overhead_p50"],
                json_ and json_["overhead_p50"],
                binary and binary["overhead_p50"],
                floor["rt_p50"],
                json_ and round(json_["overhead_p50"] / base, 1),
                binary and round(binary["overhead_p50"] / base, 2),
                zdepth.get("overhead_vs_floor"),
            )
        )
    return print_table("Overhead p50 by design (ms) and ratios", columns, table)


def http_goals(rows: list, image: str) -> list:
    """The point cloud goals against the HTTP designs (not measured when they are not installed)."""
    goals = []
    json_, binary = find(rows, "http-json", "pointcloud"), find(rows, "http-binary", "pointcloud")
    for t in Connections.TRANSPORTS:
        row = find(rows, "zdepth", "pointcloud", t)
        text = f"{image} point cloud overhead, zdepth {t}"
        ratio = json_ and json_["overhead_p50"] / row["overhead_p50"]
        goals.append(
            goal(
                f"{text}: >= {HTTP_JSON_RATIO_GOAL:g}x smaller than HTTP JSON/base64",
                f"{ratio:.1f}x ({json_['overhead_p50']:.2f} vs {row['overhead_p50']:.2f} ms p50)"
                if json_
                else "HTTP baseline not installed",
                ratio >= HTTP_JSON_RATIO_GOAL if json_ else None,
            )
        )
        goals.append(
            goal(
                f"{text}: no larger than the HTTP binary-body design",
                f"{row['overhead_p50']:.2f} vs {binary['overhead_p50']:.2f} ms p50"
                if binary
                else "HTTP baseline not installed",
                row["overhead_p50"] <= binary["overhead_p50"] if binary else None,
            )
        )
    return goals


def plot(rows: list, out_dir, title: str) -> None:
    """Overhead p50 of every configuration as a bar (p90 as the whisker), log scale, by design."""
    plt = pyplot()
    if plt is None:
        return
    colours = {
        "zdepth": "#2e86ab",
        "http-json": "#d1495b",
        "http-binary": "#edae49",
        "client": "#9bb7d4",
        "floor": "#66a182",
        "broker": "#8d6a9f",
    }
    figure, axes = plt.subplots(figsize=(11, 0.38 * len(rows) + 1.5))
    labels = [r["label"] for r in rows]
    p50 = [r["overhead_p50"] for r in rows]
    whisker = [max(0.0, r["overhead_p90"] - r["overhead_p50"]) for r in rows]
    axes.barh(labels, p50, xerr=[[0] * len(rows), whisker], color=[colours[r["path"]] for r in rows], capsize=2)
    for y, (value, extra) in enumerate(zip(p50, whisker)):
        axes.text(value + extra, y, f"  {value:.2f}", va="center", fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel(
        "overhead p50, ms, log scale (round trip - worker compute); whisker to p90\nfloor and health rows: the whole round trip"
    )
    axes.set_title(title, fontsize=9)
    axes.invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes.legend(handles, list(DESIGNS.values()), fontsize=7, loc="lower right")
    save_figure(plt, figure, out_dir, "overhead")
