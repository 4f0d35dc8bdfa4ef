"""Reply bytes and codec cost of each wire form of a 640x480 depth map, on one core.

Scenes: the random-weight vits-hypersim model's output for a 640x480 frame at input 56 and at
input 518, and a smooth synthetic room (floor, walls, a box, a ball; what real depth looks
like far more than random weights do). For each scene and wire form: bytes, ratio to float32,
and the median time to encode (quantise + filter + compress, as the worker does) and to decode
(inflate + undo the filter + to float32 metres, as the client does), plus zstd levels 1/3/6 and
uint16 without the delta_row filter, the choices `protocol.ZSTD_LEVEL` and `delta_row` rest on.
Also the client's local back-projection of 640x480 depth (`zdepth.geometry.unproject`).

    python -m bench compression [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zstandard

from bench.common import intrinsics_for, print_table, progress, pyplot, sample_image, save_figure, write_results
from zdepth import protocol as P
from zdepth.compact import quantise_depth, to_metres
from zdepth.geometry import unproject

WIDTH, HEIGHT = 640, 480
LEVELS = (1, 3, 6)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=15, help="timed repetitions of each codec step (median reported)")


def smooth_room(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """z-depth (metres) of a room seen by a level camera 1.2 m above the floor: floor, back wall
    at 6 m, a side wall, a box and a ball. Piecewise smooth, like real depth."""
    K = intrinsics_for(width, height)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    ray_y = (v - K["cy"]) / K["fy"]
    ray_x = (u - K["cx"]) / K["fx"]
    z = np.full((height, width), 6.0)  # back wall
    floor = ray_y > 1e-6
    z[floor] = np.minimum(z[floor], 1.2 / ray_y[floor])
    wall = ray_x < -1e-6
    z[wall] = np.minimum(z[wall], 2.5 / -ray_x[wall])  # left wall 2.5 m away
    box = (np.abs(ray_x - 0.25) < 0.12) & (ray_y > -0.05) & (ray_y < 0.3)
    z[box] = np.minimum(z[box], 3.0)
    cx, cy, r = -0.1, 0.12, 0.08  # a ball 2 m away
    d2 = (ray_x - cx) ** 2 + (ray_y - cy) ** 2
    ball = d2 < r**2
    z[ball] = np.minimum(z[ball], 2.0 - np.sqrt(np.maximum(r**2 - d2[ball], 0)) * 2.0 / r * 0.16)
    return z.astype(np.float32)


def model_depth(input_size: int) -> np.ndarray:
    """The random-weight vits-hypersim output for the bench's 640x480 frame, in metres."""
    from zdepth.engine import Engine
    from zdepth.request import parse_predict

    engine = Engine(device="cpu", random_weights=True, threads=2)
    frame = sample_image(WIDTH, HEIGHT)
    header = P.request_header(
        P.METRIC_DEPTH, image={"frame": 1, "format": "raw", "shape": list(frame.shape)}, input_size=input_size
    )
    request = parse_predict(header, [b"", frame.tobytes()])
    return np.asarray(engine.run([request], [frame])[0].arrays["depth"], dtype=np.float32)


def median_ms(step, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def wire_forms(depth: np.ndarray) -> dict:
    """name -> (encode(), decode(payload)) for every form measured."""

    def shipped(dtype: str, compression: str):
        def encode():
            if dtype == "uint16":
                array, scales = quantise_depth(depth, 0.001)[0], {"depth": 0.001}
            else:
                array, scales = depth.astype(dtype), {"depth": 1.0}
            return P.pack_arrays({"depth": array}, compression=compression, scales=scales)

        def decode(payload):
            described, frames = payload
            desc = described["depth"]
            return to_metres(P.array_from_frames(desc, [b"", *frames]), desc)

        return encode, decode

    def raw_zstd(level: int, delta: bool):
        def encode():
            counts = quantise_depth(depth, 0.001)[0]
            data = P.delta_rows(counts) if delta else counts
            return zstandard.ZstdCompressor(level=level).compress(data.tobytes())

        def decode(payload):
            counts = np.frombuffer(zstandard.ZstdDecompressor().decompress(payload), np.uint16).reshape(depth.shape)
            return (P.undelta_rows(counts) if delta else counts).astype(np.float32) * np.float32(0.001)

        return encode, decode

    forms = {
        f"{dtype} {compression}": shipped(dtype, compression)
        for dtype in P.OUTPUT_DTYPES
        for compression in P.COMPRESSIONS
    }
    forms["uint16 zstd-1, no filter"] = raw_zstd(1, delta=False)
    for level in LEVELS[1:]:
        forms[f"uint16 delta_row zstd-{level}"] = raw_zstd(level, delta=True)
    return forms


def payload_bytes(payload) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    return sum(len(frame) if isinstance(frame, bytes) else memoryview(frame).nbytes for frame in payload[1])


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    rounds = 3 if args.quick else args.rounds
    scenes = {"smooth room": smooth_room()}
    for size in (56,) if args.quick else (56, 518):
        progress(f"model output at input {size}")
        scenes[f"model, input {size}"] = model_depth(size)
    rows, table = [], []
    for scene, depth in scenes.items():
        baseline = depth.nbytes
        for form, (encode, decode) in wire_forms(depth).items():
            payload = encode()
            size = payload_bytes(payload)
            error = float(np.abs(decode(payload) - depth).max())
            encode_ms, decode_ms = median_ms(encode, rounds), median_ms(lambda: decode(payload), rounds)
            rows.append(
                {
                    "scene": scene,
                    "form": form,
                    "bytes": size,
                    "ratio": baseline / size,
                    "max_error_m": error,
                    "encode_ms": encode_ms,
                    "decode_ms": decode_ms,
                }
            )
            table.append(
                (scene, form, f"{size:,}", f"{baseline / size:.1f}x", f"{error * 1000:.2f}", encode_ms, decode_ms)
            )
    print_table(
        "Reply bytes and codec time, 640x480 depth, one core",
        ["scene", "form", "bytes", "vs float32", "max error (mm)", "encode ms", "decode ms"],
        table,
    )
    depth = scenes["smooth room"]
    K = intrinsics_for(WIDTH, HEIGHT)
    unproject_ms = median_ms(lambda: unproject(depth, K), rounds)
    print(f"local back-projection of {WIDTH}x{HEIGHT} depth (zdepth.geometry.unproject): {unproject_ms:.2f} ms\n")
    write_results(
        args.out_dir,
        "compression",
        {"rows": rows, "unproject_ms": unproject_ms, "rounds": rounds, "zstd_level": P.ZSTD_LEVEL},
    )
    plot(rows, args.out_dir)
    return {"rows": rows}


def plot(rows: list, out_dir) -> None:
    plt = pyplot()
    if plt is None:
        return
    scenes = list(dict.fromkeys(r["scene"] for r in rows))
    figure, axes = plt.subplots(1, len(scenes), figsize=(5 * len(scenes), 4.5), sharey=True)
    for ax, scene in zip(np.atleast_1d(axes), scenes):
        mine = [r for r in rows if r["scene"] == scene]
        ax.barh([r["form"] for r in mine], [r["bytes"] / 1000 for r in mine])
        ax.set_xscale("log")
        ax.set_xlabel("kB per 640x480 reply")
        ax.set_title(scene)
    save_figure(plt, figure, out_dir, "compression")
