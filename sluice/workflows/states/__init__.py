"""The lifecycle steps: each takes the workflow, does its state's work, and transitions once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sluice.workflows.states.recovering import failing, recovering
from sluice.workflows.states.rescaling import rescaling, restarting
from sluice.workflows.states.running import running
from sluice.workflows.states.starting import compiling, created, scheduling
from sluice.workflows.states.stopping import checkpoint_stopping, finishing, stopping
from sluice.workflows.states.upgrading import upgrading

STEPS: dict[str, Callable[..., Awaitable[None]]] = {
    "Created": created,
    "Compiling": compiling,
    "Scheduling": scheduling,
    "Running": running,
    "Rescaling": rescaling,
    "Restarting": restarting,
    "CheckpointStopping": checkpoint_stopping,
    "Stopping": stopping,
    "Finishing": finishing,
    "Recovering": recovering,
    "Upgrading": upgrading,
    "Failing": failing,
}
