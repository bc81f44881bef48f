"""Runner-local request bodies and helpers shared by the runner server and its client.

The big payloads (StartRequest, SubtaskSnapshot, RunnerEvent) live in `sluice.models`; the small
bodies of /checkpoint and /stop live here because only the runner and its client speak them, and
so does the assignment line a warm runner (`python -m sluice.runner --warm`) reads on stdin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from sluice.models import Contract, RunnerEvent, SubtaskSnapshot

# Runner-side task states (docs/runner-protocol.md). Terminal ones never change again.
TASK_STATES: tuple[str, ...] = ("starting", "running", "source_finished", "finished", "failed")
TERMINAL_TASK_STATES: frozenset[str] = frozenset({"finished", "failed"})

HEARTBEAT_INTERVAL_S = 1.0
"""How often an open /events stream gets a heartbeat (protocol: every second)."""
WARM_FLAG = "--warm"
"""`python -m sluice.runner --warm`: a warm runner (no job on its command line; see __main__)."""
READY_LINE = b"ready\n"
"""What a warm runner writes on its stdout once its imports are done (WarmPool waits for it)."""
MAX_ASSIGNMENT_LINE_BYTES = 64 * 1024
"""Longest assignment line a warm runner reads; a real one is well under 1 KiB."""
MAX_PORT = 65535


class CheckpointRequest(Contract):
    """Body of POST /checkpoint: inject barrier `epoch` at this runner's sources."""

    epoch: int = Field(ge=1)
    then_stop: bool = False


class StopRequest(Contract):
    """Body of POST /stop."""

    mode: Literal["graceful", "immediate"]


class WarmAssignment(Contract):
    """The one JSON line a warm runner reads on stdin: everything a cold runner gets on its command
    line, plus its token (which a cold runner gets from its environment). It travels through a
    pipe only the starter holds, never on a command line; its repr leaves the token out."""

    job_id: str = Field(min_length=1)
    generation: int
    runner_id: str = Field(min_length=1)
    slots: int = Field(ge=1)
    info_file: Path
    #: where the runner's stdout and stderr go from now on (None: keep the pool's log)
    log_file: Path | None = None
    host: str = Field(default="127.0.0.1", description="control and data API bind address")
    advertise_host: str | None = Field(default=None, description="address written to the info file")
    port: int = Field(default=0, ge=0, le=MAX_PORT, description="control port; 0 = any free port")
    orphan_timeout_s: float = Field(gt=0)
    token: str = Field(min_length=1, repr=False)


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
