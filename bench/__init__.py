"""Benchmarks for zdepth: `python -m bench {latency,overhead,throughput,scaling,stream,all} [--quick]`.

Each benchmark starts the real processes it measures (`zdepth serve`, the HTTP baseline in
`bench/http_baseline.py`, a bare ZeroMQ echo), interleaves its configurations round by round
so ratios share the same noise, prints markdown tables, and writes JSON (and a PNG plot) under
`bench/results/`. Nothing here is imported by the package; fastapi, uvicorn, httpx and
matplotlib come from the `bench` extra and are only imported where they are used.
"""
