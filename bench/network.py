"""Network: every reply form of zdepth, and the HTTP baselines, over a shaped link between two
network namespaces.

    python -m bench network [--quick] [--iterations 60] [--links 1gbit,100mbit] [--input-size 56] [--deadline-s 900]

Needs root, `ip`, `tc` and `ss` (iproute2: it creates network namespaces and shapes a link);
without them it says why and exits 0.

Set-up: two network namespaces, `zdb<pid>s` (server) and `zdb<pid>c` (client), joined by one
veth pair whose addresses, 10.213.0.1/30 and 10.213.0.2/30, exist only inside them.
`zdepth serve` (1 CPU worker, 1 torch thread, random weights) and the HTTP baseline
(bench/http_baseline.py, same engine, 1 thread) run in the server namespace. The client loop
runs in the client namespace as its own process (`python -m bench.network --client-mode ...`)
and hands its numbers back as a JSON file. Both veth ends are shaped with `tbf` (LINKS):

- rate 1 Gbit/s with a 64 KiB bucket, or 100 Mbit/s with a 16 KiB bucket (about 0.5 and
  1.3 ms of line rate: late timer wake-ups on a busy VM cost less rate); the floor subtracts
  what a full bucket lets through at once, so the bucket is not counted as bandwidth;
- limit 4 MiB of queue, more than any reply, so the sender's own TCP small-queue limit, not
  tail drops, holds the data back (drops are counted from `tc -s` and reported).

Delay: netem is tried; this machine's kernel has none, so no delay is added and the round-trip
time is the veth's own, measured as the median TCP connect time (SYN to SYN-ACK) to the server.

Rows, interleaved round by round on each link: the server's float32 point cloud, metric depth
as float32, float16, uint16 and uint16 + zstd, `DepthClient.pointcloud()` with its defaults
(compact depth, cloud rebuilt in the client), the HTTP raw-binary and the HTTP JSON/base64
point clouds. Columns: payload bytes per reply and per request (from the kernel's tcp_info of
the client's connections: protocol headers and framing included, TCP/IP headers not), round
trip and round trip minus the worker's compute (rt-c), the link's floor, and rt-c p50 / floor.
The floor is the least time the shaper allows: the request's then the reply's bytes on the wire
(payload plus 66 B of Ethernet/IP/TCP header per data segment, as tbf counts them; less a full
bucket each way) at the rate, plus the RTT. The results file also keeps the interface's own
byte counts, with how far they are from payload + headers of every segment (a check of that
model of the wire), and the TCP congestion control of both namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    REPO,
    Case,
    Child,
    compute_ms,
    goal,
    interleave,
    intrinsics_for,
    parse_size,
    percentile,
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
from bench.overhead import missing_http_packages

SERVER_ADDRESS = "10.213.0.1"
CLIENT_ADDRESS = "10.213.0.2"
PREFIX_LENGTH = 30
ZDEPTH_PORT = 5555
HTTP_PORT = 8000
QUEUE_LIMIT_BYTES = 4 << 20
DEFAULT_INPUT_SIZE = 56  # the smallest legal input: compute is subtracted, keep it short
DEFAULT_LINKS = "1gbit,100mbit"
RTT_PROBES = 50
SEGMENT_HEADER_BYTES = 66  # per TCP segment on the wire: Ethernet 14 + IPv4 20 + TCP 20 + timestamp option 12


@dataclass(frozen=True)
class Link:
    """One shaping of the veth pair: `tbf` with this rate and bucket on both ends."""

    name: str
    rate_bit_s: float
    burst_bytes: int

    def tbf(self) -> list:
        return [
            "tbf",
            "rate",
            f"{int(self.rate_bit_s)}bit",
            "burst",
            str(self.burst_bytes),
            "limit",
            str(QUEUE_LIMIT_BYTES),
        ]

    def floor_ms(self, request_bytes: float, reply_bytes: float, rtt_ms: float) -> float:
        """The least a round trip can take on this link, compute aside: the request's bytes one
        way, then the reply's the other way, at the rate, less what a full bucket lets through
        at once in each direction, plus the RTT."""
        shaped = max(0.0, request_bytes - self.burst_bytes) + max(0.0, reply_bytes - self.burst_bytes)
        return shaped * 8.0 / self.rate_bit_s * 1000.0 + rtt_ms


LINKS = {"1gbit": Link("1 Gbit/s", 1e9, 64 * 1024), "100mbit": Link("100 Mbit/s", 1e8, 16 * 1024)}

# key -> label; the order of the tables. The zdepth rows go through the real `DepthClient`.
ROWS = {
    "cloud_f32": "pointcloud server-side float32",
    "depth_f32": "metric_depth float32",
    "depth_f16": "metric_depth float16",
    "depth_u16": "metric_depth uint16",
    "depth_u16_zstd": "metric_depth uint16 + zstd",
    "cloud_default": "DepthClient.pointcloud() default",
    "http_binary": "HTTP raw-binary point cloud",
    "http_json": "HTTP JSON/base64 point cloud",
}
DEFAULT_CLOUD, HTTP_BINARY = "cloud_default", "http_binary"
# The goals for the default point cloud, as numbers.
OVERHEAD_GOAL_MS = {"100mbit": 45.0, "1gbit": 12.0}  # p50 round trip minus compute
HTTP_BINARY_RATIO_GOAL = 7.0  # at 100 Mbit/s, at least this many times below the HTTP raw-binary cloud
FLOOR_RATIO_GOAL = 1.3  # within this of its own floor on each link


# --- the namespaces (run as root by the bench process) --------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why this bench cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces and shapes a veth link with tc)"
    missing = [tool for tool in ("ip", "tc", "ss") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} (iproute2)" if missing else None


class Namespaces:
    """Two network namespaces joined by a veth pair (each end named after its namespace), the
    addresses existing only inside them. `close()` removes them, which removes the veth too."""

    def __init__(self) -> None:
        tag = f"zdb{os.getpid()}"  # unique per run; at most 15 characters, as interface names must be
        self.server, self.client = f"{tag}s", f"{tag}c"
        self._created: list = []
        try:
            for name in (self.server, self.client):
                _run("ip", "netns", "add", name)
                self._created.append(name)
            _run(
                "ip",
                "link",
                "add",
                self.server,
                "netns",
                self.server,
                "type",
                "veth",
                "peer",
                "name",
                self.client,
                "netns",
                self.client,
            )
            for name, address in ((self.server, SERVER_ADDRESS), (self.client, CLIENT_ADDRESS)):
                _run("ip", "-n", name, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", name)
                _run("ip", "-n", name, "link", "set", name, "up")
                _run("ip", "-n", name, "link", "set", "lo", "up")  # zdepth serve's workers reach its broker locally
        except BaseException:
            self.close()
            raise

    def exec_argv(self, name: str, argv: list) -> list:
        return ["ip", "netns", "exec", name, *[str(a) for a in argv]]

    def netem_available(self) -> bool:
        """Whether this kernel has netem (the only way tc adds delay); tried on the client end."""
        added = (
            subprocess.run(
                ["tc", "-n", self.client, "qdisc", "add", "dev", self.client, "root", "netem", "delay", "1ms"],
                check=False,
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
        if added:
            _run("tc", "-n", self.client, "qdisc", "del", "dev", self.client, "root")
        return added

    def shape(self, link: Link) -> None:
        for name in (self.server, self.client):
            _run("tc", "-n", name, "qdisc", "replace", "dev", name, "root", *link.tbf())

    def drops(self) -> int:
        """Packets the two tbf queues have dropped so far."""
        total = 0
        for name in (self.server, self.client):
            text = _run("tc", "-s", "-n", name, "qdisc", "show", "dev", name).stdout
            total += sum(int(n) for n in re.findall(r"dropped (\d+)", text))
        return total

    def congestion_control(self) -> dict:
        """The TCP congestion control each namespace's connections use (a per-namespace sysctl)."""
        return {
            side: _run("ip", "netns", "exec", name, "cat", "/proc/sys/net/ipv4/tcp_congestion_control").stdout.strip()
            for side, name in (("server", self.server), ("client", self.client))
        }

    def close(self) -> None:
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)
        self._created = []


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- the bench process ----------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--iterations", type=int, help="timed requests per row and link (default 60; --quick: 3)")
    parser.add_argument("--size", help="image size WxH (default 640x480; --quick: 160x120)")
    parser.add_argument(
        "--links",
        default=DEFAULT_LINKS,
        help=f"links to shape, in order, from {sorted(LINKS)} (default {DEFAULT_LINKS})",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=DEFAULT_INPUT_SIZE,
        help=f"model input size (default {DEFAULT_INPUT_SIZE}: compute is subtracted)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="the whole run's time limit; rows get fewer requests to fit (default 900; --quick: 120)",
    )


