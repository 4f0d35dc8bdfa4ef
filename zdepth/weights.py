"""`zdepth weights get`: download an official checkpoint, resumably, verified, atomically.

Checkpoints are 100 MB to 1.3 GB, so an interrupted download resumes from `<file>.part` with an
HTTP Range request (a server that ignores Range and answers 200 restarts it from zero), and the
file only gets its real name, by `os.replace`, once its size and sha256 (where known) match: a
file under the real name is always complete. Plain urllib, no extra dependency.

The URL is `download_url(encoder, dataset)` (Hugging Face), or `<$ZDEPTH_WEIGHTS_URL>/<file>`
for a mirror, or an explicit `url`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

from .checkpoint_files import CHECKPOINTS, download_url, find_checkpoint, get_command
from .config import DEFAULT_CHECKPOINT_DIR
from .errors import CheckpointNotFound, DownloadError

ENV_URL = "ZDEPTH_WEIGHTS_URL"
CHUNK = 1 << 20
PROGRESS_INTERVAL_S = 0.2


def weights_url(encoder: str, dataset: str) -> Optional[str]:
    """Where the file comes from: `$ZDEPTH_WEIGHTS_URL/<file>` when set, else the official URL
    (None for vitg, which was never released)."""
    base = os.environ.get(ENV_URL)
    if base:
        return f"{base.rstrip('/')}/{CHECKPOINTS[(encoder, dataset)]['filename']}"
    return download_url(encoder, dataset)


def download(
    encoder: str,
    dataset: str,
    checkpoint_dir: str | os.PathLike = DEFAULT_CHECKPOINT_DIR,
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Fetch the (encoder, dataset) checkpoint into `checkpoint_dir` and return its path.

    An explicit `sha256` describes the file at `url` and replaces the table's size and hash;
    without it the table's (official) size and sha256 are checked where known. A file already
    present is verified, not downloaded again.
    """
    if (encoder, dataset) not in CHECKPOINTS:
        raise DownloadError(f"no released checkpoint for encoder {encoder!r} with dataset {dataset!r}")
    info = CHECKPOINTS[(encoder, dataset)]
    expected_sha = (sha256 or info.get("sha256") or "").lower() or None
    expected_size = None if sha256 else info.get("size_bytes")
    target = Path(checkpoint_dir) / info["filename"]
    if target.exists():
        problem = _mismatch(
            target.stat().st_size, _sha256_file(target) if expected_sha else None, expected_size, expected_sha
        )
        if problem:
            raise DownloadError(f"{target} exists but {problem}; delete it and run again to download it afresh")
        return target
    url = url or weights_url(encoder, dataset)
    if url is None:
        raise DownloadError(
            f"{info['filename']} was never released officially, so there is no URL; pass --url or set {ENV_URL}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    size, digest = _fetch(url, part, expected_size, progress, timeout)
    problem = _mismatch(size, digest, expected_size, expected_sha)
    if problem:
        part.unlink()
        raise DownloadError(f"downloaded {target.name} but {problem}; the partial file was deleted")
    os.replace(part, target)
    return target


def fetch_missing(
    models: Iterable[tuple[str, str]], checkpoint_dir: str | os.PathLike, timeout: float = 30
) -> list[Path]:
    """Download each (encoder, dataset) checkpoint that is not in `checkpoint_dir` yet (official
    file or Hugging Face folder), with `download`'s progress bar and checks; returns the paths
    fetched. When one cannot be fetched (offline, no URL) the DownloadError says what to do:
    where to put the file, the `zdepth weights get` command, and the smoke run without weights."""
    fetched = []
    for encoder, dataset in dict.fromkeys(models):
        try:
            find_checkpoint(checkpoint_dir, encoder, dataset)
            continue
        except CheckpointNotFound:
            pass
        try:
            fetched.append(download(encoder, dataset, checkpoint_dir, timeout=timeout))
        except DownloadError as exc:
            info = CHECKPOINTS.get((encoder, dataset))
            where = Path(checkpoint_dir) / (info["filename"] if info else f"<{encoder} {dataset} checkpoint>")
            source = f" (from {info['url']})" if info and info["url"] else ""
            raise DownloadError(
                f"cannot fetch the {encoder}/{dataset} checkpoint: {exc}\n"
                f"  - put the file at {where}{source}, or\n"
                f"  - run `{get_command(encoder, dataset)} --checkpoint-dir {checkpoint_dir}` where the network is reachable, or\n"
                f"  - smoke-test without weights (the depth is meaningless): make serve ARGS=--random-weights "
                f"(or zdepth serve --random-weights)"
            ) from None
    return fetched


def _mismatch(
    size: int, digest: Optional[str], expected_size: Optional[int], expected_sha: Optional[str]
) -> Optional[str]:
    if expected_size is not None and size != expected_size:
        return f"its size is {size} bytes, expected {expected_size}"
    if expected_sha is not None and digest != expected_sha:
        return f"its sha256 is {digest}, expected {expected_sha}"
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, part: Path, expected_size: Optional[int], progress: bool, timeout: float) -> tuple[int, str]:
    """Download `url` into `part`, resuming what is there. Returns (size, sha256 hex) of `part`."""
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()  # longer than the real file: not a prefix of it
        have = 0
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        if have == expected_size:
            return have, digest.hexdigest()  # complete already; the caller verifies it
    headers = (
        {"User-Agent": "zdepth-weights/1", "Range": f"bytes={have}-"} if have else {"User-Agent": "zdepth-weights/1"}
    )
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left past our offset: start again from zero
            part.unlink()
            return _fetch(url, part, expected_size, progress, timeout)
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:  # offline, DNS, firewall: say what to do instead
        raise DownloadError(
            f"cannot reach {url}: {getattr(exc, 'reason', exc)}. Offline or behind a firewall? Download that file where the "
            f"network is reachable and copy it into the checkpoint folder (--checkpoint-dir, default checkpoints/), "
            f"or pass --url with a mirror you can reach (or set {ENV_URL})"
        ) from None
    with response:
        if have and response.status != 206:  # the server ignored Range and sends the whole file
            have, digest = 0, hashlib.sha256()
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else expected_size
        bar = _Progress(part.name[: -len(".part")], have, total) if progress else None
        received = have
        try:
            with open(part, "ab" if have else "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if bar:
                        bar.update(received)
        except OSError as exc:
            raise DownloadError(
                f"{url}: download interrupted after {received} bytes ({exc}); run again to resume"
            ) from None
        finally:
            if bar:
                bar.close(received)
    if total is not None and received < total:
        raise DownloadError(f"{url}: connection closed after {received} of {total} bytes; run again to resume")
    return received, digest.hexdigest()


class _Progress:
    """A one-line progress bar on stderr: bytes, percent and speed, redrawn a few times a second."""

    def __init__(self, name: str, start: int, total: Optional[int]):
        self.name, self.start, self.total = name, start, total
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        speed = (done - self.start) / max(now - self.t0, 1e-6) / 1e6
        size = (
            f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB {100 * done / self.total:3.0f}%"
            if self.total
            else f"{done / 1e6:.1f} MB"
        )
        sys.stderr.write(f"\r{self.name}: {size} {speed:.1f} MB/s")
        sys.stderr.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        sys.stderr.write("\n")
