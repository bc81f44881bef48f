"""Exactly-once output across the job's life: stop/resume, rescale, and a runner killed mid-stream.

Each test runs a bounded, rate-limited generator -> filter(keep_even) -> files pipeline on the
session's controller worker, disturbs it while it runs, lets it finish, and then compares the
committed output (files a user would read) with the rows computed independently from the
generator's formula: every expected row exactly once, nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus

from sluice.client import JobClient
from tests.e2e_helpers import (
    assert_exact_output,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    kill_runner,
    manifest_epochs,
    pid_is_runner,
    read_committed_rows,
    read_manifest,
    search_attribute_state,
    sink_path,
    stop_job_quietly,
    wait_closed,
    wait_search_attribute,
    wait_state,
    wait_status,
)

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 90.0


def _transitions(st: Any) -> list[tuple[str, str]]:
    return [(t.from_state, t.to_state) for t in st.transitions]


async def test_stop_with_checkpoint_then_resume_is_exactly_once(
    job_client: JobClient, client: Any, state_dir: Path
) -> None:
    # 4 splits x 2000 rows at 500 rows/s/split: the sources need ~4 s of Running.
    pipeline = generator_pipeline("eo-stop", state_dir / "out", splits=4, limit=2000, rate=500)
    spec = job_spec(pipeline, state_dir, parallelism=2)
    job_id = spec.job_id
    expected = expected_rows(pipeline)
    await job_client.start(spec)
    try:
        await wait_state(job_client, job_id, "Running", timeout_s=START_TIMEOUT_S)
        first = await wait_status(
            job_client, job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint"
        )
        assert first.state == "Running", describe_status(first)

        await job_client.stop(job_id, "checkpoint")
        stopped = await wait_state(job_client, job_id, "Stopped", timeout_s=FINISH_TIMEOUT_S)
        assert stopped.state == "Stopped"
        assert stopped.epoch > first.epoch, "the checkpoint stop must take a final checkpoint"
        assert ("Running", "CheckpointStopping") in _transitions(stopped), describe_status(stopped)
        assert ("CheckpointStopping", "Stopped") in _transitions(stopped), describe_status(stopped)
        assert await search_attribute_state(client, job_id) == "Stopped"

        # The final checkpoint is on disk, marked then-stop, and it is the one status reports.
        epochs = manifest_epochs(state_dir, job_id)
        assert epochs and epochs[-1] == stopped.epoch, f"manifests on disk: {epochs}, status epoch {stopped.epoch}"
        final = read_manifest(state_dir, job_id, stopped.epoch)
        assert final["then_stop"] is True
        assert final["job_id"] == job_id

        # Stopped mid-way: what is committed is a duplicate-free strict subset of the expected rows.
        partial = read_committed_rows(sink_path(pipeline))
        assert len(partial) == len(set(partial)), "duplicates in the output of the stopped job"
        assert set(partial) <= set(expected), "rows that the pipeline cannot produce"
        assert 0 < len(partial) < len(expected), (
            f"expected the stop to land mid-stream: {len(partial)} of {len(expected)} rows committed"
        )

        # Resume: a new run under the same workflow id restores the final checkpoint.
        # The workflow run closes with the job: the Web UI's status agrees with the job's.
        assert await wait_closed(job_client, job_id) == "Stopped"
        desc = await job_client.describe(job_id)
        assert desc.status == WorkflowExecutionStatus.COMPLETED, desc.status
        first_run = desc.run_id
        assert await job_client.restart(job_id) is None
        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert (await job_client.describe(job_id)).run_id != first_run, "restart must start a new run"
        assert done.epoch > stopped.epoch, describe_status(done)
        assert any(
            t.to_state == "Running" and f"restored epoch {stopped.epoch}" in t.reason for t in done.transitions
        ), f"the resumed run did not restore epoch {stopped.epoch}: {describe_status(done)}"
        await wait_search_attribute(client, job_id, "Finished")

        assert_exact_output(read_committed_rows(sink_path(pipeline)), expected)
    finally:
        await stop_job_quietly(job_client, job_id)


async def test_rescale_while_running_is_exactly_once(
    job_client: JobClient, client: Any, state_dir: Path
) -> None:
    # 6 splits so that parallelism 3 and 2 both spread the splits; ~6 s of source time.
    pipeline = generator_pipeline("eo-rescale", state_dir / "out", splits=6, limit=3000, rate=500)
    spec = job_spec(pipeline, state_dir, parallelism=1, slots_per_runner=2)
    job_id = spec.job_id
    expected = expected_rows(pipeline)
    await job_client.start(spec)
    try:
        st = await wait_state(job_client, job_id, "Running", timeout_s=START_TIMEOUT_S)
        assert set(st.parallelism.values()) == {1}, describe_status(st)
        st = await wait_status(job_client, job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint")

        for parallelism in (3, 2):
            before = st
            old_pids = {r.pid for r in before.runners}
            await job_client.rescale(job_id, parallelism=parallelism)
            st = await wait_status(
                job_client,
                job_id,
                lambda s, p=parallelism, g=before.generation: s.state == "Running"
                and s.generation > g
                and set(s.parallelism.values()) == {p},
                timeout_s=START_TIMEOUT_S,
                what=f"Running at parallelism {parallelism}",
            )
            assert st.config.parallelism == parallelism
            assert st.epoch > before.epoch, f"rescale must go through a final checkpoint: {describe_status(st)}"
            assert ("Running", "Rescaling") in _transitions(st), describe_status(st)
            # A new generation of runners, sized for the new parallelism (slots_per_runner=2).
            new_pids = {r.pid for r in st.runners}
            assert new_pids and not (new_pids & old_pids), f"runners not replaced: {old_pids} -> {new_pids}"
            assert len(st.runners) == math.ceil(parallelism / 2), describe_status(st)
            assert {r.generation for r in st.runners} == {st.generation}

        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.restarts == 0, f"a rescale is not a failure: {describe_status(done)}"
        await wait_search_attribute(client, job_id, "Finished")
        assert_exact_output(read_committed_rows(sink_path(pipeline)), expected)
    finally:
        await stop_job_quietly(job_client, job_id)


@pytest.mark.slow
async def test_runner_killed_mid_stream_is_exactly_once(
    job_client: JobClient, client: Any, state_dir: Path
) -> None:
    # Parallelism 2 with one slot per runner: two runner processes; kill one of them.
    pipeline = generator_pipeline("eo-kill", state_dir / "out", splits=4, limit=3000, rate=500)
    spec = job_spec(pipeline, state_dir, parallelism=2, slots_per_runner=1)
    job_id = spec.job_id
    expected = expected_rows(pipeline)
    await job_client.start(spec)
    try:
        await wait_state(job_client, job_id, "Running", timeout_s=START_TIMEOUT_S)
        before = await wait_status(
            job_client, job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint"
        )
        assert before.state == "Running", describe_status(before)
        pids = [r.pid for r in before.runners]
        assert len(pids) == 2 and all(pids), f"expected 2 runner processes: {describe_status(before)}"
        victim, survivor = pids
        assert victim is not None and survivor is not None
        partial_before = len(read_committed_rows(sink_path(pipeline)))
        assert partial_before < len(expected)

        kill_runner(victim, job_id)

        # Recovering (counted as a restart), then Running again with a new generation.
        st = await wait_status(
            job_client,
            job_id,
            lambda s: s.state == "Running" and s.generation > before.generation,
            timeout_s=START_TIMEOUT_S,
            what="Running again after the runner was killed",
        )
        assert st.generation == before.generation + 1, describe_status(st)
        assert st.restarts >= 1, describe_status(st)
        assert ("Running", "Recovering") in _transitions(st), describe_status(st)
        recovering = [t for t in st.transitions if t.to_state == "Recovering"]
        assert recovering and "runner" in recovering[-1].reason.lower(), describe_status(st)
        assert victim not in {r.pid for r in st.runners}
        # The old generation is torn down: its surviving runner does not outlive recovery.
        assert not pid_is_runner(survivor, job_id), f"runner {survivor} of generation {before.generation} still alive"

        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.generation == st.generation, describe_status(done)
        await wait_search_attribute(client, job_id, "Finished")
        assert_exact_output(read_committed_rows(sink_path(pipeline)), expected)
    finally:
        await stop_job_quietly(job_client, job_id)


async def test_restart_right_after_stopped_resumes(job_client: JobClient, state_dir: Path) -> None:
    """What a script does: wait for Stopped, then restart at once; it must start the new run
    (the run may still be closing when Stopped is reported: the client must wait for it, not
    reject the command)."""
    pipeline = generator_pipeline("eo-restart-now", state_dir / "out", splits=2, limit=1000, rate=250)
    spec = job_spec(pipeline, state_dir)
    job_id = spec.job_id
    expected = expected_rows(pipeline)
    await job_client.start(spec)
    try:
        await wait_state(job_client, job_id, "Running", timeout_s=START_TIMEOUT_S)
        await wait_status(job_client, job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint")
        await job_client.stop(job_id, "checkpoint")
        await wait_state(job_client, job_id, "Stopped", timeout_s=FINISH_TIMEOUT_S)
        assert await job_client.restart(job_id) is None  # no wait for the run to close
        await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert_exact_output(read_committed_rows(sink_path(pipeline)), expected)
    finally:
        await stop_job_quietly(job_client, job_id)
