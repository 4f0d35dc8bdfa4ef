"""zdepth.weights against a real local HTTP server (a thread on 127.0.0.1) that speaks Range."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from zdepth.checkpoint_files import official_filename
from zdepth.weights import ENV_URL, DownloadError, download

# vits/hypersim: the table knows no size or sha256, so each test states the hash it expects.
ENCODER, DATASET = "vits", "hypersim"
NAME = official_filename(ENCODER, DATASET)
CONTENT = np.random.default_rng(0).integers(0, 256, 2_500_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(CONTENT).hexdigest()
HALF = len(CONTENT) // 2


class RangeHandler(BaseHTTPRequestHandler):
    """Serves files from `server.root`, honouring `Range: bytes=N-` unless `server.ignore_range`.
    `server.cut_after` drops the connection after that many body bytes; `server.pause_after`
    stops there until `server.resume` is set (with `server.halfway` set while it waits)."""

    def do_GET(self):
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        path = server.root / self.path.split("?")[0].lstrip("/")
        if not path.is_file():
            self.send_error(404, "no such file")
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range") and not server.ignore_range:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # `sent` is counted before each write: once the client has read the bytes, the test may
        # look at the count, and this thread may not have run again yet.
        if server.pause_after is not None:
            server.sent += len(body)
            self.wfile.write(body[: server.pause_after])
            self.wfile.flush()
            server.halfway.set()
            server.resume.wait(10)
            self.wfile.write(body[server.pause_after :])
        elif server.cut_after is not None:
            server.sent += server.cut_after
            self.wfile.write(body[: server.cut_after])
        else:
            server.sent += len(body)
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    (root / "mirror").mkdir(parents=True)
    (root / "mirror" / NAME).write_bytes(CONTENT)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.ranges, httpd.sent = root, [], 0
    httpd.ignore_range, httpd.cut_after, httpd.pause_after = False, None, None
    httpd.halfway, httpd.resume = threading.Event(), threading.Event()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}/mirror"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.resume.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dest(tmp_path, server, monkeypatch):
    monkeypatch.setenv(ENV_URL, server.base + "/")
    return tmp_path / "checkpoints"


def test_download_through_the_mirror_variable_with_progress(server, dest, capsys):
    path = download(ENCODER, DATASET, dest, sha256=SHA)
    assert path == dest / NAME and path.read_bytes() == CONTENT
    assert not (dest / (NAME + ".part")).exists()
    assert server.ranges == [None]
    progress = capsys.readouterr().err
    assert NAME in progress and "2.5/2.5 MB 100%" in progress and "MB/s" in progress


def test_an_interrupted_download_resumes_with_a_range_request(server, dest):
    dest.mkdir()
    (dest / (NAME + ".part")).write_bytes(CONTENT[:HALF])
    path = download(ENCODER, DATASET, dest, sha256=SHA, progress=False)
    assert path.read_bytes() == CONTENT
    assert server.ranges == [f"bytes={HALF}-"]
    assert server.sent == len(CONTENT) - HALF  # only the missing half crossed the wire


def test_a_server_that_ignores_range_restarts_the_file(server, dest):
    server.ignore_range = True
    dest.mkdir()
    (dest / (NAME + ".part")).write_bytes(CONTENT[:HALF])
    path = download(ENCODER, DATASET, dest, sha256=SHA, progress=False)
    assert path.read_bytes() == CONTENT  # not the first half twice
    assert server.ranges == [f"bytes={HALF}-"] and server.sent == len(CONTENT)


def test_a_complete_part_of_unknown_size_gets_416_and_starts_over(server, dest):
    dest.mkdir()
    (dest / (NAME + ".part")).write_bytes(CONTENT)
    path = download(ENCODER, DATASET, dest, sha256=SHA, progress=False)
    assert path.read_bytes() == CONTENT
    assert server.ranges == [f"bytes={len(CONTENT)}-", None]


def test_a_dropped_connection_leaves_only_the_part_and_the_next_run_resumes(server, dest):
    server.cut_after = HALF
    with pytest.raises(
        DownloadError, match=f"connection closed after {HALF} of {len(CONTENT)} bytes; run again to resume"
    ):
        download(ENCODER, DATASET, dest, sha256=SHA, progress=False)
    assert not (dest / NAME).exists()
    assert (dest / (NAME + ".part")).read_bytes() == CONTENT[:HALF]
    server.cut_after = None
    assert download(ENCODER, DATASET, dest, sha256=SHA, progress=False).read_bytes() == CONTENT
    assert server.ranges == [None, f"bytes={HALF}-"]


def test_the_real_name_appears_only_when_the_file_is_complete(server, dest):
    server.pause_after = HALF
    errors = []
    thread = threading.Thread(target=lambda: _download_into(errors, dest))
    thread.start()
    try:
        assert server.halfway.wait(10)
        assert (dest / (NAME + ".part")).exists()
        assert not (dest / NAME).exists()
    finally:
        server.resume.set()
        thread.join(10)
    assert errors == [] and (dest / NAME).read_bytes() == CONTENT
    assert not (dest / (NAME + ".part")).exists()


def _download_into(errors, dest):
    try:
        download(ENCODER, DATASET, dest, sha256=SHA, progress=False)
    except Exception as exc:  # reported to the test thread
        errors.append(exc)


def test_a_checksum_mismatch_deletes_the_download(server, dest):
    with pytest.raises(DownloadError, match=f"its sha256 is {SHA}, expected 0{{64}}; the partial file was deleted"):
        download(ENCODER, DATASET, dest, sha256="0" * 64, progress=False)
    assert list(dest.iterdir()) == []


def test_the_official_size_and_hash_are_checked_when_known(server, dest):
    # vits/relative: the table holds the official size (99,218,434 bytes) and sha256.
    (server.root / "mirror" / official_filename("vits", "relative")).write_bytes(CONTENT)
    with pytest.raises(DownloadError, match=f"its size is {len(CONTENT)} bytes, expected 99218434"):
        download("vits", "relative", dest, progress=False)
    assert list(dest.iterdir()) == []


def test_a_present_file_is_verified_not_downloaded(server, dest):
    dest.mkdir()
    (dest / NAME).write_bytes(CONTENT)
    assert download(ENCODER, DATASET, dest, sha256=SHA, progress=False) == dest / NAME
    with pytest.raises(DownloadError, match="exists but its sha256 is .* delete it and run again"):
        download(ENCODER, DATASET, dest, sha256="f" * 64, progress=False)
    assert server.ranges == [] and (dest / NAME).read_bytes() == CONTENT  # never touched


def test_explicit_url_http_errors_and_unreleased_models(server, dest):
    url = f"{server.base}/{NAME}"
    other = dest / "other"
    assert download(ENCODER, DATASET, other, url=url, sha256=SHA, progress=False).read_bytes() == CONTENT
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(ENCODER, DATASET, dest, url=f"{server.base}/missing.pth", progress=False)
    with pytest.raises(DownloadError, match="no released checkpoint for encoder 'vitg' with dataset 'hypersim'"):
        download("vitg", "hypersim", dest)
    with pytest.raises(DownloadError, match="Connection refused|refused"):
        download(ENCODER, DATASET, dest, url="http://127.0.0.1:9/x.pth", progress=False)


def test_vitg_has_no_official_url(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_URL, raising=False)
    with pytest.raises(DownloadError, match="never released officially"):
        download("vitg", "relative", tmp_path)
    assert list(Path(tmp_path).iterdir()) == []
