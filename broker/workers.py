"""The broker's record of one worker, built only from what the worker's READY message says
after each field is type-checked: the backend is trusted to run workers, not to send
well-formed messages, and whatever a worker says ends up in `health`, which must always be
encodable and sortable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class WorkerRecord:
    identity: bytes
    info: dict  # READY fields, checked by `worker_info`
    capacity: int
    expiry: float  # monotonic: silent past this, the worker counts as dead
    inflight: dict = field(default_factory=dict)  # ticket -> Job
    served: int = 0
    last_dispatch: float = 0.0

    @property
    def name(self) -> str:
        return self.info["name"] or self.identity.hex()

    @property
    def free(self) -> bool:
        return len(self.inflight) < self.capacity

    def as_dict(self) -> dict:
        return {**self.info, "name": self.name, "capacity": self.capacity, "busy": len(self.inflight), "served": self.served}


def _text(value: Any, limit: int = 256) -> Optional[str]:
    return value if isinstance(value, str) and len(value) <= limit else None


def worker_models(value: Any) -> list:
    """A worker's resident models (from READY or a heartbeat) as health shows them: strings only."""
    return [m for m in value if _text(m, 64)][:64] if isinstance(value, list) else []


def worker_info(info: dict) -> dict:
    """The READY fields health shows, each type-checked."""
    pid = info.get("pid")
    return {
        "name": _text(info.get("name")),
        "device": _text(info.get("device")),
        "models": worker_models(info.get("models")),
        "random_weights": info.get("random_weights") is True,
        "host": _text(info.get("host")),
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
    }


def worker_capacity(value: Any) -> int:
    """Requests a worker takes at once (its --max-batch): 1 unless it says a sane number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256 else 1
