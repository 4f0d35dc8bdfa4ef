"""A real camera stream for integration tests: a CameraPublisher thread sending random frames."""

from __future__ import annotations

import threading

import numpy as np

from clients import CameraPublisher
from zdepth import protocol as P
from tests.servers import TEST_INPUT_SIZE

HEIGHT, WIDTH = 48, 64


class Camera:
    """Sends random (HEIGHT, WIDTH) BGR frames for `metric_depth` at `fps` until `stop()`."""

    def __init__(self, endpoint: str, stream: str, fps: float = 10.0):
        self._stop = threading.Event()
        rng = np.random.default_rng(0)
        frames = (rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(10_000))
        self._publisher = CameraPublisher(endpoint, stream=stream, method=P.METRIC_DEPTH, input_size=TEST_INPUT_SIZE)
        self._thread = threading.Thread(target=self._publisher.run, args=(frames,), kwargs={"fps": fps, "stop": self._stop}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._publisher.close()
