"""Compact depth on the wire: uint16 counts, zstd frames, point clouds rebuilt on the client.

Unit tests pin the formulas (quantisation, the delta_row filter, bounded inflation); the
integration tests ask a real `zdepth serve --random-weights`-style server for every method in
every wire form over tcp and ipc, through DepthClient, a bare REQ socket and the stream path.
"""

from __future__ import annotations

import io
import math
import threading
import time

import numpy as np
import pytest
import zmq
import zstandard

from clients import CameraPublisher, DepthClient, DepthSubscriber, ServerError
from clients.client import image_message, rgb_pixels
from tests.servers import TEST_INPUT_SIZE, Server
from zdepth import protocol as P
from zdepth.compact import quantise_depth, to_metres, wire_arrays
from zdepth.request import default_depth_scale, parse_predict

K = {"fx": 50.0, "fy": 60.0, "cx": 31.5, "cy": 23.5}


def scene(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


# --- the formulas ---------------------------------------------------------------------------


def test_uint16_is_round_of_float32_over_scale_exactly():
    rng = np.random.default_rng(1)
    depth = (rng.random((97, 131)) * 60).astype(np.float32)
    depth[0, :4] = [0.0015, 0.0025, 1.0005, 2.0015]  # exact halves of a count round to even
    for scale in (0.001, 0.002, 0.0005, 0.01):
        counts, out_of_range = quantise_depth(depth, scale)
        expected = np.rint(depth / np.float32(scale))
        fits = (expected >= 1) & (expected <= 65535)
        assert counts.dtype == np.uint16
        assert np.array_equal(counts, np.where(fits, expected, 0).astype(np.uint16))
        assert out_of_range == np.count_nonzero(~fits)
        valid = counts > 0
        # Half a count, plus the float32 rounding of count x scale (a few ulp of z).
        error = np.abs(counts[valid] * np.float32(scale) - depth[valid])
        assert np.all(error <= scale / 2 + 4 * np.spacing(depth[valid]))


def test_out_of_range_pixels_are_zero_and_counted():
    depth = np.array([[0.0, 0.0004, 0.0005, 65.535, 65.5358, 70.0, np.nan, np.inf]], np.float32)
    counts, out_of_range = quantise_depth(depth, 0.001)
    # 0.0005 / 0.001 rounds half to even: 0, so it is out of range too; 65.5358 rounds to 65536.
    assert counts.tolist() == [[0, 0, 0, 65535, 0, 0, 0, 0]]
    assert out_of_range == 7


def test_default_depth_scale_is_the_smallest_millimetre_multiple_that_fits():
    assert default_depth_scale(20.0) == 0.001
    assert default_depth_scale(65.535) == 0.001
    assert default_depth_scale(65.6) == 0.002
    assert default_depth_scale(80.0) == 0.002  # vkitti
    assert default_depth_scale(200.0) == 0.004
    for max_depth in (1.0, 20.0, 80.0, 1234.5):
        assert max_depth / default_depth_scale(max_depth) <= 65535


def decode_without_zdepth(desc: dict, frame: bytes) -> np.ndarray:
    """What a client in any language does, from docs/protocol.md alone: libzstd, then the filter."""
    size = math.prod(desc["shape"]) * np.dtype(desc["dtype"]).itemsize
    data = (
        zstandard.ZstdDecompressor().decompress(frame, max_output_size=size) if desc["compression"] == "zstd" else frame
    )
    assert len(data) == size
    array = np.frombuffer(data, dtype=np.dtype(desc["dtype"]).newbyteorder("<")).reshape(desc["shape"])
    if desc["filter"] == "delta_row":
        out = np.empty_like(array)
        for r in range(array.shape[0]):  # x[0] = d[0]; x[c] = (x[c-1] + d[c]) mod 65536
            acc = 0
            for c in range(array.shape[1]):
                acc = (acc + int(array[r, c])) % 65536
                out[r, c] = acc
        array = out
    return array


def test_zstd_frames_decode_with_plain_zstandard_and_the_documented_filter():
    rng = np.random.default_rng(2)
    counts = (1000 + np.cumsum(rng.integers(-3, 4, (7, 9)), axis=1) * 100).astype(np.uint16)
    counts[3, 4] = 65535
    counts[3, 5] = 0  # a wrap-around step
    arrays = {
        "depth": counts,
        "points": rng.random((6, 3)).astype(np.float32),
        "colors": rng.integers(0, 255, (6, 3), dtype=np.uint8),
    }
    described, frames = P.pack_arrays(arrays, compression="zstd", scales={"depth": 0.002, "points": 1.0})
    assert described["depth"] == {
        "frame": 1,
        "dtype": "uint16",
        "shape": [7, 9],
        "compression": "zstd",
        "filter": "delta_row",
        "scale": 0.002,
    }
    assert described["points"]["filter"] == "none" and "scale" not in described["colors"]
    for name, array in arrays.items():
        desc = described[name]
        frame = frames[desc["frame"] - 1]
        assert zstandard.frame_content_size(frame) == array.nbytes  # the size is in the frame header
        assert np.array_equal(decode_without_zdepth(desc, frame), array)


@pytest.mark.parametrize("compression", P.COMPRESSIONS)
def test_every_dtype_round_trips(compression):
    rng = np.random.default_rng(3)
    arrays = {
        "u16": rng.integers(0, 65536, (5, 8), dtype=np.uint16),
        "f16": rng.random((5, 8)).astype(np.float16),
        "f32": rng.random((40, 3)).astype(np.float32),
        "u8": rng.integers(0, 256, (40, 3), dtype=np.uint8),
        "empty": np.zeros((0, 3), np.float32),
    }
    header, decoded = P.unpack(P.pack({"ok": True}, arrays, compression=compression))
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype and np.array_equal(decoded[name], array)
        assert not decoded[name].flags.writeable


def forged(desc_changes: dict, payload: bytes) -> list:
    desc = {
        "frame": 1,
        "dtype": "uint16",
        "shape": [4, 4],
        "compression": "zstd",
        "filter": "delta_row",
        "scale": 0.001,
        **desc_changes,
    }
    return [P.packb(P.ok_header(1, arrays={"depth": desc})), payload]


@pytest.mark.parametrize(
    "payload, changes, message",
    [
        (zstandard.ZstdCompressor().compress(bytes(64)), {}, "holds 64 bytes"),  # inflates past 4x4 uint16
        (zstandard.ZstdCompressor().compress(bytes(8)), {}, "holds 8 bytes"),  # short
        (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64)), {}, "at most 32 bytes"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8)), {}, "inflated to 8 bytes"),
        (zstandard.ZstdCompressor().compress(bytes(32)) * 2, {}, "not one valid zstd frame"),
        (b"not zstd at all", {}, "not one valid zstd frame"),
        (bytes(32), {"compression": "lz4"}, "compression"),
        (bytes(64), {"dtype": "float32", "compression": "none"}, "filter"),
        (zstandard.ZstdCompressor().compress(bytes(32)), {"shape": [1 << 20, 1 << 20]}, "limit"),
    ],
)
def test_a_bad_compressed_frame_is_a_clear_error_never_an_overrun(payload, changes, message):
    with pytest.raises(P.ZDepthError, match=message):
        P.unpack(forged(changes, payload))


