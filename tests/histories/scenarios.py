"""The scenarios of the history corpus: each drives one real job through part of its life.

A scenario gets a `ScenarioContext` (a client on a dev server where a controller worker runs,
and a fresh state directory), starts the job whose id is the scenario's name, steers it with the
same calls a user makes (the `JobClient`, raw signals like `temporal workflow signal`, SIGKILL of
a runner or of a controller worker), and returns once every run of the job is closed. The
generator then saves every run's history.

Jobs are kept small so the files are: bounded or rate-limited generators of a few rows a second,
1 s checkpoint intervals, one runner unless the scenario rescales.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError

from sluice.client import CommandRejected, JobClient
from sluice.models import JobSpec, JobStatus, PipelineSpec, UpgradeRequest
from tests.e2e_helpers import (
    ADD_ONE,
    assert_exact_output,
    assert_stream_prefix,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    kill_runner,
    read_committed_rows,
    sink_path,
    wait_closed,
    wait_status,
    wait_until,
)
from tests.histories.corpus import local_checkpoint_in_flight
from tests.pipeline_functions import FAULT_DIR_ENV, HELD_FILE, HOLD_BLOCK_FILE

START_TIMEOUT_S = 90.0  # Created -> Running: compile, two runner process starts on a busy machine
STATE_TIMEOUT_S = 90.0  # any other awaited state change
CLOSE_TIMEOUT_S = 60.0  # a terminal state reached -> the run closed (runners torn down)
CAN_TIMEOUT_S = 90.0  # two continue-as-new on a server suggesting one every ~40 events
# After a controller worker is SIGKILLed, its sticky workflow task times out (5 s) before the
# other worker takes it, and activities it held are retried after their heartbeat timeout (10 s).
FAILOVER_TIMEOUT_S = 90.0

RATE = 20.0  # rows per second per split of the unbounded jobs: a few rows per batch
STEERED = "tests.pipeline_functions:steered"
HISTORY_POLL_S = 0.1
# A held map batch must not fail its task as hung while a scenario holds it.
HELD_HANG_TIMEOUT_S = 120.0
UNKNOWN_FUNCTION = "tests.pipeline_functions:no_such_function"
ALWAYS_RAISES = "tests.pipeline_functions:always_raises"
REJECTS_INPUT = "tests.pipeline_functions:rejects_input"


@dataclass
class ScenarioContext:
    """What a scenario drives its job with; `process_workers` only for the failover scenario."""

    client: Client
    job_client: JobClient
    state_dir: Path
    process_workers: list[Any] = field(default_factory=list)  # tests.conftest.ManagedProcess


Scenario = Callable[[ScenarioContext, str], Awaitable[None]]


# ------------------------------------------------------------------------------ building blocks


def unbounded(ctx: ScenarioContext, job_id: str, **kw: Any) -> PipelineSpec:
    """generator (2 splits, RATE rows/s each, unbounded) -> add_one -> files sink."""
    return generator_pipeline(
        job_id, ctx.state_dir / "out" / job_id, splits=2, limit=None, rate=RATE, keys=8,
        transforms=(("map", ADD_ONE),), **kw,
    )


def spec_for(ctx: ScenarioContext, pipeline: PipelineSpec, job_id: str, **config: Any) -> JobSpec:
    config.setdefault("checkpoint_interval_s", 1.0)
    config.setdefault("finish_timeout_s", 15.0)  # bounds a graceful stop of an unbounded source
    return job_spec(pipeline, ctx.state_dir, job_id=job_id, **config)


async def running(ctx: ScenarioContext, job_id: str, *, epoch_above: int = 0, generation: int = 1) -> JobStatus:
    """Wait until the job is Running in `generation` (or later) with a checkpoint past `epoch_above`."""
    return await wait_status(
        ctx.job_client, job_id,
        lambda s: s.state == "Running" and s.generation >= generation and s.epoch > epoch_above,
        timeout_s=START_TIMEOUT_S,
        what=f"Running (generation >= {generation}) with a checkpoint after epoch {epoch_above}",
    )


async def ended(ctx: ScenarioContext, job_id: str, state: str) -> JobStatus:
    """Wait for the terminal `state`, then for the run to close; returns the final status."""
    st = await wait_status(
        ctx.job_client, job_id, lambda s: s.state == state, timeout_s=STATE_TIMEOUT_S,
        what=state, fail_on_failed=state != "Failed",
    )
    await wait_closed(ctx.job_client, job_id, timeout_s=CLOSE_TIMEOUT_S)
    return st


async def stop_and_close(ctx: ScenarioContext, job_id: str, mode: str = "immediate") -> JobStatus:
    await ctx.job_client.stop(job_id, mode)
    return await ended(ctx, job_id, "Stopped")


async def signal_raw(ctx: ScenarioContext, job_id: str, name: str, payload: Any) -> None:
    """A raw signal, as `temporal workflow signal --input ...` sends it (no client validation)."""
    await ctx.client.get_workflow_handle(job_id).signal(name, payload)


def check_prefix(pipeline: PipelineSpec) -> None:
    """Sanity check while generating: what was committed is a duplicate-free prefix."""
    assert_stream_prefix(read_committed_rows(sink_path(pipeline)), pipeline)


# ------------------------------------------------------------------------------ scenarios


async def finished(ctx: ScenarioContext, job_id: str) -> None:
    """Created -> Compiling -> Scheduling -> Running (periodic checkpoints) -> Finishing -> Finished."""
    pipeline = generator_pipeline(
        job_id, ctx.state_dir / "out" / job_id, splits=2, limit=60, rate=RATE, keys=8,
        transforms=(("map", ADD_ONE),),
    )
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    await ended(ctx, job_id, "Finished")
    assert_exact_output(read_committed_rows(sink_path(pipeline)), expected_rows(pipeline))


def _stop_scenario(mode: str) -> Scenario:
    async def scenario(ctx: ScenarioContext, job_id: str) -> None:
        pipeline = unbounded(ctx, job_id)
        await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
        await running(ctx, job_id)
        await stop_and_close(ctx, job_id, mode)
        check_prefix(pipeline)

    scenario.__doc__ = f"Running -> stop {mode} -> ... -> Stopped."
    return scenario


async def stop_resume(ctx: ScenarioContext, job_id: str) -> None:
    """stop none on a running job (a no-op), stop checkpoint, then `stop none` resumes the
    Stopped job as a second run restoring the final checkpoint; stopped again."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    await running(ctx, job_id)
    await signal_raw(ctx, job_id, "stop", {"mode": "none"})
    stopped = await stop_and_close(ctx, job_id, "checkpoint")
    await ctx.job_client.stop(job_id, "none")  # closed job: the client starts the second run
    await running(ctx, job_id, epoch_above=stopped.epoch)
    await stop_and_close(ctx, job_id, "immediate")
    check_prefix(pipeline)


