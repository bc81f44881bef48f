"""The restore point, verified: a checkpoint is used only once its manifest and every state file
check out, and a corrupt one is reported as a CorruptCheckpoint error that names the epoch, the
file and the problem, and says which older checkpoints would restore instead.

Functions here do blocking I/O (they read and hash state files): call them in a thread.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from sluice.models import CheckpointManifest
from sluice.storage import CheckpointProblem, CheckpointStore, check_checkpoint, verifying_epochs
from sluice.workflows.constants import CORRUPT_CHECKPOINT_TYPE

#: older epochs that verify, named in the error (each costs a full read of its state files)
ALTERNATIVES_SHOWN = 3


def restore_point(store: CheckpointStore, epoch: int) -> CheckpointManifest:
    """The manifest of checkpoint `epoch` once it verifies; raises the CorruptCheckpoint
    ApplicationError (not retryable) otherwise."""
    checked = check_checkpoint(store, epoch)
    if checked.ok:
        assert checked.manifest is not None
        return checked.manifest
    raise corrupt_checkpoint_error(store, checked.problems)


def corrupt_checkpoint_error(store: CheckpointStore, problems: list[CheckpointProblem]) -> ApplicationError:
    """The activity error for a corrupt checkpoint: message for the user, the first problem as
    details ``{"epoch", "file", "problem"}``, type CorruptCheckpoint, not retryable."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    job = store.job_id
    good = verifying_epochs(store, below=first.epoch, limit=ALTERNATIVES_SHOWN)
    if good:
        advice = (
            f"epochs that verify: {', '.join(map(str, good))}; restore one with "
            f"`sluice restart {job} --restore-epoch {good[0]}` (output committed after it is written "
            f"again) or start fresh with `sluice restart {job} --ignore-state`"
        )
    else:
        advice = (
            f"no older checkpoint verifies; start fresh with `sluice restart {job} --ignore-state` "
            "(output committed so far is written again)"
        )
    message = f"{first.error()}{more}; {advice}"
    return ApplicationError(message, first.details(), type=CORRUPT_CHECKPOINT_TYPE, non_retryable=True)
