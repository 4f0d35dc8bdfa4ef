"""A real camera stream for integration tests: a CameraPublisher thread sending random frames."""

from __future__ import annotations

import threading

import numpy as np

from clients import CameraPublisher
from tests.servers import TEST_INPUT_SIZE
from zdepth import protocol as P

HEIGHT, WIDTH = 48, 64


def frame_stream(count: int = 10_000):
    """The random BGR frames a Camera sends, in order (seed 0)."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(count))


def camera_frames(count: int) -> list:
    """The first `count` frames a Camera sends."""
    return list(frame_stream(count))


class Camera:
    """Sends random (HEIGHT, WIDTH) BGR frames at `fps` until `stop()`: `metric_depth`, or
    another method with its `fields` (CameraPublisher options)."""

    def __init__(self, endpoint: str, stream: str, fps: float = 10.0, method: str = P.METRIC_DEPTH, **fields):
        self._stop = threading.Event()
        frames = frame_stream()
        self._publisher = CameraPublisher(endpoint, stream=stream, method=method, input_size=TEST_INPUT_SIZE, **fields)
        self._thread = threading.Thread(
            target=self._publisher.run, args=(frames,), kwargs={"fps": fps, "stop": self._stop}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._publisher.close()