async def rescale(ctx: ScenarioContext, job_id: str) -> None:
    """Running -> Rescaling -> Scheduling -> Running at parallelism 2 (patch update), then a
    per-operator override as a raw signal, then stopped."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id, slots_per_runner=2))
    await running(ctx, job_id)
    await ctx.job_client.rescale(job_id, parallelism=2)
    st = await running(ctx, job_id, generation=2)
    await signal_raw(ctx, job_id, "rescale", {"overrides": {"out": 1}})
    await running(ctx, job_id, generation=3, epoch_above=st.epoch)
    await stop_and_close(ctx, job_id)
    check_prefix(pipeline)


def _restart_scenario(*, force: bool, ignore_state: bool) -> Scenario:
    async def scenario(ctx: ScenarioContext, job_id: str) -> None:
        pipeline = unbounded(ctx, job_id)
        await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
        st = await running(ctx, job_id)
        await ctx.job_client.restart(job_id, force=force, ignore_state=ignore_state)
        await running(ctx, job_id, generation=2, epoch_above=st.epoch)
        await stop_and_close(ctx, job_id)
        if not ignore_state:  # from empty state the rows are produced again, by design
            check_prefix(pipeline)

    scenario.__doc__ = f"Running -> Restarting (force={force}, ignore_state={ignore_state}) -> Running."
    return scenario


async def recovery(ctx: ScenarioContext, job_id: str) -> None:
    """A runner SIGKILLed while Running: Recovering (backoff) -> Compiling -> ... -> Running."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    st = await running(ctx, job_id)
    kill_runner(st.runners[0].pid, job_id)  # type: ignore[arg-type]
    after = await running(ctx, job_id, generation=st.generation + 1)
    assert after.restarts == 1, describe_status(after)
    await stop_and_close(ctx, job_id)
    check_prefix(pipeline)