def test_a_forged_reply_is_a_clear_client_error():
    """A peer that answers with a frame that inflates past its declared shape: the client raises."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer():
        if router.poll(10_000):
            identity, _, header, *_ = router.recv_multipart()
            request_id = P.unpackb(header)["id"]
            reply = forged({}, zstandard.ZstdCompressor().compress(bytes(1 << 20)))
            reply[0] = P.packb(P.ok_header(request_id, arrays=P.unpackb(reply[0])["arrays"]))
            router.send_multipart([identity, b"", *reply])

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with DepthClient(f"tcp://127.0.0.1:{port}", timeout=10, retries=0) as client:
            with pytest.raises(ServerError, match="malformed reply.*holds 1048576 bytes") as caught:
                client.metric_depth(scene())
            assert caught.value.code == P.INTERNAL
    finally:
        thread.join()
        router.close()


def test_compact_defaults_leave_zstd_out_on_this_host():
    from clients.client import compact_defaults, is_local_endpoint

    for endpoint in (
        "ipc:///tmp/x.ipc",
        "inproc://a",
        "tcp://127.0.0.1:5555",
        "tcp://localhost:5555",
        "tcp://[::1]:5555",
    ):
        assert is_local_endpoint(endpoint), endpoint
    for endpoint in ("tcp://10.0.0.5:5555", "tcp://gpu-server:5555", "tcp://[fe80::1]:5555", "tcp://1270.0.0.1:1"):
        assert not is_local_endpoint(endpoint), endpoint
    assert compact_defaults(P.METRIC_DEPTH, "tcp://10.0.0.5:5555") == {"output_dtype": "uint16", "compression": "zstd"}
    assert compact_defaults(P.METRIC_DEPTH, "tcp://127.0.0.1:5555") == {"output_dtype": "uint16", "compression": "none"}
    assert compact_defaults(P.REL_DEPTH, "tcp://10.0.0.5:5555") == {"compression": "zstd"}
    assert compact_defaults(P.POINTCLOUD) == {"compression": "zstd"}  # streams: subscribers may be anywhere


def test_to_metres_handles_every_form_and_refuses_bad_scales():
    counts = np.array([[0, 1, 1500]], np.uint16)
    # count x scale in float32, the documented rule every client follows (bit for bit across languages)
    assert np.array_equal(to_metres(counts, {"scale": 0.002}), counts.astype(np.float32) * np.float32(0.002))
    assert to_metres(counts, {"scale": 0.002})[0, 0] == 0
    half = np.array([1.5], np.float16)
    assert to_metres(half, {"scale": 1.0}).dtype == np.float32
    exact = np.array([2.5], np.float32)
    assert to_metres(exact, {}) is exact  # no copy for the float32 form
    for scale in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(P.ZDepthError, match="scale"):
            to_metres(counts, {"scale": scale})


def test_float16_overflow_is_refused_not_sent_as_infinity():
    request = parse_predict(
        P.request_header(P.METRIC_DEPTH, image={"frame": 1, "format": "jpeg"}, max_depth=1e5, output_dtype="float16"),
        [b"", b"x"],
    )
    depth = (np.linspace(0.1, 1.0, 80).reshape(8, 10) * 1e5).astype(np.float16)  # what the engine's cast gives
    assert not np.isfinite(depth).all()
    with pytest.raises(P.ZDepthError, match="float16") as caught:
        wire_arrays(request, {"depth": depth})
    assert caught.value.code == P.BAD_REQUEST
    fine = np.ones((8, 10), np.float16)
    assert wire_arrays(request, {"depth": fine})[0]["depth"] is fine


BAD_FIELDS = [
    ({"depth_scale": 0}, "depth_scale"),
    ({"depth_scale": -0.001}, "depth_scale"),
    ({"depth_scale": float("nan")}, "depth_scale"),
    ({"depth_scale": float("inf")}, "depth_scale"),
    ({"depth_scale": 1e-9}, "depth_scale"),
    ({"depth_scale": "0.001"}, "depth_scale"),
    ({"depth_scale": True}, "depth_scale"),
    ({"compression": "gzip"}, "compression"),
    ({"compression": ["zstd"]}, "compression"),
    ({"output_dtype": "uint8"}, "output_dtype"),
    ({"method": P.POINTCLOUD, "intrinsics": K, "output_dtype": "uint16"}, "metric_depth only"),
    ({"method": P.REL_DEPTH, "output_dtype": "uint16"}, "metric_depth only"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS)
def test_bad_compact_fields_are_bad_requests(fields, message):
    fields = dict(fields)
    header = P.request_header(fields.pop("method", P.METRIC_DEPTH), image={"frame": 1, "format": "jpeg"}, **fields)
    with pytest.raises(P.ZDepthError, match=message) as caught:
        parse_predict(header, [b"", b"x"])
    assert caught.value.code == P.BAD_REQUEST


# --- a real server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir):
    srv = Server(tmp_path_factory.mktemp("compact"), checkpoint_dir, workers=1)
    yield srv
    srv.stop()


def endpoint(server, transport: str) -> str:
    return server.endpoint if transport == "tcp" else server.ipc


@pytest.fixture(scope="module")
def client(server):
    with DepthClient(server.endpoint, timeout=30, input_size=TEST_INPUT_SIZE) as c:
        yield c


EXACT = {"output_dtype": "float32", "compression": "none"}


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("compression", P.COMPRESSIONS)
@pytest.mark.parametrize("dtype", P.OUTPUT_DTYPES)
@pytest.mark.parametrize("method", [P.METRIC_DEPTH, P.REL_DEPTH, P.POINTCLOUD])
def test_every_method_and_wire_form(server, transport, method, dtype, compression):
    """Each form decodes to what the exact float32 reply says, within the form's own rounding."""
    img = scene(seed=5)
    fields = {"output_dtype": dtype, "compression": compression}
    with DepthClient(endpoint(server, transport), timeout=30, input_size=TEST_INPUT_SIZE) as c:
        if method == P.POINTCLOUD:
            if dtype == "uint16":
                with pytest.raises(ServerError, match="metric_depth only") as caught:
                    c.pointcloud(img, K, server_side=True, **fields)
                assert caught.value.code == P.BAD_REQUEST
                return
            exact = c.pointcloud(img, K, server_side=True, with_color=True, **EXACT)
            got = c.pointcloud(img, K, server_side=True, with_color=True, **fields)
            assert got.header["arrays"]["points"]["compression"] == compression
            assert np.array_equal(got.colors, exact.colors)
            assert got.points.dtype == np.float32
            assert np.array_equal(got.points, exact.points.astype(dtype).astype(np.float32))
            return
        call = c.metric_depth if method == P.METRIC_DEPTH else c.relative_depth
        exact = call(img, **EXACT)
        if method == P.REL_DEPTH and dtype == "uint16":
            with pytest.raises(ServerError, match="metric_depth only"):
                call(img, **fields)
            return
        got = call(img, **fields)
    desc = got.header["arrays"]["depth"]
    assert (desc["dtype"], desc["compression"]) == (dtype, compression)
    assert desc["filter"] == ("delta_row" if dtype == "uint16" and compression == "zstd" else "none")
    assert got.depth.dtype == np.float32 and got.depth.shape == img.shape[:2]
    if dtype == "uint16":
        expected, out_of_range = quantise_depth(exact.depth, default_depth_scale(20.0))
        assert got.scale == desc["scale"] == 0.001 and np.array_equal(got.counts, expected)
        assert got.out_of_range == out_of_range == 0
        assert np.abs(got.depth - exact.depth).max() <= 0.0005 + 1e-6
    else:
        assert got.counts is None
        assert np.array_equal(got.depth, exact.depth.astype(dtype).astype(np.float32))


