"""Named server profiles from a `servers.yaml`, so code says `"lab"` instead of an address and a key.

    lab:
      endpoint: tcp://gpu-server.lab:5555
      api_key_env: ZDEPTH_LAB_KEY      # or api_key: sk-... (keep keys out of files you share)
      model: {encoder: vitl, dataset: hypersim, input_size: 518}
      timeout: 30
      description: the lab GPU box
      server_key_file: certs/lab-server.key        # CURVE: the server's public certificate
      client_key_file: certs/robot.key_secret      # optional: this client's certificate

`server_key` (the server's public key inline, 40 Z85 characters) or `server_key_file` turns
on CURVE encryption; `client_key_file` is needed when the server only admits listed clients
(`--curve-clients`), otherwise each client makes a throwaway key pair. Relative certificate
paths are relative to the servers.yaml they are written in. `curve_options()` gives these
keys to the stream classes too:
`CameraPublisher(ingress, stream="front", **profile.curve_options())`.

The first file found is used (files are not merged): the `path` argument, then
``$ZDEPTH_SERVERS``, ``./servers.yaml``, ``~/.config/zdepth/servers.yaml``, and last the sample
shipped with this package. This is the old HTTP API's `servers.yaml` with ZeroMQ endpoints
instead of URLs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .client import DepthClient

ENV_VAR = "ZDEPTH_SERVERS"
SAMPLE = Path(__file__).with_name("servers.yaml")
_MODEL_KEYS = ("encoder", "dataset", "input_size")
_PROFILE_KEYS = {
    "endpoint",
    "api_key",
    "api_key_env",
    "model",
    "timeout",
    "description",
    "server_key",
    "server_key_file",
    "client_key_file",
}

# Parsed files by (path, mtime, size): the api functions resolve a profile on every call,
# and re-parsing YAML each time would cost more than the request's own wire time.
_parsed: dict[tuple, dict] = {}


@dataclass(frozen=True)
class Profile:
    name: str
    endpoint: str
    api_key: Optional[str] = field(default=None, repr=False)
    api_key_env: Optional[str] = None
    model: dict = field(default_factory=dict)  # encoder, dataset, input_size
    timeout: Optional[float] = None
    description: str = ""
    server_key: Optional[str] = None  # the server's public key, Z85
    server_key_file: Optional[Path] = None  # or its public certificate file
    client_key_file: Optional[Path] = None  # this client's NAME.key_secret

    def key(self) -> Optional[str]:
        """The API key: `api_key`, or `$api_key_env` read now (so a rotated key is picked up)."""
        if self.api_key_env is None:
            return self.api_key
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"profile {self.name!r} reads its API key from ${self.api_key_env}, which is not set")
        return value

    def curve_options(self) -> dict:
        """`server_key` / `client_keys` keyword arguments for any client class; empty without CURVE."""
        server_key = self.server_key or self.server_key_file
        if server_key is None:
            return {}
        return {"server_key": server_key, "client_keys": self.client_key_file}

    def client_options(self) -> dict:
        """Keyword arguments for `DepthClient`."""
        options = {"endpoint": self.endpoint, "key": self.key(), **self.model, **self.curve_options()}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        return options


def profiles_path(path: Union[str, os.PathLike, None] = None) -> Path:
    """The servers.yaml in use: `path`, $ZDEPTH_SERVERS, ./servers.yaml, ~/.config/zdepth/servers.yaml, the sample."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    for candidate in (Path("servers.yaml"), Path.home() / ".config" / "zdepth" / "servers.yaml"):
        if candidate.is_file():
            return candidate
    return SAMPLE


def load_profiles(path: Union[str, os.PathLike, None] = None) -> dict[str, Profile]:
    """All profiles of the servers.yaml in use (see `profiles_path`), by name."""
    resolved = profiles_path(path)
    stat = resolved.stat()  # a missing explicit or $ZDEPTH_SERVERS file is an error, not a fallback
    cache_key = (str(resolved.resolve()), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _parsed:
        _parsed[cache_key] = _parse(resolved)
    return dict(_parsed[cache_key])


def get_profile(name: str, path: Union[str, os.PathLike, None] = None) -> Profile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise KeyError(f"no server profile {name!r} in {profiles_path(path)}; profiles: {sorted(profiles)}")
    return profiles[name]


def client_from_profile(name: str, path: Union[str, os.PathLike, None] = None, **overrides: Any) -> DepthClient:
    """A `DepthClient` for a named profile; `overrides` (e.g. timeout=5) win over the file."""
    return DepthClient(**{**get_profile(name, path).client_options(), **overrides})


def _parse(path: Path) -> dict[str, Profile]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of profile names to settings")
    return {str(name): _profile(path, str(name), entry) for name, entry in data.items()}


def _profile(path: Path, name: str, entry: Any) -> Profile:
    where = f"{path}: profile {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with at least `endpoint`")
    if "base_url" in entry and "endpoint" not in entry:
        raise ValueError(f"{where}: `base_url` is the old HTTP API; use `endpoint: tcp://host:5555`")
    unknown = sorted(set(entry) - _PROFILE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(_PROFILE_KEYS)}")
    endpoint = entry.get("endpoint")
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ValueError(f"{where}: `endpoint` must be a ZeroMQ endpoint like tcp://host:5555, got {endpoint!r}")
    if entry.get("api_key") is not None and entry.get("api_key_env") is not None:
        raise ValueError(f"{where}: give `api_key` or `api_key_env`, not both")
    model = entry.get("model") or {}
    if not isinstance(model, dict) or set(model) - set(_MODEL_KEYS):
        raise ValueError(f"{where}: `model` must be a mapping with keys from {list(_MODEL_KEYS)}, got {model!r}")
    for option in ("server_key", "server_key_file", "client_key_file"):
        if entry.get(option) is not None and not isinstance(entry[option], str):
            raise ValueError(f"{where}: `{option}` must be a string, got {entry[option]!r}")
    if entry.get("server_key") is not None and entry.get("server_key_file") is not None:
        raise ValueError(f"{where}: give `server_key` or `server_key_file`, not both")
    if (
        entry.get("client_key_file") is not None
        and entry.get("server_key") is None
        and entry.get("server_key_file") is None
    ):
        raise ValueError(
            f"{where}: `client_key_file` needs `server_key` or `server_key_file` (CURVE needs the server's public key)"
        )
    timeout = entry.get("timeout")
    return Profile(
        name=name,
        endpoint=endpoint,
        api_key=entry.get("api_key"),
        api_key_env=entry.get("api_key_env"),
        model={k: v for k, v in model.items() if v is not None},
        timeout=float(timeout) if timeout is not None else None,
        description=str(entry.get("description") or ""),
        server_key=entry.get("server_key"),
        server_key_file=_beside(path, entry.get("server_key_file")),
        client_key_file=_beside(path, entry.get("client_key_file")),
    )


def _beside(path: Path, value: Optional[str]) -> Optional[Path]:
    """A certificate path from `path`'s file: `~` expanded, relative paths taken from its folder."""
    if value is None:
        return None
    return path.parent / Path(value).expanduser()