def _failure_scenario(fn: str, **config: Any) -> Scenario:
    async def scenario(ctx: ScenarioContext, job_id: str) -> None:
        pipeline = generator_pipeline(
            job_id, ctx.state_dir / "out" / job_id, splits=1, limit=None, rate=RATE, keys=4,
            transforms=(("map", fn),),
        )
        await ctx.job_client.start(spec_for(ctx, pipeline, job_id, **config))
        st = await ended(ctx, job_id, "Failed")
        assert st.failure is not None, describe_status(st)

    scenario.__doc__ = f"A pipeline whose map is {fn} ({config or 'defaults'}) -> Failed."
    return scenario


async def ttl(ctx: ScenarioContext, job_id: str) -> None:
    """Running until its TTL expires -> Stopping -> Stopped."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id, ttl_s=4.0))
    await ended(ctx, job_id, "Stopped")


# Each is recorded as rejected (or, for the unknown signal name, left unhandled) and changes nothing.
BAD_SIGNALS: list[tuple[str, Any]] = [
    ("stop", {"mode": "pause"}),  # unknown stop mode
    ("stop", "checkpoint"),  # not a JSON object
    ("stop", {"mode": "checkpoint", "when": "now"}),  # unknown field
    ("rescale", {"parallelism": 0}),  # below 1
    ("rescale", {}),  # neither parallelism nor overrides
    ("rescale", {"overrides": {"no_such_operator": 2}}),  # unknown operator
    ("restart", {"force": "sometimes"}),  # not a bool
    ("update_config", {"checkpoint_interval_s": -5}),  # out of range
    ("update_config", ["checkpoint_interval_s", 5]),  # not a JSON object
    ("pause", {}),  # no such signal
]


async def rejected_commands(ctx: ScenarioContext, job_id: str) -> None:
    """Malformed and invalid signals and updates while Running; accepted ones in between; the
    job keeps running and stops cleanly."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    await running(ctx, job_id)
    for name, payload in BAD_SIGNALS:
        await signal_raw(ctx, job_id, name, payload)
    await signal_raw(ctx, job_id, "update_config", {"checkpoint_interval_s": 2})  # accepted
    handle = ctx.client.get_workflow_handle(job_id)
    for name, payload in [("patch", {"stop": "pause"}), ("patch", {"parallelism": 0}), ("no_such_update", {})]:
        try:  # refused before it enters history (validator / unknown update / bad argument)
            await handle.execute_update(name, payload)
        except Exception:  # noqa: BLE001 - each of these must be refused; checked below
            continue
        raise AssertionError(f"update {name} {payload} was accepted")
    # (The unknown signal name may or may not be recorded as rejected, depending on whether the
    # workflow has a catch-all signal handler.)
    expected = sum(1 for name, _ in BAD_SIGNALS if name != "pause")
    await wait_status(
        ctx.job_client, job_id, lambda s: len(s.rejected_commands) >= expected and s.config.checkpoint_interval_s == 2,
        timeout_s=STATE_TIMEOUT_S, what=f"{expected} rejected commands and the accepted config change",
    )
    await stop_and_close(ctx, job_id, "checkpoint")
    # A stop of a job that ended: refused (the run is closed; nothing enters its history).
    try:
        await ctx.job_client.stop(job_id, "graceful")
    except Exception:  # noqa: BLE001 - JobClosed expected
        pass
    else:
        raise AssertionError("a stop of a Stopped job was accepted")
    check_prefix(pipeline)


async def continue_as_new(ctx: ScenarioContext, job_id: str) -> None:
    """On a server that suggests continue-as-new after a few dozen events: Running across two
    renewals (every run saved), then stop checkpoint in the latest run."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    await running(ctx, job_id)
    runs = [(await ctx.job_client.describe(job_id)).run_id]

    async def renewed_twice() -> bool:
        run_id = (await ctx.job_client.describe(job_id)).run_id
        if run_id != runs[-1]:
            runs.append(run_id)
        return len(runs) >= 3

    await wait_until(renewed_twice, timeout_s=CAN_TIMEOUT_S, interval_s=0.2, what="two continue-as-new")
    await stop_and_close(ctx, job_id, "checkpoint")
    check_prefix(pipeline)


async def sticky_worker(ctx: ScenarioContext, job_id: str) -> Any:
    """The controller worker process that completed the job's latest workflow task (it holds
    the sticky copy of the workflow): matched by the pid in the task's worker identity."""
    return await sticky_holder(ctx.client, job_id, ctx.process_workers)


