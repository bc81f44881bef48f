"""Execution of one subtask (one parallel instance of a chain) inside a runner's event loop.

A :class:`SubtaskRunner` owns its operators for one generation. The runner process calls, in order,
``await open()`` (build operators, restore state), then ``await run()`` in a task of its own, and
meanwhile, from the same event loop, ``inject_barrier(epoch, then_stop)`` and ``stop(mode)``.

Guarantees:

* Barriers are handled in band: everything the source emitted before the barrier has passed the
  whole chain (and reached the sink's staging file) when the chain snapshots, and nothing emitted
  after it has. So a checkpoint's source offsets and sink commits describe the same records.
* ``run()`` yields to the event loop between batches and while rate limited or idle, so the same
  process keeps serving HTTP and heartbeats.
* A failure inside an operator becomes a :class:`TaskError` naming operator and subtask; user code
  failing is domain ``user``, anything else ``internal``; both are retryable (a restart restores the
  last checkpoint).
* Operators are closed exactly once, whatever way ``run()`` ends (return, failure, cancellation).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import pyarrow as pa

from sluice.engine.chain import OperatorChain, OperatorFailed
from sluice.engine.functions import FunctionLoadError
from sluice.engine.messages import Barrier
from sluice.engine.operators import Operator, OperatorContext, OperatorState, UserFunctionError
from sluice.engine.registry import build_operator
from sluice.engine.sources import Source
from sluice.models import CheckpointManifest, OperatorSnapshot, Program, SubtaskRef, SubtaskSnapshot
from sluice.storage import CheckpointStore

TaskState = Literal["starting", "running", "source_finished", "finished", "failed"]
StopMode = Literal["graceful", "immediate"]
EventCallback = Callable[[str, SubtaskRef, dict], None]

#: longest a finished or idle source waits before looking at its control queue again even without
#: a wake-up (a safety net: every control call also wakes the loop)
IDLE_RECHECK_S = 1.0
#: recent snapshots kept for the controller to collect; older epochs are long committed or abandoned
SNAPSHOTS_KEPT = 16


class TaskError(Exception):
    """A subtask failed. `domain` is "user" when user code (a function, its import) is at fault."""

    def __init__(self, message: str, *, retryable: bool = True, domain: Literal["user", "internal"] = "internal") -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.domain = domain


def _is_user_fault(exc: BaseException) -> bool:
    return isinstance(exc, (UserFunctionError, FunctionLoadError))


class SubtaskRunner:
    """Runs one subtask of `program`: its chain's operators, fed by the chain's head source."""

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

    # ------------------------------------------------------------------ control (same event loop)

    def inject_barrier(self, epoch: int, then_stop: bool) -> None:
        """Queue barrier `epoch` for the source loop. A repeated epoch, or one after the task ended,
        is ignored, so the controller may retry freely."""
        if epoch in self._epochs_seen or self.state in ("finished", "failed"):
            return
        self._epochs_seen.add(epoch)
        self._barriers.append(Barrier(epoch, then_stop))
        self._wakeup.set()

    def stop(self, mode: str) -> None:
        """``graceful``: the source stops, end-of-stream runs through the chain, run() returns.
        ``immediate``: run() returns as soon as the current batch is done, flushing nothing."""
        if mode not in ("graceful", "immediate"):
            raise ValueError(f"stop mode must be 'graceful' or 'immediate', not {mode!r}")
        if self._stop_mode != "immediate":  # immediate wins over graceful, never the reverse
            self._stop_mode = mode  # type: ignore[assignment]
        self._wakeup.set()

    @property
    def metrics(self) -> dict[str, float]:
        """Rows in and out per operator of this subtask, as ``records_in.<op>`` / ``records_out.<op>``."""
        if self._chain is None:
            return {}
        out: dict[str, float] = {}
        for op_id in self.operator_ids:
            out[f"records_in.{op_id}"] = self._chain.rows_in[op_id]
            out[f"records_out.{op_id}"] = self._chain.rows_out[op_id]
        return out

    # ------------------------------------------------------------------ lifecycle

    def _where(self, operator_id: str) -> str:
        return f"operator {operator_id!r} subtask {self.ref.index}"

    def _error(self, operator_id: str, exc: BaseException, doing: str) -> TaskError:
        if _is_user_fault(exc):
            return TaskError(
                f"{self._where(operator_id)}: {exc}", retryable=getattr(exc, "retryable", True), domain="user"
            )
        return TaskError(
            f"{self._where(operator_id)}: {doing} failed: {type(exc).__name__}: {exc}", retryable=True, domain="internal"
        )

    def _restored_tables(self, operator_id: str) -> list[pa.Table]:
        if self.restore is None:
            return []
        checkpoint = self.restore.operators.get(operator_id)
        if checkpoint is None:  # an operator added since the checkpoint starts empty
            return []
        return [self.store.read_state(path) for path in checkpoint.state_files]

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
        if not isinstance(head, Source):
            # Chains fed over the network come with the shuffle work; the compiler refuses them now.
            self.state = "failed"
            raise TaskError(f"{self._where(head.operator_id)}: chain does not start with a source")
        self._source = head
        self._chain = OperatorChain(operators, head_is_source=True)
        self.state = "running"

    async def run(self) -> None:
        """Drive the source and chain until a then-stop barrier, a stop, or cancellation."""
        if self._chain is None or self._source is None:
            raise TaskError(f"subtask {self.ref.label()}: run() before a successful open()")
        try:
            await self._loop()
            self.state = "finished"
        except asyncio.CancelledError:
            self.state = "finished"
            raise
        except OperatorFailed as exc:
            self.state = "failed"
            raise self._error(exc.operator_id, exc.cause, "processing") from exc.cause
        except TaskError:
            self.state = "failed"
            raise
        except Exception as exc:
            self.state = "failed"
            raise TaskError(f"subtask {self.ref.label()}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._close()

    def _close(self) -> None:
        if self._closed or self._chain is None:
            return
        self._closed = True
        chain, pending = self._chain, self._snapshotting
        if pending is not None and not pending.done():
            # Cancelled during a snapshot: its thread still uses the operators; close after it.
            pending.add_done_callback(lambda _: chain.close())
        else:
            chain.close()

    async def _loop(self) -> None:
        assert self._chain is not None and self._source is not None
        source, chain = self._source, self._chain
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
                self._end_of_stream()
                return
            if self._ended:
                await self._wait(IDLE_RECHECK_S)
                continue
            try:
                poll = source.poll(time.monotonic())
            except Exception as exc:
                raise OperatorFailed(source.operator_id, exc) from exc
            if poll.batch is not None:
                chain.source_emitted(source.operator_id, poll.batch)
                await asyncio.sleep(0)  # let HTTP handlers and other subtasks run
            elif poll.finished:
                self._end_of_stream()
                self.state = "source_finished"
                self.on_event("source_finished", self.ref, {})
            else:
                await self._wait(min(poll.idle_s, IDLE_RECHECK_S))

    def _end_of_stream(self) -> None:
        if not self._ended:
            self._ended = True
            assert self._chain is not None
            self._chain.end()

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
        # Operators are not touched by anything else while this task awaits, so snapshotting
        # (which may fsync) can run off the event loop.
        self._snapshotting = asyncio.ensure_future(asyncio.to_thread(self._chain.snapshot, barrier.epoch))
        states = await asyncio.shield(self._snapshotting)  # a cancel must not orphan the thread
        self._snapshotting = None
        operators: dict[str, OperatorSnapshot] = {}
        for op_id, st in states.items():
            files: list[str] = []
            if st.table is not None:
                try:
                    path = await asyncio.to_thread(self.store.write_state, barrier.epoch, op_id, self.ref.index, st.table)
                except Exception as exc:
                    raise OperatorFailed(op_id, exc) from exc
                files.append(path)
            operators[op_id] = OperatorSnapshot(state_files=files, commits=list(st.commits))
        snapshot = SubtaskSnapshot(subtask=self.ref, epoch=barrier.epoch, operators=operators)
        self.snapshots[barrier.epoch] = snapshot
        for old_epoch in sorted(self.snapshots)[:-SNAPSHOTS_KEPT]:  # a job may run for months
            del self.snapshots[old_epoch]
        self.on_event("checkpoint_done", self.ref, {"epoch": barrier.epoch, "snapshot": snapshot})
