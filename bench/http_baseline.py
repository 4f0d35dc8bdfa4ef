"""The HTTP designs zdepth is measured against, served by the same engine so compute is identical.

    python bench/http_baseline.py --port 8000 --random-weights [--threads 1] [--device cpu]

One FastAPI app under uvicorn, with two APIs:

- The lab API zdepth replaces (shared/reference/seed-http-api.md): JSON bodies with the image
  as base64 and pydantic models; `POST /pc` answers the float32 point cloud as base64,
  `POST /metric_depth` and `POST /rel_depth` answer the depth as a PNG data URL (8-bit,
  scaled to min..max) with min and max, as the old API did.
- The strongest HTTP design: `POST /bin/{method}` with the JPEG as the raw body, parameters
  in the query, and the array back as a raw `application/octet-stream` body (dtype and shape
  in headers), sent without a copy.

Every answer carries the engine's compute timing (`timing` in JSON, the `X-Timing` header for
binary bodies), with the same keys as a zdepth reply, so overhead = round trip - compute is
computed the same way for every design. `JsonClient` (httpx, keep-alive) and `BinaryClient`
(a plain keep-alive `http.client` connection) are the clients the overhead bench uses.

fastapi, uvicorn and httpx are the `bench` extra; nothing in the zdepth package imports this.
"""

import argparse
import base64
import http.client
import json
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import compute_ms  # noqa: E402
from zdepth import protocol as P  # noqa: E402
from zdepth.config import WorkerOptions, add_arguments  # noqa: E402

ROUTES = {"pointcloud": "/pc", "metric_depth": "/metric_depth", "rel_depth": "/rel_depth"}
KEEP_ALIVE_S = 600  # uvicorn's default of 5 s closes idle connections under a slow benchmark


# --- the server -----------------------------------------------------------------------------


def build_app(engine):
    """The FastAPI app around `engine` (a zdepth.engine.Engine). (No `from __future__ import
    annotations` in this module: FastAPI must see the request models, local to this function,
    as classes rather than strings.)"""
    from fastapi import FastAPI, HTTPException, Request, Response
    from pydantic import BaseModel

    from zdepth.images import decode_bytes, encode_png
    from zdepth.protocol import ZDepthError

    class CameraIntrinsics(BaseModel):
        fx: float
        fy: float
        cx: float
        cy: float

    class DepthRequest(BaseModel):
        image: str  # base64 JPEG or PNG
        camera_intrinsics: Optional[CameraIntrinsics] = None
        max_depth: Optional[float] = None
        encoder: Optional[str] = None
        dataset: Optional[str] = None
        model_input_size: int = 518

    app = FastAPI(title="Depth Anything V2 HTTP baseline")

    def predict(method: str, data: bytes, **fields) -> tuple:
        """(result, timing): the worker's own steps, timed as a zdepth worker times them."""
        started = time.perf_counter()
        image = decode_bytes(data, max_pixels=P.MAX_IMAGE_PIXELS)
        decode_ms = (time.perf_counter() - started) * 1000.0
        try:
            result = engine.predict(method, image, **fields)
        except ZDepthError as exc:
            raise HTTPException(400, exc.message) from None
        return result, {"decode_ms": round(decode_ms, 3), **result.timing}

    def json_predict(method: str, body: DepthRequest) -> dict:
        intrinsics = body.camera_intrinsics.model_dump() if body.camera_intrinsics else None
        result, timing = predict(
            method,
            base64.b64decode(body.image),
            intrinsics=intrinsics,
            max_depth=body.max_depth,
            encoder=body.encoder,
            dataset=body.dataset,
            input_size=body.model_input_size,
        )
        if method == "pointcloud":
            points = result.arrays["points"]
            return {"pointcloud": base64.b64encode(points).decode(), "shape": list(points.shape), "timing": timing}
        depth = result.arrays["depth"]
        span = result.max - result.min
        scaled = (depth - result.min) * (255.0 / span if span > 0 else 0.0)
        png = encode_png(np.clip(scaled, 0, 255).astype(np.uint8))
        return {
            "depth_map": "data:image/png;base64," + base64.b64encode(png).decode(),
            "shape": list(depth.shape),
            "min": result.min,
            "max": result.max,
            "timing": timing,
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy", "device": str(engine.device), "models_loaded": engine.models_loaded()}

    @app.post("/pc")
    async def pointcloud(body: DepthRequest) -> dict:
        return json_predict("pointcloud", body)

    @app.post("/metric_depth")
    async def metric_depth(body: DepthRequest) -> dict:
        return json_predict("metric_depth", body)

    @app.post("/rel_depth")
    async def rel_depth(body: DepthRequest) -> dict:
        return json_predict("rel_depth", body)

    @app.post("/bin/{method}")
    async def binary(
        method: str,
        request: Request,
        input_size: int = 518,
        max_depth: Optional[float] = None,
        fx: Optional[float] = None,
        fy: Optional[float] = None,
        cx: Optional[float] = None,
        cy: Optional[float] = None,
    ) -> Response:
        if method not in ROUTES:
            raise HTTPException(404, f"unknown method {method!r}")
        intrinsics = {"fx": fx, "fy": fy, "cx": cx, "cy": cy} if fx is not None else None
        result, timing = predict(
            method, await request.body(), intrinsics=intrinsics, max_depth=max_depth, input_size=input_size
        )
        array = next(iter(result.arrays.values()))
        headers = {
            "X-Dtype": array.dtype.name,
            "X-Shape": ",".join(map(str, array.shape)),
            "X-Timing": json.dumps(timing),
            "X-Min": repr(result.min),
            "X-Max": repr(result.max),
        }
        return Response(
            memoryview(np.ascontiguousarray(array)).cast("B"), media_type="application/octet-stream", headers=headers
        )

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    add_arguments(parser, WorkerOptions, only=("dtype", "threads", "checkpoint_dir", "random_weights"))
    args = parser.parse_args(argv)

    import uvicorn

    from zdepth.engine import Engine

    engine = Engine(
        checkpoint_dir=args.checkpoint_dir,
        device=args.device,
        dtype=args.dtype,
        random_weights=args.random_weights,
        threads=args.threads,
    )
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S)
    return 0


