"""The `process` scheduler: runners as local subprocesses (`python -m sluice.runner`).

Guarantees:

- Runners are started in their own session, so they survive the controller worker that started
  them (a job keeps running across controller restarts); whoever started one reaps it (a waiter
  thread per child), so no zombies are left behind while the starter lives.
- Everything needed to find a runner later is on disk, under
  `settings.runners_dir(state_dir)/{job}/gen-{G}/`: `runner-{i}.json` (its RunnerInfo, written
  atomically by the runner once it serves) and `runner-{i}.log` (its stdout and stderr). So any
  controller worker process, including a fresh one, can list and stop a job's runners.
- Only runners are ever signalled: before any signal the PID must be a live `sluice.runner` and
  either its command line names the job and generation (`... --job-id J --generation G`), or it
  names no job (a warm-started runner, `sluice.runner --warm`) and its start time equals the
  `started_ticks` its info file recorded. Both guard against PID reuse (`is_runner_process`).
- With a `WarmPool` (sluice.hosts.pool), a runner is handed to a pre-started warm process when one
  is ready, else started cold; either way the call ends the same (info file, errors, cleanup).
- The runner token travels in the child's environment (cold) or its stdin pipe (warm) only; the
  shared secret never does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from sluice.auth import TOKEN_ENV, runner_token
from sluice.models import RunnerInfo
from sluice.procstat import process_start_ticks
from sluice.runner.protocol import WARM_FLAG, WarmAssignment
from sluice.schedulers import RunnerStartError
from sluice.settings import SECRET_ENV, load_secret, runners_dir

if TYPE_CHECKING:
    from sluice.hosts.pool import WarmPool

log = logging.getLogger("sluice.schedulers.process")

RUNNER_MODULE = "sluice.runner"
DEFAULT_GRACE_S = 5.0
"""SIGTERM-to-SIGKILL grace of stop_runners."""
DEFAULT_ORPHAN_TIMEOUT_S = 300.0
"""Passed to runners: they exit when no controller contacted them for this long."""
POLL_INTERVAL_S = 0.05
"""How often we look for info files and for processes that are gone."""
FIRST_READY_POLL_S = 0.005
"""First wait between looks for info files; doubles up to POLL_INTERVAL_S. A warm runner serves
within a few tens of milliseconds, so a fixed 50 ms poll would be most of its start time."""
KILL_WAIT_S = 5.0
"""After SIGKILL, how long we wait for the process to disappear before giving up on it."""
LEFTOVER_GRACE_S = 1.0
"""Grace for leftovers of a previous attempt at the same generation (a retried start)."""
LOG_TAIL_BYTES = 4000
"""How much of a failed runner's log goes into the error message."""


def runner_env(token: str | None) -> dict[str, str]:
    """The environment of a runner process: ours, minus the shared secret, plus the runner token
    (`None`: no token at all, for warm processes that get theirs on stdin), with PYTHONPATH
    such that the child imports this very sluice, even when it is not installed."""
    env = dict(os.environ)
    env.pop(SECRET_ENV, None)  # runners need their token, never the secret behind all tokens
    if token is None:
        env.pop(TOKEN_ENV, None)
    else:
        env[TOKEN_ENV] = token
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")  # logs reach the file as they happen
    return env


def job_dir_name(job_id: str) -> str:
    """A file-name-safe, reversible name for a job id (job ids are free-form workflow ids)."""
    name = quote(job_id, safe="-_")
    # "." and ".." (and hidden names) must not be interpreted by the file system.
    return "%2E" + name[1:] if name.startswith(".") else name


@dataclass
class _Starting:
    """A runner process this call started (cold) or handed an assignment to (warm)."""

    runner_id: str
    proc: subprocess.Popen[bytes]
    info_path: Path
    log_path: Path
    warm: bool