def run(args) -> dict:
    reason = unavailable()
    if reason:
        print(f"network bench skipped: {reason}", flush=True)
        return {"rows": [], "goals": [], "skipped": reason}
    links = [key.strip() for key in args.links.split(",")]
    unknown = [key for key in links if key not in LINKS]
    if unknown:
        raise SystemExit(f"unknown link(s) {unknown}; choose from {sorted(LINKS)}")
    size = parse_size(args.size or ("160x120" if args.quick else "640x480"))
    iterations = args.iterations or (3 if args.quick else 60)
    deadline = time.monotonic() + (args.deadline_s or (120.0 if args.quick else 900.0))
    http_missing = missing_http_packages()
    notes = (
        [f"HTTP rows left out: {', '.join(http_missing)} not installed (pip install -e '.[bench]')"]
        if http_missing
        else []
    )
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    namespaces = None
    try:
        try:
            namespaces = Namespaces()
        except RuntimeError as exc:  # root without CAP_NET_ADMIN / CAP_SYS_ADMIN, e.g. in a container
            print(f"network bench skipped: cannot create network namespaces: {exc}", flush=True)
            return {"rows": [], "goals": [], "skipped": str(exc)}
        netem = namespaces.netem_available()
        congestion = namespaces.congestion_control()
        notes.append(
            "netem is available but no delay was added"
            if netem
            else "this kernel has no netem (tc qdisc netem fails): no delay added; the RTT is the veth's own"
        )
        for note in notes:
            progress(note)
        with workdir() as tmp:
            measured = measure(namespaces, Path(tmp), links, size, iterations, args.input_size, deadline, http_missing)
    finally:
        if namespaces is not None:
            namespaces.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return report(args, measured, size, iterations, netem, congestion, notes)


