"""The controller's activities faked under their real names, for workflow tests without runners.

No runner process ever exists: runners are records, starting them does nothing, checkpoints
always succeed. Compiling uses the real (pure) compiler so that the workflow sees a real program.
Each test steers what it needs: what a generation's monitor reports, whether its start fails,
whether a compile, checkpoint or stop fails, whether placement finds no free slot, and which
compiles and checkpoints are held (they wait, heartbeating, until `release()`).

Runs on runner hosts (every new run) place their runners through `place_runners` and start them
with `host_start_runners`; the fake places every generation on one fake host whose task queue is
the test worker's own, and what "the monitor reports" reaches the job as the host's signal would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity

from sluice.engine.compiler import compile_program, runners_needed
from sluice.hosts.contracts import (
    HOST_START_RUNNERS,
    HOST_STOP_RUNNERS,
    SIGNAL_RUNNER_REPORT,
    HostShare,
    HostStartInput,
    HostStopInput,
    Placement,
    PlaceRequest,
    ReleaseRequest,
    RunnerReport,
)
from sluice.models import (
    CheckpointInfo,
    CheckpointInput,
    CleanupInput,
    CommitEpochsInput,
    CompileInput,
    CompileResult,
    MonitorInput,
    MonitorResult,
    RunnerInfo,
    ScheduleInput,
    StartExecutionInput,
    StopInput,
    TeardownInput,
    UpgradeCheckInput,
    UpgradeCheckResult,
)
from sluice.upgrades import check_compatibility

FAKE_HEARTBEAT_S = 0.5  # a healthy monitor heartbeats this often until it is cancelled


@dataclass
class FakeController:
    """Activities that answer at once.

    `monitor(generation)`: what that generation's monitor reports (None: healthy, it runs until
    cancelled). `start_error(generation)`: an error its start raises (None: it starts).
    `compile_error(n)`: an error the n-th compile (1-based, over every job) raises.
    `checkpoint_error(input)`: an error that checkpoint raises. `stop_error(input)`: an error a
    graceful/immediate stop (`stop_runners`) raises. `place_waiting(generation)`: placement finds
    no free slot (the reason given) instead of placing that generation.
    `hold_compile(n)` / `hold_checkpoint(input)` / `hold_start(generation)`: that activity waits until `release()` (then
    answers as above); `held` names the activities waiting meanwhile ("compile 1",
    "checkpoint 3 then stop").
    `generations`, `checkpoints`, `stops` (host teardowns) and `stop_modes` (`stop_runners`) record
    what the workflow asked for.
    """

    monitor: Callable[[int], MonitorResult | None] = lambda generation: None
    start_error: Callable[[int], BaseException | None] = lambda generation: None
    compile_error: Callable[[int], BaseException | None] = lambda n: None
    checkpoint_error: Callable[[CheckpointInput], BaseException | None] = lambda inp: None
    stop_error: Callable[[StopInput], BaseException | None] = lambda inp: None
    place_waiting: Callable[[int], str | None] = lambda generation: None
    hold_compile: Callable[[int], bool] = lambda n: False
    hold_checkpoint: Callable[[CheckpointInput], bool] = lambda inp: False
    hold_start: Callable[[int], bool] = lambda generation: False
    checkpoints: list[int] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    stops: list[HostStopInput] = field(default_factory=list)
    stop_modes: list[str] = field(default_factory=list)
    programs: dict[str, Any] = field(default_factory=dict)  # job id -> its compiled program
    compiles: int = 0
    committed_epochs: list[int] = field(default_factory=list)  # published by an upgrade's commit_epochs
    held: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        """Let every held activity (and any held later) go on."""
        self.released.set()

    async def _wait_if_held(self, hold: bool, what: str) -> None:
        if not hold:
            return
        self.held.append(what)
        try:
            while not self.released.is_set():  # heartbeats: a cancel reaches it, no timeout fires
                activity.heartbeat()
                await asyncio.sleep(0.05)
        finally:
            self.held.remove(what)

    def activities(self) -> list[Callable[..., Any]]:
        fake = self

        @activity.defn(name="compile_program")
        async def compile_(inp: CompileInput) -> CompileResult:
            fake.compiles += 1
            n = fake.compiles
            await fake._wait_if_held(fake.hold_compile(n), f"compile {n}")
            error = fake.compile_error(n)
            if error is not None:
                raise error
            program = compile_program(inp.spec.pipeline, inp.spec.config)
            fake.programs[inp.spec.job_id] = program
            return CompileResult(program=program, checkpoint_url="/nonexistent", latest_epoch=0, highest_epoch=0)

        @activity.defn(name="check_upgrade")
        async def check_upgrade(inp: UpgradeCheckInput) -> UpgradeCheckResult:
            program = compile_program(inp.spec.pipeline, inp.spec.config)
            verdict = check_compatibility(inp.program, program, inp.allow_drop_state)
            return UpgradeCheckResult(program=program, problems=verdict.problems, dropped_state=verdict.dropped_state)

        @activity.defn(name="commit_epochs")
        async def commit_epochs(inp: CommitEpochsInput) -> int:
            fake.committed_epochs += inp.epochs
            return 0

        @activity.defn(name="schedule_runners")
        async def schedule(inp: ScheduleInput) -> list[RunnerInfo]:
            fake.generations.append(inp.generation)
            count = runners_needed(inp.program, inp.slots_per_runner)
            return [
                RunnerInfo(runner_id=f"g{inp.generation}-r{i}", generation=inp.generation, control_port=1,
                           slots=inp.slots_per_runner)
                for i in range(count)
            ]  # fmt: skip

        @activity.defn(name="start_execution")
        async def start(inp: StartExecutionInput) -> None:
            await fake._wait_if_held(fake.hold_start(inp.generation), f"start {inp.generation}")
            error = fake.start_error(inp.generation)
            if error is not None:
                raise error

        @activity.defn(name="monitor_runners")
        async def monitor(inp: MonitorInput) -> MonitorResult:
            result = fake.monitor(inp.generation)
            if result is not None:
                return result
            while True:  # nothing to report: run until cancelled
                activity.heartbeat()
                await asyncio.sleep(FAKE_HEARTBEAT_S)

        @activity.defn(name="checkpoint")
        async def checkpoint(inp: CheckpointInput) -> CheckpointInfo:
            fake.checkpoints.append(inp.epoch)
            what = f"checkpoint {inp.epoch}" + (" then stop" if inp.then_stop else "")
            await fake._wait_if_held(fake.hold_checkpoint(inp), what)
            error = fake.checkpoint_error(inp)
            if error is not None:
                raise error
            return CheckpointInfo(epoch=inp.epoch, manifest_path="/nonexistent", then_stop=inp.then_stop,
                                  duration_s=0.0)  # fmt: skip

        @activity.defn(name="cleanup_checkpoints")
        async def cleanup(inp: CleanupInput) -> int:
            return 0

        @activity.defn(name="stop_runners")
        async def stop(inp: StopInput) -> None:
            fake.stop_modes.append(inp.mode)
            error = fake.stop_error(inp)
            if error is not None:
                raise error

        @activity.defn(name="teardown_runners")
        async def teardown(inp: TeardownInput) -> int:
            return 0

        @activity.defn(name="place_runners")
        async def place(req: PlaceRequest) -> Placement:
            waiting = fake.place_waiting(req.generation)
            if waiting is not None:
                return Placement(shares=[], waiting_reason=waiting)
            share = HostShare(host_id="fake-host", task_queue=activity.info().task_queue, address="127.0.0.1",
                              runners=max(1, req.runners), first_index=0)  # fmt: skip
            return Placement(shares=[share])

        @activity.defn(name="release_slots")
        async def release(req: ReleaseRequest) -> int:
            return 0

        @activity.defn(name=HOST_START_RUNNERS)
        async def host_start(inp: HostStartInput) -> list[RunnerInfo]:
            fake.generations.append(inp.generation)
            error = fake.start_error(inp.generation)
            result = fake.monitor(inp.generation)
            if result is not None and error is None:
                # Sent before the runners are "started": the job holds it (its view of the
                # generation) and acts on it once Running, as the monitor activity's result was.
                report = fake.report(inp.job_id, inp.generation, result)
                await activity.client().get_workflow_handle(inp.job_id).signal(SIGNAL_RUNNER_REPORT, report)
            return [
                RunnerInfo(runner_id=f"g{inp.generation}-r{i}", generation=inp.generation, control_port=1,
                           slots=inp.slots_per_runner, host_id="fake-host")
                for i in range(inp.first_index, inp.first_index + inp.count)
            ]  # fmt: skip

        @activity.defn(name=HOST_STOP_RUNNERS)
        async def host_stop(inp: HostStopInput) -> int:
            fake.stops.append(inp)
            return 0

        return [compile_, check_upgrade, commit_epochs, schedule, start, monitor, checkpoint, cleanup, stop,
                teardown, place, release, host_start, host_stop]  # fmt: skip

    def report(self, job_id: str, generation: int, result: MonitorResult) -> RunnerReport:
        """What a host would signal for what the monitor would have returned."""
        common = dict(job_id=job_id, generation=generation, runner_id=f"g{generation}-r0", host_id="fake-host")
        if result.kind == "task_failed":
            return RunnerReport(
                **common, kind="task_failed", message=result.message, retryable=result.retryable,
                domain=result.domain, operator=result.operator, traceback=result.traceback,
            )  # fmt: skip
        if result.kind == "runner_lost":
            return RunnerReport(**common, kind="lost", message=result.message)
        program = self.programs[job_id]
        return RunnerReport(**common, kind="tasks", tasks={s.label(): "finished" for s in program.subtasks()})