class ProcessScheduler:
    """Starts and stops runner subprocesses on this host (see the module docstring).

    `host`: the address runners bind (control and data ports); `advertise_host`: the address they
    write in their info file for controllers and peers to dial (None: `host`, or this machine's
    name when `host` is a wildcard). `pool`: warm processes to hand runners to; it belongs to the
    caller, who closes it (the runners it became are not affected).
    """

    def __init__(
        self,
        state_dir: Path,
        secret: bytes | None = None,
        *,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        orphan_timeout_s: float = DEFAULT_ORPHAN_TIMEOUT_S,
        python: str = sys.executable,
        pool: WarmPool | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        # Only starting runners needs the secret (to derive their token); stopping and listing
        # work without it, e.g. from a cleanup script.
        self._secret = secret
        self.host = host
        self.advertise_host = advertise_host
        self.orphan_timeout_s = orphan_timeout_s
        self.python = python
        self.pool = pool
        # Runners this process started (by PID), for their exit codes: a host reports how one ended.
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------------------- layout

    def job_dir(self, job_id: str) -> Path:
        return runners_dir(self.state_dir) / job_dir_name(job_id)

    def generation_dir(self, job_id: str, generation: int) -> Path:
        return self.job_dir(job_id) / f"gen-{generation}"

    def _info_files(
        self,
        job_id: str,
        generation: int | None = None,
        below_generation: int | None = None,
        indices: range | None = None,
    ) -> list[tuple[int, Path]]:
        """(generation, info file) of every runner on disk for the job, filtered."""
        out: list[tuple[int, Path]] = []
        job_dir = self.job_dir(job_id)
        if not job_dir.is_dir():
            return out
        for gen_dir in job_dir.glob("gen-*"):
            try:
                gen = int(gen_dir.name.removeprefix("gen-"))
            except ValueError:
                continue
            if generation is not None and gen != generation:
                continue
            if below_generation is not None and gen >= below_generation:
                continue
            for p in sorted(gen_dir.glob("runner-*.json")):
                if indices is None or _index_of(p) in indices:
                    out.append((gen, p))
        return sorted(out)

    # ---------------------------------------------------------------------------- start

    async def start_runners(
        self, job_id: str, generation: int, count: int, slots: int, timeout_s: float, first_index: int = 0
    ) -> list[RunnerInfo]:
        """Start `count` runners of `slots` slots for (job, generation); return once all serve.

        Runners are numbered `first_index ..` (a generation spread over several hosts numbers its
        runners across them). Each runner is handed to a ready warm process of the pool when there
        is one, else started cold. Leftovers of an earlier attempt at the same runners are stopped
        first, so a retried call starts a clean set. Raises RunnerStartError with the log tail
        when a runner exits early or `timeout_s` passes; then every runner this call started has
        been killed.
        """
        if count < 0 or slots < 1 or first_index < 0:
            raise ValueError(
                f"count and first_index must be >= 0 and slots >= 1 "
                f"(got count={count}, slots={slots}, first_index={first_index})"
            )
        indices = range(first_index, first_index + count)
        await self.stop_runners(job_id, generation=generation, grace_s=LEFTOVER_GRACE_S, indices=indices)
        gen_dir = self.generation_dir(job_id, generation)
        gen_dir.mkdir(parents=True, exist_ok=True)
        secret = self._secret if self._secret is not None else load_secret(self.state_dir)
        token = runner_token(secret, job_id, generation)
        env = self._child_env(token)

        spawned: list[_Starting] = []
        try:
            for i in indices:
                runner_id = f"g{generation}-r{i}"
                info_path = gen_dir / f"runner-{i}.json"
                log_path = gen_dir / f"runner-{i}.log"
                info_path.unlink(missing_ok=True)
                proc = self._hand_to_warm(job_id, generation, runner_id, slots, info_path, log_path, token)
                warm = proc is not None
                if proc is None:
                    proc = self._spawn(job_id, generation, runner_id, slots, info_path, log_path, env)
                spawned.append(_Starting(runner_id, proc, info_path, log_path, warm))
            return await self._wait_ready(spawned, timeout_s)
        except BaseException:
            # Nothing half-started survives a failed (or cancelled) start.
            for s in spawned:
                if s.proc.returncode is None:  # once reaped, its PID may be someone else's
                    _kill_group(s.proc.pid, signal.SIGKILL)
                s.info_path.unlink(missing_ok=True)
            raise

    def _child_env(self, token: str) -> dict[str, str]:
        return runner_env(token)

    def _hand_to_warm(
        self,
        job_id: str,
        generation: int,
        runner_id: str,
        slots: int,
        info_path: Path,
        log_path: Path,
        token: str,
    ) -> subprocess.Popen[bytes] | None:
        """Give the runner's assignment to a ready warm process of the pool; None when there is
        none (or it died before it could read the assignment): then the caller starts it cold."""
        if self.pool is None:
            return None
        proc = self.pool.take()
        if proc is None:
            return None
        assignment = WarmAssignment(
            job_id=job_id,
            generation=generation,
            runner_id=runner_id,
            slots=slots,
            info_file=info_path,
            log_file=log_path,
            host=self.host,
            advertise_host=self.advertise_host,
            orphan_timeout_s=self.orphan_timeout_s,
            token=token,
        )
        self.children[proc.pid] = proc
        if not send_assignment(proc, assignment):
            log.warning("warm process %d was gone before its assignment; starting %s cold", proc.pid, runner_id)
            return None
        log.info(
            "handed runner %s to warm process %d for job %s generation %d", runner_id, proc.pid, job_id, generation
        )
        return proc

    def _spawn(
        self,
        job_id: str,
        generation: int,
        runner_id: str,
        slots: int,
        info_path: Path,
        log_path: Path,
        env: dict[str, str],
    ) -> subprocess.Popen[bytes]:
        cmd = [
            self.python, "-m", RUNNER_MODULE,
            "--job-id", job_id,
            "--generation", str(generation),
            "--runner-id", runner_id,
            "--slots", str(slots),
            "--info-file", str(info_path),
            "--host", self.host,
            "--orphan-timeout", str(self.orphan_timeout_s),
        ]  # fmt: skip
        if self.advertise_host is not None:
            cmd += ["--advertise-host", self.advertise_host]
        with open(log_path, "ab") as log_file:
            # Not asyncio's subprocess: its transport kills the child when closed or collected,
            # and runners must outlive this event loop and this process.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        threading.Thread(target=proc.wait, name=f"reap-runner-{proc.pid}", daemon=True).start()
        self.children[proc.pid] = proc
        log.info("started runner %s (pid %d) for job %s generation %d", runner_id, proc.pid, job_id, generation)
        return proc

    async def _wait_ready(self, spawned: list[_Starting], timeout_s: float) -> list[RunnerInfo]:
        deadline = time.monotonic() + timeout_s
        ready: dict[int, RunnerInfo] = {}
        poll_s = FIRST_READY_POLL_S
        while len(ready) < len(spawned):
            for i, s in enumerate(spawned):
                if i in ready:
                    continue
                info = _read_info(s.info_path)
                if info is not None and info.pid == s.proc.pid:
                    ready[i] = info
                    continue
                if s.proc.returncode is not None:  # set by the reaper thread (the pool's if warm)
                    raise RunnerStartError(
                        f"runner {s.runner_id} exited with code {s.proc.returncode} before serving; "
                        f"log {s.log_path}{self._warm_note(s)}:\n{_tail(s.log_path)}"
                    )
            if len(ready) == len(spawned):
                break
            if time.monotonic() >= deadline:
                late = [spawned[i] for i in range(len(spawned)) if i not in ready]
                first = late[0]
                raise RunnerStartError(
                    f"{len(late)} runner(s) not serving after {timeout_s:g} s (first: {first.runner_id}); "
                    f"log {first.log_path}{self._warm_note(first)}:\n{_tail(first.log_path)}"
                )
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 2, POLL_INTERVAL_S)
        return [ready[i] for i in range(len(spawned))]

    def _warm_note(self, s: _Starting) -> str:
        """Where else a warm runner may have written (before reading its assignment)."""
        if not s.warm or self.pool is None:
            return ""
        return f" (warm process; before its assignment it logged to {self.pool.log_path})"

    # ---------------------------------------------------------------------------- stop, list

    async def stop_runners(
        self,
        job_id: str,
        *,
        generation: int | None = None,
        below_generation: int | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        indices: range | None = None,
    ) -> int:
        """SIGTERM the job's runners (all, one generation, or every generation below N), SIGKILL
        what is left after `grace_s` (at once if it is 0), and remove their info files. Returns
        how many live runners were signalled; idempotent (a second call finds none). Works from any process: runners
        are found on disk and verified (PID, then command line or start time) before any signal."""
        targets: list[tuple[RunnerInfo, int, Path]] = []
        for gen, info_path in self._info_files(job_id, generation, below_generation, indices):
            info = _read_info(info_path)
            if info is None or info.pid is None:
                continue  # not a complete info file: nothing we could safely signal
            if is_runner_process(info.pid, job_id, gen, started_ticks=info.started_ticks):
                targets.append((info, gen, info_path))
            else:
                info_path.unlink(missing_ok=True)  # stale: the runner is already gone
        if not targets:
            return 0
        first = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
        for info, gen, _ in targets:
            log.info("stopping runner %s (pid %d) of job %s generation %d with %s", info.runner_id, info.pid,
                     job_id, gen, first.name)  # fmt: skip
            _kill_group(info.pid, first)  # type: ignore[arg-type]
        alive = targets
        if first == signal.SIGTERM:
            alive = await _wait_gone(targets, job_id, grace_s)
            for info, gen, _ in alive:
                if is_runner_process(info.pid, job_id, gen, started_ticks=info.started_ticks):  # type: ignore[arg-type]
                    log.warning("runner %s (pid %d) ignored SIGTERM for %g s: SIGKILL", info.runner_id, info.pid,
                                grace_s)  # fmt: skip
                    _kill_group(info.pid, signal.SIGKILL)  # type: ignore[arg-type]
        still = await _wait_gone(alive, job_id, KILL_WAIT_S)
        for info, _, _ in still:
            log.error("runner %s (pid %d) survived SIGKILL", info.runner_id, info.pid)
        survivors = {path for _, _, path in still}
        for _, _, info_path in targets:
            if info_path not in survivors:
                info_path.unlink(missing_ok=True)
        return len(targets)

    def runner_infos(self, job_id: str) -> list[RunnerInfo]:
        """Every complete runner info file of the job on disk, live or not (a host adopts them
        and reports those whose process is gone)."""
        out: list[RunnerInfo] = []
        for _, info_path in self._info_files(job_id):
            info = _read_info(info_path)
            if info is not None and info.pid is not None:
                out.append(info)
        return out

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a runner this process started and that has exited (else None)."""
        proc = self.children.get(pid)
        return None if proc is None else proc.returncode

    def runners(self, job_id: str, generation: int | None = None) -> list[RunnerInfo]:
        """The job's live runners (optionally of one generation), read from their info files."""
        out: list[RunnerInfo] = []
        for gen, info_path in self._info_files(job_id, generation):
            info = _read_info(info_path)
            if (
                info is not None
                and info.pid is not None
                and is_runner_process(info.pid, job_id, gen, started_ticks=info.started_ticks)
            ):
                out.append(info)
        return out


