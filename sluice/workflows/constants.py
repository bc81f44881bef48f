"""Every timeout and retry budget of the controller, named, with its default and why."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

# Errors an activity raises when retrying cannot help (a bad pipeline, a bad restore point).
USER_ERROR_TYPE = "UserError"
# A checkpoint whose manifest or state files fail verification: restoring it again cannot help.
# Details: [{"epoch": N, "file": "path", "problem": "..."}].
CORRUPT_CHECKPOINT_TYPE = "CorruptCheckpoint"
# A task failed while the checkpoint activity waited on it (it saw the failure before the monitor
# did). Details: [{"operator", "traceback", "domain", "retryable", "subtask", "runner_id"}].
TASK_FAILED_TYPE = "TaskFailed"
# A savepoint whose name the job's store already holds: refused, never overwritten.
SAVEPOINT_EXISTS_TYPE = "SavepointExists"
NON_RETRYABLE = [USER_ERROR_TYPE, CORRUPT_CHECKPOINT_TYPE, TASK_FAILED_TYPE]

# Compile: validation and function imports take milliseconds; three tries cover a flaky worker.
COMPILE_TIMEOUT = timedelta(seconds=60)
COMPILE_RETRY = RetryPolicy(maximum_attempts=3, non_retryable_error_types=NON_RETRYABLE)

# Schedule: start runner processes. Its own timeout is the job's runner startup timeout plus
# this margin for killing older generations first.
SCHEDULE_MARGIN = timedelta(seconds=15)
SCHEDULE_RETRY = RetryPolicy(maximum_attempts=3, initial_interval=timedelta(seconds=0.5))

# Start execution: bounded by the job's task startup timeout (default 2 min, as the reference).
START_RETRY = RetryPolicy(
    maximum_attempts=3, initial_interval=timedelta(seconds=0.5), non_retryable_error_types=NON_RETRYABLE
)

# Long-running activities heartbeat; a controller worker that dies is noticed after this and the
# activity is retried on another worker, while the runners keep running.
HEARTBEAT_TIMEOUT = timedelta(seconds=10)

# Monitor: one per generation, returns only when something needs the workflow. Retried (a new
# controller worker picks it up) with a budget; beyond it the job recovers.
MONITOR_TIMEOUT = timedelta(days=365)
MONITOR_RETRY = RetryPolicy(
    maximum_attempts=10, initial_interval=timedelta(seconds=0.5), maximum_interval=timedelta(seconds=10)
)

# Checkpoint: barrier injection and the manifest are idempotent per epoch, so a retry after a
# controller worker crash completes the same epoch instead of failing the job.
CHECKPOINT_RETRY = RetryPolicy(
    maximum_attempts=3, initial_interval=timedelta(seconds=0.5), non_retryable_error_types=NON_RETRYABLE
)

# A periodic checkpoint run as a local activity (runs with the local-checkpoints patch): failed
# attempts are retried in the worker, without history, while the next retry is due within this;
# a later retry waits on a durable timer. CHECKPOINT_RETRY's 0.5-1 s backoff stays well inside.
CHECKPOINT_LOCAL_RETRY_THRESHOLD = timedelta(seconds=30)
# The server ends a workflow task kept open by heartbeats for longer than 30 min
# (history.workflowTaskHeartbeatTimeout), and a local activity's work is then lost and started
# over: a job whose checkpoint_timeout_s is above this takes its periodic checkpoints as regular
# activities instead.
CHECKPOINT_LOCAL_MAX_TIMEOUT = timedelta(minutes=20)

# Cleanup never blocks checkpointing: one quick try, failures are logged and ignored.
CLEANUP_TIMEOUT = timedelta(seconds=60)
CLEANUP_RETRY = RetryPolicy(maximum_attempts=2)

# An upgrade's held-back output, published once its health window ended healthy: idempotent,
# so retried generously (a failure here would leave output unpublished until the next restore).
COMMIT_EPOCHS_TIMEOUT = timedelta(minutes=10)
COMMIT_EPOCHS_RETRY = RetryPolicy(
    maximum_attempts=10, initial_interval=timedelta(seconds=0.5), maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=[USER_ERROR_TYPE],
)

# Stop (graceful/immediate): bounded by the job's finish timeout (default 60 s) plus a margin.
STOP_MARGIN = timedelta(seconds=10)
STOP_RETRY = RetryPolicy(maximum_attempts=2, initial_interval=timedelta(seconds=0.5))

# Teardown kills runner processes (SIGTERM, SIGKILL after a grace): must always end.
TEARDOWN_TIMEOUT = timedelta(seconds=30)
TEARDOWN_RETRY = RetryPolicy(
    maximum_attempts=5, initial_interval=timedelta(seconds=0.5), maximum_interval=timedelta(seconds=5)
)

# Recovering: the first restart after a failure is immediate (the failed generation's runners
# are killed, its state comes back from the last checkpoint); each further restart in a row backs
# off exponentially with jitter, 1-2 s, 2-4 s, ... up to 30-60 s. No backoff is shorter than a
# second: Temporal fires sub-second timers up to a second late, so they would only look precise.
RESTART_BACKOFF_INITIAL_S = 2.0
RESTART_BACKOFF_MAX_S = 60.0
# Runs started before the fast-recovery patch back off before every restart, from 0.5 s (0.25-0.5
# s drawn), and stop the failed generation's runners gracefully; their histories replay so.
RESTART_BACKOFF_INITIAL_S_BEFORE_FAST_RECOVERY = 0.5

# A failure of the user's pipeline that comes back identical (same operator, same message) this
# many times in a row, with no checkpoint completed in between, fails the job: it is deterministic
# (a bad record, a bad path) and the rest of the restart budget would only repeat it.
IDENTICAL_FAILURES_TO_FAIL = 3

# A run continues as new (at its next safe point) once its history has this many events, well
# before the server's suggestion (4,096 by default): replays and history fetches stay cheap.
CONTINUE_AS_NEW_EVENTS = 2_000

# How much history the status query keeps, and how much of a bad command it quotes.
TRANSITIONS_KEPT = 50
REJECTED_COMMANDS_KEPT = 20
REJECTED_PAYLOAD_CHARS = 200
REJECTION_REASON_CHARS = 1_000

# Runner hosts (runs started with this patch; older histories replay without it).
PATCH_RUNNER_HOSTS = "runner-hosts"
# Immediate first restart and a killed (not drained) failed generation in Recovering.
PATCH_FAST_RECOVERY = "fast-recovery"
# Retention applied by the checkpoint activity itself (no separate cleanup activity).
PATCH_LEAN_CHECKPOINTS = "lean-checkpoints"
# Periodic checkpoints run as local activities (one marker event instead of three activity events
# and one workflow task less per checkpoint); savepoints and final checkpoints stay activities.
PATCH_LOCAL_CHECKPOINTS = "local-checkpoints"

# Placement asks the host registry (one update): quick, retried on a flaky worker.
PLACE_TIMEOUT = timedelta(seconds=30)
PLACE_RETRY = RetryPolicy(maximum_attempts=5, initial_interval=timedelta(seconds=0.5))
# No free runner slot: the job waits in Scheduling until the registry signals that slots were
# freed or a host joined, and asks again at least this often in case a signal was missed.
PLACEMENT_RECHECK = timedelta(seconds=30)

# Activities on a host's own task queue: a host that does not pick one up within this is gone
# or cut off (the registry declares it lost soon after); the job does not wait for it longer.
HOST_PICKUP_TIMEOUT = timedelta(seconds=5)
HOST_START_MARGIN = timedelta(seconds=15)
HOST_ACTIVITY_RETRY = RetryPolicy(maximum_attempts=2, initial_interval=timedelta(seconds=0.5))
