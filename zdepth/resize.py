"""The official resize, and the compute budget it lets the broker and the worker check first.

Torch-free (numpy only) so the broker, which never imports torch, can refuse a raw image from
its declared shape alone, and the worker can refuse a decoded one before the model runs.

The model's work grows with its token count, (h / 14) x (w / 14) for the resized input (h, w),
and attention with its square. The resize scales the *shorter* side to `input_size`, so a
small but thin image explodes: a 56 x 2048 PNG of 413 bytes resizes to 518 x 18,942 at input
518, 50,061 tokens (a 640 x 480 frame makes 1,813) and held a CPU worker for minutes. Such
inputs are refused with `too_large` before any compute (docs/limits.md, "Compute").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import protocol as P

DEFAULT_MAX_TOKENS = 24_576  # input 1792 at 4:3 is 128 x 171 = 21,888 tokens; 640x480 at 518: 1,813
DEFAULT_MAX_ASPECT = 8.0  # longer side / shorter side; a 2:1 equirectangular panorama is 2
DEFAULT_MAX_JPEG_SCANS = 64  # decode work grows with the scans; common progressive encoders write about 10


def resized_shape(height: int, width: int, input_size: int) -> tuple[int, int]:
    """The official "lower_bound" resize: both sides scaled by the larger of S/h and S/w, each
    rounded (numpy, half to even) to a multiple of 14, or rounded up if that falls below S."""
    scale = max(input_size / height, input_size / width)

    def side(length: int) -> int:
        target = scale * length
        rounded = int(np.round(target / P.PATCH_SIZE) * P.PATCH_SIZE)
        if rounded < input_size:
            rounded = int(np.ceil(target / P.PATCH_SIZE) * P.PATCH_SIZE)
        return rounded

    return side(height), side(width)


def tokens(height: int, width: int, input_size: int) -> int:
    """Patch tokens the model sees for an (height, width) image at `input_size`."""
    h, w = resized_shape(height, width, input_size)
    return (h // P.PATCH_SIZE) * (w // P.PATCH_SIZE)


@dataclass(frozen=True)
class ComputeLimits:
    """What one image may cost: its token count after the resize and its aspect ratio (checked
    by `check`, in the broker and the worker), and its JPEG scans (checked by the worker's decoder)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS

    def check(self, height: int, width: int, input_size: int) -> None:
        """Raise `too_large` for an (height, width) image, in pixels, that the model must not run on."""
        aspect = max(height, width) / max(1, min(height, width))
        if aspect > self.max_aspect:
            raise P.ZDepthError(
                P.TOO_LARGE,
                f"image is {width}x{height}, aspect ratio {aspect:.1f}; the limit is {self.max_aspect:g} (--max-aspect)",
            )
        count = tokens(height, width, input_size)
        if count > self.max_tokens:
            h, w = resized_shape(height, width, input_size)
            raise P.ZDepthError(
                P.TOO_LARGE,
                f"image {width}x{height} at input_size {input_size} resizes to {w}x{h}, {count} tokens; the limit is {self.max_tokens} "
                "(--max-tokens); send a smaller input_size or image",
            )
