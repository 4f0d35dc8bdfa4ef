"""docs/protocol.md against the code: the wire specification must name everything the server
speaks, and the schema `describe` returns must agree with the server's own validation.

Fast and offline: no server, no sockets, no torch.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from zdepth import protocol as P
from zdepth.request import parse_predict

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC_PATH.is_file(), f"{DOC_PATH} is missing"
    return DOC_PATH.read_text(encoding="utf-8")


def section(doc: str, title_start: str) -> str:
    """The text of the `## ...` section whose title starts with `title_start`."""
    match = re.search(rf"^## {re.escape(title_start)}.*?$(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert match, f"docs/protocol.md has no section '## {title_start}...'"
    return match.group(1)


def mentioned(doc: str, name: str) -> bool:
    return f"`{name}`" in doc


# --- the document names everything ----------------------------------------------------------


def test_every_method_is_documented(doc):
    missing = sorted(m for m in P.METHODS if not mentioned(doc, m))
    assert not missing, f"methods missing from docs/protocol.md: {missing}"
    for method in P.METHODS:  # each has its own entry in the per-method table
        assert re.search(rf"^\| `{method}` \|", section(doc, "4. Request header"), re.M), method


def test_error_table_lists_every_code_with_its_retry_rule(doc):
    text = section(doc, "7. Error codes")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", text, re.M))
    assert set(rows) == set(P.ERROR_CODES), "the error table must list exactly protocol.ERROR_CODES"
    retryable = {code for code, retry in rows.items() if retry == "yes"}
    assert retryable == set(P.RETRYABLE_CODES), "the Retry column must match protocol.RETRYABLE_CODES"


def test_every_schema_field_is_documented(doc):
    fields = set(P.SCHEMA["common_fields"])
    for spec in P.SCHEMA["methods"].values():
        fields |= set(spec["fields"])
    missing = sorted(f for f in fields if not mentioned(doc, f))
    assert not missing, f"request fields missing from docs/protocol.md: {missing}"
    request_section = section(doc, "4. Request header")
    for name in fields:  # each field has a row in a field table
        assert re.search(rf"^\| `{name}` \|", request_section, re.M), f"no table row for `{name}`"


def test_image_and_intrinsics_keys_are_documented(doc):
    request_section = section(doc, "4. Request header")
    for key in ("frame", "format", "shape", "channels", "dtype"):
        assert re.search(rf"^\| `{key}` \|", request_section, re.M), f"image key `{key}` has no row"
    for key in ("fx", "fy", "cx", "cy"):
        assert key in request_section
    for name in (*P.IMAGE_FORMATS, *P.ENCODERS, *P.DATASETS, *P.OUTPUT_DTYPES, "bgr", "rgb"):
        assert mentioned(doc, name), name


def test_reply_fields_and_arrays_are_documented(doc):
    reply_section = section(doc, "6. Reply header")
    for name in P.SCHEMA["reply"]:
        assert mentioned(reply_section, name), f"reply field `{name}` missing from section 6"
    for name in ("decode_ms", "pre_ms", "inference_ms", "post_ms", "code", "message"):
        assert mentioned(reply_section, name), name
    for name in ("depth", "points", "colors"):
        assert mentioned(doc, name), name


def test_wire_dtypes_and_limits_are_documented(doc):
    framing = section(doc, "3. Framing")
    for dtype in P.WIRE_DTYPES:
        assert re.search(rf"^\| `{dtype}` \|", framing, re.M), f"wire dtype {dtype} has no row"
    assert "little-endian" in framing and "C order" in framing
    assert f"{P.MAX_HEADER_BYTES:,}" in doc
    assert f"1 to {P.MAX_ARRAY_DIMS}" in framing
    assert f"multiple of {P.PATCH_SIZE} from {P.MIN_INPUT_SIZE} to {P.MAX_INPUT_SIZE}" in doc
    assert f"| {P.DEFAULT_INPUT_SIZE} |" in doc
    for dataset, depth in P.DEFAULT_MAX_DEPTH.items():
        assert f"{depth:g} for `{dataset}`" in doc, (dataset, depth)
    assert "limits.md" in doc


def test_worker_protocol_is_documented(doc):
    text = section(doc, "11. Worker")
    assert f"`{P.WORKER_PROTOCOL.decode()}`" in text
    commands = {
        "READY": P.W_READY,
        "REQUEST": P.W_REQUEST,
        "REPLY": P.W_REPLY,
        "HEARTBEAT": P.W_HEARTBEAT,
        "DISCONNECT": P.W_DISCONNECT,
    }
    for name, byte in commands.items():
        assert len(byte) == 1
        assert re.search(rf"^\| `{name}` \| `0x{byte[0]:02x}` \|", text, re.M), f"{name} = 0x{byte[0]:02x} has no row"
    assert f"every **{P.HEARTBEAT_INTERVAL_S:g} s**" in text
    assert (
        f"{P.HEARTBEAT_LIVENESS} × {P.HEARTBEAT_INTERVAL_S:g} s = {P.HEARTBEAT_LIVENESS * P.HEARTBEAT_INTERVAL_S:g} s"
        in text
    )
    assert "status 3" in text


def test_port_offsets_are_documented(doc):
    text = section(doc, "2. Sockets and ports")
    ports = {
        0: "ROUTER",
        P.STREAM_PORT_OFFSET: "PULL",
        P.PUB_PORT_OFFSET: "PUB",
        P.BACKEND_PORT_OFFSET: "ROUTER",
        P.IMAGEZMQ_PORT_OFFSET: "REP",
    }
    assert len(set(ports)) == 5, "port offsets must differ"
    for offset, kind in ports.items():
        label = "P" if offset == 0 else f"P+{offset}"
        row = rf"^\| {re.escape(label)} \| {P.DEFAULT_PORT + offset} \| {kind} \|"
        assert re.search(row, text, re.M), f"no port row '{label} | {P.DEFAULT_PORT + offset} | {kind}'"


def test_serve_binds_the_documented_ports():
    """`zdepth serve --port P` puts the sockets where the port table says."""
    from zdepth import serve

    parser = argparse.ArgumentParser()
    serve.add_broker_arguments(parser)
    config = serve.broker_config(parser.parse_args(["--port", "6000", "--imagezmq"]))
    port = lambda endpoint: int(endpoint.rsplit(":", 1)[1])  # noqa: E731
    assert port(config.frontends[0]) == 6000
    assert port(config.stream) == 6000 + P.STREAM_PORT_OFFSET
    assert port(config.pub) == 6000 + P.PUB_PORT_OFFSET
    assert port(config.backend) == 6000 + P.BACKEND_PORT_OFFSET
    assert port(config.imagezmq) == 6000 + P.IMAGEZMQ_PORT_OFFSET


# --- the describe schema ----------------------------------------------------------------------


def test_schema_is_msgpack_encodable_and_fits_a_reply():
    encoded = P.packb(P.SCHEMA)
    assert P.unpackb(encoded) == P.SCHEMA  # only maps, lists, strings, numbers and bools
    reply = P.packb(P.ok_header(1, schema=P.SCHEMA))
    # clients decode reply headers with the same 64 KiB limit the server applies to requests
    assert len(reply) <= P.MAX_HEADER_BYTES
    assert P.decode_header(reply)["schema"] == P.SCHEMA


def test_schema_covers_methods_and_codes():
    assert P.SCHEMA["version"] == P.VERSION
    assert set(P.SCHEMA["methods"]) == set(P.METHODS)
    assert P.SCHEMA["error_codes"] == P.ERROR_CODES
    assert set(P.RETRYABLE_CODES) <= set(P.ERROR_CODES)
    for method in P.BROKER_METHODS:
        assert P.SCHEMA["methods"][method]["fields"] == {}
    for method in P.PREDICT_METHODS:
        fields = P.SCHEMA["methods"][method]["fields"]
        assert {"image", "image_url"} <= set(fields)
    assert P.SCHEMA["methods"][P.POINTCLOUD]["fields"]["intrinsics"].get("required") == "unless camera_info"
    assert P.SCHEMA["methods"][P.POINTCLOUD]["fields"]["encoder"]["enum"] == list(P.ENCODERS)
    assert P.SCHEMA["methods"][P.POINTCLOUD]["fields"]["dataset"]["enum"] == list(P.METRIC_DATASETS)
    assert P.SCHEMA["methods"][P.REL_DEPTH]["fields"]["dataset"]["enum"] == list(P.DATASETS)
    assert P.SCHEMA["methods"][P.METRIC_DEPTH]["fields"]["output_dtype"]["enum"] == list(P.OUTPUT_DTYPES)
    assert P.SCHEMA["methods"][P.POINTCLOUD]["fields"]["output_dtype"]["enum"] == ["float32", "float16"]
    assert P.SCHEMA["methods"][P.POINTCLOUD]["fields"]["compression"]["enum"] == list(P.COMPRESSIONS)


RAW_SHAPE = (4, 6, 3)

# A valid value for every request field `describe` lists. A field added to the schema must be
# added here too (and documented in docs/protocol.md): test_all_documented_fields_parse fails
# until it is.
VALID = {
    "v": P.VERSION,
    "method": None,  # filled per method
    "id": 11,
    "key": "sk-test",
    "timeout_ms": 1500,
    "image": {"frame": 1, "format": "raw", "shape": list(RAW_SHAPE), "channels": "rgb", "dtype": "uint8"},
    "image_url": "https://example.com/frame.jpg",
    "encoder": "vitb",
    "dataset": "vkitti",
    "max_depth": 12.5,
    "input_size": 280,
    "output_dtype": "float16",
    "depth_scale": 0.002,
    "compression": "zstd",
    "intrinsics": {"fx": 500.0, "fy": 501.0, "cx": 2.5, "cy": 1.5},
    "with_color": True,
    # the raw image (4 x 6) at half the calibration size; excludes `intrinsics`, so full_header leaves it out
    "camera_info": {
        "k": [500.0, 0, 5.5, 0, 501.0, 3.5, 0, 0, 1],
        "width": 12,
        "height": 8,
        "d": [0.0] * 5,
        "distortion_model": "plumb_bob",
    },
}

# Fields parse_predict reads (to validate them) for methods whose schema does not list them:
# they are accepted and checked, and have no effect there (docs/protocol.md section 4.3).
VALIDATED_ONLY = {
    P.METRIC_DEPTH: {"with_color"},
    P.REL_DEPTH: {"intrinsics", "camera_info", "with_color"},
    P.POINTCLOUD: set(),
}


def frames_for(header: dict) -> list:
    image = np.arange(int(np.prod(RAW_SHAPE)), dtype=np.uint8).reshape(RAW_SHAPE)
    return [P.packb(header), memoryview(image).cast("B")]


def documented_fields(method: str) -> set:
    return set(P.SCHEMA["common_fields"]) | set(P.SCHEMA["methods"][method]["fields"])


def full_header(method: str) -> dict:
    fields = documented_fields(method)
    unknown = sorted(fields - set(VALID))
    assert not unknown, f"new schema fields {unknown}: add valid values to VALID and document them"
    return {name: (method if name == "method" else VALID[name]) for name in fields - {"camera_info"}}


class RecordingHeader(dict):
    """A header that remembers which fields were looked up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@pytest.mark.parametrize("method", sorted(P.PREDICT_METHODS))
