// zdepth C++ client: depth, relative depth and point clouds from a zdepth server, and live
// stream results, over the zdepth wire protocol version 1 (docs/protocol.md).
//
//     zdepth::ClientConfig config;
//     config.endpoint = "tcp://gpu-server:5555";
//     config.key = "zd-...";                              // when the server has --require-auth
//     zdepth::Client client(config);
//     auto jpeg = zdepth::read_file("frame.jpg");
//     zdepth::DepthResult r = client.metric_depth(zdepth::Image::encoded(jpeg));
//     float z = r.depth.values[v * r.depth.shape[1] + u];  // metres
//
// Arrays come back as float32 metres in C order whatever form they travelled in (float32,
// float16, uint16 counts of `scale` metres, zstd-compressed with or without the delta_row
// filter). Errors are exceptions: `ServerError` carries the protocol's error code,
// `Timeout` means no reply came within the client's timeout, after all retries.
//
// Dependencies (cppzmq, msgpack-cxx, libzstd) stay inside the library: this header needs only
// the standard library. A Client or Subscriber is not thread-safe: use one per thread.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace zdepth {

// --- errors ----------------------------------------------------------------------------------

// An error with one of the protocol's codes (docs/protocol.md section 7): bad_request,
// unauthorized, unsupported_version, unknown_method, too_large, rate_limited, overloaded,
// timeout, worker_lost, model_unavailable, shutting_down, internal.
class Error : public std::runtime_error {
public:
    Error(std::string code, std::string message);
    const std::string& code() const noexcept { return code_; }
    const std::string& message() const noexcept { return message_; }
    // True for the codes after which the same request may succeed: overloaded, worker_lost,
    // timeout, shutting_down.
    bool retryable() const noexcept;

private:
    std::string code_;
    std::string message_;
};

// The server answered with an error reply. A reply this client cannot read (not msgpack, an
// array whose bytes do not match its descriptor, a zstd frame of the wrong size) is a
// ServerError with code "internal" too, as is an error code this client does not know.
class ServerError : public Error {
public:
    using Error::Error;
};

// No reply within the client's timeout, after all retries (code "timeout"). Distinct from a
// ServerError with code "timeout", which is the server saying the request's deadline passed.
// With CURVE, a wrong server key or a client key the server does not allow looks like this.
class Timeout : public Error {
public:
    explicit Timeout(std::string message);
};

// --- what a request carries ------------------------------------------------------------------

// Pinhole intrinsics in pixels of the image as sent (docs/protocol.md 5.3).
struct Intrinsics {
    double fx = 0, fy = 0, cx = 0, cy = 0;
};

enum class Channels { bgr, rgb };

// The image of a prediction request. Non-owning: the bytes must stay valid until the call
// returns (they are copied into the request message for each try).
struct Image {
    // JPEG or PNG file bytes; the format is read from the magic bytes (std::invalid_argument
    // for anything else).
    static Image encoded(const std::uint8_t* data, std::size_t size);
    static Image encoded(const std::vector<std::uint8_t>& bytes) { return encoded(bytes.data(), bytes.size()); }
    static Image encoded(std::vector<std::uint8_t>&&) = delete;  // would point into a temporary
    // Raw pixels: uint8, [height, width, 3], C order, no padding (height * width * 3 bytes).
    static Image raw(const std::uint8_t* pixels, int height, int width, Channels channels = Channels::bgr);
    // An http(s) URL the worker fetches (only when the operator allows the host).
    static Image url(std::string url);

    std::string format;  // "jpeg", "png", "raw", or empty for a URL
    const std::uint8_t* data = nullptr;
    std::size_t size = 0;
    int height = 0, width = 0;  // raw only
    Channels channels = Channels::bgr;  // raw only
    std::string image_url;
};