async def sticky_holder(client: Client, job_id: str, workers: list[Any]) -> Any:
    """Of `workers` (objects with `.pid`), the one whose identity completed the job's latest
    workflow task; identities are "<pid>@<host>", the Python SDK's default."""
    identity = ""
    async for event in client.get_workflow_handle(job_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            identity = event.workflow_task_completed_event_attributes.identity
    pid = identity.split("@", 1)[0]
    for w in workers:
        if str(w.pid) == pid:
            return w
    raise AssertionError(f"no worker process has identity {identity!r} (pids {[w.pid for w in workers]})")


async def last_event_id(client: Client, job_id: str) -> int:
    """The id of the latest event of the job's latest run."""
    last = 0
    async for event in client.get_workflow_handle(job_id).fetch_history_events():
        last = event.event_id
    return last


async def _task_started_by(client: Client, job_id: str, pid: int, after_event: int) -> bool:
    async for event in client.get_workflow_handle(job_id).fetch_history_events():
        if event.event_id > after_event and event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            if event.workflow_task_started_event_attributes.identity.split("@", 1)[0] == str(pid):
                return True
    return False


async def freeze_until_task_started(client: Client, job_id: str, worker: Any, *, timeout_s: float) -> None:
    """SIGSTOP `worker` (a process we started) and return once the server has handed it the
    job's next workflow task (its poll was already in flight): killed now, it dies holding a
    started task, which times out (start-to-close) and is retried on another worker."""
    after = await last_event_id(client, job_id)
    os.kill(worker.pid, signal.SIGSTOP)
    await wait_until(
        lambda: _task_started_by(client, job_id, worker.pid, after), timeout_s=timeout_s, interval_s=0.05,
        what=f"{job_id}: the frozen worker {worker.pid} to be handed the next workflow task",
    )


def _failover_scenario(*, mid_task: bool) -> Scenario:
    async def scenario(ctx: ScenarioContext, job_id: str) -> None:
        await _worker_failover(ctx, job_id, mid_task=mid_task)

    scenario.__doc__ = (
        "Two controller workers; while the job waits on its checkpoint timer the worker holding its "
        "sticky workflow task is SIGKILLed"
        + (", after being frozen until it was handed the next task (start-to-close timeout, retried)."
           if mid_task else " (the next task times out on its sticky queue).")
    )
    return scenario


async def _worker_failover(ctx: ScenarioContext, job_id: str, *, mid_task: bool) -> None:
    """Right after a checkpoint, while the job waits on its checkpoint timer, the worker holding
    its sticky workflow task is SIGKILLed (with `mid_task`, once it holds the next task). The
    other worker takes over when the timer fires; checkpoints go on; stop checkpoint."""
    assert len(ctx.process_workers) >= 2, "the failover scenario needs two process workers"
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id, checkpoint_interval_s=5.0))
    st = await running(ctx, job_id)
    # Right after the next checkpoint completes, the workflow waits ~5 s on its timer.
    st = await running(ctx, job_id, epoch_above=st.epoch)
    victim = await sticky_worker(ctx, job_id)
    if mid_task:
        await freeze_until_task_started(ctx.client, job_id, victim, timeout_s=FAILOVER_TIMEOUT_S)
    victim.kill()
    ctx.process_workers.remove(victim)
    after = await wait_status(
        ctx.job_client, job_id, lambda s: s.epoch >= st.epoch + 2, timeout_s=FAILOVER_TIMEOUT_S,
        what="two more checkpoints after the failover",
    )
    assert after.generation == st.generation and after.restarts == 0, describe_status(after)
    await stop_and_close(ctx, job_id, "checkpoint")
    check_prefix(pipeline)


