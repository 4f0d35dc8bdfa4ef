"""Compact depth for the wire: float32 metres -> uint16 counts, and the checks every reply form needs.

Torch-free, so the worker and the tests share one definition of the quantisation:

    count = rint(z / depth_scale)        computed in IEEE float32, round half to even
    z     = count * depth_scale          metres; count 0 = no valid depth (ROS REP 118)

A count outside 1..65535 (a depth below half a count or above 65535 counts, or not finite)
is sent as 0 and counted in the reply's `out_of_range`: nothing wraps silently. The error of
a valid pixel is at most half a count (0.5 mm at the default 1 mm). `docs/protocol.md`
section 3.3 is the specification for client writers.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import protocol as P
from .request import PredictRequest


def quantise_depth(depth: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """float32 metres (H, W) -> (uint16 counts (H, W), number of pixels that did not fit and are 0).

    `scale` is metres per count (`depth_scale`)."""
    counts = np.rint(np.asarray(depth, dtype=np.float32) / np.float32(scale))
    fits = (counts >= 1) & (counts <= P.DEPTH_COUNT_MAX)  # NaN compares false: it does not fit
    out_of_range = int(counts.size - np.count_nonzero(fits))
    if out_of_range:
        counts[~fits] = 0
    return counts.astype(np.uint16), out_of_range


def depth_metres(counts: np.ndarray, scale: float) -> np.ndarray:
    """uint16 counts -> float32 metres (count x scale; 0 stays 0, meaning no valid depth)."""
    return counts.astype(np.float32) * np.float32(scale)


def wire_arrays(request: PredictRequest, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """The engine's arrays -> (arrays to send, scale of each, extra reply header fields).

    uint16 requests get their depth quantised (`out_of_range` in the header). float16 values
    that overflowed to infinity are refused with `bad_request` rather than sent: a robot
    must never read +inf as a distance."""
    out = dict(arrays)
    scales = {name: 1.0 for name in ("depth", "points") if name in out}
    fields: dict = {}
    for name in scales:
        if out[name].dtype == np.float16 and not np.isfinite(out[name]).all():
            raise P.bad_request(
                f"`{name}` has values beyond float16's range (±{P.FLOAT16_MAX:g}); ask for float32 or a smaller max_depth"
            )
    if request.output_dtype == "uint16":
        out["depth"], fields["out_of_range"] = quantise_depth(out["depth"], request.depth_scale)
        scales["depth"] = request.depth_scale
    return out, scales, fields


def to_metres(array: np.ndarray, desc: Mapping) -> np.ndarray:
    """A received `depth` or `points` array in any wire form -> float32 (metres for metric methods).

    uint16 counts are multiplied by the descriptor's `scale` (0 stays 0: no valid depth);
    float16 is widened; float32 with scale 1 (or none, from an older server) is returned as it is,
    without a copy. Raises `bad_request` for a scale that is not a finite number > 0."""
    scale = desc.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise P.bad_request(f"array `scale` must be a finite number > 0, got {P.short_repr(scale)}")
    if array.dtype == np.uint16:
        return depth_metres(array, scale)
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    return array if scale == 1.0 else array * np.float32(scale)
