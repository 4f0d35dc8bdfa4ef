"""A robot control loop that asks a zdepth server for point clouds over a bare ZeroMQ REQ socket.

On purpose this uses no zdepth code at all, only zmq, msgpack and numpy: the whole client side
of the protocol fits on one screen, so a C++, Rust or Go robot can do the same with its own
ZeroMQ and msgpack libraries. (Python code would normally use `clients.DepthClient`.)

Each iteration sends one JPEG, gets a (H*W, 3) float32 point cloud back, finds the nearest
point in the corridor in front of the robot and turns that into a forward speed.

    python clients/examples/robot_controller_req.py --server tcp://127.0.0.1:5555 \
        --image frame.jpg --iterations 20 [--key sk-...]

The protocol in brief (docs/protocol.md has it all):
- request  = [msgpack header, image bytes]; a REQ socket adds the empty delimiter frame itself.
- header   = {v: 1, method, id, key, timeout_ms, image: {frame: 1, format: "jpeg"}, intrinsics, ...}
- reply    = [msgpack header, *array frames]; header.ok, and header.arrays[name] = {frame, dtype,
  shape} says which frame holds which array, or header.error = {code, message}.
- REQ strictly alternates send/recv, so after a timeout the socket is closed and a new one
  resends the request (the "Lazy Pirate" pattern).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import msgpack
import numpy as np
import zmq

PROTOCOL_VERSION = 1
RETRYABLE = {"overloaded", "worker_lost", "shutting_down"}  # answered early: worth sending again within the budget
SERVER_MARGIN_S = 0.2  # the server is told a deadline this much shorter, so its `timeout` answer reaches us


class DepthLink:
    """A REQ socket that is replaced when the server stops answering. `timeout_s` is each
    request's whole budget, retries included: every try may use all the time that is left."""

    def __init__(self, server: str, timeout_s: float, retries: int):
        self.server, self.timeout_s, self.retries = server, timeout_s, retries
        self.context = zmq.Context.instance()
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)  # never hang on close with unsent requests
        socket.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:5555 works too
        socket.connect(self.server)
        return socket

    def request(self, header: dict, payload: bytes) -> Optional[tuple[dict, list]]:
        """(reply header, frames), or None when no reply came within the budget. Retryable
        answers are sent again after a backoff; a `timeout` answer is not (the budget is spent)."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.socket.setsockopt(zmq.RCVTIMEO, max(1, int(left * 1000)))  # recv raises zmq.Again after this
            server_ms = max(
                1, int((left - min(SERVER_MARGIN_S, left / 5)) * 1000)
            )  # the server gives up just before we do
            self.socket.send_multipart([msgpack.packb(dict(header, timeout_ms=server_ms)), payload])
            try:
                frames = self.socket.recv_multipart()
            except zmq.Again:
                print(f"  no reply within {self.timeout_s:g} s; reconnecting", file=sys.stderr)
                self.socket.close()
                self.socket = self._connect()  # REQ cannot send again before it received
                return None
            reply = msgpack.unpackb(frames[0])  # REQ only delivers the reply to this request
            if reply["ok"] or reply["error"]["code"] not in RETRYABLE or attempt == self.retries:
                return reply, frames
            time.sleep(max(0.0, min(0.1 * 2**attempt, deadline - time.monotonic())))
        return None

    def close(self) -> None:
        self.socket.close()


def array(reply: dict, frames: list, name: str) -> np.ndarray:
    """A result array: a zero-copy view of the frame its descriptor points at."""
    desc = reply["arrays"][name]
    return np.frombuffer(frames[desc["frame"]], dtype=desc["dtype"]).reshape(desc["shape"])


def nearest_ahead(points: np.ndarray, half_width: float, height: float) -> float:
    """Distance (z, metres) to the closest point in a corridor straight ahead; inf if none.
    Camera axes: x right, y down, z forward."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    corridor = (np.abs(x) < half_width) & (np.abs(y) < height) & (z > 0)
    return float(z[corridor].min()) if corridor.any() else float("inf")


def speed_command(distance: float, stop_at: float, full_speed_at: float, max_speed: float) -> float:
    """Full speed when the way is clear, slowing linearly to zero at `stop_at`."""
    return max_speed * float(np.clip((distance - stop_at) / (full_speed_at - stop_at), 0.0, 1.0))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="tcp://127.0.0.1:5555")
    parser.add_argument("--image", required=True, help="a JPEG or PNG standing in for the camera")
    parser.add_argument("--key", default=None, help="API key, when the server requires one")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument(
        "--intrinsics", type=float, nargs=4, default=[525.0, 525.0, 319.5, 239.5], metavar=("FX", "FY", "CX", "CY")
    )
    parser.add_argument("--max-depth", type=float, default=10.0, help="metres; the depth range the model is scaled to")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request, retries included")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--hz", type=float, default=5.0, help="control loop rate")
    args = parser.parse_args(argv)

    with open(args.image, "rb") as f:
        jpeg = f.read()  # a real robot grabs and encodes a camera frame here
    image_format = "png" if jpeg.startswith(b"\x89PNG") else "jpeg"
    fx, fy, cx, cy = args.intrinsics
    link = DepthLink(args.server, args.timeout, args.retries)
    try:
        for i in range(args.iterations):
            started = time.perf_counter()
            header = {
                "v": PROTOCOL_VERSION,
                "method": "pointcloud",
                "id": i,
                "image": {"frame": 1, "format": image_format},
                "intrinsics": {"fx": fx, "fy": fy, "cx": cx, "cy": cy},
                "max_depth": args.max_depth,
            }
            if args.key:
                header["key"] = args.key
            answer = link.request(header, jpeg)
            if answer is None:
                print(f"[{i}] server unreachable: speed 0.00 m/s (stopping safely)")
                continue
            reply, frames = answer
            if not reply["ok"]:
                code, message = reply["error"]["code"], reply["error"]["message"]
                print(f"[{i}] error {code}: {message}: speed 0.00 m/s")
                if code not in RETRYABLE and code != "timeout":
                    return 2  # a bad key or a bad request will not get better by asking again
                continue
            points = array(reply, frames, "points")
            distance = nearest_ahead(points, half_width=0.3, height=0.5)
            speed = speed_command(distance, stop_at=0.5, full_speed_at=2.0, max_speed=0.8)
            round_trip_ms = (time.perf_counter() - started) * 1000
            timing = reply.get("timing", {})
            print(
                f"[{i}] {points.shape[0]} points, nearest ahead {distance:.2f} m -> speed {speed:.2f} m/s | "
                f"round trip {round_trip_ms:.1f} ms (inference {timing.get('inference_ms', float('nan')):.1f} ms, {reply.get('model')})"
            )
            time.sleep(max(0.0, 1.0 / args.hz - (time.perf_counter() - started)))
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