# Every scenario, by name (= job id = history file prefix). `continue_as_new` needs the server
# with a low continue-as-new suggestion, `worker_failover` two process workers: the generator
# runs them apart.
SCENARIOS: dict[str, Scenario] = {
    "finished": finished,
    "stop_checkpoint": _stop_scenario("checkpoint"),
    "stop_graceful": _stop_scenario("graceful"),
    "stop_immediate": _stop_scenario("immediate"),
    "stop_force": _stop_scenario("force"),
    "stop_resume": stop_resume,
    "rescale": rescale,
    "restart_safe": _restart_scenario(force=False, ignore_state=False),
    "restart_force": _restart_scenario(force=True, ignore_state=False),
    "restart_ignore_state": _restart_scenario(force=False, ignore_state=True),
    "recovery": recovery,
    "failure_user_error": _failure_scenario(REJECTS_INPUT),
    "failure_import": _failure_scenario(UNKNOWN_FUNCTION),
    "failure_restarts_exhausted": _failure_scenario(ALWAYS_RAISES, allowed_restarts=1),
    "ttl": ttl,
    "rejected_commands": rejected_commands,
    "continue_as_new": continue_as_new,
    "worker_failover": _failover_scenario(mid_task=False),
    "worker_failover_mid_task": _failover_scenario(mid_task=True),
}


async def savepoints(ctx: ScenarioContext, job_id: str) -> None:
    """Running: a savepoint (the `savepoint` update, a checkpoint kept under a name), the same
    name again (refused, the job runs on), a savepoint with the default name, then stopped."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    await running(ctx, job_id, epoch_above=0)
    taken = await ctx.job_client.savepoint(job_id, "before-change")
    try:
        await ctx.job_client.savepoint(job_id, "before-change")
    except CommandRejected as e:
        assert "already has a savepoint named" in str(e), e
    else:
        raise AssertionError("a second savepoint of the same name was taken")
    again = await ctx.job_client.savepoint(job_id)
    assert again.name == f"savepoint-{again.epoch}" and again.epoch > taken.epoch, again
    await stop_and_close(ctx, job_id)
    check_prefix(pipeline)


async def upgrades(ctx: ScenarioContext, job_id: str) -> None:
    """Running: an upgrade that adds a filter (check, savepoint, Upgrading, new generation, a
    health window, held-back output published), then one whose new map always raises (rolled back
    to the savepoint and the previous pipeline), then stopped."""
    pipeline = unbounded(ctx, job_id)
    await ctx.job_client.start(spec_for(ctx, pipeline, job_id))
    await running(ctx, job_id, epoch_above=0)
    ops = [op.model_dump(by_alias=True, exclude_none=True) for op in pipeline.operators]
    keep_all = {"id": "keep_all", "type": "filter", "expr": "value >= 0"}
    filtered = PipelineSpec.model_validate({**pipeline.model_dump(), "operators": [*ops[:-1], keep_all, ops[-1]]})
    up = await ctx.job_client.upgrade(job_id, UpgradeRequest(pipeline=filtered, health_window_s=2.0))
    assert up.phase == "health_window", up
    await wait_status(ctx.job_client, job_id, lambda s: s.upgrade is not None and s.upgrade.phase == "completed",
                      timeout_s=STATE_TIMEOUT_S, what="upgrade 1 completed")  # fmt: skip
    failing = {"id": "new_map", "type": "map", "fn": ALWAYS_RAISES}
    broken = PipelineSpec.model_validate({**pipeline.model_dump(), "operators": [*ops[:-1], failing, ops[-1]]})
    await ctx.job_client.upgrade(job_id, UpgradeRequest(pipeline=broken, health_window_s=30.0))
    await wait_status(ctx.job_client, job_id, lambda s: s.state == "Running" and s.upgrade is not None
                      and s.upgrade.phase == "rolled_back", timeout_s=STATE_TIMEOUT_S,
                      what="upgrade 2 rolled back")  # fmt: skip
    await stop_and_close(ctx, job_id)
    check_prefix(pipeline)


async def hold_local_checkpoint(client: Client, job_client: JobClient, job_id: str, faults: Path) -> Path:
    """Bring a Running job whose map is `steered` (runners started with $SLUICE_TEST_FAULT_DIR =
    `faults`) into a periodic local checkpoint that cannot complete: a map batch does not return
    while the returned hold file exists, and the checkpoint's barrier waits behind it."""
    await wait_status(job_client, job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                      timeout_s=START_TIMEOUT_S, what="Running with a checkpoint")  # fmt: skip
    controls = faults / job_id
    controls.mkdir(parents=True, exist_ok=True)
    hold = controls / HOLD_BLOCK_FILE
    hold.touch()
    await wait_until(lambda: (controls / HELD_FILE).exists(), timeout_s=START_TIMEOUT_S, interval_s=HISTORY_POLL_S,
                     what="a batch held")  # fmt: skip
    await wait_until(lambda: _local_checkpoint_open(client, job_id), timeout_s=START_TIMEOUT_S,
                     interval_s=HISTORY_POLL_S, what="a local checkpoint in flight")  # fmt: skip
    return hold