def measure(
    namespaces: Namespaces,
    tmp: Path,
    links: list,
    size: tuple,
    iterations: int,
    input_size: int,
    deadline: float,
    http_missing: list,
) -> dict:
    """Start the servers in the server namespace, then per link: shape it, run the client loop in
    the client namespace, collect its JSON. Every process stops before this returns."""
    python = sys.executable
    serve = [
        python,
        "-m",
        "zdepth",
        "serve",
        "--host",
        SERVER_ADDRESS,
        "--port",
        ZDEPTH_PORT,
        "--workers",
        1,
        "--threads",
        1,
        "--random-weights",
        "--log-level",
        "WARNING",
    ]
    http = [
        python,
        REPO / "bench" / "http_baseline.py",
        "--host",
        SERVER_ADDRESS,
        "--port",
        HTTP_PORT,
        "--random-weights",
        "--threads",
        1,
    ]
    progress(
        f"namespaces {namespaces.server} ({SERVER_ADDRESS}) and {namespaces.client} ({CLIENT_ADDRESS}); "
        "starting zdepth serve (1 CPU worker, 1 thread)" + ("" if http_missing else " and the HTTP baseline (1 thread)")
    )
    servers = [Child("zdepth-serve", namespaces.exec_argv(namespaces.server, serve), tmp)]
    try:
        if not http_missing:
            servers.append(Child("http-baseline", namespaces.exec_argv(namespaces.server, http), tmp))
        results = {}
        for i, key in enumerate(links):
            link = LINKS[key]
            namespaces.shape(link)
            drops = namespaces.drops()
            budget = (deadline - time.monotonic()) / (len(links) - i)
            progress(
                f"link {link.name}: tbf burst {link.burst_bytes} B, limit {QUEUE_LIMIT_BYTES} B on both ends; "
                f"client loop in {namespaces.client}, {budget:.0f} s at most"
            )
            argv = [
                python,
                "-m",
                "bench.network",
                "--client-mode",
                "--result-file",
                tmp / f"client-{key}.json",
                "--veth",
                namespaces.client,
                "--size",
                f"{size[0]}x{size[1]}",
                "--iterations",
                iterations,
                "--input-size",
                input_size,
                "--budget-s",
                f"{budget:.1f}",
            ]
            if http_missing:
                argv.append("--no-http")
            results[key] = run_client(namespaces.exec_argv(namespaces.client, argv), servers, tmp, key, budget + 30.0)
            results[key]["tbf_drops"] = namespaces.drops() - drops
        return results
    finally:
        for server in servers:
            server.stop()


