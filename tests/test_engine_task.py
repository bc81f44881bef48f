"""SubtaskRunner end to end, in process, with a real checkpoint store and files sink.

The committed output is compared with rows computed from the generator's documented formula
(engine_helpers.expected_row), not with the source's own code path.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sluice.connectors import sink_class
from sluice.engine.compiler import compile_program
from sluice.engine.task import SubtaskRunner, TaskError
from sluice.models import CheckpointManifest, JobConfig, PipelineSpec, Program, SubtaskRef
from sluice.storage import CheckpointStore, manifest_from_snapshots
from tests.engine_helpers import expected_row, read_committed, user_module

JOB = "job-e2e"
SPLITS, KEYS, LIMIT = 5, 7, 2000


class Run:
    """One generation of every subtask of a program, driven like the runner and controller would."""

    def __init__(self, program: Program, store: CheckpointStore, generation: int,
                 restore: CheckpointManifest | None) -> None:
        self.program, self.store, self.generation = program, store, generation
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.subtasks = [
            SubtaskRunner(ref=ref, program=program, job_id=JOB, generation=generation, store=store,
                          restore=restore, on_event=lambda k, r, f: self.events.append((k, r.label(), f)))
            for ref in program.subtasks()
        ]
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for st in self.subtasks:
            await st.open()
        self.tasks = [asyncio.create_task(st.run()) for st in self.subtasks]

    def barrier(self, epoch: int, then_stop: bool = False) -> None:
        for st in self.subtasks:
            st.inject_barrier(epoch, then_stop)

    async def wait_snapshots(self, epoch: int) -> None:
        while not all(epoch in st.snapshots for st in self.subtasks):
            await asyncio.sleep(0.001)

    async def checkpoint(self, epoch: int, then_stop: bool = False) -> CheckpointManifest:
        """What the controller's checkpoint activity does: barrier, wait, manifest, commit."""
        self.barrier(epoch, then_stop)
        await self.wait_snapshots(epoch)
        manifest = manifest_from_snapshots(job_id=JOB, epoch=epoch, generation=self.generation,
                                           program=self.program,
                                           snapshots=[st.snapshots[epoch] for st in self.subtasks],
                                           then_stop=then_stop)
        self.store.write_manifest(manifest)
        for op_id, op in manifest.operators.items():
            sink = sink_class(self.program.operators[op_id])
            if sink is not None:
                sink.commit(self.program.operators[op_id], op.commits)
        return manifest

    async def join(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


def _program(fns: str, out: Path, parallelism: int, **gen: Any) -> Program:
    pipeline = PipelineSpec.model_validate({
        "name": "e2e", "parallelism": 1,
        "operators": [
            {"id": "gen", "type": "generator", "splits": SPLITS, "keys": KEYS, "limit": LIMIT,
             "batch_size": 50, **gen},
            {"id": "double", "type": "map", "fn": f"{fns}:double"},
            {"id": "even", "type": "filter", "fn": f"{fns}:even"},
            {"id": "out", "type": "files", "path": str(out)},
        ],
    })
    return compile_program(pipeline, JobConfig(parallelism=parallelism))


@pytest.fixture
def fns(tmp_path: Path) -> str:
    return user_module(tmp_path, """
        import pyarrow.compute as pc

        def double(batch):
            return batch.append_column("double", pc.multiply(batch.column("value"), 2))

        def even(batch):
            return pc.equal(pc.bit_wise_and(batch.column("seq"), 1), 0).to_numpy(zero_copy_only=False)

        def explode(batch):
            if pc.max(batch.column("seq")).as_py() >= 120:
                raise ValueError("seq too big")
            return batch
    """)


def _recover(program: Program, manifest: CheckpointManifest | None) -> None:
    for _op_id, params in program.operators.items():
        sink = sink_class(params)
        if sink is not None:
            sink.recover(params, manifest)


async def _yield(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_exactly_once_across_rescales(fns: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = CheckpointStore(str(tmp_path / "ckpt"), JOB)

    # generation 1, parallelism 1: two checkpoints, the second stops the job
    prog = _program(fns, out, 1)
    _recover(prog, None)
    run = Run(prog, store, 1, None)
    await run.start()
    await _yield(20)
    await run.checkpoint(1)
    await _yield(20)
    await run.checkpoint(2, then_stop=True)
    await run.join()
    assert all(st.state == "finished" for st in run.subtasks)
    assert 0 < len(read_committed(out)) < SPLITS * LIMIT // 2

    # generation 2, parallelism 3: restores epoch 2, checkpoints 3, then dies (rows after epoch 3
    # are left in staging and must be discarded)
    prog = _program(fns, out, 3)
    manifest = store.latest_manifest()
    assert manifest is not None and manifest.epoch == 2
    _recover(prog, manifest)
    run = Run(prog, store, 2, manifest)
    await run.start()
    await _yield(30)
    await run.checkpoint(3)
    await _yield(30)
    for st in run.subtasks:
        st.stop("immediate")
    await run.join()
    assert any(n.startswith("inprogress") for n in os.listdir(out / ".staging"))

    # generation 3, parallelism 2: restores epoch 3, runs to the end, final checkpoint
    prog = _program(fns, out, 2)
    manifest = store.latest_manifest()
    assert manifest is not None and manifest.epoch == 3
    _recover(prog, manifest)
    assert os.listdir(out / ".staging") == []
    run = Run(prog, store, 3, manifest)
    await run.start()
    while sum(k == "source_finished" for k, _, _ in run.events) < len(run.subtasks):
        await asyncio.sleep(0.001)
    assert all(st.state == "source_finished" for st in run.subtasks)
    await run.checkpoint(4)  # a finished source still answers barriers
    await run.checkpoint(5, then_stop=True)
    await run.join()
    done = [f for k, _, f in run.events if k == "checkpoint_done"]
    assert sorted(f["epoch"] for f in done) == [4, 4, 5, 5]

    rows = read_committed(out)
    expected = [
        {**expected_row(s, q, KEYS), "double": expected_row(s, q, KEYS)["value"] * 2}
        for s in range(SPLITS) for q in range(0, LIMIT, 2)
    ]
    key = lambda r: (r["split"], r["seq"])  # noqa: E731
    assert len(rows) == len(expected)  # no duplicates
    assert sorted(rows, key=key) == sorted(expected, key=key)  # no gaps, same values
    assert os.listdir(out / ".staging") == []
    assert store.completed_epochs() == [1, 2, 3, 4, 5]


async def test_barrier_is_idempotent_and_graceful_stop(fns: str, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), JOB)
    prog = _program(fns, tmp_path / "out", 2, limit=None)
    run = Run(prog, store, 1, None)
    await run.start()
    await _yield(10)
    run.barrier(1)
    run.barrier(1)
    await run.wait_snapshots(1)
    await _yield(10)
    for st in run.subtasks:
        st.stop("graceful")
    await run.join()
    assert [k for k, _, _ in run.events].count("checkpoint_done") == 2
    assert all(st.state == "finished" for st in run.subtasks)


async def test_user_function_failure_is_user_error(fns: str, tmp_path: Path) -> None:
    pipeline = PipelineSpec.model_validate({
        "name": "boom", "parallelism": 2,
        "operators": [
            {"id": "gen", "type": "generator", "splits": 2, "limit": 1000, "batch_size": 40},
            {"id": "big", "type": "map", "fn": f"{fns}:explode"},
        ],
    })
    prog = compile_program(pipeline, JobConfig())
    store = CheckpointStore(str(tmp_path / "ckpt"), JOB)
    st = SubtaskRunner(ref=SubtaskRef(chain=0, index=1), program=prog, job_id=JOB, generation=1,
                       store=store, restore=None, on_event=lambda *a: None)
    await st.open()
    with pytest.raises(TaskError) as err:
        await st.run()
    e = err.value
    assert e.domain == "user" and e.retryable
    # No subtask in the message: the same bad record fails the same way whichever subtask gets it.
    assert e.message == f"operator 'big' (map {fns}:explode) raised ValueError: seq too big"
    assert e.operator == "big"
    module = tmp_path / f"{fns}.py"
    line = module.read_text().splitlines().index('        raise ValueError("seq too big")') + 1
    assert e.traceback is not None and f'{module}", line {line}, in explode' in e.traceback, e.traceback
    assert "sluice" + os.sep + "engine" not in e.traceback, "only the user's frames"
    assert st.state == "failed"


async def test_rate_is_respected_without_blocking_the_loop(fns: str, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), JOB)
    prog = _program(fns, tmp_path / "out", 1, limit=100, rate=1000.0, splits=2)
    run = Run(prog, store, 1, None)
    await run.start()
    t0 = time.monotonic()
    ticks = 0
    while not run.events:
        await asyncio.sleep(0.005)
        ticks += 1
    elapsed = time.monotonic() - t0
    assert 0.07 < elapsed < 2.0  # 100 rows per split at 1000 rows/s
    assert ticks > 5  # the event loop kept running meanwhile
    await run.checkpoint(1, then_stop=True)
    await run.join()
    assert len(read_committed(tmp_path / "out")) == 100  # 2 splits x 50 even seqs


async def test_open_failure_names_operator(tmp_path: Path) -> None:
    mod = user_module(tmp_path, "def f(batch):\n    return batch\n")
    pipeline = PipelineSpec.model_validate({
        "name": "p", "operators": [{"id": "gen", "type": "generator"}, {"id": "m", "type": "map", "fn": f"{mod}:f"}],
    })
    prog = compile_program(pipeline, JobConfig())
    (tmp_path / f"{mod}.py").write_text("raise ImportError('gone')\n")
    import sys
    sys.modules.pop(mod, None)
    st = SubtaskRunner(ref=SubtaskRef(chain=0, index=0), program=prog, job_id=JOB, generation=1,
                       store=CheckpointStore(str(tmp_path / "c"), JOB), restore=None, on_event=lambda *a: None)
    with pytest.raises(TaskError) as err:
        await st.open()
    assert err.value.domain == "user" and "operator 'm' subtask 0" in err.value.message
    assert err.value.operator == "m" and "ImportError" in err.value.message
    assert st.state == "failed"
