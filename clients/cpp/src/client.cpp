// zdepth C++ client: the wire protocol of docs/protocol.md on cppzmq, msgpack-cxx and libzstd.
#include "zdepth/client.hpp"

#include <zmq.hpp>
#include <zmq_addon.hpp>
#include <zstd.h>

#include <msgpack.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string_view>
#include <thread>
#include <utility>

namespace zdepth {
namespace {

constexpr int kVersion = 1;  // protocol.VERSION
constexpr int kPubPortOffset = 2;  // protocol.PUB_PORT_OFFSET
constexpr std::size_t kMaxArrayDims = 4;  // protocol.MAX_ARRAY_DIMS
constexpr std::uint64_t kMaxArrayDim = (std::uint64_t{1} << 31) - 1;  // protocol.MAX_ARRAY_DIM
// Reply headers are small maps; a larger frame in the header position is refused unread.
constexpr std::size_t kMaxHeaderBytes = std::size_t{1} << 20;
constexpr int kClientHwm = 8;  // one request in flight: a deep queue would only hold stale ones
constexpr int kSubscriberHwm = 4;  // older results are worthless once a newer one arrives
// The deadline sent to the server is this much shorter than the client's wait (at most a fifth
// of it), so the server's own `timeout` answer arrives before the client stops listening.
constexpr std::chrono::milliseconds kServerMargin{200};
constexpr std::chrono::milliseconds kBackoff{50}, kBackoffMax{1000};

// docs/protocol.md section 7: the fixed set of codes, and those worth a resend.
constexpr std::string_view kErrorCodes[] = {"bad_request", "unauthorized", "unsupported_version", "unknown_method",
                                            "too_large", "rate_limited", "overloaded", "timeout",
                                            "worker_lost", "model_unavailable", "shutting_down", "internal"};
constexpr std::string_view kRetryableCodes[] = {"overloaded", "worker_lost", "timeout", "shutting_down"};

using Clock = std::chrono::steady_clock;
using Object = msgpack::object;
using Packer = msgpack::packer<msgpack::sbuffer>;

ServerError malformed(const std::string& what) { return ServerError("internal", "malformed reply: " + what); }

bool contains(const std::string_view* begin, const std::string_view* end, std::string_view value) {
    return std::find(begin, end, value) != end;
}

// --- msgpack: writing the request header -----------------------------------------------------

// A map written in one go: each entry is a key and a function that packs its value.
struct Field {
    std::string key;
    std::function<void(Packer&)> value;
};

void pack_map(Packer& packer, const std::vector<Field>& fields) {
    packer.pack_map(static_cast<std::uint32_t>(fields.size()));
    for (const Field& field : fields) {
        packer.pack(field.key);  // std::string packs as msgpack str, never bin
        field.value(packer);
    }
}

Field str_field(std::string key, std::string value) {
    return {std::move(key), [value = std::move(value)](Packer& p) { p.pack(value); }};
}

Field double_field(std::string key, double value) {
    return {std::move(key), [value](Packer& p) { p.pack_double(value); }};
}

Field map_field(std::string key, std::vector<Field> fields) {
    return {std::move(key), [fields = std::move(fields)](Packer& p) { pack_map(p, fields); }};
}

Field intrinsics_field(const Intrinsics& k) {
    return map_field("intrinsics", {double_field("fx", k.fx), double_field("fy", k.fy), double_field("cx", k.cx),
                                    double_field("cy", k.cy)});
}

Field camera_info_field(const CameraInfo& info) {
    std::vector<Field> fields = {
        {"k", [k = info.k](Packer& p) { p.pack_array(9); for (double x : k) p.pack_double(x); }},
        {"width", [w = info.width](Packer& p) { p.pack_int64(w); }},
        {"height", [h = info.height](Packer& p) { p.pack_int64(h); }},
    };
    if (!info.d.empty())
        fields.push_back({"d", [d = info.d](Packer& p) { p.pack_array(static_cast<std::uint32_t>(d.size())); for (double x : d) p.pack_double(x); }});
    if (!info.distortion_model.empty()) fields.push_back(str_field("distortion_model", info.distortion_model));
    return map_field("camera_info", std::move(fields));
}

// The prediction fields of docs/protocol.md 4.2 that are set, and the image.
std::vector<Field> prediction_fields(const Image& image, const Options& o) {
    std::vector<Field> fields;
    if (o.encoder) fields.push_back(str_field("encoder", *o.encoder));
    if (o.dataset) fields.push_back(str_field("dataset", *o.dataset));
    if (o.max_depth) fields.push_back(double_field("max_depth", *o.max_depth));
    if (o.input_size) fields.push_back({"input_size", [n = *o.input_size](Packer& p) { p.pack_int64(n); }});
    if (o.output_dtype) fields.push_back(str_field("output_dtype", *o.output_dtype));
    if (o.depth_scale) fields.push_back(double_field("depth_scale", *o.depth_scale));
    if (o.compression) fields.push_back(str_field("compression", *o.compression));
    if (o.intrinsics) fields.push_back(intrinsics_field(*o.intrinsics));
    if (o.with_color) fields.push_back({"with_color", [b = *o.with_color](Packer& p) { b ? p.pack_true() : p.pack_false(); }});
    if (o.camera_info) fields.push_back(camera_info_field(*o.camera_info));
    if (image.format.empty()) {
        fields.push_back(str_field("image_url", image.image_url));
        return fields;
    }
    std::vector<Field> desc = {{"frame", [](Packer& p) { p.pack_int64(1); }}, str_field("format", image.format)};
    if (image.format == "raw") {
        desc.push_back({"shape", [h = image.height, w = image.width](Packer& p) {
                            p.pack_array(3);
                            p.pack_int64(h);
                            p.pack_int64(w);
                            p.pack_int64(3);
                        }});
        desc.push_back(str_field("channels", image.channels == Channels::bgr ? "bgr" : "rgb"));
    }
    fields.push_back(map_field("image", std::move(desc)));
    return fields;
}

// --- msgpack: reading reply headers ----------------------------------------------------------

const Object* find(const Object& map, std::string_view key) {
    if (map.type != msgpack::type::MAP) return nullptr;
    for (std::uint32_t i = 0; i < map.via.map.size; ++i) {
        const msgpack::object_kv& kv = map.via.map.ptr[i];
        if (kv.key.type == msgpack::type::STR && std::string_view(kv.key.via.str.ptr, kv.key.via.str.size) == key)
            return &kv.val;
    }
    return nullptr;
}

std::optional<double> as_number(const Object* o) {
    if (!o) return std::nullopt;
    switch (o->type) {
    case msgpack::type::POSITIVE_INTEGER: return static_cast<double>(o->via.u64);
    case msgpack::type::NEGATIVE_INTEGER: return static_cast<double>(o->via.i64);
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: return o->via.f64;
    default: return std::nullopt;
    }
}

std::optional<std::int64_t> as_integer(const Object* o) {
    if (!o) return std::nullopt;
    if (o->type == msgpack::type::POSITIVE_INTEGER && o->via.u64 <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        return static_cast<std::int64_t>(o->via.u64);
    if (o->type == msgpack::type::NEGATIVE_INTEGER) return o->via.i64;
    return std::nullopt;
}

std::optional<std::string> as_string(const Object* o) {
    if (!o || o->type != msgpack::type::STR) return std::nullopt;
    return std::string(o->via.str.ptr, o->via.str.size);
}

bool has_ext(const Object& o) {
    switch (o.type) {
    case msgpack::type::EXT: return true;
    case msgpack::type::ARRAY:
        return std::any_of(o.via.array.ptr, o.via.array.ptr + o.via.array.size, has_ext);
    case msgpack::type::MAP:
        return std::any_of(o.via.map.ptr, o.via.map.ptr + o.via.map.size,
                           [](const msgpack::object_kv& kv) { return has_ext(kv.key) || has_ext(kv.val); });
    default: return false;
    }
}

msgpack::object_handle decode_header(const zmq::message_t& frame) {
    if (frame.size() > kMaxHeaderBytes)
        throw malformed("header frame of " + std::to_string(frame.size()) + " bytes (limit " + std::to_string(kMaxHeaderBytes) + ")");
    msgpack::object_handle handle;
    try {
        const msgpack::unpack_limit limit(1 << 16, 1 << 16, kMaxHeaderBytes, kMaxHeaderBytes, 0, 32);
        handle = msgpack::unpack(frame.data<char>(), frame.size(), nullptr, nullptr, limit);
    } catch (const std::exception& e) {
        throw malformed(std::string("header is not valid msgpack (") + e.what() + ")");
    }
    if (handle.get().type != msgpack::type::MAP) throw malformed("header is not a msgpack map");
    if (has_ext(handle.get())) throw malformed("header holds a msgpack extension type");
    return handle;
}

void append_json_string(std::string& out, std::string_view s) {
    out += '"';
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    out += '"';
}

// A msgpack value as JSON text (bin as a byte count, non-finite floats as null).
void append_json(std::string& out, const Object& o) {
    char buf[32];
    switch (o.type) {
    case msgpack::type::NIL: out += "null"; break;
    case msgpack::type::BOOLEAN: out += o.via.boolean ? "true" : "false"; break;
    case msgpack::type::POSITIVE_INTEGER: out += std::to_string(o.via.u64); break;
    case msgpack::type::NEGATIVE_INTEGER: out += std::to_string(o.via.i64); break;
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64:
        if (std::isfinite(o.via.f64)) {
            std::snprintf(buf, sizeof buf, "%.17g", o.via.f64);
            out += buf;
        } else {
            out += "null";
        }
        break;
    case msgpack::type::STR: append_json_string(out, std::string_view(o.via.str.ptr, o.via.str.size)); break;
    case msgpack::type::BIN: append_json_string(out, "<" + std::to_string(o.via.bin.size) + " bytes>"); break;
    case msgpack::type::ARRAY:
        out += '[';
        for (std::uint32_t i = 0; i < o.via.array.size; ++i) {
            if (i) out += ", ";
            append_json(out, o.via.array.ptr[i]);
        }
        out += ']';
        break;
    case msgpack::type::MAP:
        out += '{';
        for (std::uint32_t i = 0; i < o.via.map.size; ++i) {
            if (i) out += ", ";
            const msgpack::object_kv& kv = o.via.map.ptr[i];
            if (kv.key.type == msgpack::type::STR) {
                append_json(out, kv.key);
            } else {
                std::string key;
                append_json(key, kv.key);
                append_json_string(out, key);
            }
            out += ": ";
            append_json(out, kv.val);
        }
        out += '}';
        break;
    default: out += "null"; break;
    }
}

// ok: true, or the error reply as a ServerError (an unknown code becomes internal).
void check_ok(const Object& header) {
    const Object* ok = find(header, "ok");
    if (ok && ok->type == msgpack::type::BOOLEAN && ok->via.boolean) return;
    const Object* error = find(header, "error");
    std::string code = error ? as_string(find(*error, "code")).value_or("") : "";
    std::string message = error ? as_string(find(*error, "message")).value_or("") : "";
    if (!contains(std::begin(kErrorCodes), std::end(kErrorCodes), code)) {
        message = "error reply with unknown code '" + code + "': " + message;
        code = "internal";
    }
    throw ServerError(code, message);
}

void read_reply_fields(const Object& header, Reply& reply) {
    reply.min = as_number(find(header, "min"));
    reply.max = as_number(find(header, "max"));
    reply.model = as_string(find(header, "model")).value_or("");
    reply.worker = as_string(find(header, "worker")).value_or("");
    reply.out_of_range = as_integer(find(header, "out_of_range"));
    if (const Object* timing = find(header, "timing"); timing && timing->type == msgpack::type::MAP) {
        for (std::uint32_t i = 0; i < timing->via.map.size; ++i) {
            auto key = as_string(&timing->via.map.ptr[i].key);
            auto value = as_number(&timing->via.map.ptr[i].val);
            if (key && value) reply.timing[*key] = *value;
        }
    }
}

// --- arrays ----------------------------------------------------------------------------------

// A reply array descriptor (docs/protocol.md 3.3), checked against the frames it points at.
struct Descriptor {
    std::string name, dtype, compression = "none", filter = "none";
    const zmq::message_t* frame = nullptr;
    std::vector<std::size_t> shape;
    std::size_t elements = 1, itemsize = 0;
    double scale = 1.0;
};

std::size_t itemsize_of(const std::string& dtype) {
    if (dtype == "uint8") return 1;
    if (dtype == "uint16" || dtype == "float16") return 2;
    if (dtype == "float32") return 4;
    return 0;  // int32 and float64 are allowed on the wire but never produced for a reply array
}

// `parts[header_index]` is the header; descriptor frame i is parts[header_index + i].
Descriptor descriptor(const Object& header, const std::string& name, const std::vector<zmq::message_t>& parts,
                      std::size_t header_index, std::size_t max_bytes) {
    const Object* arrays = find(header, "arrays");
    const Object* d = arrays ? find(*arrays, name) : nullptr;
    if (!d || d->type != msgpack::type::MAP) throw malformed("no array '" + name + "' in the reply");
    Descriptor desc;
    desc.name = name;
    const std::string what = "array '" + name + "': ";
    const Object* frame = find(*d, "frame");
    const std::size_t n_after = parts.size() - header_index - 1;
    if (!frame || frame->type != msgpack::type::POSITIVE_INTEGER || frame->via.u64 < 1 || frame->via.u64 > n_after)
        throw malformed(what + "`frame` must be an integer from 1 to " + std::to_string(n_after));
    desc.frame = &parts[header_index + frame->via.u64];
    desc.dtype = as_string(find(*d, "dtype")).value_or("");
    desc.itemsize = itemsize_of(desc.dtype);
    if (!desc.itemsize) throw malformed(what + "unsupported dtype '" + desc.dtype + "'");
    const Object* shape = find(*d, "shape");
    if (!shape || shape->type != msgpack::type::ARRAY || shape->via.array.size < 1 || shape->via.array.size > kMaxArrayDims)
        throw malformed(what + "`shape` must be a list of 1 to 4 integers");
    for (std::uint32_t i = 0; i < shape->via.array.size; ++i) {
        const Object& n = shape->via.array.ptr[i];
        if (n.type != msgpack::type::POSITIVE_INTEGER || n.via.u64 > kMaxArrayDim)
            throw malformed(what + "`shape` entries must be integers from 0 to 2147483647");
        desc.shape.push_back(static_cast<std::size_t>(n.via.u64));
        if (n.via.u64 && desc.elements > max_bytes / n.via.u64) throw malformed(what + "larger than max_array_bytes");
        desc.elements *= static_cast<std::size_t>(n.via.u64);
    }
    if (desc.elements > max_bytes / std::max<std::size_t>(desc.itemsize, sizeof(float)))
        throw malformed(what + "larger than max_array_bytes");
    if (const Object* c = find(*d, "compression"); c && c->type != msgpack::type::NIL)
        desc.compression = as_string(c).value_or("?");
    if (desc.compression != "none" && desc.compression != "zstd")
        throw malformed(what + "unknown compression '" + desc.compression + "'");
    if (const Object* f = find(*d, "filter"); f && f->type != msgpack::type::NIL) desc.filter = as_string(f).value_or("?");
    if (desc.filter != "none" && !(desc.filter == "delta_row" && desc.dtype == "uint16"))
        throw malformed(what + "filter must be none, or delta_row on uint16, got '" + desc.filter + "' on " + desc.dtype);
    if (const Object* s = find(*d, "scale"); s && s->type != msgpack::type::NIL) {
        auto scale = as_number(s);
        if (!scale || !std::isfinite(*scale) || *scale <= 0) throw malformed(what + "`scale` must be a finite number > 0");
        desc.scale = *scale;
    }
    return desc;
}

// The array's bytes as dtype x shape: the frame itself, or its zstd frame decompressed into
// `storage` with exactly that many bytes of room (more or fewer is an error, never an overrun).
const std::uint8_t* raw_bytes(const Descriptor& desc, std::vector<std::uint8_t>& storage) {
    const std::size_t expected = desc.elements * desc.itemsize;
    const auto* src = desc.frame->data<std::uint8_t>();
    const std::size_t size = desc.frame->size();
    const std::string what = "array '" + desc.name + "': ";
    if (desc.compression == "none") {
        if (size != expected)
            throw malformed(what + "shape of " + desc.dtype + " needs " + std::to_string(expected) + " bytes, the frame has " + std::to_string(size));
        return src;
    }
    if (ZSTD_findFrameCompressedSize(src, size) != size) throw malformed(what + "the frame is not exactly one zstd frame");
    const unsigned long long content = ZSTD_getFrameContentSize(src, size);
    if (content != ZSTD_CONTENTSIZE_UNKNOWN && content != expected)
        throw malformed(what + "zstd frame holds " + std::to_string(content) + " bytes, shape of " + desc.dtype + " needs " + std::to_string(expected));
    storage.resize(expected);
    const std::size_t got = ZSTD_decompress(storage.data(), expected, src, size);
    if (ZSTD_isError(got))
        throw malformed(what + "zstd: " + ZSTD_getErrorName(got) + " (shape of " + desc.dtype + " needs " + std::to_string(expected) + " bytes)");
    if (got != expected)
        throw malformed(what + "zstd frame inflates to " + std::to_string(got) + " bytes, shape of " + desc.dtype + " needs " + std::to_string(expected));
    return storage.data();
}

// Little-endian loads; on little-endian hosts the compiler turns these into plain moves.
std::uint16_t load_u16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] | (p[1] << 8)); }

