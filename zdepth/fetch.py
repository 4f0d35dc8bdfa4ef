"""Fetching `image_url` images for the worker, without handing callers a way into the network.

A URL in a request makes the server open a connection of the caller's choosing (SSRF): to
a cloud metadata service, a database on the private network, localhost admin ports. So
fetching is off unless the operator allows hosts (`--allow-url-host`), and `UrlFetcher`
then refuses, with a `ZDepthError` the caller sees:

- schemes other than http and https, and URLs carrying user:password;
- hosts not on the allow-list (an exact host name or IP, or `*.example.com` for any
  subdomain of example.com, not example.com itself);
- hosts resolving to any private, loopback, link-local, multicast, reserved or otherwise
  non-global address (IPv4 inside IPv6 included), unless `allow_private`;
- redirects: followed by hand, at most `max_redirects`, each target checked like the first
  URL (a redirect to a host off the list is refused), never from https down to http;
- answers other than 200, bodies over `max_bytes` (by Content-Length and by counting while
  reading; `too_large`), and the whole fetch taking over `timeout_s`.

The connection goes to the very address that was checked (no second DNS lookup that a
rebinding DNS server could answer differently), with the name in the Host header and, for
https, in SNI and certificate verification. Residual risk: the DNS lookup itself has no
timeout of its own (the system resolver's applies), and an allow-listed host that is
compromised can still serve any bytes, which the image decoder then checks.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Union
from urllib.parse import urljoin, urlsplit

from . import protocol as P
from .protocol import ZDepthError, bad_request

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT_S = 5.0
MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class _Target:
    """One checked URL: where to connect (`ip`) and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    ip: str


