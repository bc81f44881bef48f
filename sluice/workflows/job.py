"""JobWorkflow: one job's whole life, as a durable entity workflow.

It owns the job's desired config (changed by signals and updates) and its actual state (state
name, generation, epoch, runners). Each lifecycle state is a step in `states/`; the loop in `run`
moves from step to step, and every move is checked against the table in `table.py`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, SearchAttributeKey
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    # One module per state group; they import this module only for type checking: no cycle.
    from pydantic import BaseModel, Field, ValidationError

    from sluice.activities.checkpointing import CheckpointActivities
    from sluice.activities.monitoring import MonitorActivities
    from sluice.activities.placing import PlacingActivities
    from sluice.activities.stopping import StopActivities
    from sluice.engine.compiler import plan_problem
    from sluice.hosts.contracts import (
        HOST_STOP_RUNNERS,
        SIGNAL_HOST_LOST,
        SIGNAL_RUNNER_REPORT,
        SIGNAL_SLOTS_FREED,
        HostLost,
        HostStopInput,
        ReleaseRequest,
        RunnerReport,
    )
    from sluice.models import (
        SEARCH_ATTRIBUTE_PIPELINE,
        SEARCH_ATTRIBUTE_STATE,
        CleanupInput,
        ConfigPatch,
        Failure,
        JobConfig,
        JobInput,
        JobResult,
        JobSpec,
        JobStateName,
        JobStatus,
        MonitorInput,
        MonitorResult,
        PatchRequest,
        Program,
        RejectedCommand,
        RescaleCommand,
        RestartCommand,
        RestartMode,
        RunnerInfo,
        SavepointInfo,
        SavepointRequest,
        StopCommand,
        StopMode,
        TeardownInput,
        TransitionRecord,
        UpgradeDecision,
        UpgradeRequest,
        UpgradeStatus,
        WaitForStateRequest,
        pipeline_version,
    )
    from sluice.workflows import constants as C
    from sluice.workflows.metrics import record_transition, record_upgrade
    from sluice.workflows.runner_view import RunnerView, WatchKind
    from sluice.workflows.savepoints import SavepointRequests
    from sluice.workflows.states import STEPS
    from sluice.workflows.states.common import cause_of
    from sluice.workflows.states.upgrading import holding_output
    from sluice.workflows.table import STOPPING, TERMINAL, check_transition

JOB_STATE = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_STATE)
PIPELINE_NAME = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_PIPELINE)



class CommandRejected(Exception):
    """A command that is malformed or not valid in the job's current state."""


class JobIsClosing(CommandRejected):
    """The job reached a terminal state: commands need a new run (the client starts one)."""


class CarriedState(BaseModel):
    """The job's durable state: the workflow's attributes, handed whole to the next run by a
    continue-as-new (runners keep running across it)."""

    state: JobStateName = "Created"
    config: JobConfig
    generation: int = 0
    epoch: int = 0  # last completed checkpoint: the restore point
    next_epoch: int = 1  # epochs are never reused, also after failed attempts
    restarts: int = 0
    applied_nonce: int = 0
    program: Program | None = None
    checkpoint_url: str | None = None
    runners: list[RunnerInfo] = Field(default_factory=list)
    failure: Failure | None = None
    rejected: list[RejectedCommand] = Field(default_factory=list)
    transitions: list[TransitionRecord] = Field(default_factory=list)
    started_at: datetime | None = None
    ignore_state_pending: bool = False
    compiled_once: bool = False
    stop_mode: StopMode | None = None  # the mode Stopping runs with, chosen by the state that entered it
    restart_mode: RestartMode = "safe"  # of the restart in progress, fixed when Restarting is entered
    state_floor: int = 0  # checkpoints below this epoch are never restored (ignore_state, restore_epoch)
    last_error: Failure | None = None  # why the job recovers: the failure once the budget runs out
    # Consecutive recoveries for the same failure (same operator, same message) with no checkpoint
    # completed in between: a deterministic failure, which fails the job instead of the budget.
    failure_streak: int = 0
    streak_failure: Failure | None = None
    # Runner hosts (runs that started with the `runner-hosts` patch): the current generation as
    # its hosts reported it, and every host that may still run a runner of the job
    # (host id -> its task queue), so that a teardown reaches them all.
    view: RunnerView = Field(default_factory=RunnerView)
    runner_hosts: dict[str, str] = Field(default_factory=dict)
    # Pipeline upgrades: the newest one (states/upgrading.py), the new program its check compiled
    # (until the switch), and the operators an upgrade let start empty: operator -> the newest
    # epoch whose state of it is left out when restored.
    upgrade: UpgradeStatus | None = None
    upgrade_program: Program | None = None
    dropped_state: dict[str, int] = Field(default_factory=dict)


class ViewMonitor:
    """The monitor of a run on runner hosts: done once the hosts' reports (folded into the job's
    RunnerView) show something the watch set cares about. Holds no activity slot."""

    def __init__(self, wf: JobWorkflow, watch: list[WatchKind]) -> None:
        self.wf = wf
        self.watch = watch

    def outcome(self) -> MonitorResult | None:
        return self.wf.carried.view.outcome(self.watch, self.wf.carried.program)

    def done(self) -> bool:
        return self.outcome() is not None