async def _local_checkpoint_open(client: Client, job_id: str) -> bool:
    return local_checkpoint_in_flight(await client.get_workflow_handle(job_id).fetch_history())


def _held_checkpoint_scenario(mode: str) -> Scenario:
    async def scenario(ctx: ScenarioContext, job_id: str) -> None:
        faults = ctx.state_dir.parent / "faults"  # one directory for all: the variable is process-wide
        os.environ.setdefault(FAULT_DIR_ENV, str(faults))
        pipeline = generator_pipeline(
            job_id, ctx.state_dir / "out" / job_id, splits=2, limit=None, rate=RATE, keys=8,
            transforms=(("map", STEERED),),
        )  # fmt: skip
        await ctx.job_client.start(spec_for(ctx, pipeline, job_id, task_hang_timeout_s=HELD_HANG_TIMEOUT_S))
        hold = await hold_local_checkpoint(ctx.client, ctx.job_client, job_id, Path(os.environ[FAULT_DIR_ENV]))
        try:
            await ctx.job_client.stop(job_id, mode)
            if mode == "checkpoint":  # waits for the held checkpoint, then takes the final one
                await wait_status(ctx.job_client, job_id, lambda s: s.state == "CheckpointStopping",
                                  timeout_s=STATE_TIMEOUT_S, what="CheckpointStopping")  # fmt: skip
                hold.unlink()
            await ended(ctx, job_id, "Stopped")
        finally:
            hold.unlink(missing_ok=True)

    scenario.__doc__ = (
        f"Running, a periodic local checkpoint held in flight past a workflow-task heartbeat, stop {mode}: "
        + ("handled while it runs, waited for, then the final checkpoint." if mode == "checkpoint"
           else "the checkpoint is cancelled.")
    )  # fmt: skip
    return scenario


# Scenarios of features newer than the first corpora: recorded only in the folders of the
# patches since (tests/histories/README.md), not in the older ones.
LATER_SCENARIOS: dict[str, Scenario] = {"savepoints": savepoints, "upgrades": upgrades}
# Scenarios of runs with the local-checkpoints patch only (a periodic checkpoint held in flight).
LOCAL_CHECKPOINT_SCENARIOS: dict[str, Scenario] = {
    "held_checkpoint_stop_checkpoint": _held_checkpoint_scenario("checkpoint"),
    "held_checkpoint_stop_immediate": _held_checkpoint_scenario("immediate"),
}
ALL_SCENARIOS: dict[str, Scenario] = {**SCENARIOS, **LATER_SCENARIOS, **LOCAL_CHECKPOINT_SCENARIOS}
CAN_SCENARIOS = frozenset({"continue_as_new"})
FAILOVER_SCENARIOS = frozenset({"worker_failover", "worker_failover_mid_task"})


async def run_ids(client: Client, job_id: str, since: datetime) -> list[str]:
    """Every run of `job_id` started at or after `since`, oldest first: the visibility listing
    (all runs, resumed ones included), completed by following continue-as-new links and by the
    latest run (so a lagging listing loses none)."""
    listed: list[tuple[Any, str]] = []
    async for wf in client.list_workflows(f'WorkflowId = "{job_id}"'):
        if wf.start_time >= since:
            listed.append((wf.start_time, wf.run_id))
    ordered = [rid for _, rid in sorted(listed)]
    latest = (await client.get_workflow_handle(job_id).describe()).run_id
    if latest not in ordered:
        ordered.append(latest)
    out: list[str] = []
    for rid in ordered:
        chain = rid
        while chain and chain not in out:
            out.append(chain)
            chain = await _continued_as(client, job_id, chain)
    return out


async def _continued_as(client: Client, job_id: str, run_id: str) -> str | None:
    last = None
    try:
        async for event in client.get_workflow_handle(job_id, run_id=run_id).fetch_history_events():
            last = event
    except RPCError:
        return None
    if last is not None and last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
        return last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id or None
    return None