def test_all_documented_fields_parse(method):
    """A header carrying every field the schema documents, with valid values, is accepted by
    the broker's checks and by parse_predict, and each value takes effect."""
    header = full_header(method)
    assert P.check_envelope_header(header) == method
    # the header goes through msgpack like on the wire
    request = parse_predict(P.decode_header(P.packb(header)), frames_for(header), default_encoder="vits")
    assert request.method == method
    assert request.image.frame == 1 and request.image.format == "raw"  # `image` wins over `image_url`
    assert request.image.shape == RAW_SHAPE and request.image.channels == "rgb"
    assert request.encoder == VALID["encoder"]
    assert request.dataset == VALID["dataset"]
    assert request.input_size == VALID["input_size"]
    assert request.output_dtype == VALID["output_dtype"]
    assert request.compression == VALID["compression"]
    assert request.depth_scale is None  # validated, used only with uint16
    assert request.max_depth == (1.0 if method == P.REL_DEPTH else VALID["max_depth"])
    if method == P.POINTCLOUD:
        assert request.intrinsics is not None and request.intrinsics.fx == VALID["intrinsics"]["fx"]
        assert request.with_color is True
    else:
        assert request.intrinsics is None


@pytest.mark.parametrize("method", sorted(P.PREDICT_METHODS))
def test_parse_predict_reads_only_documented_fields(method):
    """Every field name parse_predict looks at appears in the schema (common or the method's
    fields; or, for fields validated without effect, in VALIDATED_ONLY)."""
    allowed = documented_fields(method) | VALIDATED_ONLY[method]
    for header in (
        full_header(method),
        {"v": 1, "method": method, "image": VALID["image"], "intrinsics": VALID["intrinsics"]},
    ):
        recorded = RecordingHeader(header)
        parse_predict(recorded, frames_for(header))
        undocumented = sorted(recorded.read - allowed)
        assert not undocumented, f"parse_predict reads {undocumented} for {method}, which describe does not list"


