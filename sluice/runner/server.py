"""The runner process: control API, event stream, metrics and supervision of its subtasks.

One `RunnerServer` per process serves one (job, generation). It guarantees:

- every request except `GET /metrics` is authenticated (bearer token, constant-time compare) and
  fenced (job and generation headers must name this runner's; 409 names both generations);
- malformed bodies get a 400 naming the field, and no request or subtask failure ends the process:
  only SIGTERM/SIGINT, `POST /shutdown` or the orphan timeout do, and they exit cleanly (code 0);
- each subtask runs in its own asyncio task; its end is reported once on the event stream as
  `task_finished` or `task_failed` (with message, retryable, domain, and the operator and user
  traceback when known); a user function that never returns fails its task after the start
  request's `task_hang_timeout_s` while the runner keeps serving;
- the info file is written atomically once the control port is bound, and removed on exit;
- a runner whose generation the store's fence has superseded (a subtask's checkpoint refused with
  StaleGeneration) reports that subtask's failure and stops every other subtask at once instead
  of running on: nothing it does can be committed any more.

The wire contract is docs/runner-protocol.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from sluice.auth import GENERATION_HEADER, JOB_HEADER, tokens_equal
from sluice.errors import StaleGeneration
from sluice.models import (
    RunnerEvent,
    RunnerInfo,
    StartRequest,
    SubtaskRef,
    SubtaskSnapshot,
)
from sluice.procstat import process_start_ticks
from sluice.runner.metrics import RunnerMetrics, heartbeat_metrics
from sluice.runner.protocol import (
    HEARTBEAT_INTERVAL_S,
    TERMINAL_TASK_STATES,
    CheckpointRequest,
    CheckpointWaitResult,
    StopRequest,
    describe_validation_error,
)

log = logging.getLogger("sluice.runner")

T = TypeVar("T", bound=BaseModel)

DEFAULT_ORPHAN_TIMEOUT_S = 300.0
"""A runner that has not heard from any controller for this long exits (protocol default)."""
MAX_CHECKPOINT_WAIT_S = 600.0
"""Upper bound of one GET /checkpoint/{E} wait, so a forgotten request never pins a connection."""
IMMEDIATE_STOP_CANCEL_S = 2.0
"""After `stop immediate`, a subtask that has not ended by itself within this is cancelled."""
SHUTDOWN_TASK_GRACE_S = 5.0
"""On exit, how long cancelled subtasks get to unwind before the process goes anyway."""
HTTP_SHUTDOWN_TIMEOUT_S = 2.0
"""How long in-flight HTTP requests get when the server closes."""
MAX_SUBSCRIBER_BACKLOG = 10_000
"""Events queued for one slow /events reader before its stream is closed (it reconnects and gets
a fresh `hello`); bounds memory instead of letting a stuck reader grow it forever."""
MAX_BODY_BYTES = 64 * 1024 * 1024
"""A StartRequest carries the whole program and restore manifest; allow generously large ones."""
WATCHDOG_INTERVAL_S = 1.0
# Checkpoint request times kept (for the duration metric); older epochs are long done.
EPOCHS_KEPT = 16

_DOMAINS = ("user", "internal", "external")


def _now() -> datetime:
    return datetime.now(UTC)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    """Every error body is JSON `{"error": message, ...}` (protocol)."""
    return web.json_response({"error": message, **extra}, status=status)


class _BadRequest(Exception):
    """A request body or parameter is malformed; becomes a 400 with this message."""


@dataclass
class StartFailure(Exception):
    """Opening the assigned subtasks failed; /start answers 400 with this."""

    message: str
    domain: str = "internal"
    retryable: bool = True
    operator: str | None = None
    traceback: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class _Subtask:
    """The runner's bookkeeping for one assigned subtask."""

    ref: SubtaskRef
    operators: list[str]
    is_source: bool
    task: Any  # sluice.engine.task.SubtaskRunner (imported lazily: the engine is optional to serve)
    outcome: str | None = None  # "finished" | "failed" once run() ended; then never changes
    error: str | None = None
    failed_event: RunnerEvent | None = None  # replayed to every new event stream
    aio_task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return self.ref.label()

    @property
    def state(self) -> str:
        if self.outcome is not None:
            return self.outcome
        state = getattr(self.task, "state", "starting")
        # A task that is done in the engine's eyes but whose run() has not returned yet is still
        # reported by the engine's own state; we only add the terminal outcome we observed.
        return str(state)

    def snapshot(self, epoch: int) -> SubtaskSnapshot | None:
        """The engine keeps the recent snapshots; the runner reads them from there."""
        return _as_snapshot(getattr(self.task, "snapshots", {}).get(epoch))


