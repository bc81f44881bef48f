"""Two controller workers; the one holding a job's sticky workflow task is SIGKILLed mid-state.

Temporal keeps a running workflow cached on the worker that completed its last workflow task
(the sticky worker) and sends it the next task. When that worker dies, the next task times out
on its sticky queue and another worker takes it, rebuilding the workflow by replaying the whole
history. A workflow that is not deterministic then fails that replay, or, as seen once, gets
through it live but leaves a history that no later replay accepts: every later `status` query
fails with a nondeterminism error although the job itself ended well.

For each state the job can be waiting in (Running on its checkpoint timer, during a periodic
checkpoint, inside the workflow task that runs a held local checkpoint, the Recovering backoff
timer, CheckpointStopping's final checkpoint), with two
`sluice worker` processes on a dev server of this module's own: find the worker whose identity
("<pid>@<host>") completed the job's latest workflow task, SIGKILL it, and check what a user
would: the job still answers `status`, reaches its end state, still answers `status` once closed
(a full replay on the surviving worker), every run's history replays cleanly with temporalio's
Replayer, and the committed output is exactly the generated rows: none lost, none duplicated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from sluice.client import JobClient, connect
from sluice.devserver import DevServer
from sluice.models import JobStatus, PipelineSpec
from sluice.workflows.job import JobWorkflow
from tests.e2e_helpers import (
    assert_exact_output,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    kill_runner,
    manifest_epochs,
    read_committed_rows,
    sink_path,
    stop_job_quietly,
    wait_status,
    wait_until,
)
from tests.histories.corpus import local_checkpoint_in_flight, local_checkpoint_since, replay_history
from tests.histories.scenarios import freeze_until_task_started, last_event_id, run_ids, sticky_holder
from tests.pipeline_functions import FAULT_DIR_ENV, HOLD_BLOCK_FILE

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90.0  # Created -> Running with two runner processes on a busy machine
# The dead worker's sticky task times out (schedule-to-start) before the other worker takes it;
# activities it ran are retried after their 10 s heartbeat timeout.
FAILOVER_TIMEOUT_S = 90.0
END_TIMEOUT_S = 180.0  # the rest of the bounded stream, finishing included
QUERY_TIMEOUT_S = 5.0
HISTORY_POLL_S = 0.05
WORKERS = 2

SLOW_BATCH_ENV = "SLUICE_TEST_SLOW_BATCH"
SLOW_BATCH_S = "0.3"  # per batch in `slow_batches`: a checkpoint's barrier waits behind batches
SLOW_BATCHES = "tests.pipeline_functions:slow_batches"
STEERED = "tests.pipeline_functions:steered"
# A local checkpoint held this long before the kill: well inside its workflow task (whose
# heartbeat comes after 8 s), barriers injected.
LOCAL_HELD_S = 2.0
# The held batch must not fail its task as hung before the takeover releases it.
HOLD_HANG_TIMEOUT_S = 120.0
# The first restart is immediate, then restart n waits 2 s * 2^(n-2), halved plus jitter: from
# the 4th it is 4..8 s, long enough to find the job still waiting on that timer when the kill lands.
RECOVERING_RESTARTS = 4


@dataclass
class Job:
    """One test's job and the processes and client around it."""

    client: Client
    job_client: JobClient
    job_id: str
    state_dir: Path
    pipeline: PipelineSpec
    workers: list[Any]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """Where the kill lands: `transforms` and `env` shape the job, `reach` brings it there and
    returns once the workflow waits in that state."""

    name: str
    transforms: tuple[tuple[str, str], ...]
    reach: Callable[[Job], Awaitable[None]]
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    stops_first: bool = False  # ends Stopped; resumed with `stop none` to finish the stream
    # SIGSTOP the sticky worker first and SIGKILL it only once the server handed it the job's
    # next workflow task: it dies holding a started task (start-to-close timeout, then a retry
    # on the other worker) rather than idle (the task times out on its sticky queue).
    dies_mid_task: bool = False
    # Called right after the kill (e.g. to release a hold `reach` put in place).
    after_kill: Callable[[Job], None] | None = None
    # The victim dies holding a started workflow task (a local checkpoint runs inside one).
    task_times_out: bool = False


# ------------------------------------------------------------------------------ reaching a state


async def _status(
    job: Job, predicate: Callable[[JobStatus], bool], what: str, timeout_s: float = START_TIMEOUT_S
) -> JobStatus:
    return await wait_status(job.job_client, job.job_id, predicate, timeout_s=timeout_s, what=what)


