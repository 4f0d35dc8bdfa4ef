"""`zdepth serve`, `zdepth broker` and `zdepth worker`: starting the pieces.

`serve` is the embedded default: a broker in this process and one worker process per GPU
(or N CPU workers), each started fresh with `python -m zdepth worker` (never forked:
CUDA and ZeroMQ contexts must not cross a fork) and restarted when it dies. The same
broker and worker also run as separate commands on separate machines.

Ports: `--port P` is the request/reply frontend; P+1 the camera ingress, P+2 the results
PUB socket, P+3 the worker backend (on `--backend-host`, loopback by default), P+4 the
optional imagezmq ingress. The broker process never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from . import protocol as P
from .config import MIB, SHARED_WITH_BROKER, WorkerOptions, add_arguments, from_args, to_argv
from .logs import configure as configure_logging

log = logging.getLogger("zdepth.serve")


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=P.DEFAULT_PORT, help="request/reply port; stream, pub and worker ports follow it")
    parser.add_argument("--ipc", metavar="PATH", help="also serve requests on ipc://PATH (same-host clients, slightly faster)")
    parser.add_argument("--backend-host", default="127.0.0.1",
                        help="interface for the worker port P+3 (default 127.0.0.1). Workers are trusted and the port has no "
                             "authentication: open it (e.g. 0.0.0.0) only on a network where only your GPU hosts can reach it")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accepted key (repeatable); prefer --api-key-file or $ZDEPTH_API_KEYS")
    parser.add_argument("--api-key-file", metavar="FILE", help="key file: 'NAME KEY' or 'NAME sha256:HEX' per line; reloaded on change or SIGHUP")
    parser.add_argument("--require-auth", action="store_true", help="every method but health/describe needs a valid key")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a worker before `overloaded`")
    parser.add_argument("--timeout-ms", type=int, default=30_000, help="default request deadline")
    parser.add_argument("--max-request-mb", type=float, default=32, help="larger requests are answered too_large")
    parser.add_argument("--max-inflight-mb", type=float, default=1024,
                        help="bytes of requests and camera frames held (queued or computing), all clients together; beyond it overloaded")
    parser.add_argument("--max-client-inflight-mb", type=float, default=256,
                        help="the same per client connection and per key name; one request larger than this is too_large")
    parser.add_argument("--rate-limit", type=float, default=0.0, metavar="RPS",
                        help="requests/s per key name (per client connection without auth); beyond it rate_limited. 0 (default): off")
    parser.add_argument("--rate-burst", type=int, metavar="N", help="requests a key may send at once above its rate (default: max(1, RPS))")
    parser.add_argument("--curve-secret-file", metavar="FILE", help="encrypt the client-facing sockets with CURVE: the server's NAME.key_secret (zdepth keygen)")
    parser.add_argument("--curve-clients", metavar="DIR", help="with CURVE, only clients whose public NAME.key is in DIR may connect (reloaded on SIGHUP)")
    parser.add_argument("--curve-allow-any", action="store_true", help="with CURVE, any client knowing the server's public key may connect (encryption only)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on http://HOST:PORT/metrics (needs prometheus_client)")
    parser.add_argument("--imagezmq", action="store_true", help="accept unchanged imagezmq senders (REQ/REP) on PORT+4; no keys there")
    parser.add_argument("--imagezmq-sub", action="append", default=[], metavar="ENDPOINT",
                        help="subscribe to an imagezmq PUB sender (ImageSender(connect_to='tcp://*:5555', REQ_REP=False) binds), "
                             "e.g. tcp://camera-host:5555; repeatable; no keys there")
    parser.add_argument("--imagezmq-fields", type=json.loads, default={"method": P.METRIC_DEPTH}, metavar="JSON",
                        help='prediction fields for imagezmq streams, e.g. \'{"method": "metric_depth", "input_size": 518}\'')
    add_arguments(parser, WorkerOptions, only=SHARED_WITH_BROKER)


def broker_config(args: argparse.Namespace, expect_workers: int = 0):
    from broker.broker import BrokerConfig
    from broker.security import CurveConfig
    from .auth import KeyStore

    curve = None
    if args.curve_secret_file:
        curve = CurveConfig(args.curve_secret_file, args.curve_clients, args.curve_allow_any)
    elif args.curve_clients or args.curve_allow_any:
        raise ValueError("--curve-clients and --curve-allow-any need --curve-secret-file")

    frontends = [f"tcp://{args.host}:{args.port}"] + ([f"ipc://{args.ipc}"] if args.ipc else [])
    return BrokerConfig(
        frontends=frontends,
        backend=f"tcp://{args.backend_host}:{args.port + P.BACKEND_PORT_OFFSET}",
        stream=f"tcp://{args.host}:{args.port + P.STREAM_PORT_OFFSET}",
        pub=f"tcp://{args.host}:{args.port + P.PUB_PORT_OFFSET}",
        imagezmq=f"tcp://{args.host}:{args.port + P.IMAGEZMQ_PORT_OFFSET}" if args.imagezmq else None,
        imagezmq_fields=args.imagezmq_fields,
        imagezmq_sub=tuple(args.imagezmq_sub),
        keys=KeyStore(args.api_key, args.api_key_file),
        require_auth=args.require_auth,
        max_queue=args.max_queue,
        default_timeout_ms=args.timeout_ms,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_inflight_bytes=int(args.max_inflight_mb * 1024 * 1024),
        max_client_inflight_bytes=int(args.max_client_inflight_mb * 1024 * 1024),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        max_image_pixels=args.max_image_pixels,
        hang_timeout_s=args.hang_timeout,
        expect_workers=expect_workers,
        curve=curve,
        metrics_host=args.host,
        metrics_port=args.metrics_port,
    )


def run_broker(args: argparse.Namespace) -> int:
    from broker.broker import Broker

    configure_logging(args.log_level, args.log_format)
    Broker(broker_config(args)).run()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .fetch import UrlFetcher
    from .worker import Worker

    options = from_args(WorkerOptions, args)
    configure_logging(options.log_level, options.log_format)
    fetch_url = None  # checked before the models load, so a bad --allow-url-host fails at once
    if options.allow_url_host:
        fetch_url = UrlFetcher(options.allow_url_host, options.allow_private_urls, int(options.url_max_mb * MIB), options.url_timeout)
        log.info("image_url fetching on: %r", fetch_url)
    engine = Engine(
        checkpoint_dir=options.checkpoint_dir,
        device=options.device,
        dtype=options.dtype,
        max_models=options.max_models,
        random_weights=options.random_weights,
        default_encoder=options.encoder,
        threads=options.threads,
    )
    for item in options.preload:
        encoder, _, dataset = item.partition(":")
        engine.model(encoder, dataset or P.DEFAULT_DATASET)
    worker = Worker(
        args.connect,
        engine,
        name=args.name,
        max_batch=options.max_batch,
        batch_wait_ms=options.batch_wait_ms,
        hang_timeout_s=options.hang_timeout,
        max_image_pixels=options.max_image_pixels,
        fetch_url=fetch_url,
    )
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    if hasattr(signal, "SIGHUP"):  # SIGHUP reloads the broker's keys; one sent to the whole process group must not kill workers
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker.run()
    return 0


def _gpu_count() -> int:
    """Counted in a child process so the broker process never imports torch."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip() or 0)
    except (subprocess.SubprocessError, ValueError):
        return 0


