"""Warm runners: `python -m sluice.runner --warm`, the WarmPool, and ProcessScheduler(pool=...).

Real processes on loopback. Every runner a test starts is stopped through the scheduler (by PID,
after the start-time check); every warm process the pool holds is ended by the `pool` fixture's
`close()`, which also checks none is left; taken processes that never became runners are ended
by closing their stdin. The `state_dir` fixture of conftest sweeps runners as a second line of
defence.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.auth import runner_token
from sluice.hosts.pool import WarmPool
from sluice.models import RunnerInfo
from sluice.procstat import process_start_ticks
from sluice.runner.client import RunnerClient
from sluice.runner.protocol import WarmAssignment
from sluice.runner.server import write_info_file
from sluice.schedulers import RunnerStartError
from sluice.schedulers.process import (
    ProcessScheduler,
    is_runner_process,
    runner_env,
    send_assignment,
)
from sluice.settings import runners_dir
from tests.processes import pid_exists, wait_pids_gone

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="warm runners need /proc")

SECRET = b"test-secret"
JOB = "job-warm"
START_TIMEOUT_S = 30.0
POOL_READY_S = 30.0
"""Generous: a warm process imports pyarrow and the engine (about half a second alone)."""
EXIT_TIMEOUT_S = 10.0
TAKE_MAX_S = 0.1
"""take() must answer at once, also while a replacement is starting."""
ADVERTISED = "runner-host.invalid"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[WarmPool]:
    """A one-process pool; closed after the test, which must leave none of its processes."""
    p = WarmPool(tmp_path / "warm-pool.log", size=1)
    seen: set[int] = set()
    try:
        yield p
        seen.update(p.pids())
    finally:
        seen.update(p.pids())
        p.close()
    assert [pid for pid in seen if pid_exists(pid)] == []


def gen_dir(state_dir: Path, generation: int) -> Path:
    return runners_dir(state_dir) / JOB / f"gen-{generation}"


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """The exit code of a process the pool reaps (its `returncode` is set by the pool's thread)."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while proc.returncode is None:
        assert time.monotonic() < deadline, f"process {proc.pid} did not exit"
        await asyncio.sleep(0.05)
    return proc.returncode


async def test_warm_runner_serves_logs_and_stops_on_sigterm(state_dir: Path, pool: WarmPool) -> None:
    assert pool.wait_ready(POOL_READY_S)
    [warm_pid] = pool.pids()
    sched = ProcessScheduler(state_dir, SECRET, pool=pool, advertise_host=ADVERTISED)
    try:
        [info] = await sched.start_runners(JOB, 3, 1, 2, START_TIMEOUT_S)
        assert info.pid == warm_pid  # the warm process became the runner
        assert (info.runner_id, info.generation, info.slots, info.host) == ("g3-r0", 3, 2, ADVERTISED)
        assert info.started_ticks is not None and info.started_ticks == process_start_ticks(warm_pid)
        on_disk = RunnerInfo.model_validate_json((gen_dir(state_dir, 3) / "runner-0.json").read_text())
        assert on_disk == info

        # Neither the job nor the token is on its command line, nor the token in its environment.
        token = runner_token(SECRET, JOB, 3)
        assert b"--warm" in cmdline(warm_pid) and b"--job-id" not in cmdline(warm_pid)
        assert token.encode() not in cmdline(warm_pid)
        assert token.encode() not in Path(f"/proc/{warm_pid}/environ").read_bytes()

        # It serves this job and generation (dialled on loopback: the advertised name is fake).
        async with RunnerClient(info.model_copy(update={"host": "127.0.0.1"}), JOB, token) as client:
            health = await client.health()
        assert (health["job_id"], health["generation"], health["pid"]) == (JOB, 3, warm_pid)

        # Its output is in its own log, not in the pool's.
        log_text = (gen_dir(state_dir, 3) / "runner-0.log").read_text()
        assert "[g3-r0 g3]" in log_text and "serving on" in log_text
        assert "g3-r0" not in pool.log_path.read_text()

        assert is_runner_process(warm_pid, JOB, 3, started_ticks=info.started_ticks)
        assert not is_runner_process(warm_pid, JOB, 3)  # no job on its command line, no start time
        assert sched.runners(JOB) == [info]

        assert await sched.stop_runners(JOB, grace_s=2.0) == 1
        assert await wait_pids_gone([warm_pid]) == []
        assert "shutting down: SIGTERM" in (gen_dir(state_dir, 3) / "runner-0.log").read_text()
        assert list(gen_dir(state_dir, 3).glob("*.json")) == []
        assert sched.runners(JOB) == []
        # The pool replaced what was taken.
        assert pool.wait_ready(POOL_READY_S)
        assert warm_pid not in pool.pids()
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


async def test_warm_runner_ignoring_sigterm_is_sigkilled(state_dir: Path, pool: WarmPool) -> None:
    assert pool.wait_ready(POOL_READY_S)
    sched = ProcessScheduler(state_dir, SECRET, pool=pool)
    try:
        [info] = await sched.start_runners(JOB, 1, 1, 1, START_TIMEOUT_S)
        assert info.pid is not None and b"--warm" in cmdline(info.pid)
        os.kill(info.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM; SIGKILL ends it
        assert await sched.stop_runners(JOB, grace_s=0.5) == 1
        assert await wait_pids_gone([info.pid]) == []
        assert "shutting down" not in (gen_dir(state_dir, 1) / "runner-0.log").read_text()
        assert list(gen_dir(state_dir, 1).glob("*.json")) == []
    finally:
        await sched.stop_runners(JOB, grace_s=0.5)


async def test_pid_reuse_guard_checks_the_start_time(state_dir: Path, pool: WarmPool) -> None:
    """A warm runner is signalled only when its start time is the one its info file recorded."""
    assert pool.wait_ready(POOL_READY_S)
    sched = ProcessScheduler(state_dir, SECRET, pool=pool)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        [info] = await sched.start_runners(JOB, 1, 1, 1, START_TIMEOUT_S)
        assert info.pid is not None and info.started_ticks is not None
        info_path = gen_dir(state_dir, 1) / "runner-0.json"
        # The same PID with another start time: a later process under a reused PID.
        write_info_file(info_path, info.model_copy(update={"started_ticks": info.started_ticks + 1}))
        assert not is_runner_process(info.pid, JOB, 1, started_ticks=info.started_ticks + 1)
        assert await sched.stop_runners(JOB, grace_s=0.5) == 0
        assert pid_exists(info.pid)
        assert not info_path.exists()  # stale, as far as the scheduler can tell: removed, not signalled

        # A live process with the right start time that is no runner is refused too.
        bystander_ticks = process_start_ticks(bystander.pid)
        assert bystander_ticks is not None
        assert not is_runner_process(bystander.pid, JOB, 1, started_ticks=bystander_ticks)
        write_info_file(
            gen_dir(state_dir, 2) / "runner-0.json",
            RunnerInfo(runner_id="x", generation=2, control_port=1, pid=bystander.pid, slots=1,
                       started_ticks=bystander_ticks),
        )  # fmt: skip
        assert await sched.stop_runners(JOB, generation=2, grace_s=0.5) == 0
        assert bystander.poll() is None

        # With the true start time back, the runner is found and stopped.
        write_info_file(info_path, info)
        assert await sched.stop_runners(JOB, grace_s=2.0) == 1
        assert await wait_pids_gone([info.pid]) == []
    finally:
        bystander.kill()
        bystander.wait()
        await sched.stop_runners(JOB, grace_s=0.5)


async def test_mixed_warm_and_cold_start(state_dir: Path, pool: WarmPool) -> None:
    """More runners than ready warm processes: the rest start cold, and all serve alike."""
    assert pool.wait_ready(POOL_READY_S)
    [warm_pid] = pool.pids()
    sched = ProcessScheduler(state_dir, SECRET, pool=pool, advertise_host=ADVERTISED)
    try:
        infos = await sched.start_runners(JOB, 2, 2, 1, START_TIMEOUT_S)
        assert [i.runner_id for i in infos] == ["g2-r0", "g2-r1"]
        assert infos[0].pid == warm_pid
        cold_pid = infos[1].pid
        assert cold_pid is not None
        assert b"--job-id\0job-warm\0" in cmdline(cold_pid)
        assert b"--advertise-host\0" + ADVERTISED.encode() in cmdline(cold_pid)
        assert {i.host for i in infos} == {ADVERTISED}
        assert sorted(r.runner_id for r in sched.runners(JOB)) == ["g2-r0", "g2-r1"]
        assert await sched.stop_runners(JOB, grace_s=2.0) == 2
        assert await wait_pids_gone([warm_pid, cold_pid]) == []
    finally:
        await sched.stop_runners(JOB, grace_s=0.5)


async def test_warm_runner_failing_before_serving_reports_its_log(state_dir: Path, pool: WarmPool) -> None:
    """Same error and cleanup as a cold start; the tail of the runner's own log says why."""
    assert pool.wait_ready(POOL_READY_S)
    sched = ProcessScheduler(state_dir, SECRET, pool=pool, host="256.0.0.1")  # cannot be bound
    with pytest.raises(RunnerStartError) as err:
        await sched.start_runners(JOB, 1, 1, 1, START_TIMEOUT_S)
    message = str(err.value)
    assert "exited with code 1 before serving" in message and "warm process" in message
    assert "256.0.0.1" in message or "gaierror" in message or "Name or service" in message
    assert sched.runners(JOB) == []


async def test_pool_refills_after_take_and_take_never_waits(tmp_path: Path) -> None:
    pool = WarmPool(tmp_path / "warm-pool.log", size=2)
    seen: set[int] = set()
    try:
        assert pool.wait_ready(POOL_READY_S)
        before = pool.pids()
        seen.update(before)
        taken = pool.take()
        assert taken is not None and taken.pid in before
        t0 = time.monotonic()
        other = pool.take()  # the second ready one, while the first's replacement starts
        assert other is not None and other.pid in before and other.pid != taken.pid
        assert pool.take() is None  # both replacements are still importing: no wait for them
        assert time.monotonic() - t0 < TAKE_MAX_S
        assert pool.wait_ready(POOL_READY_S)
        after = pool.pids()
        seen.update(after)
        assert len(after) == 2 and not set(after) & {taken.pid, other.pid}
        # A taken process that is never assigned exits quietly when its stdin closes.
        for proc in (taken, other):
            assert proc.stdin is not None
            proc.stdin.close()
            assert await wait_exit(proc) == 0
    finally:
        seen.update(pool.pids())
        pool.close()
    assert [pid for pid in seen if pid_exists(pid)] == []
    assert pool.take() is None


async def test_close_ends_starting_processes_too(tmp_path: Path) -> None:
    pool = WarmPool(tmp_path / "warm-pool.log", size=2)
    deadline = time.monotonic() + POOL_READY_S
    while len(pool.pids()) < 2:  # started, most likely still importing
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    pids = pool.pids()
    pool.close()
    assert [pid for pid in pids if pid_exists(pid)] == []
    assert pool.pids() == []


async def test_dead_warm_process_is_discarded(tmp_path: Path) -> None:
    pool = WarmPool(tmp_path / "warm-pool.log", size=1)
    seen: set[int] = set()
    try:
        assert pool.wait_ready(POOL_READY_S)
        [dead] = pool.pids()
        seen.add(dead)
        os.kill(dead, signal.SIGKILL)  # our own child, not reaped yet: the PID is still its
        deadline = time.monotonic() + POOL_READY_S
        while dead in pool.pids():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert pool.wait_ready(POOL_READY_S)
        taken = pool.take()
        assert taken is not None and taken.pid != dead
        seen.add(taken.pid)

        # A process that died after take(): its assignment cannot be delivered (the scheduler then
        # starts the runner cold).
        taken.kill()
        await wait_exit(taken)
        assignment = WarmAssignment(
            job_id=JOB, generation=1, runner_id="g1-r0", slots=1, info_file=tmp_path / "i.json",
            orphan_timeout_s=1.0, token="t",
        )  # fmt: skip
        assert send_assignment(taken, assignment) is False
    finally:
        seen.update(pool.pids())
        pool.close()
    assert [pid for pid in seen if pid_exists(pid)] == []


def test_disabled_pool_starts_nothing(tmp_path: Path) -> None:
    pool = WarmPool(tmp_path / "warm-pool.log", size=0)
    assert pool.take() is None and pool.pids() == [] and pool.wait_ready(0.0)
    pool.close()
    assert not (tmp_path / "warm-pool.log").exists()


def run_warm(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.runner", "--warm"],
        input=stdin, capture_output=True, env=runner_env(None), timeout=START_TIMEOUT_S, check=False,
    )  # fmt: skip


def test_warm_mode_exits_quietly_on_eof() -> None:
    out = run_warm(b"")
    assert (out.returncode, out.stdout, out.stderr) == (0, b"ready\n", b"")


def test_warm_mode_rejects_a_bad_line_without_echoing_it(tmp_path: Path) -> None:
    secret_token = "TOKEN-MUST-NOT-LEAK"
    bad = WarmAssignment(
        job_id=JOB, generation=1, runner_id="g1-r0", slots=1, info_file=tmp_path / "i.json",
        orphan_timeout_s=1.0, token=secret_token,
    ).model_dump_json().replace('"slots":1', '"slots":0')  # fmt: skip
    out = run_warm(bad.encode() + b"\n")
    assert out.returncode == 2
    assert b"bad assignment line" in out.stderr and b"slots" in out.stderr
    assert secret_token.encode() not in out.stderr + out.stdout
    assert not (tmp_path / "i.json").exists()

    not_json = run_warm(b"--job-id j\n")
    assert not_json.returncode == 2 and b"bad assignment line" in not_json.stderr

    extra = subprocess.run(
        [sys.executable, "-m", "sluice.runner", "--warm", "--job-id", "j"],
        capture_output=True, env=runner_env(None), timeout=START_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert extra.returncode == 2 and b"takes no other arguments" in extra.stderr


def test_warm_assignment_repr_hides_the_token(tmp_path: Path) -> None:
    a = WarmAssignment(
        job_id=JOB, generation=1, runner_id="r", slots=1, info_file=tmp_path / "i", orphan_timeout_s=1.0,
        token="TOKEN-MUST-NOT-LEAK",
    )  # fmt: skip
    assert "TOKEN-MUST-NOT-LEAK" not in repr(a) and "TOKEN-MUST-NOT-LEAK" not in str(a)
