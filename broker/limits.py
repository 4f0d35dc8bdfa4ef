"""Admission limits the broker applies before a request may wait for a worker.

ZeroMQ's high-water marks count messages, not bytes: 1000 queued messages of 32 MB each is
32 GB. So the broker counts the bytes of every request it holds (queued, on a worker, or a
camera frame in its stream slot) per owner and in total, and refuses a request that would go
over (`ByteBudget`). And a client that sends faster than its fair share is refused before it
costs a worker anything (`RateLimiter`, a token bucket per key name or client identity).

Both tables only hold owners that currently have something: a byte count that drops to zero
and a bucket that has refilled completely are deleted, so a flood of one-shot identities
cannot grow them without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Optional

from zdepth import protocol as P

MB = 1024 * 1024


def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


class ByteBudget:
    """Bytes of unanswered requests, per owner (a client identity, a key name) and in total."""

    def __init__(self, total_limit: int, owner_limit: int):
        self.total_limit = total_limit
        self.owner_limit = owner_limit
        self.total = 0
        self.by_owner: dict[Hashable, int] = {}

    def reserve(self, owners: Iterable[Hashable], size: int) -> None:
        """Count `size` bytes against every owner and the total, or raise without counting:
        `too_large` when the request alone exceeds an owner's cap, else `overloaded`."""
        owners = tuple(owners)
        if owners and size > self.owner_limit:
            raise P.ZDepthError(
                P.TOO_LARGE,
                f"request is {_mb(size)}; one client may have at most {_mb(self.owner_limit)} in flight (--max-client-inflight-mb)",
            )
        for owner in owners:
            held = self.by_owner.get(owner, 0)
            if held + size > self.owner_limit:
                raise P.ZDepthError(
                    P.OVERLOADED,
                    f"{_owner_text(owner)} already has {_mb(held)} of requests in flight; the limit is {_mb(self.owner_limit)} "
                    "(--max-client-inflight-mb); wait for replies, then retry",
                )
        if self.total + size > self.total_limit:
            raise P.ZDepthError(
                P.OVERLOADED,
                f"the server holds {_mb(self.total)} of requests; the limit is {_mb(self.total_limit)} (--max-inflight-mb); retry later",
            )
        self.total += size
        for owner in owners:
            self.by_owner[owner] = self.by_owner.get(owner, 0) + size

    def release(self, owners: Iterable[Hashable], size: int) -> None:
        self.total -= size
        for owner in owners:
            left = self.by_owner.get(owner, 0) - size
            if left > 0:
                self.by_owner[owner] = left
            else:
                self.by_owner.pop(owner, None)


def _owner_text(owner: Hashable) -> str:
    """('key', 'robot') -> "key 'robot'"; client identities are opaque bytes, shown in hex."""
    kind, value = owner if isinstance(owner, tuple) and len(owner) == 2 else ("owner", owner)
    return f"{kind} {value.hex() if isinstance(value, bytes) else repr(value)}"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per name: `rate` requests per second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: Optional[int] = None):
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else max(1.0, rate)))
        self._buckets: dict[Hashable, _Bucket] = {}

    def take(self, name: Hashable, now: float) -> None:
        """Spend one token of `name`'s bucket or raise `rate_limited` saying the limit."""
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self.rate
            raise P.ZDepthError(
                P.RATE_LIMITED,
                f"{_owner_text(name)} is limited to {self.rate:g} requests/s with bursts of {self.burst} "
                f"(--rate-limit, --rate-burst); retry in {wait:.2f} s",
            )
        bucket.tokens -= 1.0

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled: they are the same as no bucket at all."""
        full_after = self.burst / self.rate
        for name in [n for n, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[name]

    def __len__(self) -> int:
        return len(self._buckets)


class ReplyBudget:
    """Reply bytes toward each client identity that ZeroMQ still holds: queued for a client that
    does not read, or being written. ZeroMQ's send high-water mark counts messages (1000 point
    clouds of 300 MB each); this counts bytes, so the broker can stop sending to a client that
    has fallen behind. A reply's bytes are pending until libzmq frees its last frame, which
    pyzmq reports through a `MessageTracker` (`track=True` on a zero-copy frame)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._pending: dict[bytes, list] = {}  # client identity -> [(tracker, bytes)], oldest first

    def pending(self, client: bytes) -> int:
        """Bytes of replies to `client` not yet handed to the kernel; forgets the finished ones."""
        entries = self._pending.get(client)
        if not entries:
            return 0
        entries[:] = [(tracker, size) for tracker, size in entries if not tracker.done]
        if not entries:
            del self._pending[client]
            return 0
        return sum(size for _, size in entries)

    def check(self, client: bytes) -> None:
        """Raise `overloaded` while `client` has more unread reply bytes than the limit."""
        held = self.pending(client)
        if held > self.limit:
            raise P.ZDepthError(
                P.OVERLOADED,
                f"this client has {_mb(held)} of replies it has not read; the limit is {_mb(self.limit)} (--max-client-reply-mb); read them, then retry",
            )

    def fits(self, client: bytes, size: int) -> bool:
        """Whether a reply of `size` bytes may be sent now: always when nothing is pending (so a
        reply larger than the limit still reaches a client that reads), else within the limit."""
        held = self.pending(client)
        return held == 0 or held + size <= self.limit

    def add(self, client: bytes, tracker, size: int) -> None:
        self._pending.setdefault(client, []).append((tracker, size))

    def prune(self) -> None:
        """Forget clients whose replies have all gone out (and disconnected ones: libzmq frees
        what was queued for them)."""
        for client in list(self._pending):
            self.pending(client)

    @property
    def total(self) -> int:
        return sum(size for entries in self._pending.values() for tracker, size in entries if not tracker.done)

    def __len__(self) -> int:
        return len(self._pending)


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, where allowed; returns
    the soft limit now in force. Each connection costs the broker a file descriptor: at the
    common default of 1024, about a thousand idle connections lock every client out (libzmq
    cannot accept more), where the hard limit (often 524,288) leaves room."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):  # e.g. macOS refuses RLIM_INFINITY: keep what we have
            pass
    return soft
