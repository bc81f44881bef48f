"""Shared test fixtures: one headless dev server and one in-process controller worker per session.

Everything binds to 127.0.0.1 on ports the OS picked, and every process started here is stopped
here, by its own PID:

- `dev_server` / `temporal_address`: a session-wide `temporal server start-dev` (headless, its own
  tmp state dir, SQLite file), stopped at session end.
- `client` / `job_client`: Temporal client (pydantic converter) and `JobClient` on it.
- `worker`: `sluice.worker.create_worker(client, session_state_dir)` running in the session's event
  loop on task queue "sluice" (the real one: tests share it, so there is one per session).
- `state_dir`: a fresh directory per test.
- `process_worker_factory`: starts `sluice worker` subprocesses (for tests that kill the
  controller worker); `run_process_worker` is the plain helper behind it.
- `dev_server_factory`: extra dev servers with extra dynamic config (e.g. a low
  `limit.historyCount.suggestContinueAsNew` for the continue-as-new test).
- `running_worker`: async context manager running an in-process worker against any client
  (for the extra servers).
- At session end (and after each test for its `state_dir`), runner processes left under the state
  dirs are killed: through `sluice.schedulers.process.ProcessScheduler`, and by the
  PIDs in the runner info files otherwise (only if that PID is still a sluice runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_asyncio

from sluice.client import JobClient, connect
from sluice.devserver import DevServer, free_port
from sluice.schedulers.process import ProcessScheduler
from sluice.worker import create_worker

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
PROCESS_STOP_TIMEOUT_S = 10.0
WORKER_SHUTDOWN_TIMEOUT_S = 30.0
PROCESS_WORKER_READY_S = 30.0
RUNNER_MARKER = "sluice.runner"  # what a runner's command line contains


# ------------------------------------------------------------------------------ processes


class ManagedProcess:
    """A subprocess a test started; `stop()` ends exactly this PID (SIGTERM, then SIGKILL)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the process can tell) and reap it."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=PROCESS_STOP_TIMEOUT_S)

    def stop(self, timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def cli_env(address: str, state_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for a `sluice` subprocess pointed at `address` (and `state_dir`)."""
    env = dict(os.environ)
    env["TEMPORAL_ADDRESS"] = address
    env["TEMPORAL_NAMESPACE"] = "default"
    # A worker subprocess's local host keeps no warm runners unless a test asks: dozens of
    # workers start in the fault suite and their idle warm processes would only load the CPU.
    env.setdefault("SLUICE_WARM_RUNNERS", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    if state_dir is not None:
        env["SLUICE_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


def sluice_command(*args: str) -> list[str]:
    """Command line running the `sluice` CLI with this interpreter."""
    return [sys.executable, "-m", "sluice.cli", *args]


def run_sluice(address: str, state_dir: Path, *args: str, env: dict[str, str] | None = None) -> ManagedProcess:
    """Start `sluice ARGS` (e.g. `host --slots 8`) as a subprocess against `address`, with
    `state_dir` as its state directory; output goes to `{state_dir}/{command}-{ns}.log`. The caller
    stops it (`stop()` / `kill()`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{args[0] if args else 'sluice'}-{time.time_ns()}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns the fd; closed below in the parent
    try:
        proc = subprocess.Popen(
            sluice_command(*args),
            cwd=PROJECT_ROOT,
            env={**cli_env(address, state_dir), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()
    return ManagedProcess(proc, log_path)


def run_process_worker(
    address: str, state_dir: Path, *, env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> ManagedProcess:
    """Start `sluice worker --state-dir state_dir [args]` as a subprocess against `address`.

    Returns at once (the worker polls once connected); the caller stops it (`stop()` / `kill()`).
    Output goes to `{state_dir}/worker-{ns}.log`.
    """
    return run_sluice(address, state_dir, "worker", "--state-dir", str(state_dir), *args, env=env)


def _pid_is_runner(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return RUNNER_MARKER in cmdline


def _pids_in_info_files(root: Path) -> set[int]:
    pids: set[int] = set()
    if not root.exists():
        return pids
    for path in root.rglob("*.json"):
        try:
            data: Any = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            pids.add(data["pid"])
    return pids


def _run_coroutine_in_thread(make: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from sync code, even when this thread runs an event loop."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0] if result else None


def kill_leftover_runners(state_dir: Path) -> list[int]:
    """Kill runner processes recorded under `state_dir`; returns the PIDs killed.

    First asks the process scheduler (its own bookkeeping) per job directory, then sweeps the
    info files for PIDs that are still sluice runners (so a PID reused by something else is
    never touched).
    """
    from sluice.settings import runners_dir

    root = runners_dir(state_dir)
    if not root.exists():
        return []
    scheduler = ProcessScheduler(state_dir)
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        job_id = unquote(job_dir.name)  # job dirs are quote()d job ids
        with contextlib.suppress(Exception):
            _run_coroutine_in_thread(lambda: scheduler.stop_runners(job_id))  # noqa: B023 - run here
    killed: list[int] = []
    for pid in sorted(_pids_in_info_files(root)):
        if pid != os.getpid() and _pid_is_runner(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


# ------------------------------------------------------------------------------ server


@pytest.fixture(scope="session")
def session_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """State dir of the session's in-process worker (runners, checkpoints, secret)."""
    path = tmp_path_factory.mktemp("sluice-session")
    yield path
    kill_leftover_runners(path)


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """The session's headless dev server on free loopback ports."""
    server = DevServer(
        tmp_path_factory.mktemp("temporal"), ip=LOOPBACK, port=free_port(LOOPBACK), headless=True
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def temporal_address(dev_server: DevServer) -> str:
    return dev_server.address


@pytest_asyncio.fixture(scope="session")
async def client(temporal_address: str) -> Any:
    """Temporal client with the pydantic data converter (same settings as the CLI)."""
    return await connect(temporal_address, "default")


@pytest_asyncio.fixture(scope="session")
async def job_client(client: Any) -> JobClient:
    return JobClient(client)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh state dir per test; runners left under it are killed afterwards."""
    path = tmp_path / "state"
    path.mkdir()
    yield path
    kill_leftover_runners(path)


@pytest.fixture(scope="session")
def dev_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DevServer]]:
    """Start extra headless dev servers: `factory(dynamic_config={...})`; stopped at session end."""
    started: list[DevServer] = []

    def factory(dynamic_config: dict[str, Any] | None = None, **kwargs: Any) -> DevServer:
        server = DevServer(
            tmp_path_factory.mktemp("temporal-extra"),
            ip=LOOPBACK,
            port=free_port(LOOPBACK),
            headless=True,
            dynamic_config=dynamic_config,
            **kwargs,
        )
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.stop()


# ------------------------------------------------------------------------------ workers


@contextlib.asynccontextmanager
async def running_worker(client: Any, state_dir: Path) -> AsyncIterator[Any]:
    """Run `create_worker(client, state_dir)` in this event loop for the `async with` body."""
    # No warm runners: tests steer their user functions through the environment and read the job
    # from a runner's command line, and a warm runner has both from before the test began.
    worker = create_worker(client, state_dir, warm_runners=0)
    task = asyncio.create_task(worker.run(), name="sluice-test-worker")
    try:
        yield worker
    finally:
        if not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.shutdown(), timeout=WORKER_SHUTDOWN_TIMEOUT_S)
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
        kill_leftover_runners(state_dir)


@pytest_asyncio.fixture(scope="session")
async def worker(client: Any, session_state_dir: Path) -> AsyncIterator[Any]:
    """The session's in-process controller worker (task queue "sluice")."""
    async with running_worker(client, session_state_dir) as w:
        yield w


@pytest.fixture
def process_worker_factory(temporal_address: str) -> Iterator[Callable[..., ManagedProcess]]:
    """Start `sluice worker` subprocesses (default: against the session server); stopped after the test."""
    started: list[ManagedProcess] = []

    def factory(state_dir: Path, address: str | None = None, **kwargs: Any) -> ManagedProcess:
        proc = run_process_worker(address or temporal_address, state_dir, **kwargs)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()