@workflow.defn(name="JobWorkflow")
class JobWorkflow:
    """A streaming job. Signals/updates change the desired config; states converge to it."""

    @workflow.init
    def __init__(self, raw: dict[str, Any]) -> None:
        # Validated here, not by the data converter: a malformed start (e.g. from the temporal
        # CLI) must fail the job with a message naming the field, not retry a workflow task forever.
        inp, self.input_problem = _parse_job_input(raw, workflow.info().workflow_id)
        self.spec: JobSpec = inp.spec
        self.job_id = inp.spec.job_id
        carried = (
            CarriedState.model_validate(inp.carried)
            if inp.carried
            else CarriedState(
                config=inp.spec.config.model_copy(deep=True),
                applied_nonce=inp.spec.config.restart_nonce,
                checkpoint_url=inp.spec.checkpoint_url,
                ignore_state_pending=inp.spec.config.ignore_state,
            )
        )
        # The durable state: one typed model, handed whole to the next run by a continue-as-new.
        self.carried: CarriedState = carried
        self.cleanup: workflow.ActivityHandle[Any] | None = None
        self.monitor: workflow.ActivityHandle[MonitorResult] | ViewMonitor | None = None
        # Runs that started with this patch place runners on runner hosts, learn of them from
        # the hosts' signals and tear them down through the hosts; older runs (their histories
        # replay unchanged) keep the controller worker's own process scheduler.
        self.on_hosts = False
        # Runs that started with this patch restart at once after a first failure and kill the
        # failed generation (states/recovering.py); older runs back off first and drain it.
        self.fast_recovery = False
        # Runs that started with this patch have each checkpoint activity apply retention itself
        # (no `cleanup_checkpoints` activity and its workflow task: 6 history events fewer each).
        self.lean_checkpoints = False
        # Runs that started with this patch take periodic checkpoints as local activities
        # (states/common.py `start_checkpoint`): 6 history events each instead of 11.
        self.local_checkpoints = False
        self.waiting_for: str | None = None  # Scheduling: why it waits (no free runner slot)
        self.slots_freed_seen = 0  # bumped by the registry's slots_freed signals
        self.lost_hosts: set[str] = set()  # hosts the registry declared lost (this run)
        self.inflight_checkpoint: workflow.ActivityHandle[Any] | None = None
        self.upgrade_check: workflow.ActivityHandle[Any] | None = None  # an upgrade's check, in Running
        self.savepoints = SavepointRequests()  # `savepoint` updates, served by Running
        self.continuing = False
        self.commands_seen = 0  # bumped by every accepted command: wakes waiting states

    # ------------------------------------------------------------------ main loop

    @workflow.run
    async def run(self, raw: dict[str, Any]) -> JobResult:
        self.on_hosts = workflow.patched(C.PATCH_RUNNER_HOSTS)
        self.fast_recovery = workflow.patched(C.PATCH_FAST_RECOVERY)
        self.lean_checkpoints = workflow.patched(C.PATCH_LEAN_CHECKPOINTS)
        self.local_checkpoints = workflow.patched(C.PATCH_LOCAL_CHECKPOINTS)
        self.upsert_search_attributes()
        self.show_details()
        while self.carried.state not in TERMINAL:
            step = STEPS[self.carried.state]
            try:
                await step(self)
            except Exception as e:  # noqa: BLE001 - a controller bug must not wedge the job
                if self.carried.state in ("Failing", *TERMINAL):
                    raise  # failing itself failed: let Temporal retry the task (a fix can be deployed)
                self._controller_error(e)
        return await self._close()

    def _controller_error(self, e: Exception) -> None:
        """An unexpected error in a state's step: fail the job (runners released), never retry
        a workflow task forever. The failure names the state and the error."""
        message = f"controller error in {self.carried.state}: {type(e).__name__}: {_short(str(e), 500)}"
        workflow.logger.error("job %s: %s", self.job_id, message, exc_info=True)
        self.carried.failure = Failure(message=message, domain="internal")
        self.transition("Failing", message)

    async def _close(self) -> JobResult:
        """Terminal (runners already released): let handlers finish, then close the run."""
        await self.cancel_monitor()
        await self.finish_cleanup()
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self.carried.state == "Failed":
            f = self.carried.failure or Failure(message="job failed", domain="internal")
            raise ApplicationError(f.message, f.model_dump(), type="JobFailed", non_retryable=True)
        return JobResult(
            job_id=self.job_id,
            state=self.carried.state,
            epoch=self.carried.epoch,
            generation=self.carried.generation,
            restarts=self.carried.restarts,
        )

    # ------------------------------------------------------------------ transitions

    def transition(self, target: JobStateName, reason: str) -> None:
        """Move to `target` if the table allows it; record it where users can see it.

        While an upgrade switches to its new generation or watches it in the health window, a
        failure of that generation (a move to Recovering or Failing) rolls the upgrade back
        instead: the job goes to Upgrading, which restores the old pipeline."""
        up = self.carried.upgrade
        if (
            target in ("Recovering", "Failing")
            and up is not None
            and up.phase in ("switching", "health_window")
            and self.carried.state in ("Scheduling", "Running")
            and not reason.startswith("controller error")  # a controller bug fails the job, named
        ):
            failure = self.carried.failure if target == "Failing" else self.carried.last_error
            self.carried.last_error, self.carried.failure = failure, None
            up.phase = "rolling_back"
            up.reason = f"the new generation failed in {self.carried.state}: {reason}"
            target, reason = "Upgrading", f"rollback of upgrade {up.number}: {reason}"
        check_transition(self.carried.state, target)
        if up is not None and up.phase in ("checking", "awaiting_approval") and target != "Upgrading":
            # Leaving Running before the switch ends the upgrade; the old pipeline stays.
            if self.upgrade_check is not None:
                self.upgrade_check.cancel()
                self.upgrade_check = None
            up.phase, up.reason = "abandoned", f"the job left Running before the switch: {reason}"
            record_upgrade(self.job_id, up.phase)
            up.finished_at = workflow.now()
            self.carried.upgrade_program = None
        workflow.logger.info("job %s: %s -> %s (%s)", self.job_id, self.carried.state, target, reason)
        self.carried.transitions.append(
            TransitionRecord(time=workflow.now(), from_state=self.carried.state, to_state=target, reason=reason)
        )
        del self.carried.transitions[: -C.TRANSITIONS_KEPT]
        if target == "Recovering":
            self.carried.restarts += 1
            self._count_repeat(self.carried.last_error)
        record_transition(
            self.job_id, self.carried.state, target, self.carried.restarts, self.carried.config.allowed_restarts
        )
        self.carried.state = target
        self.upsert_search_attributes()
        self.show_details()

    def _count_repeat(self, failure: Failure | None) -> None:
        """Track how often the same failure repeats in a row (see `repeats_deterministically`)."""
        if (
            failure is not None
            and self.carried.streak_failure is not None
            and failure.signature() == self.carried.streak_failure.signature()
        ):
            self.carried.failure_streak += 1
        else:
            self.carried.failure_streak = 1 if failure is not None else 0
        self.carried.streak_failure = failure

    def repeats_deterministically(self) -> bool:
        """The same failure of the user's pipeline (an operator's, or a user error) came back
        IDENTICAL_FAILURES_TO_FAIL times in a row with no checkpoint in between: restarting again
        would only repeat it."""
        f = self.carried.streak_failure
        return (
            f is not None
            and (f.domain == "user" or f.operator is not None)
            and self.carried.failure_streak >= C.IDENTICAL_FAILURES_TO_FAIL
        )

    def progress_made(self) -> None:
        """A checkpoint completed: a later failure is not a repeat of an earlier one."""
        self.carried.failure_streak = 0
        self.carried.streak_failure = None

    def upsert_search_attributes(self) -> None:
        workflow.upsert_search_attributes(
            [JOB_STATE.value_set(self.carried.state), PIPELINE_NAME.value_set(self.spec.pipeline.name)]
        )

    def show_details(self) -> None:
        """The Markdown the Web UI shows as the workflow's current details."""
        c = self.carried
        par = c.program.parallelism if c.program else self.spec.pipeline.parallelism_for(c.config)
        lines = [
            f"**{c.state}** · pipeline `{self.spec.pipeline.name}`",
            "",
            f"- generation {c.generation}, last checkpoint epoch {c.epoch}, restarts {c.restarts}",
            f"- parallelism: {', '.join(f'{k}={v}' for k, v in par.items())}",
            f"- runners: {len(c.runners)}; stop: {c.config.stop}",
        ]
        if self.waiting_for:
            lines.append(f"- waiting: {_short(self.waiting_for, 300)}")
        if self.inflight_checkpoint is not None and not self.inflight_checkpoint.done():
            # A local checkpoint is no pending activity in the UI: this line says one runs. Only
            # start_checkpoint bumps next_epoch while Running, so the epoch in flight is the one below.
            lines.append(f"- checkpoint epoch {c.next_epoch - 1} in progress")
        if c.upgrade is not None:
            u = c.upgrade
            lines.append(
                f"- upgrade {u.number} ({u.mode}, version {u.from_version} → {u.to_version}): {u.phase}"
                + (f": {_short(u.reason, 300)}" if u.reason else "")
                + (" (`sluice approve`/`sluice reject`)" if u.phase == "awaiting_approval" else "")
            )
        if c.failure:
            where = f" in operator `{c.failure.operator}`" if c.failure.operator else ""
            lines.append(f"- failure ({c.failure.domain}){where}: {_short(c.failure.message, 500)}")
        if c.rejected:
            r = c.rejected[-1]
            lines.append(f"- last rejected command: `{r.command}`: {_short(r.reason, 300)}")
        if c.transitions:
            t = c.transitions[-1]
            lines.append(f"- last transition: {t.from_state} → {t.to_state} ({_short(t.reason, 300)})")
        workflow.set_current_details("\n".join(lines))

    # ------------------------------------------------------------------ desired vs actual

    def desired_parallelism(self) -> dict[str, int]:
        return self.spec.pipeline.parallelism_for(self.carried.config)

    def rescale_needed(self) -> bool:
        return self.carried.program is not None and self.desired_parallelism() != self.carried.program.parallelism

    def restart_needed(self) -> bool:
        return self.carried.config.restart_nonce != self.carried.applied_nonce

    def holding_output(self) -> bool:
        """An upgrade's health window: checkpoints hold their output back (states/upgrading.py)."""
        return holding_output(self.carried.upgrade)

    def upgrade_active(self) -> bool:
        return self.carried.upgrade is not None and self.carried.upgrade.active

    def stop_requested(self) -> bool:
        return self.carried.config.stop != "none"

    def non_running_stop_mode(self) -> StopMode:
        """Outside Running there is nothing to checkpoint or drain: stop now, or kill."""
        return "force" if self.carried.config.stop == "force" else "immediate"

    # ------------------------------------------------------------------ activity helpers

    async def race(self, handle: Awaitable[Any], wake: Callable[[], bool]) -> bool:
        """Wait for `handle` or for `wake()` to become true. Returns True if the handle finished."""
        task = asyncio.ensure_future(handle)
        await workflow.wait_condition(lambda: task.done() or wake())
        return task.done()

    async def cancel(self, handle: Any) -> None:
        """Cancel an activity and swallow its outcome: the caller has moved on."""
        if handle is None or handle.done():
            if handle is not None and handle.done() and not handle.cancelled():
                handle.exception()  # mark retrieved
            return
        handle.cancel()
        try:
            await handle
        except BaseException:  # noqa: BLE001 - cancellation or failure, both expected here
            pass

    def start_monitor(self, watch: list[WatchKind]) -> None:
        assert self.carried.program is not None
        if self.on_hosts:
            self.monitor = ViewMonitor(self, watch)
            return
        self.monitor = workflow.start_activity_method(
            MonitorActivities.monitor_runners,
            MonitorInput(
                job_id=self.job_id,
                generation=self.carried.generation,
                program=self.carried.program,
                runners=self.carried.runners,
                heartbeat_timeout_s=self.carried.config.runner_heartbeat_timeout_s,
                watch=watch,
            ),
            start_to_close_timeout=C.MONITOR_TIMEOUT,
            heartbeat_timeout=C.HEARTBEAT_TIMEOUT,
            retry_policy=C.MONITOR_RETRY,
            summary=f"monitor generation {self.carried.generation}",
        )

    async def cancel_monitor(self) -> None:
        if not isinstance(self.monitor, ViewMonitor):
            await self.cancel(self.monitor)
        self.monitor = None

    def monitor_outcome(self) -> MonitorResult:
        """The finished monitor's result; an activity failure counts as a lost runner."""
        assert self.monitor is not None and self.monitor.done()
        handle, self.monitor = self.monitor, None
        if isinstance(handle, ViewMonitor):
            outcome = handle.outcome()
            assert outcome is not None
            return outcome
        try:
            return handle.result()
        except BaseException as e:  # noqa: BLE001
            return MonitorResult(kind="runner_lost", message=f"monitor failed: {cause_of(e)}")

    def retention(self) -> CleanupInput:
        """What retention keeps: the newest checkpoints, the restore point, the newest periodic
        savepoints (only jobs that take periodic savepoints prune them)."""
        assert self.carried.checkpoint_url is not None
        return CleanupInput(
            job_id=self.job_id,
            checkpoint_url=self.carried.checkpoint_url,
            keep=self.carried.config.checkpoints_to_keep,
            protect=[self.carried.epoch, *self._upgrade_epochs()],
            periodic_savepoints_to_keep=(
                self.carried.config.periodic_savepoints_to_keep if self.carried.config.savepoint_interval_s else None
            ),
        )

    def _upgrade_epochs(self) -> list[int]:
        """While an upgrade goes on: its rollback point and its held-back epochs stay."""
        up = self.carried.upgrade
        if up is None or not up.active:
            return []
        return [*([up.restore_epoch] if up.restore_epoch else []), *up.deferred_epochs]

    def start_cleanup(self) -> None:
        """Delete checkpoints beyond the ones to keep; never blocks or fails checkpointing."""
        if self.cleanup is not None and not self.cleanup.done():
            return  # the next checkpoint cleans up
        self._drain(self.cleanup)
        assert self.carried.checkpoint_url is not None
        self.cleanup = workflow.start_activity_method(
            CheckpointActivities.cleanup_checkpoints,
            self.retention(),
            start_to_close_timeout=C.CLEANUP_TIMEOUT,
            retry_policy=C.CLEANUP_RETRY,
            summary=f"clean up checkpoints before epoch {self.carried.epoch}",
        )

    async def finish_cleanup(self) -> None:
        if self.cleanup is not None:
            try:
                await self.cleanup
            except BaseException as e:  # noqa: BLE001
                workflow.logger.warning("checkpoint cleanup failed (ignored): %s", cause_of(e))
            self.cleanup = None

    @staticmethod
    def _drain(handle: Any) -> None:
        if handle is not None and handle.done() and not handle.cancelled() and handle.exception():
            workflow.logger.warning("checkpoint cleanup failed (ignored): %s", cause_of(handle.exception()))

    async def release_runners(self) -> None:
        """Before a terminal state: stop watching and kill every runner of the job (best effort),
        so that a job reported Stopped, Finished or Failed has no process left."""
        await self.cancel(self.inflight_checkpoint)
        self.inflight_checkpoint = None
        await self.cancel_monitor()
        try:
            await self.teardown(generation=None)
        except BaseException as e:  # noqa: BLE001 - the job's outcome stands; log and go on
            workflow.logger.warning("teardown before %s failed: %s", self.carried.state, cause_of(e))
        self.carried.runners = []

    async def teardown(self, generation: int | None, *, kill: bool = False) -> None:
        """Stop the job's runners (all, or one generation); `kill`: at once, no SIGTERM grace."""
        if self.on_hosts:
            await self._teardown_on_hosts(kill=kill)
            if all(r.host_id is not None for r in self.carried.runners):
                return
            # Runners of an older run (before runner hosts) were started by a controller worker.
        await workflow.execute_activity_method(
            StopActivities.teardown_runners,
            TeardownInput(job_id=self.job_id, generation=generation),
            start_to_close_timeout=C.TEARDOWN_TIMEOUT,
            retry_policy=C.TEARDOWN_RETRY,
            summary="tear down runners" if generation is None else f"tear down generation {generation}",
        )

    async def _teardown_on_hosts(self, *, kill: bool) -> None:
        """Stop every runner of the job on every host that may have one, then release its slots.

        A host that does not answer within HOST_PICKUP_TIMEOUT is gone or cut off: its runners
        die with it or are stopped when it learns it was declared lost, and the store's
        generation fence refuses whatever they try to commit meanwhile."""
        hosts = sorted(self.carried.runner_hosts.items())
        handles = {
            host_id: workflow.start_activity(
                HOST_STOP_RUNNERS,
                HostStopInput(job_id=self.job_id, grace_s=0.0 if kill else None),
                task_queue=task_queue,
                schedule_to_start_timeout=C.HOST_PICKUP_TIMEOUT,
                start_to_close_timeout=C.TEARDOWN_TIMEOUT,
                retry_policy=C.HOST_ACTIVITY_RETRY,
                summary=f"tear down runners on host {host_id}",
            )
            for host_id, task_queue in hosts
        }
        # A host declared lost meanwhile (signal host_lost) is not waited for: nobody serves it.
        await workflow.wait_condition(
            lambda: all(h.done() or host_id in self.lost_hosts for host_id, h in handles.items())
        )
        for host_id, handle in handles.items():
            if not handle.done():
                await self.cancel(handle)
                self.carried.runner_hosts.pop(host_id, None)
                continue
            try:
                handle.result()
            except BaseException as e:  # noqa: BLE001 - gone or cut off: see the docstring
                workflow.logger.warning(
                    "job %s: host %s did not tear down its runners: %s", self.job_id, host_id, cause_of(e)
                )
            else:
                self.carried.runner_hosts.pop(host_id, None)
        await workflow.execute_activity_method(
            PlacingActivities.release_slots,
            ReleaseRequest(job_id=self.job_id),
            start_to_close_timeout=C.PLACE_TIMEOUT,
            retry_policy=C.PLACE_RETRY,
            summary="release runner slots",
        )

    def _host_signals(self) -> dict[str, tuple[type[BaseModel], Callable[[Any], None]]]:
        """Signals from runner hosts and the host registry (not user commands)."""
        return {
            SIGNAL_RUNNER_REPORT: (RunnerReport, self._apply_runner_report),
            SIGNAL_HOST_LOST: (HostLost, self._apply_host_lost),
        }

    def _apply_runner_report(self, report: RunnerReport) -> None:
        if report.job_id == self.job_id:
            self.carried.view.apply_report(report, self.carried.program, self.carried.runners)

    def _apply_host_lost(self, lost: HostLost) -> None:
        self.lost_hosts.add(lost.host_id)
        self.carried.runner_hosts.pop(lost.host_id, None)  # nothing left there to tear down
        self.carried.view.apply_host_lost(lost, self.carried.program, self.carried.runners)

    # ------------------------------------------------------------------ commands

    def _record_rejected(self, command: str, payload: Any, reason: str) -> None:
        # A bad payload can be huge (or hostile): status, details and logs quote a short prefix.
        command, reason, preview = _short(command, 100), _short(reason, C.REJECTION_REASON_CHARS), _preview(payload)
        workflow.logger.warning("job %s: rejected %s %s: %s", self.job_id, command, preview, reason)
        self.carried.rejected.append(
            RejectedCommand(time=workflow.now(), command=command, payload=preview, reason=reason)
        )
        del self.carried.rejected[: -C.REJECTED_COMMANDS_KEPT]
        self.show_details()

    def _parse(self, model: type[BaseModel], command: str, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise CommandRejected(
                f"{command} expects one JSON object, e.g. {_EXAMPLES[command]}, got {_preview(payload)}"
            )
        try:
            return model.model_validate(payload)
        except ValidationError as e:
            problems = "; ".join(
                f"{_short('.'.join(str(p) for p in err['loc']), 100) or 'payload'}: {err['msg']}"
                for err in e.errors()[:5]
            )
            raise CommandRejected(f"invalid {command}: {problems}") from None

    def _check_open(self, command: str) -> None:
        if self.carried.state in TERMINAL:
            raise JobIsClosing(f"job is already {self.carried.state}; {command} needs a new run (sluice restart)")

    def _check_no_upgrade(self, command: str) -> None:
        """Commands that would change the generation are refused while an upgrade goes on."""
        up = self.carried.upgrade
        if up is not None and up.active:
            raise CommandRejected(
                f"upgrade {up.number} is in progress ({up.phase}); {command} once it completed or rolled back"
            )

    def _check_stop(self, cmd: StopCommand) -> None:
        self._check_open("stop")
        if self.carried.state in STOPPING and cmd.mode in ("none", "checkpoint"):
            raise CommandRejected(
                f"job is already {self.carried.state} (mode {self.carried.config.stop}); "
                f"stop {cmd.mode} cannot cancel or soften it, only immediate or force escalate it"
            )

    def _check_parallelism(self, parallelism: int | None, overrides: dict[str, int] | None) -> JobConfig:
        self._check_open("rescale")
        self._check_no_upgrade("rescale")
        if self.carried.state in STOPPING:
            raise CommandRejected(f"job is {self.carried.state}; it cannot be rescaled")
        new = self.carried.config.model_copy(deep=True)
        if parallelism is not None:
            new.parallelism, new.overrides = parallelism, {}
        if overrides:
            new.overrides = {**new.overrides, **overrides}
        problem = plan_problem(self.spec.pipeline, new)
        if problem:
            raise CommandRejected(problem)
        return new

    def _check_restart(self) -> None:
        self._check_open("restart")
        self._check_no_upgrade("restart")
        if self.carried.state in STOPPING:
            raise CommandRejected(f"job is {self.carried.state}; restart it once it is Stopped")

    def _apply_stop(self, cmd: StopCommand) -> None:
        self.carried.config.stop = cmd.mode

    def _apply_restart(self, cmd: RestartCommand) -> None:
        self.carried.config.restart_nonce += 1
        self.carried.config.restart_mode = "force" if cmd.force else "safe"
        if cmd.ignore_state:
            self.carried.ignore_state_pending = True

    def _accepted(self) -> None:
        self.commands_seen += 1
        self.show_details()

    # Signals are commands: each is parsed into its model, checked against the job's state, then
    # applied. None of them is a typed @workflow.signal handler: the SDK would fail the workflow task
    # (for good, on every retry) on a signal with no or two arguments and silently drop one whose
    # payload it cannot decode. One dynamic handler takes every signal as raw payloads instead, so a
    # bad one is always recorded as rejected (sluice status shows it) and never wedges the job.

    def _apply_stop_command(self, cmd: StopCommand) -> None:
        self._check_stop(cmd)
        self._apply_stop(cmd)

    def _apply_rescale_command(self, cmd: RescaleCommand) -> None:
        self.carried.config = self._check_parallelism(cmd.parallelism, cmd.overrides)

    def _apply_restart_command(self, cmd: RestartCommand) -> None:
        self._check_restart()
        self._apply_restart(cmd)

    def _apply_config_patch(self, patch: ConfigPatch) -> None:
        self.carried.config = self._patched_config(patch)

    def _signal_commands(self) -> dict[str, tuple[type[BaseModel], Callable[[Any], None]]]:
        """Each signal name with the model its one argument must fit and what applies it."""
        return {
            "stop": (StopCommand, self._apply_stop_command),
            "rescale": (RescaleCommand, self._apply_rescale_command),
            "restart": (RestartCommand, self._apply_restart_command),
            "update_config": (ConfigPatch, self._apply_config_patch),
        }

    @workflow.signal(dynamic=True)
    def command_signal(self, name: str, args: Sequence[RawValue]) -> None:
        """Every signal: a known command is applied or rejected; an unknown name is rejected too.
        Runner hosts' reports and the registry's notices arrive here as well (never rejected for
        being about another generation: they are then simply ignored)."""
        if name == SIGNAL_SLOTS_FREED:
            self.slots_freed_seen += 1  # any payload: it only says "ask again"
            return
        host_signal = self._host_signals().get(name)
        if host_signal is not None:
            model, apply = host_signal
            try:
                if len(args) != 1:
                    raise CommandRejected(f"{name} expects one JSON object, got {len(args)} arguments")
                apply(model.model_validate(workflow.payload_converter().from_payload(args[0].payload)))
            except Exception as e:  # a malformed notice must never wedge the job
                self._record_rejected(name, None, f"invalid {name}: {_short(str(e), 300)}")
            return
        command = self._signal_commands().get(name)
        if command is None:
            self._record_rejected(
                name, None, f"unknown signal {_short(name, 100)!r}; signals are {', '.join(sorted(_EXAMPLES))}"
            )
            return
        if len(args) != 1:
            self._record_rejected(
                name, None, f"{name} expects one JSON object, e.g. {_EXAMPLES[name]}, got {len(args)} arguments"
            )
            return
        try:
            payload = workflow.payload_converter().from_payload(args[0].payload)
        except Exception as e:  # any undecodable payload is the caller's error, never the workflow's
            encoding = args[0].payload.metadata.get("encoding", b"").decode("utf-8", "replace")
            self._record_rejected(
                name,
                None,
                f"{name} expects one JSON object, e.g. {_EXAMPLES[name]}; its payload "
                f"(encoding {_short(encoding, 50)!r}) could not be decoded: {_short(str(e), 200)}",
            )
            return
        model, apply = command
        try:
            apply(self._parse(model, name, payload))
        except CommandRejected as e:
            self._record_rejected(name, payload, str(e))
            return
        self._accepted()

    def _patched_config(self, patch: ConfigPatch) -> JobConfig:
        self._check_open("update_config")
        changes = patch.model_dump(exclude_none=True)
        if "stop" in changes:
            self._check_stop(StopCommand(mode=changes["stop"]))
        if "restart_nonce" in changes and changes["restart_nonce"] != self.carried.config.restart_nonce:
            self._check_restart()
        new = JobConfig.model_validate({**self.carried.config.model_dump(), **changes})
        if "parallelism" in changes or "overrides" in changes:
            self._check_no_upgrade("rescale")
            problem = plan_problem(self.spec.pipeline, new)
            if problem:
                raise CommandRejected(problem)
        return new

    def _check_patch(self, req: PatchRequest) -> JobConfig:
        """Everything `patch` would change, checked without changing anything."""
        self._check_open("patch")
        new = self.carried.config.model_copy(deep=True)
        if req.stop is not None:
            self._check_stop(StopCommand(mode=req.stop))
            new.stop = req.stop
        if req.parallelism is not None or req.overrides:
            par = self._check_parallelism(req.parallelism, req.overrides)
            new.parallelism, new.overrides = par.parallelism, par.overrides
        if req.checkpoint_interval_s is not None:
            new.checkpoint_interval_s = req.checkpoint_interval_s
        if req.ttl_s is not None:
            new.ttl_s = req.ttl_s
        if req.restart is not None:
            self._check_restart()
        return new

    @workflow.update(name="patch")
    async def patch(self, req: PatchRequest) -> JobStatus:
        try:
            new = self._check_patch(req)  # the state may have moved since the validator ran
        except CommandRejected as e:
            raise _rejection(e) from None
        self.carried.config = new
        if req.restart is not None:
            self._apply_restart(req.restart)
        self._accepted()
        return self.status()

    @patch.validator
    def _validate_patch(self, req: PatchRequest) -> None:
        try:
            self._check_patch(req)
        except CommandRejected as e:
            raise _rejection(e) from None

    @workflow.update(name="wait_for_state")
    async def wait_for_state(self, req: WaitForStateRequest) -> JobStatus:
        """Returns when the job is in one of `req.states`. Every wait ends: on a terminal state
        (the run is closing), on continue-as-new, or after `req.timeout_s` (the caller gave up), so
        a waiter never keeps the workflow from closing."""
        wanted = set(req.states)
        try:
            await workflow.wait_condition(
                lambda: self.carried.state in wanted or self.carried.state in TERMINAL or self.continuing,
                timeout=req.timeout_s,
                timeout_summary="wait_for_state timeout",
            )
        except TimeoutError:
            raise ApplicationError(
                f"job did not reach {' or '.join(req.states)} within {req.timeout_s:g} s (it is {self.carried.state})",
                type="WaitTimedOut", non_retryable=True,
            ) from None
        if self.carried.state in wanted:
            return self.status()
        if self.carried.state == "Failed":
            f = self.carried.failure or Failure(message="job failed")
            raise ApplicationError(f"job failed: {f.message}", f.model_dump(), type="JobFailed", non_retryable=True)
        if self.carried.state in TERMINAL:
            raise ApplicationError(
                f"job is {self.carried.state}; it will not reach {' or '.join(req.states)}",
                type="JobClosed",
                non_retryable=True,
            )
        raise ApplicationError("job continued as new; wait again", type="ContinuedAsNew", non_retryable=True)

    @wait_for_state.validator
    def _validate_wait(self, req: WaitForStateRequest) -> None:
        if self.carried.state in TERMINAL and self.carried.state not in req.states:
            raise ValueError(f"job is {self.carried.state} and will not reach {', '.join(req.states)}")

    @workflow.update(name="savepoint")
    async def savepoint(self, req: SavepointRequest) -> SavepointInfo:
        """Take a checkpoint now and keep it as a savepoint; returns once it is in the store."""
        try:
            self._check_savepoint(req)
        except CommandRejected as e:
            raise _rejection(e) from None
        ticket = self.savepoints.add(req.name)
        self.commands_seen += 1  # wakes Running
        done = self.savepoints.results
        await workflow.wait_condition(
            lambda: ticket in done
            or (
                self.carried.state != "Running"
                and (not self.savepoints.in_flight(ticket) or self.inflight_checkpoint is None)
            )
        )
        outcome = done.pop(ticket, None)
        self.savepoints.withdraw(ticket)
        if isinstance(outcome, SavepointInfo):
            return outcome
        why = outcome or f"the job left Running (it is {self.carried.state}) before the savepoint was taken"
        raise ApplicationError(f"no savepoint: {why}", type="SavepointFailed", non_retryable=True)

    @savepoint.validator
    def _validate_savepoint(self, req: SavepointRequest) -> None:
        try:
            self._check_savepoint(req)
        except CommandRejected as e:
            raise _rejection(e) from None

    def _check_savepoint(self, req: SavepointRequest) -> None:
        self._check_open("savepoint")
        if self.carried.state != "Running":
            raise CommandRejected(f"a savepoint needs a Running job; job is {self.carried.state}")
        self._check_no_upgrade("take a savepoint")
        if req.name is not None and req.name in self.savepoints.names_pending():
            raise CommandRejected(f"a savepoint named {req.name!r} is already being taken")

    # ------------------------------------------------------------------ upgrades

    @workflow.update(name="upgrade")
    async def upgrade(self, req: UpgradeRequest) -> UpgradeStatus:
        """Switch the job to a new pipeline (states/upgrading.py). Returns once the new generation
        runs (its health window began), or waits for approval; fails when refused (each
        incompatible operator named), rejected or abandoned."""
        try:
            self._check_upgrade(req)
        except CommandRejected as e:
            raise _rejection(e) from None
        c = self.carried
        number = (c.upgrade.number if c.upgrade else 0) + 1
        c.upgrade = UpgradeStatus(
            number=number,
            phase="checking",
            mode=req.mode,
            require_approval=req.require_approval,
            health_window_s=req.health_window_s,
            allow_drop_state=req.allow_drop_state,
            from_version=pipeline_version(self.spec.pipeline),
            to_version=pipeline_version(req.pipeline),
            new_pipeline=req.pipeline,
            previous_pipeline=self.spec.pipeline,
            previous_parallelism=c.config.parallelism,
            previous_overrides=dict(c.config.overrides),
            requested_at=workflow.now(),
        )
        self._accepted()
        return await self._upgrade_outcome(number, {"awaiting_approval"})

    @upgrade.validator
    def _validate_upgrade(self, req: UpgradeRequest) -> None:
        try:
            self._check_upgrade(req)
        except CommandRejected as e:
            raise _rejection(e) from None

    def _check_upgrade(self, req: UpgradeRequest) -> None:
        self._check_open("upgrade")
        if self.carried.state != "Running":
            raise CommandRejected(f"an upgrade needs a Running job; job is {self.carried.state}")
        self._check_no_upgrade("upgrade again")
        if self.stop_requested() or self.restart_needed() or self.rescale_needed():
            raise CommandRejected("the job is about to stop, restart or rescale; upgrade it afterwards")
        ids = {op.id for op in req.pipeline.operators}
        config = self.carried.config.model_copy(
            update={"overrides": {op: n for op, n in self.carried.config.overrides.items() if op in ids}}
        )
        problem = plan_problem(req.pipeline, config)
        if problem:
            raise CommandRejected(f"the new pipeline cannot run with the job's config: {problem}")

    @workflow.update(name="approve_upgrade")
    async def approve_upgrade(self, decision: UpgradeDecision) -> UpgradeStatus:
        """Go ahead with (or reject) the upgrade waiting for approval."""
        try:
            up = self._check_decision()
        except CommandRejected as e:
            raise _rejection(e) from None
        if not decision.approve:
            up.phase = "rejected"
            record_upgrade(self.job_id, up.phase)
            up.reason = f"rejected: {decision.reason or 'no reason given'}"
            up.finished_at = workflow.now()
            self.carried.upgrade_program = None
            self._accepted()
            return up
        up.phase = "savepoint"
        self._accepted()
        return await self._upgrade_outcome(up.number, set())

    @approve_upgrade.validator
    def _validate_decision(self, decision: UpgradeDecision) -> None:
        try:
            self._check_decision()
        except CommandRejected as e:
            raise _rejection(e) from None

    def _check_decision(self) -> UpgradeStatus:
        self._check_open("approve_upgrade")
        up = self.carried.upgrade
        if up is None or up.phase != "awaiting_approval":
            now = f"upgrade {up.number} is {up.phase}" if up is not None else "the job has no upgrade"
            raise CommandRejected(f"no upgrade is waiting for approval ({now})")
        return up

    async def _upgrade_outcome(self, number: int, also: set[str]) -> UpgradeStatus:
        """Wait until upgrade `number`'s new generation runs, it ended, or it reached a phase in
        `also`. Every wait ends: also when the job closes or continues as new."""
        done = {"health_window", "completed", "refused", "rejected", "rolled_back", "abandoned", *also}

        def settled() -> bool:
            up = self.carried.upgrade
            return up is None or up.number != number or up.phase in done

        await workflow.wait_condition(lambda: settled() or self.carried.state in TERMINAL or self.continuing)
        up = self.carried.upgrade
        assert up is not None
        if up.phase == "refused":
            raise ApplicationError(
                up.reason or "upgrade refused", up.problems, type="UpgradeRefused", non_retryable=True
            )
        if up.phase in ("rejected", "abandoned"):
            raise ApplicationError(
                f"upgrade {up.phase}: {up.reason}", type="UpgradeEnded", non_retryable=True
            )
        if up.phase in done:
            return up
        if self.carried.state in TERMINAL:
            raise ApplicationError(f"job is {self.carried.state}; the upgrade ended with it", type="JobClosed",
                                   non_retryable=True)  # fmt: skip
        raise ApplicationError(
            "job continued as new; the upgrade goes on (sluice status shows it)", type="ContinuedAsNew",
            non_retryable=True,
        )

    @workflow.query(name="status")
    def status(self) -> JobStatus:
        return JobStatus(
            job_id=self.job_id,
            pipeline_name=self.spec.pipeline.name,
            state=self.carried.state,
            generation=self.carried.generation,
            epoch=self.carried.epoch,
            restarts=self.carried.restarts,
            config=self.carried.config,
            parallelism=self.carried.program.parallelism if self.carried.program else self.desired_parallelism(),
            runners=self.carried.runners,
            failure=self.carried.failure,
            last_error=self.carried.last_error,
            rejected_commands=self.carried.rejected,
            transitions=self.carried.transitions,
            waiting_for=self.waiting_for,
            checkpoint_url=self.carried.checkpoint_url,
            upgrade=self.carried.upgrade,
        )

    # ------------------------------------------------------------------ continue-as-new

    def continue_as_new_due(self) -> bool:
        """Renew history well before Temporal's own suggestion (4,096 events by default), so a run's
        history stays small to fetch and replay. Both inputs come from history: deterministic."""
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() >= C.CONTINUE_AS_NEW_EVENTS

    async def continue_as_new(self) -> None:
        """Renew history at a safe point; runners keep running, the next run adopts them."""
        self.continuing = True
        await self.cancel_monitor()
        await self.finish_cleanup()
        await workflow.wait_condition(workflow.all_handlers_finished)
        carried = self.carried
        # A job is pinned to the build that started its run; the next run starts on the current
        # build (Worker Versioning): that is how running jobs move to a new sluice.
        workflow.continue_as_new(
            JobInput(spec=self.spec, carried=carried.model_dump(mode="json")),
            initial_versioning_behavior=workflow.ContinueAsNewVersioningBehavior.AUTO_UPGRADE,
        )


#: the job a malformed input stands for: enough to answer queries while it fails
_INVALID_PIPELINE = {"name": "invalid", "operators": [{"id": "invalid", "type": "generator", "limit": 0}]}


def _parse_job_input(raw: Any, workflow_id: str) -> tuple[JobInput, str | None]:
    """The job input, or a stand-in and the problem (naming every offending field)."""
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"expects one JSON object {{\"spec\": {{...}}}}, got {type(raw).__name__}")
        return JobInput.model_validate(raw), None
    except (ValidationError, TypeError) as e:
        if isinstance(e, ValidationError):
            problem = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}" for err in e.errors()
            )
        else:
            problem = str(e)
        spec = JobSpec(job_id=workflow_id, pipeline=_INVALID_PIPELINE)
        return JobInput(spec=spec), f"invalid job input: {problem}"


def _rejection(e: CommandRejected) -> ApplicationError:
    """How a rejected update reaches the client: JobClosed lets it start a new run instead."""
    kind = "JobClosed" if isinstance(e, JobIsClosing) else "CommandRejected"
    return ApplicationError(str(e), type=kind, non_retryable=True)


def _short(text: str, limit: int) -> str:
    """At most `limit` characters of `text`, marked when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _preview(payload: Any) -> str | None:
    """A rejected payload as users see it: its JSON, at most a short prefix."""
    if payload is None:
        return None
    try:
        text = json.dumps(payload, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(payload)
    return _short(text, C.REJECTED_PAYLOAD_CHARS)


_EXAMPLES = {
    "stop": '{"mode": "checkpoint"}',
    "rescale": '{"parallelism": 3}',
    "restart": '{"force": false}',
    "update_config": '{"checkpoint_interval_s": 5}',
}

