"""Depth-map geometry in plain numpy: back-projection, PLY files, colour maps.

Numpy only (no torch, no OpenCV) because robot clients import it to turn a received depth map
into points themselves. The engine computes the same back-projection in torch on its device;
`tests/test_engine.py` checks that the two agree.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from .request import Intrinsics, check_intrinsics


def pixel_rays(height: int, width: int, intrinsics: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """The per-column factor (u - cx) / fx (shape (W,)) and per-row factor (v - cy) / fy (shape (H,)),
    in float32: multiplied by z they give x and y."""
    u = (np.arange(width, dtype=np.float32) - np.float32(intrinsics.cx)) / np.float32(intrinsics.fx)
    v = (np.arange(height, dtype=np.float32) - np.float32(intrinsics.cy)) / np.float32(intrinsics.fy)
    return u, v


def unproject(depth: np.ndarray, intrinsics: Any) -> np.ndarray:
    """Pinhole back-projection of a planar z-depth map, as in the official depth_to_pointcloud.py.

    For pixel (u, v) with depth z: x = (u - cx) / fx * z, y = (v - cy) / fy * z. Returns float32
    (H*W, 3), row-major pixel order (v outer, u inner); x right, y down, z forward.
    `intrinsics` is an `Intrinsics` or a mapping {fx, fy, cx, cy} in pixels of this depth map.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D (H, W) array, got shape {depth.shape}")
    u, v = pixel_rays(depth.shape[0], depth.shape[1], check_intrinsics(intrinsics))
    points = np.empty(depth.shape + (3,), dtype=np.float32)
    np.multiply(u[None, :], depth, out=points[..., 0])
    np.multiply(v[:, None], depth, out=points[..., 1])
    points[..., 2] = depth
    return points.reshape(-1, 3)


def write_ply(path: str | os.PathLike, points: np.ndarray, colors: Optional[np.ndarray] = None) -> None:
    """Write a binary little-endian PLY: float32 x y z and, with `colors`, uint8 red green blue.

    Binary rather than ASCII because a 640x480 cloud is 307,200 vertices: 3.7 MB instead of
    about 10 MB of text, and written in one call. Open3D, MeshLab and CloudCompare read it.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != points.shape or colors.dtype != np.uint8:
            raise ValueError(f"colors must be uint8 with shape {points.shape}, got {colors.dtype} {colors.shape}")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(len(points), dtype=fields)
    for axis, name in enumerate("xyz"):
        vertices[name] = points[:, axis]
    if colors is not None:
        for channel, name in enumerate(("red", "green", "blue")):
            vertices[name] = colors[:, channel]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}"]
    header += [f"property {'float' if kind == '<f4' else 'uchar'} {name}" for name, kind in fields]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertices.tobytes())


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read back a PLY written by `write_ply`: (points float32 (N, 3), colors uint8 (N, 3) or None)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    if lines[:2] != ["ply", "format binary_little_endian 1.0"]:
        raise ValueError(f"{path} is not a binary little-endian PLY")
    count = int(next(line.split()[2] for line in lines if line.startswith("element vertex")))
    names = [line.split()[2] for line in lines if line.startswith("property")]
    fields = [(name, "<f4" if name in "xyz" else "u1") for name in names]
    vertices = np.frombuffer(data, dtype=fields, count=count, offset=end)
    points = np.stack([vertices[n] for n in "xyz"], axis=1)
    colors = np.stack([vertices[n] for n in ("red", "green", "blue")], axis=1) if "red" in names else None
    return points, colors


def _turbo_lut() -> np.ndarray:
    """Google's Turbo colour map as a 256x3 uint8 table, from its published polynomial fit
    (Mikhailov, 2019): smooth blue -> green -> red, and no matplotlib needed. The fit is loose
    at the very ends (near-black rather than Turbo's dark blue and dark red)."""
    t = np.linspace(0.0, 1.0, 256)
    powers = np.stack([t**k for k in range(6)], axis=1)
    coefficients = np.array(
        [
            [0.13572138, 0.09140261, 0.10667330],
            [4.61539260, 2.19418839, 12.64194608],
            [-42.66032258, 4.84296658, -60.58204836],
            [132.13108234, -14.18503333, 110.36276771],
            [-152.94239396, 4.27729857, -89.90310912],
            [59.28637943, 2.82956604, 27.34824973],
        ]
    )
    return np.round(np.clip(powers @ coefficients, 0.0, 1.0) * 255).astype(np.uint8)


TURBO = _turbo_lut()


def colorize(depth: np.ndarray, invert: bool = False) -> np.ndarray:
    """A depth or disparity map as an RGB uint8 (H, W, 3) image, Turbo colour map (low blue, high red).

    Normalised per image from its own min to max, like the official visualisation, so only the
    shape of the map shows, not its scale. `invert=True` swaps the ends: use it for metric depth
    so that near is red, as it is for disparity. Non-finite pixels are black; a constant map is
    all the low colour.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D (H, W) array, got shape {depth.shape}")
    finite = np.isfinite(depth)
    if not finite.any():
        return np.zeros(depth.shape + (3,), dtype=np.uint8)
    low, high = float(depth[finite].min()), float(depth[finite].max())
    scale = 255.0 / (high - low) if high > low else 0.0
    index = np.clip((np.where(finite, depth, low) - low) * scale, 0, 255)
    index = np.rint(index).astype(np.uint8)
    if invert:
        index = 255 - index
    image = TURBO[index]
    image[~finite] = 0
    return image