def test_the_default_cloud_is_compact_and_within_half_a_count(client):
    img = scene(seed=6)
    exact = client.pointcloud(img, K, server_side=True, output_dtype="float32", compression="none")
    compact = client.pointcloud(img, K)
    desc = compact.header["arrays"]["depth"]
    # uint16 always; zstd only toward another host (this server is on loopback)
    assert (desc["dtype"], desc["compression"], desc["scale"]) == ("uint16", "none", 0.001)
    zstd = client.pointcloud(img, K, compression="zstd")
    assert zstd.header["arrays"]["depth"]["compression"] == "zstd" and np.array_equal(zstd.points, compact.points)
    z_exact, z_compact = exact.points[:, 2], compact.points[:, 2]
    assert np.abs(z_compact - z_exact).max() <= 0.0005 + 1e-6
    # x and y scale with z: the same relative bound.
    rel = np.abs(compact.points[:, :2] - exact.points[:, :2]) / np.maximum(z_exact[:, None], 1e-6)
    assert rel.max() <= 0.0005 / z_exact.min() + 1e-5
    assert compact.depth.shape == img.shape[:2]


def test_out_of_range_counts_reach_the_client(client):
    img = scene(seed=7)
    exact = client.metric_depth(img, max_depth=1000.0, **EXACT)
    got = client.metric_depth(img, max_depth=1000.0, depth_scale=0.001)
    expected = np.count_nonzero(np.rint(exact.depth / np.float32(0.001)) > 65535)
    assert expected > 0 and got.out_of_range == expected
    assert np.count_nonzero(got.counts == 0) == expected and np.all(got.depth[got.counts == 0] == 0)
    vkitti_like = client.metric_depth(img, max_depth=80.0)
    assert vkitti_like.scale == 0.002 and vkitti_like.out_of_range == 0


