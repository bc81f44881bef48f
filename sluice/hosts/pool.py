"""A pool of warm runner processes: started ahead of need, handed an assignment when one comes.

A runner started cold pays a full interpreter start plus the pyarrow, engine and aiohttp imports
(about a second) before it serves. A `WarmPool` keeps `size` processes that already did that
(`python -m sluice.runner --warm`, see sluice/runner/__main__.py) waiting on their stdin;
`ProcessScheduler(pool=...)` hands a runner's assignment to one and the pool starts a
replacement in the background.

Guarantees:

- `take()` never blocks on a process start: it returns a process that has finished its imports
  and is alive as far as the pool knows, or None at once.
- Warm processes get the same environment as cold runners (minus any token: theirs comes with
  the assignment) and are started the same way (own session, no inherited descriptors, reaped by
  a thread of this pool, also after `take()`). Until assigned they log to `log_path`.
- A warm process that dies, or has not finished its imports within `ready_timeout_s`, is
  discarded (killed if needed) and replaced; processes that keep dying before they are ready are
  replaced with a growing back-off, so a broken installation does not spin.
- `close()` ends every warm process the pool still holds (stdin EOF: they exit 0; one still
  importing gets SIGTERM too; SIGKILL after a grace) and starts no more; processes already taken
  are runners now and are not touched. If the pool's process dies without `close()`, the warm
  processes see EOF and exit by themselves.
- Where the system reports no process start times (no /proc), a warm-started runner could not be
  told from a later process under the same PID, so could never be stopped safely: there the pool
  stays empty and every runner starts cold.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sluice.procstat import start_ticks_supported
from sluice.runner.protocol import READY_LINE, WARM_FLAG
from sluice.schedulers.process import RUNNER_MODULE, runner_env

log = logging.getLogger("sluice.hosts.pool")

DEFAULT_POOL_SIZE = 2
"""Warm processes kept by default: enough for a generation of one or two runners per host at once."""
READY_TIMEOUT_S = 60.0
"""A warm process that has not finished its imports after this long is killed and replaced."""
CLOSE_GRACE_S = 5.0
"""After closing their stdin, how long `close()` waits for warm processes to exit before SIGKILL."""
KILL_WAIT_S = 5.0
"""After SIGKILL, how long `close()` waits for a warm process to be gone."""
RESPAWN_BACKOFF_S = 0.5
"""Delay before replacing a process that died before it was ready; doubles each time in a row."""
MAX_RESPAWN_BACKOFF_S = 30.0
"""Upper bound of that delay."""
SUPERVISE_INTERVAL_S = 1.0
"""How often the refill thread looks for warm processes past READY_TIMEOUT_S when nothing else
wakes it."""


@dataclass(eq=False)
class _Warm:
    """One warm process the pool holds (from its start until it is taken or gone)."""

    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


class WarmPool:
    """Keeps `size` warm runner processes (see the module docstring for the guarantees).

    `size` 0 disables the pool (`take()` always returns None). `log_path` receives the output of
    warm processes until they are assigned. `env` defaults to a runner's environment
    (`sluice.schedulers.process.runner_env`). Filling starts at construction.
    """

    def __init__(
        self,
        log_path: Path,
        size: int = DEFAULT_POOL_SIZE,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0 (got {size})")
        if size > 0 and not start_ticks_supported():
            log.warning("no process start times on this system (no /proc): warm pool disabled")
            size = 0
        self.size = size
        self.log_path = Path(log_path)
        self.python = python
        self.ready_timeout_s = ready_timeout_s
        self._env = dict(env) if env is not None else runner_env(None)
        self._cond = threading.Condition()
        self._held: list[_Warm] = []  # started and not yet taken, in start order
        self._closed = False
        self._backoff_s = RESPAWN_BACKOFF_S
        self._next_start_at = 0.0  # monotonic; no start before (back-off after early deaths)
        self._thread: threading.Thread | None = None
        if self.size > 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._refill_loop, name="warm-pool-refill", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------------------- public

    def take(self) -> subprocess.Popen[bytes] | None:
        """A ready warm process (oldest first), now the caller's to assign with
        `sluice.schedulers.process.send_assignment`; None when none is ready. Never waits for a
        start. The pool's thread keeps reaping it, so its `returncode` is set when it exits (the
        scheduler relies on that, as on its own reaper thread for a cold runner)."""
        with self._cond:
            if self._closed:
                return None
            for w in self._held:
                if w.ready and w.proc.returncode is None:
                    self._held.remove(w)
                    self._cond.notify_all()  # the refill thread starts a replacement
                    return w.proc
            return None

    def ready_count(self) -> int:
        """How many warm processes `take()` could hand out right now."""
        with self._cond:
            return sum(1 for w in self._held if w.ready and w.proc.returncode is None)

    def pids(self) -> list[int]:
        """PIDs of the warm processes the pool holds (starting or ready), in start order."""
        with self._cond:
            return [w.proc.pid for w in self._held]

    def wait_ready(self, timeout_s: float, count: int | None = None) -> bool:
        """Wait until `count` (default: `size`) warm processes are ready; False on timeout or
        when the pool is closed. For start-up and tests; `take()` itself never waits."""
        want = self.size if count is None else min(count, self.size)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._closed:
                if sum(1 for w in self._held if w.ready and w.proc.returncode is None) >= want:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return False

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop refilling and end every warm process the pool holds: close its stdin (it exits 0;
        one not ready yet is also sent SIGTERM), SIGKILL it if it is still there after `grace_s`.
        Returns once they are all gone (or, for one that survived SIGKILL for KILL_WAIT_S, logs
        it). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            # At most one start in flight; after this join nothing adds to _held any more.
            self._thread.join()
        with self._cond:
            held, self._held = self._held, []
        for w in held:
            _close_stdin(w.proc)
            if not w.ready:
                # Still importing: it would only see the EOF after its imports, and it has nothing
                # to lose (no signal handlers before an assignment). Our unreaped child: PID is its.
                w.proc.terminate()
        deadline = time.monotonic() + grace_s
        for w in held:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("warm process %d did not exit on stdin EOF within %g s: SIGKILL", w.proc.pid, grace_s)
                # Safe: it is our child and not yet reaped (returncode None), so the PID is its own.
                w.proc.kill()
                try:
                    w.proc.wait(timeout=KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    log.error("warm process %d survived SIGKILL", w.proc.pid)

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------- internals

    def _refill_loop(self) -> None:
        """Keep `size` processes held: start one whenever fewer are (outside the lock, so
        `take()` never waits for a start), kill those past the ready timeout."""
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    for w in self._held:
                        if not w.ready and now - w.started > self.ready_timeout_s and w.proc.returncode is None:
                            log.warning(
                                "warm process %d not ready after %g s: killing it", w.proc.pid, self.ready_timeout_s
                            )
                            w.proc.kill()  # its watcher sees EOF, reaps it and drops it
                    if len(self._held) < self.size and now >= self._next_start_at:
                        break
                    wait_s = SUPERVISE_INTERVAL_S
                    if len(self._held) < self.size:
                        wait_s = min(wait_s, self._next_start_at - now)
                    self._cond.wait(max(wait_s, 0.0))
            try:
                w = self._start_one()
            except OSError as e:
                log.error("cannot start a warm runner process: %s", e)
                with self._cond:
                    self._note_early_death()
                continue
            with self._cond:
                # Held even if closed meanwhile: close() joins this thread, then ends _held.
                self._held.append(w)
                self._cond.notify_all()
            threading.Thread(target=self._watch, args=(w,), name=f"warm-runner-{w.proc.pid}", daemon=True).start()

    def _start_one(self) -> _Warm:
        cmd = [self.python, "-m", RUNNER_MODULE, WARM_FLAG]
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,  # the assignment line; EOF = the pool closed
                stdout=subprocess.PIPE,  # the readiness line only (the process sends the rest to stderr)
                stderr=log_file,
                env=self._env,
                start_new_session=True,  # like a cold runner: it outlives us and leads its group
                close_fds=True,
            )
        log.debug("started warm runner process %d", proc.pid)
        return _Warm(proc)

    def _watch(self, w: _Warm) -> None:
        """Mark `w` ready when it says so; reap it when it exits (taken or not), and drop it."""
        assert w.proc.stdout is not None
        try:
            line = w.proc.stdout.readline(len(READY_LINE))  # blocks until ready, or EOF if it died
        except (OSError, ValueError):
            line = b""
        finally:
            w.proc.stdout.close()
        if line == READY_LINE:
            with self._cond:
                w.ready = True
                self._backoff_s = RESPAWN_BACKOFF_S
                self._cond.notify_all()
        code = w.proc.wait()  # the only reaper of this process, before and after take()
        with self._cond:
            if w in self._held:
                self._held.remove(w)
                if not w.ready:
                    log.warning("warm process %d exited with code %d before it was ready (see %s)",
                                w.proc.pid, code, self.log_path)
                    self._note_early_death()
                elif not self._closed:
                    log.info("warm process %d exited with code %d while waiting: replacing it", w.proc.pid, code)
                self._cond.notify_all()

    def _note_early_death(self) -> None:
        """Delay the next start (under the lock): processes that die before ready must not spin."""
        self._next_start_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, MAX_RESPAWN_BACKOFF_S)


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass


__all__ = ["DEFAULT_POOL_SIZE", "WarmPool"]
