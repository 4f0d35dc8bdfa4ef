"""The `zdepth` command line: one `build_parser()` with a sub-command per job.

A sub-command is an `add_<name>(commands)` function that adds its parser and sets
`func=<cmd_name>`; `cmd_<name>(args) -> int` does the work and imports torch, OpenCV or the
engine inside itself, so that `import zdepth.cli` (and `zdepth --help`) stays light. Errors
that are the user's to fix print one message on stderr and exit 2, without a traceback.

Also runnable as `python -m zdepth` (see `zdepth/__main__.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__, keys_cli, record, serve, view
from . import protocol as P
from .config import DEFAULT_CHECKPOINT_DIR, WorkerOptions, add_arguments
from .errors import CommandError, UserError
from .protocol import ZDepthError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zdepth", description="Depth Anything V2 over ZeroMQ: metric depth, relative depth, point clouds."
    )
    parser.add_argument("--version", action="version", version=f"zdepth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_predict(commands)
    add_depth(commands)
    add_weights(commands)
    serve.register(commands)
    keys_cli.register(commands)
    record.register(commands)
    view.register(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("zdepth: interrupted", file=sys.stderr)
        return 130
    except (UserError, ZDepthError) as exc:  # the message is the whole story: no traceback
        print(f"zdepth: error: {exc.message if isinstance(exc, ZDepthError) else exc}", file=sys.stderr)
        return 2


# --- zdepth predict and zdepth depth ----------------------------------------------------------

ENV_KEY = "ZDEPTH_API_KEY"  # the API key `zdepth depth` sends, kept off the command line
OUTPUTS = (
    "Writes <stem>_depth.npy (float32, the image's size), <stem>_depth.png (colour-mapped, near is red) "
    "and, with intrinsics, <stem>.ply for each image."
)


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """What to ask for and where the files go: the options `predict` and `depth` share."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    parser.add_argument(
        "--dataset",
        choices=P.DATASETS,
        default=P.DEFAULT_DATASET,
        help="hypersim (indoor), vkitti (outdoor): metric; relative: disparity (default: %(default)s)",
    )
    parser.add_argument("--max-depth", type=float, help="metres; default 20 for hypersim, 80 for vkitti")
    parser.add_argument(
        "--input-size",
        type=int,
        default=P.DEFAULT_INPUT_SIZE,
        help="the model's shorter side, a multiple of 14 (default: %(default)s)",
    )
    parser.add_argument("--fx", type=float, help="focal length in pixels: with it, a point cloud is written too")
    parser.add_argument("--fy", type=float, help="default: fx")
    parser.add_argument("--cx", type=float, help="principal point in pixels; default: width / 2")
    parser.add_argument("--cy", type=float, help="default: height / 2")
    parser.add_argument("--with-color", action="store_true", help="write the pixels' colours into the .ply")
    parser.add_argument("--out", default=".", metavar="DIR", help="output folder (default: the current one)")


def check_request_options(args: argparse.Namespace) -> None:
    """Raise CommandError for request options that do not go together."""
    if args.fx is None and (args.fy, args.cx, args.cy) != (None, None, None):
        raise CommandError("--fy, --cx and --cy need --fx")
    if args.with_color and args.fx is None:
        raise CommandError("--with-color colours the point cloud, which needs --fx")


def intrinsics_for(args: argparse.Namespace, height: int, width: int) -> Optional[dict]:
    """{fx, fy, cx, cy} in pixels from --fx/--fy/--cx/--cy (fy defaults to fx, the centre to the
    image's middle), or None without --fx."""
    if args.fx is None:
        return None
    return {
        "fx": args.fx,
        "fy": args.fy if args.fy is not None else args.fx,
        "cx": args.cx if args.cx is not None else width / 2,
        "cy": args.cy if args.cy is not None else height / 2,
    }


def depth_unit(method: str, dataset: str) -> str:
    """How `predict` and `depth` label the numbers of a depth map."""
    if dataset == "relative":
        return "(disparity)"
    return "(relative, 0..1)" if method == P.REL_DEPTH else "m"


