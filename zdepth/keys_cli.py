"""`zdepth keygen` and `zdepth keys`: making CURVE certificates and API keys.

- `zdepth keygen NAME [--dir DIR]` writes a CURVE certificate pair with
  `zmq.auth.create_certificates`: DIR/NAME.key (public: give it to the other side) and
  DIR/NAME.key_secret (secret, mode 0600), and prints the public key. A server's pair goes
  to `--curve-secret-file`; a client's NAME.key goes into the server's `--curve-clients` DIR;
  a remote worker's NAME.key into the broker's `--worker-keys` DIR, and the worker connects
  with `zdepth worker --curve-secret-file NAME.key_secret --curve-server-key SERVER.key`.
- `zdepth keys add NAME --file FILE` makes a new API key, appends only its SHA-256 hash
  (`NAME sha256:HEX`, see `zdepth.auth`) to FILE (created mode 0600), and prints the key once
  on stdout, so `KEY=$(zdepth keys add robot --file keys.txt)` works. A running server picks
  the line up within about a second (or at once on SIGHUP).
- `zdepth keys list [--file FILE]` prints the key names, never keys or hashes.

Revoking a key is deleting its line; the server reloads the file the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .auth import hashed_line, new_key, parse_key_file
from .errors import KeysError

# Names end up in file names (keygen) and in whitespace-separated key files (keys add).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


DEFAULT_KEY_FILE = "keys.txt"  # what `keys add` and `keys list` use without --file, as in the README


def register(commands: argparse._SubParsersAction) -> None:
    """Add `keygen` and `keys` to the `zdepth` parser."""
    keygen = commands.add_parser(
        "keygen", help="write a CURVE certificate pair (NAME.key, NAME.key_secret) for a server, a client or a worker"
    )
    keygen.add_argument("name", metavar="NAME", help="certificate name: letters, digits, '_', '.', '-'")
    keygen.add_argument(
        "--dir", default=".", help="folder for the two files (created mode 0700 if missing; default: the current one)"
    )
    keygen.set_defaults(func=cmd_keygen)

    keys = commands.add_parser("keys", help="manage API keys in a hashed key file")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="make a key, store its hash, print the key once")
    add.add_argument("name", metavar="NAME", help="who holds the key; shown in logs and stats instead of the key")
    add.add_argument(
        "--file",
        default=DEFAULT_KEY_FILE,
        help="the server's --api-key-file (created mode 0600 if missing; default: %(default)s)",
    )
    add.set_defaults(func=cmd_keys_add)
    listing = actions.add_parser("list", help="the key names in a key file")
    listing.add_argument("--file", default=DEFAULT_KEY_FILE, help="default: %(default)s")
    listing.set_defaults(func=cmd_keys_list)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeysError(
            f"invalid name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def _read_key_file(path: Path) -> tuple[str, dict[bytes, str]]:
    """(text, {digest: name}) of a key file, refusing one the server could not load either."""
    try:
        text = path.read_text(encoding="utf-8")
        return text, parse_key_file(text, str(path))
    except FileNotFoundError:
        raise KeysError(f"no key file {path}") from None
    except (OSError, ValueError) as exc:
        raise KeysError(str(exc)) from None


def cmd_keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    name = _check_name(args.name)
    folder = Path(args.dir)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing:
        raise KeysError(
            f"{', '.join(existing)} already exist(s); a new pair would lock out everyone using the old one. Pick another NAME or remove them first"
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # create_certificates opens files with the default mode: with umask 077 the secret is
    # never readable by others, not even between being written and chmod.
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    public_key, _ = zmq.auth.load_certificate(public)
    print(public_key.decode("ascii"))
    print(f"zdepth: wrote {public} (public: share it) and {secret} (secret, mode 0600: keep it here)", file=sys.stderr)
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    name = _check_name(args.name)
    path = Path(args.file)
    text, entries = _read_key_file(path) if path.exists() else ("", {})
    if name in entries.values():
        raise KeysError(f"{path} already has a key named {name!r}; pick another name (or delete its line to revoke it)")
    separator = "\n" if text and not text.endswith("\n") else ""  # a last line without its newline
    key = new_key()
    # The mode applies only when the file is created; an existing file keeps its own.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
        f.write(f"{separator}{hashed_line(name, key)}\n")
    print(key)
    print(
        f"zdepth: added key {name!r} to {path} (only its hash is stored; this is the one time the key is shown)",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    for name in _read_key_file(Path(args.file))[1].values():
        print(name)
    return 0
