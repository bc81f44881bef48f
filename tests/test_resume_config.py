"""A rescale persists: the parallelism last set on a job survives stop and resume (`sluice start
FILE` on a Stopped job, `sluice restart`, `stop none`), and a pipeline file started for an existing
job says what it changes: a changed pipeline is refused (naming the operator), a parallelism-only
difference resumes with the job's parallelism unless `--parallelism-from-file`.

The comparison itself is checked on pipeline specs; the end-to-end test drives the real `sluice`
CLI in subprocesses against the session's dev server and in-process controller worker.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluice.job_changes import compare
from sluice.models import JobConfig, JobStatus, PipelineSpec
from tests.conftest import cli_env
from tests.e2e_helpers import stop_job_quietly, unique_job_id, wait_state, wait_until
from tests.test_cli import run_cli, write

STATE_TIMEOUT_S = 90.0  # compile, schedule and start runners on a loaded 2-core machine

PIPELINE = """\
name: resumed
operators:
  - {id: events, type: generator, rate: 50, keys: 10}
  - {id: big, type: filter, fn: "examples.clicks:is_big"}
  - {id: out, type: files, path: OUT}
"""


def _pipeline(text: str) -> PipelineSpec:
    import yaml

    return PipelineSpec.model_validate(yaml.safe_load(text.replace("OUT", "/tmp/never-written")))


# ------------------------------------------------------------------------------ the comparison


def test_a_changed_operator_is_named_with_its_fields() -> None:
    job = _pipeline(PIPELINE)
    file = _pipeline(PIPELINE.replace("examples.clicks:is_big", "examples.clicks:other"))
    changes = compare(job, JobConfig(), file, JobConfig())
    assert changes.pipeline == ["operator 'big' changed (fn)"]
    assert changes.parallelism == {}


def test_added_removed_and_rewired_operators() -> None:
    job = _pipeline(PIPELINE)
    text = PIPELINE.replace(
        '  - {id: big, type: filter, fn: "examples.clicks:is_big"}\n',
        '  - {id: keyed, type: key_by, key: [key]}\n',
    )
    changes = compare(job, JobConfig(), _pipeline(text), JobConfig())
    assert changes.pipeline == ["operator 'big' removed", "operator 'keyed' added", "operator 'out' changed (inputs)"]


def test_parallelism_alone_is_not_a_pipeline_change() -> None:
    job = _pipeline(PIPELINE)
    file = _pipeline(PIPELINE.replace("name: resumed", "name: resumed\nparallelism: 3"))
    changes = compare(job, JobConfig(parallelism=2, overrides={"out": 1}), file, JobConfig())
    assert changes.pipeline == []
    assert changes.parallelism == {"events": (2, 3), "big": (2, 3), "out": (1, 3)}
    assert changes.parallelism_text() == "events=2 (file: 3), big=2 (file: 3), out=1 (file: 3)"


# ------------------------------------------------------------------------------ end to end


async def _running_with(job_client: Any, job_id: str, parallelism: int) -> JobStatus:
    """Wait until the job is Running with every operator at `parallelism`; its status."""

    async def check() -> JobStatus | None:
        st: JobStatus = await job_client.status(job_id)
        ok = st.state == "Running" and set(st.parallelism.values()) == {parallelism}
        return st if ok else None

    async def last() -> Any:
        return await job_client.status(job_id)

    result: JobStatus = await wait_until(
        check, timeout_s=STATE_TIMEOUT_S, what=f"{job_id} Running at parallelism {parallelism}", last=last
    )
    return result


def _cli(temporal_address: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`sluice ARGS` in a subprocess against the session's server (call it through asyncio.to_thread:
    the session's worker runs in this event loop)."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=cli_env(temporal_address, tmp_path / "state"))

    return cli


async def _stop(job_client: Any, job_id: str) -> None:
    await job_client.stop(job_id, "checkpoint")
    await wait_state(job_client, job_id, "Stopped", timeout_s=STATE_TIMEOUT_S)


@pytest.mark.usefixtures("worker")
async def test_rescale_survives_stop_and_resume_and_a_changed_file_is_refused(
    temporal_address: str, job_client: Any, tmp_path: Path
) -> None:
    cli = _cli(temporal_address, tmp_path)
    # The sink under tmp_path: a relative path would resolve against the worker's directory.
    text = PIPELINE.replace("OUT", str(tmp_path / "out"))
    file = write(tmp_path, "resumed.yaml", text)
    job_id = unique_job_id("resume-config")
    try:
        started = await asyncio.to_thread(cli, "start", str(file), "--job-id", job_id, "--checkpoint-interval", "2",
                                          "--wait")  # fmt: skip
        assert started.returncode == 0, started.stderr
        await _running_with(job_client, job_id, 1)
        rescaled = await asyncio.to_thread(cli, "rescale", job_id, "--parallelism", "2")
        assert rescaled.returncode == 0, rescaled.stderr
        await _running_with(job_client, job_id, 2)

        # Stop, then start the same file again: the job resumes at the parallelism last set.
        await _stop(job_client, job_id)
        resumed = await asyncio.to_thread(cli, "start", str(file), "--job-id", job_id, "--wait")
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.splitlines()[0] == job_id  # stdout stays the id: scripts read it
        assert f"job {job_id} was Stopped: started a new run from its last checkpoint" in resumed.stderr
        assert "parallelism as last set on the job" in resumed.stderr, resumed.stderr
        assert "events=2 (file: 1)" in resumed.stderr, resumed.stderr
        st = await _running_with(job_client, job_id, 2)
        assert st.config.parallelism == 2
        assert st.config.checkpoint_interval_s == 2.0  # the rest of the last config came along too

        # `sluice restart` of a Stopped job, and `stop none`: a new run, still at 2.
        await _stop(job_client, job_id)
        restarted = await asyncio.to_thread(cli, "restart", job_id)
        assert restarted.returncode == 0, restarted.stderr
        await _running_with(job_client, job_id, 2)
        await _stop(job_client, job_id)
        assert await job_client.stop(job_id, "none") is None  # a closed job: a new run was started
        await _running_with(job_client, job_id, 2)

        # A file with another pipeline is refused, naming what changed; the job stays Stopped.
        await _stop(job_client, job_id)
        changed = write(tmp_path, "changed.yaml", text.replace("keys: 10", "keys: 20"))
        refused = await asyncio.to_thread(cli, "start", str(changed), "--job-id", job_id)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.count("\n") == 1, refused.stderr  # one line
        assert "operator 'events' changed (keys)" in refused.stderr, refused.stderr
        assert f"sluice upgrade {job_id} {changed}" in refused.stderr, refused.stderr
        assert await job_client.final_state(job_id) == "Stopped"

        # --parallelism-from-file takes the file's parallelism back.
        from_file = await asyncio.to_thread(cli, "start", str(file), "--job-id", job_id, "--parallelism-from-file",
                                            "--wait")  # fmt: skip
        assert from_file.returncode == 0, from_file.stderr
        assert "parallelism from " in from_file.stderr and "events=1 (job had 2)" in from_file.stderr
        st = await _running_with(job_client, job_id, 1)
        assert st.config.parallelism is None

        # From scratch (--ignore-state) nothing is restored: the changed pipeline is taken whole.
        await _stop(job_client, job_id)
        fresh = await asyncio.to_thread(cli, "start", str(changed), "--job-id", job_id, "--ignore-state", "--wait")
        assert fresh.returncode == 0, fresh.stderr
        assert "started a new run from the beginning" in fresh.stderr
        assert "the pipeline changed (operator 'events' changed (keys))" in fresh.stderr, fresh.stderr
        await _running_with(job_client, job_id, 1)
        job, _ = await job_client.job_spec_as_last_set(job_id, (await job_client.describe(job_id)).run_id)
        assert job.pipeline.operators[0].keys == 20
    finally:
        await stop_job_quietly(job_client, job_id)


@pytest.mark.usefixtures("worker")
async def test_a_file_started_for_a_job_whose_input_was_malformed_starts_as_it_is(
    temporal_address: str, job_client: Any, tmp_path: Path
) -> None:
    from sluice.models import TASK_QUEUE, WORKFLOW_TYPE

    cli = _cli(temporal_address, tmp_path)
    # Started past the client (as `temporal workflow start` can): the job fails with "invalid job input".
    job_id = unique_job_id("resume-malformed")
    await job_client.client.start_workflow(
        WORKFLOW_TYPE, {"spec": {"job_id": job_id}}, id=job_id, task_queue=TASK_QUEUE
    )
    await wait_state(job_client, job_id, "Failed", timeout_s=STATE_TIMEOUT_S)
    text = PIPELINE.replace("OUT", str(tmp_path / "out")).replace("rate: 50", "limit: 10")
    file = write(tmp_path, "bounded.yaml", text)
    try:
        started = await asyncio.to_thread(cli, "start", str(file), "--job-id", job_id, "--wait")
        assert started.returncode == 0, started.stderr
        assert f"job {job_id} was Failed: started a new run" in started.stderr
        assert "has no readable spec (ValidationError)" in started.stderr, started.stderr
        await wait_state(job_client, job_id, "Finished", timeout_s=STATE_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, job_id)


@pytest.mark.usefixtures("worker")
async def test_an_upgraded_job_resumes_with_its_new_pipeline(
    temporal_address: str, job_client: Any, tmp_path: Path
) -> None:
    cli = _cli(temporal_address, tmp_path)
    text = PIPELINE.replace("OUT", str(tmp_path / "out"))
    old = write(tmp_path, "old.yaml", text)
    new = write(tmp_path, "new.yaml", text.replace('fn: "examples.clicks:is_big"', 'expr: "value >= 500"'))
    job_id = unique_job_id("resume-upgraded")
    try:
        started = await asyncio.to_thread(cli, "start", str(old), "--job-id", job_id, "--wait")
        assert started.returncode == 0, started.stderr
        upgraded = await asyncio.to_thread(cli, "upgrade", job_id, str(new), "--health-window", "1", "--wait")
        assert upgraded.returncode == 0, upgraded.stderr
        await _stop(job_client, job_id)

        # A restart's new run runs the upgraded pipeline, not the one the last run started with.
        restarted = await asyncio.to_thread(cli, "restart", job_id)
        assert restarted.returncode == 0, restarted.stderr
        await _running_with(job_client, job_id, 1)
        big = next(op for op in (await job_client.spec(job_id)).pipeline.operators if op.id == "big")
        assert big.expr == "value >= 500" and big.fn is None
        await _stop(job_client, job_id)

        # So the old file is now the different one; the new file resumes the job.
        refused = await asyncio.to_thread(cli, "start", str(old), "--job-id", job_id)
        assert refused.returncode == 1 and "operator 'big' changed (expr, fn)" in refused.stderr, refused.stderr
        resumed = await asyncio.to_thread(cli, "start", str(new), "--job-id", job_id, "--wait")
        assert resumed.returncode == 0, resumed.stderr
        assert "note:" not in resumed.stderr, resumed.stderr
    finally:
        await stop_job_quietly(job_client, job_id)
