"""The process scheduler with real runner processes on loopback: start, list, stop, guards.

Every runner a test starts is stopped by the test's own finalizer (through the scheduler, by PID);
the `state_dir` fixture of conftest sweeps anything left as a second line of defence.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from sluice.models import RunnerInfo
from sluice.runner.server import write_info_file
from sluice.schedulers import RunnerStartError
from sluice.schedulers.process import ProcessScheduler, is_runner_process
from sluice.settings import runners_dir
from tests.processes import pid_exists, wait_pids_gone

SECRET = b"test-secret"
START_TIMEOUT_S = 30.0
GONE_TIMEOUT_S = 5.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent




@pytest_asyncio.fixture
async def scheduler(state_dir: Path) -> AsyncIterator[ProcessScheduler]:
    """A scheduler on a fresh state dir; every runner of every job it knows is stopped after."""
    sched = ProcessScheduler(state_dir, SECRET)
    yield sched
    root = runners_dir(state_dir)
    if root.exists():
        for job_dir in root.iterdir():
            await sched.stop_runners(job_dir.name, grace_s=1.0)


async def test_start_list_and_stop(scheduler: ProcessScheduler, state_dir: Path) -> None:
    infos = await scheduler.start_runners("job-1", 1, 2, 3, START_TIMEOUT_S)
    assert [i.runner_id for i in infos] == ["g1-r0", "g1-r1"]
    gen_dir = runners_dir(state_dir) / "job-1" / "gen-1"
    for n, info in enumerate(infos):
        assert info.generation == 1 and info.slots == 3 and info.host == "127.0.0.1"
        assert info.pid is not None and pid_exists(info.pid)
        assert is_runner_process(info.pid, "job-1", 1)
        on_disk = RunnerInfo.model_validate_json((gen_dir / f"runner-{n}.json").read_text())
        assert on_disk == info
        assert (gen_dir / f"runner-{n}.log").exists()
        # The token is in the environment only, never on the command line.
        cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
        assert b"--job-id\0job-1\0" in cmdline and b"token" not in cmdline.lower()
    assert sorted(r.runner_id for r in scheduler.runners("job-1")) == ["g1-r0", "g1-r1"]

    pids = [i.pid for i in infos if i.pid]
    assert await scheduler.stop_runners("job-1", grace_s=2.0) == 2
    assert await wait_pids_gone(pids) == []
    assert list(gen_dir.glob("*.json")) == []
    assert scheduler.runners("job-1") == []
    # Idempotent: nothing left to stop.
    assert await scheduler.stop_runners("job-1") == 0
    # SIGTERM is a clean exit for the runner (exit code 0 is logged as a shutdown, not a crash).
    assert "shutting down: SIGTERM" in (gen_dir / "runner-0.log").read_text()


async def test_stop_by_generation(scheduler: ProcessScheduler) -> None:
    old = await scheduler.start_runners("job-g", 1, 1, 1, START_TIMEOUT_S)
    new = await scheduler.start_runners("job-g", 2, 1, 1, START_TIMEOUT_S)
    assert await scheduler.stop_runners("job-g", below_generation=2, grace_s=2.0) == 1
    assert await wait_pids_gone([old[0].pid]) == []  # type: ignore[list-item]
    assert [r.generation for r in scheduler.runners("job-g")] == [2]
    assert pid_exists(new[0].pid)  # type: ignore[arg-type]
    assert await scheduler.stop_runners("job-g", generation=2, grace_s=2.0) == 1
    assert await wait_pids_gone([new[0].pid]) == []  # type: ignore[list-item]


async def test_restarting_a_generation_replaces_its_runners(scheduler: ProcessScheduler) -> None:
    """A retried start (e.g. after a controller crash) stops the attempt's leftovers first."""
    first = await scheduler.start_runners("job-r", 1, 1, 1, START_TIMEOUT_S)
    second = await scheduler.start_runners("job-r", 1, 1, 1, START_TIMEOUT_S)
    assert first[0].pid != second[0].pid
    assert await wait_pids_gone([first[0].pid]) == []  # type: ignore[list-item]
    assert [r.pid for r in scheduler.runners("job-r")] == [second[0].pid]