def add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("predict", help="run the model locally on image files", description=OUTPUTS)
    add_request_options(parser)
    parser.add_argument("--encoder", choices=P.ENCODERS, default=P.DEFAULT_ENCODER, help="default: %(default)s")
    parser.add_argument(
        "--rrd",
        metavar="FILE",
        help="also log each image, depth and point cloud to a rerun recording (viewer extra), "
        "entity world/predict, timeline `image`",
    )
    add_arguments(parser, WorkerOptions, only=("checkpoint_dir", "device", "dtype", "random_weights"))
    parser.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    check_request_options(args)

    from .engine import Engine
    from .images import read_image
    from .outputs import summary, write_outputs
    from .request import check_intrinsics

    engine = Engine(args.checkpoint_dir, device=args.device, dtype=args.dtype, random_weights=args.random_weights)
    weights = "random weights" if args.random_weights else args.checkpoint_dir
    print(f"zdepth: {args.encoder}_{args.dataset} on {engine.device} ({args.dtype}, {weights})", file=sys.stderr)
    out = output_folder(args.out)
    metric = args.dataset != "relative"
    rec = view.recording(args.rrd) if args.rrd else None
    failed = []  # an unreadable image is reported and skipped; the others are still computed
    for index, name in enumerate(args.images):
        path = Path(name)
        try:
            image = read_image(path)
        except (OSError, ZDepthError) as exc:
            reason = exc.message if isinstance(exc, ZDepthError) else exc.strerror or exc
            print(f"zdepth: error: cannot read {path}: {reason}", file=sys.stderr)
            failed.append(str(path))
            continue
        height, width = image.shape[:2]
        fields = dict(encoder=args.encoder, dataset=args.dataset, max_depth=args.max_depth, input_size=args.input_size)
        intrinsics = intrinsics_for(args, height, width)
        if intrinsics is None:
            method = P.METRIC_DEPTH if metric else P.REL_DEPTH
            result = engine.predict(method, image, **fields)
            depth = result.arrays["depth"]
        else:
            method = P.POINTCLOUD
            result = engine.predict(method, image, intrinsics=intrinsics, with_color=args.with_color, **fields)
            depth = result.arrays["points"][:, 2].reshape(height, width)
        write_outputs(out, path.stem, depth, metric, result.arrays.get("points"), result.arrays.get("colors"))
        if rec is not None:
            rec.set_time("image", sequence=index)
            view.log_frame(
                rec,
                "world/predict",
                depth,
                None if intrinsics is None else check_intrinsics(intrinsics),
                image[..., ::-1],
            )
        print(summary(str(path), depth, result.min, result.max, depth_unit(method, args.dataset), result.timing))
    if rec is not None:
        rec.disconnect()  # flushes the file
    if failed:
        raise CommandError(f"{len(failed)} of {len(args.images)} images failed: {', '.join(failed)}")
    return 0


def output_folder(name: str) -> Path:
    """The --out folder, created if missing; one clear error when it cannot be."""
    out = Path(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create the output folder {out} (--out): {exc.strerror or exc}") from None
    return out


def add_depth(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "depth",
        help="ask a running server for depth of image files (the same files as predict)",
        description=f"{OUTPUTS} The server computes; this side needs numpy and Pillow only (the `image` extra).",
    )
    add_request_options(parser)
    parser.add_argument(
        "--server",
        default=f"tcp://127.0.0.1:{P.DEFAULT_PORT}",
        help="endpoint (tcp://host:port, ipc://path) or a profile name from servers.yaml (default: %(default)s)",
    )
    parser.add_argument(
        "--key", default=os.environ.get(ENV_KEY), help=f"API key when the server requires one (default: ${ENV_KEY})"
    )
    parser.add_argument(
        "--method",
        choices=sorted(P.PREDICT_METHODS),
        help="default: pointcloud with --fx, else rel_depth for --dataset relative, else metric_depth",
    )
    parser.add_argument("--encoder", choices=P.ENCODERS, help="default: the server's --encoder")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each answer (default: %(default)s)"
    )
    parser.set_defaults(func=cmd_depth)


