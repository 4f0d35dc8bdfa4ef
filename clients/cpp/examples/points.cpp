#include <zdepth/client.hpp>

#include <cstdio>
#include <cstdlib>

// ./points tcp://gpu-server:5555 frame.jpg [KEY [INPUT_SIZE]]
int main(int argc, char** argv) {
    if (argc < 3) return 3;
    zdepth::ClientConfig config;
    config.endpoint = argv[1];
    config.key = argc > 3 ? argv[3] : "";
    config.timeout = std::chrono::seconds(30);              // the whole call, resends included
    zdepth::Client client(config);
    const std::vector<std::uint8_t> jpeg = zdepth::read_file(argv[2]);  // JPEG or PNG bytes
    zdepth::Options options;
    options.output_dtype = "float16";                        // any wire form: points come back float32 metres
    options.compression = "zstd";
    if (argc > 4) options.input_size = std::atoi(argv[4]);   // multiple of 14; default 518, smaller is faster
    try {
        const zdepth::PointCloudResult r =
            client.pointcloud(zdepth::Image::encoded(jpeg), {525.0, 525.0, 319.5, 239.5}, options);
        const float* xyz = r.points.values.data();           // x0 y0 z0 x1 y1 z1 ...: x right, y down, z forward
        std::printf("%zu points, z[0] = %.3f m, worker %.1f ms\n", r.points.shape[0], xyz[2], r.compute_ms());
        return 0;
    } catch (const zdepth::Timeout& e) {                     // no reply within the timeout
        std::fprintf(stderr, "%s\n", e.what());
        return 2;
    } catch (const zdepth::ServerError& e) {                 // e.code(): bad_request, unauthorized, ...
        std::fprintf(stderr, "%s: %s\n", e.code().c_str(), e.message().c_str());
        return 1;
    }
}
