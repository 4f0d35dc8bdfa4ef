"""Options as dataclasses: each field is one option with its default, its flag and its help.

A field made with `option(...)` is also the command-line flag `--field-name`. `add_arguments`
adds a dataclass's flags to an argparse parser (the defaults come from the dataclass and are
never restated), `from_args` builds the dataclass from the parsed flags, and `to_argv` turns an
instance back into the flags that rebuild it. `zdepth serve` starts each `zdepth worker` with
`to_argv(options)`, so a new worker option is one new field of `WorkerOptions`: `serve`,
`worker` and the argv between them follow by themselves (tests/test_config.py checks it).

Torch-free: the CLI and the broker import it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Collection, Optional

from . import protocol as P
from .fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S
from .logs import FORMATS
from .resize import DEFAULT_MAX_ASPECT, DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_TOKENS

MIB = 1024 * 1024
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # compute precisions; the engine maps them to torch dtypes
DEFAULT_CHECKPOINT_DIR = "checkpoints"
COMPILE_MODES = (
    "off",
    "default",
    "reduce-overhead",
    "max-autotune",
)  # torch.compile's modes (zdepth/compiled.py), or eager
DEFAULT_MAX_GRAPHS = 8


def parse_image_sizes(text: str) -> list[tuple[int, int, int]]:
    """--warmup-shapes: "HxW[@S],..." image sizes in pixels, height first (480x640 is a landscape
    VGA frame), each with the input size S the requests will ask for (default 518) ->
    [(height, width, input_size)]. Raises ValueError naming the bad item."""
    sizes = []
    for item in text.split(","):
        size, _, input_size = item.strip().partition("@")
        height, _, width = size.partition("x")
        try:
            parsed = (int(height), int(width), int(input_size) if input_size else P.DEFAULT_INPUT_SIZE)
        except ValueError:
            raise ValueError(
                f"image size {item.strip()!r}: expected HEIGHTxWIDTH or HEIGHTxWIDTH@INPUT_SIZE, e.g. 480x640@518"
            ) from None
        if min(parsed[:2]) < 1 or not P.MIN_INPUT_SIZE <= parsed[2] <= P.MAX_INPUT_SIZE or parsed[2] % P.PATCH_SIZE:
            raise ValueError(
                f"image size {item.strip()!r}: sides must be positive and the input size a multiple of "
                f"{P.PATCH_SIZE} in [{P.MIN_INPUT_SIZE}, {P.MAX_INPUT_SIZE}]"
            )
        sizes.append(parsed)
    return sizes


def image_sizes_text(text: str) -> str:
    """argparse type for --warmup-shapes: the text, once `parse_image_sizes` accepts it."""
    try:
        parse_image_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def option(default: Any = None, help: str = "", *, factory: Optional[type] = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also the flag `--name` (the field's name, `_` as `-`).

    The flag's kind follows the default: False is a switch (store_true), `factory=list` a
    repeatable flag (append), None needs `type=`, and any other value takes `type(default)`.
    `argparse_kwargs` (choices, metavar, type) go to `add_argument` unchanged. `to_argv`
    writes values with `str()`, so `type` must read that text back."""
    metadata = {"help": help, "argparse": argparse_kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def option_fields(
    cls: type, only: Optional[Collection[str]] = None, exclude: Collection[str] = ()
) -> list[dataclasses.Field]:
    """The option fields of dataclass `cls`, in declaration order, optionally only/except some names."""
    fields = [f for f in dataclasses.fields(cls) if "argparse" in f.metadata]
    if only is not None:
        unknown = set(only) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"{cls.__name__} has no options {sorted(unknown)}")
        fields = [f for f in fields if f.name in only]
    return [f for f in fields if f.name not in exclude]


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, only: Optional[Collection[str]] = None, exclude: Collection[str] = ()
) -> None:
    """Add the flags of dataclass `cls` (see `option`) to `parser`."""
    for f in option_fields(cls, only, exclude):
        kwargs = dict(f.metadata["argparse"])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, bool):
            if default:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
            kwargs.setdefault("action", "store_true")
        elif isinstance(default, list):
            kwargs.setdefault("action", "append")
        elif default is not None:
            kwargs.setdefault("type", type(default))
        elif "type" not in kwargs:
            raise TypeError(f"{cls.__name__}.{f.name}: an option without a default needs type=")
        help = f.metadata["help"]
        if default not in (None, False, []):
            help += " (default: %(default)s)"
        parser.add_argument(flag(f), default=default, help=help, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of dataclass `cls` from parsed flags (every option of `cls` must be in `args`)."""
    values = {f.name: getattr(args, f.name) for f in option_fields(cls)}
    return cls(**{**values, **overrides})


def to_argv(options: Any) -> list[str]:
    """The flags that rebuild `options` through `add_arguments` + `from_args`: switches when
    true, one flag per item of a list, nothing for None."""
    argv: list[str] = []
    for f in option_fields(type(options)):
        value = getattr(options, f.name)
        if isinstance(value, bool):
            argv += [flag(f)] if value else []
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag(f), str(item)]
        elif value is not None:
            argv += [flag(f), str(value)]
    return argv


@dataclass
class WorkerOptions:
    """Everything a worker process starts with: the flags of `zdepth worker`, which `zdepth serve`
    takes too and hands to each worker it starts (only `device` and `threads` differ per worker)."""

    device: str = option("auto", "auto (CUDA if present, else the CPU), cpu, cuda or cuda:N")
    dtype: str = option("fp32", "compute precision; fp16 needs CUDA", choices=DTYPE_NAMES)
    checkpoint_dir: str = option(DEFAULT_CHECKPOINT_DIR, "where the checkpoints are")
    encoder: str = option(P.DEFAULT_ENCODER, "encoder when a request names none", choices=P.ENCODERS)
    preload: list = option(factory=list, help="load at start, e.g. vits:hypersim (repeatable)", metavar="ENC:DATASET")
    max_models: int = option(2, "resident models per worker (LRU)")
    max_batch: int = option(1, "requests per forward pass (dynamic batching; >1 on GPUs)")
    batch_wait_ms: float = option(2.0, "how long a forward pass waits for more requests to batch, ms")
    threads: Optional[int] = option(
        None, "torch threads per worker (serve's default: the CPU cores shared among CPU workers)", type=int
    )
    random_weights: bool = option(
        False, "random models instead of checkpoints (smoke runs; the depth is meaningless; health says so)"
    )
    compile: str = option(
        "off",
        "torch.compile the model: one graph per (model, input shape, batch, dtype); reduce-overhead and "
        "max-autotune replay CUDA graphs on CUDA (fastest batch 1). A compile failure falls back to eager",
        choices=COMPILE_MODES,
    )
    max_graphs: int = option(DEFAULT_MAX_GRAPHS, "compiled graphs held per worker (LRU)")
    warmup_shapes: Optional[str] = option(
        None,
        "image sizes to warm up before the worker counts as ready, HxW[@INPUT_SIZE],... e.g. 480x640,720x1280@518: each preloaded "
        "model runs (with --compile: is compiled) at each size's model input shape and each batch bucket. "
        "Default: one 64x64 frame at input size 518 on a GPU, 56 on the CPU",
        type=image_sizes_text,
        metavar="HxW,...",
    )
    # image_url fetching is off unless hosts are allowed: a URL makes the server connect where the caller says.
    allow_url_host: list = option(
        factory=list,
        help="fetch image_url from HOST (exact name or IP, or *.domain for its subdomains; repeatable). Default: image_url refused",
        metavar="HOST",
    )
    allow_private_urls: bool = option(False, "let allowed hosts resolve to private/loopback/link-local addresses")
    url_max_mb: float = option(DEFAULT_MAX_BYTES / MIB, "largest image_url download, MiB")
    url_timeout: float = option(DEFAULT_TIMEOUT_S, "seconds for a whole image_url download, redirects included")
    hang_timeout: float = option(
        P.HANG_TIMEOUT_S,
        "seconds one compute call may take before its worker counts as hung (the broker answers worker_lost; "
        "the worker exits with status 3 and is restarted)",
    )
    max_image_pixels: int = option(
        P.MAX_IMAGE_PIXELS, "raw shapes (broker) and decoded JPEG/PNG sizes (worker) above it are too_large"
    )
    max_tokens: int = option(
        DEFAULT_MAX_TOKENS,
        "images whose model input after the resize has more patch tokens are too_large (broker: raw shapes; worker: all)",
    )
    max_aspect: float = option(
        DEFAULT_MAX_ASPECT,
        "images whose longer side exceeds this many times the shorter are too_large (broker: raw shapes; worker: all)",
    )
    max_jpeg_scans: int = option(
        DEFAULT_MAX_JPEG_SCANS, "JPEGs with more scans (progressive passes) are too_large before decoding"
    )
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = option("text", "text: key=value lines; json: one object per line", choices=FORMATS)

    def preloaded(self) -> list[tuple[str, str]]:
        """The --preload models as (encoder, dataset); a dataset left out is the default (hypersim)."""
        return [
            (encoder, dataset or P.DEFAULT_DATASET)
            for encoder, _, dataset in (item.partition(":") for item in self.preload)
        ]

    def needed_checkpoints(self) -> list[tuple[str, str]]:
        """What a worker loads: the default model (requests that name none) and the preloaded ones."""
        return list(dict.fromkeys([(self.encoder, P.DEFAULT_DATASET), *self.preloaded()]))


# Worker options that the broker uses too: `zdepth broker` has them, and `zdepth serve` adds them once.
SHARED_WITH_BROKER = ("hang_timeout", "max_image_pixels", "max_tokens", "max_aspect", "log_level", "log_format")