def run_client(argv: list, servers: list, tmp: Path, key: str, timeout_s: float) -> dict:
    """The client loop as a child process; its progress lines are relayed. Fails with the
    server's log if a server dies meanwhile, or when it runs past `timeout_s`."""
    with Child(f"client-{key}", argv, tmp) as client:
        seen, stop_at = 0, time.monotonic() + timeout_s
        while True:
            text = client.log_path.read_text(errors="replace")
            print(text[seen:], end="", flush=True)
            seen = len(text)
            if client.proc.poll() is not None:
                break
            dead = next((s for s in servers if s.proc.poll() is not None), None)
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with {dead.proc.returncode}:\n{dead.log_tail()}")
            if time.monotonic() > stop_at:
                raise RuntimeError(
                    f"the client loop on {key} did not finish within {timeout_s:.0f} s:\n{client.log_tail()}"
                )
            time.sleep(0.2)
        if client.proc.returncode != 0:
            raise RuntimeError(
                f"the client loop on {key} failed ({client.proc.returncode}):\n{client.log_tail()}\n"
                + "\n".join(s.log_tail(2000) for s in servers)
            )
    return json.loads((tmp / f"client-{key}.json").read_text())


def report(args, measured: dict, size: tuple, iterations: int, netem: bool, congestion: dict, notes: list) -> dict:
    """Floors, ratios, tables, goals, the plot and the results file."""
    rows = []
    for key, result in measured.items():
        link = LINKS[key]
        for row in result["rows"]:
            floor = link.floor_ms(row["request_wire_bytes"], row["reply_wire_bytes"], result["rtt_ms"])
            rows.append(
                {
                    "link": key,
                    "link_name": link.name,
                    **row,
                    "floor_ms": round(floor, 3),
                    "overhead_vs_floor": round(row["overhead_p50"] / floor, 2),
                }
            )
    width, height = size
    title = f"{width}x{height} JPEG, vits input_size {args.input_size}, random weights, 1 worker thread"
    tables = []
    for key, result in measured.items():
        link = LINKS[key]
        tables.append(
            print_table(
                f"{link.name} (tbf, burst {link.burst_bytes} B), RTT {result['rtt_ms']:.3f} ms, no added delay, "
                f"{result['iterations']} requests per row, {result['tbf_drops']} tbf drops; {title}; ms",
                [
                    "reply",
                    "reply bytes",
                    "request bytes",
                    "rt p50",
                    "rt p99",
                    "compute p50",
                    "rt-c p50",
                    "rt-c p99",
                    "floor",
                    "rt-c p50 / floor",
                ],
                [
                    (
                        r["label"],
                        r["reply_bytes"],
                        r["request_bytes"],
                        r["rt_p50"],
                        r["rt_p99"],
                        r["compute_p50"],
                        r["overhead_p50"],
                        r["overhead_p99"],
                        r["floor_ms"],
                        r["overhead_vs_floor"],
                    )
                    for r in rows
                    if r["link"] == key
                ],
            )
        )
    summary = print_summary(rows, list(measured))
    goals = network_goals(rows, list(measured))
    print_goals(goals)
    plot(rows, list(measured), args.out_dir, title)
    config = {
        "size": f"{width}x{height}",
        "input_size": args.input_size,
        "iterations": iterations,
        "quick": args.quick,
        "addresses": [SERVER_ADDRESS, CLIENT_ADDRESS],
        "queue_limit_bytes": QUEUE_LIMIT_BYTES,
        "netem_available": netem,
        "added_delay_ms": 0.0,
        "tcp_congestion_control": congestion,
        "segment_header_bytes": SEGMENT_HEADER_BYTES,
        "links": {
            key: {
                "rate_bit_s": LINKS[key].rate_bit_s,
                "burst_bytes": LINKS[key].burst_bytes,
                "rtt_ms": r["rtt_ms"],
                "rtt_p99_ms": r["rtt_p99_ms"],
                "iterations": r["iterations"],
                "tbf_drops": r["tbf_drops"],
                "image_bytes": r["image_bytes"],
                "max_z_error_m": r["max_z_error_m"],
                "depth_scale": r["depth_scale"],
            }
            for key, r in measured.items()
        },
    }
    write_results(
        args.out_dir,
        "network",
        {"config": config, "rows": rows, "goals": goals, "notes": notes, "tables": tables, "summary": summary},
    )
    return {"rows": rows, "goals": goals}


