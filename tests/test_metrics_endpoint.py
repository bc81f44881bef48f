"""The observability endpoints end to end: real runner processes on a runner host with an endpoint,
and a controller worker exporting its metrics, against the session's dev server.

A labelled job runs on a host of this test (in this event loop, beside the session's worker). A
user scrapes the host's /metrics twice and sees the job's records grow; asks /jobs/{id}/metrics and
sees every operator moving; finds the endpoint in the registry; reads the runners' logs with
`sluice logs` from another directory (so only the endpoint can answer); sees the rates table in
`sluice status`; and scrapes a controller worker's /metrics for the jobs-by-state gauge and the
Temporal SDK's metrics. The checkpoint activity's metrics go through a real exporting runtime.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import ActivityEnvironment

from sluice.client import JobClient
from sluice.controller_metrics import ControllerMetrics, prometheus_runtime, record_checkpoint
from sluice.hosts.host import HostConfig, RunnerHost
from sluice.hosts.registry_client import list_hosts
from sluice.hosts.runner_logs import job_logs_dir
from sluice.models import CheckpointManifest, JobSpec, OperatorCheckpoint, StateFileDigest
from sluice.observe import job_logs, job_metrics
from sluice.settings import load_secret
from sluice.worker import create_worker
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.e2e_helpers import generator_pipeline, job_spec, stop_job_quietly, wait_status, wait_until

pytestmark = pytest.mark.usefixtures("worker")

HOST_ID = "metrics-test-host"
LABELS = {"zone": "metrics-test"}
CLI_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 10.0
RATES_TIMEOUT_S = 60.0


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as session:
        async with session.get(url) as resp:
            return resp.status, await resp.text()


def samples(text: str, family: str, **labels: str) -> list[Any]:
    """The samples of `family` whose labels include `labels`."""
    return [
        s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples
        if all(s.labels.get(k) == v for k, v in labels.items())
    ]  # fmt: skip


def cli(address: str, *args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_command(*args), cwd=PROJECT_ROOT, env=cli_env(address, state_dir),
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip


@pytest_asyncio.fixture
async def metrics_host(client: Any, state_dir: Path, session_state_dir: Path) -> AsyncIterator[RunnerHost]:
    """A runner host with an endpoint on a free port, offering slots to jobs labelled zone=metrics-test."""
    config = HostConfig(host_id=HOST_ID, slots=2, labels=LABELS, warm_runners=0, metrics_port=0)
    # The session worker's secret: the controller must reach this host's runners.
    host = RunnerHost(client, state_dir / "host", config, secret=load_secret(session_state_dir))
    async with host:
        yield host


@pytest_asyncio.fixture
async def running_job(job_client: JobClient, metrics_host: RunnerHost, state_dir: Path) -> AsyncIterator[JobSpec]:
    """An unbounded generator -> filter -> map -> files job, Running on the metrics host."""
    pipeline = generator_pipeline(
        "metered", state_dir / "out", splits=2, limit=None, rate=200.0,
        transforms=(("filter", "tests.pipeline_functions:keep_even"), ("map", "tests.pipeline_functions:add_one")),
    )  # fmt: skip
    spec = job_spec(pipeline.model_copy(update={"host_labels": LABELS}), state_dir, slots_per_runner=4)
    await job_client.start(spec)
    try:
        st = await wait_status(job_client, spec.job_id, lambda s: s.state == "Running", what="Running")
        assert {r.host_id for r in st.runners} == {HOST_ID}, st.runners
        yield spec
    finally:
        await stop_job_quietly(job_client, spec.job_id)


async def test_host_metrics_grow_and_job_metrics_move(
    client: Any, job_client: JobClient, metrics_host: RunnerHost, running_job: JobSpec
) -> None:
    assert metrics_host.endpoint is not None
    url = metrics_host.endpoint.url
    job = running_job.job_id
    operators = {"events", "filter0", "map1", "out"}

    # The registry names the endpoint, so clients find it.
    (mine,) = [h for h in await list_hosts(client) if h.host_id == HOST_ID]
    assert mine.endpoint == url

    async def records_in() -> dict[str, float]:
        status, text = await get(f"{url}/metrics")
        assert status == 200, text
        out: dict[str, float] = {}
        for s in samples(text, "sluice_records_in", job=job):
            out[s.labels["operator"]] = out.get(s.labels["operator"], 0.0) + s.value
        return out

    first = await wait_until(lambda: _all_positive(records_in, operators - {"events"}), what="records in")
    await asyncio.sleep(2.0)
    second = await records_in()
    assert all(second[op] > first[op] for op in operators - {"events"}), (first, second)
    _, text = await get(f"{url}/metrics")
    assert samples(text, "sluice_host_slots", host=HOST_ID)[0].value == 2
    assert samples(text, "sluice_host_slots_used", host=HOST_ID)[0].value >= 1
    assert samples(text, "sluice_tasks", job=job, state="running")
    lags = samples(text, "sluice_watermark_lag_seconds", job=job, operator="map1")
    assert lags and all(s.value > 0 for s in lags)  # the generator's event time is in 2024
    assert {s.labels["operator"] for s in samples(text, "sluice_backpressure_ratio", job=job)} == operators

    async def moving() -> Any:
        status, body = await get(f"{url}/jobs/{job}/metrics")
        assert status == 200, body
        m = await job_metrics(job_client, job)
        ops = m.operators
        if set(ops) != operators:
            return None
        if ops["events"].records_out_per_s <= 0 or any(ops[op].records_in_per_s <= 0 for op in operators - {"events"}):
            return None
        return m

    m = await wait_until(moving, timeout_s=RATES_TIMEOUT_S, what="every operator moving")
    assert m.hosts == [HOST_ID] and m.unreachable == [] and m.generation is not None
    assert m.operators["map1"].watermark_lag_s is not None and m.operators["events"].subtasks == 1
    assert all(0.0 <= op.backpressure <= 1.0 for op in m.operators.values())

    status, body = await get(f"{url}/jobs/{job}/logs?tail=x")
    assert status == 400 and "tail: not an integer" in body
    status, body = await get(f"{url}/jobs/no-such-job/logs")
    assert status == 404 and "no runner logs of job no-such-job" in body


async def _all_positive(read: Any, ops: set[str]) -> dict[str, float] | None:
    values = await read()
    return values if all(values.get(op, 0) > 0 for op in ops) else None


async def test_logs_and_status_through_the_endpoint(
    temporal_address: str, job_client: JobClient, running_job: JobSpec, state_dir: Path, tmp_path: Path
) -> None:
    job = running_job.job_id
    st = await job_client.status(job)
    elsewhere = tmp_path / "elsewhere"  # no runner files here: only the host's endpoint has them
    elsewhere.mkdir()
    logged = await asyncio.to_thread(cli, temporal_address, "logs", job, "-n", "50", state_dir=elsewhere)
    assert logged.returncode == 0, logged.stderr
    prefix = f"[g{st.generation}-r0] "
    assert any(line.startswith(prefix) and "serving on" in line for line in logged.stdout.splitlines()), logged.stdout

    # Following: what a runner writes next arrives through the host's stream.
    followed: list[str] = []

    async def follow() -> None:
        async for line in job_logs(job_client, job, tail=0, follow=True):
            followed.append(line)

    follower = asyncio.create_task(follow())
    log_file = job_logs_dir(state_dir / "host", job) / f"gen-{st.generation}" / "runner-0.log"
    marker = "a line written while followed"

    async def arrived() -> bool:
        with open(log_file, "a") as f:  # again until one lands after the stream began
            f.write(f"{marker}\n")
        return f"{prefix}{marker}" in followed

    try:
        await wait_until(arrived, timeout_s=CLI_TIMEOUT_S, what="a followed line")
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    async def table() -> str | None:
        shown = await asyncio.to_thread(cli, temporal_address, "status", job, state_dir=elsewhere)
        assert shown.returncode == 0, shown.stderr
        rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines() if line.split()}
        if "operator" not in rows or "map1" not in rows or float(rows["map1"][2]) <= 0:
            return None
        return shown.stdout

    shown = await wait_until(table, timeout_s=RATES_TIMEOUT_S, what="a rates table with map1 moving")
    header = next(line for line in shown.splitlines() if line.startswith("operator"))
    assert header.split() == ["operator", "subtasks", "in/s", "out/s", "wm", "lag", "backpressure"]


async def test_controller_endpoint_shows_job_states_and_temporal_sdk_metrics(
    client: Any, running_job: JobSpec, tmp_path: Path
) -> None:
    controller = create_worker(client, tmp_path / "controller", local_slots=0, warm_runners=0, metrics_port=0)
    async with controller:
        assert controller.endpoint is not None
        url = controller.endpoint.url

        async def scraped() -> str | None:
            status, text = await get(f"{url}/metrics")
            assert status == 200, text
            running = samples(text, "sluice_jobs", state="Running")
            return text if running and running[0].value >= 1 else None

        text = await wait_until(scraped, timeout_s=CLI_TIMEOUT_S, what="sluice_jobs{state=Running} >= 1")
        assert {s.labels["state"] for s in samples(text, "sluice_jobs")} >= {"Running", "Failed", "Scheduling"}
        assert any(f.name.startswith("temporal_") for f in text_string_to_metric_families(text)), text[:2000]

        status, body = await get(f"{url}/jobs/{running_job.job_id}/metrics")
        assert status == 404 and "no runner host" in body


async def test_checkpoint_activity_metrics_reach_the_controller_exporter(client: Any) -> None:
    """What the checkpoint activity records (it runs on whichever worker polls first, so this drives
    `record_checkpoint` in an activity environment on a real exporting runtime)."""
    runtime, exporter_url = prometheus_runtime()
    env = ActivityEnvironment()
    env.metric_meter = runtime.metric_meter
    digest = StateFileDigest(size=1234, sha256="0" * 64)
    manifest = CheckpointManifest(
        job_id="metered", epoch=7, generation=1, created_at=datetime.now(UTC),
        operators={"events": OperatorCheckpoint(parallelism=1, state_files=["a"], state_digests={"a": digest})},
    )  # fmt: skip
    env.run(record_checkpoint, "metered", manifest, 0.4, 3)
    source = ControllerMetrics(client, exporter_url)

    async def exported() -> str | None:
        text = await source.prometheus_text()
        return text if samples(text, "sluice_checkpoint_committed_files", job="metered") else None

    text = await wait_until(exported, timeout_s=HTTP_TIMEOUT_S, what="the checkpoint metrics exported")
    duration = samples(text, "sluice_checkpoint_activity_duration_seconds", job="metered")
    assert [s.value for s in duration if s.name.endswith("_sum")] == [pytest.approx(0.4)]
    size = samples(text, "sluice_checkpoint_size_bytes", job="metered")
    assert [s.value for s in size if s.name.endswith("_sum")] == [1234]
    assert [s.value for s in samples(text, "sluice_checkpoint_committed_files", job="metered")] == [3]
    assert samples(text, "sluice_jobs") == []  # not counted yet: only after count_jobs()
    await source.count_jobs()
    assert samples(await source.prometheus_text(), "sluice_jobs", state="Running")
