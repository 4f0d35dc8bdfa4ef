// stream_subscriber: print the results of a camera stream as they arrive.
//
//   stream_subscriber --server tcp://gpu:5555 --stream NAME --count N
//
// --server is the broker's request endpoint tcp://host:P; results come from its PUB socket on
// P+2 (--results ENDPOINT to give that one directly). One line per result on stdout:
// stream, seq, latency_ms (capture to published), dropped and the array's shape; error
// results go to stderr with their code. Exit status: 0 after N results, 1 when any of them
// was an error, 2 when fewer than N came within --timeout (default 30 s), 3 bad arguments.
#include "args.hpp"

#include <zdepth/client.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

namespace {

const char kUsageText[] =
    "usage: stream_subscriber --server ENDPOINT --stream NAME --count N [--results ENDPOINT] [--timeout SECONDS]\n"
    "  [--server-key KEY|FILE [--client-cert NAME.key_secret]]\n"
    "exit: 0 ok, 1 an error result, 2 timeout, 3 bad arguments\n";

std::string shape_of(const zdepth::StreamResult& r) {
    const zdepth::Array* array = r.depth ? &*r.depth : r.points ? &*r.points : nullptr;
    if (!array) return "[]";
    std::string text = "[";
    for (std::size_t i = 0; i < array->shape.size(); ++i) text += (i ? ", " : "") + std::to_string(array->shape[i]);
    return text + "]";
}

}  // namespace

int main(int argc, char** argv) {
    if (examples::wants_help(argc, argv)) {
        std::cout << kUsageText;
        return examples::kOk;
    }
    try {
        const examples::Args args(argc, argv, {"server", "results", "stream", "count", "timeout", "server-key", "client-cert"});
        zdepth::SubscriberConfig config;
        config.endpoint = args.get("results") ? *args.get("results") : zdepth::results_endpoint(args.required("server"));
        config.streams = {args.required("stream")};
        config.curve = args.curve();
        const int count = args.integer("count").value_or(0);
        if (count < 1) throw std::invalid_argument("--count must be >= 1");
        const auto timeout = std::chrono::milliseconds(static_cast<long long>(args.number("timeout").value_or(30.0) * 1000));

        zdepth::Subscriber subscriber(config);
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        int received = 0, errors = 0;
        while (received < count) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            std::optional<zdepth::StreamResult> result = subscriber.receive(left);
            if (!result) {
                std::cerr << "timeout: " << received << " of " << count << " results within " << timeout.count() << " ms\n";
                return examples::kTimeout;
            }
            ++received;
            const std::string seq = result->seq ? std::to_string(*result->seq) : "none";
            if (!result->ok) {
                ++errors;
                std::cerr << "stream=" << result->stream << " seq=" << seq << " error " << result->error_code << ": "
                          << result->error_message << "\n";
                continue;
            }
            std::printf("stream=%s seq=%s latency_ms=%.3f dropped=%lld shape=%s\n", result->stream.c_str(), seq.c_str(),
                        result->latency_ms, static_cast<long long>(result->dropped), shape_of(*result).c_str());
            std::fflush(stdout);
        }
        return errors ? examples::kServerError : examples::kOk;
    } catch (const zdepth::ServerError& e) {
        std::cerr << "error " << e.code() << ": " << e.message() << "\n";
        return examples::kServerError;
    } catch (const std::exception& e) {
        std::cerr << "stream_subscriber: " << e.what() << "\n" << kUsageText;
        return examples::kUsage;
    }
}
