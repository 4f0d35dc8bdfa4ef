"""CURVE encryption and client authentication for the broker's public sockets.

On an untrusted network API keys travel in the clear and anyone on the path can read depth
maps. With CURVE (CurveZMQ, Curve25519) the server proves who it is with its secret key and
every byte is encrypted. `zmq.auth`'s ZAP handler then decides who may connect: only clients
whose public certificate is in `--curve-clients DIR`, or anyone who knows the server's
public key (`--curve-allow-any`: encryption without client authentication). A client that
fails the handshake never reaches the broker's poll loop: it sees no reply at all.

Key files are the ones `zmq.auth.create_certificates` (and `zdepth keygen`) write:
`NAME.key` holds the public key, `NAME.key_secret` the public and secret keys.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zdepth.errors import ConfigError

log = logging.getLogger("zdepth.broker")

# Set on every secured socket, and the domain the certificates are configured for: pyzmq's
# authenticator treats "*" as the domain of sockets that set none, not as a wildcard, so a
# socket with a domain and certificates under "*" refuses every client ("Unknown domain").
ZAP_DOMAIN = "zdepth"
WORKER_ZAP_DOMAIN = "zdepth-workers"  # the TCP worker socket: only keys in --worker-keys


@dataclass(frozen=True)
class CurveConfig:
    secret_file: str  # the server's NAME.key_secret
    clients_dir: Optional[str] = None  # allowed client public certificates (NAME.key files)
    allow_any: bool = False  # encrypt, but let any client that knows the server key in
    workers_dir: Optional[str] = None  # allowed worker public certificates: CURVE on the TCP worker socket

    def __post_init__(self) -> None:
        if self.clients_dir is not None and self.allow_any:
            raise ConfigError("CURVE takes one of --curve-clients DIR and --curve-allow-any, not both")
        if not self.secures_clients and self.workers_dir is None:
            raise ConfigError("CURVE needs --curve-clients DIR, --curve-allow-any or --worker-keys DIR")

    @property
    def secures_clients(self) -> bool:
        """Whether the client-facing sockets use CURVE (else only the worker socket does)."""
        return self.clients_dir is not None or self.allow_any


class CurveServer:
    """Loads the server's key pair, runs the ZAP authenticator, and secures server sockets."""

    def __init__(self, context: zmq.Context, config: CurveConfig):
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE support")
        self.config = config
        self.public_key, self.secret_key = load_server_keys(config.secret_file)
        for flag, folder in (("--curve-clients", config.clients_dir), ("--worker-keys", config.workers_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise ConfigError(f"{flag} {folder}: not a directory")
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("zdepth.broker.zap"))
        self._auth.start()
        self.reload()

    def reload(self) -> None:
        """(Re-)read the allowed client certificates: adding or deleting a NAME.key and sending
        SIGHUP admits or shuts out that client for new connections."""
        if self.config.secures_clients:
            location = zmq.auth.CURVE_ALLOW_ANY if self.config.allow_any else self.config.clients_dir
            self._auth.configure_curve(domain=ZAP_DOMAIN, location=location)
        for kind, domain, folder in (
            ("client", ZAP_DOMAIN, self.config.clients_dir),
            ("worker", WORKER_ZAP_DOMAIN, self.config.workers_dir),
        ):
            if folder is not None:
                if domain == WORKER_ZAP_DOMAIN:
                    self._auth.configure_curve(domain=domain, location=folder)
                log.info(
                    "CURVE: %d allowed %s certificate(s) in %s", len(list(Path(folder).glob("*.key"))), kind, folder
                )

    def secure(self, sock: zmq.Socket, domain: str = ZAP_DOMAIN) -> None:
        """Make `sock` a CURVE server whose peers the ZAP handler checks against `domain`'s
        certificates. Call before bind."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def close(self) -> None:
        self._auth.stop()


def load_server_keys(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a NAME.key_secret file, refusing a file without a secret."""
    if not os.path.isfile(path):
        raise ConfigError(f"--curve-secret-file {path}: no such file (create one with `zdepth keygen NAME --dir DIR`)")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ConfigError(
            f"--curve-secret-file {path} holds no secret key: give the NAME.key_secret file, not NAME.key"
        )
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("CURVE secret key file %s is readable by other users; chmod 600 it", path)
    return public, secret
