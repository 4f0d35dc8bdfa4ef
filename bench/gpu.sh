#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a CUDA machine with torch preinstalled and no network:
#   bash bench/gpu.sh [--quick] [--out bench/results/gpu.json]
# The served round trip also needs pyzmq, msgpack and OpenCV; without pyzmq it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu.py "$@"
