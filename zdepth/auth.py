"""API key tokens: where keys come from, how they are checked, and how they stay secret.

Keys are held only as SHA-256 digests, compared with `hmac.compare_digest` against every
known digest (so timing says nothing about which key matched), and never logged: logs and
`health` name the key's owner instead. A key file may hold hashes only, so a leaked file
does not leak keys.

Key file format, one key per line (``#`` starts a comment)::

    robot-arm  sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    notebook   sk-a-plain-key-also-works-but-prefer-hashes

`zdepth keys add NAME --file FILE` writes a new hashed line and prints the key once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Iterable, Optional

ENV_KEYS = "ZDEPTH_API_KEYS"  # comma-separated keys, named env-1, env-2, ...
HASH_PREFIX = "sha256:"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def new_key() -> str:
    return "zd-" + secrets.token_urlsafe(24)


def hashed_line(name: str, key: str) -> str:
    return f"{name} {HASH_PREFIX}{digest(key).hex()}"


def parse_key_file(text: str, source: str = "key file") -> dict[bytes, str]:
    """Key file text -> {digest: name}. Raises ValueError naming the bad line (never the key)."""
    entries: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1:
            name, secret = f"{Path(source).name}:{number}", parts[0]
        elif len(parts) == 2:
            name, secret = parts
        else:
            raise ValueError(f"{source} line {number}: expected 'NAME KEY' or 'NAME sha256:HEX'")
        if secret.startswith(HASH_PREFIX):
            try:
                value = bytes.fromhex(secret[len(HASH_PREFIX) :])
            except ValueError:
                raise ValueError(f"{source} line {number}: the sha256 value is not hex") from None
            if len(value) != 32:
                raise ValueError(f"{source} line {number}: a sha256 digest has 64 hex digits")
        else:
            value = digest(secret)
        entries[value] = name
    return entries


class KeyStore:
    """The keys a server accepts, from the command line, a file and the environment.

    The file is re-read when `reload()` is called (on SIGHUP) or when its modification time
    changes (checked at most once a second by `maybe_reload`), so keys can be added and
    revoked without a restart. A file that fails to parse keeps the previous keys.
    """

    def __init__(self, keys: Iterable[str] = (), key_file: Optional[str] = None, use_env: bool = True):
        self._static: dict[bytes, str] = {}
        for i, key in enumerate(keys, 1):
            self._static[digest(key)] = f"cli-{i}"
        if use_env:
            env_keys = [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
            for i, key in enumerate(env_keys, 1):
                self._static[digest(key)] = f"env-{i}"
        self.key_file = Path(key_file) if key_file else None
        self._from_file: dict[bytes, str] = {}
        self._mtime: Optional[float] = None
        self._checked = 0.0
        self.reload_error: Optional[str] = None
        if self.key_file:
            self._from_file = parse_key_file(self.key_file.read_text(), str(self.key_file))
            self._mtime = self.key_file.stat().st_mtime

    def __len__(self) -> int:
        return len(self._static) + len(self._from_file)

    def check(self, key: Optional[str]) -> Optional[str]:
        """The key's name if it is valid, else None. Constant time over the set of keys."""
        if not isinstance(key, str) or not key:
            return None
        candidate = digest(key)
        found = None
        for known, name in list(self._static.items()) + list(self._from_file.items()):
            if hmac.compare_digest(candidate, known):
                found = name
        return found

    def reload(self) -> bool:
        """Re-read the key file. Returns True when the keys changed."""
        if not self.key_file:
            return False
        try:
            entries = parse_key_file(self.key_file.read_text(), str(self.key_file))
            self._mtime = self.key_file.stat().st_mtime
        except (OSError, ValueError) as exc:
            self.reload_error = str(exc)
            return False
        self.reload_error = None
        changed = entries != self._from_file
        self._from_file = entries
        return changed

    def maybe_reload(self, now: float) -> bool:
        if not self.key_file or now - self._checked < 1.0:
            return False
        self._checked = now
        try:
            mtime = self.key_file.stat().st_mtime
        except OSError:
            return False
        return mtime != self._mtime and self.reload()
