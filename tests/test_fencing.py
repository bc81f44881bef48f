"""Fencing by generation: the checkpoint store refuses every publish of a superseded generation.

Unit tests on real files (the fence itself, the manifest write, the files sink's commit, a subtask
at a barrier), then one end-to-end test on the session's dev server and controller worker with
real runner processes: a running job's fence is raised behind its back (as a newer generation
started elsewhere would), its next checkpoint is refused, and it recovers into a generation the
fence admits, with every expected row committed exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sluice.activities.fencing import STALE_GENERATION_TYPE, stale_generation_error
from sluice.activities.sinks import commit_sinks
from sluice.client import JobClient
from sluice.connectors.files import FilesSink, committed_files
from sluice.engine.compiler import compile_program
from sluice.engine.operators import OperatorContext
from sluice.engine.task import SubtaskRunner, TaskError
from sluice.errors import StaleGeneration
from sluice.models import (
    CheckpointManifest,
    JobConfig,
    OperatorCheckpoint,
    PipelineSpec,
)
from sluice.storage import FENCE_NAME, CheckpointStore
from tests.e2e_helpers import (
    assert_exact_output,
    checkpoint_root,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    read_committed_rows,
    sink_path,
    stop_job_quietly,
    wait_state,
    wait_status,
)

JOB = "fenced-job"
RAISERS = 8
GENERATIONS = 40
START_TIMEOUT_S = 30.0
RECOVER_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 60.0


def _store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "ckpt"), JOB)


def _manifest(epoch: int, generation: int, commits: list[dict[str, Any]] | None = None) -> CheckpointManifest:
    return CheckpointManifest(
        job_id=JOB, epoch=epoch, generation=generation, created_at=datetime.now(UTC),
        operators={"out": OperatorCheckpoint(parallelism=1, commits=commits or [])},
    )


def _staged_commits(out: Path, epoch: int, generation: int, subtask: int = 0) -> list[dict[str, Any]]:
    """Subtask `subtask` of a files sink of `generation` that pre-committed one file for `epoch`."""
    sink = FilesSink("out", {"id": "out", "type": "files", "path": str(out), "format": "jsonl"})
    sink.open(OperatorContext(JOB, generation, "out", subtask, 2), [])
    sink.process(pa.record_batch({"a": [1, 2, 3]}))
    commits = sink.snapshot(epoch).commits
    sink.close()
    assert len(commits) == 1 and Path(commits[0]["staged"]).exists()
    return commits


# ------------------------------------------------------------------------------ the fence


def test_missing_fence_is_zero_and_admits_every_generation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.read_fence().generation == 0
    for generation in (1, 7):
        store.check_fence(generation)
    assert not Path(store.fence_path).exists()  # reading and checking never create it


def test_fence_is_monotonic_and_idempotent(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.raise_fence(3).generation == 3
    raw = Path(store.fence_path).read_bytes()
    assert store.raise_fence(3).generation == 3
    assert Path(store.fence_path).read_bytes() == raw  # raising it again rewrites nothing
    with pytest.raises(StaleGeneration, match=f"^generation 2 of job {JOB} is superseded by generation 3: refused$"):
        store.raise_fence(2)
    assert Path(store.fence_path).read_bytes() == raw  # never lowered
    assert store.raise_fence(5).generation == 5
    store.check_fence(5)
    for stale in (3, 4):
        with pytest.raises(StaleGeneration) as refused:
            store.check_fence(stale)
        assert (refused.value.job_id, refused.value.generation, refused.value.fence) == (JOB, stale, 5)
        assert str(refused.value) == f"generation {stale} of job {JOB} is superseded by generation 5: refused"
    # The fence is in the job's directory, never among its epochs, and is the only file there.
    assert store.completed_epochs() == [] and store.epochs_seen() == []
    assert sorted(p.name for p in Path(store.job_root).iterdir() if not p.name.startswith(".")) == [FENCE_NAME]


def test_fence_raises_are_atomic_and_never_lower_it_under_concurrency(tmp_path: Path) -> None:
    store = _store(tmp_path)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        # Every read parses (never a partial file) and the generations seen never go down.
        reading = CheckpointStore(str(tmp_path / "ckpt"), JOB)
        try:
            while not stop.is_set():
                seen.append(reading.read_fence().generation)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    def raiser(seed: int) -> None:
        raising = CheckpointStore(str(tmp_path / "ckpt"), JOB)
        order = list(range(1, GENERATIONS + 1))
        random.Random(seed).shuffle(order)
        try:
            for generation in order:
                try:
                    raising.raise_fence(generation)
                except StaleGeneration:
                    pass  # a higher one got there first: expected
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=raiser, args=(i,)) for i in range(RAISERS)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors, errors
    assert seen == sorted(seen), "a reader saw the fence go down"
    assert store.read_fence().generation == GENERATIONS
    assert [p.name for p in Path(store.job_root).iterdir() if p.name.endswith(".tmp")] == []


def test_a_newer_run_takes_the_fence_by_start_time(tmp_path: Path) -> None:
    # A new run of a job numbers its generations from 1 again: it is newer by its start time.
    store = _store(tmp_path)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    store.raise_fence(5, started_at=t0)
    assert store.raise_fence(1, started_at=t0 + timedelta(seconds=30)).generation == 1
    with pytest.raises(StaleGeneration, match="generation 5 of job .* is superseded by generation 1 of a newer run"):
        store.check_fence(5)  # the previous run's generation 5, cut off somewhere, is refused
    with pytest.raises(StaleGeneration):
        store.raise_fence(6, started_at=t0 + timedelta(seconds=1))  # started before the new run
    assert store.raise_fence(1, started_at=t0 + timedelta(seconds=30)).generation == 1  # its retry: no change


def test_a_raise_without_start_time_is_completed_by_the_generation_itself(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.raise_fence(4)  # e.g. by hand, or a tool, for a generation that is starting
    started = datetime(2026, 1, 1, tzinfo=UTC)
    fence = store.raise_fence(4, started_at=started)
    assert (fence.generation, fence.started_at) == (4, started)
    with pytest.raises(StaleGeneration):
        store.raise_fence(3, started_at=started - timedelta(seconds=1))


def test_unreadable_fence_names_the_file(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.raise_fence(1)
    Path(store.fence_path).write_text("{not json")
    with pytest.raises(ValueError, match=FENCE_NAME):
        store.check_fence(1)


# ------------------------------------------------------------------------------ manifests


def test_manifest_of_a_stale_generation_is_refused_and_nothing_appears(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.raise_fence(2)
    store.write_manifest(_manifest(1, generation=2))  # the fenced generation publishes
    store.raise_fence(5)
    with pytest.raises(StaleGeneration, match=f"^generation 2 of job {JOB} is superseded by generation 5: refused$"):
        store.write_manifest(_manifest(2, generation=2))
    assert store.read_manifest(2) is None and store.completed_epochs() == [1]
    assert os.listdir(store.epoch_path(2)) == []  # not even the temporary file is left
    store.write_manifest(_manifest(2, generation=5))
    assert store.completed_epochs() == [1, 2]


def test_manifest_without_any_fence_is_written(tmp_path: Path) -> None:
    store = _store(tmp_path)  # a job from before fencing: no generation raised the fence yet
    store.write_manifest(_manifest(1, generation=3))
    assert store.completed_epochs() == [1]


# ------------------------------------------------------------------------------ sink commits


def test_sink_commit_of_a_stale_generation_publishes_nothing(tmp_path: Path) -> None:
    store, out = _store(tmp_path), tmp_path / "out"
    params = {"id": "out", "type": "files", "path": str(out), "format": "jsonl"}
    commits = _staged_commits(out, epoch=1, generation=2) + _staged_commits(out, epoch=1, generation=2, subtask=1)
    store.raise_fence(3)
    with pytest.raises(StaleGeneration, match="generation 2 of job .* superseded by generation 3"):
        FilesSink.commit(params, commits, before_publish=lambda: store.check_fence(2))
    assert committed_files(str(out)) == []
    assert all(Path(c["staged"]).exists() for c in commits)  # left for the recovery of generation 3
    # The generation the fence names publishes them (as its recovery would).
    assert FilesSink.commit(params, commits, before_publish=lambda: store.check_fence(3)) == 2
    assert len(committed_files(str(out))) == 2


def test_commit_sinks_stops_at_the_fence(tmp_path: Path) -> None:
    store, out = _store(tmp_path), tmp_path / "out"
    pipeline = PipelineSpec.model_validate({"name": "p", "operators": [
        {"id": "src", "type": "generator", "limit": 10},
        {"id": "out", "type": "files", "path": str(out), "inputs": ["src"]},
    ]})
    program = compile_program(pipeline, JobConfig())
    commits = _staged_commits(out, epoch=4, generation=1)
    manifest = _manifest(4, generation=1, commits=commits)
    store.raise_fence(2)
    with pytest.raises(StaleGeneration) as refused:
        commit_sinks(program, JOB, manifest, before_publish=lambda: store.check_fence(1))
    assert committed_files(str(out)) == []
    # What the checkpoint activity fails with: not retried, the store's message.
    error = stale_generation_error(refused.value)
    assert error.type == STALE_GENERATION_TYPE and error.non_retryable
    assert error.message == f"generation 1 of job {JOB} is superseded by generation 2: refused"


# ------------------------------------------------------------------------------ a subtask at a barrier


async def test_subtask_of_a_stale_generation_snapshots_nothing(tmp_path: Path) -> None:
    store, out = _store(tmp_path), tmp_path / "out"
    pipeline = PipelineSpec.model_validate({"name": "p", "operators": [
        {"id": "src", "type": "generator", "splits": 1, "rate": 1000},
        {"id": "out", "type": "files", "path": str(out), "inputs": ["src"]},
    ]})
    program = compile_program(pipeline, JobConfig())
    (ref,) = program.subtasks()
    store.raise_fence(1)
    task = SubtaskRunner(ref=ref, program=program, job_id=JOB, generation=1, store=store, restore=None,
                         on_event=lambda kind, ref, fields: None)
    await task.open()
    running = asyncio.ensure_future(task.run())
    task.inject_barrier(1, False)
    while 1 not in task.snapshots:
        await asyncio.sleep(0.01)
    store.raise_fence(2)  # a newer generation started elsewhere
    task.inject_barrier(2, False)
    with pytest.raises(TaskError) as failed:
        await asyncio.wait_for(running, 10)
    assert StaleGeneration.found_in(failed.value) is not None
    assert failed.value.retryable and failed.value.domain == "internal"  # the job recovers
    assert "generation 1 of job fenced-job is superseded by generation 2: refused" in failed.value.message
    assert 2 not in task.snapshots and 2 not in store.epochs_seen()  # no snapshot, no state file
    assert task.state == "failed"


# ------------------------------------------------------------------------------ end to end


@pytest.mark.usefixtures("worker")
async def test_superseded_generation_cannot_checkpoint_and_the_job_recovers(
    job_client: JobClient, state_dir: Path
) -> None:
    # 2 splits x 2400 rows at 400 rows/s/split: ~6 s of source time, checkpoints every second.
    pipeline = generator_pipeline("fence", state_dir / "out", splits=2, limit=2400, rate=400)
    spec = job_spec(pipeline, state_dir, parallelism=2)
    job_id = spec.job_id
    store = CheckpointStore(str(checkpoint_root(state_dir)), job_id)
    await job_client.start(spec)
    try:
        first = await wait_status(job_client, job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                                  timeout_s=START_TIMEOUT_S, what="running with a first checkpoint")
        old = first.generation
        assert store.read_fence().generation == old  # the running generation raised it itself

        # A newer generation starts elsewhere (a controller that thinks this one is dead).
        await asyncio.to_thread(store.raise_fence, old + 1)
        raised_at = datetime.now(UTC).timestamp()
        refused = f"generation {old} of job {job_id} is superseded by generation {old + 1}: refused"

        st = await wait_status(job_client, job_id, lambda s: s.state == "Running" and s.generation > old,
                               timeout_s=RECOVER_TIMEOUT_S, what="Running again in a new generation")
        assert st.generation == old + 1, describe_status(st)
        recovering = [t for t in st.transitions if t.from_state == "Running" and t.to_state == "Recovering"]
        assert recovering and refused in recovering[-1].reason, describe_status(st)
        assert store.read_fence().generation == old + 1
        assert store.read_fence().started_at is not None  # recorded by the new generation's start

        done = await wait_state(job_client, job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.generation == old + 1, describe_status(done)

        # Nothing of the old generation was published after the fence went up: each of its
        # manifests was on disk before (the publish checks the fence after writing the bytes).
        manifests = {e: store.read_manifest(e) for e in store.completed_epochs()}
        old_epochs = sorted(e for e, m in manifests.items() if m is not None and m.generation == old)
        assert old_epochs, f"generation {old} completed no checkpoint: {sorted(manifests)}"
        for e in old_epochs:
            assert os.stat(store.manifest_path(e)).st_mtime <= raised_at, f"epoch {e} published after the fence"
        newer = [e for e in manifests if e > old_epochs[-1]]
        assert newer and all(manifests[e].generation == old + 1 for e in newer), manifests  # type: ignore[union-attr]
        # Committed output exists only for epochs with a manifest, and every row exactly once.
        out = sink_path(pipeline)
        part_epochs = {int(Path(f).name.split("-")[1]) for f in committed_files(str(out))}
        assert part_epochs <= set(manifests), (
            f"output of epochs {sorted(part_epochs - set(manifests))} without a manifest"
        )
        assert_exact_output(read_committed_rows(out), expected_rows(pipeline))
        # The fence record is plain JSON a user can read.
        assert json.loads(Path(store.fence_path).read_text())["generation"] == old + 1
    finally:
        await stop_job_quietly(job_client, job_id)
