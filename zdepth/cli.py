"""The `zdepth` command line: one `build_parser()` with a sub-command per job.

A sub-command is an `add_<name>(commands)` function that adds its parser and sets
`func=<cmd_name>`; `cmd_<name>(args) -> int` does the work and imports torch, OpenCV or the
engine inside itself, so that `import zdepth.cli` (and `zdepth --help`) stays light. Errors
that are the user's to fix print one message on stderr and exit 2, without a traceback.

Also runnable as `python -m zdepth` (see `zdepth/__main__.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from . import protocol as P
from . import keys_cli, record, serve, view
from .protocol import ZDepthError

DTYPE_NAMES = ("fp32", "fp16", "bf16")


class CommandError(Exception):
    """A command-line mistake found after parsing (a missing file, options that do not go together)."""


# Errors whose message is the whole story, by the module that defines them. Looked up in
# sys.modules rather than imported: a module nobody imported cannot have raised its error,
# and importing it here would pull in torch.
USER_ERRORS = (
    ("zdepth.engine", "ConfigError"),
    ("zdepth.model.checkpoints", "CheckpointError"),
    ("zdepth.weights", "DownloadError"),
    ("zdepth.keys_cli", "KeysError"),
    ("zdepth.stream_tools", "StreamOptionsError"),
)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (ZDepthError, CommandError)):
        return True
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zdepth", description="Depth Anything V2 over ZeroMQ: metric depth, relative depth, point clouds.")
    parser.add_argument("--version", action="version", version=f"zdepth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_predict(commands)
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
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"zdepth: error: {exc.message if isinstance(exc, ZDepthError) else exc}", file=sys.stderr)
        return 2


# --- zdepth predict -------------------------------------------------------------------------


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The options that build an Engine (shared with the commands that run one)."""
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where the .pth files are (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="compute precision; fp16 needs CUDA (default: %(default)s)")
    parser.add_argument("--random-weights", action="store_true", help="random models instead of checkpoints (smoke tests; the depth is meaningless)")


def add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict",
        help="run the model locally on image files",
        description="Writes <stem>_depth.npy (float32, the image's size), <stem>_depth.png (colour-mapped, near is red) "
        "and, with intrinsics, <stem>.ply for each image.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    parser.add_argument("--encoder", choices=P.ENCODERS, default="vits", help="default: %(default)s")
    parser.add_argument("--dataset", choices=P.DATASETS, default="hypersim", help="hypersim (indoor), vkitti (outdoor): metric; relative: disparity (default: %(default)s)")
    parser.add_argument("--max-depth", type=float, help="metres; default 20 for hypersim, 80 for vkitti")
    parser.add_argument("--input-size", type=int, default=P.DEFAULT_INPUT_SIZE, help="the model's shorter side, a multiple of 14 (default: %(default)s)")
    parser.add_argument("--fx", type=float, help="focal length in pixels: with it, a point cloud is written too")
    parser.add_argument("--fy", type=float, help="default: fx")
    parser.add_argument("--cx", type=float, help="principal point in pixels; default: width / 2")
    parser.add_argument("--cy", type=float, help="default: height / 2")
    parser.add_argument("--with-color", action="store_true", help="write the pixels' colours into the .ply")
    parser.add_argument("--out", default=".", metavar="DIR", help="output folder (default: the current one)")
    parser.add_argument("--rrd", metavar="FILE", help="also log each image, depth and point cloud to a rerun recording (viewer extra), "
                        "entity world/predict, timeline `image`")
    add_engine_options(parser)
    parser.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.fx is None and (args.fy, args.cx, args.cy) != (None, None, None):
        raise CommandError("--fy, --cx and --cy need --fx")
    if args.with_color and args.fx is None:
        raise CommandError("--with-color colours the point cloud, which needs --fx")

    import numpy as np

    from .engine import Engine
    from .geometry import colorize, write_ply
    from .images import encode_png, read_image
    from .request import check_intrinsics

    engine = Engine(args.checkpoint_dir, device=args.device, dtype=args.dtype, random_weights=args.random_weights)
    weights = "random weights" if args.random_weights else args.checkpoint_dir
    print(f"zdepth: {args.encoder}_{args.dataset} on {engine.device} ({args.dtype}, {weights})", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = args.dataset != "relative"
    rec = view.recording(args.rrd) if args.rrd else None
    for index, name in enumerate(args.images):
        path = Path(name)
        try:
            image = read_image(path)
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
        height, width = image.shape[:2]
        fields = dict(encoder=args.encoder, dataset=args.dataset, max_depth=args.max_depth, input_size=args.input_size)
        if args.fx is None:
            result = engine.predict(P.METRIC_DEPTH if metric else P.REL_DEPTH, image, **fields)
            depth = result.arrays["depth"]
        else:
            intrinsics = {
                "fx": args.fx,
                "fy": args.fy if args.fy is not None else args.fx,
                "cx": args.cx if args.cx is not None else width / 2,
                "cy": args.cy if args.cy is not None else height / 2,
            }
            result = engine.predict(P.POINTCLOUD, image, intrinsics=intrinsics, with_color=args.with_color, **fields)
            depth = result.arrays["points"][:, 2].reshape(height, width)
            write_ply(out / f"{path.stem}.ply", result.arrays["points"], result.arrays.get("colors"))
        np.save(out / f"{path.stem}_depth.npy", depth.astype(np.float32))
        if rec is not None:
            rec.set_time("image", sequence=index)
            view.log_frame(rec, "world/predict", depth, None if args.fx is None else check_intrinsics(intrinsics), image[..., ::-1])
        (out / f"{path.stem}_depth.png").write_bytes(encode_png(colorize(depth, invert=metric)[..., ::-1]))
        timing = " ".join(f"{k[:-3]} {v:.1f}" for k, v in result.timing.items())
        unit = "m" if metric else "(disparity)"
        print(f"{path}: {width}x{height} depth {result.min:.3f}..{result.max:.3f} {unit}, ms: {timing}")
    if rec is not None:
        rec.disconnect()  # flushes the file
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
    get.add_argument("--checkpoint-dir", default="checkpoints", help="default: %(default)s")
    get.add_argument("--url", help="the file's full URL (default: the official one, or ZDEPTH_WEIGHTS_URL)")
    get.add_argument("--sha256", help="expected hash of the file at --url (default: the official one, where known)")
    get.set_defaults(func=cmd_weights_get)
    listing = actions.add_parser("list", help="the known checkpoints: file, size, licence, present?")
    listing.add_argument("--checkpoint-dir", default="checkpoints", help="default: %(default)s")
    listing.set_defaults(func=cmd_weights_list)


def cmd_weights_get(args: argparse.Namespace) -> int:
    from .weights import download

    path = download(args.encoder, args.dataset, args.checkpoint_dir, url=args.url, sha256=args.sha256)
    print(path)
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    from .model.checkpoints import CHECKPOINTS, CheckpointNotFound, find_checkpoint

    rows = [("ENCODER", "DATASET", "FILE", "SIZE", "LICENCE", "PRESENT")]
    for (encoder, dataset), info in CHECKPOINTS.items():
        size = f"{info['size_bytes'] / 1e6:.1f} MB" if info["size_bytes"] else "?"
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