# -------------------------------------------------------------------------------- processes


def _index_of(info_path: Path) -> int:
    """The runner index in an info file's name (`runner-3.json` -> 3; -1 if malformed)."""
    raw = info_path.stem.removeprefix("runner-")
    return int(raw) if raw.isdigit() else -1


def _read_info(path: Path) -> RunnerInfo | None:
    try:
        return RunnerInfo.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def _tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None if it does not exist (or is a zombie, whose argv is empty)."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir() or Path("/proc/self").is_dir():
        try:
            stat = (proc / "stat").read_text()
            # Field 3 (after the parenthesised command name) is the state; Z = zombie: gone.
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
            raw = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(
            ["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.split()[0].startswith("Z"):
        return None
    return out.split()[1:]


def _arg_after(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def is_runner_process(
    pid: int, job_id: str, generation: int | None = None, *, started_ticks: int | None = None
) -> bool:
    """True if `pid` is a live `sluice.runner` of this job (and generation, if given).

    A cold-started runner is recognised by its command line (`--job-id J --generation G`). A
    warm-started one (`sluice.runner --warm`, no job on its command line) only by its start time:
    `started_ticks`, from the info file being acted on, must equal the process's, so a PID reused
    by a later process (even a later warm runner) is refused. A command line that names a job is
    authoritative: a runner of another job is refused whatever its start time. Without /proc (no
    start times) warm runners are never recognised.
    """
    args = _cmdline(pid)
    if not args or RUNNER_MODULE not in args:
        return False
    named_job = _arg_after(args, "--job-id")
    if named_job is not None:
        if named_job != job_id:
            return False
        return generation is None or _arg_after(args, "--generation") == str(generation)
    if WARM_FLAG not in args or started_ticks is None:
        return False
    return process_start_ticks(pid) == started_ticks


def send_assignment(proc: subprocess.Popen[bytes], assignment: WarmAssignment) -> bool:
    """Write `assignment` as the one JSON line on a warm process's stdin, and close that pipe
    (the process reads no more). False when the process is gone (then it has been killed, so it
    cannot still act on a partial line), True when the line was delivered to its pipe."""
    if proc.stdin is None:
        raise ValueError(f"process {proc.pid} has no stdin pipe: not a warm runner from a WarmPool")
    line = assignment.model_dump_json().encode() + b"\n"
    try:
        # Far below the pipe's buffer (WarmAssignment is small), so this never blocks.
        proc.stdin.write(line)
        proc.stdin.flush()
    except OSError:  # BrokenPipeError: it died after take()
        proc.kill()
        return False
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
    return True


def _kill_group(pid: int, sig: signal.Signals) -> None:
    """Signal the runner and whatever it started (it leads its own process group)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _wait_gone(
    targets: list[tuple[RunnerInfo, int, Path]], job_id: str, timeout_s: float
) -> list[tuple[RunnerInfo, int, Path]]:
    """Wait until the targets' processes are gone; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [
            t for t in targets if is_runner_process(t[0].pid, job_id, t[1], started_ticks=t[0].started_ticks)  # type: ignore[arg-type]
        ]
        if not alive or time.monotonic() >= deadline:
            return alive
        await asyncio.sleep(POLL_INTERVAL_S)
