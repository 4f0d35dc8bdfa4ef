"""Try every method of a zdepth server through the old client's functions, like the HTTP API's
`test_api_client.py`: health, point cloud, metric depth, relative depth, and (with --key) that a
wrong key is refused. Saves colour-mapped depth PNGs and a .ply point cloud, prints a summary.

    python clients/examples/test_api_client.py --server tcp://127.0.0.1:5555 --image frame.jpg \
        --intrinsics clients/examples/camera.yaml --out zdepth-out [--key sk-...]

`--server` may also be a profile name from servers.yaml (e.g. `local`, `lab`).
Needs pyzmq, msgpack, numpy and pyyaml; PIL for the PNGs (without it the depth maps are saved
as .npy arrays).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from clients import ServerError, get_health, predict_metric_depth, predict_pointcloud, predict_relative_depth
from zdepth.geometry import colorize, write_ply

HERE = Path(__file__).resolve().parent


def load_intrinsics(path: Path) -> dict:
    """{fx, fy, cx, cy} from a YAML file like camera.yaml."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return {name: float(data[name]) for name in ("fx", "fy", "cx", "cy")}


def save_depth(depth: np.ndarray, stem: Path) -> Path:
    """Near = red colour map as PNG when PIL is there, else the raw array as .npy."""
    try:
        from PIL import Image
    except ImportError:
        np.save(stem.with_suffix(".npy"), depth)
        return stem.with_suffix(".npy")
    Image.fromarray(colorize(depth, invert=True)).save(stem.with_suffix(".png"))
    return stem.with_suffix(".png")


def summary(name: str, result: dict, seconds: float) -> str:
    timing = ", ".join(f"{k} {v:.1f}" for k, v in (result.get("timing") or {}).items())
    return (
        f"{name:<15} shape {result['shape']}  min {result['min']:.3f}  max {result['max']:.3f}  "
        f"model {result['model']}  round trip {seconds * 1000:.1f} ms  (server: {timing})"
    )


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="tcp://127.0.0.1:5555", help="endpoint or servers.yaml profile name")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--intrinsics", type=Path, default=HERE / "camera.yaml")
    parser.add_argument("--key", default=None, help="API key (a profile may supply it)")
    parser.add_argument("--max-depth", type=float, default=None, help="metres; default: the model's range")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per call, retries included (default: the profile's, else the client's)",
    )
    parser.add_argument("--out", type=Path, default=Path("zdepth-out"))
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    intrinsics = load_intrinsics(args.intrinsics)
    common = {"server": args.server, "api_key": args.key, "timeout": args.timeout}

    health = get_health(args.server, timeout=args.timeout)
    print(
        f"health          {health['status']}  device {health['device']}  models {health['models_loaded']}  queue {health.get('queue')}"
    )

    started = time.perf_counter()
    cloud = predict_pointcloud(args.image, intrinsics, max_depth=args.max_depth, **common)
    print(summary("pointcloud", cloud, time.perf_counter() - started))
    write_ply(args.out / "pointcloud.ply", cloud["pointcloud"])

    started = time.perf_counter()
    metric = predict_metric_depth(args.image, max_depth=args.max_depth, **common)
    print(summary("metric_depth", metric, time.perf_counter() - started))

    started = time.perf_counter()
    relative = predict_relative_depth(args.image, **common)
    print(summary("relative_depth", relative, time.perf_counter() - started))

    saved = [
        save_depth(metric["depth_map"], args.out / "metric_depth"),
        save_depth(relative["depth_map"], args.out / "relative_depth"),
    ]
    print("saved", ", ".join(str(p) for p in [args.out / "pointcloud.ply", *saved]))

    if args.key:
        try:
            predict_metric_depth(args.image, **dict(common, api_key=args.key + "-wrong"))
        except ServerError as exc:
            refused = exc.code == "unauthorized"
            print(f"wrong key       {'refused as expected' if refused else 'unexpected error'}: {exc}")
            return 0 if refused else 1
        print("wrong key       ACCEPTED: is the server running with --require-auth?")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
