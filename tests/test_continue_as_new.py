"""A long-lived job continues-as-new and nothing a user can see is lost.

A dev server of its own suggests continue-as-new after a few dozen history events, so a job with a
1 s checkpoint interval renews its history every few seconds. Across those renewals the job must
keep its state (Running), its generation and runner processes (runners are not restarted), its
epoch (never resets, keeps increasing), its restart count, the config changes and the rejected
commands recorded before, and a command sent right after a renewal must still be applied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from sluice.client import JobClient, connect
from sluice.models import JobStatus
from tests.conftest import running_worker
from tests.e2e_helpers import (
    assert_stream_prefix,
    describe_status,
    generator_pipeline,
    job_spec,
    kill_runner,
    manifest_epochs,
    pid_is_runner,
    read_committed_rows,
    search_attribute_state,
    sink_path,
    stop_job_quietly,
    wait_search_attribute,
    wait_state,
    wait_status,
    wait_until,
)

HISTORY_SUGGEST_CAN = 40  # events: a 1 s checkpoint cycle adds ~12, so a new run every ~3 s
START_TIMEOUT_S = 60.0
CAN_TIMEOUT_S = 60.0


async def _last_event_type(client: Client, job_id: str, run_id: str) -> int:
    history = await client.get_workflow_handle(job_id, run_id=run_id).fetch_history()
    return history.events[-1].event_type


async def test_state_survives_continue_as_new(
    dev_server_factory: Callable[..., Any], state_dir: Path
) -> None:
    server = dev_server_factory(dynamic_config={"limit.historyCount.suggestContinueAsNew": HISTORY_SUGGEST_CAN})
    try:
        client = await connect(server.address, "default")
        job_client = JobClient(client)
        async with running_worker(client, state_dir):
            await _run(client, job_client, state_dir)
    finally:
        server.stop()


async def _run(client: Client, job_client: JobClient, state_dir: Path) -> None:
    pipeline = generator_pipeline("can", state_dir / "out", splits=2, limit=None, rate=200)
    spec = job_spec(pipeline, state_dir, checkpoint_interval_s=2.0, parallelism=2, slots_per_runner=1)
    job_id = spec.job_id
    await job_client.start(spec)
    try:
        await wait_state(job_client, job_id, "Running", timeout_s=START_TIMEOUT_S)
        st = await wait_status(job_client, job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint")

        # A restart to carry over: kill one runner, the job recovers (restarts = 1).
        kill_runner(st.runners[0].pid, job_id)  # type: ignore[arg-type]
        st = await wait_status(
            job_client, job_id, lambda s, g=st.generation: s.state == "Running" and s.generation > g,
            timeout_s=START_TIMEOUT_S, what="Running after recovery",
        )
        assert st.restarts == 1, describe_status(st)

        # A config change and a rejected command to carry over (both as raw signals, like a user
        # of `temporal workflow signal` would send them).
        handle = client.get_workflow_handle(job_id)
        await handle.signal("update_config", {"checkpoint_interval_s": 1.0})
        await handle.signal("rescale", {"parallelism": 0})
        st = await wait_status(
            job_client,
            job_id,
            lambda s: s.config.checkpoint_interval_s == 1.0 and len(s.rejected_commands) == 1,
            timeout_s=15,
            what="config change applied and bad rescale rejected",
        )
        rejected = st.rejected_commands[0]
        assert rejected.command == "rescale" and "parallelism" in rejected.reason, rejected
        base = st
        pids = sorted(r.pid for r in base.runners)  # type: ignore[type-var]

        # Watch the runs go by: at least two continue-as-new after the changes above.
        runs = [(await job_client.describe(job_id)).run_id]
        samples: list[JobStatus] = []

        async def next_run() -> bool:
            desc = await job_client.describe(job_id)
            st = await job_client.status(job_id, timeout_s=5.0)
            samples.append(st)
            if desc.run_id != runs[-1]:
                runs.append(desc.run_id)
            return len(runs) >= 3

        await wait_until(
            next_run, timeout_s=CAN_TIMEOUT_S, interval_s=0.2,
            what="two continue-as-new", last=lambda: f"runs={runs} {describe_status(samples[-1] if samples else None)}",
        )
        for old in runs[:-1]:
            assert (
                await _last_event_type(client, job_id, old) == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
            )

        # Nothing was lost: every sample since the changes shows the same job.
        epochs = [s.epoch for s in samples]
        assert epochs == sorted(epochs), f"epoch went backwards across continue-as-new: {epochs}"
        for s in samples:
            assert s.state == "Running", describe_status(s)
            assert s.generation == base.generation, f"runners were rescheduled: {describe_status(s)}"
            assert s.restarts == 1, describe_status(s)
            assert s.config.checkpoint_interval_s == 1.0, describe_status(s)
            assert [r.reason for r in s.rejected_commands] == [rejected.reason], describe_status(s)
            assert sorted(r.pid for r in s.runners) == pids, describe_status(s)  # type: ignore[type-var]
            assert s.transitions == base.transitions, describe_status(s)
        for pid in pids:
            assert pid_is_runner(pid, job_id), f"runner {pid} is gone after continue-as-new"
        assert await search_attribute_state(client, job_id) == "Running"
        # Checkpoints keep completing in the newest run.
        last = samples[-1]
        st = await wait_status(
            job_client, job_id, lambda s: s.epoch > last.epoch, timeout_s=30, what="a checkpoint in the new run"
        )
        assert st.epoch > base.epoch

        # A command sent right after a continue-as-new is applied (a raw signal: fire and forget).
        current = runs[-1]

        async def renewed() -> bool:
            return (await job_client.describe(job_id)).run_id != current

        await wait_until(renewed, timeout_s=CAN_TIMEOUT_S, interval_s=0.05, what="another continue-as-new")
        await handle.signal("rescale", {"parallelism": 1})
        st = await wait_status(
            job_client,
            job_id,
            lambda s: s.state == "Running" and s.generation > base.generation and set(s.parallelism.values()) == {1},
            timeout_s=START_TIMEOUT_S,
            what="rescaled to parallelism 1",
        )
        assert st.restarts == 1 and st.config.checkpoint_interval_s == 1.0, describe_status(st)
        epoch_before_stop = st.epoch

        await job_client.stop(job_id, "checkpoint")
        stopped = await wait_state(job_client, job_id, "Stopped", timeout_s=60)
        assert stopped.epoch > epoch_before_stop, describe_status(stopped)
        assert max(manifest_epochs(state_dir, job_id)) == stopped.epoch
        await wait_search_attribute(client, job_id, "Stopped")
        counts = assert_stream_prefix(read_committed_rows(sink_path(pipeline)), pipeline)
        assert all(n > 0 for n in counts.values()), counts
    finally:
        await stop_job_quietly(job_client, job_id)
