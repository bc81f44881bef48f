"""A corrupt newest checkpoint, end to end (real dev server, controller worker, runner processes,
files on disk): the restart fails fast with an error naming the epoch and the file, instead of
restoring the same checkpoint over and over, and an explicit restore of an older epoch finishes
the job with no row lost (rows committed after that epoch are written again, as documented).

Each test runs a bounded, rate-limited generator -> filter -> files job, stops it with a final
checkpoint, damages the newest checkpoint the way a crash of the storage layer would, and
restarts it: once through `JobClient` (a truncated state file), once through the `sluice` command
(a truncated manifest); and a manifest from before digests still restores.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType

from sluice.client import CommandRejected, JobClient
from sluice.storage import CheckpointStore
from sluice.workflows.constants import CORRUPT_CHECKPOINT_TYPE
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.e2e_helpers import (
    Row,
    checkpoint_root,
    committed_files,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    manifest_epochs,
    read_committed_rows,
    sink_path,
    stop_job_quietly,
    wait_closed,
    wait_state,
    wait_status,
)

pytestmark = [pytest.mark.usefixtures("worker"), pytest.mark.slow]

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
# The corrupt restart must end in Failed on its own; the old behaviour (20 restarts with backoff
# growing to a minute) takes far longer than this.
FAIL_FAST_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 60.0
PART_EPOCH = re.compile(r"^part-(\d{10})-\d{4}(?:-[0-9a-f]+)?\.")  # part-<epoch>-<subtask>[-<token>]


async def _stopped_with_checkpoints(job_client: JobClient, state_dir: Path, name: str) -> tuple[Any, Any, int, int]:
    """Start a job, let it take at least two checkpoints, stop it with a final one.

    Returns (pipeline, stopped status, newest epoch, the epoch before it)."""
    pipeline = generator_pipeline(name, state_dir / "out", splits=4, limit=4000, rate=400)
    spec = job_spec(pipeline, state_dir, parallelism=2, checkpoint_interval_s=1.0)
    await job_client.start(spec)
    await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
    await wait_status(job_client, spec.job_id, lambda s: s.epoch >= 2, timeout_s=60, what="two checkpoints")
    with pytest.raises(CommandRejected, match="needs a Stopped or Failed job"):
        await job_client.restart(spec.job_id, restore_epoch=1)  # an open job is stopped first
    await job_client.stop(spec.job_id, "checkpoint")
    stopped = await wait_state(job_client, spec.job_id, "Stopped", timeout_s=FINISH_TIMEOUT_S)
    assert await wait_closed(job_client, spec.job_id) == "Stopped"
    epochs = manifest_epochs(state_dir, spec.job_id)
    assert len(epochs) >= 2 and epochs[-1] == stopped.epoch, f"manifests {epochs}, {describe_status(stopped)}"
    return pipeline, stopped, epochs[-1], epochs[-2]


def _rows_committed_after(pipeline: Any, epoch: int) -> list[Row]:
    """Rows in committed files of epochs after `epoch` (files sink names: part-<epoch>-<subtask>)."""
    out: list[Row] = []
    for f in committed_files(sink_path(pipeline)):
        m = PART_EPOCH.match(f.name)
        assert m, f"unexpected committed file {f}"
        if int(m.group(1)) > epoch:
            for line in f.read_text().splitlines():
                if line.strip():
                    obj = json.loads(line)
                    out.append((obj["split"], obj["seq"], obj["key"], obj["value"]))
    return out


async def _start_execution_failures(client: Any, job_id: str) -> list[Any]:
    """The failures of the latest run's `start_execution` activities (Temporal Failure protos)."""
    handle = client.get_workflow_handle(job_id)
    scheduled: dict[int, str] = {}
    failures = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            attrs = event.activity_task_failed_event_attributes
            if scheduled.get(attrs.scheduled_event_id) == "start_execution":
                failures.append(attrs.failure)
    return failures


async def _assert_fails_fast_naming(
    job_client: JobClient, client: Any, job_id: str, epoch: int, bad_file: Path
) -> None:
    """The new run ends Failed (not Recovering again and again) with a failure naming the epoch
    and the file, and the activity error is a non-retryable CorruptCheckpoint."""
    failed = await wait_state(job_client, job_id, "Failed", timeout_s=FAIL_FAST_TIMEOUT_S)
    assert failed.failure is not None, describe_status(failed)
    message = failed.failure.message
    assert f"checkpoint epoch {epoch} is corrupt" in message and str(bad_file) in message, describe_status(failed)
    assert "--restore-epoch" in message, message
    assert failed.restarts <= 1, f"the corrupt restore point was retried: {describe_status(failed)}"
    failures = await _start_execution_failures(client, job_id)
    assert failures, "no start_execution failure in the history"
    cause = failures[-1].cause if failures[-1].HasField("cause") else failures[-1]
    assert cause.application_failure_info.type == CORRUPT_CHECKPOINT_TYPE, cause
    assert cause.application_failure_info.non_retryable, cause
    assert str(bad_file) in cause.message


