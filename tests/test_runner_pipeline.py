"""End to end through real runner processes: /start a bounded generator -> files pipeline,
checkpoint it with /checkpoint + /checkpoint/{E}, finish it with a then-stop barrier; and the
failure paths (a subtask that cannot open, a user function that raises while running)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from sluice.auth import runner_token
from sluice.engine.compiler import assign, compile_program
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.models import JobConfig, PipelineSpec, RunnerEvent, RunnerInfo, StartRequest
from sluice.runner.client import RunnerClient, RunnerRequestRefused
from sluice.schedulers.process import ProcessScheduler

SECRET = b"test-secret"
JOB = "job-e2e"
GEN = 1
START_TIMEOUT_S = 30.0
CHECKPOINT_WAIT_S = 30.0
LIMIT = 500
SPLITS = 2


@pytest_asyncio.fixture
async def runners(state_dir: Path) -> AsyncIterator[list[RunnerInfo]]:
    """Two one-slot runners of JOB generation GEN; stopped by PID after the test."""
    sched = ProcessScheduler(state_dir, SECRET)
    try:
        yield await sched.start_runners(JOB, GEN, 2, 1, START_TIMEOUT_S)
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


def client(info: RunnerInfo) -> RunnerClient:
    return RunnerClient(info, JOB, runner_token(SECRET, JOB, GEN))


def pipeline(out: Path, *middle: dict[str, object]) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "e2e",
            "parallelism": 2,
            "operators": [
                {"id": "events", "type": "generator", "splits": SPLITS, "keys": 10, "limit": LIMIT, "batch_size": 100},
                *middle,
                {"id": "out", "type": "files", "path": str(out), "format": "jsonl"},
            ],
        }
    )


def start_requests(spec: PipelineSpec, infos: list[RunnerInfo], ckpt: Path) -> list[StartRequest]:
    program = compile_program(spec, JobConfig())
    assignments = assign(program, infos)
    return [
        StartRequest(
            job_id=JOB,
            generation=GEN,
            program=program,
            subtasks=a.subtasks,
            checkpoint_url=str(ckpt),
            peers=infos,
            assignments=assignments,
        )
        for a in assignments
    ]


@contextlib.asynccontextmanager
async def collect_events(info: RunnerInfo) -> AsyncIterator[list[RunnerEvent]]:
    """Collect a runner's events in the background for the `async with` body."""
    events: list[RunnerEvent] = []

    async def reader() -> None:
        async with client(info) as c:
            with contextlib.suppress(RunnerUnavailable):
                async for ev in c.events():
                    events.append(ev)

    task = asyncio.create_task(reader())
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for_states(c: RunnerClient, wanted: set[str], timeout_s: float = 20.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = (await c.health())["tasks"]
        if tasks and set(tasks.values()) <= wanted:
            return tasks
        assert time.monotonic() < deadline, f"tasks {tasks} never reached {wanted}"
        await asyncio.sleep(0.05)


async def test_bounded_pipeline_checkpoints_and_stops(runners: list[RunnerInfo], tmp_path: Path) -> None:
    reqs = start_requests(pipeline(tmp_path / "out"), runners, tmp_path / "ckpt")
    async with collect_events(runners[0]) as events, client(runners[0]) as c0, client(runners[1]) as c1:
        clients = [c0, c1]
        for c, req in zip(clients, reqs):
            tasks = await c.start(req)
            assert set(tasks) == {r.label() for r in req.subtasks}
            assert await c.start(req) is not None  # idempotent for the same generation

        # Epoch 1, while (or after) the sources produce.
        for c in clients:
            await c.checkpoint(1, then_stop=False)
            await c.checkpoint(1, then_stop=False)  # a repeated epoch is ignored
        snaps = []
        for c, req in zip(clients, reqs):
            done, snapshots, failed = await c.wait_checkpoint(1, CHECKPOINT_WAIT_S)
            assert (done, failed) == (True, None)
            assert {s.subtask.label() for s in snapshots} == {r.label() for r in req.subtasks}
            snaps += snapshots
        assert all(s.epoch == 1 and set(s.operators) == {"events", "out"} for s in snaps)

        # The bounded sources end; the subtasks stay alive for the final barrier.
        for c in clients:
            await wait_for_states(c, {"source_finished"})
        for c in clients:
            await c.checkpoint(2, then_stop=True)
        commits = []
        for c in clients:
            done, snapshots, failed = await c.wait_checkpoint(2, CHECKPOINT_WAIT_S)
            assert (done, failed) == (True, None)
            commits += [commit for s in snapshots for commit in s.operators["out"].commits]
        commits += [commit for s in snaps for commit in s.operators["out"].commits]
        assert commits, "the files sink pre-committed nothing"
        for c in clients:
            await wait_for_states(c, {"finished"})

        await asyncio.sleep(1.2)  # one heartbeat after the end
        kinds = [e.kind for e in events]
        assert kinds[0] == "hello"
        for kind in ("task_started", "source_finished", "checkpoint_done", "task_finished", "heartbeat"):
            assert kind in kinds, kinds
        assert [e.epoch for e in events if e.kind == "checkpoint_done"] == [1, 2]
        beat = [e for e in events if e.kind == "heartbeat"][-1]
        assert beat.metrics is not None and beat.metrics["records_out.events"] > 0

    # Prometheus: every record the generators emitted is counted, per operator and subtask.
    total = 0.0
    async with aiohttp.ClientSession() as s:
        for info in runners:
            async with s.get(f"{info.control_url}/metrics") as resp:
                text = await resp.text()
            for m in re.finditer(r'^sluice_records_out_total\{[^}]*operator="events"[^}]*\} (\S+)$', text, re.M):
                total += float(m.group(1))
            assert "sluice_checkpoint_duration_seconds_count" in text
    assert total == SPLITS * LIMIT


async def test_open_failure_is_400_naming_operator_and_subtask(
    runners: list[RunnerInfo], tmp_path: Path
) -> None:
    reqs = start_requests(pipeline(tmp_path / "out"), runners, tmp_path / "ckpt")
    req = reqs[0]
    program = req.program.model_copy(deep=True)
    # A function that cannot be imported on the runner (compile checked it elsewhere, say).
    program.operators["out"] = {**program.operators["out"], "type": "no-such-operator-type"}
    bad = req.model_copy(update={"program": program})
    async with client(runners[0]) as c:
        with pytest.raises(RunnerRefused) as err:
            await c.start(bad)
        assert isinstance(err.value, RunnerRequestRefused) and err.value.status == 400
        assert "'out'" in str(err.value) and "subtask 0" in str(err.value)
        # Idempotent: the same answer again, and the runner keeps serving.
        with pytest.raises(RunnerRefused):
            await c.start(bad)
        assert set((await c.health())["tasks"].values()) <= {"failed", "finished"}


async def test_user_function_failure_is_a_task_failed_event(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod_dir = tmp_path / "userfns"
    mod_dir.mkdir()
    (mod_dir / "e2e_userfns.py").write_text(
        textwrap.dedent(
            """
            def explode(batch):
                raise ValueError("kaboom")
            """
        )
    )
    monkeypatch.syspath_prepend(str(mod_dir))  # compile checks the function is importable here
    monkeypatch.setenv("PYTHONPATH", str(mod_dir))  # ... and on the runner
    sched = ProcessScheduler(state_dir, SECRET)
    try:
        infos = await sched.start_runners(JOB, GEN, 1, 2, START_TIMEOUT_S)
        spec = pipeline(tmp_path / "out", {"id": "boom", "type": "filter", "fn": "e2e_userfns:explode"})
        reqs = start_requests(spec, infos, tmp_path / "ckpt")
        async with collect_events(infos[0]) as events, client(infos[0]) as c:
            await c.start(reqs[0])
            tasks = await wait_for_states(c, {"failed"})
            assert tasks
            deadline = time.monotonic() + 5
            while not any(e.kind == "task_failed" for e in events):
                assert time.monotonic() < deadline, [e.kind for e in events]
                await asyncio.sleep(0.05)
            failed = next(e for e in events if e.kind == "task_failed")
            assert failed.domain == "user" and failed.retryable
            assert failed.message is not None and "kaboom" in failed.message and "'boom'" in failed.message
            # Named for the user: operator, function, exception; and where in their file it raised.
            assert failed.message == "operator 'boom' (filter e2e_userfns:explode) raised ValueError: kaboom"
            assert failed.operator == "boom"
            assert failed.traceback is not None and 'e2e_userfns.py", line 3, in explode' in failed.traceback
            assert "sluice/engine" not in failed.traceback, failed.traceback
            assert (await c.health())["generation"] == GEN  # the runner keeps serving
            done, _, why = await c.wait_checkpoint(1, 0.1)
            assert not done and why is not None and "failed" in why
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


@pytest.mark.parametrize("mode", ["graceful", "immediate"])
async def test_stop_ends_an_unbounded_pipeline(state_dir: Path, tmp_path: Path, mode: str) -> None:
    sched = ProcessScheduler(state_dir, SECRET)
    try:
        infos = await sched.start_runners(JOB, GEN, 1, 2, START_TIMEOUT_S)
        spec = PipelineSpec.model_validate(
            {
                "name": "endless",
                "parallelism": 2,
                "operators": [
                    {"id": "events", "type": "generator", "splits": 2, "rate": 1000, "batch_size": 50},
                    {"id": "out", "type": "files", "path": str(tmp_path / "out")},
                ],
            }
        )
        [req] = start_requests(spec, infos, tmp_path / "ckpt")
        async with collect_events(infos[0]) as events, client(infos[0]) as c:
            await c.start(req)
            await wait_for_states(c, {"running"})
            t0 = time.monotonic()
            await c.stop(mode)  # type: ignore[arg-type]
            await wait_for_states(c, {"finished"}, timeout_s=5.0)
            assert time.monotonic() - t0 < 3.0
            with pytest.raises(RunnerRefused, match="already started"):
                await c.start(req.model_copy(update={"subtasks": []}))
            deadline = time.monotonic() + 5
            while sum(e.kind == "task_finished" for e in events) < 2:
                assert time.monotonic() < deadline, [e.kind for e in events]
                await asyncio.sleep(0.05)
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


async def test_a_user_function_that_never_returns_fails_its_task_and_the_runner_keeps_serving(
    state_dir: Path, tmp_path: Path
) -> None:
    """Through a real runner process: the hang is reported as a task_failed naming the operator,
    function and the line it waits on; /health answers meanwhile; SIGTERM still ends the process
    (the stuck thread does not keep it alive)."""
    import os
    import signal

    from tests.e2e_helpers import pid_alive

    hang_s = 1.0
    sched = ProcessScheduler(state_dir, SECRET)
    try:
        infos = await sched.start_runners(JOB, GEN, 1, 2, START_TIMEOUT_S)
        spec = pipeline(
            tmp_path / "out", {"id": "slow", "type": "map", "fn": "tests.pipeline_functions:sleeps_forever"}
        )
        reqs = [
            r.model_copy(update={"task_hang_timeout_s": hang_s}) for r in start_requests(spec, infos, tmp_path / "ckpt")
        ]
        async with collect_events(infos[0]) as events, client(infos[0]) as c:
            await c.start(reqs[0])
            deadline = time.monotonic() + 30
            while not any(e.kind == "task_failed" for e in events):
                assert time.monotonic() < deadline, [e.kind for e in events]
                assert (await c.health())["generation"] == GEN  # the runner answers while the function hangs
                await asyncio.sleep(0.1)
            failed = next(e for e in events if e.kind == "task_failed")
            assert failed.message == (
                f"operator 'slow' (map tests.pipeline_functions:sleeps_forever) did not return within {hang_s:g} s"
            )
            assert (failed.operator, failed.domain, failed.retryable) == ("slow", "user", True)
            assert failed.traceback is not None and "in sleeps_forever" in failed.traceback
            assert "time.sleep(3600)" in failed.traceback, failed.traceback
        pid = infos[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while pid_alive(pid):
            assert time.monotonic() < deadline, "a runner with a hung user function ignored SIGTERM"
            await asyncio.sleep(0.1)
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)