def worker_devices(device: str, workers: Optional[int]) -> list:
    if device == "auto":
        gpus = _gpu_count()
        if gpus:
            return [f"cuda:{i}" for i in range(gpus)][: workers or gpus]
        device = "cpu"
    return [device] * (workers or 1)


class Supervisor:
    """Keeps worker processes running: a worker that dies is started again, with backoff."""

    def __init__(self, commands: list):
        self.commands = commands
        self.processes: list = [None] * len(commands)
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zdepth-supervisor", daemon=True)

    def start(self) -> None:
        for i in range(len(self.commands)):
            self._spawn(i)
        self._thread.start()

    def _spawn(self, i: int) -> None:
        self.processes[i] = subprocess.Popen(self.commands[i])

    def _watch(self) -> None:
        backoff = [0.5] * len(self.commands)
        while not self._stop.wait(0.2):
            for i, process in enumerate(self.processes):
                if process.poll() is None:
                    continue
                log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s", i, process.pid, process.returncode, backoff[i])
                if self._stop.wait(backoff[i]):
                    return
                backoff[i] = min(backoff[i] * 2, 10.0)
                self.restarts += 1
                self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            if process is None:
                continue
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def serve_workers(args: argparse.Namespace) -> list[WorkerOptions]:
    """The options of each worker `zdepth serve` starts: every worker option serve was given,
    one worker per device. Only the device differs, and the torch threads of CPU workers when
    --threads is not given: the machine's cores shared evenly among them."""
    options = from_args(WorkerOptions, args)
    devices = worker_devices(options.device, args.workers)
    cpu_workers = sum(d == "cpu" for d in devices)
    cpu_threads = options.threads or max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    return [dataclasses.replace(options, device=d, threads=cpu_threads if d == "cpu" else options.threads) for d in devices]


