#!/usr/bin/env bash
# One prepared GPU run, under 8 minutes on one GPU, on a machine with torch (CUDA) preinstalled
# and no network:
#   bash bench/gpu.sh [--quick]
# 1. the GPU tests (compiled vs eager in fp16/bf16, CUDA graphs, the engine on CUDA), at most 3 min;
# 2. the GPU benchmark (bench/gpu.py: eager and compiled model rows, the served round trips), at most 4 min 40 s.
# Raw output goes to docs/perf/: gpu-<device>.json (the numbers, rewritten after each part) and
# gpu-<device>.log (everything printed). The served round trips also need pyzmq, msgpack and OpenCV.
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-') if torch.cuda.is_available() else 'no-cuda')")
if [ "$device" = no-cuda ]; then
    echo "bench/gpu.sh: torch sees no CUDA device; run it on a GPU machine" >&2
    exit 2
fi
mkdir -p docs/perf
log="docs/perf/gpu-$device.log"
{
    echo "== $(date -u +%FT%TZ) $device, git $(git rev-parse --short HEAD 2>/dev/null)"
    echo "== GPU tests"
    timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/test_compile.py tests/test_engine.py -k "cuda"
    echo "== tests exit status $?"
    echo "== GPU benchmark"
    timeout 280 python3 bench/gpu.py --out "docs/perf/gpu-$device.json" "$@"
    echo "== benchmark exit status $?"
} 2>&1 | tee "$log"
