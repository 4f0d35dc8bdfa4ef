// depth_request: one prediction from a zdepth server, written as a .npy file.
//
//   depth_request --server tcp://gpu:5555 --image frame.jpg --method metric_depth|rel_depth|pointcloud
//                 [--key K] [--fx F --fy F --cx C --cy C] [--input-size N] --out depth.npy
//
// --image takes a JPEG or PNG file, or a .npy uint8 [H, W, 3] array sent as raw pixels
// (--channels bgr|rgb, default bgr). Exit status: 0 success, 1 the server answered an error
// (its code on stderr), 2 no reply within --timeout, 3 bad arguments or files.
#include "args.hpp"

#include <zdepth/client.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char kUsageText[] =
    "usage: depth_request --server ENDPOINT --image FILE --method metric_depth|rel_depth|pointcloud --out FILE.npy\n"
    "  [--key K] [--fx F --fy F --cx C --cy C] [--input-size N] [--encoder E] [--dataset D] [--max-depth M]\n"
    "  [--camera-k K0,...,K8 --camera-size WxH [--camera-d D0,... --distortion-model NAME]] (CameraInfo, not --fx...)\n"
    "  [--output-dtype float32|float16|uint16] [--depth-scale S] [--compression none|zstd]\n"
    "  [--colors-out FILE.npy] [--channels bgr|rgb] [--timeout SECONDS] [--try-timeout SECONDS] [--retries N]\n"
    "  [--socket dealer|req]\n"
    "  [--server-key KEY|FILE [--client-cert NAME.key_secret]] [--repeat N]\n"
    "--image: JPEG, PNG, or a .npy uint8 [H, W, 3] sent raw. The result is written as float32 metres.\n"
    "--try-timeout: resend on a fresh socket after this long without a reply (Lazy Pirate), within --timeout.\n"
    "--repeat N: N requests, one line each: round_trip_ms and the worker's timing (for benchmarks).\n"
    "exit: 0 ok, 1 server error (code on stderr; the server's own `timeout` answer too), 2 no reply within --timeout,\n"
    "3 bad arguments\n";

// .npy version 1.0: the header dict padded with spaces to a multiple of 64 bytes, then the data.
void write_npy(const std::string& path, const char* descr, const std::vector<std::size_t>& shape, const void* data, std::size_t bytes) {
    std::string dims;
    for (std::size_t n : shape) dims += std::to_string(n) + ", ";
    if (shape.size() > 1) dims.erase(dims.size() - 1);  // "(480, 640)" but "(5,)"
    std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
    header.append(63 - (10 + header.size()) % 64, ' ');
    header += '\n';
    std::ofstream out(path, std::ios::binary);
    const unsigned char preamble[] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                      static_cast<unsigned char>(header.size() & 0xff), static_cast<unsigned char>(header.size() >> 8)};
    out.write(reinterpret_cast<const char*>(preamble), sizeof preamble);
    out << header;
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
    if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

// A .npy file of uint8 [H, W, 3] in C order: (height, width, offset of the pixels in `file`).
struct NpyImage {
    int height = 0, width = 0;
    std::size_t offset = 0;
};

NpyImage read_npy_pixels(const std::vector<std::uint8_t>& file, const std::string& path) {
    const std::string bad = "'" + path + "' is not a .npy uint8 [H, W, 3] array in C order";
    if (file.size() < 10 || file[0] != 0x93 || std::string(file.begin() + 1, file.begin() + 6) != "NUMPY") throw std::invalid_argument(bad);
    const bool v1 = file[6] == 1;
    const std::size_t length = v1 ? (file[8] | file[9] << 8) : (file[8] | file[9] << 8 | file[10] << 16 | std::size_t{file[11]} << 24);
    const std::size_t start = v1 ? 10 : 12;
    if (start + length > file.size()) throw std::invalid_argument(bad);
    const std::string header(file.begin() + static_cast<long>(start), file.begin() + static_cast<long>(start + length));
    auto shape_at = header.find("'shape': (");
    if ((header.find("'|u1'") == std::string::npos && header.find("'<u1'") == std::string::npos) ||
        header.find("'fortran_order': False") == std::string::npos || shape_at == std::string::npos)
        throw std::invalid_argument(bad);
    std::istringstream dims(header.substr(shape_at + 10));
    long h = 0, w = 0, c = 0;
    char comma1 = 0, comma2 = 0;
    if (!(dims >> h >> comma1 >> w >> comma2 >> c) || comma1 != ',' || comma2 != ',' || c != 3 || h < 1 || w < 1)
        throw std::invalid_argument(bad);
    NpyImage image{static_cast<int>(h), static_cast<int>(w), start + length};
    if (file.size() - image.offset != static_cast<std::size_t>(h * w * 3)) throw std::invalid_argument(bad);
    return image;
}