std::uint32_t load_u32(const std::uint8_t* p) {
    return std::uint32_t{p[0]} | (std::uint32_t{p[1]} << 8) | (std::uint32_t{p[2]} << 16) | (std::uint32_t{p[3]} << 24);
}

float float_from_bits(std::uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

// IEEE 754 binary16 -> binary32, exact (subnormals, infinities and NaN payloads included).
float half_to_float(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
    std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return float_from_bits(sign);
        std::uint32_t shift = 0;  // a subnormal: normalise it
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            ++shift;
        }
        return float_from_bits(sign | ((113 - shift) << 23) | ((mantissa & 0x3ffu) << 13));
    }
    return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// float32 metres from any of the reply forms (compact-spec: value = stored x scale; uint16
// count 0 = no depth = 0).
Array decode_float_array(const Descriptor& desc) {
    std::vector<std::uint8_t> storage;
    const std::uint8_t* bytes = raw_bytes(desc, storage);
    Array out;
    out.shape = desc.shape;
    out.wire_dtype = desc.dtype;
    out.compression = desc.compression;
    out.filter = desc.filter;
    out.scale = desc.scale;
    out.values.resize(desc.elements);
    float* values = out.values.data();
    const std::size_t n = desc.elements;
    if (desc.dtype == "float32") {
        for (std::size_t i = 0; i < n; ++i) values[i] = float_from_bits(load_u32(bytes + 4 * i));
    } else if (desc.dtype == "float16") {
        for (std::size_t i = 0; i < n; ++i) values[i] = half_to_float(load_u16(bytes + 2 * i));
    } else if (desc.dtype == "uint16") {
        const float scale = static_cast<float>(desc.scale);
        const std::size_t width = desc.filter == "delta_row" ? desc.shape.back() : 0;  // rows: the last axis
        std::uint16_t previous = 0;
        for (std::size_t i = 0; i < n; ++i) {
            std::uint16_t count = load_u16(bytes + 2 * i);
            if (width) {  // delta_row: a running sum mod 65536 along each row
                if (i % width) count = static_cast<std::uint16_t>(previous + count);
                previous = count;
            }
            values[i] = static_cast<float>(count) * scale;
        }
        return out;
    } else {
        throw malformed("array '" + desc.name + "': dtype " + desc.dtype + " cannot hold metres");
    }
    if (desc.scale != 1.0) {
        const float scale = static_cast<float>(desc.scale);
        for (float& v : out.values) v *= scale;
    }
    return out;
}

