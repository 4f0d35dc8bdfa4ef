"""`zdepth view`: live streams in the rerun viewer (the `viewer` extra, rerun-sdk); also the
`.rrd` logging behind `zdepth predict --rrd`.

Per stream S, entities (timelines `frame` = the result's seq, `capture` = its t_capture):

    world/S               view coordinates RDF (x right, y down, z forward: the optical frame)
    world/S/cam           rr.Pinhole (with a camera: --fx/--fy/--cx/--cy or --camera-info)
    world/S/cam/depth     rr.DepthImage in metres (meter=1.0)
    world/S/cam/image     rr.Image, the camera's RGB, only when the result carries `colors`
                          (the PUB socket does not carry the camera frame itself)
    world/S/points        rr.Points3D of the valid pixels, coloured by the camera's RGB when
                          present, else by depth (Turbo, near is red) (with a camera; a
                          pointcloud stream's own points, without the camera and depth)
    metrics/S/latency_ms  capture -> result done (broker clock), ms
    metrics/S/age_ms      capture -> arrival here, ms
    metrics/S/dropped     frames the broker dropped for S so far (cumulative)

`--save FILE.rrd` writes a file and opens no window; otherwise a viewer is spawned.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import numpy as np

from .geometry import colorize, unproject
from .request import Intrinsics
from .stream_tools import add_stream_options, bounded_results, intrinsics_from_args, require_extra

APPLICATION_ID = "zdepth"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "view",
        help="show live streams in the rerun viewer (or record them to an .rrd file)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stream", action="append", required=True, metavar="NAME", help="a stream to show; repeat for more"
    )
    parser.add_argument("--save", metavar="FILE.rrd", help="write a rerun recording instead of opening a viewer")
    add_stream_options(parser)
    parser.set_defaults(func=cmd_view)


def recording(save: Optional[str]) -> Any:
    """A rerun RecordingStream writing to `save` (an .rrd path), or to a spawned viewer.
    Raises CommandError without the `viewer` extra."""
    require_extra("viewer", "rerun")
    import rerun as rr

    stream = rr.RecordingStream(APPLICATION_ID)
    if save:
        stream.save(save)
    else:
        stream.spawn()
    return stream


def log_frame(
    rec: Any, entity: str, depth: np.ndarray, intrinsics: Optional[Intrinsics], rgb: Optional[np.ndarray] = None
) -> None:
    """Log one depth map in metres, float (H, W) under `entity` (see the module docstring):
    camera, depth image, the camera's RGB uint8 (H, W, 3) if given, and the coloured points."""
    import rerun as rr

    depth = np.asarray(depth, dtype=np.float32)
    height, width = depth.shape
    rec.log(f"{entity}/cam/depth", rr.DepthImage(depth, meter=1.0))
    if rgb is not None:
        rec.log(f"{entity}/cam/image", rr.Image(rgb, color_model="RGB"))
    if intrinsics is None:
        return
    k = [[intrinsics.fx, 0.0, intrinsics.cx], [0.0, intrinsics.fy, intrinsics.cy], [0.0, 0.0, 1.0]]
    rec.log(f"{entity}/cam", rr.Pinhole(image_from_camera=k, resolution=[width, height]))
    log_points(rec, entity, unproject(depth, intrinsics), rgb if rgb is not None else colorize(depth, invert=True))


def log_points(rec: Any, entity: str, points: np.ndarray, colors: Optional[np.ndarray] = None) -> None:
    """Log float (N, 3) points (those with a finite z > 0) as `entity`/points, coloured by uint8
    RGB (N, 3) or (H, W, 3) when given, else by depth (Turbo, near is red)."""
    import rerun as rr

    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    if colors is None:
        colors = colorize(points[None, :, 2], invert=True)
    valid = np.isfinite(points).all(axis=1) & (points[:, 2] > 0)
    rec.log(f"{entity}/points", rr.Points3D(points[valid], colors=np.asarray(colors).reshape(-1, 3)[valid]))


def cmd_view(args: argparse.Namespace) -> int:
    from clients import DepthSubscriber

    intrinsics_for = intrinsics_from_args(args)
    rec = recording(args.save)
    import rerun as rr  # present: recording() checked

    for name in args.stream:
        rec.log(f"world/{name}", rr.ViewCoordinates.RDF, static=True)
    dropped: dict[str, int] = dict.fromkeys(args.stream, 0)
    shown = 0
    with DepthSubscriber(args.pub, args.stream) as subscriber:
        for result in bounded_results(subscriber, args.frames, args.seconds):
            name = result.stream
            dropped[name] = dropped.get(name, 0) + result.dropped
            rec.set_time("frame", sequence=result.seq or 0)
            if result.t_capture is not None:
                rec.set_time("capture", timestamp=result.t_capture)
            rec.log(f"metrics/{name}/dropped", rr.Scalars(dropped[name]))
            if result.latency_ms is not None:
                rec.log(f"metrics/{name}/latency_ms", rr.Scalars(result.latency_ms))
            if result.age_ms is not None:
                rec.log(f"metrics/{name}/age_ms", rr.Scalars(result.age_ms))
            if result.ok and result.depth is None and result.points is not None:  # a pointcloud stream
                log_points(rec, f"world/{name}", result.points, result.colors)
                shown += 1
            if not result.ok or result.depth is None:
                continue
            height, width = result.depth.shape
            rgb = None if result.colors is None else np.asarray(result.colors).reshape(height, width, 3)
            log_frame(rec, f"world/{name}", result.depth, intrinsics_for(height, width), rgb)
            shown += 1
    rec.flush()
    rec.disconnect()
    print(
        f"zdepth: logged {shown} frames from {', '.join(args.stream)}" + (f" to {args.save}" if args.save else ""),
        file=sys.stderr,
    )
    return 0
