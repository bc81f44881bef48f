"""Worker Versioning end to end: a job stays on the build of sluice that started it, moves to the
current build at its next continue-as-new, and is never left without a worker.

Its own dev server (the server suggests a continue-as-new every 60 events, so runs renew within
seconds) and in-process controller workers of two builds, with real runners.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sluice import versioning
from sluice.client import JobClient, connect
from sluice.devserver import DevServer, free_port
from sluice.settings import SECRET_ENV
from sluice.worker import create_worker
from tests.e2e_helpers import generator_pipeline, job_spec, stop_job_quietly, wait_state, wait_until

pytestmark = pytest.mark.timeout(240)

SUGGEST_CAN_EVENTS = 60
OLD, NEW = "test-old", "test-new"


@pytest.fixture(autouse=True)
def shared_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds of one deployment share the runner secret (as every worker of a cluster must): the
    new build's worker takes over activities on runners the old one's host started."""
    monkeypatch.setenv(SECRET_ENV, secrets.token_hex(32))


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    dev = DevServer(tmp_path / "temporal", port=free_port(), ui_port=None, headless=True,
                    dynamic_config={"limit.historyCount.suggestContinueAsNew": SUGGEST_CAN_EVENTS})  # fmt: skip
    await dev.astart()
    try:
        yield dev
    finally:
        await dev.astop()


async def _build_of(client: Any, job_id: str) -> tuple[str, str]:
    """(the run id, the build its latest run is pinned to)."""
    desc = await client.get_workflow_handle(job_id).describe()
    return desc.run_id, desc.raw_description.workflow_execution_info.versioning_info.deployment_version.build_id


async def test_a_job_moves_to_the_new_build_at_its_next_continue_as_new(server: DevServer, tmp_path: Path) -> None:
    client = await connect(server.address)
    jobs = JobClient(client)
    pipeline = generator_pipeline("versioned", tmp_path / "out", splits=1, limit=100_000, rate=200)
    spec = job_spec(pipeline, tmp_path, checkpoint_interval_s=2.0)  # a new run every ~10 s
    runs: dict[str, set[str]] = {}  # run id -> the builds it was seen on

    async def watch() -> str:
        run, build = await _build_of(client, spec.job_id)
        runs.setdefault(run, set()).add(build)
        return run

    old = create_worker(client, tmp_path / "old", build=OLD, warm_runners=0)
    try:
        async with old:
            assert await versioning.current_build(client) == OLD
            await jobs.start(spec)
            await wait_state(jobs, spec.job_id, "Running", timeout_s=60)
            before_switch = await watch()
            async with create_worker(client, tmp_path / "new", build=NEW, warm_runners=0):
                # The new build is current: new runs start on it; a run in progress stays.
                assert await versioning.current_build(client) == NEW
                await wait_until(lambda: _run_on(watch, runs, NEW), timeout_s=90, what="a run on the new build")
                # Pinned: every workflow task of a run was completed by one build. (Not what a
                # describe shows: a run that continued as new is not pinned until its first task
                # completes, so a snapshot taken just then can still name the build before.)
                done = {run: await _task_builds(client, spec.job_id, run) for run in runs}
                assert done[before_switch] == {OLD}, done
                assert all(len(builds) == 1 for builds in done.values()), f"a run changed build: {done}"
                assert {NEW} in done.values(), done
                # The old build's worker can go (its local host with it: the job's runners
                # recover on the new worker's host): the job runs on, served by the new build.
                await old.shutdown()
                epoch = (await jobs.status(spec.job_id)).epoch
                st = await wait_until(
                    lambda: _checkpointed_past(jobs, spec.job_id, epoch), timeout_s=60,
                    what="a checkpoint after the old worker stopped",
                )
                assert st.state == "Running" and st.restarts <= 1
                await stop_job_quietly(jobs, spec.job_id, mode="immediate")
    finally:
        await stop_job_quietly(jobs, spec.job_id)


async def _task_builds(client: Any, job_id: str, run_id: str) -> set[str]:
    """The builds that completed a run's workflow tasks (from its history)."""
    history = await client.get_workflow_handle(job_id, run_id=run_id).fetch_history()
    return {
        e.workflow_task_completed_event_attributes.deployment_version.build_id
        for e in history.events
        if e.HasField("workflow_task_completed_event_attributes")
    }


async def _run_on(watch: Any, runs: dict[str, set[str]], build: str) -> bool:
    run = await watch()
    return runs[run] == {build}


async def test_a_job_whose_build_has_no_worker_is_adopted(server: DevServer, tmp_path: Path) -> None:
    client = await connect(server.address)
    jobs = JobClient(client)
    pipeline = generator_pipeline("orphan", tmp_path / "out", splits=1, limit=100_000, rate=200)
    spec = job_spec(pipeline, tmp_path, checkpoint_interval_s=600.0)  # no continue-as-new soon
    async with create_worker(client, tmp_path / "old", build=OLD, warm_runners=0):
        await jobs.start(spec)
        await wait_state(jobs, spec.job_id, "Running", timeout_s=60)
    # Every worker of the old build is gone; a worker of a new build finds the pinned job when it
    # starts (the old build's pollers are stale) and moves it, so the job can still be stopped.
    orig = versioning.POLLER_GONE_AFTER
    versioning.POLLER_GONE_AFTER = orig * 0  # the test cannot wait out the server's poller memory
    try:
        async with create_worker(client, tmp_path / "new", build=NEW, warm_runners=0):
            adopted = await wait_until(lambda: _on_build(client, spec.job_id, NEW), timeout_s=30,
                                       what="the job adopted by the new build")  # fmt: skip
            assert adopted == NEW
            await jobs.stop(spec.job_id, "immediate")
            st = await wait_state(jobs, spec.job_id, "Stopped", timeout_s=60)
            assert st.state == "Stopped"
    finally:
        versioning.POLLER_GONE_AFTER = orig
        await stop_job_quietly(jobs, spec.job_id)


async def _on_build(client: Any, job_id: str, build: str) -> str | None:
    _, pinned = await _build_of(client, job_id)
    return pinned if pinned == build else None


async def _checkpointed_past(jobs: JobClient, job_id: str, epoch: int) -> Any:
    st = await jobs.status(job_id)
    return st if st.epoch > epoch else None
