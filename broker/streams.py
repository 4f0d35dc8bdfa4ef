"""Stream slots: the newest frame of each camera, and who goes next.

A camera that outruns the model must not build a queue of stale frames. Each stream has one
slot holding only its newest frame; a new frame replaces the waiting one, which is counted
as dropped. When a worker frees up it gets the slot that has waited longest (the time the
slot first filled, kept across replacements, so a fast camera cannot jump ahead of a slow
one and none starves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class StreamStats:
    frames_in: int = 0
    processed: int = 0
    dropped: int = 0
    errors: int = 0  # admitted frames whose processing failed (published as errors)
    rejected: int = 0  # frames refused before admission: bad key, bad header or image fields
    dropped_since_publish: int = 0
    last_latency_ms: Optional[float] = None
    last_seq: Optional[int] = None
    last_seen: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {
            "frames_in": self.frames_in,
            "processed": self.processed,
            "dropped": self.dropped,
            "errors": self.errors,
            "rejected": self.rejected,
            "last_latency_ms": self.last_latency_ms,
            "last_seq": self.last_seq,
        }


@dataclass
class Pending:
    job: Any
    waiting_since: float


class StreamSlots:
    """Per-stream newest-frame slots with fair (longest-waiting-first) selection."""

    def __init__(self, max_streams: int = 64):
        self.max_streams = max_streams
        self.stats: dict[str, StreamStats] = {}
        self._pending: dict[str, Pending] = {}

    def known(self, name: str) -> bool:
        return name in self.stats

    def admit(self, name: str) -> Optional[StreamStats]:
        """Stats for a stream, creating it if there is room; None when the stream table is full."""
        stats = self.stats.get(name)
        if stats is None:
            if len(self.stats) >= self.max_streams:
                return None
            stats = self.stats[name] = StreamStats()
        stats.last_seen = time.time()
        return stats

    def put(self, name: str, job: Any, now: float) -> Optional[Any]:
        """Store the newest frame; returns the frame it replaced (now dropped), if any."""
        stats = self.stats[name]
        stats.frames_in += 1
        old = self._pending.get(name)
        if old is None:
            self._pending[name] = Pending(job, now)
            return None
        old_job, old.job = old.job, job
        stats.dropped += 1
        stats.dropped_since_publish += 1
        return old_job

    def has_work(self) -> bool:
        return bool(self._pending)

    def take(self) -> Optional[Any]:
        """The newest frame of the stream that has waited longest."""
        if not self._pending:
            return None
        name = min(self._pending, key=lambda n: self._pending[n].waiting_since)
        return self._pending.pop(name).job

    def pending_count(self) -> int:
        return len(self._pending)

    def record_result(self, name: str, latency_ms: Optional[float], seq: Any, ok: bool) -> int:
        """Count a finished frame; returns the number dropped since the previous result."""
        stats = self.stats.get(name)
        if stats is None:
            return 0
        if ok:
            stats.processed += 1
        else:
            stats.errors += 1
        stats.last_latency_ms = latency_ms
        stats.last_seq = seq
        dropped, stats.dropped_since_publish = stats.dropped_since_publish, 0
        return dropped

    def count_rejected(self, name: Optional[str]) -> None:
        stats = self.stats.get(name) if name else None
        if stats is not None:
            stats.rejected += 1

    def as_dict(self) -> dict:
        return {name: stats.as_dict() for name, stats in self.stats.items()}