def test_float16_overflow_through_the_server(client):
    with pytest.raises(ServerError, match="float16") as caught:
        client.metric_depth(scene(), max_depth=1e5, output_dtype="float16")
    assert caught.value.code == P.BAD_REQUEST
    assert client.metric_depth(scene(), max_depth=1e5, output_dtype="float32").depth.max() > 65504


@pytest.mark.parametrize("fields, message", BAD_FIELDS)
def test_bad_compact_fields_through_the_server(client, fields, message):
    fields = dict(fields)
    method = fields.pop("method", P.METRIC_DEPTH)
    with pytest.raises(ServerError, match=message) as caught:
        client.request(method, {"image": {"frame": 1, "format": "raw", "shape": [4, 4, 3]}, **fields}, [bytes(48)])
    assert caught.value.code == P.BAD_REQUEST
    assert client.metric_depth(scene()).depth.shape == (48, 64)  # still serving


def test_a_bare_req_client_reads_uint16_zstd(server):
    img = scene(seed=8)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        header = {
            "v": 1,
            "method": "metric_depth",
            "id": 1,
            "input_size": TEST_INPUT_SIZE,
            "output_dtype": "uint16",
            "compression": "zstd",
            "image": {"frame": 1, "format": "raw", "shape": list(img.shape)},
        }
        sock.send_multipart([P.packb(header), img.tobytes()])
        assert sock.poll(30_000)
        reply = sock.recv_multipart()
    finally:
        sock.close()
    head = P.unpackb(reply[0])
    assert head["ok"] is True
    desc = head["arrays"]["depth"]
    counts = decode_without_zdepth(desc, reply[desc["frame"]])
    with DepthClient(server.endpoint, timeout=30, input_size=TEST_INPUT_SIZE) as c:
        assert np.array_equal(counts, c.metric_depth(img).counts)


