"""The C++ client (clients/cpp): its build, and its round-trip overhead next to the Python client's.

    python -m bench cpp [--quick] [--size 640x480] [--iterations 50] [--input-size 56] [--build-dir DIR]

Builds clients/cpp with CMake into a fresh folder (configure and build timed separately), starts
one `zdepth serve --random-weights`, and asks it for the same JPEG's depth in rounds that
alternate the C++ `depth_request --repeat N` and `DepthClient`, each asking for the same
explicit wire form. Overhead = round trip minus the worker's own compute (`compute_ms`), p50.
The first request of each round (a fresh connection for the C++ process) is not counted.

`build(folder)` is also what tests/test_cpp_client.py uses: it raises `BuildUnavailable` when
cmake, a compiler or the Debian packages are missing, and RuntimeError for a compile error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import (
    REPO,
    ZdepthServer,
    compute_ms,
    parse_size,
    print_table,
    progress,
    sample_jpeg,
    split_iterations,
    summarize,
    workdir,
    write_results,
)

SOURCE = REPO / "clients" / "cpp"
DEFAULT_INPUT_SIZE = 56  # compute is subtracted; a small input keeps CPU rounds short
FORMS = (  # (method, output_dtype, compression): the same explicit wire form for both clients
    ("metric_depth", "float32", "none"),
    ("metric_depth", "uint16", "zstd"),
)


class BuildUnavailable(RuntimeError):
    """cmake, a C++ compiler or a package the CMake project needs is missing."""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build(folder: Path) -> dict:
    """Configure and build clients/cpp (Release) in `folder`: {"bin": folder, "configure_s", "build_s"}.

    Raises BuildUnavailable when the tools or packages are missing (the Debian packages:
    see the README's C++ client section) and RuntimeError when the sources do not compile."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildUnavailable("cmake is not installed")
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        raise BuildUnavailable("no C++ compiler (c++, g++ or clang++) is installed")
    start = time.perf_counter()
    configure = subprocess.run(
        [cmake, "-S", str(SOURCE), "-B", str(folder), "-DCMAKE_BUILD_TYPE=Release"], capture_output=True, text=True
    )
    configure_s = time.perf_counter() - start
    if configure.returncode != 0:
        raise BuildUnavailable(
            f"cmake could not configure clients/cpp (packages missing?):\n{_tail(configure.stdout + configure.stderr)}"
        )
    start = time.perf_counter()
    compiled = subprocess.run(
        [cmake, "--build", str(folder), "-j", str(os.cpu_count() or 1)], capture_output=True, text=True
    )
    build_s = time.perf_counter() - start
    if compiled.returncode != 0:
        raise RuntimeError(f"clients/cpp does not compile:\n{_tail(compiled.stdout + compiled.stderr, 60)}")
    return {"bin": Path(folder), "configure_s": round(configure_s, 3), "build_s": round(build_s, 3)}


def cpp_round(
    program: Path, endpoint: str, image: Path, out: Path, form: tuple, input_size: int, requests: int
) -> list:
    """`requests` requests from one depth_request process: [(round trip ms, compute ms)], first dropped."""
    method, output_dtype, compression = form
    run = subprocess.run(
        [
            str(program),
            "--server",
            endpoint,
            "--image",
            str(image),
            "--method",
            method,
            "--out",
            str(out),
            "--input-size",
            str(input_size),
            "--output-dtype",
            output_dtype,
            "--compression",
            compression,
            "--repeat",
            str(requests + 1),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0:
        raise RuntimeError(f"depth_request exited with {run.returncode}: {run.stderr}")
    samples = []
    for line in run.stdout.splitlines():
        if line.startswith("round_trip_ms="):
            fields = dict(item.split("=") for item in line.split())
            samples.append((float(fields.pop("round_trip_ms")), compute_ms({k: float(v) for k, v in fields.items()})))
    return samples[1:]


def python_round(client, jpeg: bytes, form: tuple, input_size: int, requests: int) -> list:
    """The same with `DepthClient` (the same explicit wire form), first dropped."""
    method, output_dtype, compression = form
    call = client.metric_depth if method == "metric_depth" else client.relative_depth
    samples = []
    for _ in range(requests + 1):
        start = time.perf_counter()
        result = call(jpeg, input_size=input_size, output_dtype=output_dtype, compression=compression)
        samples.append(((time.perf_counter() - start) * 1000, compute_ms(result.timing)))
    return samples[1:]


def add_arguments(parser) -> None:
    parser.add_argument("--size", help="image size WxH (default 640x480; --quick: 160x120)")
    parser.add_argument("--iterations", type=int, help="requests per client and form (default 50; --quick: 4)")
    parser.add_argument(
        "--input-size", type=int, default=DEFAULT_INPUT_SIZE, help=f"model input size (default {DEFAULT_INPUT_SIZE})"
    )
    parser.add_argument("--build-dir", type=Path, help="use the programs already built there (no build, no build time)")


def run(args) -> dict:
    from clients import DepthClient

    size = parse_size(args.size or ("160x120" if args.quick else "640x480"))
    iterations = args.iterations or (4 if args.quick else 50)
    rounds, per_round = split_iterations(iterations, max_rounds=5)
    with workdir() as tmp:
        tmp = Path(tmp)
        if args.build_dir:
            built = {"bin": args.build_dir}
        else:
            progress("building clients/cpp (clean configure + build)")
            built = build(tmp / "build")
            progress(f"configure {built['configure_s']:.1f} s, build {built['build_s']:.1f} s")
        image = tmp / "frame.jpg"
        image.write_bytes(sample_jpeg(*size))
        server = ZdepthServer(tmp, threads=1)
        rows, results = [], []
        try:
            with DepthClient(server.endpoint, timeout=60) as client:
                for form in FORMS:
                    series = {"C++ depth_request": [], "Python DepthClient": []}
                    for r in range(rounds):
                        progress(f"{form}: round {r + 1}/{rounds}")
                        series["C++ depth_request"] += cpp_round(
                            built["bin"] / "depth_request",
                            server.endpoint,
                            image,
                            tmp / "out.npy",
                            form,
                            args.input_size,
                            per_round,
                        )
                        series["Python DepthClient"] += python_round(
                            client, image.read_bytes(), form, args.input_size, per_round
                        )
                    for name, samples in series.items():
                        overhead = summarize([rt - c for rt, c in samples], "overhead_")
                        round_trip = summarize([rt for rt, _ in samples], "round_trip_")
                        results.append({"client": name, "form": "/".join(form), **overhead, **round_trip})
                        rows.append(
                            [
                                name,
                                "/".join(form),
                                round_trip["round_trip_p50"],
                                overhead["overhead_p50"],
                                overhead["overhead_p90"],
                                overhead["overhead_n"],
                            ]
                        )
        finally:
            server.stop()
    width, height = size
    print_table(
        f"C++ and Python clients, {width}x{height} JPEG in, loopback tcp: overhead = round trip - worker compute (ms)",
        ["client", "method/dtype/compression", "round trip p50", "overhead p50", "overhead p90", "n"],
        rows,
    )
    payload = {
        "image": f"{width}x{height}",
        "input_size": args.input_size,
        "build": {k: v for k, v in built.items() if k != "bin"},
        "results": results,
    }
    write_results(args.out_dir, "cpp_client", payload)
    return payload
