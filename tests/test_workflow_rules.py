"""The workflow's never-stuck rules, with the real JobWorkflow and mocked activities on Temporal's
time-skipping test server (no runners): seconds for what takes minutes of backoff for real.

- a failure of the pipeline that repeats identically fails the job after 3 tries, not 20;
- the first restart is immediate and kills the failed generation; later ones back off (>= 1 s);
- different failures do not count as a repeat (the restart budget decides);
- a corrupt checkpoint fails the job at once, naming what the activity named;
- a wait whose caller gave up never keeps the workflow from closing;
- every wait ends when the job closes in a state the waiter did not ask for.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from sluice.models import (
    JobConfig,
    JobInput,
    JobSpec,
    JobStatus,
    MonitorResult,
    PipelineSpec,
    WaitForStateRequest,
)
from sluice.workflows.constants import CORRUPT_CHECKPOINT_TYPE, IDENTICAL_FAILURES_TO_FAIL
from sluice.workflows.job import JobWorkflow
from sluice.workflows.states.recovering import restart_backoff_s
from tests.fake_controller import FakeController
from tests.time_skipping import time_skipping_env

pytestmark = pytest.mark.timeout(120)
PIPELINE = PipelineSpec.model_validate(
    {"name": "rules", "operators": [{"id": "events", "type": "generator"},
                                    {"id": "m", "type": "filter", "expr": "value > 1"},
                                    {"id": "out", "type": "null"}]}
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_env(search_attributes=True) as e:
        yield e


async def _start(client: Client, fake: FakeController, **config: Any) -> tuple[WorkflowHandle[Any, Any], Worker, str]:
    queue = f"rules-{uuid.uuid4().hex[:8]}"
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    worker = Worker(client, task_queue=queue, workflows=[JobWorkflow], activities=fake.activities())
    spec = JobSpec(job_id=job_id, pipeline=PIPELINE, config=JobConfig(**config))
    handle = await client.start_workflow(
        JobWorkflow.run, JobInput(spec=spec).model_dump(mode="json"), id=job_id, task_queue=queue
    )
    return handle, worker, job_id


def _failed_task(kind: str, message: str, operator: str | None = "m") -> MonitorResult:
    return MonitorResult(kind=kind, message=message, domain="user", operator=operator,  # type: ignore[arg-type]
                         traceback='File "x/y.py", line 3, in z')


async def _status(handle: WorkflowHandle[Any, Any]) -> JobStatus:
    return await handle.query("status", result_type=JobStatus)


async def test_a_failure_repeating_identically_fails_the_job_after_three_tries(env: WorkflowEnvironment) -> None:
    fake = FakeController(monitor=lambda g: _failed_task("task_failed", "operator 'm' raised ValueError: bad 42"))
    handle, worker, _ = await _start(env.client, fake)
    async with worker:
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        status = await _status(handle)
    assert status.state == "Failed"
    assert status.restarts == IDENTICAL_FAILURES_TO_FAIL  # not the budget of 20
    assert status.failure is not None
    assert "the same failure 3 times in a row" in status.failure.message
    assert "bad 42" in status.failure.message
    assert status.failure.operator == "m" and status.failure.domain == "user"
    assert status.failure.traceback and "line 3" in status.failure.traceback
    assert "bad 42" in str(failed.value.cause)


async def test_different_failures_are_not_a_repeat(env: WorkflowEnvironment) -> None:
    # Each generation fails differently: the budget (3 here) decides, not the repeat rule.
    fake = FakeController(monitor=lambda g: _failed_task("task_failed", f"bad record {g}"))
    handle, worker, _ = await _start(env.client, fake, allowed_restarts=4)
    async with worker:
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await _status(handle)
    assert status.failure is not None and "exhausted 4 allowed restarts" in status.failure.message
    assert status.restarts == 5



def test_restart_backoff_schedule() -> None:
    # First restart: immediate. Then 1-2 s, 2-4 s, ... capped at 30-60 s; never sub-second.
    assert restart_backoff_s(1, 0.0) == restart_backoff_s(1, 1.0) == 0.0
    assert (restart_backoff_s(2, 0.0), restart_backoff_s(2, 1.0)) == (1.0, 2.0)
    assert (restart_backoff_s(3, 0.0), restart_backoff_s(3, 1.0)) == (2.0, 4.0)
    assert (restart_backoff_s(20, 0.0), restart_backoff_s(20, 1.0)) == (30.0, 60.0)
    # Runs from before the fast-recovery patch keep their schedule (their histories replay).
    assert (restart_backoff_s(1, 0.0, immediate_first=False), restart_backoff_s(1, 1.0, immediate_first=False)) == (
        0.25, 0.5,
    )


async def test_first_restart_is_immediate_and_kills_the_failed_generation(env: WorkflowEnvironment) -> None:
    # Generations 1 and 2 lose a runner; generation 3 runs.
    fake = FakeController(
        monitor=lambda g: _failed_task("runner_lost", f"runner g{g}-r0 exited", operator=None) if g < 3 else None
    )
    handle, worker, _ = await _start(env.client, fake)
    async with worker:
        status = await _status(handle)
        while status.generation < 3 or status.state != "Running":
            await asyncio.sleep(0.1)
            status = await _status(handle)
        history = await handle.fetch_history()
    assert status.restarts == 2 and fake.generations == [1, 2, 3]
    reasons = [t.reason for t in status.transitions if t.to_state == "Compiling"]
    assert "restart 1 at once (first restart)" in reasons, reasons
    assert any(r.startswith("restart 2 after ") and r.endswith(" s backoff") for r in reasons), reasons
    # One backoff timer only (before restart 2), of at least a second; no sub-second timer at all.
    backoffs = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds()
        for e in history.events
        if e.HasField("timer_started_event_attributes")
        and "backoff" in e.user_metadata.summary.data.decode()
    ]
    assert len(backoffs) == 1 and 1.0 <= backoffs[0] <= 2.0, backoffs
    # Each recovery killed the failed generation at once (no SIGTERM grace).
    recovery_stops = [s for s in fake.stops if s.generation is None]
    assert len(recovery_stops) >= 2 and all(s.grace_s == 0.0 for s in recovery_stops), fake.stops


async def test_a_corrupt_checkpoint_fails_the_job_at_once_naming_it(env: WorkflowEnvironment) -> None:
    message = "checkpoint epoch 7 is corrupt: state file /c/epoch-7/w-0.arrow: sha256 mismatch; epochs that verify: 6"
    fake = FakeController(
        start_error=lambda g: ApplicationError(
            message, {"epoch": 7, "file": "/c/epoch-7/w-0.arrow"}, type=CORRUPT_CHECKPOINT_TYPE, non_retryable=True
        )
    )
    handle, worker, _ = await _start(env.client, fake)
    async with worker:
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await _status(handle)
    assert status.restarts == 0 and fake.generations == [1]
    assert status.failure is not None and status.failure.domain == "external"
    assert "epoch 7" in status.failure.message and "w-0.arrow" in status.failure.message


async def test_a_wait_whose_caller_gave_up_never_keeps_the_job_open(env: WorkflowEnvironment) -> None:
    fake = FakeController()
    handle, worker, _ = await _start(env.client, fake)
    async with worker:
        await handle.execute_update("wait_for_state", WaitForStateRequest(states=["Running"]), result_type=JobStatus)
        # A waiter for Finished that gives up after 3 s, and one that never gives up.
        short = asyncio.create_task(
            handle.execute_update("wait_for_state", WaitForStateRequest(states=["Finished"], timeout_s=3))
        )
        forever = asyncio.create_task(
            handle.execute_update("wait_for_state", WaitForStateRequest(states=["Finished"]))
        )
        with pytest.raises(WorkflowUpdateFailedError) as gave_up:
            await short
        assert "within 3 s" in str(gave_up.value.cause)
        await handle.signal("stop", {"mode": "checkpoint"})
        result = await asyncio.wait_for(handle.result(), timeout=60)
        assert result.state == "Stopped"
        with pytest.raises(WorkflowUpdateFailedError) as closed:
            await forever
        assert "Stopped; it will not reach Finished" in str(closed.value.cause)
    desc = await handle.describe()
    assert desc.status == WorkflowExecutionStatus.COMPLETED


async def test_unknown_and_oversized_commands_are_rejected_not_fatal(env: WorkflowEnvironment) -> None:
    fake = FakeController()
    handle, worker, _ = await _start(env.client, fake)
    async with worker:
        await handle.execute_update("wait_for_state", WaitForStateRequest(states=["Running"]), result_type=JobStatus)
        await handle.signal("stpo", {"mode": "checkpoint"})
        await handle.signal("stop", {"mode": "x" * 1_500_000})
        await handle.signal("update_config", {"ttl_s": 1e12})
        await handle.signal("update_config", {"checkpoint_timeout_s": 1e15})
        await handle.signal("rescale", {"parallelism": 10**9})
        await handle.signal("rescale", {"overrides": {"m": 100_000}})
        status = await _status(handle)
        while len(status.rejected_commands) < 6:
            await asyncio.sleep(0.2)
            status = await _status(handle)
        reasons = [(r.command, r.reason) for r in status.rejected_commands]
        assert reasons[0][0] == "stpo" and "unknown signal 'stpo'" in reasons[0][1]
        assert all(len(r.reason) < 2_000 and len(str(r.payload)) < 400 for r in status.rejected_commands)
        assert "ttl_s" in reasons[2][1] and "less than or equal" in reasons[2][1]
        assert "checkpoint_timeout_s" in reasons[3][1]
        assert "parallelism" in reasons[4][1] and "m" in reasons[5][1]
        assert status.state == "Running" and status.config.ttl_s is None
        await handle.signal("stop", {"mode": "force"})
        result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.state == "Stopped"
    history = await handle.fetch_history()
    assert not [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]


def test_wait_request_bounds() -> None:
    with pytest.raises(ValueError):
        WaitForStateRequest(states=["Running"], timeout_s=float("inf"))
    assert WaitForStateRequest(states=["Running"], timeout_s=2).timeout_s == 2
    assert datetime.now(UTC)  # the module imports cleanly without a server
