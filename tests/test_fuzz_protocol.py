"""Property-based tests of the wire decoder: bytes from the network can be anything.

The decoder's contract is that every malformed input raises `ZDepthError` (which the broker
turns into an error reply) and nothing else: a `TypeError` or `ValueError` escaping from
here is a request the broker cannot answer. Valid inputs must round-trip exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdepth import protocol as P
from zdepth.request import parse_predict

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Anything msgpack can carry: scalars of every type, and lists and maps of them.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
frames = st.lists(st.binary(max_size=64), min_size=1, max_size=6)

# Fields a prediction header has, each with its right type in a valid header and anything in a mutated one.
VALID_IMAGE = {"frame": 1, "format": "raw", "shape": [2, 3, 3]}
VALID_PREDICT = {
    "v": P.VERSION,
    "method": P.POINTCLOUD,
    "id": 1,
    "image": VALID_IMAGE,
    "intrinsics": {"fx": 1.0, "fy": 1.0, "cx": 0.5, "cy": 0.5},
    "max_depth": 20.0,
    "encoder": "vits",
    "dataset": "hypersim",
    "input_size": 56,
    "output_dtype": "float32",
    "depth_scale": 0.001,
    "compression": "zstd",
    "with_color": False,
}
PIXELS = bytes(2 * 3 * 3)


def only_protocol_errors(call, *args):
    """Run a decoder; returns its result, or None when it refused with a ZDepthError."""
    try:
        return call(*args)
    except P.ZDepthError as error:
        assert error.code in P.ERROR_CODES and error.message
        return None


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes_header(data):
    header = only_protocol_errors(P.decode_header, data)
    assert header is None or isinstance(header, dict)


@SETTINGS
@given(values)
def test_arbitrary_msgpack_header(value):
    header = only_protocol_errors(P.decode_header, P.packb(value))
    assert (header is not None) == isinstance(value, dict)


@SETTINGS
@given(frames)
def test_arbitrary_frames_unpack(parts):
    only_protocol_errors(P.unpack, parts)


@SETTINGS
@given(values, frames)
def test_arbitrary_array_descriptor(desc, parts):
    only_protocol_errors(P.array_from_frames, desc, [b"h", *parts])


@SETTINGS
@given(
    st.sampled_from(sorted(P.WIRE_DTYPES)),
    st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=4),
    st.sampled_from([*P.COMPRESSIONS, "lz4", None, 1]),
    st.sampled_from([*P.FILTERS, "shuffle", None]),
    st.one_of(
        st.binary(max_size=96),
        st.binary(max_size=400).map(lambda b: __import__("zstandard").ZstdCompressor().compress(b)),
    ),
)
def test_compressed_descriptors_never_overrun(dtype, shape, compression, filter_, payload):
    """Any descriptor and payload: an array of exactly the declared size, or a protocol error."""
    desc = {"frame": 1, "dtype": dtype, "shape": shape, "compression": compression, "filter": filter_}
    array = only_protocol_errors(P.array_from_frames, desc, [b"h", payload])
    if array is not None:
        assert list(array.shape) == shape and array.nbytes == math.prod(shape) * np.dtype(dtype).itemsize


@SETTINGS
@given(
    st.sampled_from(sorted(P.WIRE_DTYPES) + ["object", "float128", ""]),
    st.lists(st.integers(min_value=-1, max_value=2**70), min_size=0, max_size=6),
    st.integers(min_value=0, max_value=96),
)
def test_huge_and_wrong_shapes(dtype, shape, frame_bytes):
    """Huge declared shapes must not overflow into a size that happens to match the frame."""
    array = only_protocol_errors(
        P.array_from_frames, {"frame": 1, "dtype": dtype, "shape": shape}, [b"h", bytes(frame_bytes)]
    )
    if array is not None:
        assert array.nbytes == frame_bytes and list(array.shape) == shape


def test_empty_shape_too_big_for_numpy_is_refused():
    """No bytes, yet numpy refuses the shape (found by hypothesis): a clear error, not a ValueError."""
    with pytest.raises(P.ZDepthError, match="cannot make an array") as info:
        P.array_from_frames({"frame": 1, "dtype": "float16", "shape": [0, 132, 186906338, 186922582]}, [b"h", b""])
    assert info.value.code == P.BAD_REQUEST


def test_shape_that_wraps_int64_is_refused():
    """2**32 x 2**32 wraps to 0 in int64 arithmetic: it must not be taken for an empty frame."""
    with pytest.raises(P.ZDepthError):
        P.array_from_frames({"frame": 1, "dtype": "uint8", "shape": [2**32, 2**32]}, [b"h", b""])


@SETTINGS
@given(st.lists(st.binary(max_size=8), max_size=12))
def test_split_envelope(parts):
    result = only_protocol_errors(P.split_envelope, parts)
    if result is not None:
        envelope, body = result
        assert envelope + body == parts and envelope[-1] == b""
        assert all(frame for frame in envelope[:-1])


@SETTINGS
@given(st.sampled_from(sorted(VALID_PREDICT)), values)
def test_valid_header_with_one_wrong_value(field, value):
    """A valid prediction header with one field replaced by anything."""
    header = dict(VALID_PREDICT, **{field: value})
    only_protocol_errors(P.check_envelope_header, header)
    only_protocol_errors(parse_predict, header, [P.packb(header), PIXELS])


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(VALID_PREDICT) + ["image_url", "channels"]), values, max_size=8), frames)
def test_arbitrary_predict_headers(header, parts):
    only_protocol_errors(parse_predict, header, parts)


@SETTINGS
@given(st.sampled_from(sorted(VALID_IMAGE) + ["dtype", "channels"]), values)
def test_image_descriptor_with_wrong_value(field, value):
    header = dict(VALID_PREDICT, image=dict(VALID_IMAGE, **{field: value}))
    only_protocol_errors(parse_predict, header, [P.packb(header), PIXELS])


@SETTINGS
@given(st.integers(min_value=0, max_value=len(PIXELS) - 1))
def test_truncated_image_frame(cut):
    header = dict(VALID_PREDICT)
    with pytest.raises(P.ZDepthError) as info:
        parse_predict(header, [P.packb(header), PIXELS[:cut]])
    assert info.value.code == P.BAD_REQUEST


def test_valid_predict_header_parses():
    request = parse_predict(VALID_PREDICT, [P.packb(VALID_PREDICT), PIXELS])
    assert request.method == P.POINTCLOUD and request.image.shape == (2, 3, 3) and request.intrinsics.fx == 1.0


arrays = st.builds(
    lambda dtype, shape, seed: np.random.default_rng(seed).integers(0, 255, size=shape).astype(dtype),
    st.sampled_from(sorted(P.WIRE_DTYPES)),
    st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=P.MAX_ARRAY_DIMS).map(tuple),
    st.integers(min_value=0, max_value=2**32 - 1),
)


@SETTINGS
@given(
    st.dictionaries(st.text(min_size=1, max_size=8), arrays, max_size=4),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "arrays"), scalars, max_size=4),
    st.sampled_from(P.COMPRESSIONS),
)
def test_pack_unpack_round_trip(named_arrays, fields, compression):
    wire = [bytes(frame) for frame in P.pack(fields, named_arrays, compression=compression)]
    header, decoded = P.unpack(wire)
    for name, value in fields.items():
        assert header[name] == value or (isinstance(value, float) and math.isnan(value) and math.isnan(header[name]))
    assert set(decoded) == set(named_arrays)
    for name, array in named_arrays.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)


@SETTINGS
@given(values)
def test_safe_id_is_always_encodable(value):
    P.packb(P.error_header(P.safe_id({"id": value}), P.BAD_REQUEST, "x"))
