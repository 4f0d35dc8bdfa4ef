"""zdepth.images: decoding wire images into BGR uint8, and refusing bad ones with clear errors."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from zdepth import protocol as P
from zdepth.images import check_bgr, decode_bytes, decode_image, encode_jpeg, encode_png, read_image
from zdepth.protocol import ZDepthError
from zdepth.request import ImageSpec, check_image

MAX_PIXELS = 4096 * 4096


def gradient_image(height=48, width=64):
    """A smooth colour gradient (JPEG-friendly), distinct in each channel."""
    v, u = np.mgrid[0:height, 0:width]
    return np.stack([u * 255 // width, v * 255 // height, (u + v) * 127 // (width + height)], axis=-1).astype(np.uint8)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width, height):
    """A well-formed PNG of a few dozen bytes whose header claims width x height RGB pixels;
    its IDAT holds one compressed row, so a decoder would have to invent the rest."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * min(width, 1000)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def decode_frame(header_image, payload, max_pixels=MAX_PIXELS):
    """The worker's path: validate the header's `image` with request.check_image, then decode."""
    frames = [b"", payload]
    spec = check_image({"image": header_image}, frames, max_pixels)
    return decode_image(spec, frames, max_pixels)


def test_jpeg_and_png_decode_to_bgr_uint8():
    image = gradient_image()
    png = decode_frame({"frame": 1, "format": "png"}, encode_png(image))
    np.testing.assert_array_equal(png, image)
    jpeg = decode_frame({"frame": 1, "format": "jpeg"}, encode_jpeg(image, quality=95))
    assert jpeg.shape == (48, 64, 3) and jpeg.dtype == np.uint8 and jpeg.flags.c_contiguous
    assert np.abs(jpeg.astype(int) - image).mean() < 3  # lossy, but the same picture, still BGR
    # A memoryview frame (what a zmq.Frame's buffer is) works the same.
    np.testing.assert_array_equal(decode_bytes(memoryview(encode_png(image)), MAX_PIXELS), image)


def test_grey_alpha_and_16_bit_pngs_become_three_channel_bgr():
    image = gradient_image()
    grey = decode_bytes(encode_png(image[..., 1]), MAX_PIXELS)
    assert grey.shape == (48, 64, 3)
    np.testing.assert_array_equal(grey[..., 0], image[..., 1])
    np.testing.assert_array_equal(grey[..., 2], image[..., 1])
    alpha = np.concatenate([image, np.full((48, 64, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(decode_bytes(encode_png(alpha), MAX_PIXELS), image)
    deep = image.astype(np.uint16) * 256 + 0xF0  # 16-bit: the high byte is kept
    np.testing.assert_array_equal(decode_bytes(encode_png(deep), MAX_PIXELS), image)


def test_raw_frames_bgr_is_a_zero_copy_view_and_rgb_is_converted():
    image = gradient_image()
    payload = image.tobytes()
    bgr = decode_frame({"frame": 1, "format": "raw", "shape": [48, 64, 3]}, payload)
    np.testing.assert_array_equal(bgr, image)
    assert not bgr.flags.writeable  # a view on the frame, not a copy
    rgb = decode_frame(
        {"frame": 1, "format": "raw", "shape": [48, 64, 3], "channels": "rgb"}, image[..., ::-1].tobytes()
    )
    np.testing.assert_array_equal(rgb, image)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"not an image at all" * 10, "not a readable JPEG or PNG"),
        (b"GIF89a" + bytes(100), "not a readable JPEG or PNG"),
    ],
)
def test_unreadable_bytes_are_bad_requests(payload, message):
    with pytest.raises(ZDepthError, match=message) as info:
        decode_bytes(payload, MAX_PIXELS)
    assert info.value.code == P.BAD_REQUEST


def test_corrupt_and_truncated_jpegs_are_bad_requests():
    jpeg = encode_jpeg(gradient_image(240, 320))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, len(jpeg), dtype=np.uint8).tobytes()
    scan = jpeg.index(b"\xff\xda") + 20  # the entropy-coded data, after all the headers
    for payload in (jpeg[:scan] + noise[scan:], jpeg[: len(jpeg) // 2], jpeg[:-2]):
        with pytest.raises(ZDepthError, match="320x240 jpeg image could not be decoded") as info:
            decode_bytes(payload, MAX_PIXELS)
        assert info.value.code == P.BAD_REQUEST
    # Bytes a camera appends after the end marker do not make a JPEG corrupt.
    assert decode_bytes(jpeg + b"TRAILER" * 10, MAX_PIXELS).shape == (240, 320, 3)
    png = encode_png(gradient_image())
    with pytest.raises(ZDepthError, match="64x48 png image could not be decoded"):
        decode_bytes(png[: len(png) // 2], MAX_PIXELS)
    # Garbage inside the headers: not even the size can be read.
    with pytest.raises(ZDepthError, match="not a readable JPEG or PNG") as info:
        decode_bytes(jpeg[:30] + noise[30:], MAX_PIXELS)
    assert info.value.code == P.BAD_REQUEST


def test_other_formats_are_refused_by_name():
    ok, bmp = cv2.imencode(".bmp", gradient_image())
    with pytest.raises(ZDepthError, match="bytes are BMP"):
        decode_bytes(bmp.tobytes(), MAX_PIXELS)


def test_pixel_bombs_are_refused_from_the_header_alone():
    # 60000 x 60000 claimed in 33 bytes: refused before any pixel is decoded.
    with pytest.raises(ZDepthError, match="refused before decoding") as info:
        decode_bytes(png_bomb(60000, 60000), MAX_PIXELS)
    assert info.value.code == P.TOO_LARGE
    # Under PIL's own bomb limit but over ours: our limit, with the claimed size in the message.
    with pytest.raises(ZDepthError, match="5000x5000 = 25000000 pixels; the limit is 16777216") as info:
        decode_bytes(png_bomb(5000, 5000), MAX_PIXELS)
    assert info.value.code == P.TOO_LARGE
    # A real image over a small limit, in both encodings.
    for payload in (encode_png(gradient_image()), encode_jpeg(gradient_image())):
        with pytest.raises(ZDepthError, match="64x48 = 3072 pixels; the limit is 3000"):
            decode_frame({"frame": 1, "format": "jpeg"}, payload, max_pixels=3000)


def test_check_bgr_names_what_arrived():
    with pytest.raises(ZDepthError, match=r"shape \(H, W, 3\).*\(48, 64\)"):
        check_bgr(np.zeros((48, 64), np.uint8))
    with pytest.raises(ZDepthError, match=r"\(48, 64, 4\)"):
        check_bgr(np.zeros((48, 64, 4), np.uint8))
    with pytest.raises(ZDepthError, match="uint8, got float32"):
        check_bgr(np.zeros((48, 64, 3), np.float32))
    with pytest.raises(ZDepthError, match="numpy array"):
        check_bgr([[0, 0, 0]])
    with pytest.raises(ZDepthError, match=r"\(0, 64, 3\)"):
        check_bgr(np.zeros((0, 64, 3), np.uint8))


def test_read_image_reads_files(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(gradient_image()))
    np.testing.assert_array_equal(read_image(path), gradient_image())
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(10))
    with pytest.raises(ZDepthError):
        read_image(tmp_path / "bad.jpg")


def test_url_specs_must_be_fetched_first():
    with pytest.raises(ValueError, match="decode_bytes"):
        decode_image(ImageSpec(url="http://example.com/x.jpg"), [b""], MAX_PIXELS)