std::vector<double> numbers(const std::string& text, const std::string& flag) {
    std::vector<double> values;
    std::istringstream in(text);
    std::string item;
    while (std::getline(in, item, ',')) {
        std::size_t used = 0;
        try {
            values.push_back(std::stod(item, &used));
        } catch (const std::exception&) {
        }
        if (used == 0 || used != item.size()) throw std::invalid_argument(flag + " must be comma-separated numbers");
    }
    return values;
}

// --camera-k (9 numbers, row-major) --camera-size WxH [--camera-d ...] [--distortion-model ...]
std::optional<zdepth::CameraInfo> camera_info_from(const examples::Args& args) {
    const auto k = args.get("camera-k"), size = args.get("camera-size");
    if (!k && !size && !args.get("camera-d") && !args.get("distortion-model")) return std::nullopt;
    if (!k || !size) throw std::invalid_argument("a CameraInfo needs --camera-k and --camera-size");
    zdepth::CameraInfo info;
    const std::vector<double> matrix = numbers(*k, "--camera-k");
    if (matrix.size() != 9) throw std::invalid_argument("--camera-k needs 9 numbers (row-major K)");
    std::copy(matrix.begin(), matrix.end(), info.k.begin());
    char x = 0;
    std::istringstream dims(*size);
    if (!(dims >> info.width >> x >> info.height) || x != 'x' || !dims.eof()) throw std::invalid_argument("--camera-size must be WIDTHxHEIGHT");
    if (auto d = args.get("camera-d")) info.d = numbers(*d, "--camera-d");
    info.distortion_model = args.get("distortion-model").value_or("");
    return info;
}

zdepth::Options options_from(const examples::Args& args) {
    zdepth::Options o;
    o.encoder = args.get("encoder");
    o.dataset = args.get("dataset");
    o.max_depth = args.number("max-depth");
    o.input_size = args.integer("input-size");
    o.output_dtype = args.get("output-dtype");
    o.depth_scale = args.number("depth-scale");
    o.compression = args.get("compression");
    o.camera_info = camera_info_from(args);
    if (args.get("colors-out")) o.with_color = true;
    return o;
}

struct Outcome {
    const zdepth::Reply* reply;
    const zdepth::Array* array;
};

}  // namespace

