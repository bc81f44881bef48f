"""Execution of one subtask (one parallel instance of a chain) inside a runner's event loop.

A :class:`SubtaskRunner` owns its operators for one generation. The runner process builds its
channels (an :class:`~sluice.engine.routing.InputGate` in front unless the chain starts with a
source, one :class:`~sluice.engine.routing.Output` per outgoing edge behind), then calls, in order,
``await open()`` (build operators, restore state), then ``await run()`` in a task of its own, and
meanwhile, from the same event loop, ``inject_barrier(epoch, then_stop)`` (sources only: other
subtasks get barriers in band from their inputs) and ``stop(mode)``.

Guarantees:

* Barriers are handled in band: everything the source emitted before the barrier has passed the
  whole chain (and reached the sink's staging file) when the chain snapshots, and nothing emitted
  after it has; a subtask with inputs snapshots once the barrier arrived on all of them (aligned),
  and forwards it downstream. So a checkpoint's source offsets, keyed state and sink commits
  describe the same records.
* Watermarks follow the data: a source's after each batch, an input gate's when the lowest of its
  channels advances; operators may release rows for them (closed windows) before they go on.
* ``run()`` yields to the event loop between batches and while rate limited or idle, so the same
  process keeps serving HTTP and heartbeats. A chain with a user function (``fn``) runs its batches
  on a thread of its own (:mod:`sluice.engine.offload`), so even a user function that blocks or
  never returns leaves the loop alive; one batch that takes longer than the hang timeout fails the
  task, naming the operator and function that is still busy (and where it waits).
* A failure inside an operator becomes a :class:`TaskError` naming the operator: a user function
  that raises is domain ``user``, retryable unless it raised ``UserError``, with the user's
  traceback and a message that is the same in every generation for the same bad record
  ("operator 'parse' (map m:parse) raised ValueError: ..."); bad input data (``UserError``: a
  malformed line, a schema mismatch, a key that cannot be hashed) is ``user`` and not retryable,
  named with the subtask; anything else is ``internal`` and retryable (a restart restores the last
  checkpoint).
* Operators are closed exactly once, whatever way ``run()`` ends (return, failure, cancellation).
* Fenced: at each barrier, before snapshotting anything, the subtask checks the store's generation
  fence; a generation that a newer one has superseded fails the task (a retryable internal
  :class:`TaskError` caused by :class:`~sluice.errors.StaleGeneration`) without a snapshot, so
  it contributes nothing more to any checkpoint.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, TypeVar

import pyarrow as pa

from sluice.engine.chain import OperatorChain, OperatorFailed
from sluice.engine.channels import ChannelClosed
from sluice.engine.functions import FunctionLoadError
from sluice.engine.messages import Barrier, EndOfStream, Idle, Message, Watermark
from sluice.engine.offload import CallThread
from sluice.engine.operators import Operator, OperatorContext, OperatorState, UserFunctionError
from sluice.engine.registry import build_operator
from sluice.engine.routing import InputChannel, InputClosed, InputGate, Output
from sluice.engine.sources import Source
from sluice.engine.stateless import check_same_schema
from sluice.engine.taskmetrics import BackpressureMeter, watermark_lag_s
from sluice.engine.tracebacks import stable_text, thread_traceback, user_traceback
from sluice.errors import CorruptCheckpointError, StaleGeneration, UserError
from sluice.models import (
    CheckpointManifest,
    OperatorSnapshot,
    Program,
    StateFileDigest,
    SubtaskRef,
    SubtaskSnapshot,
    operator_role,
)
from sluice.storage import CheckpointStore

T = TypeVar("T")
TaskState = Literal["starting", "running", "source_finished", "finished", "failed"]
StopMode = Literal["graceful", "immediate"]
EventCallback = Callable[[str, SubtaskRef, dict], None]

#: longest a finished or idle source waits before looking at its control queue again even without
#: a wake-up (a safety net: every control call also wakes the loop)
IDLE_RECHECK_S = 1.0
#: recent snapshots kept for the controller to collect; older epochs are long committed or abandoned
SNAPSHOTS_KEPT = 16
#: a channel closed by a neighbour is a failure unless this subtask is told to stop within this
#: (the controller stops every runner at once, but they get the request one after the other)
PEER_STOP_GRACE_S = 2.0
#: a source holds its next batch while the other subtasks of its runner have more messages than
#: this waiting: one source batch is many times the work of one message downstream, and a runner
#: that keeps producing while its consumers lag stalls its peers, which wait on those consumers
SOURCE_YIELD_BACKLOG = 4
#: how long a held source sleeps between looks, after a few plain yields
SOURCE_HOLD_SLEEP_S = 0.0005
#: default of JobConfig.task_hang_timeout_s: one batch busy in a chain with user code this long
#: fails the task (a user function that never returns)
DEFAULT_HANG_TIMEOUT_S = 10.0
#: the hang watchdog looks at most this often (and at least four times per timeout)
HANG_CHECK_INTERVAL_S = 1.0


class TaskError(Exception):
    """A subtask failed. `domain` is "user" when user code (a function, its import) is at fault."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        domain: Literal["user", "internal"] = "internal",
        operator: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.domain = domain
        self.operator = operator  # the operator that failed, when known
        self.traceback = traceback  # the user's frames, when user code raised or hangs


