"""A files sink path belongs to one job, and committed output is never replaced.

End to end on the session's dev server and controller worker, with real runners and real files:
a second job on a path another job owns fails at Compiling (domain `user`, naming the path and the
owner) without touching the owner's output; a job restarted with `ignore_state` on its own path
(also after its checkpoints were deleted, so its epochs start again at 1) adds new files and leaves
every file of its earlier run byte for byte as it was; a job whose path was taken from it while it
runs stops publishing there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sluice.client import JobClient, JobFailedError
from sluice.connectors.sink_owner import OWNER_MARKER
from tests.e2e_helpers import (
    ADD_ONE,
    KEEP_EVEN,
    assert_exact_output,
    checkpoint_root,
    committed_files,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    read_committed_rows,
    stop_job_quietly,
    wait_closed,
    wait_state,
    wait_status,
)

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
FAIL_TIMEOUT_S = 60.0


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every committed file under `path`, by path relative to it."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in committed_files(path)}


async def test_second_job_on_an_owned_path_fails_at_compiling(job_client: JobClient, state_dir: Path) -> None:
    out = state_dir / "out"
    # A: rate-limited (~4 s of Running), so B arrives while A is committing.
    pipe_a = generator_pipeline("own-a", out, splits=2, limit=2000, rate=500)
    spec_a = job_spec(pipe_a, state_dir)
    # B: other rows (map add_one, no filter), so any file of B's would differ from A's.
    pipe_b = generator_pipeline("own-b", out, splits=2, limit=300, transforms=(("map", ADD_ONE),))
    spec_b = job_spec(pipe_b, state_dir)
    await job_client.start(spec_a)
    try:
        await wait_status(job_client, spec_a.job_id, lambda s: s.epoch >= 1 and s.state == "Running",
                          timeout_s=START_TIMEOUT_S, what="A running with a checkpoint")
        before = file_hashes(out)
        assert before, "A committed nothing before B started"

        await job_client.start(spec_b)
        with pytest.raises(JobFailedError):
            await job_client.wait_for_state(spec_b.job_id, ["Running", "Finished"], timeout_s=FAIL_TIMEOUT_S)
        failed = await job_client.status(spec_b.job_id)
        assert failed.state == "Failed", describe_status(failed)
        assert [t.to_state for t in failed.transitions] == ["Compiling", "Failing", "Failed"], describe_status(failed)
        assert failed.generation == 0 and failed.runners == []
        assert failed.failure is not None and failed.failure.domain == "user", describe_status(failed)
        message = failed.failure.message
        assert str(out) in message and spec_a.job_id in message, message

        done = await wait_state(job_client, spec_a.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.failure is None, describe_status(done)
        after = file_hashes(out)
        changed = {name for name, digest in before.items() if after.get(name) != digest}
        assert not changed, f"A's committed files changed or vanished: {sorted(changed)}"
        # A's output is exactly A's rows: nothing of B's, nothing lost.
        assert_exact_output(read_committed_rows(out), expected_rows(pipe_a))
    finally:
        await stop_job_quietly(job_client, spec_a.job_id)
        await stop_job_quietly(job_client, spec_b.job_id)


async def test_bounded_second_job_right_after_the_first_changes_nothing(job_client: JobClient, state_dir: Path) -> None:
    """Both bounded, B started a moment after A: B fails, A's rows are all there, once."""
    out = state_dir / "out"
    pipe_a = generator_pipeline("own-c", out, splits=2, limit=1500, rate=750)
    pipe_b = generator_pipeline("own-d", out, splits=2, limit=300, transforms=(("map", ADD_ONE),))
    spec_a, spec_b = job_spec(pipe_a, state_dir), job_spec(pipe_b, state_dir)
    await job_client.start(spec_a)
    try:
        await wait_state(job_client, spec_a.job_id, "Running", timeout_s=START_TIMEOUT_S)
        await job_client.start(spec_b)
        with pytest.raises(JobFailedError):
            await job_client.wait_for_state(spec_b.job_id, ["Finished"], timeout_s=FAIL_TIMEOUT_S)
        done = await wait_state(job_client, spec_a.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.failure is None, describe_status(done)
        final = file_hashes(out)
        await wait_closed(job_client, spec_b.job_id)
        assert file_hashes(out) == final
        assert_exact_output(read_committed_rows(out), expected_rows(pipe_a))
    finally:
        await stop_job_quietly(job_client, spec_a.job_id)
        await stop_job_quietly(job_client, spec_b.job_id)


@pytest.mark.parametrize("forget_checkpoints", [False, True], ids=["keep-checkpoints", "checkpoints-deleted"])
async def test_restart_with_ignore_state_never_replaces_committed_files(
    job_client: JobClient, state_dir: Path, forget_checkpoints: bool
) -> None:
    out = state_dir / "out"
    pipeline = generator_pipeline("own-rerun", out, splits=2, limit=1200, rate=600,
                                  transforms=(("filter", KEEP_EVEN),))
    spec = job_spec(pipeline, state_dir)
    job_id = spec.job_id
    expected = expected_rows(pipeline)
    await job_client.start(spec)
    try:
        first = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert first.failure is None, describe_status(first)
        await wait_closed(job_client, job_id)
        before = file_hashes(out)
        assert_exact_output(read_committed_rows(out), expected)
        if forget_checkpoints:
            # Starting over from nothing: without checkpoints the new run's epochs start at 1 again.
            shutil.rmtree(checkpoint_root(state_dir) / job_id)

        await job_client.restart(job_id, ignore_state=True)
        # restart() returned after the new run started: status now reads that run.
        second = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert second.failure is None, describe_status(second)
        await wait_closed(job_client, job_id)

        after = file_hashes(out)
        changed = {name for name, digest in before.items() if after.get(name) != digest}
        assert not changed, f"committed files of the first run changed or vanished: {sorted(changed)}"
        new = {name: digest for name, digest in after.items() if name not in before}
        assert new, "the second run committed no new file"
        # The second run's rows are all there (once more): every expected row exactly twice.
        assert_exact_output(read_committed_rows(out), sorted(expected * 2))
    finally:
        await stop_job_quietly(job_client, job_id)


async def test_owner_that_lost_its_path_stops_publishing_there(job_client: JobClient, state_dir: Path) -> None:
    """The marker is replaced under a running job (a user released the path and another job took
    it): the owner's next commit is refused, the job fails (domain `user`, naming the new owner),
    and not one committed file changes."""
    out = state_dir / "out"
    pipeline = generator_pipeline("own-lost", out, splits=2, limit=20000, rate=500)
    spec = job_spec(pipeline, state_dir)
    await job_client.start(spec)
    try:
        await wait_status(job_client, spec.job_id, lambda s: s.epoch >= 1 and s.state == "Running",
                          timeout_s=START_TIMEOUT_S, what="running with a checkpoint")
        marker = out / OWNER_MARKER
        tmp = out / "_taken.tmp"
        tmp.write_text(json.dumps({"job_id": "someone-else", "claimed_at": "2026-01-01T00:00:00+00:00"}) + "\n")
        tmp.replace(marker)
        before = file_hashes(out)

        with pytest.raises(JobFailedError):
            await job_client.wait_for_state(spec.job_id, ["Finished"], timeout_s=FAIL_TIMEOUT_S)
        failed = await job_client.status(spec.job_id)
        assert failed.failure is not None and failed.failure.domain == "user", describe_status(failed)
        assert "'someone-else'" in failed.failure.message and str(out) in failed.failure.message
        await wait_closed(job_client, spec.job_id)
        assert file_hashes(out) == before
    finally:
        await stop_job_quietly(job_client, spec.job_id)


async def test_two_jobs_started_together_on_one_path_one_runs(job_client: JobClient, state_dir: Path) -> None:
    """Started at the same moment: exactly one owns the path and finishes with its rows; the other
    fails at Compiling naming the winner."""
    out = state_dir / "out"
    pipes = [generator_pipeline(f"own-race{i}", out, splits=2, limit=400, transforms=t)
             for i, t in enumerate([(("filter", KEEP_EVEN),), (("map", ADD_ONE),)])]
    specs = [job_spec(p, state_dir) for p in pipes]
    await asyncio.gather(*(job_client.start(s) for s in specs))
    try:
        ends = await asyncio.gather(
            *(job_client.wait_for_state(s.job_id, ["Finished", "Failed"], timeout_s=FINISH_TIMEOUT_S) for s in specs),
            return_exceptions=True,
        )
        finals = [await job_client.status(s.job_id) for s in specs]
        assert sorted(f.state for f in finals) == ["Failed", "Finished"], [describe_status(f) for f in finals] + [ends]
        winner = 0 if finals[0].state == "Finished" else 1
        loser = finals[1 - winner]
        assert loser.failure is not None and loser.failure.domain == "user", describe_status(loser)
        assert [t.to_state for t in loser.transitions] == ["Compiling", "Failing", "Failed"], describe_status(loser)
        assert specs[winner].job_id in loser.failure.message
        assert_exact_output(read_committed_rows(out), expected_rows(pipes[winner]))
    finally:
        for s in specs:
            await stop_job_quietly(job_client, s.job_id)
