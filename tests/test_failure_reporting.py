"""What a user learns when their code fails or hangs, in process (fast): the engine's TaskError
(operator, stable message, user traceback), the hang timeout with the event loop kept alive, an
uncreatable sink path, the monitor's message for a silent runner, and `sluice status`'s lines.

The same behaviours through real runners and a real Temporal server: tests/test_failure_e2e.py.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sluice.activities.monitoring import JobView, lost_message
from sluice.engine.compiler import compile_program
from sluice.engine.task import SubtaskRunner, TaskError
from sluice.errors import RunnerUnavailable
from sluice.models import (
    Failure,
    JobConfig,
    JobStatus,
    PipelineSpec,
    Program,
    RejectedCommand,
    RunnerInfo,
    SubtaskRef,
    TransitionRecord,
)
from sluice.runner.client import RunnerSilent
from sluice.status_view import status_lines
from sluice.storage import CheckpointStore
from tests.engine_helpers import user_module

JOB = "job-failures"
#: a hang timeout short enough for a fast test, long enough for a loaded machine to run a batch
HANG_S = 0.5
#: bound of waits in these tests (never a timing assertion)
WAIT_S = 30.0


@pytest.fixture
def fns(tmp_path: Path) -> str:
    return user_module(tmp_path, """
        import threading

        RELEASE = threading.Event()

        def wait_forever(batch):
            RELEASE.wait()
            return batch

        class Thing:
            pass

        def bad_seq(batch):
            if 7 in batch.column("seq").to_pylist():
                raise ValueError(f"refusing seq 7 of {Thing()!r}")
            return batch
    """)


def _program(tmp_path: Path, fn: str, *, parallelism: int = 1, sink: dict[str, object] | None = None) -> Program:
    pipeline = PipelineSpec.model_validate({
        "name": "failures", "parallelism": parallelism,
        "operators": [
            {"id": "gen", "type": "generator", "splits": parallelism, "limit": 100, "batch_size": 10},
            {"id": "step", "type": "map", "fn": fn},
            sink or {"id": "out", "type": "null"},
        ],
    })
    return compile_program(pipeline, JobConfig())


def _subtask(tmp_path: Path, program: Program, *, generation: int = 1, index: int = 0,
             hang_timeout_s: float = HANG_S) -> SubtaskRunner:
    return SubtaskRunner(ref=SubtaskRef(chain=0, index=index), program=program, job_id=JOB, generation=generation,
                         store=CheckpointStore(str(tmp_path / "ckpt"), JOB), restore=None,
                         on_event=lambda *a: None, hang_timeout_s=hang_timeout_s)


async def test_a_user_function_that_never_returns_fails_its_task_naming_it(fns: str, tmp_path: Path) -> None:
    import importlib

    module = importlib.import_module(fns)
    st = _subtask(tmp_path, _program(tmp_path, f"{fns}:wait_forever"))
    await st.open()
    run = asyncio.ensure_future(st.run())
    ticks = 0
    try:
        while not run.done():  # the loop keeps running while the function does not return
            await asyncio.sleep(0.01)
            ticks += 1
            assert ticks < WAIT_S / 0.01, "the hung task was never failed"
        with pytest.raises(TaskError) as err:
            await run
    finally:
        module.RELEASE.set()  # let the thread go: nothing of this test outlives it
    e = err.value
    assert e.message == f"operator 'step' (map {fns}:wait_forever) did not return within {HANG_S:g} s"
    assert (e.operator, e.domain, e.retryable) == ("step", "user", True)
    source = (tmp_path / f"{fns}.py").read_text().splitlines()
    line = source.index("    RELEASE.wait()") + 1
    assert e.traceback is not None and f'{fns}.py", line {line}, in wait_forever' in e.traceback, e.traceback
    assert ticks > 10, "the event loop was blocked while the function hung"
    assert st.state == "failed"


async def test_the_same_bad_record_fails_the_same_way_in_every_generation(fns: str, tmp_path: Path) -> None:
    """The controller recognises a deterministic failure by an identical message, so the message
    holds no generation, subtask or memory address."""
    program = _program(tmp_path, f"{fns}:bad_seq", parallelism=2)
    messages = []
    for generation, index in ((1, 0), (2, 1)):
        st = _subtask(tmp_path, program, generation=generation, index=index)
        await st.open()
        with pytest.raises(TaskError) as err:
            await asyncio.wait_for(st.run(), WAIT_S)
        messages.append(err.value.message)
        assert err.value.traceback is not None and "in bad_seq" in err.value.traceback
    assert messages[0] == messages[1], messages
    assert messages[0].startswith(f"operator 'step' (map {fns}:bad_seq) raised ValueError: refusing seq 7 of <")
    assert "0x..." in messages[0], "the address of the repr is masked"


async def test_a_sink_path_under_a_regular_file_is_a_user_error_naming_it(tmp_path: Path) -> None:
    mod = user_module(tmp_path, "def f(batch):\n    return batch\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    out = blocker / "out"
    program = _program(tmp_path, f"{mod}:f", sink={"id": "out", "type": "files", "path": str(out)})
    assert program.chain_of("out") == 0, "one chain: generator, map and sink fused"
    st = _subtask(tmp_path, program)
    with pytest.raises(TaskError) as err:
        await st.open()
    e = err.value
    assert (e.domain, e.retryable, e.operator) == ("user", False, "out")
    assert "files sink 'out'" in e.message and str(out) in e.message and "Not a directory" in e.message, e.message


def _runner(runner_id: str, pid: int, port: int) -> RunnerInfo:
    return RunnerInfo(runner_id=runner_id, generation=3, host="127.0.0.1", control_port=port, pid=pid, slots=2)


def _window_program() -> Program:
    pipeline = PipelineSpec.model_validate({
        "name": "w", "parallelism": 2,
        "operators": [
            {"id": "events", "type": "generator", "splits": 2},
            {"id": "by_key", "type": "key_by", "key": ["key"]},
            {"id": "window", "type": "tumbling_window", "size_ms": 1000, "aggregates": [{"fn": "count"}]},
            {"id": "out", "type": "null"},
        ],
    })
    return compile_program(pipeline, JobConfig())


def test_a_silent_runner_is_named_with_pid_host_and_operators() -> None:
    program = _window_program()
    runners = [_runner("r-1", 123, 4001), _runner("r-2", 124, 4002)]
    view = JobView(program=program)
    window_chain = program.chain_of("window")
    view.ran["r-1"] = {f"{window_chain}/0"}
    msg = lost_message(runners[0], RunnerSilent("x", silent_s=10.0), view, runners)
    ops = ", ".join(f"{op}[0]" for op in program.chains[window_chain].operators)
    assert msg == f"runner r-1 (pid 123 on 127.0.0.1) sent nothing for 10 s (hung, stopped or cut off); it ran {ops}"
    # A runner that never said which subtasks it has: named from the assignment.
    gone = RunnerUnavailable(
        f"runner r-2 ({runners[1].control_url}) event stream: connection lost (runner process exited?)"
    )
    msg = lost_message(runners[1], gone, view, runners)
    assert msg.startswith(
        "runner r-2 (pid 124 on 127.0.0.1) is gone: connection lost (runner process exited?); it ran "
    )
    assert msg.split("; it ran ")[1] != "no subtasks"


def test_status_lines_show_reason_failure_traceback_and_rejected_command() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    failure = Failure(
        message="operator 'parse' (map m:parse) raised ValueError: bad", domain="user", operator="parse",
        traceback=(
            'Traceback (most recent call last):\n  File "/src/m.py", line 12, in parse\n'
            '    raise ValueError("bad")\nValueError: bad\n'
        ),
    )
    status = JobStatus(
        job_id="j", pipeline_name="p", state="Failed", generation=4, epoch=2, restarts=2, config=JobConfig(),
        failure=failure,
        transitions=[
            TransitionRecord(time=now, from_state="Failing", to_state="Failed", reason="the same failure 3 times")
        ],
        rejected_commands=[RejectedCommand(time=now, command="rescale", payload={"parallelism": 0},
                                           reason="parallelism must be >= 1")],
    )
    lines = status_lines(status)
    assert lines[0] == "j: Failed (generation 4, epoch 2, restarts 2)"
    assert lines[1] == "last transition: Failing -> Failed at 2026-01-02 03:04:05 UTC: the same failure 3 times"
    assert lines[2] == "restarts: 2 (20 allowed; the count resets after 120 s healthy)"
    assert lines[3] == "failure (user, operator 'parse'): operator 'parse' (map m:parse) raised ValueError: bad"
    assert '      File "/src/m.py", line 12, in parse' in lines  # indented under the failure
    assert lines[-1] == ('last rejected command: rescale {"parallelism": 0} at 2026-01-02 03:04:05 UTC: '
                         "parallelism must be >= 1")
    # While recovering, the error being recovered from is shown (failure is None then).
    recovering = status.model_copy(update={"state": "Recovering", "failure": None, "last_error": failure})
    assert any(line.startswith("last error (user, operator 'parse'): ") for line in status_lines(recovering))
    assert os.linesep not in "".join(lines)
