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
    sock: Any = None  # the broker socket it registered on: the ipc/plain one or the CURVE one

    @property
    def name(self) -> str:
        return self.info["name"] or self.identity.hex()

    @property
    def ready(self) -> bool:
        """Its preloaded models are loaded and a warm-up frame ran (and it is not warming a compiled graph)."""
        return self.info["ready"] and not self.info["warming"]

    @property
    def free(self) -> bool:
        """It can take one more request: not full, and not warming (building compiled graphs
        would hold the request for the whole build, past the hang timeout for a slow one)."""
        return len(self.inflight) < self.capacity and not self.info["warming"]

    def as_dict(self) -> dict:
        """What health shows: READY's checked fields (with `key`, the CURVE public key a remote
        worker authenticated with, else None), capacity and load."""
        return {
            **self.info,
            "name": self.name,
            "capacity": self.capacity,
            "busy": len(self.inflight),
            "served": self.served,
        }


def _text(value: Any, limit: int = 256) -> Optional[str]:
    return value if isinstance(value, str) and len(value) <= limit else None


def worker_models(value: Any) -> list:
    """A worker's resident models (from READY or a heartbeat) as health shows them: strings only."""
    return [m for m in value if _text(m, 64)][:64] if isinstance(value, list) else []


def worker_state(status: dict) -> dict:
    """What READY and every heartbeat say about the worker's state, each type-checked: resident
    models, `ready` (preloads loaded and a warm-up frame run), `warming` (compiling a graph),
    `graphs` (its compiled graphs) and `problem` (why it is not ready, e.g. its warm-up failed)."""
    return {
        "models": worker_models(status.get("models")),
        "ready": status.get("ready") is True,
        "graphs": worker_models(status.get("graphs")),  # compiled graphs: short strings too, as models
        "warming": status.get("warming") is True,
        "problem": status["problem"][:512]
        if isinstance(status.get("problem"), str)
        else None,  # a long message is cut, not dropped
    }


def worker_info(info: dict) -> dict:
    """The READY fields health shows, each type-checked."""
    pid = info.get("pid")
    return {
        "name": _text(info.get("name")),
        "device": _text(info.get("device")),
        **worker_state(info),
        "random_weights": info.get("random_weights") is True,
        "host": _text(info.get("host")),
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
    }


def worker_capacity(value: Any) -> int:
    """Requests a worker takes at once (its --max-batch): 1 unless it says a sane number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256 else 1