# --- the clients ----------------------------------------------------------------------------


class JsonClient:
    """The old API's client: httpx with keep-alive, base64 JSON in, arrays decoded from JSON out."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        import httpx

        self.http = httpx.Client(base_url=f"http://{host}:{port}", timeout=120.0)

    def call(
        self, method: str, jpeg: bytes, intrinsics: dict, input_size: int, max_depth: Optional[float] = None
    ) -> tuple:
        """One request -> (float32 array in the caller's hands, the server's compute ms)."""
        body = {
            "image": base64.b64encode(jpeg).decode(),
            "camera_intrinsics": intrinsics,
            "max_depth": max_depth,
            "model_input_size": input_size,
        }
        response = self.http.post(ROUTES[method], json=body)
        response.raise_for_status()
        data = response.json()
        if method == "pointcloud":
            array = np.frombuffer(base64.b64decode(data["pointcloud"]), np.float32).reshape(data["shape"])
        else:
            array = decode_png_depth(data["depth_map"], data["min"], data["max"])
        return array, compute_ms(data["timing"])

    def close(self) -> None:
        self.http.close()


def decode_png_depth(data_url: str, low: float, high: float) -> np.ndarray:
    """A PNG data URL of 8-bit depth scaled to low..high -> float32 metres (what a caller of the old API had to do)."""
    import cv2

    png = base64.b64decode(data_url.partition(",")[2])
    levels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    return levels.astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low)


class BinaryClient:
    """The strongest HTTP client: one keep-alive `http.client` connection, raw bytes both ways."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.connection = http.client.HTTPConnection(host, port, timeout=120.0)

    def call(
        self, method: str, jpeg: bytes, intrinsics: dict, input_size: int, max_depth: Optional[float] = None
    ) -> tuple:
        """One request -> (array in the caller's hands, the server's compute ms)."""
        query = {
            "input_size": input_size,
            **({"max_depth": max_depth} if max_depth else {}),
            **(intrinsics if method == "pointcloud" else {}),
        }
        self.connection.request(
            "POST", f"/bin/{method}?{urlencode(query)}", body=jpeg, headers={"Content-Type": "image/jpeg"}
        )
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        shape = [int(n) for n in response.getheader("X-Shape").split(",")]
        array = np.frombuffer(body, response.getheader("X-Dtype")).reshape(shape)
        return array, compute_ms(json.loads(response.getheader("X-Timing")))

    def close(self) -> None:
        self.connection.close()


if __name__ == "__main__":
    raise SystemExit(main())