def _origin(exc: BaseException) -> str:
    """Where an internal error was raised (innermost frame), for the failure message."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f" (at {os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name})"


def _watermark_reaches_user_code(body: list[Operator]) -> bool:
    """Whether a watermark through `body` (the chain's operators that take input) can call a user
    function: only if an operator that may release rows on a watermark (one overriding
    ``on_watermark``, e.g. a window) comes before or is an operator with a function."""
    releases = False
    for op in body:
        releases = releases or type(op).on_watermark is not Operator.on_watermark
        if releases and op.params.get("fn"):
            return True
    return False


def _is_user_fault(exc: BaseException) -> bool:
    return isinstance(exc, (UserFunctionError, FunctionLoadError))


class SubtaskRunner:
    """Runs one subtask of `program`: its chain's operators, fed by the chain's head source or by
    its input gate, with the tail's output sent over `outputs`."""

    def __init__(
        self,
        *,
        ref: SubtaskRef,
        program: Program,
        job_id: str,
        generation: int,
        store: CheckpointStore,
        restore: CheckpointManifest | None,
        on_event: EventCallback,
        inputs: list[InputChannel] | None = None,
        outputs: list[Output] | None = None,
        hang_timeout_s: float = DEFAULT_HANG_TIMEOUT_S,
    ) -> None:
        if not 0 <= ref.chain < len(program.chains):
            raise ValueError(f"subtask {ref.label()}: program has {len(program.chains)} chains")
        chain = program.chains[ref.chain]
        if not 0 <= ref.index < chain.parallelism:
            raise ValueError(f"subtask {ref.label()}: chain {ref.chain} has parallelism {chain.parallelism}")
        self.ref = ref
        self.program = program
        self.job_id = job_id
        self.generation = generation
        self.store = store
        self.restore = restore
        self.on_event = on_event
        self.operator_ids: list[str] = list(chain.operators)
        self.is_source = operator_role(program.operators[self.operator_ids[0]]) == "source"
        if self.is_source and inputs:
            raise ValueError(f"subtask {ref.label()}: a source chain takes no inputs")
        if not self.is_source and not inputs:
            raise ValueError(f"subtask {ref.label()}: chain starting with {self.operator_ids[0]!r} needs inputs")
        self.outputs: list[Output] = list(outputs or [])
        self._gate = InputGate(inputs) if inputs else None
        self.state: TaskState = "starting"
        self.snapshots: dict[int, SubtaskSnapshot] = {}
        self._chain: OperatorChain | None = None
        self._source: Source | None = None
        self._barriers: deque[Barrier] = deque()
        self._epochs_seen: set[int] = set()
        self._stop_mode: StopMode | None = None
        self._wakeup = asyncio.Event()
        self._ended = False  # end-of-stream has gone through the chain
        self._closed = False
        self._snapshotting: asyncio.Future[dict[str, OperatorState]] | None = None
        self._union_schema: pa.Schema | None = None
        self._neighbours_backlog: Callable[[], int] | None = None
        self.hang_timeout_s = hang_timeout_s
        # Chains running user code get their own thread (created by run()); others run inline.
        self._uses_thread = any(program.operators[op].get("fn") for op in self.operator_ids)
        self._calls: CallThread | None = None
        self._waiting: asyncio.Future[object] | None = None  # the call run() is awaiting
        self._watermark_runs_user_code = False  # set by open(): see _watermark_reaches_user_code
        #: the event-time watermark that last went through the chain (for the watermark lag)
        self.watermark_ms: int | None = None
        clocks = [c for out in self.outputs for s in out.senders if (c := getattr(s, "blocked", None)) is not None]
        self._backpressure = BackpressureMeter(lambda: clocks)

    # ------------------------------------------------------------------ control (same event loop)

    def inject_barrier(self, epoch: int, then_stop: bool) -> None:
        """Queue barrier `epoch` for the source loop. A repeated epoch, or one after the task ended,
        is ignored, so the controller may retry freely. Subtasks with inputs ignore it: their
        barriers come in band."""
        if not self.is_source or epoch in self._epochs_seen or self.state in ("finished", "failed"):
            return
        self._epochs_seen.add(epoch)
        self._barriers.append(Barrier(epoch, then_stop))
        self._wakeup.set()

    def stop(self, mode: str) -> None:
        """``graceful``: sources stop and end-of-stream runs through the chain and downstream; a
        subtask with inputs ends once all of them ended. ``immediate``: run() returns as soon as
        the current batch is done, flushing nothing."""
        if mode not in ("graceful", "immediate"):
            raise ValueError(f"stop mode must be 'graceful' or 'immediate', not {mode!r}")
        if self._stop_mode != "immediate":  # immediate wins over graceful, never the reverse
            self._stop_mode = mode  # type: ignore[assignment]
        if mode == "immediate" and self._gate is not None:
            self._gate.interrupt()
        self._wakeup.set()

    @property
    def metrics(self) -> dict[str, float]:
        """Per operator of this subtask: ``records_in.<op>``, ``records_out.<op>``,
        ``backpressure.<op>`` (the subtask's: the fraction of the last interval it spent blocked
        sending downstream), ``watermark_lag_s.<op>`` (wall clock minus the watermark that last
        went through the chain; absent before the first), and whatever the operator reports itself
        (e.g. ``late_records.<op>`` of a window)."""
        if self._chain is None:
            return {}
        out: dict[str, float] = {}
        backpressure = self._backpressure.fraction()
        lag = watermark_lag_s(self.watermark_ms)
        for op in self._chain.operators:
            op_id = op.operator_id
            out[f"records_in.{op_id}"] = self._chain.rows_in[op_id]
            out[f"records_out.{op_id}"] = self._chain.rows_out[op_id]
            out[f"backpressure.{op_id}"] = backpressure
            if lag is not None:
                out[f"watermark_lag_s.{op_id}"] = lag
            own = getattr(op, "metrics", None)
            if callable(own):
                try:
                    for name, value in own().items():
                        out[f"{name}.{op_id}"] = float(value)
                except Exception:  # noqa: BLE001 - metrics must never fail the task
                    pass
        return out

    def backlog(self) -> int:
        """Messages waiting at this subtask's inputs that it will still read (0 for a source, and
        once it stopped running: a held source must not wait on a consumer that ended)."""
        if self._gate is None or self.state != "running":
            return 0
        return self._gate.backlog()

    def yield_to(self, neighbours_backlog: Callable[[], int]) -> None:
        """For a source: hold each next batch while `neighbours_backlog()` (the messages waiting
        at the other subtasks of this runner) exceeds SOURCE_YIELD_BACKLOG."""
        self._neighbours_backlog = neighbours_backlog

    # ------------------------------------------------------------------ lifecycle

    def _where(self, operator_id: str) -> str:
        return f"operator {operator_id!r} subtask {self.ref.index}"

    def _what(self, operator_id: str) -> str:
        """``'parse' (map mod:fn)``: the operator, its type and its function, for messages."""
        params = self.program.operators.get(operator_id, {})
        kind = " ".join(str(p) for p in (params.get("type"), params.get("fn")) if p)
        return f"operator {operator_id!r} ({kind})" if kind else f"operator {operator_id!r}"

    def _error(self, operator_id: str, exc: BaseException, doing: str) -> TaskError:
        if type(exc) is UserFunctionError:
            # The message carries no subtask, generation or address: a record that fails the
            # function fails it the same way in every generation, whichever subtask it reaches,
            # and the controller recognises the repeat by the message.
            cause = getattr(exc, "cause", None)
            what = f"raised {exc.what}" if cause is not None else exc.what
            return TaskError(
                f"{self._what(operator_id)} {stable_text(what)}",
                retryable=exc.retryable, domain="user", operator=operator_id,
                traceback=user_traceback(cause) if cause is not None else None,
            )
        if _is_user_fault(exc):  # a function that cannot be loaded, an expression that fails
            cause = exc.__cause__
            return TaskError(
                f"{self._where(operator_id)}: {exc}", retryable=getattr(exc, "retryable", True), domain="user",
                operator=operator_id, traceback=user_traceback(cause) if cause is not None else None,
            )
        if isinstance(exc, CorruptCheckpointError):  # restoring the same checkpoint again cannot help
            return TaskError(
                f"{self._where(operator_id)}: {exc}", retryable=False, domain="internal", operator=operator_id
            )
        if isinstance(exc, UserError):  # bad input data (a malformed file, a schema mismatch)
            return TaskError(f"{self._where(operator_id)}: {exc}", retryable=False, domain="user", operator=operator_id)
        return TaskError(
            f"{self._where(operator_id)}: {doing} failed: {type(exc).__name__}: {exc}{_origin(exc)}",
            retryable=True, domain="internal", operator=operator_id,
        )

    def _restored_tables(self, operator_id: str) -> list[pa.Table]:
        if self.restore is None:
            return []
        checkpoint = self.restore.operators.get(operator_id)
        if checkpoint is None:  # an operator added since the checkpoint starts empty
            return []
        # read_state checks each file's recorded size (the controller verified the sha256 before
        # the start) and raises CorruptCheckpointError naming the file: not retryable (see _error)
        return [self.store.read_state(path, checkpoint.state_digests.get(path)) for path in checkpoint.state_files]

    async def open(self) -> None:
        """Build the chain's operators and restore their state. Raises TaskError naming the operator
        and subtask on failure (the subtask is then `failed`)."""
        operators: list[Operator] = []
        restore_epoch = self.restore.epoch if self.restore is not None else None
        current = self.operator_ids[0]
        try:
            for op_id in self.operator_ids:
                current = op_id
                op = build_operator(op_id, self.program.operators[op_id])
                operators.append(op)
                restored = await asyncio.to_thread(self._restored_tables, op_id)
                ctx = OperatorContext(
                    job_id=self.job_id,
                    generation=self.generation,
                    operator_id=op_id,
                    subtask_index=self.ref.index,
                    parallelism=self.program.parallelism[op_id],
                    restore_epoch=restore_epoch,
                )
                op.open(ctx, restored)
        except Exception as exc:
            self.state = "failed"
            for op in operators:
                try:
                    op.close()
                except Exception:  # noqa: BLE001 - the open failure is the error to report
                    pass
            raise self._error(current, exc, "open") from exc
        head = operators[0]
        if self.is_source:
            if not isinstance(head, Source):
                self.state = "failed"
                raise TaskError(f"{self._where(head.operator_id)}: {type(head).__name__} is not a source")
            self._source = head
        self._chain = OperatorChain(operators, head_is_source=self.is_source)
        self._watermark_runs_user_code = self._uses_thread and _watermark_reaches_user_code(
            operators[1:] if self.is_source else operators
        )
        self.state = "running"

    async def run(self) -> None:
        """Drive the chain until a then-stop barrier, a stop, the end of every input, or
        cancellation; the outputs are closed whichever way it ends."""
        if self._chain is None:
            raise TaskError(f"subtask {self.ref.label()}: run() before a successful open()")
        watchdog: asyncio.Task[None] | None = None
        if self._uses_thread:
            self._calls = CallThread(f"sluice-{self.ref.label()}")
            watchdog = asyncio.ensure_future(self._watch_for_hangs())
        try:
            try:
                if self._gate is not None:
                    self._gate.start()
                    await self._input_loop()
                else:
                    await self._source_loop()
            except (InputClosed, ChannelClosed):
                # A stop reaches the runners one by one: a neighbour that stopped first closes its
                # channels. That is the stop, not a failure, if our own stop follows shortly.
                if not await self._stop_follows(PEER_STOP_GRACE_S):
                    raise
            self.state = "finished"
        except asyncio.CancelledError:
            self.state = "finished"
            raise
        except OperatorFailed as exc:
            self.state = "failed"
            raise self._error(exc.operator_id, exc.cause, "processing") from exc.cause
        except (InputClosed, ChannelClosed) as exc:
            self.state = "failed"
            raise TaskError(f"subtask {self.ref.label()} ({self.operator_ids[0]!r}): {exc}") from exc
        except TaskError:
            self.state = "failed"
            raise
        except Exception as exc:
            self.state = "failed"
            raise TaskError(f"subtask {self.ref.label()}: {type(exc).__name__}: {exc}") from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
            # Operators first: closing channels may wait on slow peers, and may be cancelled.
            self._close()
            if self._gate is not None:
                await self._gate.close()
            await asyncio.gather(*(out.close() for out in self.outputs))

    def _close(self) -> None:
        if self._closed or self._chain is None:
            return
        self._closed = True
        chain, pending, calls = self._chain, self._snapshotting, self._calls
        if pending is not None and not pending.done():
            # Cancelled during a snapshot: its thread still uses the operators; close after it.
            pending.add_done_callback(lambda _: chain.close())
        elif calls is not None:
            # A batch given up on (a hang, a cancel) may still be in the operators: close after it.
            calls.after_current(chain.close)
        else:
            chain.close()
        if calls is not None:
            calls.close()

    # ------------------------------------------------------------------ user code off the loop

    async def _step(self, fn: Callable[[], T]) -> T:
        """Run one synchronous step of the chain (a batch, a watermark, the end of stream): inline,
        or on the subtask's thread when the chain runs user code, awaiting it without blocking the
        loop. A step that the watchdog finds hung raises its TaskError here."""
        calls = self._calls
        if calls is None:
            return fn()
        fut = calls.submit(fn)
        self._waiting = fut  # type: ignore[assignment]
        try:
            return await fut
        finally:
            self._waiting = None

    async def _watch_for_hangs(self) -> None:
        """Fail the awaited step once it has been busy for the hang timeout (the thread cannot be
        stopped; it is left to finish, or to die with the process)."""
        calls = self._calls
        assert calls is not None
        interval = min(HANG_CHECK_INTERVAL_S, self.hang_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            busy = calls.busy_for()
            waiting = self._waiting
            if busy is None or busy < self.hang_timeout_s or waiting is None or waiting.done():
                continue
            op = self._chain.current if self._chain is not None else None
            op = op or self.operator_ids[0]
            waiting.set_exception(TaskError(
                f"{self._what(op)} did not return within {self.hang_timeout_s:g} s",
                retryable=True, domain="user", operator=op, traceback=thread_traceback(calls.ident),
            ))

    # ------------------------------------------------------------------ data flow

    async def _emit(self, batches: list[pa.RecordBatch]) -> None:
        """Send the chain tail's output over every outgoing edge (waits while receivers are full)."""
        if not batches or not self.outputs:
            return
        tail = self.operator_ids[-1]
        for batch in batches:
            for out in self.outputs:
                try:
                    await out.emit(batch)
                except (KeyError, TypeError, pa.ArrowException) as exc:  # e.g. a key column missing
                    raise OperatorFailed(tail, exc) from exc

    async def _broadcast(self, msg: Message) -> None:
        for out in self.outputs:
            await out.broadcast(msg)

    async def _watermark(self, wm: Watermark, released: list[pa.RecordBatch] | None = None) -> None:
        """Pass watermark `wm` through the chain and downstream; `released` is the chain's output
        for it when the caller already ran it (in the same step as the batch before it)."""
        assert self._chain is not None
        chain = self._chain
        if released is None:
            if self._watermark_runs_user_code:
                released = await self._step(lambda: chain.watermark(wm))
            else:  # no user function can be reached: not worth a trip to the thread
                released = chain.watermark(wm)
        self.watermark_ms = wm.ts_ms
        await self._emit(released)
        await self._broadcast(wm)

    async def _end_of_stream(self) -> None:
        if not self._ended:
            self._ended = True
            assert self._chain is not None
            chain = self._chain
            await self._emit(await self._step(chain.end))
            await self._broadcast(EndOfStream())

    async def _source_loop(self) -> None:
        assert self._chain is not None and self._source is not None
        source, chain = self._source, self._chain
        announced_idle = False  # downstream was told this source is idle, and nothing came since
        while True:
            if self._stop_mode == "immediate":
                return
            # Barriers before the next poll: the snapshot covers exactly what was emitted so far.
            while self._barriers:
                barrier = self._barriers.popleft()
                await self._checkpoint(barrier)
                if barrier.then_stop:
                    return
                if self._stop_mode == "immediate":
                    return
            if self._stop_mode == "graceful":
                await self._end_of_stream()
                return
            if self._ended:
                await self._wait(IDLE_RECHECK_S)
                continue
            if await self._hold_for_neighbours():
                continue  # a barrier or a stop arrived while holding
            try:
                poll = source.poll(time.monotonic())
                wm = source.watermark() if poll.batch is not None else None
            except Exception as exc:
                raise OperatorFailed(source.operator_id, exc) from exc
            if poll.batch is not None:
                announced_idle = False
                batch, mark = poll.batch, Watermark(wm) if wm is not None else None
                # The batch and the watermark after it in one step: one trip to the thread.
                # (The lambda runs in this iteration: _step awaits it.)
                out, released = await self._step(lambda: (
                    chain.source_emitted(source.operator_id, batch),  # noqa: B023
                    chain.watermark(mark) if mark is not None else [],  # noqa: B023
                ))
                await self._emit(out)
                if mark is not None:
                    await self._watermark(mark, released)
                await asyncio.sleep(0)  # let HTTP handlers and other subtasks run
            elif poll.finished:
                await self._end_of_stream()
                self.state = "source_finished"
                self.on_event("source_finished", self.ref, {})
            else:
                if not announced_idle and source.is_idle():
                    announced_idle = True
                    await self._broadcast(Idle())
                await self._wait(min(poll.idle_s, IDLE_RECHECK_S))

    def _check_union(self, batch: pa.RecordBatch) -> None:
        """Rows reaching a union must all have one schema: the first one seen sets it."""
        if self._union_schema is None:
            self._union_schema = batch.schema
            return
        head = self.operator_ids[0]
        try:
            check_same_schema(head, self._union_schema, batch.schema)
        except ValueError as exc:
            raise OperatorFailed(head, UserError(str(exc))) from exc

    async def _input_loop(self) -> None:
        assert self._chain is not None and self._gate is not None
        chain, gate = self._chain, self._gate
        union = self.program.operators[self.operator_ids[0]].get("type") == "union"
        while True:
            if self._stop_mode == "immediate":
                return
            msg = await gate.next()
            if msg is None:  # every input closed after its end of stream, or an immediate stop
                return
            if isinstance(msg, pa.RecordBatch):
                if union:
                    self._check_union(msg)
                batch = msg
                await self._emit(await self._step(lambda: chain.process(batch)))  # noqa: B023 - awaited here
            elif isinstance(msg, Watermark):
                await self._watermark(msg)
            elif isinstance(msg, Idle):
                await self._broadcast(msg)
            elif isinstance(msg, Barrier):
                await self._checkpoint(msg)
                if msg.then_stop:
                    return
            elif isinstance(msg, EndOfStream):
                await self._end_of_stream()
                if self._stop_mode == "graceful":
                    return
            await asyncio.sleep(0)

    async def _hold_for_neighbours(self) -> bool:
        """Let this runner's consumers catch up before the next batch; True if interrupted by a
        barrier or a stop (barriers are never held: alignment downstream may wait for them)."""
        backlog = self._neighbours_backlog
        if backlog is None:
            return False
        spins = 0
        while backlog() > SOURCE_YIELD_BACKLOG:
            if self._barriers or self._stop_mode is not None:
                return True
            await asyncio.sleep(0 if spins < 8 else SOURCE_HOLD_SLEEP_S)
            spins += 1
        return False

    async def _stop_follows(self, timeout_s: float) -> bool:
        """True when a stop is (or within `timeout_s` becomes) requested for this subtask."""
        deadline = time.monotonic() + timeout_s
        while self._stop_mode is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
        return True

    async def _wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, waking early for a barrier or a stop."""
        if self._barriers or self._stop_mode is not None:
            return
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _checkpoint(self, barrier: Barrier) -> None:
        assert self._chain is not None
        # Downstream starts aligning while this subtask snapshots: nothing is emitted in between.
        await self._broadcast(barrier)
        # After the broadcast, so the subtasks downstream (on other runners too) learn it as well.
        # A superseded generation would only be refused at the manifest; stopping here spares its
        # snapshot and state files, and tells its runner to stop.
        try:
            await asyncio.to_thread(self.store.check_fence, self.generation)
        except StaleGeneration as exc:
            raise TaskError(f"subtask {self.ref.label()}: {exc}", retryable=True, domain="internal") from exc
        # Operators are not touched by anything else while this task awaits, so snapshotting
        # (which may fsync) can run off the event loop.
        self._snapshotting = asyncio.ensure_future(asyncio.to_thread(self._chain.snapshot, barrier.epoch))
        states = await asyncio.shield(self._snapshotting)  # a cancel must not orphan the thread
        self._snapshotting = None
        operators: dict[str, OperatorSnapshot] = {}
        for op_id, st in states.items():
            files: list[str] = []
            digests: dict[str, StateFileDigest] = {}
            if st.table is not None:
                try:
                    # the digest is computed while writing: restoring verifies the file against it
                    path, digest = await asyncio.to_thread(
                        self.store.write_state_file, barrier.epoch, op_id, self.ref.index, st.table
                    )
                except Exception as exc:
                    raise OperatorFailed(op_id, exc) from exc
                files.append(path)
                digests[path] = digest
            operators[op_id] = OperatorSnapshot(state_files=files, state_digests=digests, commits=list(st.commits))
        snapshot = SubtaskSnapshot(subtask=self.ref, epoch=barrier.epoch, operators=operators)
        self.snapshots[barrier.epoch] = snapshot
        for old_epoch in sorted(self.snapshots)[:-SNAPSHOTS_KEPT]:  # a job may run for months
            del self.snapshots[old_epoch]
        self.on_event("checkpoint_done", self.ref, {"epoch": barrier.epoch, "snapshot": snapshot})