def _find(rows: list, link: str, key: str) -> dict | None:
    return next((r for r in rows if r["link"] == link and r["key"] == key), None)


def print_summary(rows: list, links: list) -> str:
    """The issue's table: bytes and rt-c p50 / p99 of each row, links side by side."""
    columns = ["reply", "reply bytes"] + [f"{LINKS[k].name} rt-c p50 / p99 (floor)" for k in links]
    table = []
    for key, label in ROWS.items():
        found = [_find(rows, link, key) for link in links]
        if not any(found):
            continue
        first = next(r for r in found if r)
        table.append(
            (
                label,
                first["reply_bytes"],
                *[
                    f"{r['overhead_p50']:.1f} / {r['overhead_p99']:.1f} ({r['floor_ms']:.1f})" if r else ""
                    for r in found
                ],
            )
        )
    return print_table("Round trip minus compute, ms, p50 / p99 (link floor)", columns, table)


def network_goals(rows: list, links: list) -> list:
    goals = []
    for link in links:
        default, name = _find(rows, link, DEFAULT_CLOUD), LINKS[link].name
        if link in OVERHEAD_GOAL_MS:
            limit = OVERHEAD_GOAL_MS[link]
            goals.append(
                goal(
                    f"{name}: DepthClient.pointcloud() default <= {limit:g} ms p50 round trip minus compute",
                    f"{default['overhead_p50']:.1f} ms",
                    default["overhead_p50"] <= limit,
                )
            )
        if link == "100mbit":
            binary = _find(rows, link, HTTP_BINARY)
            ratio = binary and binary["overhead_p50"] / default["overhead_p50"]
            goals.append(
                goal(
                    f"{name}: default point cloud >= {HTTP_BINARY_RATIO_GOAL:g}x below the HTTP raw-binary cloud",
                    f"{ratio:.1f}x ({binary['overhead_p50']:.1f} vs {default['overhead_p50']:.1f} ms)"
                    if binary
                    else "HTTP baseline not installed",
                    ratio >= HTTP_BINARY_RATIO_GOAL if binary else None,
                )
            )
        goals.append(
            goal(
                f"{name}: default point cloud within {FLOOR_RATIO_GOAL:g}x of its own link floor",
                f"{default['overhead_vs_floor']:.2f}x ({default['overhead_p50']:.1f} vs {default['floor_ms']:.1f} ms)",
                default["overhead_vs_floor"] <= FLOOR_RATIO_GOAL,
            )
        )
    return goals


def plot(rows: list, links: list, out_dir, title: str) -> None:
    """One panel per link: rt-c p50 of every row (whisker to p99) and its floor (black tick), log scale."""
    plt = pyplot()
    if plt is None:
        return
    from matplotlib import ticker

    figure, axes = plt.subplots(1, len(links), figsize=(6 * len(links), 4.5), squeeze=False, sharey=True)
    for axis, link in zip(axes[0], links):
        chosen = [r for r in rows if r["link"] == link]
        labels = [r["label"] for r in chosen]
        p50 = [r["overhead_p50"] for r in chosen]
        whisker = [max(0.0, r["overhead_p99"] - r["overhead_p50"]) for r in chosen]
        colours = ["#d1495b" if r["key"].startswith("http") else "#2e86ab" for r in chosen]
        axis.barh(labels, p50, xerr=[[0] * len(chosen), whisker], color=colours, capsize=2)
        axis.scatter(
            [r["floor_ms"] for r in chosen], labels, marker="|", s=300, color="black", zorder=3, label="link floor"
        )
        for y, (value, extra) in enumerate(zip(p50, whisker)):
            axis.text(value + extra, y, f"  {value:.1f}", va="center", fontsize=7)
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel("ms, log scale: round trip - compute, p50 (whisker to p99)")
        axis.set_title(LINKS[link].name, fontsize=9)
        axis.legend(fontsize=7, loc="best")
    axes[0][0].invert_yaxis()
    figure.suptitle(title, fontsize=9)
    save_figure(plt, figure, out_dir, "network")


# --- the client loop (runs inside the client namespace) -------------------------------------


