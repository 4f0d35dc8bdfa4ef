"""The files `zdepth predict` (the model here) and `zdepth depth` (a server) write for each image.

`<stem>_depth.npy`: float32 (H, W), the image's size; metres for metric depth. `<stem>_depth.png`:
the map colour-mapped (Turbo, near is red). `<stem>.ply`: the point cloud, when there is one.
numpy and Pillow only (the `image` extra), so a client-only install can write them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .geometry import colorize, write_ply


def write_outputs(
    out: Path,
    stem: str,
    depth: np.ndarray,
    invert: bool,
    points: Optional[np.ndarray] = None,
    colors: Optional[np.ndarray] = None,
) -> list[Path]:
    """Write `<stem>_depth.npy`, `<stem>_depth.png` and, with `points` (float32 (H*W, 3)) and
    optional `colors` (uint8 RGB (H*W, 3)), `<stem>.ply` into the folder `out`. `invert`: the map
    is depth (near is small), so the colours are swapped to keep near red; disparity is not.
    Returns the paths written."""
    from PIL import Image

    paths = [out / f"{stem}_depth.npy", out / f"{stem}_depth.png"]
    np.save(paths[0], np.asarray(depth, dtype=np.float32))
    Image.fromarray(colorize(depth, invert=invert)).save(paths[1])
    if points is not None:
        paths.append(out / f"{stem}.ply")
        write_ply(paths[2], points, colors)
    return paths


def summary(name: str, depth: np.ndarray, low: float, high: float, unit: str, timing: Mapping[str, float]) -> str:
    """One line per image: `frame.jpg: 640x480 depth 0.512..7.300 m, ms: pre 3.1 inference 80.2 post 1.0`."""
    height, width = depth.shape
    times = " ".join(f"{k[:-3] if k.endswith('_ms') else k} {v:.1f}" for k, v in timing.items())
    return f"{name}: {width}x{height} depth {low:.3f}..{high:.3f} {unit}, ms: {times}"
