"""Render the README's "See it" figure from a `zdepth view --save` recording, with matplotlib.

The rerun viewer itself could not draw under Xvfb on the machine that made the figure
(software Vulkan showed a black window; GL lacked R32Float render targets), so this draws the
same logged data instead, read back through rerun's own reader:

    python docs/images/render_rrd.py run.rrd STREAM docs/images/see-it.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rerun.chunk import RrdReader  # noqa: E402


def columns(path: str, entity: str) -> dict:
    """name -> list of per-row values (Python objects) over every chunk of `entity`, in frame order."""
    rows: dict = {}
    for chunk in RrdReader(path).stream():
        if chunk.entity_path != entity:
            continue
        batch = chunk.to_record_batch()
        for name in batch.schema.names:
            if name in ("log_time", "capture", "rerun.controls.RowId"):
                continue
            rows.setdefault(name, []).extend(batch.column(name).to_pylist())
    order = np.argsort(rows["frame"])
    return {name: [values[i] for i in order] for name, values in rows.items()}


def main(path: str, stream: str, out: str) -> None:
    depth = columns(path, f"/world/{stream}/cam/depth")
    fmt = depth["DepthImage:format"][-1][0]
    image = np.frombuffer(bytes(depth["DepthImage:buffer"][-1][0]), dtype=np.float32).reshape(
        fmt["height"], fmt["width"]
    )
    points = columns(path, f"/world/{stream}/points")
    xyz = np.asarray(points["Points3D:positions"][-1], dtype=np.float32)
    rgba = np.asarray(points["Points3D:colors"][-1], dtype=np.uint32)
    colors = np.stack([(rgba >> 24) & 255, (rgba >> 16) & 255, (rgba >> 8) & 255], axis=1) / 255.0
    metrics = {name: columns(path, f"/metrics/{stream}/{name}") for name in ("latency_ms", "age_ms", "dropped")}

    fig = plt.figure(figsize=(13, 4.2))
    ax = fig.add_subplot(1, 3, 1)
    shown = ax.imshow(image, cmap="turbo_r")
    fig.colorbar(shown, ax=ax, label="depth (m), DepthImage meter=1.0", fraction=0.036)
    ax.set_title(f"world/{stream}/cam/depth, frame {depth['frame'][-1]}")
    ax.axis("off")
    ax = fig.add_subplot(1, 3, 2, projection="3d")
    step = max(1, len(xyz) // 6000)
    ax.scatter(xyz[::step, 0], xyz[::step, 2], -xyz[::step, 1], c=colors[::step], s=1.5)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("z (m)")
    ax.set_zlabel("-y (m)")
    ax.set_title(f"world/{stream}/points ({len(xyz)} points)")
    ax = fig.add_subplot(1, 3, 3)
    for name in ("latency_ms", "age_ms"):
        frames = metrics[name]["frame"]
        ax.plot(frames, [v[0] for v in metrics[name]["Scalars:scalars"]], marker="o", label=f"metrics/{stream}/{name}")
    ax.set_xlabel("frame (seq)")
    ax.set_ylabel("ms")
    drops = ax.twinx()
    drops.step(
        metrics["dropped"]["frame"], [v[0] for v in metrics["dropped"]["Scalars:scalars"]], color="grey", where="post"
    )
    drops.set_ylabel("dropped (cumulative)", color="grey")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("latency and drops")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(*sys.argv[1:4])
