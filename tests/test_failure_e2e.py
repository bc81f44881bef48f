"""Failures a user must be told about clearly and quickly, end to end: a real Temporal dev server,
the session's controller worker, real runner processes, real files.

* a map function that raises on one record: the job fails (a failure that repeats identically is
  not retried through the whole restart budget) and `status` / `sluice status` name the operator,
  the function's exception and its file and line;
* a map function that never returns: the task fails after the job's task hang timeout, naming the
  operator and function (and the line it is stuck on); the job recovers, and fails once the same
  hang repeated;
* a runner frozen with SIGSTOP: noticed by the runner heartbeat timeout, named with its pid and
  the operators it ran; the job runs again on a new generation and its output is exactly once;
* a files sink path that cannot be created: the job fails at once, user domain, naming the path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sluice.client import JobClient
from sluice.hosts.host import DEFAULT_HANG_TIMEOUT_S
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.e2e_helpers import (
    assert_exact_output,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    pid_is_runner,
    read_committed_rows,
    sink_path,
    stop_job_quietly,
    wait_state,
    wait_status,
)
from tests.pipeline_functions import BAD_SEQ

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
#: bound of every wait for a state; far above what each needs, never a timing assertion
FAIL_TIMEOUT_S = 120.0
FINISH_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 60.0
#: the hang timeout the hang test configures (the smallest a job accepts is 1 s)
HANG_TIMEOUT_S = 2.0

RAISES = "tests.pipeline_functions:raises_on_one_record"
SLEEPS = "tests.pipeline_functions:sleeps_forever"
FUNCTIONS_FILE = Path(PROJECT_ROOT) / "tests" / "pipeline_functions.py"


def _line_of(text: str, path: Path = FUNCTIONS_FILE) -> int:
    """1-based line number of the first line of `path` containing `text`."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} is not in {path}")