@pytest.mark.parametrize("method", sorted(P.PREDICT_METHODS))
def test_image_url_alone_parses(method):
    header = {k: v for k, v in full_header(method).items() if k != "image"}
    request = parse_predict(header, [P.packb(header)])
    assert request.image.url == VALID["image_url"] and request.image.frame is None


def test_schema_defaults_match_parse_predict():
    fields = P.SCHEMA["methods"][P.POINTCLOUD]["fields"]
    header = {"v": 1, "method": P.POINTCLOUD, "image": VALID["image"], "intrinsics": VALID["intrinsics"]}
    request = parse_predict(header, frames_for(header), default_encoder="vitl")
    assert request.encoder == "vitl"  # "the server's --encoder"
    assert request.dataset == fields["dataset"]["default"]
    assert request.input_size == fields["input_size"]["default"] == P.DEFAULT_INPUT_SIZE
    assert request.output_dtype == fields["output_dtype"]["default"]
    assert request.with_color is fields["with_color"]["default"]
    for dataset, depth in P.DEFAULT_MAX_DEPTH.items():
        parsed = parse_predict(dict(header, dataset=dataset), frames_for(header))
        assert parsed.max_depth == depth


@pytest.mark.parametrize("method", sorted(P.PREDICT_METHODS))
@pytest.mark.parametrize("field", ["encoder", "dataset", "output_dtype", "compression"])
def test_schema_enums_are_exactly_what_parse_predict_accepts(field, method):
    enum = P.SCHEMA["methods"][method]["fields"][field]["enum"]
    base = {"v": 1, "method": method, "image": VALID["image"], "intrinsics": VALID["intrinsics"]}
    for value in enum:
        if not (field == "dataset" and value == "relative" and method != P.REL_DEPTH):
            parse_predict(dict(base, **{field: value}), frames_for(base))
    refused = {"not-a-" + field} | (set(P.OUTPUT_DTYPES) - set(enum) if field == "output_dtype" else set())
    for value in refused:
        with pytest.raises(P.ZDepthError) as info:
            parse_predict(dict(base, **{field: value}), frames_for(base))
        assert info.value.code == P.BAD_REQUEST