std::vector<std::uint8_t> decode_colors(const Descriptor& desc) {
    if (desc.dtype != "uint8") throw malformed("array 'colors' must be uint8, got " + desc.dtype);
    std::vector<std::uint8_t> storage;
    const std::uint8_t* bytes = raw_bytes(desc, storage);
    return storage.empty() ? std::vector<std::uint8_t>(bytes, bytes + desc.elements) : std::move(storage);
}

bool has_array(const Object& header, const char* name) {
    const Object* arrays = find(header, "arrays");
    return arrays && find(*arrays, name);
}

// --- sockets ---------------------------------------------------------------------------------

void apply_curve(zmq::socket_t& socket, const std::optional<CurveKeys>& curve) {
    if (!curve) return;
    socket.set(zmq::sockopt::curve_serverkey, curve->server_public);
    socket.set(zmq::sockopt::curve_publickey, curve->public_key);
    socket.set(zmq::sockopt::curve_secretkey, curve->secret_key);
}

// A frame may carry a compressed array a little larger than its raw size, plus its header.
std::int64_t max_message_size(std::size_t max_array_bytes) {
    const std::uint64_t limit = std::uint64_t{max_array_bytes} + (max_array_bytes >> 7) + (std::uint64_t{1} << 20);
    return static_cast<std::int64_t>(std::min<std::uint64_t>(limit, std::numeric_limits<std::int64_t>::max()));
}

