"""Stream slots: the newest frame of each camera, and who goes next.

A camera that outruns the model must not build a queue of stale frames. Each stream has one
slot holding only its newest frame; a new frame replaces the waiting one, which is counted
as dropped. When a worker frees up it gets the slot that has waited longest (the time the
slot first filled, kept across replacements, so a fast camera cannot jump ahead of a slow
one and none starves).

The stream table is bounded (`max_streams`) and shared fairly among sources (a key name with
auth, else the sender's address). When it is full, a new name takes the place of the least
recently fed name of the source holding the most names (its waiting frame, if any, is
dropped), if that source holds at least two more names than the newcomer's: a source's quota
is its fair share of the table. So one source refreshing 63 names cannot keep a camera from
elsewhere out: that camera gets a slot at its first frame. Otherwise the new name takes the
place of the least recently fed stream silent for `idle_s` (5 s in the broker) with no frame
waiting, and is refused only while every stream was fed within `idle_s` (docs/limits.md).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
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
    last_seen: float = 0.0  # monotonic
    source: str = ""  # who feeds it: "key NAME" or "address A"

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

    def __init__(self, max_streams: int = 64, idle_s: float = 60.0):
        self.max_streams = max_streams
        self.idle_s = idle_s
        self.stats: dict[str, StreamStats] = {}
        self.totals: collections.Counter = collections.Counter()  # over all streams ever, for metrics
        self._pending: dict[str, Pending] = {}

    def admit(self, name: str, now: float, source: str = "") -> tuple[Optional[StreamStats], Optional[Any]]:
        """(stats, evicted frame) for a stream fed by `source`, making room if the table is full
        (see the module docstring). The stats are None when there is no room; the evicted frame,
        if any, was waiting in the slot of the stream that gave its place: the caller releases it."""
        stats = self.stats.get(name)
        evicted = None
        if stats is None:
            if len(self.stats) >= self.max_streams:
                victim = self._fair_share_victim(source) or self._idle_victim(now)
                if victim is None:
                    return None, None
                del self.stats[victim]
                pending = self._pending.pop(victim, None)
                if pending is not None:
                    evicted = pending.job
                    self.totals["dropped"] += 1
            stats = self.stats[name] = StreamStats(source=source)
        stats.last_seen = now
        return stats, evicted

    def _fair_share_victim(self, source: str) -> Optional[str]:
        """The least recently fed name of the source holding the most names, if that source holds
        at least two more than `source` (so giving one up makes the table fairer)."""
        names: dict[str, list] = collections.defaultdict(list)
        for name, st in self.stats.items():
            names[st.source].append(name)
        largest = max(names, key=lambda s: len(names[s]))
        if len(names[largest]) < len(names.get(source, ())) + 2:
            return None
        return min(names[largest], key=lambda n: self.stats[n].last_seen)

    def _idle_victim(self, now: float) -> Optional[str]:
        idle = [n for n, st in self.stats.items() if n not in self._pending and now - st.last_seen >= self.idle_s]
        return min(idle, key=lambda n: self.stats[n].last_seen) if idle else None

    def put(self, name: str, job: Any, now: float) -> Optional[Any]:
        """Store the newest frame; returns the frame it replaced (now dropped), if any."""
        stats = self.stats[name]
        stats.frames_in += 1
        self.totals["in"] += 1
        old = self._pending.get(name)
        if old is None:
            self._pending[name] = Pending(job, now)
            return None
        old_job, old.job = old.job, job
        stats.dropped += 1
        self.totals["dropped"] += 1
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
        self.totals["processed" if ok else "errors"] += 1
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
        self.totals["rejected"] += 1
        stats = self.stats.get(name) if name else None
        if stats is not None:
            stats.rejected += 1

    def as_dict(self) -> dict:
        return {name: stats.as_dict() for name, stats in self.stats.items()}