class Traffic:
    """What crosses the client's veth: the interface's byte counters (sysfs, which `ip netns exec`
    mounts for the namespace it enters) and, summed over the TCP connections to the server,
    payload bytes and segments each way (`ss -ti`: the kernel's tcp_info)."""

    TCP_FIELDS = ("bytes_acked", "bytes_received", "segs_out", "segs_in", "data_segs_out", "data_segs_in")

    def __init__(self, interface: str):
        self.statistics = Path("/sys/class/net") / interface / "statistics"

    def read(self) -> dict:
        totals = {name: int((self.statistics / name).read_text()) for name in ("rx_bytes", "tx_bytes")}
        text = subprocess.run(
            ["ss", "-tinH", "state", "established", "dst", SERVER_ADDRESS],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        for name in self.TCP_FIELDS:
            totals[name] = sum(int(n) for n in re.findall(rf"\b{name}:(\d+)", text))
        return totals

    @staticmethod
    def per_request(before: dict, after: dict) -> dict:
        """One request's bytes: payload each way, the same with its data segments' headers (what
        tbf meters), and a cross-check: the interface's count of received bytes less payload and
        the headers of every segment (ACKs too), about 0 when the model of the wire holds."""
        d = {name: after[name] - before[name] for name in after}
        return {
            "request_bytes": d["bytes_acked"],
            "reply_bytes": d["bytes_received"],
            "request_wire_bytes": d["bytes_acked"] + SEGMENT_HEADER_BYTES * d["data_segs_out"],
            "reply_wire_bytes": d["bytes_received"] + SEGMENT_HEADER_BYTES * d["data_segs_in"],
            "link_rx_bytes": d["rx_bytes"],
            "link_tx_bytes": d["tx_bytes"],
            "unexplained_rx_bytes": d["rx_bytes"] - d["bytes_received"] - SEGMENT_HEADER_BYTES * d["segs_in"],
        }


def wait_for_servers(zdepth, http_clients: dict, stop_at: float) -> None:
    """Until zdepth has a worker and the HTTP baseline answers (they start while this process
    starts), or fail at `stop_at`."""
    while (problem := servers_problem(zdepth, http_clients)) is not None:
        if time.monotonic() > stop_at:
            raise RuntimeError(f"the servers did not answer in time: {problem}")
        time.sleep(0.5)


def servers_problem(zdepth, http_clients: dict) -> str | None:
    from clients import ServerError, Timeout

    binary = http_clients.get(HTTP_BINARY)
    try:
        if not zdepth.health(timeout=1.0).get("workers"):
            return "zdepth has no worker yet"
        if binary is not None:
            binary.connection.request("GET", "/health")
            binary.connection.getresponse().read()
    except (Timeout, ServerError, OSError) as exc:
        if binary is not None:
            binary.connection.close()  # http.client connects again on the next request
        return f"{type(exc).__name__}: {exc}"
    return None


def link_rtt(port: int, samples: int = RTT_PROBES) -> list:
    """Round-trip times of the bare link, ms: TCP connects to a listening port of the server
    (SYN to SYN-ACK, answered by its kernel alone)."""
    times = []
    for _ in range(samples):
        with socket.socket() as probe:
            start = time.perf_counter()
            probe.connect((SERVER_ADDRESS, port))
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def request_calls(zdepth, http_clients: dict, jpeg: bytes, intrinsics: dict, input_size: int) -> dict:
    """key -> a call returning (result, the worker's compute ms), one per row the clients have."""
    calls: dict = {
        "cloud_f32": lambda: zdepth.pointcloud(
            jpeg, intrinsics, server_side=True, output_dtype="float32", compression="none"
        ),
        "depth_f32": lambda: zdepth.metric_depth(jpeg, output_dtype="float32", compression="none"),
        "depth_f16": lambda: zdepth.metric_depth(jpeg, output_dtype="float16", compression="none"),
        "depth_u16": lambda: zdepth.metric_depth(jpeg, output_dtype="uint16", compression="none"),
        "depth_u16_zstd": lambda: zdepth.metric_depth(jpeg, output_dtype="uint16", compression="zstd"),
        "cloud_default": lambda: zdepth.pointcloud(jpeg, intrinsics),
    }
    timed = {key: _with_compute(call) for key, call in calls.items()}
    for key, client in http_clients.items():
        timed[key] = lambda client=client: client.call("pointcloud", jpeg, intrinsics, input_size)
    return timed


def _with_compute(call: Callable) -> Callable:
    def timed() -> tuple:
        result = call()
        return result, compute_ms(result.timing)

    return timed


def client_main(argv: list) -> int:
    """The client loop: wait for the servers, measure the RTT, count each row's bytes on the
    link, then time every row interleaved; results to --result-file as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.network --client-mode")
    parser.add_argument("--client-mode", action="store_true")
    parser.add_argument("--result-file", type=Path, required=True)
    parser.add_argument("--veth", required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--input-size", type=int, required=True)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args(argv)
    from bench.http_baseline import BinaryClient, JsonClient
    from clients import DepthClient

    stop_at = time.monotonic() + args.budget_s
    size = parse_size(args.size)
    jpeg, intrinsics = sample_jpeg(*size), intrinsics_for(*size)
    zdepth = DepthClient(f"tcp://{SERVER_ADDRESS}:{ZDEPTH_PORT}", timeout=120.0, input_size=args.input_size)
    http_clients = (
        {}
        if args.no_http
        else {HTTP_BINARY: BinaryClient(HTTP_PORT, SERVER_ADDRESS), "http_json": JsonClient(HTTP_PORT, SERVER_ADDRESS)}
    )
    try:
        wait_for_servers(zdepth, http_clients, stop_at)
        progress("servers answer; measuring the link's RTT")
        rtt = link_rtt(ZDEPTH_PORT if args.no_http else HTTP_PORT)
        calls = request_calls(zdepth, http_clients, jpeg, intrinsics, args.input_size)
        counted = count_bytes(calls, Traffic(args.veth))
        iterations = fit_iterations(args.iterations, counted["seconds_per_round"], stop_at - time.monotonic())
        cases = [Case(ROWS[key], lambda call=call: call()[1], {"key": key}) for key, call in calls.items()]
        rounds, per_round = split_iterations(iterations)
        progress(f"timing {len(cases)} rows, {rounds} interleaved rounds x {per_round}")
        results = interleave(cases, rounds, per_round, warmup=0, label="network")
    finally:
        zdepth.close()
        for client in http_clients.values():
            client.close()
    rows = [
        {
            "key": case.info["key"],
            "label": case.label,
            **counted["bytes"][case.info["key"]],
            **series.summary(),
            "samples": series.samples(),
        }
        for case, series in results
    ]
    document = {
        "rtt_ms": round(percentile(rtt, 50), 4),
        "rtt_p99_ms": round(percentile(rtt, 99), 4),
        "image_bytes": len(jpeg),
        "iterations": rounds * per_round,
        "max_z_error_m": counted["max_z_error_m"],
        "depth_scale": counted["depth_scale"],
        "rows": rows,
    }
    args.result_file.write_text(json.dumps(document))
    return 0


def count_bytes(calls: dict, traffic: Traffic, repeats: int = 2) -> dict:
    """Each row's bytes per request (the last of `repeats` calls: connections up, models loaded;
    these calls are the warm-up), the seconds one round of all rows takes, and how far the
    default cloud is from the server's float32 cloud."""
    counted, results, seconds = {}, {}, 0.0
    for key, call in calls.items():
        for _ in range(repeats):
            before, start = traffic.read(), time.perf_counter()
            results[key] = call()[0]
            took, after = time.perf_counter() - start, traffic.read()
        seconds += took
        counted[key] = Traffic.per_request(before, after)
    exact, compact = results["cloud_f32"].points[:, 2], results["cloud_default"].points[:, 2]
    valid = compact > 0
    error = float(abs(exact[valid] - compact[valid]).max()) if valid.any() else None
    return {
        "bytes": counted,
        "seconds_per_round": seconds,
        "max_z_error_m": error,
        "depth_scale": results["depth_u16"].scale,
    }


def fit_iterations(wanted: int, seconds_per_round: float, seconds_left: float) -> int:
    """`wanted`, or fewer so that the timed rounds end within the time left (with a margin)."""
    affordable = int(0.8 * seconds_left / max(seconds_per_round, 1e-3))
    if affordable < wanted:
        progress(f"only {max(1, affordable)} requests per row fit in the {seconds_left:.0f} s left (asked {wanted})")
    return max(1, min(wanted, affordable))


if __name__ == "__main__":
    if "--client-mode" in sys.argv[1:]:
        raise SystemExit(client_main(sys.argv[1:]))
    raise SystemExit("run it as `python -m bench network` (this module's own entry point is the client loop)")