bool is_z85_key(const std::string& key) {
    std::uint8_t decoded[32];
    return key.size() == 40 && zmq_z85_decode(decoded, key.c_str()) != nullptr;
}

// (public-key, secret-key) of a ZPL certificate as zmq.auth writes it; secret empty if absent.
std::pair<std::string, std::string> load_certificate(const std::string& path, const std::string& what) {
    std::ifstream in(path);
    if (!in) throw std::invalid_argument(what + ": cannot read certificate file '" + path + "'");
    std::string line, public_key, secret_key;
    while (std::getline(in, line)) {
        const auto eq = line.find('=');
        const auto open = line.find('"'), close = line.rfind('"');
        if (eq == std::string::npos || open == std::string::npos || close <= open) continue;
        std::string name = line.substr(0, eq);
        name.erase(std::remove_if(name.begin(), name.end(), [](unsigned char c) { return std::isspace(c); }), name.end());
        const std::string value = line.substr(open + 1, close - open - 1);
        if (name == "public-key") public_key = value;
        if (name == "secret-key") secret_key = value;
    }
    if (!is_z85_key(public_key)) throw std::invalid_argument(what + ": no valid public-key in '" + path + "'");
    if (!secret_key.empty() && !is_z85_key(secret_key)) throw std::invalid_argument(what + ": invalid secret-key in '" + path + "'");
    return {public_key, secret_key};
}