// sensor_msgs/CameraInfo's calibration (the `camera_info` request field, instead of
// intrinsics): the server takes fx, fy, cx, cy from `k` and scales them from width x height to
// the image as sent; `d` must be all zero (send rectified images).
struct CameraInfo {
    std::array<double, 9> k{};  // 3x3 camera matrix, row-major, pixels
    int width = 0, height = 0;
    std::vector<double> d;  // distortion coefficients (optional)
    std::string distortion_model;  // e.g. "plumb_bob" (optional)
};

// The optional prediction fields of docs/protocol.md 4.2; unset fields are left out of the
// request, so the server's defaults apply: depth and points as exact float32, uncompressed.
// (Python's DepthClient asks for uint16 + zstd by default; set output_dtype and compression
// here for the same 6x fewer bytes.)
struct Options {
    std::optional<std::string> encoder;  // vits | vitb | vitl | vitg
    std::optional<std::string> dataset;  // hypersim | vkitti | relative
    std::optional<double> max_depth;  // metres, > 0
    std::optional<int> input_size;  // multiple of 14 in [56, 1792]
    std::optional<std::string> output_dtype;  // float32 | float16 | uint16 (metric_depth only)
    std::optional<double> depth_scale;  // metres per count with output_dtype uint16
    std::optional<std::string> compression;  // none | zstd
    std::optional<Intrinsics> intrinsics;  // set by pointcloud(); optional elsewhere
    std::optional<bool> with_color;  // pointcloud: also return colors
    std::optional<CameraInfo> camera_info;  // instead of intrinsics
};

// --- what comes back -------------------------------------------------------------------------

// A decoded reply array: float32 values in metres (depth, points), C order.
struct Array {
    std::vector<std::size_t> shape;
    std::vector<float> values;
    // How it travelled: the descriptor's dtype, compression and filter, and its scale.
    std::string wire_dtype, compression, filter;
    double scale = 1.0;
};

// What every successful prediction reply carries besides its arrays (docs/protocol.md 6).
struct Reply {
    std::optional<double> min, max;  // of the depth (pointcloud: of z), metres for metric
    std::string model;  // e.g. "vits_hypersim"
    std::string worker;
    std::map<std::string, double> timing;  // decode_ms, pre_ms, inference_ms, post_ms
    std::optional<std::int64_t> out_of_range;  // uint16 replies: pixels sent as 0 (invalid)
    // The worker's own compute: the sum of `timing`, milliseconds.
    double compute_ms() const;
};

// metric_depth / rel_depth: `depth` is float32 [H, W].
struct DepthResult : Reply {
    Array depth;
};

// pointcloud: `points` float32 [H*W, 3], x right, y down, z forward, metres, row-major
// pixels; `colors` RGB uint8 [H*W, 3] (empty unless with_color).
struct PointCloudResult : Reply {
    Array points;
    std::vector<std::uint8_t> colors;
};

// A result published for a camera stream (docs/protocol.md 9.5).
struct StreamResult : Reply {
    std::string stream;
    std::optional<std::int64_t> seq;
    double t_capture = 0, t_received = 0, t_done = 0;  // seconds since the epoch
    double latency_ms = 0;  // capture to published
    std::int64_t dropped = 0;  // frames replaced in the slot since the previous result
    bool ok = false;
    std::string error_code, error_message;  // when !ok
    std::optional<Array> depth, points;  // whichever the stream's method returns
    std::vector<std::uint8_t> colors;
    // Throws ServerError when the frame's result was an error.
    void throw_if_error() const;
};

// health: the fields a supervisor looks at, and the whole reply as JSON.
struct Health {
    std::string status;  // healthy | degraded | no_workers
    std::size_t workers = 0;
    bool auth = false, encrypted = false;
    std::string json;
};

// --- connections -----------------------------------------------------------------------------

// CURVE keys for a server started with --curve-secret-file (docs/protocol.md 13): 40-character Z85.
struct CurveKeys {
    std::string server_public, public_key, secret_key;
    // `server_key`: a Z85 key, or a certificate file (NAME.key or NAME.key_secret, as
    // `zdepth keygen` / zmq.auth write them). `client_certificate`: this client's
    // NAME.key_secret file; empty makes a fresh pair (enough for --curve-allow-any).
    // Throws std::invalid_argument for a malformed key or file, std::runtime_error when
    // libzmq has no CURVE.
    static CurveKeys load(const std::string& server_key, const std::string& client_certificate = "");
};