int main(int argc, char** argv) {
    if (examples::wants_help(argc, argv)) {
        std::cout << kUsageText;
        return examples::kOk;
    }
    try {
        const examples::Args args(argc, argv, {"server", "image", "method", "key", "fx", "fy", "cx", "cy", "input-size", "out",
                                               "encoder", "dataset", "max-depth", "output-dtype", "depth-scale", "compression",
                                               "colors-out", "channels", "timeout", "try-timeout", "retries", "socket", "server-key",
                                               "client-cert", "repeat", "camera-k", "camera-size", "camera-d",
                                               "distortion-model"});
        const std::string method = args.required("method");
        if (method != "metric_depth" && method != "rel_depth" && method != "pointcloud")
            throw std::invalid_argument("--method must be metric_depth, rel_depth or pointcloud");
        const std::string out = args.required("out");
        const int repeat = args.integer("repeat").value_or(1);
        if (repeat < 1) throw std::invalid_argument("--repeat must be >= 1");

        zdepth::ClientConfig config;
        config.endpoint = args.required("server");
        config.key = args.get("key").value_or("");
        config.timeout = std::chrono::milliseconds(static_cast<long long>(args.number("timeout").value_or(30.0) * 1000));
        if (auto seconds = args.number("try-timeout")) config.try_timeout = std::chrono::milliseconds(static_cast<long long>(*seconds * 1000));
        config.retries = args.integer("retries").value_or(2);
        const std::string socket = args.get("socket").value_or("dealer");
        if (socket != "dealer" && socket != "req") throw std::invalid_argument("--socket must be dealer or req");
        config.socket = socket == "req" ? zdepth::SocketKind::req : zdepth::SocketKind::dealer;
        config.curve = args.curve();

        const std::string image_path = args.required("image");
        const std::vector<std::uint8_t> file = zdepth::read_file(image_path);
        zdepth::Image image;
        if (image_path.size() >= 4 && image_path.compare(image_path.size() - 4, 4, ".npy") == 0) {
            const NpyImage npy = read_npy_pixels(file, image_path);
            const std::string channels = args.get("channels").value_or("bgr");
            if (channels != "bgr" && channels != "rgb") throw std::invalid_argument("--channels must be bgr or rgb");
            image = zdepth::Image::raw(file.data() + npy.offset, npy.height, npy.width,
                                       channels == "bgr" ? zdepth::Channels::bgr : zdepth::Channels::rgb);
        } else {
            image = zdepth::Image::encoded(file);
        }
        const zdepth::Options options = options_from(args);
        std::optional<zdepth::Intrinsics> intrinsics;
        const auto fx = args.number("fx"), fy = args.number("fy"), cx = args.number("cx"), cy = args.number("cy");
        if (fx || fy || cx || cy) {
            if (!(fx && fy && cx && cy)) throw std::invalid_argument("intrinsics need all of --fx --fy --cx --cy");
            intrinsics = zdepth::Intrinsics{*fx, *fy, *cx, *cy};
        }
        if (args.get("colors-out") && method != "pointcloud") throw std::invalid_argument("--colors-out is for pointcloud");
        if (method == "pointcloud" && !intrinsics && !options.camera_info)
            throw std::invalid_argument("pointcloud needs --fx --fy --cx --cy or --camera-k and --camera-size");

        zdepth::Client client(config);
        zdepth::DepthResult depth;
        zdepth::PointCloudResult cloud;
        Outcome outcome{};
        for (int i = 0; i < repeat; ++i) {
            const auto start = std::chrono::steady_clock::now();
            if (method == "pointcloud") {
                cloud = intrinsics ? client.pointcloud(image, *intrinsics, options) : client.pointcloud(image, options);
                outcome = {&cloud, &cloud.points};
            } else {
                zdepth::Options o = options;
                o.intrinsics = intrinsics;
                depth = method == "metric_depth" ? client.metric_depth(image, o) : client.rel_depth(image, o);
                outcome = {&depth, &depth.depth};
            }
            const double round_trip_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
            if (repeat > 1) {
                std::printf("round_trip_ms=%.3f", round_trip_ms);
                for (const auto& [key, ms] : outcome.reply->timing) std::printf(" %s=%.3f", key.c_str(), ms);
                std::printf("\n");
            }
        }
        const zdepth::Array& array = *outcome.array;
        write_npy(out, "<f4", array.shape, array.values.data(), array.values.size() * sizeof(float));
        if (auto colors_out = args.get("colors-out"))
            write_npy(*colors_out, "|u1", {cloud.colors.size() / 3, 3}, cloud.colors.data(), cloud.colors.size());
        std::printf("%s %s wire=%s compression=%s min=%g max=%g model=%s worker=%s sends=%llu\n", method.c_str(), out.c_str(),
                    array.wire_dtype.c_str(), array.compression.c_str(), outcome.reply->min.value_or(0), outcome.reply->max.value_or(0),
                    outcome.reply->model.c_str(), outcome.reply->worker.c_str(), static_cast<unsigned long long>(client.sends()));
        return examples::kOk;
    } catch (const zdepth::Timeout& e) {
        std::cerr << "timeout: " << e.message() << "\n";
        return examples::kTimeout;
    } catch (const zdepth::ServerError& e) {
        std::cerr << "error " << e.code() << ": " << e.message() << "\n";
        return examples::kServerError;
    } catch (const std::exception& e) {
        std::cerr << "depth_request: " << e.what() << "\n" << kUsageText;
        return examples::kUsage;
    }
}