def cmd_depth(args: argparse.Namespace) -> int:
    check_request_options(args)
    method = args.method or (
        P.POINTCLOUD if args.fx is not None else P.REL_DEPTH if args.dataset == "relative" else P.METRIC_DEPTH
    )
    if method == P.POINTCLOUD and args.fx is None:
        raise CommandError("--method pointcloud needs the intrinsics: --fx (and --fy, --cx, --cy)")

    from PIL import Image

    from clients import DepthClient
    from clients.profiles import client_from_profile

    from .outputs import summary, write_outputs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(
        key=args.key, timeout=args.timeout, encoder=args.encoder, dataset=args.dataset, input_size=args.input_size
    )
    try:
        client = (
            DepthClient(args.server, **options) if "://" in args.server else client_from_profile(args.server, **options)
        )
    except (KeyError, ValueError, OSError) as exc:  # an unknown profile, a bad servers.yaml
        raise CommandError(str(exc).strip('"')) from None
    exact = {"output_dtype": "float32"}  # the model's own float32 depth, as predict writes it (zstd is lossless)
    with client:
        for name in args.images:
            path = Path(name)
            try:
                data = path.read_bytes()
                with Image.open(path) as image:
                    width, height = image.size
            except OSError as exc:
                raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
            if method == P.POINTCLOUD:
                intrinsics = intrinsics_for(args, height, width)
                result = client.pointcloud(data, intrinsics, args.max_depth, args.with_color, **exact)
                depth, points, colors = result.depth, result.points, result.colors
            else:
                ask = client.metric_depth if method == P.METRIC_DEPTH else client.relative_depth
                result = (
                    ask(data, max_depth=args.max_depth, **exact) if method == P.METRIC_DEPTH else ask(data, **exact)
                )
                depth, points, colors = result.depth, None, None
            write_outputs(out, path.stem, depth, args.dataset != "relative", points, colors)
            print(summary(str(path), depth, result.min, result.max, depth_unit(method, args.dataset), result.timing))
    return 0


# --- zdepth weights -------------------------------------------------------------------------


def add_weights(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("weights", help="download or list the official checkpoints")
    actions = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    get = actions.add_parser(
        "get",
        help="download one checkpoint (resumable, verified)",
        description="Downloads into --checkpoint-dir, resuming a partial <file>.part. "
        "ZDEPTH_WEIGHTS_URL=<base> fetches <base>/<file> from a mirror instead of Hugging Face.",
    )
    get.add_argument("encoder", choices=P.ENCODERS, metavar="ENCODER", help=", ".join(P.ENCODERS))
    get.add_argument("--dataset", choices=P.DATASETS, default="hypersim", help="default: %(default)s")
    get.add_argument("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR, help="default: %(default)s")
    get.add_argument("--url", help="the file's full URL (default: the official one, or ZDEPTH_WEIGHTS_URL)")
    get.add_argument("--sha256", help="expected hash of the file at --url (default: the official one, where known)")
    get.set_defaults(func=cmd_weights_get)
    listing = actions.add_parser("list", help="the known checkpoints: file, size, licence, present?")
    listing.add_argument("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR, help="default: %(default)s")
    listing.set_defaults(func=cmd_weights_list)


def cmd_weights_get(args: argparse.Namespace) -> int:
    from .weights import download

    path = download(args.encoder, args.dataset, args.checkpoint_dir, url=args.url, sha256=args.sha256)
    print(path)
    return 0


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB" if size_bytes < 1e9 else f"{size_bytes / 1e9:.2f} GB"


def cmd_weights_list(args: argparse.Namespace) -> int:
    from .checkpoint_files import APPROX_SIZE_BYTES, CHECKPOINTS, find_checkpoint
    from .errors import CheckpointNotFound

    rows = [("ENCODER", "DATASET", "FILE", "SIZE", "LICENCE", "PRESENT")]
    for (encoder, dataset), info in CHECKPOINTS.items():
        size = _size(info["size_bytes"]) if info["size_bytes"] else "~" + _size(APPROX_SIZE_BYTES[encoder])
        try:
            present = "yes" if find_checkpoint(args.checkpoint_dir, encoder, dataset).is_file() else "yes (hf folder)"
        except CheckpointNotFound:
            present = "partial" if (Path(args.checkpoint_dir) / (info["filename"] + ".part")).exists() else "no"
        licence = info["licence"] if info["url"] else f"{info['licence']} (not released)"
        rows.append((encoder, dataset, info["filename"], size, licence, present))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
