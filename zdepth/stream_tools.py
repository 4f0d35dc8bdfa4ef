"""What `zdepth record` and `zdepth view` share: the camera's intrinsics from the command
line, and a bounded loop over a stream's results that ends cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .camera import load_camera_info_yaml, scaled_intrinsics
from .errors import CommandError
from .request import Intrinsics, check_intrinsics

IntrinsicsFor = Callable[[int, int], Optional[Intrinsics]]


def require_extra(extra: str, *modules: str) -> None:
    """Raise CommandError naming the pip extra when one of `modules` is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandError(f"this command needs {', '.join(missing)}: pip install 'zdepth[{extra}]'")


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    """--pub, the bounds (--frames, --seconds) and the camera (--fx/--fy/--cx/--cy or --camera-info)."""
    from clients.stream import DEFAULT_RESULTS

    parser.add_argument(
        "--pub",
        default=DEFAULT_RESULTS,
        metavar="ENDPOINT",
        help="the broker's results PUB socket (default: %(default)s)",
    )
    parser.add_argument("--frames", type=int, metavar="N", help="stop after N results (default: no limit)")
    parser.add_argument(
        "--seconds", type=float, metavar="S", help="stop after S seconds (default: no limit; Ctrl-C stops cleanly)"
    )
    camera = parser.add_argument_group(
        "camera", "the stream's intrinsics (the PUB socket does not carry them); without them there is no point cloud"
    )
    camera.add_argument("--fx", type=float, help="focal length in pixels of the frames as sent; with --fy, --cx, --cy")
    camera.add_argument("--fy", type=float)
    camera.add_argument("--cx", type=float)
    camera.add_argument("--cy", type=float)
    camera.add_argument(
        "--camera-info",
        type=Path,
        metavar="FILE.yaml",
        help="a ROS camera_info YAML (camera_calibration_parsers); K is scaled to each frame's size",
    )


def intrinsics_from_args(args: argparse.Namespace) -> IntrinsicsFor:
    """(height, width) -> the intrinsics for a frame of that size, or None without a camera.
    Raises CommandError for an incomplete --fx/--fy/--cx/--cy, both kinds of camera or an
    unreadable file, ZDepthError(bad_request) for a file that is not a camera_info."""
    given = [args.fx, args.fy, args.cx, args.cy]
    if any(v is not None for v in given) and None in given:
        raise CommandError("--fx, --fy, --cx and --cy go together")
    if args.camera_info is not None:
        if args.fx is not None:
            raise CommandError("give --fx/--fy/--cx/--cy or --camera-info, not both")
        try:
            text = args.camera_info.read_text()
        except OSError as exc:
            raise CommandError(f"cannot read {args.camera_info}: {exc.strerror or exc}") from None
        info = load_camera_info_yaml(text)
        return lambda height, width: scaled_intrinsics(info, height, width)
    if args.fx is None:
        return lambda height, width: None
    intrinsics = check_intrinsics({"fx": args.fx, "fy": args.fy, "cx": args.cx, "cy": args.cy})
    return lambda height, width: intrinsics


def bounded_results(subscriber: Any, frames: Optional[int], seconds: Optional[float]) -> Iterator[Any]:
    """Every result `subscriber` receives (DepthSubscriber.recv), until `frames` were yielded,
    `seconds` passed, or SIGINT/SIGTERM arrived (handled while iterating: the caller then
    closes its files normally)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if seconds is None else time.monotonic() + seconds
    count = 0
    try:
        while not stop.is_set() and (frames is None or count < frames):
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                break
            result = subscriber.recv(timeout=wait)
            if result is not None:
                count += 1
                yield result
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