enum class SocketKind {
    dealer,  // sends the empty delimiter itself, matches replies by id
    req,  // the REQ socket adds the delimiter; one request in flight
};

struct ClientConfig {
    std::string endpoint = "tcp://127.0.0.1:5555";
    std::string key;  // API key; empty: none sent
    // The whole call's budget, resends included. Each try tells the server a deadline
    // (timeout_ms) slightly shorter than the client will wait, so its `timeout` answer arrives.
    std::chrono::milliseconds timeout{30000};
    // Unset (the default; docs/protocol.md, Reliability): a try waits for all the time left, so
    // a slow result is waited for; a silent server ends the call with Timeout. Set: a try
    // waits at most this long (Lazy Pirate), then a fresh socket resends the same request with
    // the same id while `timeout` and `retries` last: it recovers a request lost on the way
    // (a broker restart, a dropped connection) within the call, but gives up on results slower
    // than try_timeout. Either way a socket that saw no reply is replaced by a fresh one.
    std::optional<std::chrono::milliseconds> try_timeout;
    // Resends after an early retryable error (overloaded, worker_lost, shutting_down; after
    // 50 ms, doubling, <= 1 s) and, with try_timeout, after silence. Never after the server's
    // `timeout` answer: the time for that try is spent.
    int retries = 2;
    SocketKind socket = SocketKind::dealer;
    std::optional<CurveKeys> curve;
    // Refuse replies whose arrays would need more bytes than this, decoded or on the wire
    // (protocol.MAX_DECOMPRESSED_BYTES; a 4096 x 4096 float32 cloud is 201 MB).
    std::size_t max_array_bytes = std::size_t{256} << 20;
};

class Client {
public:
    explicit Client(ClientConfig config);
    ~Client();
    Client(Client&&) noexcept;
    Client& operator=(Client&&) noexcept;
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    DepthResult metric_depth(const Image& image, const Options& options = {});
    DepthResult rel_depth(const Image& image, const Options& options = {});
    PointCloudResult pointcloud(const Image& image, const Intrinsics& intrinsics, Options options = {});
    // With options.intrinsics or (a ROS CameraInfo) options.camera_info set: exactly one.
    PointCloudResult pointcloud(const Image& image, const Options& options);
    // No key needed; the broker answers it itself.
    Health health();
    // Requests sent so far, resends included (a Lazy-Pirate retry shows here).
    std::uint64_t sends() const noexcept;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

struct SubscriberConfig {
    std::string endpoint = "tcp://127.0.0.1:5557";  // the broker's PUB port, P+2
    std::vector<std::string> streams;  // exact names; empty: every stream
    std::optional<CurveKeys> curve;
    std::size_t max_array_bytes = std::size_t{256} << 20;
};

// Stream results from the broker's PUB socket, only for the named streams (the topic is
// compared for equality: ZeroMQ subscriptions match by prefix).
class Subscriber {
public:
    explicit Subscriber(SubscriberConfig config);
    ~Subscriber();
    Subscriber(Subscriber&&) noexcept;
    Subscriber& operator=(Subscriber&&) noexcept;
    Subscriber(const Subscriber&) = delete;
    Subscriber& operator=(const Subscriber&) = delete;

    // The next result, or nullopt when none came within `timeout`. An unreadable message
    // throws ServerError("internal"); an error result is returned with ok == false.
    std::optional<StreamResult> receive(std::chrono::milliseconds timeout);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// tcp://host:P (the request endpoint) -> tcp://host:P+2 (the results PUB socket).
// Throws std::invalid_argument for an endpoint that is not tcp://host:port.
std::string results_endpoint(const std::string& request_endpoint);

// The bytes of a file (std::runtime_error when it cannot be read).
std::vector<std::uint8_t> read_file(const std::string& path);

}  // namespace zdepth
