"""The job's states and every legal transition between them, declared once as data.

The workflow checks each transition against `TRANSITIONS`; the docs' state diagram is rendered
from the same table (`python -m sluice.workflows.table > docs/states.md`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from sluice.models import TERMINAL_STATES, JobStateName

STATES: tuple[str, ...] = get_args(JobStateName)
TERMINAL: frozenset[str] = frozenset(TERMINAL_STATES)
# States from which a stop request must wait: the job is already on its way out.
STOPPING: frozenset[str] = frozenset({"CheckpointStopping", "Stopping"})


@dataclass(frozen=True)
class Transition:
    source: str
    trigger: str
    target: str


TRANSITIONS: tuple[Transition, ...] = (
    Transition("Created", "always", "Compiling"),
    Transition("Compiling", "program valid", "Scheduling"),
    Transition("Compiling", "program invalid (user error)", "Failing"),
    Transition("Compiling", "compile failed (internal)", "Recovering"),
    Transition("Compiling", "stop requested", "Stopping"),
    Transition("Scheduling", "all runners registered and every subtask started", "Running"),
    Transition("Scheduling", "any stop requested (immediate; force kills runners)", "Stopping"),
    Transition("Scheduling", "startup timeout, runner lost, task failed with backoff", "Recovering"),
    Transition("Scheduling", "task failed (not retryable)", "Failing"),
    Transition("Running", "stop checkpoint", "CheckpointStopping"),
    Transition("Running", "stop graceful / immediate / force, or TTL expired", "Stopping"),
    Transition("Running", "restart requested (nonce changed)", "Restarting"),
    Transition("Running", "parallelism changed", "Rescaling"),
    Transition("Running", "all sources finished", "Finishing"),
    Transition("Running", "task failed (retryable), runner lost, checkpoint failed", "Recovering"),
    Transition("Running", "task failed (not retryable)", "Failing"),
    Transition("CheckpointStopping", "final checkpoint committed and all tasks finished", "Stopped"),
    Transition(
        "CheckpointStopping",
        "stop graceful / immediate / force requested, or the final checkpoint failed",
        "Stopping",
    ),
    Transition("Stopping", "all tasks finished, or finish timeout and runners killed", "Stopped"),
    Transition("Finishing", "final checkpoint committed and all tasks finished", "Finished"),
    Transition("Finishing", "stop requested", "Stopping"),
    Transition("Finishing", "task failed, runner lost, final checkpoint failed", "Recovering"),
    Transition("Rescaling", "final checkpoint done and tasks finished", "Scheduling"),
    Transition("Restarting", "safe: final checkpoint done; force: runners torn down", "Scheduling"),
    Transition("Rescaling", "stop requested", "Stopping"),
    Transition("Restarting", "stop requested", "Stopping"),
    Transition("Rescaling", "final checkpoint failed or runner lost", "Recovering"),
    Transition("Restarting", "final checkpoint failed or runner lost", "Recovering"),
    Transition("Recovering", "restart budget left: backoff, tear down", "Compiling"),
    Transition(
        "Recovering",
        "restart budget exhausted, or the same failure of the pipeline 3 times in a row",
        "Failing",
    ),
    Transition("Recovering", "stop requested", "Stopping"),
    Transition(
        "Running",
        "upgrade checked (and approved): savepoint, then switch; or its new generation failed "
        "in the health window: rollback",
        "Upgrading",
    ),
    Transition("Scheduling", "upgrade's new generation failed to start: rollback", "Upgrading"),
    Transition("Upgrading", "old generation stopped at the restore point: new pipeline (or rollback)", "Scheduling"),
    Transition("Upgrading", "stop requested", "Stopping"),
    Transition("Upgrading", "the savepoint failed (upgrade abandoned), or a rollback did not compile", "Recovering"),
    Transition("Upgrading", "rollback: the previous pipeline is invalid (user error)", "Failing"),
    Transition("Failing", "tear down (best effort)", "Failed"),
)

# Any state may fail on a controller error (an unexpected exception in its step): the job fails
# with the error named instead of retrying a workflow task for ever.
CONTROLLER_ERROR = "controller error (internal)"
TRANSITIONS += tuple(
    Transition(s, CONTROLLER_ERROR, "Failing")
    for s in STATES
    if s not in TERMINAL and s != "Failing" and not any(t.source == s and t.target == "Failing" for t in TRANSITIONS)
)

_ALLOWED: frozenset[tuple[str, str]] = frozenset((t.source, t.target) for t in TRANSITIONS)


class IllegalTransition(Exception):
    """A transition the table does not allow: a controller bug, never a user error."""


def check_transition(source: str, target: str) -> None:
    """Raise IllegalTransition unless the table allows `source -> target`."""
    if (source, target) not in _ALLOWED:
        raise IllegalTransition(f"transition {source} -> {target} is not in the state table")


def mermaid() -> str:
    """The state diagram as Mermaid, generated from TRANSITIONS."""
    lines = ["stateDiagram-v2", "    [*] --> Created"]
    for t in TRANSITIONS:
        lines.append(f"    {t.source} --> {t.target}: {t.trigger}")
    for s in sorted(TERMINAL):
        lines.append(f"    {s} --> [*]")
    return "\n".join(lines)


def markdown() -> str:
    """docs/states.md: the table and the diagram."""
    rows = "\n".join(f"| {t.source} | {t.trigger} | {t.target} |" for t in TRANSITIONS)
    return (
        "# Job states\n\n"
        "Generated from `sluice/workflows/table.py` (`python -m sluice.workflows.table`); do not edit.\n\n"
        "Stopped, Finished and Failed are terminal: they close the workflow. Resuming a Stopped job\n"
        "or restarting a Failed one starts a new run under the same workflow id that restores the last\n"
        "completed checkpoint (`sluice restart`, or `patch` with `stop: none`).\n\n"
        "| from | trigger | to |\n|---|---|---|\n"
        f"{rows}\n\n```mermaid\n{mermaid()}\n```\n"
    )


if __name__ == "__main__":
    print(markdown(), end="")