bool is_file(const std::string& path) { return std::ifstream(path).good(); }

}  // namespace

// --- public types ----------------------------------------------------------------------------

Error::Error(std::string code, std::string message)
    : std::runtime_error(code + ": " + message), code_(std::move(code)), message_(std::move(message)) {}

bool Error::retryable() const noexcept { return contains(std::begin(kRetryableCodes), std::end(kRetryableCodes), code_); }

Timeout::Timeout(std::string message) : Error("timeout", std::move(message)) {}

Image Image::encoded(const std::uint8_t* data, std::size_t size) {
    static const std::uint8_t jpeg[] = {0xff, 0xd8, 0xff};
    static const std::uint8_t png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    Image image;
    if (size >= sizeof jpeg && std::memcmp(data, jpeg, sizeof jpeg) == 0) image.format = "jpeg";
    else if (size >= sizeof png && std::memcmp(data, png, sizeof png) == 0) image.format = "png";
    else throw std::invalid_argument("image bytes are neither JPEG nor PNG; use Image::raw for pixels");
    image.data = data;
    image.size = size;
    return image;
}

Image Image::raw(const std::uint8_t* pixels, int height, int width, Channels channels) {
    if (height < 1 || width < 1) throw std::invalid_argument("a raw image needs height >= 1 and width >= 1");
    Image image;
    image.format = "raw";
    image.data = pixels;
    image.size = static_cast<std::size_t>(height) * static_cast<std::size_t>(width) * 3;
    image.height = height;
    image.width = width;
    image.channels = channels;
    return image;
}

