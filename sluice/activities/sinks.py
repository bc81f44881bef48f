"""The controller's side of sinks for every sink of a program: claim, recover, commit.

Every function runs in a worker thread (blocking file I/O) and turns a sink's
:class:`sluice.errors.UserError` (e.g. the path belongs to another job; its message names the
sink) into a non-retryable `user` failure of the activity, so the job fails with a message saying
what to do.
Ownership is confirmed before every recover and commit, so a sink never cleans up or publishes
where another job has taken over the destination.
"""

from __future__ import annotations

from sluice.activities.context import user_error
from sluice.connectors import sink_class
from sluice.errors import UserError
from sluice.models import CheckpointManifest, Program


def claim_sinks(program: Program, job_id: str) -> None:
    """Make `job_id` the owner of every sink destination of `program`, or confirm it is."""
    for params in program.operators.values():
        sink = sink_class(params)
        if sink is None:
            continue
        try:
            sink.claim(params, job_id)
        except UserError as e:
            raise user_error(str(e)) from None


def recover_sinks(program: Program, job_id: str, manifest: CheckpointManifest | None) -> None:
    """Before a run restores `manifest` (None = fresh start): each sink, once its ownership is
    confirmed, publishes the manifest's commits and discards its own uncommitted output."""
    claim_sinks(program, job_id)
    for params in program.operators.values():
        sink = sink_class(params)
        if sink is None:
            continue
        try:
            sink.recover(params, manifest)
        except UserError as e:
            raise user_error(str(e)) from None


def commit_sinks(program: Program, job_id: str, manifest: CheckpointManifest) -> int:
    """The commit phase of two-phase-commit sinks; idempotent, so retries are safe. Returns how
    many items were published."""
    claim_sinks(program, job_id)
    published = 0
    for op_id, params in program.operators.items():
        sink = sink_class(params)
        part = manifest.operators.get(op_id)
        if sink is None or part is None or not part.commits:
            continue
        try:
            published += sink.commit(params, part.commits)
        except UserError as e:
            raise user_error(str(e)) from None
    return published
