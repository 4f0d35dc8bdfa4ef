"""CURVE encryption for client sockets: turning `server_key` / `client_keys` arguments into keys.

A server started with CURVE (`--curve-secret-file`) only talks to clients that know its
public key; with `--curve-clients DIR` it also only accepts clients whose public key is in
DIR. Every client class takes the same two arguments and hands them to `curve_keys`:

- `server_key`: the server's public key, as a 40-character Z85 string or bytes, or a
  certificate file (`NAME.key`, as written by `zdepth keygen`; a `NAME.key_secret` works
  too, its public key is used). A str or bytes naming an existing file is read as a
  certificate; a `Path` always is.
- `client_keys`: this client's (public, secret) Z85 pair, or its `NAME.key_secret` file.
  Left out, a fresh pair is made for the client object: enough for a server that accepts
  any client (`--curve-allow-any`), which still encrypts everything.

A CURVE handshake that fails (wrong server key, client key not allowed) is silent in
ZeroMQ: the client just never gets a reply, so it surfaces as a `Timeout`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import zmq
from zmq.utils import z85

KeyInput = Union[str, bytes, os.PathLike]
ClientKeysInput = Union[Sequence[Union[str, bytes]], str, bytes, os.PathLike]


@dataclass(frozen=True)
class CurveKeys:
    """The three Z85 keys a CURVE client socket needs; the secret stays out of repr."""

    server_public: bytes
    public: bytes
    secret: bytes = field(repr=False)

    def apply(self, socket: zmq.Socket) -> None:
        """Set the keys on `socket`; must happen before it connects."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def curve_keys(
    server_key: Optional[KeyInput] = None, client_keys: Optional[ClientKeysInput] = None
) -> Optional[CurveKeys]:
    """The keys for a client's sockets, or None for a plain (unencrypted) connection.

    Raises ValueError for a malformed key, a certificate without the needed key, a pair
    whose public key does not belong to its secret, or `client_keys` without `server_key`
    (it would silently connect in clear)."""
    if server_key is None:
        if client_keys is not None:
            raise ValueError(
                "client_keys needs server_key too: without the server's public key the connection is not encrypted"
            )
        return None
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support; install a pyzmq wheel (it bundles libsodium)")
    server_public = (
        _certificate(server_key, "server_key")[0] if _is_file(server_key) else _z85(server_key, "server_key")
    )
    if client_keys is None:
        public, secret = zmq.curve_keypair()
    elif _is_file(client_keys):
        public, secret = _certificate(client_keys, "client_keys")
        if secret is None:
            raise ValueError(
                f"client_keys: {os.fsdecode(client_keys)!r} is a public certificate; give the NAME.key_secret file"
            )
        secret = _z85(secret, "client_keys secret key")
    elif isinstance(client_keys, (str, bytes)):
        raise ValueError(
            f"client_keys: no certificate file {os.fsdecode(client_keys)!r}; give a (public, secret) pair or a NAME.key_secret file"
        )
    else:
        if len(client_keys) != 2:
            raise ValueError("client_keys must be a (public, secret) pair of Z85 keys or a NAME.key_secret file")
        public, secret = _z85(client_keys[0], "client_keys public key"), _z85(client_keys[1], "client_keys secret key")
    if zmq.curve_public(secret) != public:
        raise ValueError("client_keys: the public key does not belong to the secret key")
    return CurveKeys(server_public, public, secret)


def _is_file(value: object) -> bool:
    """A Path is always meant as a file (a missing one is an error later); a str or bytes is
    a file only if it exists, since Z85 keys may contain '/' and '.'."""
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, (str, bytes)) and os.path.isfile(value)


def _certificate(path: os.PathLike | str | bytes, what: str) -> tuple[bytes, Optional[bytes]]:
    import zmq.auth  # ~20 ms of imports that clients without certificate files never pay

    try:
        public, secret = zmq.auth.load_certificate(os.fsdecode(path))
    except OSError:
        raise ValueError(f"{what}: cannot read certificate file {os.fsdecode(path)!r}") from None
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return _z85(public, f"{what} public key"), secret


def _z85(value: object, what: str) -> bytes:
    """`value` as 40 Z85 bytes, checked: libzmq would otherwise fail later with a bare EINVAL."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or len(value) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 key (or a certificate file)")
    try:
        z85.decode(value)
    except (KeyError, ValueError, struct.error):
        raise ValueError(f"{what} is not valid Z85 (expected 40 characters from the Z85 alphabet)") from None
    return value
