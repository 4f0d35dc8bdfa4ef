"""`zdepth serve`, `zdepth broker` and `zdepth worker`: starting the pieces.

`serve` is the embedded default: a broker in this process and one worker process per GPU
(or N CPU workers), each started fresh with `python -m zdepth worker` (never forked:
CUDA and ZeroMQ contexts must not cross a fork) and restarted when it dies or the broker
declares it hung. The same broker and worker also run as separate commands on separate
machines. SIGTERM/SIGINT drain every one of them (docs/protocol.md section 12): the broker
finishes accepted work within --drain-timeout, a worker its current batch.

Ports: `--port P` is the request/reply frontend; P+1 the camera ingress, P+2 the results
PUB socket, P+3 the TCP worker backend (serve: only with `--backend-host`, its own workers
use ipc; broker: loopback by default; CURVE with `--worker-keys`), P+4 the optional imagezmq
ingress. The broker process never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

from broker.broker import BrokerConfig
from broker.limits import MB

from . import protocol as P
from .config import MIB, SHARED_WITH_BROKER, WorkerOptions, add_arguments, from_args, parse_image_sizes, to_argv
from .errors import ConfigError, UserError
from .logs import configure as configure_logging
from .resize import ComputeLimits

log = logging.getLogger("zdepth.serve")


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--port", type=int, default=P.DEFAULT_PORT, help="request/reply port; stream, pub and worker ports follow it"
    )
    parser.add_argument(
        "--ipc", metavar="PATH", help="also serve requests on ipc://PATH (same-host clients, slightly faster)"
    )
    parser.add_argument(
        "--backend-host",
        help="interface for the TCP worker port P+3 (broker: default 127.0.0.1; serve: none, its own workers use ipc). "
        "Beyond loopback use --worker-keys: without it the port has no authentication",
    )
    parser.add_argument(
        "--worker-keys",
        metavar="DIR",
        help="only workers whose public NAME.key (zdepth keygen) is in DIR may connect to the TCP worker port, "
        "over CURVE (needs --curve-secret-file; reloaded on SIGHUP)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted key (repeatable); prefer --api-key-file or $ZDEPTH_API_KEYS",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="key file: 'NAME KEY' or 'NAME sha256:HEX' per line; reloaded on change or SIGHUP",
    )
    parser.add_argument(
        "--require-auth", action="store_true", help="every method but health/describe needs a valid key"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=BrokerConfig.max_queue,
        help="requests waiting for a worker before `overloaded`",
    )
    parser.add_argument(
        "--timeout-ms", type=int, default=BrokerConfig.default_timeout_ms, help="default request deadline"
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=BrokerConfig.max_request_bytes / MB,
        help="larger requests are answered too_large",
    )
    parser.add_argument(
        "--max-inflight-mb",
        type=float,
        default=BrokerConfig.max_inflight_bytes / MB,
        help="bytes of requests and camera frames held (queued or computing), all clients together; beyond it overloaded",
    )
    parser.add_argument(
        "--max-client-inflight-mb",
        type=float,
        default=BrokerConfig.max_client_inflight_bytes / MB,
        help="the same per client connection and per key name; one request larger than this is too_large",
    )
    parser.add_argument(
        "--max-client-reply-mb",
        type=float,
        default=BrokerConfig.max_client_reply_bytes / MB,
        help="replies queued toward one client connection that it has not read; beyond it its replies are dropped "
        "(an overloaded error stands in) and its new requests refused",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=BrokerConfig.handshake_s,
        metavar="S",
        help="public sockets: a connection that has not finished the ZeroMQ handshake after S seconds is closed",
    )
    parser.add_argument(
        "--peer-heartbeat",
        type=float,
        default=BrokerConfig.peer_heartbeat_s,
        metavar="S",
        help="public sockets: ZeroMQ PING every S seconds; a peer that answers none for 3*S is disconnected (0: off)",
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=BrokerConfig.rate_limit,
        metavar="RPS",
        help="requests/s per key name (per client connection without auth); beyond it rate_limited. 0 (default): off",
    )
    parser.add_argument(
        "--rate-burst",
        type=int,
        metavar="N",
        help="requests a key may send at once above its rate (default: max(1, RPS))",
    )
    parser.add_argument(
        "--curve-secret-file",
        metavar="FILE",
        help="encrypt the client-facing sockets with CURVE: the server's NAME.key_secret (zdepth keygen)",
    )
    parser.add_argument(
        "--curve-clients",
        metavar="DIR",
        help="with CURVE, only clients whose public NAME.key is in DIR may connect (reloaded on SIGHUP)",
    )
    parser.add_argument(
        "--curve-allow-any",
        action="store_true",
        help="with CURVE, any client knowing the server's public key may connect (encryption only)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs prometheus_client)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=BrokerConfig.drain_timeout_s,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds the requests already accepted may take to finish before the rest are answered "
        "shutting_down (a second signal: at once) (default: %(default)s)",
    )
    parser.add_argument(
        "--no-worker-grace",
        type=float,
        default=BrokerConfig.no_worker_grace_s,
        metavar="S",
        help="with no worker connected for this long, queued and new requests are answered worker_lost at once "
        "instead of at their deadline; 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--imagezmq", action="store_true", help="accept unchanged imagezmq senders (REQ/REP) on PORT+4; no keys there"
    )
    parser.add_argument(
        "--imagezmq-sub",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="subscribe to an imagezmq PUB sender (ImageSender(connect_to='tcp://*:5555', REQ_REP=False) binds), "
        "e.g. tcp://camera-host:5555; repeatable; no keys there",
    )
    parser.add_argument(
        "--imagezmq-fields",
        type=json.loads,
        default={"method": P.METRIC_DEPTH},
        metavar="JSON",
        help='prediction fields for imagezmq streams, e.g. \'{"method": "metric_depth", "input_size": 518}\'',
    )
    add_arguments(parser, WorkerOptions, only=SHARED_WITH_BROKER)


def broker_config(args: argparse.Namespace, expect_workers: int = 0):
    from broker.broker import BrokerConfig
    from broker.security import CurveConfig

    from .auth import KeyStore

    curve = None
    if args.curve_secret_file:
        curve = CurveConfig(args.curve_secret_file, args.curve_clients, args.curve_allow_any, args.worker_keys)
    elif args.curve_clients or args.curve_allow_any or args.worker_keys:
        raise ConfigError("--curve-clients, --curve-allow-any and --worker-keys need --curve-secret-file")
    if args.backend_host and not _is_loopback(args.backend_host) and not args.worker_keys:
        log.warning(
            "worker port on %s without --worker-keys: any process that reaches it can register as a worker",
            args.backend_host,
        )

    frontends = [P.tcp_endpoint(args.host, args.port)] + ([f"ipc://{args.ipc}"] if args.ipc else [])
    if not _is_loopback(args.host) and not args.require_auth and (curve is None or not curve.secures_clients):
        log.warning(
            "binding %s beyond loopback with neither --require-auth nor CURVE: anyone who can reach it may use it",
            args.host,
        )
    ports = P.port_layout(args.port)
    return BrokerConfig(
        frontends=frontends,
        backend=P.tcp_endpoint(args.backend_host or "127.0.0.1", ports.backend),
        stream=P.tcp_endpoint(args.host, ports.stream),
        pub=P.tcp_endpoint(args.host, ports.pub),
        imagezmq=P.tcp_endpoint(args.host, ports.imagezmq) if args.imagezmq else None,
        imagezmq_fields=args.imagezmq_fields,
        imagezmq_sub=tuple(args.imagezmq_sub),
        keys=KeyStore(args.api_key, args.api_key_file),
        require_auth=args.require_auth,
        max_queue=args.max_queue,
        default_timeout_ms=args.timeout_ms,
        max_request_bytes=int(args.max_request_mb * MB),
        max_inflight_bytes=int(args.max_inflight_mb * MB),
        max_client_inflight_bytes=int(args.max_client_inflight_mb * MB),
        max_client_reply_bytes=int(args.max_client_reply_mb * MB),
        handshake_s=args.handshake_timeout,
        peer_heartbeat_s=args.peer_heartbeat,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        max_image_pixels=args.max_image_pixels,
        compute=ComputeLimits(args.max_tokens, args.max_aspect),
        hang_timeout_s=args.hang_timeout,
        expect_workers=expect_workers,
        curve=curve,
        metrics_host=args.host.strip("[]"),
        metrics_port=args.metrics_port,
        drain_timeout_s=args.drain_timeout,
        no_worker_grace_s=args.no_worker_grace,
    )


def _is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class ServeError(UserError):
    """serve or broker cannot start or had to stop; the message says why and what to do."""


def _start_broker(config, context):
    """A Broker on `config`'s endpoints; a port in use is one line naming it and the port layout."""
    from broker.broker import BindError, Broker
    from broker.limits import raise_fd_limit

    log.info("open-file limit: %d", raise_fd_limit())  # one per connection; see docs/limits.md
    try:
        return Broker(config, context)
    except BindError as exc:
        ports = P.port_layout(int(config.frontends[0].rsplit(":", 1)[1]))
        raise ServeError(
            f"{exc}. zdepth uses ports {ports.request}..{ports.imagezmq} (--port P: requests P, cameras P+1, "
            f"results P+2, workers P+3, imagezmq P+4); is another server running? Choose another --port"
        ) from None


