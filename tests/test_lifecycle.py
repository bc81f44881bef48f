"""The job lifecycle end to end: real Temporal dev server, controller worker, runner processes.

Each test drives a job into states of the transition table and checks what a user would see:
the state (query and the JobState search attribute), the transitions recorded in `status`, the
failure message, checkpoints on disk, and that runner processes are gone when the job ended.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from sluice.client import CommandRejected, JobClient, JobClosed, JobFailedError
from sluice.devserver import temporal_binary
from sluice.models import JobConfig, JobResult, JobSpec, JobStatus, PipelineSpec
from sluice.storage import CheckpointStore
from tests.histories.corpus import local_checkpoint_in_flight
from tests.pipeline_functions import FAIL_MARKER_ENV
from tests.processes import pid_exists

pytestmark = pytest.mark.usefixtures("worker")

WAIT_S = 60.0


def _spec(
    state_dir: Path,
    *,
    fn: str = "tests.pipeline_functions:add_one",
    limit: int | None = None,
    rate: float | None = 200.0,
    splits: int = 2,
    parallelism: int = 1,
    **config: Any,
) -> JobSpec:
    job_id = f"life-{uuid.uuid4().hex[:8]}"
    pipeline = PipelineSpec.model_validate(
        {
            "name": "lifecycle",
            "parallelism": parallelism,
            "operators": [
                {"id": "events", "type": "generator", "splits": splits, "limit": limit, "rate": rate},
                {"id": "step", "type": "map", "fn": fn},
                {"id": "out", "type": "files", "path": str(state_dir / "out")},
            ],
        }
    )
    config.setdefault("checkpoint_interval_s", 1.0)
    return JobSpec(
        job_id=job_id,
        pipeline=pipeline,
        config=JobConfig(**config),
        checkpoint_url=str(state_dir / "checkpoints"),
    )


async def _search_state(job_client: JobClient, job_id: str) -> str | None:
    desc = await job_client.client.get_workflow_handle(job_id).describe()
    for key, value in (desc.search_attributes or {}).items():
        if key == "JobState":
            return value[0] if isinstance(value, list) else value
    return None


def _path(status: JobStatus) -> list[str]:
    return [status.transitions[0].from_state] + [t.to_state for t in status.transitions] if status.transitions else []


def _pids_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if pid_exists(p)]


async def _eventually(check, timeout_s: float = WAIT_S, every_s: float = 0.1):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last value {value!r})")
        await asyncio.sleep(every_s)


async def _status_when(job_client: JobClient, job_id: str, pred) -> JobStatus:
    async def check():
        s = await job_client.status(job_id)
        return s if pred(s) else None

    return await _eventually(check)


async def _ended(job_client: JobClient, job_id: str, state: str) -> JobStatus:
    status = await job_client.wait_for_state(job_id, [state], timeout_s=WAIT_S)
    assert status.state == state
    assert await _search_state(job_client, job_id) == state
    return status


# ---------------------------------------------------------------------------- happy paths


async def test_bounded_job_runs_to_finished(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir, limit=300, rate=None, splits=3, parallelism=3)
    await job_client.start(spec)
    running = await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    assert running.generation == 1 and len(running.runners) == 1
    assert running.parallelism == {"events": 3, "step": 3, "out": 3}
    status = await _ended(job_client, spec.job_id, "Finished")
    # A closed run: the client answers from its result and history.
    result = await job_client.client.get_workflow_handle(spec.job_id, result_type=JobResult).result()
    assert result.state == "Finished" and result.epoch >= 1
    rows = [json.loads(line) for f in sorted((state_dir / "out").glob("part-*")) for line in f.read_text().splitlines()]
    assert len(rows) == 900
    assert all(r["value"] >= 1 for r in rows)  # the map ran
    store = CheckpointStore(spec.checkpoint_url, spec.job_id)
    final = store.read_manifest(status.epoch)
    assert final is not None and final.then_stop
    assert not _pids_alive([r.pid for r in running.runners if r.pid])


async def test_query_and_search_attribute_follow_the_table(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    assert await _search_state(job_client, spec.job_id) == "Running"
    listed = {j.job_id for j in await job_client.list(state="Running")}
    assert spec.job_id in listed
    await job_client.stop(spec.job_id, "immediate")
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status)[:4] == ["Created", "Compiling", "Scheduling", "Running"]


# ---------------------------------------------------------------------------- stop modes


@pytest.mark.parametrize(
    "mode,path",
    [
        ("checkpoint", ["Running", "CheckpointStopping", "Stopped"]),
        ("graceful", ["Running", "Stopping", "Stopped"]),
        ("immediate", ["Running", "Stopping", "Stopped"]),
        ("force", ["Running", "Stopping", "Stopped"]),
    ],
)
async def test_stop_modes_from_running(job_client: JobClient, state_dir: Path, mode: str, path: list[str]) -> None:
    spec = _spec(state_dir)
    await job_client.start(spec)
    running = await _status_when(job_client, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 1)
    epoch_before = running.epoch
    await job_client.stop(spec.job_id, mode)
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status)[-3:] == path
    store = CheckpointStore(spec.checkpoint_url, spec.job_id)
    if mode == "checkpoint":
        assert status.epoch > epoch_before
        manifest = store.read_manifest(status.epoch)
        assert manifest is not None and manifest.then_stop
    else:
        assert status.epoch >= epoch_before
        assert status.epoch in store.completed_epochs()
    assert not _pids_alive([r.pid for r in running.runners if r.pid])


async def test_stop_while_scheduling_goes_straight_to_stopping(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runners started from now on take 5 s to open the map operator: the job sits in Scheduling.
    monkeypatch.setenv("SLUICE_TEST_SLOW_OPEN", "5")
    spec = _spec(state_dir, fn="tests.pipeline_functions:add_one")
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Scheduling"], timeout_s=WAIT_S)
    await job_client.stop(spec.job_id, "checkpoint")
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status)[-3:] == ["Scheduling", "Stopping", "Stopped"]
    assert "Running" not in _path(status)


async def test_force_during_final_checkpoint(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each batch takes 1.5 s in the user function, so a barrier waits behind it.
    monkeypatch.setenv("SLUICE_TEST_SLOW_BATCH", "1.5")
    spec = _spec(state_dir, fn="tests.pipeline_functions:slow_batches", rate=50.0, checkpoint_timeout_s=120)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    await job_client.stop(spec.job_id, "checkpoint")
    await job_client.wait_for_state(spec.job_id, ["CheckpointStopping"], timeout_s=WAIT_S)
    await job_client.stop(spec.job_id, "force")
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status)[-3:] == ["CheckpointStopping", "Stopping", "Stopped"]
    assert "force" in status.transitions[-2].reason


async def test_stop_during_periodic_checkpoint_waits_for_it(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_TEST_SLOW_BATCH", "0.5")
    spec = _spec(state_dir, fn="tests.pipeline_functions:slow_batches", rate=50.0)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)

    async def checkpoint_in_flight() -> bool:
        # A periodic checkpoint is a local activity (no pending activity): seen in the history.
        handle = job_client.client.get_workflow_handle(spec.job_id)
        return local_checkpoint_in_flight(await handle.fetch_history())

    await _eventually(checkpoint_in_flight, every_s=0.02)
    await job_client.stop(spec.job_id, "checkpoint")
    status = await _ended(job_client, spec.job_id, "Stopped")
    store = CheckpointStore(spec.checkpoint_url, spec.job_id)
    completed = store.completed_epochs()
    # The periodic checkpoint completed and the final one came after it.
    assert len(completed) >= 2 and completed[-1] == status.epoch
    assert store.read_manifest(status.epoch).then_stop  # type: ignore[union-attr]
    assert not store.read_manifest(completed[-2]).then_stop  # type: ignore[union-attr]


async def test_ttl_expiry_stops_the_job(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir, ttl_s=2.0)
    await job_client.start(spec)
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status)[-3:] == ["Running", "Stopping", "Stopped"]
    assert "TTL" in status.transitions[-2].reason


# ---------------------------------------------------------------------------- restarts and rescales


@pytest.mark.parametrize("force", [False, True])
async def test_restart_requested_while_running(job_client: JobClient, state_dir: Path, force: bool) -> None:
    spec = _spec(state_dir)
    await job_client.start(spec)
    first = await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    await job_client.restart(spec.job_id, force=force)
    status = await _status_when(
        job_client, spec.job_id, lambda s: s.state == "Running" and s.generation == first.generation + 1
    )
    assert _path(status)[-4:] == ["Running", "Restarting", "Scheduling", "Running"]
    assert ("force" if force else "safe") in status.transitions[-3].reason
    assert not _pids_alive([r.pid for r in first.runners if r.pid])
    await job_client.stop(spec.job_id, "immediate")
    await _ended(job_client, spec.job_id, "Stopped")


async def test_rescale_via_final_checkpoint(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir, slots_per_runner=1)
    await job_client.start(spec)
    first = await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    await job_client.rescale(spec.job_id, parallelism=2)
    status = await _status_when(job_client, spec.job_id, lambda s: s.state == "Running" and s.generation == 2)
    assert _path(status)[-4:] == ["Running", "Rescaling", "Scheduling", "Running"]
    assert status.parallelism == {"events": 2, "step": 2, "out": 2}
    assert len(status.runners) == 2
    manifest = CheckpointStore(spec.checkpoint_url, spec.job_id).read_manifest(status.epoch)
    assert manifest is not None and manifest.then_stop and manifest.generation == first.generation
    await job_client.stop(spec.job_id, "immediate")
    await _ended(job_client, spec.job_id, "Stopped")


async def test_restart_budget_exhausted_then_restart_brings_it_back(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = state_dir / "fail-marker"
    marker.write_text("always")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    spec = _spec(state_dir, fn="tests.pipeline_functions:fails_while_marker", allowed_restarts=2)
    await job_client.start(spec)
    with pytest.raises(JobFailedError) as failed:
        await job_client.wait_for_state(spec.job_id, ["Stopped"], timeout_s=WAIT_S)
    assert "failing while" in str(failed.value)
    status = await job_client.status(spec.job_id)
    assert status.state == "Failed"
    assert await _search_state(job_client, spec.job_id) == "Failed"
    assert status.failure is not None and status.failure.domain == "user"
    assert "exhausted 2 allowed restarts" in status.failure.message
    assert "failing while" in status.failure.message
    # The user fixes the problem and restarts the failed job: a new run, Running again.
    marker.unlink()
    await job_client.restart(spec.job_id)
    running = await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    assert running.restarts == 0 and running.failure is None
    await job_client.stop(spec.job_id, "immediate")
    await _ended(job_client, spec.job_id, "Stopped")


async def test_recovery_then_healthy_duration_resets_restarts(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = state_dir / "fail-once"
    marker.write_text("once")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    spec = _spec(state_dir, fn="tests.pipeline_functions:fails_while_marker", healthy_duration_s=1.0)
    await job_client.start(spec)
    recovered = await _status_when(
        job_client, spec.job_id, lambda s: s.state == "Running" and s.generation >= 2
    )
    path = _path(recovered)
    assert "Recovering" in path
    i = path.index("Recovering")
    assert path[i - 1 : i + 4] == ["Running", "Recovering", "Compiling", "Scheduling", "Running"]
    # The failure counted as restart 1 (the count may already be back to 0: healthy after 1 s).
    assert recovered.transitions[i].reason.startswith("restart 1 ")
    healthy = await _status_when(job_client, spec.job_id, lambda s: s.restarts == 0)
    assert healthy.state == "Running"
    await job_client.stop(spec.job_id, "force")
    await _ended(job_client, spec.job_id, "Stopped")


async def test_startup_failure_recovers_then_fails(job_client: JobClient, state_dir: Path) -> None:
    # No runner starts within 1 ms: Scheduling fails, Recovering retries, the budget (0) runs out.
    spec = _spec(state_dir, runner_startup_timeout_s=0.001, allowed_restarts=0)
    await job_client.start(spec)
    with pytest.raises(JobFailedError):
        await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    status = await job_client.status(spec.job_id)
    assert _path(status)[-4:] == ["Scheduling", "Recovering", "Failing", "Failed"]
    assert status.failure is not None and "did not start" in status.failure.message


async def test_stop_while_recovering(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = state_dir / "fail-marker"
    marker.write_text("always")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    spec = _spec(state_dir, fn="tests.pipeline_functions:fails_while_marker", allowed_restarts=50)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Recovering"], timeout_s=WAIT_S)
    await job_client.stop(spec.job_id, "checkpoint")
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert "Recovering" in _path(status)
    assert status.failure is None


# ---------------------------------------------------------------------------- bad input


async def test_function_that_cannot_be_imported_fails_with_user_domain(
    job_client: JobClient, state_dir: Path
) -> None:
    spec = _spec(state_dir, fn="tests.pipeline_functions:no_such_function")
    await job_client.start(spec)
    with pytest.raises(JobFailedError) as failed:
        await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    assert "no_such_function" in str(failed.value)
    status = await job_client.status(spec.job_id)
    assert _path(status) == ["Created", "Compiling", "Failing", "Failed"]
    assert status.failure is not None and status.failure.domain == "user"
    assert "step" in status.failure.message  # names the operator


async def test_malformed_signals_are_rejected_not_fatal(
    job_client: JobClient, state_dir: Path, temporal_address: str
) -> None:
    spec = _spec(state_dir)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    temporal = str(temporal_binary())
    bad = [
        ("stop", '"checkpoint"'),  # not an object
        ("stop", '{"mode": "sideways"}'),  # unknown mode
        ("rescale", '{"parallelism": 0}'),
        ("rescale", '{"overrides": {"nope": 2}}'),
        ("rescale", '{}'),  # neither parallelism nor overrides
        ("update_config", '{"checkpoint_interval_s": "soon"}'),
    ]
    for name, payload in bad:
        subprocess.run(
            [temporal, "workflow", "signal", "--address", temporal_address, "--workflow-id", spec.job_id,
             "--name", name, "--input", payload],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    status = await _status_when(job_client, spec.job_id, lambda s: len(s.rejected_commands) >= len(bad))
    assert status.state == "Running" and status.generation == 1
    reasons = [r.reason for r in status.rejected_commands]
    assert "one JSON object" in reasons[0]
    assert "mode" in reasons[1]
    assert "parallelism" in reasons[2]
    assert "'nope'" in reasons[3]
    assert "needs 'parallelism' or 'overrides'" in reasons[4]
    assert "checkpoint_interval_s" in reasons[5]
    # A good signal after the bad ones still works.
    subprocess.run(
        [temporal, "workflow", "signal", "--address", temporal_address, "--workflow-id", spec.job_id,
         "--name", "stop", "--input", '{"mode": "immediate"}'],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    await _ended(job_client, spec.job_id, "Stopped")


async def test_invalid_patch_is_rejected_by_its_validator(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    with pytest.raises(CommandRejected, match="unknown operator.*'ghost'"):
        await job_client.rescale(spec.job_id, overrides={"ghost": 2})
    with pytest.raises(ValueError, match="unknown stop mode"):
        await job_client.stop(spec.job_id, "sideways")
    await job_client.stop(spec.job_id, "checkpoint")
    await job_client.wait_for_state(spec.job_id, ["CheckpointStopping", "Stopped"], timeout_s=WAIT_S)
    status = await _ended(job_client, spec.job_id, "Stopped")
    # Rejected updates never enter history as accepted: the job's config is untouched.
    assert status.config.overrides == {}


async def test_stop_sent_to_a_finished_job(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir, limit=50, rate=None)
    await job_client.start(spec)
    await _ended(job_client, spec.job_id, "Finished")
    with pytest.raises(JobClosed, match="already Finished"):
        await job_client.stop(spec.job_id, "checkpoint")


async def test_a_wait_that_timed_out_never_wedges_the_job(
    job_client: JobClient, state_dir: Path, temporal_address: str
) -> None:
    """Issue: `sluice wait --state Finished --timeout 3` gave up, then a checkpoint stop left the
    job Stopped but never closed, and every later stop/restart looped for ever in the client."""
    from tests.conftest import cli_env, sluice_command

    spec = _spec(state_dir)
    await job_client.start(spec)
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    env = cli_env(temporal_address, state_dir)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(sluice_command(*args), env=env, capture_output=True, text=True, timeout=WAIT_S)

    waited = await asyncio.to_thread(cli, "wait", spec.job_id, "--state", "Finished", "--timeout", "3")
    assert waited.returncode == 124, waited.stderr
    assert (await asyncio.to_thread(cli, "stop", spec.job_id, "--mode", "checkpoint")).returncode == 0
    stopped = await asyncio.to_thread(cli, "wait", spec.job_id, "--state", "Stopped", "--timeout", "60")
    assert stopped.returncode == 0, stopped.stderr
    handle = job_client.client.get_workflow_handle(spec.job_id)
    result = await asyncio.wait_for(handle.result(), timeout=WAIT_S)  # the run closed
    assert JobResult.model_validate(result).state == "Stopped"
    # Resuming and stopping again work and return.
    assert (await asyncio.to_thread(cli, "stop", spec.job_id, "--mode", "none")).returncode == 0
    await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    assert (await asyncio.to_thread(cli, "stop", spec.job_id, "--mode", "immediate")).returncode == 0
    await _ended(job_client, spec.job_id, "Stopped")