Image Image::url(std::string url) {
    Image image;
    image.image_url = std::move(url);
    return image;
}

double Reply::compute_ms() const {
    double total = 0;
    for (const auto& [key, ms] : timing) total += ms;
    return total;
}

void StreamResult::throw_if_error() const {
    if (!ok) throw ServerError(error_code, error_message);
}

CurveKeys CurveKeys::load(const std::string& server_key, const std::string& client_certificate) {
    if (!zmq_has("curve")) throw std::runtime_error("this libzmq was built without CURVE support");
    CurveKeys keys;
    if (is_file(server_key)) keys.server_public = load_certificate(server_key, "server key").first;
    else if (is_z85_key(server_key)) keys.server_public = server_key;
    else throw std::invalid_argument("server key must be a 40-character Z85 key or a certificate file");
    char public_key[41], secret_key[41];
    if (client_certificate.empty()) {
        if (zmq_curve_keypair(public_key, secret_key) != 0) throw std::runtime_error("zmq_curve_keypair failed");
    } else {
        auto [pub, sec] = load_certificate(client_certificate, "client certificate");
        if (sec.empty()) throw std::invalid_argument("client certificate '" + client_certificate + "' has no secret key; give the NAME.key_secret file");
        std::memcpy(secret_key, sec.c_str(), 41);
        if (zmq_curve_public(public_key, secret_key) != 0 || pub != public_key)
            throw std::invalid_argument("client certificate: the public key does not belong to the secret key");
    }
    keys.public_key = public_key;
    keys.secret_key = secret_key;
    return keys;
}

std::string results_endpoint(const std::string& request_endpoint) {
    const std::string scheme = "tcp://";
    const auto colon = request_endpoint.rfind(':');
    const std::string port = colon == std::string::npos ? "" : request_endpoint.substr(colon + 1);
    if (request_endpoint.rfind(scheme, 0) != 0 || colon < scheme.size() || port.empty() || port.size() > 5 ||
        !std::all_of(port.begin(), port.end(), [](unsigned char c) { return std::isdigit(c); }))
        throw std::invalid_argument("cannot derive the results endpoint from '" + request_endpoint + "'; give it explicitly");
    return request_endpoint.substr(0, colon + 1) + std::to_string(std::stoi(port) + kPubPortOffset);
}

std::vector<std::uint8_t> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read '" + path + "'");
    return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// --- Client ----------------------------------------------------------------------------------

// A reply: its frames, where the header is among them, and the decoded header.
struct Received {
    std::vector<zmq::message_t> parts;
    std::size_t header_index = 0;
    msgpack::object_handle header;
};

struct Client::Impl {
    ClientConfig config;
    zmq::context_t context{1};
    std::optional<zmq::socket_t> socket;
    std::uint64_t next_id = 1;
    std::uint64_t sends = 0;

    explicit Impl(ClientConfig c) : config(std::move(c)) {
        if (config.timeout.count() <= 0) throw std::invalid_argument("timeout must be > 0");
        if (config.retries < 0) throw std::invalid_argument("retries must be >= 0");
        if (config.try_timeout && config.try_timeout->count() <= 0) throw std::invalid_argument("try_timeout must be > 0");
        connect();
    }

    void connect() {
        const bool dealer = config.socket == SocketKind::dealer;
        socket.emplace(context, dealer ? zmq::socket_type::dealer : zmq::socket_type::req);
        socket->set(zmq::sockopt::linger, 0);
        socket->set(zmq::sockopt::sndhwm, kClientHwm);
        socket->set(zmq::sockopt::rcvhwm, kClientHwm);
        socket->set(zmq::sockopt::maxmsgsize, max_message_size(config.max_array_bytes));
        socket->set(zmq::sockopt::ipv6, 1);  // tcp://[::1]:P and IPv6 host names
        apply_curve(*socket, config.curve);
        socket->connect(config.endpoint);
    }

    // After silence the peer may be gone, and a REQ socket is stuck waiting: start afresh.
    void reconnect() {
        socket->close();
        socket.reset();
        connect();
    }