async def _last_activity_open(job: Job, activity: str) -> bool:
    """True if the latest `activity` scheduled in the job's history has not closed yet."""
    open_ids: dict[int, str] = {}
    async for event in job.client.get_workflow_handle(job.job_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            open_ids[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        for attrs in (
            event.activity_task_completed_event_attributes,
            event.activity_task_failed_event_attributes,
            event.activity_task_timed_out_event_attributes,
            event.activity_task_canceled_event_attributes,
        ):
            if attrs.scheduled_event_id:
                open_ids.pop(attrs.scheduled_event_id, None)
    return activity in open_ids.values()


async def reach_checkpoint_timer(job: Job) -> None:
    """Running, right after a periodic checkpoint completed: waiting on the next one's timer."""
    st = await _status(job, lambda s: s.state == "Running" and s.epoch >= 1, "Running with a checkpoint")
    await _status(job, lambda s: s.epoch > st.epoch, "the next checkpoint")


async def _checkpoint_open(job: Job) -> bool:
    """A periodic checkpoint in flight: a checkpoint activity open, or (runs with the
    local-checkpoints patch) the workflow task that runs a local one (the sticky worker holds it)."""
    if await _last_activity_open(job, "checkpoint"):
        return True
    return local_checkpoint_in_flight(await job.client.get_workflow_handle(job.job_id).fetch_history())


async def reach_checkpoint_in_flight(job: Job) -> None:
    """Running with a periodic checkpoint started and not yet done."""
    await _status(job, lambda s: s.state == "Running" and s.epoch >= 1, "Running with a checkpoint")
    await wait_until(
        lambda: _checkpoint_open(job), timeout_s=START_TIMEOUT_S, interval_s=HISTORY_POLL_S,
        what="a checkpoint in flight",
    )


def _hold_file(job: Job) -> Path:
    return job.state_dir / "faults" / job.job_id / HOLD_BLOCK_FILE


async def reach_local_checkpoint_held(job: Job) -> None:
    """A periodic local checkpoint in flight for a while, held (its barrier waits behind a map
    batch that does not return while the hold file exists): the sticky worker dies running it."""
    await _status(job, lambda s: s.state == "Running" and s.epoch >= 1, "Running with a checkpoint")
    _hold_file(job).parent.mkdir(parents=True, exist_ok=True)
    _hold_file(job).touch()
    await wait_until(
        lambda: _local_checkpoint_older_than(job, LOCAL_HELD_S), timeout_s=START_TIMEOUT_S,
        interval_s=HISTORY_POLL_S, what="a local checkpoint held in flight",
    )


async def _local_checkpoint_older_than(job: Job, age_s: float) -> bool:
    since = local_checkpoint_since(await job.client.get_workflow_handle(job.job_id).fetch_history())
    return since is not None and (datetime.now(UTC) - since).total_seconds() >= age_s


def release_hold(job: Job) -> None:
    _hold_file(job).unlink(missing_ok=True)


async def reach_recovering_backoff(job: Job) -> None:
    """Recovering, waiting out the backoff before restart RECOVERING_RESTARTS: a runner is
    SIGKILLed each time the job is Running again (a lost runner is not the user's failure, so
    repeating it never fails the job early)."""
    for restart in range(1, RECOVERING_RESTARTS + 1):
        st = await _status(
            job, lambda s, r=restart: s.state == "Running" and s.restarts == r - 1 and bool(s.runners),
            f"Running before restart {restart}", timeout_s=END_TIMEOUT_S,
        )
        pid = st.runners[0].pid
        assert pid is not None, describe_status(st)
        kill_runner(pid, job.job_id)
    await _status(
        job, lambda s: s.state == "Recovering" and s.restarts >= RECOVERING_RESTARTS,
        f"Recovering before restart {RECOVERING_RESTARTS}", timeout_s=END_TIMEOUT_S,
    )


async def reach_checkpoint_stopping(job: Job) -> None:
    """CheckpointStopping: the final checkpoint (slowed by slow batches) in flight."""
    await _status(job, lambda s: s.state == "Running" and s.epoch >= 1, "Running with a checkpoint")
    await job.job_client.stop(job.job_id, "checkpoint")
    await _status(job, lambda s: s.state == "CheckpointStopping", "CheckpointStopping")


CASES = [
    Case("running_on_checkpoint_timer", (), reach_checkpoint_timer, config={"checkpoint_interval_s": 4.0}),
    Case(
        "running_on_checkpoint_timer_dies_mid_task", (), reach_checkpoint_timer,
        config={"checkpoint_interval_s": 4.0}, dies_mid_task=True,
    ),
    Case(
        "during_checkpoint", (("map", SLOW_BATCHES),), reach_checkpoint_in_flight,
        env={SLOW_BATCH_ENV: SLOW_BATCH_S},
    ),
    # The worker dies inside the workflow task that runs a local checkpoint (barriers injected,
    # snapshots pending): the task times out, the other worker replays the history (no marker for
    # that epoch) and runs the checkpoint of the same epoch again; it completes (idempotent).
    Case(
        "during_local_checkpoint", (("map", STEERED),), reach_local_checkpoint_held,
        config={"task_hang_timeout_s": HOLD_HANG_TIMEOUT_S}, after_kill=release_hold, task_times_out=True,
    ),
    Case("recovering_backoff", (), reach_recovering_backoff, config={"allowed_restarts": -1}),
    Case(
        "checkpoint_stopping", (("map", SLOW_BATCHES),), reach_checkpoint_stopping,
        env={SLOW_BATCH_ENV: SLOW_BATCH_S}, stops_first=True,
    ),
]


# ------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def failover_server(dev_server_factory: Callable[..., DevServer]) -> DevServer:
    """A dev server only these tests' process workers poll (no in-process worker competes)."""
    return dev_server_factory()


async def _answers_status(job: Job) -> JobStatus:
    return await wait_until(
        lambda: job.job_client.status(job.job_id, timeout_s=QUERY_TIMEOUT_S),
        timeout_s=FAILOVER_TIMEOUT_S, what=f"{job.job_id}: status query answered after the failover",
    )


async def _taken_over(job: Job, victim: Any, after_event: int, *, timed_out: bool) -> None:
    """The failover happened as intended: after the kill, the first run's workflow tasks were
    completed by another worker; with `timed_out`, one task the victim held timed out first."""
    completers: list[str] = []
    timeouts = 0
    async for event in job.client.get_workflow_handle(job.job_id).fetch_history_events():
        if event.event_id <= after_event:
            continue
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            completers.append(event.workflow_task_completed_event_attributes.identity.split("@", 1)[0])
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
            timeouts += 1
    survivors = {str(w.pid) for w in job.workers if w is not victim}
    # (The latest run: for a resumed job its own history, all of it after the kill.)
    assert completers and set(completers) <= survivors, (
        f"workflow tasks after the kill were completed by {sorted(set(completers))}, survivors are {sorted(survivors)}"
    )
    if timed_out:
        assert timeouts >= 1, "the task the frozen worker held never timed out"


async def _replays_cleanly(job: Job, since: datetime) -> int:
    runs = await run_ids(job.client, job.job_id, since)
    for rid in runs:
        history = await job.client.get_workflow_handle(job.job_id, run_id=rid).fetch_history()
        failure, _ = await replay_history(history, [JobWorkflow])
        assert failure is None, f"run {rid} of {job.job_id} does not replay: {type(failure).__name__}: {failure}"
    return len(runs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_sticky_worker_killed(
    case: Case, failover_server: DevServer, process_worker_factory: Callable[..., Any], state_dir: Path
) -> None:
    client = await connect(failover_server.address, "default")
    job_client = JobClient(client)
    workers = [
        process_worker_factory(
            state_dir, address=failover_server.address, env={FAULT_DIR_ENV: str(state_dir / "faults"), **case.env}
        )
        for _ in range(WORKERS)
    ]
    # Bounded: 2 splits of 400 rows at 20 rows/s each, ~20 s of stream, so the job outlives
    # the failover and its output can be compared with every generated row.
    pipeline = generator_pipeline(
        f"failover-{case.name}".replace("_", "-"), state_dir / "out", splits=2, limit=400, rate=20.0, keys=8,
        transforms=case.transforms,
    )
    spec = job_spec(pipeline, state_dir, **{"checkpoint_interval_s": 1.0, **case.config})
    job = Job(client, job_client, spec.job_id, state_dir, pipeline, workers)
    since = datetime.now(UTC)
    await job_client.start(spec)
    try:
        await case.reach(job)
        victim = await sticky_holder(client, job.job_id, workers)
        killed_after = await last_event_id(client, job.job_id)
        if case.dies_mid_task:
            await freeze_until_task_started(client, job.job_id, victim, timeout_s=FAILOVER_TIMEOUT_S)
        victim.kill()
        if case.after_kill is not None:
            case.after_kill(job)
        survivors = [w for w in workers if w is not victim]
        assert all(w.alive() for w in survivors), "the other controller worker died too"

        await _answers_status(job)
        if case.stops_first:
            await _status(job, lambda s: s.state == "Stopped", "Stopped", timeout_s=FAILOVER_TIMEOUT_S)
            await wait_until(
                lambda: job_client.final_state(job.job_id), timeout_s=FAILOVER_TIMEOUT_S, what="run closed"
            )
            await job_client.stop(job.job_id, "none")  # resume: a new run restores the final checkpoint
        await _status(job, lambda s: s.state == "Finished", "Finished", timeout_s=END_TIMEOUT_S)
        await wait_until(
            lambda: job_client.final_state(job.job_id), timeout_s=FAILOVER_TIMEOUT_S, what="run closed"
        )

        # Once closed, a query replays the whole history on the surviving worker.
        closed = await job_client.status(job.job_id, timeout_s=QUERY_TIMEOUT_S * 2)
        assert closed.state == "Finished", describe_status(closed)
        await _taken_over(job, victim, killed_after, timed_out=case.dies_mid_task or case.task_times_out)
        runs = await _replays_cleanly(job, since)
        assert runs == (2 if case.stops_first else 1), f"{runs} runs of {job.job_id}"

        reference = generator_pipeline(
            pipeline.name, sink_path(pipeline), splits=2, limit=400, rate=20.0, keys=8, transforms=()
        )  # slow_batches and steered pass rows through unchanged
        assert_exact_output(read_committed_rows(sink_path(pipeline)), expected_rows(reference))
        if case.task_times_out:
            # The checkpoint the victim was running was taken again, same epoch: none skipped.
            epochs = manifest_epochs(state_dir, job.job_id)
            assert epochs == list(range(epochs[0], epochs[-1] + 1)), epochs
    finally:
        await stop_job_quietly(job_client, job.job_id)