def worker_command(options: WorkerOptions, connect: str, name: str) -> list[str]:
    """The command line of one `zdepth worker` process with these options."""
    return [sys.executable, "-m", "zdepth", "worker", "--connect", connect, "--name", name, *to_argv(options)]


def run_serve(args: argparse.Namespace) -> int:
    from broker.broker import Broker

    configure_logging(args.log_level, args.log_format)
    workers = serve_workers(args)
    config = broker_config(args, expect_workers=len(workers))
    # Our own workers share this host: an ipc hop carries their multi-MB replies cheaper than tcp.
    config.local_backend = f"ipc://{tempfile.gettempdir()}/zdepth-{args.port}-{os.getpid()}-workers.ipc"
    broker = Broker(config)  # bind first, so workers find the backend
    supervisor = Supervisor([worker_command(w, config.local_backend, f"worker-{i}-{w.device}") for i, w in enumerate(workers)])
    supervisor.start()
    log.info("serving on %s with %d worker(s): %s", ", ".join(config.frontends), len(workers), ", ".join(w.device for w in workers))
    try:
        broker.run()
    finally:
        supervisor.stop()
    return 0


def run_health(args: argparse.Namespace) -> int:
    import json

    from clients import DepthClient

    with DepthClient(args.server, timeout=args.timeout) as client:
        print(json.dumps(client.health(), indent=2, default=str))
    return 0


def register(subparsers) -> None:
    """Add the serving subcommands to the `zdepth` parser."""
    serve = subparsers.add_parser("serve", help="broker + one worker per GPU (or N CPU workers) in one command")
    add_broker_arguments(serve)
    add_arguments(serve, WorkerOptions, exclude=SHARED_WITH_BROKER)
    serve.add_argument("--workers", type=int, help="worker processes (default: one per GPU, else 1 CPU worker)")
    serve.set_defaults(func=run_serve)

    broker = subparsers.add_parser("broker", help="the broker alone; workers connect to PORT+3")
    add_broker_arguments(broker)
    broker.set_defaults(func=run_broker)

    worker = subparsers.add_parser("worker", help="one worker process for one device, connecting to a broker")
    worker.add_argument("--connect", required=True, help="the broker's worker endpoint, e.g. tcp://gpu-host:5558")
    worker.add_argument("--name", help="name shown in health (default host-pid)")
    add_arguments(worker, WorkerOptions)
    worker.set_defaults(func=run_worker)

    health = subparsers.add_parser("health", help="ask a server for its health")
    health.add_argument("--server", default=f"tcp://127.0.0.1:{P.DEFAULT_PORT}")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=run_health)