    // One request, retried as ClientConfig says; the reply has ok == true (else ServerError).
    Received request(const std::string& method, const std::vector<Field>& fields, const Image* image) {
        const auto deadline = Clock::now() + config.timeout;
        const int tries = config.retries + 1;
        const std::uint64_t id = next_id++;
        std::optional<ServerError> last_error;
        int sent = 0;
        for (int attempt = 0; attempt < tries; ++attempt) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
            const auto wait = config.try_timeout ? std::min(*config.try_timeout, left) : left;
            if (wait.count() <= 0) break;
            const auto server_wait = wait - std::min<std::chrono::milliseconds>(kServerMargin, wait / 5);
            ++sent;
            if (!send(method, id, std::max<std::int64_t>(1, server_wait.count()), fields, image)) {
                reconnect();
                continue;
            }
            std::optional<Received> reply = receive(id, Clock::now() + wait);
            if (!reply) {
                reconnect();
                if (config.try_timeout) continue;  // Lazy Pirate: resend on the fresh socket
                break;
            }
            try {
                check_ok(reply->header.get());
                return std::move(*reply);
            } catch (const ServerError& error) {
                // The server's `timeout` means the time for this try is spent: not resent.
                if (!error.retryable() || error.code() == "timeout") throw;
                last_error = error;
            }
            const auto backoff = std::min({kBackoff * (1 << std::min(attempt, 10)), kBackoffMax,
                                           std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now())});
            if (backoff.count() > 0) std::this_thread::sleep_for(backoff);
        }
        if (last_error) throw *last_error;
        const std::string hint = config.curve ? " (CURVE is on: a wrong server key or a client key the server does not allow also looks like this)" : "";
        throw Timeout("no reply from " + config.endpoint + " to " + method + " within " + std::to_string(config.timeout.count()) +
                      " ms (" + std::to_string(sent) + (sent == 1 ? " try)" : " tries)") + hint);
    }

    bool send(const std::string& method, std::uint64_t id, std::int64_t timeout_ms, const std::vector<Field>& fields, const Image* image) {
        std::vector<Field> header = {{"v", [](Packer& p) { p.pack_int64(kVersion); }},
                                     str_field("method", method),
                                     {"id", [id](Packer& p) { p.pack_uint64(id); }},
                                     {"timeout_ms", [timeout_ms](Packer& p) { p.pack_int64(timeout_ms); }}};
        if (!config.key.empty()) header.push_back(str_field("key", config.key));
        header.insert(header.end(), fields.begin(), fields.end());
        msgpack::sbuffer buffer;
        Packer packer(buffer);
        pack_map(packer, header);

        std::vector<zmq::message_t> parts;
        if (config.socket == SocketKind::dealer) parts.emplace_back();  // REQ adds the delimiter itself
        parts.emplace_back(buffer.data(), buffer.size());
        if (image && image->data) parts.emplace_back(image->data, image->size);
        ++sends;
        // A fresh socket has its pipe from connect(): a full pipe means the try failed.
        return zmq::send_multipart(*socket, parts, zmq::send_flags::dontwait).has_value();
    }

    // The reply to `id`, or nullopt at the deadline. Replies to earlier ids are stale: dropped.
    std::optional<Received> receive(std::uint64_t id, Clock::time_point deadline) {
        while (true) {
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
            zmq::pollitem_t item{socket->handle(), 0, ZMQ_POLLIN, 0};
            if (left.count() <= 0 || zmq::poll(&item, 1, left) == 0) return std::nullopt;
            Received reply;
            if (!zmq::recv_multipart(*socket, std::back_inserter(reply.parts), zmq::recv_flags::dontwait)) continue;
            reply.header_index = config.socket == SocketKind::dealer ? 1 : 0;
            if (reply.parts.size() <= reply.header_index || (reply.header_index && reply.parts[0].size() != 0))
                throw malformed("no header after the envelope");
            reply.header = decode_header(reply.parts[reply.header_index]);
            const Object* reply_id = find(reply.header.get(), "id");
            if (reply_id && reply_id->type == msgpack::type::POSITIVE_INTEGER && reply_id->via.u64 == id) return reply;
        }
    }

    template <class Result>
    Result predict(const char* method, const Image& image, const Options& options) {
        Received reply = request(method, prediction_fields(image, options), &image);
        Result result;
        read_reply_fields(reply.header.get(), result);
        auto desc = [&](const std::string& name) {
            return descriptor(reply.header.get(), name, reply.parts, reply.header_index, config.max_array_bytes);
        };
        if constexpr (std::is_same_v<Result, DepthResult>) {
            result.depth = decode_float_array(desc("depth"));
        } else {
            result.points = decode_float_array(desc("points"));
            if (has_array(reply.header.get(), "colors")) result.colors = decode_colors(desc("colors"));
        }
        return result;
    }
};

Client::Client(ClientConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}
Client::~Client() = default;
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;

DepthResult Client::metric_depth(const Image& image, const Options& options) {
    return impl_->predict<DepthResult>("metric_depth", image, options);
}

