"""Compiled forward passes: `torch.compile` graphs keyed by (model, input shape, batch, dtype).

A worker sees few shapes: every image size maps to one model input shape through the official
resize, and a camera sends one size. So each (model, input shape, batch, dtype) gets its own
static-shape graph (`dynamic=False`, `fullgraph=True`: the fastest kernels, and on CUDA the
modes "reduce-overhead" and "max-autotune" replay the whole forward pass as one CUDA graph,
which removes the launch overhead that dominates batch 1). Graphs live in a bounded LRU.

Each graph is compiled from its own copy of a two-line forward function (a fresh code object):
dynamo keeps its compiled code per code object, so every graph is exactly one dynamo cache
entry, no key ever meets dynamo's recompile limit (which would silently fall back to eager), and
dropping a graph from the LRU drops its compiled code with it.

A compile failure (no C++ compiler for inductor, an operator a backend cannot lower, ...) falls
back to the eager model, with one warning: the first failure turns compiling off for good
(graphs already built keep running), so a machine that cannot compile pays the failed attempt
once.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import COMPILE_MODES, DEFAULT_MAX_GRAPHS

log = logging.getLogger("zdepth.compiled")

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that use CUDA graphs on CUDA


@dataclass(frozen=True)
class GraphKey:
    """What one compiled graph is specialised to."""

    encoder: str
    dataset: str
    shape: tuple[int, int]  # the model input's (height, width) in pixels, multiples of 14
    batch: int
    dtype: str  # "fp32", "fp16" or "bf16"

    def __str__(self) -> str:
        """As health shows it: "vits_hypersim:518x686:b1:fp16"."""
        return f"{self.encoder}_{self.dataset}:{self.shape[0]}x{self.shape[1]}:b{self.batch}:{self.dtype}"


def batch_bucket(n: int, max_batch: int) -> int:
    """The batch size a batch of `n` inputs is padded to: the smallest power of two >= n, capped at
    `max_batch` (itself a bucket), so a worker with --max-batch 8 needs graphs for 1, 2, 4, 8 only.
    A batch larger than `max_batch` is its own bucket."""
    bucket = 1
    while bucket < n:
        bucket *= 2
    return max(n, min(bucket, max_batch))


def batch_buckets(max_batch: int) -> list[int]:
    """Every bucket `batch_bucket` can give for batches of 1..max_batch, ascending."""
    return sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)})


def _forward(x: torch.Tensor, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
    return model(x)


def fresh_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model(x)` as a function with a code object of its own, for one dynamo cache entry."""
    return types.FunctionType(_forward.__code__.replace(), _forward.__globals__, "zdepth_forward", (model,))


def compile_graph(model: torch.nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` under torch.compile in `mode` ("default", "reduce-overhead", "max-autotune"), with
    static shapes and the whole forward pass as one graph. Compiling happens on the first call."""
    return torch.compile(fresh_forward(model), mode=None if mode == "default" else mode, dynamic=False, fullgraph=True)


class CompiledGraphs:
    """A bounded LRU of compiled graphs for one device, thread-safe (a background thread may build
    graphs while the compute thread runs others).

    `compiler(model, mode)` makes a graph (default `compile_graph`; another torch.compile backend
    may be passed in, as the tests do to keep them fast)."""

    def __init__(
        self, mode: str, device: torch.device, max_graphs: int = DEFAULT_MAX_GRAPHS, compiler: Callable = compile_graph
    ):
        if mode not in COMPILE_MODES or mode == "off":
            raise ValueError(f"compile mode must be one of {list(COMPILE_MODES[1:])}, got {mode!r}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.mode = mode
        self.device = device
        self.max_graphs = max_graphs
        self.compiler = compiler
        self.failure: Optional[str] = None  # why compiling was turned off, after the first failure
        self._graphs: OrderedDict[GraphKey, Callable] = OrderedDict()
        self._lock = threading.Lock()
        self.cuda_graphs = device.type == "cuda" and mode in CUDA_GRAPH_MODES

    def __contains__(self, key: GraphKey) -> bool:
        with self._lock:
            return key in self._graphs

    def keys(self) -> list[GraphKey]:
        """The graphs held, least recently used first."""
        with self._lock:
            return list(self._graphs)

    def forget(self, encoder: str, dataset: str) -> None:
        """Drop the graphs of one model (each holds the model: its memory is freed only with them)."""
        with self._lock:
            for key in [k for k in self._graphs if (k.encoder, k.dataset) == (encoder, dataset)]:
                del self._graphs[key]

    def run(self, key: GraphKey, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[float]]:
        """`model(x)` through `key`'s graph, building it first when it is not held: (output, the
        build's milliseconds including that first call, or None when the graph was held). After a
        failed build, graphs not held run eagerly (None) and are not held.

        On CUDA with CUDA graphs the output lives in the graph's memory pool and is overwritten by
        the graph's next call: use it (or copy it) before calling again from the same thread."""
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
        if graph is not None:
            return self._call(graph, x), None
        if self.failure is not None:  # compiling is off: eager, and nothing held
            return model(x), None
        start = time.perf_counter()
        try:
            graph = self.compiler(model, self.mode)
            output = self._call(graph, x)  # torch.compile compiles on the first call
        except Exception as exc:  # any failure inside torch.compile: serve eagerly rather than not at all
            self.failure = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]  # one line for logs and tests
            log.warning("torch.compile failed (%s); running the model eagerly from now on", self.failure)
            return model(x), (time.perf_counter() - start) * 1000.0
        log.info("compiled %s in mode %s", key, self.mode)
        build_ms = (time.perf_counter() - start) * 1000.0
        with self._lock:
            self._graphs[key] = graph
            self._graphs.move_to_end(key)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        return output, build_ms

    def _call(self, graph: Callable, x: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are consumed
        return graph(x)
