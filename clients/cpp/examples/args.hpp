// Command-line handling shared by the example programs: `--flag value` pairs and exit codes.
#pragma once

#include <zdepth/client.hpp>

#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>

namespace examples {

// Exit codes of both programs.
constexpr int kOk = 0;
constexpr int kServerError = 1;  // the server answered with an error (code on stderr)
constexpr int kTimeout = 2;  // no reply / not enough results within the timeout
constexpr int kUsage = 3;  // bad arguments or an unreadable file

// True when the command line asks for the usage text (--help or -h).
inline bool wants_help(int argc, char** argv) {
    for (int i = 1; i < argc; ++i)
        if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") return true;
    return false;
}

// `--name value` pairs; every flag takes a value, each at most once.
class Args {
public:
    Args(int argc, char** argv, const std::set<std::string>& known) {
        for (int i = 1; i < argc; ++i) {
            const std::string flag = argv[i];
            if (flag.rfind("--", 0) != 0 || !known.count(flag.substr(2)))
                throw std::invalid_argument("unknown argument '" + flag + "'");
            if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
            if (!values_.emplace(flag.substr(2), argv[++i]).second) throw std::invalid_argument(flag + " given twice");
        }
    }

    std::optional<std::string> get(const std::string& name) const {
        auto it = values_.find(name);
        return it == values_.end() ? std::nullopt : std::optional<std::string>(it->second);
    }

    std::string required(const std::string& name) const {
        auto value = get(name);
        if (!value) throw std::invalid_argument("--" + name + " is required");
        return *value;
    }

    std::optional<double> number(const std::string& name) const {
        auto value = get(name);
        if (!value) return std::nullopt;
        std::size_t used = 0;
        double x = 0;
        try {
            x = std::stod(*value, &used);
        } catch (const std::exception&) {
        }
        if (used == 0 || used != value->size()) throw std::invalid_argument("--" + name + " must be a number, got '" + *value + "'");
        return x;
    }

    std::optional<int> integer(const std::string& name) const {
        auto x = number(name);
        if (x && (*x != static_cast<int>(*x))) throw std::invalid_argument("--" + name + " must be an integer");
        return x ? std::optional<int>(static_cast<int>(*x)) : std::nullopt;
    }

    // --server-key KEY|FILE [--client-cert NAME.key_secret]: CURVE, or nullopt for plain text.
    std::optional<zdepth::CurveKeys> curve() const {
        auto server_key = get("server-key");
        if (!server_key) {
            if (get("client-cert")) throw std::invalid_argument("--client-cert needs --server-key");
            return std::nullopt;
        }
        return zdepth::CurveKeys::load(*server_key, get("client-cert").value_or(""));
    }

private:
    std::map<std::string, std::string> values_;
};

}  // namespace examples