def _run_until_done(broker, context) -> None:
    """Run the broker's loop, then let its last answers leave (its sockets linger briefly) before returning."""
    try:
        broker.run()
    finally:
        context.term()


def run_broker(args: argparse.Namespace) -> int:
    import zmq

    configure_logging(args.log_level, args.log_format)
    context = zmq.Context()
    _run_until_done(_start_broker(broker_config(args), context), context)
    return 0


def _worker_curve_keys(args: argparse.Namespace) -> Optional[tuple]:
    """(public, secret, server public) Z85 keys for a worker connecting over CURVE, or None."""
    if not (args.curve_secret_file or args.curve_server_key):
        return None
    if not (args.curve_secret_file and args.curve_server_key):
        raise ServeError(
            "a worker's CURVE needs --curve-secret-file (its own NAME.key_secret) and --curve-server-key (the broker's NAME.key)"
        )
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(args.curve_secret_file)
        server, _ = zmq.auth.load_certificate(args.curve_server_key)
    except (OSError, ValueError) as exc:
        raise ServeError(f"worker CURVE keys: {exc}") from None
    if not secret:
        raise ServeError(
            f"--curve-secret-file {args.curve_secret_file} holds no secret key: give the NAME.key_secret file"
        )
    return public, secret, server


def run_worker(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .fetch import UrlFetcher
    from .worker import Worker, warm_up_engine

    options = from_args(WorkerOptions, args)
    configure_logging(options.log_level, options.log_format)
    fetch_url = None  # checked before the models load, so a bad --allow-url-host fails at once
    if options.allow_url_host:
        fetch_url = UrlFetcher(
            options.allow_url_host, options.allow_private_urls, int(options.url_max_mb * MIB), options.url_timeout
        )
        log.info("image_url fetching on: %r", fetch_url)
    engine = Engine(
        checkpoint_dir=options.checkpoint_dir,
        device=options.device,
        dtype=options.dtype,
        max_models=options.max_models,
        random_weights=options.random_weights,
        default_encoder=options.encoder,
        threads=options.threads,
        compile=options.compile,
        max_graphs=options.max_graphs,
        max_batch=options.max_batch,
        compile_in_background=True,  # a new shape's requests run eagerly while its graph builds
    )
    warmup_sizes = parse_image_sizes(options.warmup_shapes) if options.warmup_shapes else []
    for encoder, dataset in options.preloaded():
        engine.model(encoder, dataset)
    worker = Worker(
        args.connect,
        engine,
        name=args.name,
        max_batch=options.max_batch,
        batch_wait_ms=options.batch_wait_ms,
        hang_timeout_s=options.hang_timeout,
        max_image_pixels=options.max_image_pixels,
        compute=ComputeLimits(options.max_tokens, options.max_aspect, options.max_jpeg_scans),
        fetch_url=fetch_url,
        warm_up=lambda: warm_up_engine(engine, options.preload, warmup_sizes),
        parent_pid=args.parent_pid,
        curve_keys=_worker_curve_keys(args),
    )
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    if hasattr(
        signal, "SIGHUP"
    ):  # SIGHUP reloads the broker's keys; one sent to the whole process group must not kill workers
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker.run()
    return 0


def _gpu_count() -> int:
    """Counted in a child process so the broker process never imports torch."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
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


# `zdepth` exits 2 on a mistake that is the user's to fix (zdepth/cli.py): restarting a worker cannot fix it.
CONFIG_ERROR_STATUS = 2
BACKOFF_S = 0.5  # first restart delay, doubling per restart up to BACKOFF_MAX_S
BACKOFF_MAX_S = 10.0
STABLE_S = 30.0  # a worker that ran this long before it died is restarted after BACKOFF_S again


class Supervisor:
    """Keeps worker processes running: a worker that dies, or that the broker declared dead or
    hung (`kill`), is started again with backoff. A worker that exits with CONFIG_ERROR_STATUS
    (a configuration error, e.g. `--dtype fp16 --device cpu`; its message is on stderr) is not
    restarted: `fatal` says so and `on_fatal` is called, once.

    Workers run in their own session, so a Ctrl-C in a terminal reaches serve alone, which
    drains first and then stops them; each is told serve's pid and stops when serve is gone."""

    def __init__(self, commands: list, on_fatal: Optional[Callable[[], None]] = None):
        self.commands = commands
        self.on_fatal = on_fatal
        self.fatal: Optional[str] = None
        self.processes: list = [None] * len(commands)
        self._started = [0.0] * len(commands)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zdepth-supervisor", daemon=True)

    def start(self) -> None:
        for i in range(len(self.commands)):
            self._spawn(i)
        self._thread.start()

    def _spawn(self, i: int) -> None:
        with self._lock:
            self.processes[i] = subprocess.Popen(self.commands[i], start_new_session=True)
            self._started[i] = time.monotonic()

    def kill(self, pid: Optional[int], reason: str) -> None:
        """Kill our worker with this pid (SIGKILL works on a stopped or hung process too); `_watch` restarts it."""
        with self._lock:
            for process in self.processes:
                if process is not None and pid is not None and process.pid == pid and process.poll() is None:
                    log.warning("killing worker pid %d (%s) so that it is restarted", pid, reason)
                    process.kill()

    def _watch(self) -> None:
        backoff = [BACKOFF_S] * len(self.commands)
        while not self._stop.wait(0.2):
            for i, process in enumerate(self.processes):
                if process.poll() is None:
                    continue
                if process.returncode == CONFIG_ERROR_STATUS:
                    self.fatal = f"worker {i} exited with status {CONFIG_ERROR_STATUS}, a configuration error (its message is above); stopping"
                    if self.on_fatal is not None:
                        self.on_fatal()
                    return
                if time.monotonic() - self._started[i] > STABLE_S:
                    backoff[i] = BACKOFF_S
                log.warning(
                    "worker %d (pid %d) exited with %s; restarting in %.1f s",
                    i,
                    process.pid,
                    process.returncode,
                    backoff[i],
                )
                if self._stop.wait(backoff[i]):
                    return
                backoff[i] = min(backoff[i] * 2, BACKOFF_MAX_S)
                self._spawn(i)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every worker (each finishes its current batch), SIGKILL those still running after `grace_s`."""
        self._stop.set()
        with self._lock:
            processes = [p for p in self.processes if p is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve_workers(args: argparse.Namespace) -> list[WorkerOptions]:
    """The options of each worker `zdepth serve` starts: every worker option serve was given,
    one worker per device. Only the device differs, and the torch threads of CPU workers when
    --threads is not given: the machine's cores shared evenly among them."""
    options = from_args(WorkerOptions, args)
    devices = worker_devices(options.device, args.workers)
    cpu_workers = sum(d == "cpu" for d in devices)
    cpu_threads = options.threads or max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
    return [
        dataclasses.replace(options, device=d, threads=cpu_threads if d == "cpu" else options.threads) for d in devices
    ]


def worker_command(options: WorkerOptions, connect: str, name: str) -> list[str]:
    """The command line of one `zdepth worker` process with these options, as serve's child."""
    return [
        sys.executable,
        "-m",
        "zdepth",
        "worker",
        "--connect",
        connect,
        "--name",
        name,
        "--parent-pid",
        str(os.getpid()),
        *to_argv(options),
    ]


def run_serve(args: argparse.Namespace) -> int:
    """Broker here, workers as supervised child processes. SIGTERM/SIGINT drains (a second one
    stops at once); exits 0 after a drain, 2 when a worker's configuration error stopped it."""
    import zmq

    configure_logging(args.log_level, args.log_format)
    options = from_args(WorkerOptions, args)
    if args.fetch_weights and not options.random_weights:
        from .weights import fetch_missing  # torch-free

        fetch_missing(options.needed_checkpoints(), options.checkpoint_dir)
    # Our own workers share this host: an ipc hop carries their multi-MB replies cheaper than tcp.
    ipc_path = os.path.join(tempfile.gettempdir(), f"zdepth-{args.port}-{os.getpid()}-workers.ipc")
    workers = serve_workers(args)
    config = broker_config(args, expect_workers=len(workers))
    config.local_backend = f"ipc://{ipc_path}"
    if args.backend_host is None:  # no TCP worker port unless asked for
        config.backend = None
    context = zmq.Context()
    broker = _start_broker(config, context)  # bind first, so workers find the backend
    supervisor = Supervisor(
        [worker_command(w, config.local_backend, f"worker-{i}-{w.device}") for i, w in enumerate(workers)],
        on_fatal=broker.stop,
    )
    broker.on_worker_lost = lambda worker, reason: supervisor.kill(worker.info["pid"], reason)
    supervisor.start()
    log.info(
        "serving on %s with %d worker(s): %s",
        ", ".join(config.frontends),
        len(workers),
        ", ".join(w.device for w in workers),
    )
    try:
        _run_until_done(broker, context)
    finally:
        supervisor.stop(grace_s=0.5 if broker.stopped else 5.0)
        if os.path.exists(ipc_path):
            os.unlink(ipc_path)
    if supervisor.fatal:
        raise ServeError(supervisor.fatal)
    return 0


# `zdepth health` exit statuses, for systemd and probes: 0 healthy (ready, at full strength), 1
# answered but not ready or degraded (draining, starting, no workers, fewer than started), 2 unreachable.
HEALTH_READY, HEALTH_NOT_READY, HEALTH_UNREACHABLE = 0, 1, 2


def run_health(args: argparse.Namespace) -> int:
    import json

    from clients import DepthClient, Timeout

    try:
        with DepthClient(args.server, timeout=args.timeout, retries=0) as client:
            health = client.health()
    except Timeout as exc:
        print(f"zdepth: {exc.message}", file=sys.stderr)
        return HEALTH_UNREACHABLE
    print(json.dumps(health, indent=2, default=str))
    return HEALTH_READY if health.get("status") == "healthy" else HEALTH_NOT_READY


def register(subparsers) -> None:
    """Add the serving subcommands to the `zdepth` parser."""
    serve = subparsers.add_parser("serve", help="broker + one worker per GPU (or N CPU workers) in one command")
    add_broker_arguments(serve)
    add_arguments(serve, WorkerOptions, exclude=SHARED_WITH_BROKER)
    serve.add_argument("--workers", type=int, help="worker processes (default: one per GPU, else 1 CPU worker)")
    serve.add_argument(
        "--fetch-weights",
        action="store_true",
        help="first download the checkpoints the workers will load (--encoder's hypersim model and --preload ones) "
        "when they are missing; when that fails, say what to do and exit 2 (`make serve` sets it)",
    )
    serve.set_defaults(func=run_serve)

    broker = subparsers.add_parser("broker", help="the broker alone; workers connect to PORT+3")
    add_broker_arguments(broker)
    broker.set_defaults(func=run_broker)

    worker = subparsers.add_parser("worker", help="one worker process for one device, connecting to a broker")
    worker.add_argument("--connect", required=True, help="the broker's worker endpoint, e.g. tcp://gpu-host:5558")
    worker.add_argument("--name", help="name shown in health (default host-pid)")
    worker.add_argument(
        "--parent-pid",
        type=int,
        help="stop when the process with this pid is no longer our parent (zdepth serve sets it)",
    )
    worker.add_argument(
        "--curve-secret-file",
        metavar="FILE",
        help="connect over CURVE with this worker key pair (its NAME.key_secret from zdepth keygen)",
    )
    worker.add_argument(
        "--curve-server-key", metavar="FILE", help="with --curve-secret-file: the broker's public NAME.key"
    )
    add_arguments(worker, WorkerOptions)
    worker.set_defaults(func=run_worker)

    health = subparsers.add_parser("health", help="ask a server for its health")
    health.add_argument("--server", default=f"tcp://127.0.0.1:{P.DEFAULT_PORT}")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=run_health)
