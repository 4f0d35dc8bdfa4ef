"""`image_url` fetching: the allow-list, private addresses, redirects, size cap and timeout,
against a real local HTTP server; then through a real `zdepth serve`."""

from __future__ import annotations

import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from clients import DepthClient, ServerError
from tests.servers import TEST_INPUT_SIZE, Server
from zdepth import protocol as P
from zdepth.fetch import UrlFetcher

CAP = 10_000  # max_bytes for the size tests


def png_bytes(h: int = 24, w: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # bodies without Content-Length end when the connection closes
    hosts_seen: list = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict = None, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Handler.hosts_seen.append(self.headers.get("Host"))
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/big-declared":
            self._send(200, b"x" * (CAP + 1))
        elif path == "/big-undeclared":  # no Content-Length: the cap must count bytes as they come
            self._send(200, b"x" * (CAP * 3), length=False)
        elif path == "/slow":
            time.sleep(2.0)
            self._send(200, PNG)
        elif path == "/trickle":  # headers at once, then a byte at a time: per-read timeouts never fire
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/to-local":
            self._send(302, headers={"Location": "/img.png"})
        elif path == "/to-elsewhere":
            self._send(302, headers={"Location": "http://not-allowed.example/img.png"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        else:
            self._send(404, b"no")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the slow handlers write into connections the fetcher already gave up on


@pytest.fixture(scope="module")
def http_server():
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def local(**kwargs) -> UrlFetcher:
    return UrlFetcher(["127.0.0.1"], allow_private=True, **kwargs)


def refused(fetcher: UrlFetcher, url: str, code: str = P.BAD_REQUEST) -> str:
    with pytest.raises(P.ZDepthError) as err:
        fetcher(url)
    assert err.value.code == code
    return err.value.message


# --- the fetcher on its own --------------------------------------------------------------


def test_allowed_host_is_fetched(http_server):
    assert local()(f"http://{http_server}/img.png") == PNG


def test_host_not_on_the_list_is_refused(http_server):
    port = http_server.split(":")[1]
    assert "allow-list" in refused(local(), f"http://localhost:{port}/img.png")


def test_loopback_refused_unless_private_addresses_are_allowed(http_server):
    message = refused(UrlFetcher(["127.0.0.1"]), f"http://{http_server}/img.png")
    assert "127.0.0.1" in message and "--allow-private-urls" in message


def test_names_are_resolved_once_and_every_address_is_checked(http_server, monkeypatch):
    """The connection goes to the address that was checked (a rebinding DNS server gets no
    second question), with the name in the Host header; a name with any private address is
    refused even when another of its addresses is public."""
    real = socket.getaddrinfo
    asked = []

    def fake(host, port, *args, **kwargs):
        asked.append(host)
        if host == "images.test":
            return real("127.0.0.1", port, *args, **kwargs)
        if host == "mixed.test":
            return real("8.8.8.8", port, *args, **kwargs) + real("10.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    port = http_server.split(":")[1]
    Handler.hosts_seen.clear()
    assert UrlFetcher(["images.test"], allow_private=True)(f"http://images.test:{port}/img.png") == PNG
    assert asked.count("images.test") == 1 and Handler.hosts_seen == [f"images.test:{port}"]
    assert "10.0.0.1" in refused(UrlFetcher(["*.test"]), f"http://mixed.test:{port}/img.png")


def test_allow_list_matching():
    fetcher = UrlFetcher(["images.example.com", "*.cdn.example.org", "10.1.2.3"])
    assert fetcher.allowed_host("images.example.com") and fetcher.allowed_host("IMAGES.example.com.")
    assert fetcher.allowed_host("a.cdn.example.org") and fetcher.allowed_host("a.b.cdn.example.org")
    assert not fetcher.allowed_host("cdn.example.org")  # the wildcard means subdomains only
    assert not fetcher.allowed_host("evilcdn.example.org") and not fetcher.allowed_host("images.example.com.evil.net")
    assert fetcher.allowed_host("10.1.2.3") and not fetcher.allowed_host("10.1.2.4")
    for bad in ([], ["*"], ["*."], ["a.*.com"]):
        with pytest.raises(ValueError):
            UrlFetcher(bad)


@pytest.mark.parametrize(
    "url, words",
    [
        ("ftp://127.0.0.1/img.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@127.0.0.1/img.png", "user:password"),
        ("http://127.0.0.1:99999/img.png", "not a valid URL"),
        ("http:///img.png", "no host"),
        ("http://127.0.0.1/a b.png", "percent-encode"),
        ("http://127.0.0.1/a.png\x00", "percent-encode"),
    ],
)
def test_malformed_or_unsupported_urls(url, words):
    assert words in refused(local(), url)


def test_redirects(http_server):
    assert local()(f"http://{http_server}/to-local") == PNG
    assert "not-allowed.example" in refused(local(), f"http://{http_server}/to-elsewhere")
    assert "redirects" in refused(local(), f"http://{http_server}/loop")
    assert "HTTP 404" in refused(local(), f"http://{http_server}/missing")


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_size_cap(http_server, path):
    assert "10000 byte limit" in refused(local(max_bytes=CAP), f"http://{http_server}{path}", P.TOO_LARGE)


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_timeout_covers_the_whole_fetch(http_server, path):
    started = time.monotonic()
    assert "within 0.5 s" in refused(local(timeout_s=0.5), f"http://{http_server}{path}")
    assert time.monotonic() - started < 1.5


# --- through a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def url_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fetch")
    server = Server(
        tmp,
        tmp,
        extra=["--random-weights", "--allow-url-host", "127.0.0.1", "--allow-private-urls", "--url-timeout", "2"],
    )
    yield server
    server.stop()


def test_server_fetches_allowed_urls_only(url_server, http_server):
    with DepthClient(url_server.endpoint, timeout=30, retries=0, input_size=TEST_INPUT_SIZE) as client:
        result = client.metric_depth(f"http://{http_server}/img.png")
        assert result.depth.shape == (24, 32)
        port = http_server.split(":")[1]
        with pytest.raises(ServerError) as err:
            client.metric_depth(f"http://localhost:{port}/img.png")
        assert err.value.code == P.BAD_REQUEST and "allow-list" in err.value.message
        assert client.metric_depth(f"http://{http_server}/img.png").depth.shape == (24, 32)  # still serving


def test_urls_are_refused_when_no_host_is_allowed(tmp_path, http_server):
    server = Server(tmp_path, tmp_path, extra=["--random-weights"])
    try:
        with DepthClient(server.endpoint, timeout=30, retries=0, input_size=TEST_INPUT_SIZE) as client:
            with pytest.raises(ServerError) as err:
                client.metric_depth(f"http://{http_server}/img.png")
        assert err.value.code == P.BAD_REQUEST and "disabled" in err.value.message
    finally:
        server.stop()