DepthResult Client::rel_depth(const Image& image, const Options& options) {
    return impl_->predict<DepthResult>("rel_depth", image, options);
}

PointCloudResult Client::pointcloud(const Image& image, const Intrinsics& intrinsics, Options options) {
    options.intrinsics = intrinsics;
    return impl_->predict<PointCloudResult>("pointcloud", image, options);
}

PointCloudResult Client::pointcloud(const Image& image, const Options& options) {
    if (options.intrinsics.has_value() == options.camera_info.has_value())
        throw std::invalid_argument("pointcloud needs exactly one of options.intrinsics and options.camera_info");
    return impl_->predict<PointCloudResult>("pointcloud", image, options);
}

Health Client::health() {
    Received reply = impl_->request("health", {}, nullptr);
    const Object& header = reply.header.get();
    Health health;
    health.status = as_string(find(header, "status")).value_or("");
    if (const Object* workers = find(header, "workers"); workers && workers->type == msgpack::type::ARRAY)
        health.workers = workers->via.array.size;
    const Object* auth = find(header, "auth");
    health.auth = auth && auth->type == msgpack::type::BOOLEAN && auth->via.boolean;
    const Object* encrypted = find(header, "encrypted");
    health.encrypted = encrypted && encrypted->type == msgpack::type::BOOLEAN && encrypted->via.boolean;
    append_json(health.json, header);
    return health;
}

std::uint64_t Client::sends() const noexcept { return impl_->sends; }

// --- Subscriber ------------------------------------------------------------------------------

struct Subscriber::Impl {
    SubscriberConfig config;
    zmq::context_t context{1};
    zmq::socket_t socket{context, zmq::socket_type::sub};

    explicit Impl(SubscriberConfig c) : config(std::move(c)) {
        socket.set(zmq::sockopt::linger, 0);
        socket.set(zmq::sockopt::rcvhwm, kSubscriberHwm);
        socket.set(zmq::sockopt::maxmsgsize, max_message_size(config.max_array_bytes));
        socket.set(zmq::sockopt::ipv6, 1);
        apply_curve(socket, config.curve);
        if (config.streams.empty()) socket.set(zmq::sockopt::subscribe, "");
        for (const std::string& name : config.streams) socket.set(zmq::sockopt::subscribe, name);
        socket.connect(config.endpoint);
    }

    bool wanted(const zmq::message_t& topic) const {
        if (config.streams.empty()) return true;
        const std::string_view name(topic.data<char>(), topic.size());
        return std::find(config.streams.begin(), config.streams.end(), name) != config.streams.end();
    }

    StreamResult parse(std::vector<zmq::message_t>& parts) const {
        if (parts.size() < 2) throw malformed("no header frame after the topic");
        msgpack::object_handle handle = decode_header(parts[1]);
        const Object& header = handle.get();
        StreamResult result;
        result.stream = parts[0].to_string();
        result.seq = as_integer(find(header, "seq"));
        result.t_capture = as_number(find(header, "t_capture")).value_or(0);
        result.t_received = as_number(find(header, "t_received")).value_or(0);
        result.t_done = as_number(find(header, "t_done")).value_or(0);
        result.latency_ms = as_number(find(header, "latency_ms")).value_or(0);
        result.dropped = as_integer(find(header, "dropped")).value_or(0);
        try {
            check_ok(header);
        } catch (const ServerError& error) {
            result.error_code = error.code();
            result.error_message = error.message();
            return result;
        }
        result.ok = true;
        read_reply_fields(header, result);
        auto desc = [&](const std::string& name) { return descriptor(header, name, parts, 1, config.max_array_bytes); };
        if (has_array(header, "depth")) result.depth = decode_float_array(desc("depth"));
        if (has_array(header, "points")) result.points = decode_float_array(desc("points"));
        if (has_array(header, "colors")) result.colors = decode_colors(desc("colors"));
        return result;
    }
};

Subscriber::Subscriber(SubscriberConfig config) : impl_(std::make_unique<Impl>(std::move(config))) {}
Subscriber::~Subscriber() = default;
Subscriber::Subscriber(Subscriber&&) noexcept = default;
Subscriber& Subscriber::operator=(Subscriber&&) noexcept = default;

std::optional<StreamResult> Subscriber::receive(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (true) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
        zmq::pollitem_t item{impl_->socket.handle(), 0, ZMQ_POLLIN, 0};
        if (left.count() <= 0 || zmq::poll(&item, 1, left) == 0) return std::nullopt;
        std::vector<zmq::message_t> parts;
        if (!zmq::recv_multipart(impl_->socket, std::back_inserter(parts), zmq::recv_flags::dontwait)) continue;
        if (impl_->wanted(parts[0])) return impl_->parse(parts);
    }
}

}  // namespace zdepth
