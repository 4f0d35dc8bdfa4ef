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
            raise P.ZDepthError(P.TOO_LARGE, f"request is {_mb(size)}; one client may have at most {_mb(self.owner_limit)} in flight (--max-client-inflight-mb)")
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
                P.OVERLOADED, f"the server holds {_mb(self.total)} of requests; the limit is {_mb(self.total_limit)} (--max-inflight-mb); retry later"
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