class UrlFetcher:
    """`fetcher(url) -> bytes` for `Worker(fetch_url=...)`; see the module docstring for the rules."""

    def __init__(
        self,
        allow_hosts: Iterable[str],
        allow_private: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_redirects: int = MAX_REDIRECTS,
    ):
        self.exact: set[str] = set()
        self.suffixes: list[str] = []  # ".example.com" for "*.example.com"
        for entry in allow_hosts:
            host = entry.strip().lower().rstrip(".")
            if host.startswith("*."):
                if len(host) < 3 or "*" in host[2:]:
                    raise ValueError(f"allow-list entry {entry!r}: a wildcard is '*.' followed by a domain")
                self.suffixes.append(host[1:])
            elif host and "*" not in host:
                self.exact.add(host.strip("[]"))
            else:
                raise ValueError(f"allow-list entry {entry!r}: give a host name, an IP address or '*.domain'")
        if not self.exact and not self.suffixes:
            raise ValueError("UrlFetcher needs at least one allowed host (leave URL fetching off instead)")
        if max_bytes <= 0 or timeout_s <= 0 or max_redirects < 0:
            raise ValueError("max_bytes and timeout_s must be > 0 and max_redirects >= 0")
        self.allow_private = allow_private
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)
        self.max_redirects = int(max_redirects)
        self._tls = ssl.create_default_context()

    def __repr__(self) -> str:
        hosts = sorted(self.exact) + [f"*{s}" for s in self.suffixes]
        return f"UrlFetcher({hosts}, allow_private={self.allow_private}, max_bytes={self.max_bytes}, timeout_s={self.timeout_s:g})"

    def __call__(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        target = self._check(url)
        for _ in range(self.max_redirects + 1):
            status, location, body = self._get(target, deadline)
            if status == 200:
                return body
            if status not in _REDIRECTS:
                raise bad_request(f"image_url: {target.host} answered HTTP {status}")
            if not location:
                raise bad_request(f"image_url: {target.host} answered HTTP {status} without a Location")
            url = urljoin(f"{target.scheme}://{_netloc(target)}{target.path}", location)
            previous, target = target, self._check(url)
            if previous.scheme == "https" and target.scheme == "http":
                raise bad_request(f"image_url: {previous.host} redirected from https to plain http; refused")
        raise bad_request(f"image_url: more than {self.max_redirects} redirects")

    # --- checks -----------------------------------------------------------------------------

    def allowed_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.exact or any(host.endswith(suffix) for suffix in self.suffixes)

    def _check(self, url: str) -> _Target:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise bad_request(f"image_url is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise bad_request(
                f"image_url: only http and https URLs are fetched, not {scheme or 'a URL without a scheme'}"
            )
        if parts.username is not None or parts.password is not None:
            raise bad_request("image_url: URLs with user:password are refused")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise bad_request("image_url has no host")
        if not host.isascii():
            raise bad_request("image_url: write an international host name in its ASCII (punycode) form")
        if not self.allowed_host(host):
            raise bad_request(f"image_url host {host!r} is not on this server's allow-list (--allow-url-host)")
        port = port or _DEFAULT_PORTS[scheme]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if any(c <= " " or c == "\x7f" for c in path):
            raise bad_request("image_url has spaces or control characters; percent-encode them")
        return _Target(scheme, host, port, path, self._resolve(host, port))

    def _resolve(self, host: str, port: int) -> str:
        """The address to connect to. Every address the name has is checked, not only the
        first: otherwise a name with one public and one private address would pass."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise bad_request(f"image_url: cannot resolve {host!r}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not self.allow_private:
            for address in addresses:
                if not is_public(address):
                    raise bad_request(
                        f"image_url: {host!r} resolves to {address}, a private/loopback/link-local/reserved address; "
                        "refused (the operator allows those with --allow-private-urls)"
                    )
        return str(addresses[0])

    # --- the exchange -----------------------------------------------------------------------

    def _get(self, target: _Target, deadline: float) -> tuple[int, Optional[str], bytes]:
        """(status, Location, body) of one GET to the checked address; body only for 200."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout(target)
        try:
            sock = socket.create_connection((target.ip, target.port), timeout=remaining)
        except OSError as exc:
            raise self._failed(target, exc, deadline) from None
        if target.scheme == "https":
            sock = self._tls.wrap_socket(sock, server_hostname=target.host, do_handshake_on_connect=False)
        # A per-operation socket timeout would let a server that trickles bytes hold the fetch
        # for far longer than timeout_s; this watchdog ends the whole exchange at the deadline.
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _abort, (sock,))
        watchdog.start()
        connection = http.client.HTTPConnection(target.host, target.port, timeout=remaining)
        connection.sock = sock  # connect to the checked address, not to a fresh DNS answer
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            headers = {
                "Host": _netloc(target),
                "User-Agent": "zdepth",
                "Accept": "image/jpeg, image/png",
                "Accept-Encoding": "identity",
            }
            connection.request("GET", target.path, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                return response.status, response.getheader("Location"), b""
            body = self._read(target, response)
        except (OSError, http.client.HTTPException) as exc:
            raise self._failed(target, exc, deadline) from None
        finally:
            watchdog.cancel()
            connection.close()
        if time.monotonic() >= deadline:  # the watchdog cut a body of unknown length short
            raise self._timeout(target)
        return 200, None, body

    def _read(self, target: _Target, response: http.client.HTTPResponse) -> bytes:
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise self._too_large(target)
        chunks, size = [], 0
        while True:
            chunk = response.read(min(_CHUNK, self.max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(target)

    def _too_large(self, target: _Target) -> ZDepthError:
        return ZDepthError(
            P.TOO_LARGE, f"image_url: the image at {target.host} is over the {self.max_bytes} byte limit"
        )

    def _timeout(self, target: _Target) -> ZDepthError:
        return bad_request(f"image_url: {target.host} did not deliver the image within {self.timeout_s:g} s")

    def _failed(self, target: _Target, exc: Exception, deadline: float) -> ZDepthError:
        if time.monotonic() >= deadline or isinstance(exc, (TimeoutError, socket.timeout)):
            return self._timeout(target)
        return bad_request(f"image_url: fetching from {target.host} failed: {type(exc).__name__}: {exc}")


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address, also when IPv4 travels inside IPv6 (mapped,
    6to4, Teredo, NAT64): ::ffff:127.0.0.1 is loopback too."""
    if address.is_multicast or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(is_public(ip) for ip in embedded if ip is not None)
    return True


def _netloc(target: _Target) -> str:
    """host[:port] for the Host header and for resolving relative redirects."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == _DEFAULT_PORTS[target.scheme] else f"{host}:{target.port}"


def _abort(sock: socket.socket) -> None:
    """End a blocked exchange at its deadline. The plain socket's shutdown (not SSLSocket's,
    which also tears down TLS state the other thread is using) makes the pending read fail."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
