"""A job whose workflow is closed from outside sluice (terminated) leaves nothing behind: its
host stops its runners and releases its slots, so they never block other jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sluice.client import JobClient
from sluice.hosts.registry_client import list_hosts
from tests.e2e_helpers import describe_status, generator_pipeline, job_spec, pid_alive, wait_state, wait_until

pytestmark = pytest.mark.usefixtures("worker")


async def test_a_terminated_job_has_its_runners_stopped_and_slots_released(
    job_client: JobClient, client: Any, worker: Any, state_dir: Path
) -> None:
    pipeline = generator_pipeline("terminated", state_dir / "out", splits=2, limit=None, rate=100)
    spec = job_spec(pipeline, state_dir)
    await job_client.start(spec)
    st = await wait_state(job_client, spec.job_id, "Running", timeout_s=60)
    pids = [r.pid for r in st.runners if r.pid is not None]
    assert pids, describe_status(st)
    host_id = worker.host.config.host_id

    async def reserved() -> int:
        hosts = await list_hosts(client)
        return sum(h.jobs.get(spec.job_id, 0) for h in hosts if h.host_id == host_id)

    assert await reserved() > 0
    # Terminated from outside: no teardown ran; the runners and the reservation are still there.
    await client.get_workflow_handle(spec.job_id).terminate(reason="test: terminated from outside")
    assert all(pid_alive(p) for p in pids)

    # The host's own periodic check (every CLOSED_JOBS_CHECK_S) runs this too and may get there
    # first; either way the job's runners must go and its slots be released.
    assert await worker.host.stop_runners_of_closed_jobs() in ([spec.job_id], [])
    await wait_until(lambda: not any(pid_alive(p) for p in pids), timeout_s=10, what="the runners gone")
    await wait_until(lambda: _none(reserved), timeout_s=10, what="the slots released")
    # Open jobs are left alone.
    assert await worker.host.stop_runners_of_closed_jobs() == []


async def _none(count: Any) -> bool:
    return await count() == 0


async def test_a_finished_job_reports_its_result_when_no_worker_answers_queries(tmp_path: Path) -> None:
    from sluice.client import connect
    from sluice.devserver import DevServer, free_port
    from sluice.worker import create_worker

    server = DevServer(tmp_path / "temporal", port=free_port(), ui_port=None, headless=True)
    await server.astart()
    try:
        client = await connect(server.address)
        jobs = JobClient(client)
        spec = job_spec(generator_pipeline("finished", tmp_path / "out", splits=1, limit=200), tmp_path)
        async with create_worker(client, tmp_path / "worker", warm_runners=0):
            await jobs.start(spec)
            done = await wait_state(jobs, spec.job_id, "Finished", timeout_s=60)
        assert done.epoch > 0
        # No worker now: the status of the closed run comes from its input and its result.
        st = await jobs.wait_for_state(spec.job_id, ["Finished"], timeout_s=30)
        assert (st.state, st.epoch, st.generation) == ("Finished", done.epoch, done.generation), st
    finally:
        await server.astop()