# --- the worked examples in the document are real bytes -----------------------------------------


def hex_block(doc: str, name: str) -> bytes:
    match = re.search(rf"<!-- hex:{re.escape(name)} -->\s*```text\n(.*?)```", doc, re.S)
    assert match, f"no hex block '{name}' in docs/protocol.md"
    return bytes.fromhex(" ".join(match.group(1).split()))


def test_example_request_header_is_valid(doc):
    data = hex_block(doc, "request-header")
    assert f"these {len(data)} bytes" in doc and f"| header (frame 0) | {len(data)} |" in doc
    header = P.decode_header(data)
    assert P.check_envelope_header(header) == P.POINTCLOUD
    assert header["intrinsics"] == {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
    request = parse_predict(header, [data, b"\xff\xd8\xff\xe0 a jpeg, not decoded by the validator"])
    assert request.image.format == "jpeg" and request.max_depth == header["max_depth"]
    assert msgpack.packb(header, use_bin_type=True) == data  # the hex is what a packer writes


def test_example_reply_header_describes_the_points(doc):
    data = hex_block(doc, "reply-header")
    header = P.decode_header(data)
    assert header["ok"] is True and header["v"] == P.VERSION and header["id"] == 7
    desc = header["arrays"]["points"]
    points = np.zeros(desc["shape"], dtype=desc["dtype"])
    assert desc == P.describe_array(1, points) == {"frame": 1, "dtype": "float32", "shape": [640 * 480, 3]}
    assert f"{points.nbytes:,}" in doc
    # the arrays decode as documented: frame 1 counted from the header
    back = P.unpack([data, points.tobytes()])[1]["points"]
    assert back.shape == (307200, 3)
    assert set(header) <= set(P.SCHEMA["reply"]) | {"v"}


def test_example_stream_header_is_valid(doc):
    data = hex_block(doc, "stream-header")
    assert f"{len(data)} bytes of msgpack" in doc
    header = P.decode_header(data)
    assert P.check_envelope_header(header) == P.METRIC_DEPTH
    assert P.check_stream_name(header["stream"]) == "front"
    assert isinstance(header["seq"], int) and math.isfinite(header["t_capture"])
    raw = bytes(480 * 640 * 3)
    assert f"{len(raw):,}" in doc
    request = parse_predict(header, [data, raw])
    assert request.image.shape == (480, 640, 3) and request.image.channels == "bgr"


def test_example_compact_reply_decodes_as_documented(doc):
    """Worked example 3: the header and the zstd frame are real bytes that zdepth's own decoder
    and the documented steps (libzstd, running sum, x scale) both read as the table says."""
    import zstandard

    data, frame = hex_block(doc, "compact-reply-header"), hex_block(doc, "compact-reply-frame")
    assert f"the {len(data)} bytes the worker sends" in doc and f"**Frame 1**, {len(frame)} bytes" in doc
    header, arrays = P.unpack([data, frame])
    assert header["out_of_range"] == 1 and set(header) <= set(P.SCHEMA["reply"]) | {"v"}
    counts = [[1502, 1503, 1505, 1504], [2000, 2001, 0, 2003]]
    assert arrays["depth"].tolist() == counts
    assert zstandard.frame_content_size(frame) == 16
    deltas = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame, max_output_size=16), "<u2").reshape(2, 4)
    assert deltas.tolist() == [[1502, 1, 2, 65535], [2000, 1, 63535, 2003]]
    depth = np.array([[1.5021, 1.5032, 1.5049, 1.5041], [2.0004, 2.0011, 70.0, 2.0026]], np.float32)
    from zdepth.compact import quantise_depth

    assert quantise_depth(depth, 0.001)[0].tolist() == counts
    assert msgpack.packb(header, use_bin_type=True) == data
