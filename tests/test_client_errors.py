"""JobClient's error contract: unknown jobs, duplicate starts, closed jobs, timeouts, failures.

Tests marked "idle queue" run the workflow on a task queue no worker polls, so the job stays open
in Created and nothing else in the session can act on it; they test the client alone. The others
run the real JobWorkflow through the session's controller worker.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sluice.client import (
    JobAlreadyRunning,
    JobClient,
    JobClosed,
    JobFailedError,
    JobNotFound,
    SluiceClientError,
)
from sluice.models import JobConfig, JobSpec, PipelineSpec

JOB_TIMEOUT_S = 120.0
IDLE_COMMAND_TIMEOUT_S = 1.0


def unique(prefix: str) -> str:
    return f"{prefix}-{time.time_ns()}"


def pipeline(
    name: str, out: Path, *, fn: str = "examples.clicks:is_big", limit: int | None = 200, rate: float | None = None
) -> PipelineSpec:
    gen: dict[str, Any] = {"id": "events", "type": "generator", "splits": 2, "keys": 10, "batch_size": 50}
    if limit is not None:
        gen["limit"] = limit
    if rate is not None:
        gen["rate"] = rate
    return PipelineSpec.model_validate(
        {
            "name": name,
            "operators": [
                gen,
                {"id": "big", "type": "filter", "fn": fn},
                {"id": "out", "type": "files", "path": str(out)},
            ],
        }
    )


def spec_for(job_id: str, tmp: Path, **kwargs: Any) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        pipeline=pipeline("errs", tmp / "out", **kwargs),
        config=JobConfig(checkpoint_interval_s=1.0),
        checkpoint_url=str(tmp / "checkpoints"),
    )


@pytest.fixture
def idle_jobs(client: Any) -> JobClient:
    """A JobClient whose workflows go to a task queue nobody polls (they stay in Created)."""
    return JobClient(client, task_queue=unique("sluice-idle"), command_timeout_s=IDLE_COMMAND_TIMEOUT_S)


# ------------------------------------------------------------------------------ client alone


async def test_unknown_job_is_not_found(job_client: JobClient) -> None:
    job_id = unique("nobody")
    with pytest.raises(JobNotFound, match=f"job {job_id} not found"):
        await job_client.status(job_id)
    with pytest.raises(JobNotFound):
        await job_client.stop(job_id, "checkpoint")
    with pytest.raises(JobNotFound):
        await job_client.wait_for_state(job_id, ["Running"], timeout_s=5)
    with pytest.raises(JobNotFound):
        await job_client.restart(job_id)


async def test_unknown_stop_mode_is_rejected_before_any_call(job_client: JobClient) -> None:
    with pytest.raises(ValueError, match="unknown stop mode 'gentle'"):
        await job_client.stop("whatever", "gentle")


async def test_rescale_needs_a_target(job_client: JobClient) -> None:
    with pytest.raises(ValueError):
        await job_client.rescale("whatever")


async def test_idle_queue_duplicate_timeout_and_closed(idle_jobs: JobClient, tmp_path: Path) -> None:
    job_id = unique("idle")
    spec = spec_for(job_id, tmp_path)
    assert await idle_jobs.start(spec) == job_id
    with pytest.raises(JobAlreadyRunning, match=f"job {job_id} is already running"):
        await idle_jobs.start(spec)

    with pytest.raises(TimeoutError, match="did not reach Running"):
        await idle_jobs.wait_for_state(job_id, ["Running"], timeout_s=0.5)
    with pytest.raises(SluiceClientError, match="no controller worker accepted"):
        await idle_jobs.stop(job_id, "checkpoint")

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # visibility is eventually consistent
        rows = await idle_jobs.list(state="Created")
        if any(r.job_id == job_id for r in rows):
            break
    assert (job_id, "Created", "errs", True) in [(r.job_id, r.state, r.pipeline_name, r.open) for r in rows]

    # Closed from outside: commands say so; restart starts a new run from the same spec.
    first = await idle_jobs.describe(job_id)
    await idle_jobs.client.get_workflow_handle(job_id).terminate("test")
    with pytest.raises(JobClosed, match=f"job {job_id} is already Terminated; nothing to stop") as info:
        await idle_jobs.stop(job_id, "checkpoint")
    assert info.value.state == "Terminated"
    with pytest.raises(JobClosed, match="nothing to rescale"):
        await idle_jobs.rescale(job_id, parallelism=2)
    with pytest.raises(JobClosed):
        await idle_jobs.wait_for_state(job_id, ["Running"], timeout_s=5)

    assert await idle_jobs.restart(job_id) is None
    second = await idle_jobs.describe(job_id)
    assert second.run_id != first.run_id
    assert await idle_jobs.final_state(job_id, second) is None
    new_input = await idle_jobs._job_input(job_id, second.run_id)
    assert new_input.spec.pipeline == spec.pipeline
    assert new_input.spec.config.stop == "none" and new_input.spec.config.ignore_state is False
    await idle_jobs.client.get_workflow_handle(job_id).terminate("test done")


# ------------------------------------------------------------------------------ real workflow


async def test_failed_job_raises_job_failed(job_client: JobClient, worker: Any, tmp_path: Path) -> None:
    job_id = unique("bad-fn")
    await job_client.start(spec_for(job_id, tmp_path, fn="sluice_no_such_module:nothing"))
    with pytest.raises(JobFailedError) as info:
        await job_client.wait_for_state(job_id, ["Running"], timeout_s=JOB_TIMEOUT_S)
    assert info.value.failure.domain == "user"
    assert "sluice_no_such_module" in str(info.value)

    status = await job_client.wait_for_state(job_id, ["Failed"], timeout_s=JOB_TIMEOUT_S)
    assert status.state == "Failed"
    with pytest.raises(JobClosed, match=f"job {job_id} is already Failed; nothing to stop"):
        await job_client.stop(job_id, "checkpoint")


async def test_finished_job_is_closed(job_client: JobClient, worker: Any, tmp_path: Path) -> None:
    job_id = unique("finite")
    await job_client.start(spec_for(job_id, tmp_path, limit=100))
    status = await job_client.wait_for_state(job_id, ["Finished"], timeout_s=JOB_TIMEOUT_S)
    assert status.state == "Finished"
    with pytest.raises(JobClosed, match=f"job {job_id} is already Finished; nothing to stop"):
        await job_client.stop(job_id, "checkpoint")
    with pytest.raises(JobClosed, match="nothing to resume"):
        await job_client.restart(job_id)


async def test_stop_and_resume_a_stopped_job(job_client: JobClient, worker: Any, tmp_path: Path) -> None:
    job_id = unique("resume")
    await job_client.start(spec_for(job_id, tmp_path, limit=None, rate=20))
    await job_client.wait_for_state(job_id, ["Running"], timeout_s=JOB_TIMEOUT_S)
    assert (await job_client.status(job_id)).state == "Running"
    assert job_id in [r.job_id for r in await job_client.list()]

    await job_client.stop(job_id, "checkpoint")
    stopped = await job_client.wait_for_state(job_id, ["Stopped"], timeout_s=JOB_TIMEOUT_S)
    assert stopped.state == "Stopped" and stopped.epoch >= 1
    with pytest.raises(JobClosed, match="already Stopped; nothing to stop"):
        await job_client.stop(job_id, "immediate")

    # `stop: none` on a Stopped job starts a new run that restores the last checkpoint.
    assert await job_client.stop(job_id, "none") is None
    await job_client.wait_for_state(job_id, ["Running"], timeout_s=JOB_TIMEOUT_S)
    await job_client.stop(job_id, "force")
    final = await job_client.wait_for_state(job_id, ["Stopped"], timeout_s=JOB_TIMEOUT_S)
    assert final.state == "Stopped"


async def test_ensure_search_attributes_registers_missing_ones() -> None:
    """On a server started without them (like a fresh cluster), both are added once."""
    import asyncio
    import subprocess

    from sluice.client import ServerUnavailable, connect
    from sluice.devserver import ensure_search_attributes, free_port, temporal_binary

    port = free_port()
    proc = subprocess.Popen(
        [str(temporal_binary()), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port), "--headless"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                raw = await connect(f"127.0.0.1:{port}")
                break
            except ServerUnavailable:
                await asyncio.sleep(0.1)
        assert await ensure_search_attributes(raw) == ["JobState", "PipelineName"]
        assert await ensure_search_attributes(raw) == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
