"""The fault x state harness: one tiny bounded job, held in a chosen state, a fault injected.

A case runs like this:

1. `FaultJob.enter(state)` starts the job and brings it into `state`, holding it there with the
   control files of `tests.pipeline_functions` (a runner that waits at startup holds Scheduling;
   a map that takes its time per batch holds a checkpoint, CheckpointStopping, a graceful
   Stopping, Rescaling and Restarting behind queued batches; a killed runner leads into
   Recovering). Nothing in sluice itself sleeps or knows about tests.
2. The test injects its fault and calls `FaultJob.fault_injected()`; the holds are released.
3. `FaultJob.outcome(...)` waits for the end state the state table prescribes, checks the fault
   landed in `state` (from the job's own transition record), measures the recovery time (fault ->
   back in Running, or -> the end state), and checks that no runner of an older generation is
   alive.
4. `FaultJob.finish()` drives the job to Finished (resuming a Stopped or Failed job the way a
   user would) and compares the committed output with the rows computed independently from the
   generator's formula: nothing lost, nothing duplicated.

The job: generator (2 splits, rate limited) -> key_by -> map `steered` -> files sink, parallelism
2. The key_by puts the map in a chain of its own, so that batches and barriers queue in a
channel in front of it (that is what a hold holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sluice.client import JobClient
from sluice.models import JobConfig, JobSpec, JobStatus, PipelineSpec
from tests.e2e_helpers import (
    Row,
    assert_exact_output,
    describe_status,
    expected_rows,
    read_committed_rows,
    unique_job_id,
    wait_until,
)
from tests.faults.mounts import MountNotPermitted, Tmpfs
from tests.histories.corpus import local_checkpoint_since
from tests.pipeline_functions import (
    HANG_ALWAYS_FILE,
    HANG_ONCE_FILE,
    HELD_FILE,
    HOLD_BLOCK_FILE,
    HOLD_FILE,
    HOLD_OPEN_FILE,
)

# The states of the matrix. "Checkpoint" is Running with a periodic checkpoint in flight.
STATES: tuple[str, ...] = (
    "Scheduling",
    "Running",
    "Checkpoint",
    "CheckpointStopping",
    "Stopping",
    "Rescaling",
    "Restarting",
    "Recovering",
)
TERMINAL = ("Stopped", "Finished", "Failed")
MAP_OPERATOR = "work"  # the id of the `steered` map: a hang must be reported under this name
NAMES_MAP = f"operator {MAP_OPERATOR!r}"  # how a failure message names it
RUNNER_MARKER = "sluice.runner"

# Timeouts of the harness's waits (bounds, never goals).
START_TIMEOUT_S = 60.0  # a job from start to a held state
HOLD_TIMEOUT_S = 30.0  # a hold to take effect
OUTCOME_TIMEOUT_S = 60.0  # from the fault to the end state (covers 3 failures with backoff)
FINISH_TIMEOUT_S = 120.0  # from a resume to Finished
POLL_S = 0.05
RESCALE_TO = 1  # Rescaling: from parallelism 2 to 1 (fewer runners to start on a small machine)

# Expected paths after a fault (the state table, docs/states.md): the job recovers and runs on,
# or ends Stopped (a stop in progress completes; the restore point stays the last checkpoint).
RECOVERS = ["Recovering", "Compiling", "Scheduling", "Running"]
RUNS_ON = ("Running", "Finishing", "Finished")  # after recovering, the job may already be done


# ------------------------------------------------------------------------------ the job


def fault_pipeline(name: str, out: Path, *, limit: int, rate: float = 100.0) -> PipelineSpec:
    """generator -> key_by -> map steered -> files sink, parallelism 2.

    2 splits of `limit` rows at `rate` rows/s each: about limit/rate seconds of source time,
    long enough for a fault to land mid-stream, short enough for a small machine.
    """
    return PipelineSpec.model_validate(
        {
            "name": name,
            "parallelism": 2,
            "operators": [
                # One row per batch: a rate-limited source otherwise catches up with big batches
                # after backpressure, and a queue of a few big batches does not hold for long.
                {"id": "events", "type": "generator", "splits": 2, "limit": limit, "rate": rate, "keys": 20,
                 "batch_size": 1},
                {"id": "by", "type": "key_by", "key": ["key"]},
                {"id": MAP_OPERATOR, "type": "map", "fn": "tests.pipeline_functions:steered"},
                {"id": "out", "type": "files", "path": str(out), "format": "jsonl"},
            ],
        }
    )


#: Job settings of every case: checkpoints every second, and faults noticed within seconds.
FAULT_CONFIG: dict[str, Any] = {
    "checkpoint_interval_s": 1.0,
    "runner_heartbeat_timeout_s": 3.0,  # a SIGSTOPped runner is lost after 3 s
    "task_hang_timeout_s": 3.0,  # a hung map call (held batches take 0.25 s each) fails after 3 s
    "finish_timeout_s": 10.0,  # a stop that cannot finish kills the runners after 10 s
    "runner_startup_timeout_s": 30.0,
    "task_startup_timeout_s": 20.0,
    "checkpoint_timeout_s": 60.0,
    "slots_per_runner": 2,  # 2 chains x parallelism 2 = 4 subtasks: two runner processes
    "healthy_duration_s": 600.0,  # restart counts stay visible for the whole case
}


def fault_spec(pipeline: PipelineSpec, checkpoint_url: Path, **config: Any) -> JobSpec:
    return JobSpec(
        job_id=unique_job_id(pipeline.name),
        pipeline=pipeline,
        config=JobConfig(**{**FAULT_CONFIG, **config}),
        checkpoint_url=str(checkpoint_url),
    )


class Controls:
    """The control files of one job (read by its runners through $SLUICE_TEST_FAULT_DIR)."""

    def __init__(self, root: Path, job_id: str) -> None:
        self.dir = root / job_id
        self.dir.mkdir(parents=True, exist_ok=True)

    def set(self, name: str) -> None:
        (self.dir / name).touch()

    def clear(self, *names: str) -> None:
        for name in names:
            (self.dir / name).unlink(missing_ok=True)

    def present(self, name: str) -> bool:
        return (self.dir / name).exists()


# ------------------------------------------------------------------------------ processes


def runner_processes(job_id: str) -> dict[int, int]:
    """Live (non-zombie) runner processes of `job_id` on this host: pid -> generation."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")]
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if RUNNER_MARKER not in args or stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            continue
        if _arg(args, "--job-id") != job_id:
            continue
        gen = _arg(args, "--generation")
        found[int(entry)] = int(gen) if gen and gen.isdigit() else -1
    return found


