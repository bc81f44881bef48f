"""The controller worker crashes (SIGKILL) while a job runs, and a new one takes over.

The job runs on a dev server of its own, controlled by `sluice worker` subprocesses (so the
session's in-process worker never sees its tasks). What a user must see: the runners keep
running while no controller is up, and once a new controller worker starts, the same job goes on
(same generation, no restart, same runner processes) and its checkpoints advance again; the
committed output stays exactly-once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluice.client import JobClient, connect
from tests.e2e_helpers import (
    assert_stream_prefix,
    describe_status,
    generator_pipeline,
    job_spec,
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

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 60.0
# After the crash, activities the dead worker held are retried once their heartbeat timeout
# (10 s) passes, so the next checkpoint needs a little more than that.
RESUME_TIMEOUT_S = 60.0


async def test_controller_worker_killed_and_replaced_while_running(
    dev_server_factory: Callable[..., Any],
    process_worker_factory: Callable[..., Any],
    state_dir: Path,
) -> None:
    server = dev_server_factory()
    worker = None
    try:
        client = await connect(server.address, "default")
        job_client = JobClient(client)
        worker = process_worker_factory(state_dir, address=server.address)

        # Unbounded, rate limited; two runner processes.
        pipeline = generator_pipeline("ctl-restart", state_dir / "out", splits=4, limit=None, rate=500)
        spec = job_spec(pipeline, state_dir, parallelism=2, slots_per_runner=1)
        job_id = spec.job_id
        await job_client.start(spec)
        try:
            await wait_state(job_client, job_id, "Running", timeout_s=START_TIMEOUT_S)
            before = await wait_status(
                job_client, job_id, lambda s: s.state == "Running" and s.epoch >= 1, timeout_s=30,
                what="Running with a checkpoint",
            )
            pids = [r.pid for r in before.runners]
            assert len(pids) == 2 and all(pids), describe_status(before)

            # Crash the controller: no chance to clean anything up.
            worker.kill()
            assert not worker.alive()
            # The epoch a checkpoint in flight at the crash could still complete with.
            epoch_at_kill = max([before.epoch, *manifest_epochs(state_dir, job_id)])

            # The runners do not depend on the controller worker: they keep running.
            for pid in pids:
                assert pid_is_runner(pid, job_id), f"runner {pid} died with the controller worker"

            worker = process_worker_factory(state_dir, address=server.address)
            after = await wait_status(
                job_client,
                job_id,
                lambda s: s.epoch > epoch_at_kill,
                timeout_s=RESUME_TIMEOUT_S,
                what=f"a checkpoint after epoch {epoch_at_kill} under the new controller worker",
            )
            assert after.state == "Running", describe_status(after)
            assert after.generation == before.generation, f"job was rescheduled: {describe_status(after)}"
            assert after.restarts == before.restarts == 0, describe_status(after)
            assert [r.pid for r in after.runners] == pids, describe_status(after)
            for pid in pids:
                assert pid_is_runner(pid, job_id), f"runner {pid} is gone after the controller restart"
            # No transition at all since the crash: the controller resumed Running where it was.
            assert after.transitions == before.transitions, describe_status(after)
            assert await search_attribute_state(client, job_id) == "Running"
            # The checkpoint the new controller took is on disk.
            assert max(manifest_epochs(state_dir, job_id)) >= after.epoch

            # And its output was committed: each split a duplicate-free prefix of its stream.
            assert_stream_prefix(read_committed_rows(sink_path(pipeline)), pipeline)

            await job_client.stop(job_id, "immediate")
            stopped = await wait_state(job_client, job_id, "Stopped", timeout_s=60)
            assert stopped.generation == before.generation
            await wait_search_attribute(client, job_id, "Stopped")
            await wait_until(
                lambda: not any(pid_is_runner(p, job_id) for p in pids),
                timeout_s=30,
                what="runners to exit after the stop",
            )
            counts = assert_stream_prefix(read_committed_rows(sink_path(pipeline)), pipeline)
            assert all(n > 0 for n in counts.values()), f"every split produced output: {counts}"
        finally:
            await stop_job_quietly(job_client, job_id)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