def _sluice_status(address: str, job_id: str) -> str:
    """What `sluice status JOB` prints (a real subprocess, as a user runs it)."""
    done = subprocess.run(
        sluice_command("status", job_id), cwd=PROJECT_ROOT, env=cli_env(address), capture_output=True,
        text=True, timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_map_that_raises_on_one_record_fails_the_job_naming_operator_and_line(
    job_client: JobClient, temporal_address: str, state_dir: Path
) -> None:
    pipeline = generator_pipeline("fail-record", state_dir / "out", splits=2, limit=400, transforms=(("map", RAISES),))
    spec = job_spec(pipeline, state_dir)  # the default restart budget (20)
    await job_client.start(spec)
    try:
        failed = await wait_state(job_client, spec.job_id, "Failed", timeout_s=FAIL_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    failure = failed.failure
    assert failure is not None, describe_status(failed)
    expected = f"operator 'map0' (map {RAISES}) raised ValueError: bad record: split 0 seq {BAD_SEQ}"
    assert (failure.domain, failure.operator) == ("user", "map0"), describe_status(failed)
    assert expected in failure.message, failure.message
    line = _line_of('raise ValueError(f"bad record')
    assert failure.traceback is not None, describe_status(failed)
    assert f'pipeline_functions.py", line {line}, in raises_on_one_record' in failure.traceback, failure.traceback
    assert "sluice/engine" not in failure.traceback, "only the user's frames"
    assert failed.restarts < spec.config.allowed_restarts, "a repeating failure must not use the whole budget"

    shown = await asyncio.to_thread(_sluice_status, temporal_address, spec.job_id)
    assert f"{spec.job_id}: Failed" in shown, shown
    assert "failure (user, operator 'map0'): " in shown and expected in shown, shown
    assert f'line {line}, in raises_on_one_record' in shown, shown
    assert "last transition: " in shown, shown


@pytest.mark.slow
async def test_map_that_never_returns_is_named_after_the_hang_timeout(
    job_client: JobClient, state_dir: Path
) -> None:
    pipeline = generator_pipeline("hang", state_dir / "out", splits=1, limit=None, rate=100,
                                  transforms=(("map", SLEEPS),))
    spec = job_spec(pipeline, state_dir, task_hang_timeout_s=HANG_TIMEOUT_S)
    await job_client.start(spec)
    pids: set[int] = set()
    try:
        running = await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        pids |= {r.pid for r in running.runners if r.pid}
        expected = f"operator 'map0' (map {SLEEPS}) did not return within {HANG_TIMEOUT_S:g} s"
        seen = await wait_status(
            job_client, spec.job_id,
            lambda s: any(t.to_state == "Recovering" and expected in t.reason for t in s.transitions),
            timeout_s=FAIL_TIMEOUT_S, what=f"Recovering because {expected!r}",
        )
        pids |= {r.pid for r in seen.runners if r.pid}
        # The same hang every generation: deterministic, so the job fails without its whole budget.
        failed = await wait_state(job_client, spec.job_id, "Failed", timeout_s=FAIL_TIMEOUT_S)
        assert failed.failure is not None and failed.failure.operator == "map0", describe_status(failed)
        assert expected in failed.failure.message, failed.failure.message
        line = _line_of("time.sleep(3600)")
        assert failed.failure.traceback is not None, describe_status(failed)
        assert f'pipeline_functions.py", line {line}, in sleeps_forever' in failed.failure.traceback
        assert failed.restarts < spec.config.allowed_restarts, describe_status(failed)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert not [p for p in pids if pid_is_runner(p, spec.job_id)], "a runner with a hung function outlived the job"


@pytest.mark.slow
async def test_stopped_runner_is_named_and_replaced_with_output_exactly_once(
    job_client: JobClient, client: Any, state_dir: Path
) -> None:
    # Two runner processes (parallelism 2, one slot each); one of them is frozen with SIGSTOP.
    pipeline = generator_pipeline("sigstop", state_dir / "out", splits=4, limit=3000, rate=300)
    spec = job_spec(pipeline, state_dir, parallelism=2, slots_per_runner=1)  # default heartbeat timeout
    expected = expected_rows(pipeline)
    await job_client.start(spec)
    victim: int | None = None
    try:
        before = await wait_status(job_client, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                                   timeout_s=START_TIMEOUT_S, what="Running with a first checkpoint")
        assert len(before.runners) == 2, describe_status(before)
        victim = before.runners[0].pid
        assert victim is not None and pid_is_runner(victim, spec.job_id)
        os.kill(victim, signal.SIGSTOP)

        again = await wait_status(
            job_client, spec.job_id, lambda s: s.state == "Running" and s.generation > before.generation,
            timeout_s=FAIL_TIMEOUT_S, what="Running again on a new generation",
        )
        reasons = [t.reason for t in again.transitions if t.to_state == "Recovering"]
        assert reasons, describe_status(again)
        reason = reasons[-1]
        # Its host noticed: after the host's hang timeout, or the job's heartbeat timeout if shorter.
        timeout = min(spec.config.runner_heartbeat_timeout_s, DEFAULT_HANG_TIMEOUT_S)
        host = before.runners[0].host_id
        assert (
            f"(pid {victim} on host {host}) sent nothing for {timeout:g} s (hung, stopped or cut off)" in reason
        ), reason
        ran = reason.split("; it ran ", 1)[1]
        assert "events[" in ran and "out[" in ran, reason
        assert not pid_is_runner(victim, spec.job_id), "the frozen runner of the old generation was not removed"

        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.generation == again.generation, describe_status(done)
        assert_exact_output(read_committed_rows(sink_path(pipeline)), expected)
    finally:
        if victim is not None and pid_is_runner(victim, spec.job_id):
            os.kill(victim, signal.SIGCONT)  # never leave a stopped process behind
            os.kill(victim, signal.SIGKILL)
        await stop_job_quietly(job_client, spec.job_id)


async def test_sink_path_that_cannot_be_created_fails_the_job_at_once(
    job_client: JobClient, state_dir: Path
) -> None:
    blocker = state_dir / "a-file"
    blocker.write_text("a regular file where the sink wants a directory\n")
    out = blocker / "out"
    pipeline = generator_pipeline("bad-sink", out, splits=1, limit=100)
    spec = job_spec(pipeline, state_dir)
    await job_client.start(spec)
    try:
        failed = await wait_state(job_client, spec.job_id, "Failed", timeout_s=FAIL_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    failure = failed.failure
    assert failure is not None and failure.domain == "user", describe_status(failed)
    assert "files sink 'out'" in failure.message and str(out) in failure.message, failure.message
    assert "Not a directory" in failure.message, failure.message
    assert failed.restarts == 0, f"retrying cannot create the path: {describe_status(failed)}"