def _arg(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == flag:
            return args[i + 1]
    return None


def signal_runner(pid: int, job_id: str, sig: signal.Signals) -> None:
    """Send `sig` to one runner of `job_id` (checked first: never some other process)."""
    assert pid in runner_processes(job_id), f"pid {pid} is not a live runner of {job_id}"
    os.kill(pid, sig)


def release_stopped(pids: Iterable[int], job_id: str) -> None:
    """Cleanup after SIGSTOP: a runner of `job_id` still there is killed (SIGCONT would let a
    runner of an old generation run again)."""
    live = runner_processes(job_id)
    for pid in pids:
        if pid in live:
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ results


@dataclass
class CaseResult:
    """One fault x state case as measured: what docs/reliability.md tabulates."""

    fault: str
    state: str
    outcome: str  # the path after the fault, e.g. "Recovering -> Running -> Finished"
    recovery_s: float
    rows_expected: int = 0
    rows_lost: int = 0
    rows_duplicated: int = 0


def record(result: CaseResult) -> None:
    """Append the result to $SLUICE_FAULT_TIMES (JSON lines), when set (bench/faults.py sets it)."""
    path = os.environ.get("SLUICE_FAULT_TIMES")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result.__dict__) + "\n")


def state_at(status: JobStatus, when: datetime) -> str | None:
    """The state the job was in at `when`, from its transition record."""
    state: str | None = None
    for t in status.transitions:
        if t.time <= when:
            state = t.to_state
        else:
            break
    return state


