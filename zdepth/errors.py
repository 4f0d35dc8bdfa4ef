"""Errors that are the user's to fix: a bad option, a missing or wrong checkpoint, a failed download.

Torch-free, so the CLI can catch them by type without importing the modules that raise them:
`zdepth` prints the message (which says what to do) on stderr and exits 2, without a traceback.
Protocol errors sent over the wire are `protocol.ZDepthError`, a separate type with a code.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message is the whole story."""


class CommandError(UserError):
    """A command-line mistake found after parsing (a missing file, options that do not go together)."""


class ConfigError(UserError, ValueError):
    """The engine was configured with something this machine cannot do (no CUDA, fp16 on the CPU...)."""


class CheckpointError(UserError):
    """A checkpoint exists but cannot be used (unreadable, unsafe, wrong model, wrong keys)."""


class CheckpointNotFound(CheckpointError):
    """Neither the official file nor a Hugging Face folder is where it was looked for."""


class DownloadError(UserError):
    """A checkpoint could not be fetched or did not verify; the message says what to do."""


class KeysError(UserError):
    """A key or certificate command cannot do what it was asked (bad name, missing file, would overwrite)."""
