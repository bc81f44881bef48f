"""A subtask's own thread for synchronous work that runs user code, watched for hangs.

User functions (``map``/``filter`` ``fn``) are arbitrary Python: one may block on the network, or
never return. Run on the runner's event loop, such a call would also stop its HTTP API, its
heartbeats and every other subtask, and the controller could only notice that the whole runner
went silent. Run here instead, the loop stays free while it waits for the result, and a call that
takes longer than the hang timeout is noticed and named (:class:`CallThread` reports how long the
current call has been running; the task's watchdog decides).

Guarantees:

* calls run one at a time, in submission order, on one daemon thread (so operators are never
  touched by two threads at once, and a call that never returns cannot keep the process from
  exiting);
* the awaiting side may give up on a call (a hang, a cancellation) without corrupting anything:
  the thread finishes it whenever it returns and its result is dropped;
* :meth:`CallThread.after_current` runs cleanup only once no call is in progress.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_names = itertools.count(1)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # given up on (hang, cancellation): the late result is dropped
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class CallThread:
    """One daemon thread running submitted callables for one subtask."""

    def __init__(self, name: str | None = None) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop] | None
        ] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._started_at: float | None = None  # monotonic start of the call in progress
        self._after: list[Callable[[], None]] = []
        self._thread = threading.Thread(
            target=self._main, name=name or f"sluice-user-{next(_names)}", daemon=True
        )
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread's id (for :func:`sluice.engine.tracebacks.thread_traceback`)."""
        return self._thread.ident

    def busy_for(self, now: float | None = None) -> float | None:
        """Seconds the call in progress has been running, or None when idle."""
        started = self._started_at
        if started is None:
            return None
        return (time.monotonic() if now is None else now) - started

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn`; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, fut, loop))
        return fut

    def after_current(self, cleanup: Callable[[], None]) -> None:
        """Run `cleanup` now if no call is in progress, else on the thread once the call ends."""
        with self._lock:
            if self._started_at is not None:
                self._after.append(cleanup)
                return
        cleanup()

    def close(self) -> None:
        """Let the thread end after the calls already queued (it never blocks the caller)."""
        self._jobs.put(None)

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut, loop = job
            if fut.done():  # cancelled before it started
                continue
            with self._lock:
                self._started_at = time.monotonic()
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                error = exc
            with self._lock:
                self._started_at = None
                after, self._after = self._after, []
            for cleanup in after:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - cleanup must not kill the thread
                    pass
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