def path_after(status: JobStatus, when: datetime) -> list[str]:
    """States entered after `when`, in order."""
    return [t.to_state for t in status.transitions if t.time > when]


def now_utc() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------ the case


@dataclass
class FaultJob:
    """One case's job: start it, hold it in a state, watch it through a fault, finish it."""

    job_client: JobClient
    spec: JobSpec
    controls: Controls
    fault: str = ""
    state: str = ""
    pids: dict[int, int] = field(default_factory=dict)  # every runner pid seen -> generation
    fault_time: datetime | None = None
    fault_status: JobStatus | None = None  # the status just before the fault
    last: JobStatus | None = None
    result: CaseResult | None = None
    # Holds that last until released (a map call that does not return meanwhile), for cases
    # that hold many jobs at once; slow batches otherwise (a hold as long as the queue in front
    # of the map, plenty when the fault follows at once).
    block_holds: bool = False
    # Place the fault by position in the transition record rather than by time: `fault_status`
    # is then a snapshot taken right before the fault. Needed where the Temporal server crashes:
    # a transition recorded in the first workflow task after its restart can carry the time of
    # an earlier task (the workflow's clock), i.e. a time before the fault.
    fault_by_position: bool = False

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def pipeline(self) -> PipelineSpec:
        return self.spec.pipeline

    @property
    def sink(self) -> Path:
        return Path(self.pipeline.operators[-1].path)  # type: ignore[union-attr]

    # -------------------------------------------------------------- reads

    async def status(self) -> JobStatus:
        st = await self.job_client.status(self.job_id, timeout_s=10.0)
        self._seen(st)
        return st

    def _seen(self, st: JobStatus) -> None:
        self.last = st
        for r in st.runners:
            if r.pid:
                self.pids[r.pid] = r.generation
        for pid, gen in runner_processes(self.job_id).items():
            self.pids.setdefault(pid, gen)

    async def until(self, predicate: Callable[[JobStatus], bool], what: str, timeout_s: float) -> JobStatus:
        """Poll the status until `predicate` holds (Failed counts only if the predicate says so)."""

        async def check() -> JobStatus | None:
            st = await self.status()
            if predicate(st):
                return st
            if st.state == "Failed":
                raise AssertionError(f"{self.job_id} Failed while waiting for {what}: {describe_status(st)}")
            return None

        return await wait_until(
            check, timeout_s=timeout_s, interval_s=POLL_S, what=f"{self.job_id}: {what}",
            last=lambda: describe_status(self.last),
        )

    async def checkpoint_in_flight(self, min_age_s: float) -> bool:
        """A checkpoint has been in flight for at least `min_age_s` (so it is held): a pending
        checkpoint activity, or (runs with the local-checkpoints patch) a local one, which only
        the history shows."""
        handle = self.job_client.client.get_workflow_handle(self.job_id)
        desc = await handle.describe()
        now = time.time()
        for a in desc.raw_description.pending_activities:
            if a.activity_type.name == "checkpoint" and a.HasField("scheduled_time"):
                if now - a.scheduled_time.ToDatetime(tzinfo=UTC).timestamp() >= min_age_s:
                    return True
        since = local_checkpoint_since(await handle.fetch_history())
        return since is not None and now - since.timestamp() >= min_age_s

    # -------------------------------------------------------------- entering a state

    async def start(self) -> None:
        await self.job_client.start(self.spec)

    async def running_with_checkpoint(self) -> JobStatus:
        return await self.until(
            lambda s: s.state == "Running" and s.epoch >= 1, "Running with a checkpoint", START_TIMEOUT_S
        )

    async def hold(self) -> None:
        """Make each map batch slow (or, with `block_holds`, not return while held), and wait
        until a batch was actually held."""
        self.controls.clear(HELD_FILE)
        self.controls.set(HOLD_BLOCK_FILE if self.block_holds else HOLD_FILE)
        await wait_until(
            lambda: self.controls.present(HELD_FILE), timeout_s=HOLD_TIMEOUT_S,
            what=f"{self.job_id}: map held (no batch reached the map: was the source already done?)",
            last=lambda: describe_status(self.last),
        )  # fmt: skip

    async def enter(self, state: str) -> JobStatus:
        """Start the job and bring it into `state`; returns its status there (the fault follows)."""
        self.state = state
        if state == "Scheduling":
            self.controls.set(HOLD_OPEN_FILE)
            await self.start()
            return await self.until(
                lambda s: s.state == "Scheduling" and bool(s.runners)
                and all(r.pid in runner_processes(self.job_id) for r in s.runners),
                "Scheduling with its runners started", START_TIMEOUT_S,
            )
        await self.start()
        st = await self.running_with_checkpoint()
        if state == "Running":
            return st
        if state == "Recovering":
            # The way in: one runner is killed, twice (the first restart is immediate; the second
            # waits 1-2 s of backoff with the other runners still alive): the fault then meets the
            # job while it recovers.
            for restart in (1, 2):
                victim = st.runners[0].pid
                assert victim is not None
                signal_runner(victim, self.job_id, signal.SIGKILL)
                if restart == 1:
                    st = await self.until(
                        lambda s: s.state == "Running" and s.restarts == 1 and bool(s.runners),
                        "Running again after the first restart", START_TIMEOUT_S,
                    )
            return await self._wait_state("Recovering")
        await self.hold()
        if state == "Checkpoint":
            await wait_until(
                lambda: self.checkpoint_in_flight(min_age_s=0.5), timeout_s=HOLD_TIMEOUT_S,
                interval_s=POLL_S, what=f"{self.job_id}: a checkpoint held in flight",
            )
            return await self.status()
        if state == "CheckpointStopping":
            await self.job_client.stop(self.job_id, "checkpoint")
        elif state == "Stopping":
            await self.job_client.stop(self.job_id, "graceful")
        elif state == "Rescaling":
            await self.job_client.rescale(self.job_id, parallelism=RESCALE_TO)
        elif state == "Restarting":
            await self.job_client.restart(self.job_id)
        else:
            raise ValueError(f"unknown state {state!r}")
        return await self._wait_state(state)

    async def _wait_state(self, state: str) -> JobStatus:
        try:
            st = await self.job_client.wait_for_state(self.job_id, [state], timeout_s=START_TIMEOUT_S)
        except Exception as exc:
            raise AssertionError(f"{self.job_id} did not reach {state}: {exc}; {describe_status(self.last)}") from exc
        self._seen(st)
        return st

    # -------------------------------------------------------------- the fault

    def runner_pid(self, st: JobStatus, index: int = -1) -> int:
        """A runner of the status's generation that is alive (the last one by default: in
        Recovering the first one is the runner killed on the way in)."""
        live = runner_processes(self.job_id)
        pids = [r.pid for r in st.runners if r.pid in live]
        assert pids, f"no live runner to inject the fault into: {describe_status(st)}; live {live}"
        return pids[index]

    def fault_injected(self, st: JobStatus, *, release: bool = True, at: datetime | None = None) -> None:
        """Record the moment of the fault (now, or `at`); release the holds so that the job can
        move on."""
        self.fault_time = at or now_utc()
        self.fault_status = st
        if release:
            self.release()

    def release(self) -> None:
        self.controls.clear(HOLD_OPEN_FILE, HOLD_FILE, HOLD_BLOCK_FILE)

    # -------------------------------------------------------------- the outcome

    async def outcome(
        self,
        path: list[str],
        *,
        end: str | tuple[str, ...],
        reason: str | None = None,
        timeout_s: float = OUTCOME_TIMEOUT_S,
        on_change: Callable[[JobStatus], Any] | None = None,
        check_landed: bool = True,
    ) -> JobStatus:
        """Wait until the job, after the fault, has gone through `path` (its first states, in order)
        and is in `end`; check where the fault landed and that no older runner survives.

        `reason`: a text the first transition after the fault must contain (e.g. the operator's
        name). `on_change(status)` is called at every poll (e.g. to lift a fault once the job
        reacted). Returns the status in `end`; records the recovery time.
        """
        assert self.fault_time is not None, "fault_injected() first"
        t0 = self.fault_time
        ends = (end,) if isinstance(end, str) else end

        def reached(st: JobStatus) -> bool:
            if on_change is not None:
                on_change(st)
            after = self.after_fault(st)
            if after[: len(path)] != path[: len(after)]:  # off the expected path: fail now
                times = "; ".join(f"{t.to_state} at {t.time.time()}" for t in st.transitions[-6:])
                raise AssertionError(
                    f"{self.fault} in {self.state}: expected {' -> '.join(path)}, "
                    f"saw {' -> '.join(after)} (fault at {t0.time()}; {times}): {describe_status(st)}"
                )
            return st.state in ends and after[: len(path)] == path

        try:
            st = await self.until(reached, f"{' -> '.join(path)} then {' or '.join(ends)}", timeout_s)
        except AssertionError as exc:
            seen = self.after_fault(self.last) if self.last else []
            raise AssertionError(
                f"{self.fault} in {self.state}: expected {' -> '.join(path)} ending {' or '.join(ends)}, "
                f"saw {' -> '.join(seen) or 'no transition'}: {exc}"
            ) from None
        landed = self.state_at_fault(st)
        held = "Running" if self.state == "Checkpoint" else self.state
        assert landed == held or not check_landed, (
            f"{self.fault}: the fault landed in {landed}, not {held} (a hold did not hold): {describe_status(st)}"
        )
        after = [t for t in st.transitions if t.time > t0]
        if reason is not None:
            assert after and reason in after[0].reason, (
                f"{self.fault} in {self.state}: the transition after the fault should name {reason!r}: "
                f"{describe_status(st)}"
            )
        back = next((t for t in after if t.to_state in ("Running", *TERMINAL)), None)
        recovery_s = (back.time - t0).total_seconds() if back else 0.0
        self.result = CaseResult(self.fault, self.state, " -> ".join([held, *self.after_fault(st)]), recovery_s)
        self.check_old_generations(st)
        return st

    def after_fault(self, st: JobStatus) -> list[str]:
        """States entered after the fault, in order."""
        assert self.fault_time is not None
        if self.fault_by_position and self.fault_status is not None:
            n = len(self.fault_status.transitions)
            if st.transitions[:n] == self.fault_status.transitions:
                return [t.to_state for t in st.transitions[n:]]
        return path_after(st, self.fault_time)

    def state_at_fault(self, st: JobStatus) -> str | None:
        """The state the fault met."""
        assert self.fault_time is not None
        if self.fault_by_position and self.fault_status is not None:
            return self.fault_status.state
        return state_at(st, self.fault_time)

    async def continues(self, timeout_s: float = OUTCOME_TIMEOUT_S) -> JobStatus:
        """For faults the job must ride out without a transition: wait for the next completed
        checkpoint after the fault (the recovery time), in the same state and generation."""
        assert self.fault_time is not None and self.fault_status is not None
        before = self.fault_status
        st = await self.until(lambda s: s.epoch > before.epoch, "a checkpoint after the fault", timeout_s)
        recovery_s = (now_utc() - self.fault_time).total_seconds()
        after = self.after_fault(st)
        # Only the job's own progress may follow (its sources may end meanwhile).
        assert after == ["Finishing", "Finished"][: len(after)], f"transitions after the fault: {describe_status(st)}"
        assert self.state_at_fault(st) == "Running", (
            f"{self.fault}: the fault landed in {self.state_at_fault(st)}, not Running: {describe_status(st)}"
        )
        assert st.generation == before.generation, f"rescheduled: {describe_status(st)}"
        self.check_old_generations(st)
        self.result = CaseResult(self.fault, self.state, "Running (no transition; next checkpoint)", recovery_s)
        return st

    def check_old_generations(self, st: JobStatus) -> None:
        """No runner process of a generation older than the job's current one is alive (and none
        at all once the job is Stopped, Finished or Failed)."""
        live = runner_processes(self.job_id)
        if st.state in TERMINAL:
            stale = live
        else:
            stale = {p: g for p, g in live.items() if g < st.generation}
        assert not stale, (
            f"{self.fault} in {self.state}: runner processes of older generations alive (pid: gen) {stale}; "
            f"job in {st.state} generation {st.generation}"
        )

    # -------------------------------------------------------------- finishing

    async def finish(self, *, spec: JobSpec | None = None, rewritten: list[Row] | None = None) -> JobStatus:
        """Drive the job to Finished (resuming it if it ended Stopped or Failed; starting `spec`
        instead if given, e.g. with an older `restore_epoch`), then check exactly-once output.
        `rewritten`: rows a restore of an older checkpoint writes a second time by design (they
        count as duplicated in the record). Records the case."""
        st = await self.status()
        if st.state in ("Stopped", "Failed"):
            await self.wait_closed()
            if spec is not None:
                await self.job_client.start(spec)
            else:
                await self.job_client.restart(self.job_id)
        try:
            done = await self.job_client.wait_for_state(self.job_id, ["Finished"], timeout_s=FINISH_TIMEOUT_S)
        except Exception as exc:
            raise AssertionError(f"{self.job_id} did not finish: {exc}; {describe_status(self.last)}") from exc
        self._seen(done)
        await self.wait_closed()
        self.check_old_generations(done)
        expected = expected_rows(self.pipeline)
        actual = read_committed_rows(self.sink)
        result = self.result or CaseResult(self.fault, self.state, "?", 0.0)
        result.rows_expected = len(expected)
        missing = set(expected) - set(actual)
        result.rows_lost = len(missing)
        result.rows_duplicated = len(actual) - len(set(actual))
        record(result)
        assert_exact_output(actual, sorted([*expected, *(rewritten or [])]))
        return done

    async def wait_closed(self) -> str:
        return await wait_until(
            lambda: self.job_client.final_state(self.job_id), timeout_s=60.0,
            what=f"{self.job_id}: workflow run closed",
        )

    async def cleanup(self) -> None:
        """Best effort at the end of a case: stop the job, kill its runners, clear controls."""
        self.release()
        self.controls.clear(HANG_ONCE_FILE, HANG_ALWAYS_FILE)
        try:
            if await self.job_client.final_state(self.job_id) is None:
                await asyncio.wait_for(self.job_client.stop(self.job_id, "force"), timeout=15.0)
                await self.job_client.wait_for_state(self.job_id, list(TERMINAL), timeout_s=30.0)
        except Exception:  # noqa: BLE001 - cleanup must not hide the case's own failure
            pass
        for pid in runner_processes(self.job_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size_bytes: int) -> Iterator[Tmpfs]:
    """A tmpfs at `path` for the body of the `with`; always unmounted. Skips the case (with the
    reason) where this process may not mount."""
    fs = Tmpfs(path, size_bytes)
    try:
        fs.mount()
    except MountNotPermitted as exc:
        pytest.skip(f"needs a tmpfs mount (root with CAP_SYS_ADMIN): {exc}")
    try:
        yield fs
    finally:
        fs.unmount()
