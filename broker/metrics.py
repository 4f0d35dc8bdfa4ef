"""What the broker counts, and the two ways an operator reads it: `stats` and Prometheus.

The poll loop records events here (a request answered with an outcome and a latency, a
request per key name, a miscellaneous event such as a malformed envelope; every request is
answered exactly once, so answers count requests); `snapshot()` turns them
into the `stats` reply, and `PrometheusExporter` serves the same numbers over HTTP from its
own server thread, next to the `/healthz` and `/readyz` probes. prometheus_client is imported
only when the exporter is started, so the broker runs without it.

Labels are bounded: methods outside the protocol's are counted as "invalid", outcomes are
"ok" or one of the fixed error codes, and key names (which say who uses the server) appear
only in `stats`, which needs a key, never on the unauthenticated metrics port.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from zdepth import protocol as P

log = logging.getLogger("zdepth.broker")

PROBES = {"/healthz": "live", "/readyz": "ready"}  # HTTP path -> the state that makes it answer 200
LATENCY_WINDOW = 2048  # recent round trips kept per method for percentiles
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INVALID_METHOD = "invalid"  # the label of requests whose method could not be read
OK = "ok"


def method_label(method: Any) -> str:
    return method if isinstance(method, str) and method in P.METHODS else INVALID_METHOD


def outcome_of(header: Any) -> str:
    """ "ok", or the error code of a reply header; INTERNAL for anything a worker garbled."""
    if not isinstance(header, dict):
        return P.INTERNAL
    if header.get("ok") is True:
        return OK
    error = header.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code in P.ERROR_CODES else P.INTERNAL


class Metrics:
    def __init__(self) -> None:
        self.events: collections.Counter = collections.Counter()  # malformed, late_replies, ...
        self.outcomes: collections.Counter = collections.Counter()  # (method, outcome) -> answered
        self.by_key: collections.Counter = collections.Counter()  # key name -> requests
        self.errors: collections.Counter = collections.Counter()  # code -> errors, answered or not (streams)
        self._recent: dict = collections.defaultdict(lambda: collections.deque(maxlen=LATENCY_WINDOW))
        self._buckets: dict = collections.defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
        self._latency_sum: collections.Counter = collections.Counter()

    def count(self, event: str, n: int = 1) -> None:
        self.events[event] += n

    def keyed(self, key_name: Optional[str]) -> None:
        if key_name is not None:
            self.by_key[key_name] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def answered(self, method: Any, outcome: str, latency_s: float) -> None:
        method = method_label(method)
        self.outcomes[(method, outcome)] += 1
        if outcome != OK:
            self.errors[outcome] += 1
        self._recent[method].append(latency_s * 1000.0)
        self._buckets[method][bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self._latency_sum[method] += latency_s

    def snapshot(self) -> dict:
        """The counting part of the `stats` reply."""
        latency = {}
        for method, samples in list(self._recent.items()):
            ordered = sorted(samples)
            if ordered:
                latency[method] = {"n": len(ordered), **{f"p{q}_ms": _percentile(ordered, q) for q in (50, 90, 99)}}
        outcomes: dict = {}
        for (method, outcome), n in list(self.outcomes.items()):
            outcomes.setdefault(method, {})[outcome] = n
        return {
            "counters": dict(self.events),
            "requests": {method: sum(by_outcome.values()) for method, by_outcome in outcomes.items()},
            "outcomes": outcomes,
            "errors": dict(self.errors),
            "latency": latency,
            "keys": dict(self.by_key),
        }

    def histograms(self) -> list:
        """[(method, [(upper bound, cumulative count), ..., ("+Inf", total)], sum of seconds)]"""
        result = []
        for method, counts in list(self._buckets.items()):
            cumulative = list(itertools.accumulate(counts))
            result.append(
                (method, list(zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], cumulative)), self._latency_sum[method])
            )
        return result


def _percentile(ordered: list, q: int) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # probes every few seconds would flood the log
        pass


def _http_server_class(host: str) -> type:
    """A threading WSGI server class for `host`'s address family (IPv4 or IPv6)."""
    family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    return type("ExporterServer", (ThreadingMixIn, WSGIServer), {"daemon_threads": True, "address_family": family})


class PrometheusExporter:
    """Serves `metrics` (and the broker's live gauges) at http://host:port/metrics, and probes
    for systemd and Kubernetes: `/healthz` answers 200 while the broker's loop runs (`live`),
    `/readyz` 200 while it can serve (`ready`: health status healthy or degraded), 503
    otherwise; both with a JSON body {"status", "live", "ready"}.

    `gauges()` is called on each scrape and probe, from the HTTP thread: it must only read
    (queue length, worker count, bytes held, stream totals, status), never change broker state."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], dict], host: str, port: int):
        try:
            from prometheus_client import ProcessCollector, make_wsgi_app
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            raise RuntimeError("--metrics-port needs prometheus_client (pip install 'zdepth[metrics]')") from None
        self.metrics = metrics
        self.gauges = gauges
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends: memory that should stay flat
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict, start_response: Callable) -> list:
            probe = PROBES.get(environ.get("PATH_INFO", ""))
            if probe is None:
                return metrics_app(environ, start_response)
            live = self.gauges()
            state = {name: live[name] for name in ("status", "live", "ready")}
            start_response(
                "200 OK" if state[probe] else "503 Service Unavailable", [("Content-Type", "application/json")]
            )
            return [json.dumps(state).encode()]

        self._server = make_server(host, port, app, _http_server_class(host), _QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="zdepth-metrics", daemon=True)
        self._thread.start()
        self.port = self._server.server_port
        log.info("prometheus metrics on http://%s:%d/metrics, probes /healthz and /readyz", host, self.port)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self.metrics
        requests = CounterMetricFamily(
            "zdepth_requests",
            "Requests answered, by method and outcome (ok or an error code)",
            labels=["method", "outcome"],
        )
        for (method, outcome), n in list(m.outcomes.items()):
            requests.add_metric([method, outcome], n)
        yield requests
        errors = CounterMetricFamily(
            "zdepth_errors", "Errors by code, including rejected stream frames", labels=["code"]
        )
        for code, n in list(m.errors.items()):
            errors.add_metric([code], n)
        yield errors
        events = CounterMetricFamily(
            "zdepth_events", "Broker events: malformed messages, late replies, retries, lost workers", labels=["event"]
        )
        for event, n in list(m.events.items()):
            events.add_metric([event], n)
        yield events
        latency = HistogramMetricFamily(
            "zdepth_request_latency_seconds", "Receipt to answer, per method", labels=["method"]
        )
        for method, buckets, total_s in m.histograms():
            latency.add_metric([method], buckets, total_s)
        yield latency
        live = self.gauges()
        for name, doc in (
            ("queue_depth", "Requests waiting for a worker"),
            ("workers", "Registered workers"),
            ("in_flight", "Requests on workers"),
            ("bytes_held", "Bytes of requests queued or in flight"),
        ):
            yield GaugeMetricFamily(f"zdepth_{name}", doc, value=live[name])
        frames = CounterMetricFamily("zdepth_stream_frames", "Camera frames by what became of them", labels=["state"])
        for state, n in live["stream_frames"].items():
            frames.add_metric([state], n)
        yield frames

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
