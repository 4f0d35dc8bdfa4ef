"""Unchanged imagezmq senders as zdepth cameras.

An imagezmq `ImageSender` sends [JSON {msg, dtype, shape}, raw array] or [JSON {msg}, JPEG]
on a REQ socket and waits for b"OK". It has no place for prediction fields or a key, so the
message text names the stream and the broker's `--imagezmq-fields` say what to compute.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

from zdepth import protocol as P


def metadata(frames: Sequence) -> dict:
    """The JSON metadata of an imagezmq message, checked to be an object."""
    if len(frames) != 2 or len(frames[0]) > P.MAX_HEADER_BYTES:
        raise P.bad_request("imagezmq messages are [json, image]")
    try:
        meta = json.loads(frames[0].bytes)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        raise P.bad_request("imagezmq metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise P.bad_request("imagezmq metadata must be a JSON object")
    return meta


def stream_name(meta: dict) -> str:
    """The sender's message text, made a valid stream name."""
    return P.STREAM_NAME_UNSAFE.sub("_", str(meta.get("msg") or "imagezmq"))[:64]


def stream_frame(meta: dict, frames: Sequence, name: str, seq: int, fields: dict) -> list:
    """[header, image frame]: the zdepth stream frame the message stands for."""
    if "shape" in meta:
        if meta.get("dtype") != "uint8":
            raise P.bad_request("imagezmq arrays must be uint8 BGR images")
        image = {"frame": 1, "format": "raw", "shape": meta["shape"]}
    else:
        image = {"frame": 1, "format": "png" if frames[1].bytes[:4] == b"\x89PNG" else "jpeg"}
    header = dict(fields, v=P.VERSION, stream=name, seq=seq, t_capture=time.time(), image=image)
    return [header, frames[1]]
