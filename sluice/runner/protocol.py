"""Runner-local request bodies and helpers shared by the runner server and its client.

The big payloads (StartRequest, SubtaskSnapshot, RunnerEvent) live in `sluice.models`; the small
bodies of /checkpoint and /stop live here because only the runner and its client speak them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError

from sluice.models import Contract, RunnerEvent, SubtaskSnapshot

# Runner-side task states (docs/runner-protocol.md). Terminal ones never change again.
TASK_STATES: tuple[str, ...] = ("starting", "running", "source_finished", "finished", "failed")
TERMINAL_TASK_STATES: frozenset[str] = frozenset({"finished", "failed"})

HEARTBEAT_INTERVAL_S = 1.0
"""How often an open /events stream gets a heartbeat (protocol: every second)."""


class CheckpointRequest(Contract):
    """Body of POST /checkpoint: inject barrier `epoch` at this runner's sources."""

    epoch: int = Field(ge=1)
    then_stop: bool = False


class StopRequest(Contract):
    """Body of POST /stop."""

    mode: Literal["graceful", "immediate"]


class CheckpointWaitResult(Contract):
    """Answer of GET /checkpoint/{epoch}: done once every subtask of this runner snapshotted it."""

    done: bool
    snapshots: list[SubtaskSnapshot] = Field(default_factory=list)
    failed: str | None = None
    #: when `failed` is because a subtask failed: its task_failed event (operator, message,
    #: traceback, domain, retryable), so the controller reports the task's failure itself
    failed_task: RunnerEvent | None = None


def describe_validation_error(err: ValidationError) -> str:
    """A one-line message naming every offending field, e.g. `epoch: Input should be ...`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)
