"""The controller's side of sinks for every sink of a program: claim, recover, commit.

Every function runs in a worker thread (blocking file I/O) and turns a sink's
:class:`sluice.errors.UserError` (e.g. the path belongs to another job; its message names the
sink) into a non-retryable `user` failure of the activity, so the job fails with a message saying
what to do.
Ownership is confirmed before every recover and commit, so a sink never cleans up or publishes
where another job has taken over the destination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sluice.activities.context import user_error
from sluice.connectors import sink_class
from sluice.engine.sinks import Sink
from sluice.errors import UserError
from sluice.models import CheckpointManifest, Program


def _each_sink(program: Program, act: Callable[[str, type[Sink], dict[str, Any]], int | None]) -> int:
    """`act(operator id, sink class, params)` for every sink of `program`; the sum of what it
    returns. A sink's UserError becomes the activity's non-retryable user failure."""
    total = 0
    for op_id, params in program.operators.items():
        sink = sink_class(params)
        if sink is None:
            continue
        try:
            total += act(op_id, sink, params) or 0
        except UserError as e:
            raise user_error(str(e)) from None
    return total


def claim_sinks(program: Program, job_id: str) -> None:
    """Make `job_id` the owner of every sink destination of `program`, or confirm it is."""
    _each_sink(program, lambda op_id, sink, params: sink.claim(params, job_id))


def recover_sinks(program: Program, job_id: str, manifest: CheckpointManifest | None) -> None:
    """Before a run restores `manifest` (None = fresh start): each sink, once its ownership is
    confirmed, publishes the manifest's commits and discards its own uncommitted output."""
    claim_sinks(program, job_id)
    _each_sink(program, lambda op_id, sink, params: sink.recover(params, manifest))


def commit_sinks(
    program: Program,
    job_id: str,
    manifest: CheckpointManifest,
    *,
    before_publish: Callable[[], None] | None = None,
) -> int:
    """The commit phase of two-phase-commit sinks; idempotent, so retries are safe. Returns how
    many items were published. `before_publish` (the committing generation's fence check) runs
    right before every item is published; what it raises stops the commit and propagates."""
    claim_sinks(program, job_id)

    def commit(op_id: str, sink: type[Sink], params: dict[str, Any]) -> int:
        part = manifest.operators.get(op_id)
        if part is None or not part.commits:
            return 0
        return sink.commit(params, part.commits, before_publish=before_publish)

    return _each_sink(program, commit)
