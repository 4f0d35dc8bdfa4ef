"""Log lines a machine can read: `key=value` text or one JSON object per line.

Code logs a short event name as the message and puts the details in
``extra={"fields": {...}}``; both formatters write the fields as separate keys, so a log
shipper can filter on `outcome=timeout` or `key=robot-arm` without parsing prose. Values
that come from the network are quoted (text) or escaped (JSON), so a client cannot forge a
log line. Keys never appear in logs: only key names do.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FORMATS = ("text", "json")
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/-+")


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if text and set(text) <= _BARE else json.dumps(text)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"


class TextFormatter(logging.Formatter):
    """`2026-01-01T12:00:00.123 WARNING zdepth.broker request id=7 method=pointcloud outcome=timeout`"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        parts += [f"{name}={_text_value(value)}" for name, value in getattr(record, "fields", {}).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", format: str = "text") -> None:
    """Send the process's logs to stderr in `format` (text or json) at `level`."""
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