async def test_stop_from_a_fresh_process(scheduler: ProcessScheduler, state_dir: Path) -> None:
    """Runners survive their starter and are found and stopped by another process (on disk)."""
    infos = await scheduler.start_runners("job-f", 1, 1, 1, START_TIMEOUT_S)
    code = (
        "import asyncio, sys; from pathlib import Path;"
        "from sluice.schedulers.process import ProcessScheduler;"
        "print(asyncio.run(ProcessScheduler(Path(sys.argv[1])).stop_runners('job-f', grace_s=2.0)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(state_dir)],
        capture_output=True, text=True, timeout=30, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert await wait_pids_gone([infos[0].pid]) == []  # type: ignore[list-item]


async def test_pid_reuse_guard(scheduler: ProcessScheduler, state_dir: Path) -> None:
    """An info file whose PID is not a runner of that job is never signalled, only removed."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake = runners_dir(state_dir) / "job-p" / "gen-1" / "runner-0.json"
        write_info_file(fake, RunnerInfo(runner_id="x", generation=1, control_port=1, pid=bystander.pid, slots=1))
        # Also a real runner of *another* job, named in this job's directory.
        other = await scheduler.start_runners("job-other", 1, 1, 1, START_TIMEOUT_S)
        fake2 = runners_dir(state_dir) / "job-p" / "gen-1" / "runner-1.json"
        write_info_file(fake2, other[0])

        assert await scheduler.stop_runners("job-p", grace_s=0.5) == 0
        assert bystander.poll() is None and pid_exists(other[0].pid)  # type: ignore[arg-type]
        assert not fake.exists() and not fake2.exists()
        assert scheduler.runners("job-p") == []
    finally:
        bystander.kill()
        bystander.wait()


async def test_early_exit_reports_the_log_tail(state_dir: Path, tmp_path: Path) -> None:
    fake_python = tmp_path / "fake-python"
    fake_python.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    sched = ProcessScheduler(state_dir, SECRET, python=str(fake_python))
    with pytest.raises(RunnerStartError) as err:
        await sched.start_runners("job-e", 1, 1, 1, START_TIMEOUT_S)
    assert "code 3" in str(err.value) and "boom: cannot start" in str(err.value)


async def test_startup_timeout_kills_what_it_started(state_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    slow.chmod(0o755)
    sched = ProcessScheduler(state_dir, SECRET, python=str(slow))
    with pytest.raises(RunnerStartError, match="not serving after"):
        await sched.start_runners("job-t", 1, 1, 1, 0.5)
    assert await wait_pids_gone([int(pid_file.read_text())]) == []


async def test_orphaned_runner_exits_by_itself(state_dir: Path) -> None:
    sched = ProcessScheduler(state_dir, SECRET, orphan_timeout_s=0.5)
    try:
        infos = await sched.start_runners("job-o", 1, 1, 1, START_TIMEOUT_S)
        assert await wait_pids_gone([infos[0].pid], timeout_s=5.0) == []  # type: ignore[list-item]
        assert sched.runners("job-o") == []
        log = (runners_dir(state_dir) / "job-o" / "gen-1" / "runner-0.log").read_text()
        assert "orphaned" in log
    finally:
        await sched.stop_runners("job-o", grace_s=1.0)


def test_runner_token_not_inherited_secret(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child environment carries the runner token but never the shared secret."""
    monkeypatch.setenv("SLUICE_SECRET", "do-not-leak")
    env = ProcessScheduler(state_dir, SECRET)._child_env("tok")
    assert env["SLUICE_RUNNER_TOKEN"] == "tok"
    assert "SLUICE_SECRET" not in env
    assert os.environ["SLUICE_SECRET"] == "do-not-leak"
