"""Image bytes -> the BGR uint8 array the engine takes, for the worker and the CLI.

Every failure is a `ZDepthError` with a clear message, because these bytes come from the
network: empty, corrupt or non-image bytes are `bad_request`, and an image whose header
claims more pixels than allowed is `too_large`, refused before a single pixel is decoded
(a 100-byte PNG can claim 10^10 pixels).

Decoding follows the official pipeline's `cv2.imread`, i.e. OpenCV's IMREAD_COLOR: JPEG EXIF
orientation is applied, grey is replicated to three channels, alpha is dropped, and a 16-bit
PNG is reduced to 8 bits by keeping the high byte (the model takes 8-bit input anyway).
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from . import protocol as P
from .protocol import ZDepthError, bad_request
from .request import ImageSpec
from .resize import DEFAULT_MAX_JPEG_SCANS

# Formats whose bytes we hand to OpenCV, by the name PIL gives them. Others (GIF, TIFF, ...)
# are refused: they are not in the protocol, and every extra codec is extra attack surface.
_DECODABLE = {"JPEG": "jpeg", "PNG": "png"}


def image_header(data: bytes) -> tuple[str, int, int]:
    """("jpeg" or "png", width, height) from the header alone, without decoding pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:
        raise ZDepthError(P.TOO_LARGE, f"image refused before decoding: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise bad_request(
            "the image bytes are not a readable JPEG or PNG (corrupt, truncated or another format)"
        ) from None
    if fmt not in _DECODABLE:
        raise bad_request(f"the image bytes are {fmt}; send jpeg, png or a raw uint8 array")
    return _DECODABLE[fmt], width, height


def _jpeg_truncated(data: bytes) -> bool:
    """No end-of-image marker after the start of the scan: the bytes were cut short. (Depending
    on its version, OpenCV may return such an image half grey rather than fail.) Trailing
    bytes after the marker, which some cameras add, are fine."""
    scan = data.find(b"\xff\xda")
    return scan < 0 or data.find(b"\xff\xd9", scan) < 0


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """Start-of-scan (SOS) markers in a JPEG, counted by walking its segments, up to `stop_after`.

    A progressive JPEG decodes in one pass over the image per scan: 741 KB with 20,000 scans took
    21 s to decode where a normal frame takes 0.16 s (libjpeg encoders write at most about 10).
    Segment payloads (EXIF thumbnails) are skipped; inside entropy-coded data 0xFF is always
    followed by 0x00 or a restart marker, so the next other marker ends the scan."""
    scans, i, end = 0, 2, len(data)
    while i + 4 <= end and scans < stop_after:
        if data[i] != 0xFF:
            return scans  # not a marker where one must be: let the decoder report it
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            return scans
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        while True:  # the entropy-coded data: up to the next marker that is not a stuffed 0xFF or a restart
            i = data.find(b"\xff", i)
            if i < 0 or i + 1 >= end:
                return scans
            following = data[i + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                i += 2
                continue
            break
    return scans


def decode_bytes(data: bytes | memoryview, max_pixels: int, max_scans: int = DEFAULT_MAX_JPEG_SCANS) -> np.ndarray:
    """JPEG or PNG bytes -> BGR uint8 (H, W, 3), refusing images over `max_pixels` before decoding.

    A JPEG with more than `max_scans` scans is `too_large` before decoding (see `jpeg_scans`).
    Refused as corrupt: bytes whose header cannot be read, truncated JPEGs, and anything OpenCV
    fails on. Damage inside a JPEG's entropy-coded data that libjpeg only warns about decodes
    to a damaged picture, as it does with `cv2.imread` in the official pipeline.
    """
    data = bytes(data)  # one copy of a memoryview/zmq buffer; PIL and numpy then share it
    if not data:
        raise bad_request("the image bytes are empty")
    fmt, width, height = image_header(data)
    if width * height > max_pixels:
        raise ZDepthError(
            P.TOO_LARGE, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if fmt == "jpeg" and jpeg_scans(data, max_scans + 1) > max_scans:
        raise ZDepthError(
            P.TOO_LARGE,
            f"the JPEG has more than {max_scans} scans (progressive passes); the limit is {max_scans} (--max-jpeg-scans)",
        )
    image = (
        None
        if fmt == "jpeg" and _jpeg_truncated(data)
        else cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    )
    if image is None:
        raise bad_request(f"the {width}x{height} {fmt} image could not be decoded (corrupt or truncated bytes)")
    return image


def decode_image(
    spec: ImageSpec, frames: Sequence, max_pixels: int, max_scans: int = DEFAULT_MAX_JPEG_SCANS
) -> np.ndarray:
    """The image a validated request points at (see `request.check_image`) as BGR uint8 (H, W, 3).

    A raw BGR frame comes back as a read-only zero-copy view of the frame; a raw RGB frame is
    converted. URL specs must be fetched by the caller first, then passed to `decode_bytes`.
    """
    if spec.frame is None:
        raise ValueError("decode_image takes frame images; fetch image_url first and call decode_bytes")
    data = P.frame_buffer(frames[spec.frame])
    if spec.format != "raw":
        return decode_bytes(data, max_pixels, max_scans)
    image = np.frombuffer(data, dtype=np.uint8).reshape(spec.shape)
    if spec.channels == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return image


def check_bgr(image: np.ndarray) -> np.ndarray:
    """Refuse anything but a uint8 (H, W, 3) array, with a message that says what arrived."""
    if not isinstance(image, np.ndarray):
        raise bad_request(f"the image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise bad_request(f"the image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise bad_request(f"the image must have shape (H, W, 3) (BGR), got {image.shape}")
    return image


def read_image(path: str | os.PathLike, max_pixels: int = 1 << 28) -> np.ndarray:
    """A JPEG or PNG file as BGR uint8, with the same checks and messages as images from the wire."""
    with open(path, "rb") as f:
        return decode_bytes(f.read(), max_pixels)


def encode_jpeg(image_bgr: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", check_bgr(image_bgr), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return data.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 BGR (or grey) image, or a uint16 one."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("OpenCV could not encode the image as PNG")
    return data.tobytes()
