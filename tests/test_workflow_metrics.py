"""The job's lifecycle metrics (sluice/workflows/metrics.py): the real JobWorkflow, fake
activities, a time-skipping server and a Temporal runtime exporting Prometheus text, scraped as
a controller worker's endpoint would: transitions by from/to, recoveries, restarts against the
budget, upgrades by outcome."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.worker import Worker

from sluice.controller_metrics import prometheus_runtime
from sluice.models import JobConfig, JobInput, JobSpec, JobStatus, MonitorResult, PipelineSpec
from sluice.workflows.job import JobWorkflow
from tests.fake_controller import FakeController
from tests.time_skipping import time_skipping_env

WAIT_S = 20.0
PIPELINE = PipelineSpec.model_validate(
    {"name": "metered", "operators": [{"id": "events", "type": "generator"}, {"id": "out", "type": "null"}]}
)


async def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ("job", "from", "to", "outcome")))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("sluice_job_")
    }


@pytest.mark.parametrize("allowed_restarts", [5, -1], ids=["budget", "unlimited"])
async def test_transitions_recoveries_and_restarts_are_exported(allowed_restarts: int) -> None:
    runtime, url = prometheus_runtime()
    async with time_skipping_env(search_attributes=True, runtime=runtime) as env:
        # Generation 1 loses a runner (a recovery); generation 2 runs.
        fake = FakeController(
            monitor=lambda g: MonitorResult(kind="runner_lost", message="runner g1-r0 exited") if g == 1 else None
        )
        queue, job_id = f"metrics-{uuid.uuid4().hex[:8]}", f"job-{uuid.uuid4().hex[:8]}"
        spec = JobSpec(job_id=job_id, pipeline=PIPELINE, config=JobConfig(allowed_restarts=allowed_restarts))
        async with Worker(env.client, task_queue=queue, workflows=[JobWorkflow], activities=fake.activities()):
            handle = await env.client.start_workflow(
                JobWorkflow.run, JobInput(spec=spec).model_dump(mode="json"), id=job_id, task_queue=queue
            )
            deadline = time.monotonic() + WAIT_S
            while True:
                st = await handle.query("status", result_type=JobStatus)
                if st.state == "Running" and st.generation == 2:
                    break
                assert time.monotonic() < deadline, f"job never ran generation 2: {st.state}"
                await asyncio.sleep(0.05)
            await handle.terminate("test over")
            fake.release()

            job = (("job", job_id),)
            deadline = time.monotonic() + WAIT_S
            seen: dict[Any, float] = {}
            while ("sluice_job_recoveries_total", job) not in seen and time.monotonic() < deadline:
                seen = await _scrape(url)
                await asyncio.sleep(0.2)
    transitions = {dict(labels)["from"] + "->" + dict(labels)["to"]: v for (name, labels), v in seen.items()
                   if name == "sluice_job_transitions_total"}  # fmt: skip
    assert transitions["Created->Compiling"] == 1 and transitions["Running->Recovering"] == 1, transitions
    assert transitions["Scheduling->Running"] == 2, transitions
    assert seen[("sluice_job_recoveries_total", job)] == 1
    assert seen[("sluice_job_restarts", job)] == 1
    # A gauge cannot be negative: an unlimited budget (-1) has none, and must not fail the job.
    assert seen.get(("sluice_job_restart_budget", job)) == (5 if allowed_restarts == 5 else None), seen