async def test_truncated_state_file_fails_fast_then_older_epoch_restores(
    job_client: JobClient, client: Any, state_dir: Path
) -> None:
    pipeline, stopped, newest, older = await _stopped_with_checkpoints(job_client, state_dir, "corrupt-state")
    job_id = stopped.job_id
    try:
        store = CheckpointStore(str(checkpoint_root(state_dir)), job_id)
        manifest = store.read_manifest(newest)
        assert manifest is not None
        # state file paths in a manifest are relative to the job's directory in the store
        bad = checkpoint_root(state_dir) / job_id / manifest.operators["events"].state_files[0]
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        duplicated = _rows_committed_after(pipeline, older)

        assert await job_client.restart(job_id) is None
        await _assert_fails_fast_naming(job_client, client, job_id, newest, bad)
        assert await wait_closed(job_client, job_id) == "Failed"
        assert bad.exists(), "the corrupt checkpoint must be left as it is for the user to look at"

        assert await job_client.restart(job_id, restore_epoch=older) is None
        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert any(
            t.to_state == "Running" and f"restored epoch {older}" in t.reason for t in done.transitions
        ), describe_status(done)
        # Nothing lost; the only repeats are the rows committed after the restored epoch.
        actual = Counter(read_committed_rows(sink_path(pipeline)))
        assert actual == Counter(expected_rows(pipeline)) + Counter(duplicated), (
            f"{len(actual)} distinct rows committed; missing "
            f"{len(set(expected_rows(pipeline)) - set(actual))}, repeats outside epochs > {older}: "
            f"{sum((actual - Counter(expected_rows(pipeline)) - Counter(duplicated)).values())}"
        )
    finally:
        await stop_job_quietly(job_client, job_id)


def _cli(address: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_command(*args), cwd=PROJECT_ROOT, env=cli_env(address, state_dir),
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )


async def test_truncated_manifest_through_the_cli(
    job_client: JobClient, client: Any, state_dir: Path, temporal_address: str
) -> None:
    pipeline, stopped, newest, older = await _stopped_with_checkpoints(job_client, state_dir, "corrupt-manifest")
    job_id = stopped.job_id
    try:
        store = CheckpointStore(str(checkpoint_root(state_dir)), job_id)
        bad = Path(store.manifest_path(newest))
        bad.write_bytes(bad.read_bytes()[:120])
        duplicated = _rows_committed_after(pipeline, older)

        listed = _cli(temporal_address, state_dir, "checkpoints", job_id, "--json")
        assert listed.returncode == 0, listed.stderr
        verdicts = {c["epoch"]: c["verified"] for c in json.loads(listed.stdout)["checkpoints"]}
        assert verdicts[newest] is False and verdicts[older] is True, listed.stdout
        shown = _cli(temporal_address, state_dir, "checkpoints", job_id)
        assert shown.returncode == 0 and f"CORRUPT: manifest {bad}" in shown.stdout, shown.stdout + shown.stderr

        restarted = _cli(temporal_address, state_dir, "restart", job_id)
        assert restarted.returncode == 0, restarted.stderr
        await _assert_fails_fast_naming(job_client, client, job_id, newest, bad)
        assert await wait_closed(job_client, job_id) == "Failed"

        refused = _cli(temporal_address, state_dir, "restart", job_id, "--restore-epoch", str(older), "--force")
        assert refused.returncode == 2 and "--restore-epoch cannot be combined" in refused.stderr, refused.stderr
        restored = _cli(temporal_address, state_dir, "restart", job_id, "--restore-epoch", str(older))
        assert restored.returncode == 0, restored.stderr
        assert f"from checkpoint epoch {older}" in restored.stdout, restored.stdout
        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert any(
            t.to_state == "Running" and f"restored epoch {older}" in t.reason for t in done.transitions
        ), describe_status(done)
        actual = Counter(read_committed_rows(sink_path(pipeline)))
        assert actual == Counter(expected_rows(pipeline)) + Counter(duplicated)
    finally:
        await stop_job_quietly(job_client, job_id)


async def test_manifest_from_before_digests_still_restores(job_client: JobClient, state_dir: Path) -> None:
    """A checkpoint written by code from before digests (no `state_digests` in its manifest) is
    restored as before: the new run finishes with every row exactly once."""
    pipeline, stopped, newest, _ = await _stopped_with_checkpoints(job_client, state_dir, "old-manifest")
    job_id = stopped.job_id
    try:
        store = CheckpointStore(str(checkpoint_root(state_dir)), job_id)
        path = Path(store.manifest_path(newest))
        data = json.loads(path.read_text())
        assert any(op["state_digests"] for op in data["operators"].values()), "this code records digests"
        for op in data["operators"].values():
            del op["state_digests"]
        path.write_text(json.dumps(data))

        assert await job_client.restart(job_id) is None
        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert any(
            t.to_state == "Running" and f"restored epoch {newest}" in t.reason for t in done.transitions
        ), describe_status(done)
        assert Counter(read_committed_rows(sink_path(pipeline))) == Counter(expected_rows(pipeline))
    finally:
        await stop_job_quietly(job_client, job_id)