def _as_snapshot(raw: Any) -> SubtaskSnapshot | None:
    if raw is None:  # not taken yet
        return None
    if isinstance(raw, SubtaskSnapshot):
        return raw
    try:
        return SubtaskSnapshot.model_validate(raw)
    except ValidationError:
        log.error("engine reported an invalid snapshot: %r", raw)
        return None


class _Subscriber:
    """One open /events stream: a queue of events not yet written."""

    def __init__(self) -> None:
        self.items: deque[RunnerEvent] = deque()
        self.wake = asyncio.Event()
        self.closed = False
        self.last_write_ok = time.monotonic()

    def push(self, event: RunnerEvent | None) -> None:
        """Queue an event (None closes the stream); an overflowing reader is cut off."""
        if event is None or len(self.items) >= MAX_SUBSCRIBER_BACKLOG:
            self.closed = True
        else:
            self.items.append(event)
        self.wake.set()


class RunnerServer:
    """The control plane of one runner process (see the module docstring for its guarantees)."""

    def __init__(
        self,
        *,
        job_id: str,
        generation: int,
        runner_id: str,
        slots: int,
        token: str,
        info_file: Path | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        orphan_timeout_s: float = DEFAULT_ORPHAN_TIMEOUT_S,
    ) -> None:
        self.job_id = job_id
        self.generation = generation
        self.runner_id = runner_id
        self.slots = slots
        self._token = token
        self.info_file = info_file
        self.host = host
        self.advertise_host = advertise_host or _advertised(host)
        self.orphan_timeout_s = orphan_timeout_s
        self.info: RunnerInfo | None = None

        self._subtasks: dict[str, _Subtask] = {}
        self._start_request: StartRequest | None = None
        self._start_future: asyncio.Future[None] | None = None
        self._stop_mode: str | None = None
        self._superseded: str | None = None  # why the store refused this generation, once it did
        self._requested_epochs: dict[int, float] = {}  # epoch -> monotonic time of the request
        self._changed = asyncio.Event()
        self._subscribers: set[_Subscriber] = set()
        self._last_seen = time.monotonic()
        self._closing = False
        self._shutdown = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app_runner: web.AppRunner | None = None
        self._data_server: Any = None  # sluice.engine.channels.DataServer once started
        self._background: set[asyncio.Task[Any]] = set()
        self.metrics = RunnerMetrics(
            job_id=job_id,
            generation=generation,
            runner_id=runner_id,
            tasks=lambda: [(s.ref, s.task, s.state) for s in list(self._subtasks.values())],
        )

    # ---------------------------------------------------------------------------- lifecycle

    def app(self) -> web.Application:
        """The aiohttp application (routes + auth/fencing/error middleware)."""
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self._health)
        app.router.add_post("/start", self._start)
        app.router.add_post("/checkpoint", self._checkpoint)
        app.router.add_get("/checkpoint/{epoch}", self._wait_checkpoint)
        app.router.add_post("/stop", self._stop)
        app.router.add_get("/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/shutdown", self._shutdown_handler)
        return app

    async def start(self, port: int = 0) -> RunnerInfo:
        """Bind the control API and write the info file; returns what was written."""
        self._loop = asyncio.get_running_loop()
        family = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.setblocking(False)
        bound_port = sock.getsockname()[1]
        self._app_runner = web.AppRunner(
            self.app(), access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S
        )
        await self._app_runner.setup()
        await web.SockSite(self._app_runner, sock).start()
        from sluice.engine.channels import DataServer, token_authorizer

        # Peers' subtasks connect here to send records to ours (same interface as the control API).
        self._data_server = DataServer(token_authorizer(self.job_id, self.generation, self._token))
        await self._data_server.start(self.host, 0)
        self.info = RunnerInfo(
            runner_id=self.runner_id,
            generation=self.generation,
            host=self.advertise_host,
            control_port=bound_port,
            data_port=self._data_server.port,
            pid=os.getpid(),
            slots=self.slots,
            # Lets a scheduler verify this PID is still this process before it signals it, also
            # when the command line does not name the job (a warm-started runner).
            started_ticks=process_start_ticks(os.getpid()),
        )
        if self.info_file is not None:
            write_info_file(self.info_file, self.info)
        self._spawn(self._watchdog(), "orphan watchdog")
        log.info(
            "runner %s (job %s generation %d) serving on %s:%d",
            self.runner_id, self.job_id, self.generation, self.host, bound_port,
        )
        return self.info

    def request_shutdown(self, reason: str) -> None:
        """Ask the process to exit: tasks are cancelled, streams closed, the info file removed."""
        if self._closing:
            return
        log.info("shutting down: %s", reason)
        self._closing = True
        self._shutdown.set()

    async def serve_until_shutdown(self) -> int:
        """Serve until `request_shutdown`, then tear down; returns the process exit code (0)."""
        await self._shutdown.wait()
        await self._teardown()
        return 0

    async def _teardown(self) -> None:
        for st in self._subtasks.values():
            if st.outcome is None:
                _safe_call(st.task.stop, "immediate", what=f"stop {st.label}")
        pending = [st.aio_task for st in self._subtasks.values() if st.aio_task and not st.aio_task.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_TASK_GRACE_S)
        if self._start_future is not None and not self._start_future.done():
            self._start_future.cancel()
        for sub in list(self._subscribers):
            sub.push(None)
        for t in list(self._background):
            t.cancel()
        if self._data_server is not None:
            await self._data_server.close()
        if self._app_runner is not None:
            await self._app_runner.cleanup()
        if self.info_file is not None:
            remove_info_file_if_ours(self.info_file, os.getpid())

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        """A background task that is kept referenced and whose failure is logged, never raised."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.ensure_future(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _watchdog(self) -> None:
        """Exit when no controller has been heard from for the orphan timeout.

        An open event stream counts as contact only while writes to it succeed, so a reader behind
        a partition (writes block) does not keep the runner alive forever.
        """
        interval = min(WATCHDOG_INTERVAL_S, max(self.orphan_timeout_s / 4, 0.05))
        while not self._closing:
            await asyncio.sleep(interval)
            now = time.monotonic()
            last = max([self._last_seen, *(s.last_write_ok for s in self._subscribers)])
            if now - last > self.orphan_timeout_s:
                self.request_shutdown(
                    f"orphaned: no controller contact for {self.orphan_timeout_s:g} s"
                )

    # ---------------------------------------------------------------------------- middleware

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authentication, generation fencing, and errors as JSON (never an unhandled crash)."""
        try:
            if request.path != "/metrics":
                refused = self._authorize(request)
                if refused is not None:
                    return refused
                self._last_seen = time.monotonic()
            return await handler(request)
        except _BadRequest as e:
            return _error(400, str(e))
        except web.HTTPException as e:
            if e.status >= 400:
                return _error(e.status, e.reason)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a handler must not take the runner down
            log.exception("internal error serving %s %s", request.method, request.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    def _authorize(self, request: web.Request) -> web.Response | None:
        # Token first: an unauthenticated caller learns nothing about the job or its generation.
        auth = request.headers.get("Authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() != "bearer" or not tokens_equal(presented.strip(), self._token):
            return _error(401, "missing or wrong bearer token")
        job = request.headers.get(JOB_HEADER)
        raw_gen = request.headers.get(GENERATION_HEADER)
        if job is None:
            return _error(400, f"missing header {JOB_HEADER}")
        if raw_gen is None:
            return _error(400, f"missing header {GENERATION_HEADER}")
        try:
            gen = int(raw_gen)
        except ValueError:
            return _error(400, f"header {GENERATION_HEADER}: not an integer: {raw_gen!r}")
        if job != self.job_id or gen != self.generation:
            return _error(
                409,
                f"request for job {job!r} generation {gen}, but this runner serves job "
                f"{self.job_id!r} generation {self.generation}",
                runner_generation=self.generation,
                request_generation=gen,
            )
        return None

    async def _parse(self, request: web.Request, model: type[T]) -> T:
        raw_bytes = await request.read()
        try:
            raw = json.loads(raw_bytes or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _BadRequest(f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise _BadRequest("body is not a valid request: JSON nested too deeply") from None
        except ValueError:  # e.g. an integer of more digits than Python converts
            raise _BadRequest("body is not a valid request: a number has too many digits") from None
        if not isinstance(raw, dict):
            raise _BadRequest(f"body must be a JSON object, got {type(raw).__name__}")
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            raise _BadRequest(describe_validation_error(e)) from None

    # ---------------------------------------------------------------------------- views

    def _started_ok(self) -> bool:
        """True once POST /start has opened every assigned subtask successfully."""
        f = self._start_future
        return f is not None and f.done() and not f.cancelled() and f.exception() is None

    def task_states(self) -> dict[str, str]:
        """Subtask label -> state, for /health, hello and heartbeats."""
        return {label: st.state for label, st in self._subtasks.items()}

    def _event(self, kind: str, **fields: Any) -> RunnerEvent:
        return RunnerEvent(
            kind=kind,
            runner_id=self.runner_id,
            generation=self.generation,
            time=_now(),
            **fields,
        )

    def _broadcast(self, event: RunnerEvent) -> None:
        for sub in list(self._subscribers):
            sub.push(event)

    def _notify(self) -> None:
        """Wake every waiter on task state or snapshots (they re-evaluate their condition)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ---------------------------------------------------------------------------- handlers

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "runner_id": self.runner_id,
                "job_id": self.job_id,
                "generation": self.generation,
                "pid": os.getpid(),
                "started": self._started_ok(),
                # A start was asked for (perhaps still opening): a retried start activity must not
                # recover sinks under the tasks that request began.
                "start_requested": self._start_future is not None,
                "tasks": self.task_states(),
                # Set once the store refused this generation (a newer one started): why.
                "superseded": self._superseded,
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _shutdown_handler(self, request: web.Request) -> web.Response:
        # After the 202 is on its way: teardown waits for in-flight requests, this one included.
        asyncio.get_running_loop().call_soon(self.request_shutdown, "POST /shutdown")
        return web.json_response({"status": "shutting down"}, status=202)

    async def _start(self, request: web.Request) -> web.Response:
        req = await self._parse(request, StartRequest)
        if req.job_id != self.job_id or req.generation != self.generation:
            return _error(
                409,
                f"start request for job {req.job_id!r} generation {req.generation}, but this "
                f"runner serves job {self.job_id!r} generation {self.generation}",
            )
        if self._closing:
            return _error(409, "runner is shutting down")
        if self._start_future is None:
            if self._stop_mode is not None:
                return _error(409, f"runner was stopped ({self._stop_mode}); start a new generation")
            self._validate_assignment(req)
            self._start_request = req
            # Not tied to this request: a client that disconnects mid-open must not cancel it.
            self._start_future = asyncio.ensure_future(self._open_all(req))
        else:
            assert self._start_request is not None
            if _labels(req.subtasks) != _labels(self._start_request.subtasks):
                return _error(
                    409,
                    f"already started with subtasks {sorted(_labels(self._start_request.subtasks))}; "
                    f"this request assigns {sorted(_labels(req.subtasks))}",
                )
        try:
            await asyncio.shield(self._start_future)
        except StartFailure as e:
            return _error(400, e.message, domain=e.domain, retryable=e.retryable)
        return web.json_response({"tasks": self.task_states()})

    def _validate_assignment(self, req: StartRequest) -> None:
        seen: set[str] = set()
        for i, ref in enumerate(req.subtasks):
            if ref.chain < 0 or ref.chain >= len(req.program.chains):
                raise _BadRequest(
                    f"subtasks[{i}]: chain {ref.chain} does not exist "
                    f"(program has {len(req.program.chains)} chains)"
                )
            par = req.program.chains[ref.chain].parallelism
            if ref.index < 0 or ref.index >= par:
                raise _BadRequest(
                    f"subtasks[{i}]: index {ref.index} out of range for chain {ref.chain} "
                    f"(parallelism {par})"
                )
            if ref.label() in seen:
                raise _BadRequest(f"subtasks[{i}]: subtask {ref.label()} assigned twice")
            seen.add(ref.label())
        if len(req.subtasks) > self.slots:
            raise _BadRequest(
                f"subtasks: {len(req.subtasks)} assigned but this runner has {self.slots} slots"
            )

    async def _open_all(self, req: StartRequest) -> None:
        """Build every assigned subtask and open them concurrently; raise StartFailure on any error."""
        try:
            from sluice.engine.task import SubtaskRunner
            from sluice.runner.wiring import Wiring
            from sluice.storage import CheckpointStore

            store = CheckpointStore(req.checkpoint_url, req.job_id)
            wiring = Wiring(req, self.runner_id, self._data_server, self._token)
        except Exception as e:
            raise StartFailure(f"runner cannot load the engine: {type(e).__name__}: {e}") from e

        for ref in req.subtasks:
            chain = req.program.chains[ref.chain]
            try:
                channels = await wiring.channels_of(ref)
                task = SubtaskRunner(
                    ref=ref,
                    program=req.program,
                    job_id=req.job_id,
                    generation=req.generation,
                    store=store,
                    restore=req.restore,
                    on_event=self._on_engine_event,
                    inputs=channels.inputs,
                    outputs=channels.outputs,
                    hang_timeout_s=req.task_hang_timeout_s,
                )
            except Exception as e:
                await wiring.close()
                raise _start_failure(e, ref, chain.operators) from e
            self._subtasks[ref.label()] = _Subtask(
                ref=ref,
                operators=list(chain.operators),
                is_source=task.is_source,
                task=task,
            )
        self._notify()

        subtasks = list(self._subtasks.values())
        results = await asyncio.gather(*(st.task.open() for st in subtasks), return_exceptions=True)
        failures: list[StartFailure] = []
        for st, res in zip(subtasks, results):
            if isinstance(res, asyncio.CancelledError):
                raise res
            if isinstance(res, BaseException):
                failure = _start_failure(res, st.ref, st.operators)
                failures.append(failure)
                self._finish(st, "failed", failure)
        if failures:
            # Nothing runs half-started: the controller will tear this generation down; peers
            # waiting on our senders learn it now rather than then.
            await wiring.close()
            for st in subtasks:
                if st.outcome is None:
                    _safe_call(st.task.stop, "immediate", what=f"stop {st.label}")
                    self._finish(st, "finished", "not started: a sibling subtask failed to open")
            raise StartFailure(
                "; ".join(f.message for f in failures),
                domain=failures[0].domain,
                retryable=all(f.retryable for f in failures),
                operator=failures[0].operator,
                traceback=failures[0].traceback,
            )
        consumers = [st.task for st in subtasks if not st.is_source]
        for st in subtasks:
            if st.is_source and consumers:
                st.task.yield_to(lambda: sum(t.backlog() for t in consumers))
        for st in subtasks:
            st.aio_task = asyncio.ensure_future(self._run_one(st))
            self._broadcast(self._event("task_started", subtask=st.ref, tasks=self.task_states()))
            if self._stop_mode is not None:  # a stop arrived while we were opening
                self._stop_one(st, self._stop_mode)
        self._notify()

    async def _run_one(self, st: _Subtask) -> None:
        """Run one subtask to its end and report that end exactly once."""
        try:
            await st.task.run()
        except asyncio.CancelledError:
            self._finish(st, "finished", "cancelled")
        except Exception as e:
            failure = _start_failure(e, st.ref, st.operators, opening=False)
            log.warning("subtask %s failed: %s%s", st.label, failure.message,
                        f"\n{failure.traceback}" if failure.traceback else "")
            self._finish(st, "failed", failure)
            stale = StaleGeneration.found_in(e)
            if stale is not None:
                self._stop_superseded(stale)
        else:
            self._finish(st, "finished")

    def _stop_superseded(self, stale: StaleGeneration) -> None:
        """The store refused this generation: stop every subtask now (not retried: a newer
        generation runs the job), once."""
        if self._superseded is not None:
            return
        self._superseded = str(stale)
        log.warning("generation %d is superseded (%s): stopping every subtask", self.generation, stale)
        self._stop_mode = "immediate"
        for st in self._subtasks.values():
            if st.aio_task is not None:
                self._stop_one(st, "immediate")

    def _finish(self, st: _Subtask, outcome: str, why: StartFailure | str | None = None) -> None:
        """Record a subtask's end (`why`: the failure, or a note on a finish) and announce it once."""
        if st.outcome is not None:
            return
        st.outcome = outcome
        failure = why if isinstance(why, StartFailure) else None
        message = why.message if isinstance(why, StartFailure) else why  # `failure` is `why` then
        st.error = message if outcome == "failed" else None
        if outcome == "failed":
            event = self._event(
                "task_failed",
                subtask=st.ref,
                message=message,
                retryable=failure.retryable if failure is not None else True,
                domain=failure.domain if failure is not None and failure.domain in _DOMAINS else "internal",
                operator=failure.operator if failure is not None else None,
                traceback=failure.traceback if failure is not None else None,
                tasks=self.task_states(),
            )
            st.failed_event = event
        else:
            event = self._event("task_finished", subtask=st.ref, message=message, tasks=self.task_states())
        self._broadcast(event)
        self._notify()

    def _on_engine_event(self, kind: str, ref: SubtaskRef, fields: dict[str, Any]) -> None:
        """Callback given to every SubtaskRunner; safe to call from another thread."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            loop.call_soon_threadsafe(self._handle_engine_event, kind, ref, dict(fields))
        else:
            self._handle_engine_event(kind, ref, fields)

    def _handle_engine_event(self, kind: str, ref: SubtaskRef, fields: dict[str, Any]) -> None:
        try:
            if kind == "source_finished":
                self._broadcast(self._event("source_finished", subtask=ref, tasks=self.task_states()))
            elif kind == "checkpoint_done":
                epoch = int(fields["epoch"])
                requested = self._requested_epochs.get(epoch)
                if requested is not None:
                    self.metrics.observe_checkpoint(ref, time.monotonic() - requested)
                self._broadcast(self._event("checkpoint_done", subtask=ref, epoch=epoch))
            else:
                log.warning("ignoring unknown engine event %r from %s", kind, ref.label())
        except Exception:
            log.exception("bad engine event %r from %s: %r", kind, ref.label(), fields)
        finally:
            self._notify()

    async def _checkpoint(self, request: web.Request) -> web.Response:
        req = await self._parse(request, CheckpointRequest)
        if not self._started_ok():
            return _error(409, "runner has not been started (no successful POST /start)")
        if req.epoch in self._requested_epochs:
            return web.json_response({"epoch": req.epoch, "ignored": True}, status=202)
        highest = max(self._requested_epochs, default=0)
        if req.epoch < highest:
            return _error(409, f"epoch {req.epoch} is below epoch {highest} already requested")
        self._requested_epochs[req.epoch] = time.monotonic()
        for old_epoch in sorted(self._requested_epochs)[:-EPOCHS_KEPT]:  # bounded over months
            del self._requested_epochs[old_epoch]
        for st in self._subtasks.values():
            if st.is_source and st.outcome is None:
                _safe_call(st.task.inject_barrier, req.epoch, req.then_stop, what=f"barrier {st.label}")
        return web.json_response({"epoch": req.epoch, "ignored": False}, status=202)

    def checkpoint_status(self, epoch: int) -> CheckpointWaitResult:
        """Whether every subtask of this runner has snapshotted `epoch`, or why it never will."""
        if not self._started_ok():
            return CheckpointWaitResult(done=False, failed="runner has not been started")
        snapshots: list[SubtaskSnapshot] = []
        missing: list[_Subtask] = []
        for st in self._subtasks.values():
            snap = st.snapshot(epoch)
            if snap is None:
                missing.append(st)
            else:
                snapshots.append(snap)
        if not missing:
            return CheckpointWaitResult(done=True, snapshots=snapshots)
        for st in missing:
            if st.outcome == "failed":
                return CheckpointWaitResult(
                    done=False, snapshots=snapshots, failed=f"subtask {st.label} failed: {st.error}",
                    failed_task=st.failed_event,
                )
            if st.outcome is not None or st.state in TERMINAL_TASK_STATES:
                return CheckpointWaitResult(
                    done=False,
                    snapshots=snapshots,
                    failed=f"subtask {st.label} ended before snapshotting epoch {epoch}",
                )
        return CheckpointWaitResult(done=False, snapshots=snapshots)

    async def _wait_checkpoint(self, request: web.Request) -> web.Response:
        try:
            epoch = int(request.match_info["epoch"])
        except ValueError:
            raise _BadRequest(f"epoch: not an integer: {request.match_info['epoch']!r}") from None
        raw_timeout = request.query.get("timeout", "0")
        try:
            timeout = float(raw_timeout)
        except ValueError:
            raise _BadRequest(f"timeout: not a number: {raw_timeout!r}") from None
        if not timeout >= 0:  # also rejects NaN
            raise _BadRequest(f"timeout: must be >= 0, got {raw_timeout!r}")
        deadline = time.monotonic() + min(timeout, MAX_CHECKPOINT_WAIT_S)
        while True:
            changed = self._changed
            status = self.checkpoint_status(epoch)
            remaining = deadline - time.monotonic()
            if status.done or status.failed is not None or remaining <= 0 or self._closing:
                return web.json_response(status.model_dump(mode="json"))
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                pass

    async def _stop(self, request: web.Request) -> web.Response:
        req = await self._parse(request, StopRequest)
        # immediate overrides graceful; graceful never weakens an immediate stop already asked.
        if self._stop_mode != "immediate":
            self._stop_mode = req.mode
        for st in self._subtasks.values():
            if st.aio_task is not None:
                self._stop_one(st, self._stop_mode)
        return web.json_response({"mode": self._stop_mode}, status=202)

    def _stop_one(self, st: _Subtask, mode: str) -> None:
        if st.outcome is not None:
            return
        _safe_call(st.task.stop, mode, what=f"stop {st.label}")
        if mode == "immediate" and st.aio_task is not None:
            task = st.aio_task
            # The engine should end promptly by itself; cancel it if it does not.
            asyncio.get_running_loop().call_later(
                IMMEDIATE_STOP_CANCEL_S, lambda: task.done() or task.cancel()
            )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        sub = _Subscriber()
        self._subscribers.add(sub)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            sub.push(self._event("hello", tasks=self.task_states()))
            # A watcher that connects after a failure still learns why the subtask failed.
            for st in self._subtasks.values():
                if st.failed_event is not None:
                    sub.push(st.failed_event)
            next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
            while True:
                while sub.items:
                    await self._write_event(resp, sub, sub.items.popleft())
                if sub.closed or self._closing:
                    break
                remaining = next_heartbeat - time.monotonic()
                if remaining <= 0:
                    await self._write_event(resp, sub, self._heartbeat())
                    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
                    continue
                sub.wake.clear()
                if sub.items or sub.closed:
                    continue
                try:
                    async with asyncio.timeout(remaining):
                        await sub.wake.wait()
                except TimeoutError:
                    pass
        except ConnectionError:
            pass  # the reader went away; it reconnects (and gets a fresh hello) if it wants
        finally:
            self._subscribers.discard(sub)
        return resp

    async def _write_event(self, resp: web.StreamResponse, sub: _Subscriber, event: RunnerEvent) -> None:
        await resp.write(event.model_dump_json(exclude_none=True).encode() + b"\n")
        sub.last_write_ok = time.monotonic()

    def _heartbeat(self) -> RunnerEvent:
        return self._event(
            "heartbeat",
            tasks=self.task_states(),
            metrics=heartbeat_metrics(st.task for st in self._subtasks.values()),
        )


# -------------------------------------------------------------------------------- helpers


def _labels(refs: Iterable[SubtaskRef]) -> set[str]:
    return {r.label() for r in refs}


def _advertised(host: str) -> str:
    """The address peers should dial: the bound one, or this host's name for a wildcard bind."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host


def _safe_call(fn: Callable[..., Any], *args: Any, what: str) -> None:
    """Call into the engine without letting its bug take down the request or the process."""
    try:
        fn(*args)
    except Exception:
        log.exception("%s raised", what)


def _task_error_class() -> type[Exception] | None:
    """The engine's TaskError, or None when the engine cannot be imported."""
    try:
        from sluice.engine.task import TaskError
    except Exception:
        return None
    return TaskError


def _start_failure(
    exc: BaseException, ref: SubtaskRef, operators: list[str], *, opening: bool = True
) -> StartFailure:
    """A TaskError keeps its own message, domain and retryability; anything else is an internal,
    retryable error, named with the subtask and its operators so the report points somewhere."""
    message = getattr(exc, "message", None)
    domain = getattr(exc, "domain", None)
    retryable = getattr(exc, "retryable", None)
    task_error = _task_error_class()
    if task_error is not None and isinstance(exc, task_error) and isinstance(message, str):
        return StartFailure(
            message,
            domain=domain if domain in _DOMAINS else "internal",
            retryable=bool(retryable) if retryable is not None else True,
            operator=getattr(exc, "operator", None),
            traceback=getattr(exc, "traceback", None),
        )
    verb = "failed to open" if opening else "failed"
    return StartFailure(
        f"subtask {ref.label()} (operators {', '.join(operators)}) {verb}: {type(exc).__name__}: {exc}",
        domain="internal",
        retryable=True,
    )


def write_info_file(path: Path, info: RunnerInfo) -> None:
    """Write `info` as JSON to `path` atomically: readers see the old file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(info.model_dump_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_info_file_if_ours(path: Path, pid: int) -> None:
    """Remove the info file on exit unless something else has replaced it since."""
    try:
        info = RunnerInfo.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return
    if info.pid == pid:
        path.unlink(missing_ok=True)