# --- colours of a cloud rebuilt on the client -----------------------------------------------


def exif_rotated_jpeg() -> bytes:
    from PIL import Image

    img = Image.fromarray(scene(40, 64, seed=9)[..., ::-1])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def png16(grey: bool) -> bytes:
    import cv2

    rng = np.random.default_rng(10)
    shape = (40, 64) if grey else (40, 64, 3)
    ok, data = cv2.imencode(".png", rng.integers(0, 65536, shape, dtype=np.uint16))
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(
    "name, data",
    [("exif-rotated jpeg", exif_rotated_jpeg()), ("16-bit grey png", png16(True)), ("16-bit rgb png", png16(False))],
)
def test_local_colours_equal_the_servers(client, name, data):
    server = client.pointcloud(data, K, with_color=True, server_side=True)
    local = client.pointcloud(data, K, with_color=True)
    assert local.colors.shape == server.colors.shape == local.points.shape
    assert np.array_equal(local.colors, server.colors), name
    if name.startswith("exif"):
        assert local.depth.shape == (64, 40)  # rotated: the server's points and our colours agree on it
    assert np.array_equal(rgb_pixels(*image_message(data)), server.colors)


# --- stream mode ----------------------------------------------------------------------------


def test_stream_results_are_compact_by_default_and_decoded(server, client):
    img = scene(seed=11)
    reference = client.metric_depth(img)  # the same compact default over request/reply
    with (
        DepthSubscriber(server.pub, streams=["compact"]) as sub,
        CameraPublisher(server.stream, stream="compact", input_size=TEST_INPUT_SIZE) as cam,
    ):
        time.sleep(0.3)  # let the subscription reach the broker
        result = None
        deadline = time.monotonic() + 30
        while result is None and time.monotonic() < deadline:
            cam.send(img)
            result = sub.recv(timeout=2.0)
    assert result is not None and result.ok, result
    desc = result.header["arrays"]["depth"]
    assert (desc["dtype"], desc["compression"], desc["filter"]) == ("uint16", "zstd", "delta_row")
    assert result.depth.dtype == np.float32 and np.array_equal(result.depth, reference.depth)
