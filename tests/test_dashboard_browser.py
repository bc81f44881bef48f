"""The dashboard in a real browser: headless Debian chromium driven by Playwright.

A running job on the session's worker, its runners on a runner host of the test's own that
serves job metrics (pinned there by a host label; the session worker's local host serves none),
the dashboard served in-process on a free loopback port, and a user's look at the job's page:
every operator in the graph, records/s that move, the transitions with Running, runners (on
that host) and checkpoints, Rescale to parallelism 2 shown in the graph, a hostile rejected
command shown as text, and the Stop button (mode checkpoint)
that stops the job, after which the page says Stopped and a second Stop shows the client's
refusal.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sluice.cli import web_ui_link
from sluice.client import JobClient
from sluice.hosts.host import HostConfig, RunnerHost
from sluice.settings import load_secret
from sluice.ui.server import DashboardServer
from sluice.ui.views import Dashboard
from tests.e2e_helpers import (
    ADD_ONE,
    KEEP_EVEN,
    generator_pipeline,
    job_spec,
    stop_job_quietly,
    wait_closed,
    wait_state,
)

pytestmark = pytest.mark.usefixtures("worker")

CHROMIUM = shutil.which("chromium")
RUNNING_TIMEOUT_S = 90.0
STOPPED_TIMEOUT_S = 90.0
# What the page shows follows the job within a few polls (one a second).
PAGE_TIMEOUT_MS = 30_000
RATE_CHANGE_TIMEOUT_S = 30.0
LOOK_INTERVAL_S = 0.5
OPERATORS = ["events", "filter0", "map1", "out"]
HOSTILE_MODE = "<img src=x onerror=window.__injected=1>"  # no quotes: the preview is JSON


@pytest_asyncio.fixture
async def metrics_host(client: Any, session_state_dir: Path, state_dir: Path) -> AsyncIterator[dict[str, str]]:
    """A runner host with a metrics endpoint (any free port) and a label of its own; yields the
    label, which a pipeline's host_labels names to run there. Closed (runners stopped) after."""
    label = {"dashboard-test": uuid.uuid4().hex[:10]}
    config = HostConfig(
        host_id=f"dash-{label['dashboard-test']}", slots=4, labels=label, warm_runners=0, metrics_port=0
    )
    # The session worker derives runner tokens from its secret: this host's runners must share it.
    host = RunnerHost(client, state_dir / "host", config, secret=load_secret(session_state_dir))
    await host.start()
    try:
        yield label
    finally:
        await host.close()


@pytest_asyncio.fixture
async def dashboard_server(job_client: JobClient) -> AsyncIterator[DashboardServer]:
    """The dashboard on a free port of 127.0.0.1, in this event loop."""
    server = DashboardServer(Dashboard(job_client, web_ui=web_ui_link), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def page() -> AsyncIterator[Any]:
    """A page of headless chromium (the system's, not a Playwright download)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the dashboard's browser test needs it")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            await browser.close()


async def _rate_text(page: Any, op: str) -> str:
    return (await page.locator(f'#graph g.op[data-op="{op}"] text.op-rate').text_content()) or ""


async def test_a_user_watches_and_stops_a_job(
    job_client: JobClient,
    state_dir: Path,
    metrics_host: dict[str, str],
    dashboard_server: DashboardServer,
    page: Any,
) -> None:
    from playwright.async_api import expect

    pipeline = generator_pipeline(
        "dash-browser", (state_dir / "out").resolve(), splits=2, limit=None, rate=300.0, batch_size=20,
        transforms=(("filter", KEEP_EVEN), ("map", ADD_ONE)),
    ).model_copy(update={"host_labels": metrics_host})
    spec = job_spec(pipeline, state_dir)
    job_id = spec.job_id
    await job_client.start(spec)
    try:
        await wait_state(job_client, job_id, "Running", timeout_s=RUNNING_TIMEOUT_S)

        # From the job list to the job's page, as a user would.
        await page.goto(dashboard_server.url)
        await page.locator(f'#jobs tr[data-job="{job_id}"] a').click()
        await expect(page).to_have_url(dashboard_server.job_url(job_id))
        await expect(page.locator("#job-id")).to_have_text(job_id)
        await expect(page.locator("#web-ui")).to_have_attribute("href", web_ui_link(job_id))

        # The graph: every operator, sources left of sinks, an edge per connection.
        for op in OPERATORS:
            await expect(page.locator(f'#graph g.op[data-op="{op}"] text.op-id')).to_have_text(op)
        await expect(page.locator("#graph path.edge")).to_have_count(3)
        source_box = await page.locator('#graph g.op[data-op="events"]').bounding_box()
        sink_box = await page.locator('#graph g.op[data-op="out"]').bounding_box()
        assert source_box is not None and sink_box is not None and source_box["x"] < sink_box["x"]

        # Live records/s: a number, and a different one a moment later while the job runs.
        await expect(page.locator('#graph g.op[data-op="map1"] text.op-rate')).to_have_text(
            re.compile(r"out \d+(\.\d)?/s")
        )
        first = await _rate_text(page, "map1")
        deadline = time.monotonic() + RATE_CHANGE_TIMEOUT_S
        later = first
        while later == first and time.monotonic() < deadline:
            await page.wait_for_timeout(LOOK_INTERVAL_S * 1000)
            later = await _rate_text(page, "map1")
        assert later != first, f"records/s of map1 stayed {first!r} for {RATE_CHANGE_TIMEOUT_S:g} s"
        out_rate = float(re.search(r"out (\d+(?:\.\d)?)/s", later).group(1))  # type: ignore[union-attr]
        assert out_rate > 0, later
        await expect(page.locator('#operators tr[data-op="events"] td.records-out')).not_to_have_text("–")

        await expect(page.locator('#transitions tr[data-to="Running"]')).to_have_count(1)
        await expect(page.locator("#runners tbody tr")).not_to_have_count(0)
        await expect(page.locator("#runners tbody tr").first).to_contain_text(metrics_host["dashboard-test"])
        await expect(page.locator("#checkpoints tbody tr").first).to_be_visible()

        # Rescale from the page: accepted, and the graph shows the new parallelism once running.
        await page.fill("#rescale-parallelism", "2")
        await page.click("#rescale")
        await expect(page.locator("#action-message")).to_have_text("rescale to parallelism 2 accepted")
        await expect(page.locator('#graph g.op[data-op="map1"] text.op-type')).to_have_text("map ×2")
        await expect(page.locator('#transitions tr[data-to="Rescaling"]')).to_have_count(1)
        await expect(page.locator("#state")).to_have_text("Running")

        # A rejected command whose payload is markup shows as text and injects nothing.
        await job_client.client.get_workflow_handle(job_id).signal("stop", {"mode": HOSTILE_MODE})
        await expect(page.locator("#rejected tbody tr").first).to_contain_text(HOSTILE_MODE)
        assert await page.locator("#rejected img").count() == 0
        assert await page.evaluate("window.__injected") is None

        # Stop, mode checkpoint: the job stops and the page says so.
        await page.select_option("#stop-mode", "checkpoint")
        await page.click("#stop")
        await expect(page.locator("#action-message")).to_have_text("stop (checkpoint) accepted")
        stopped = await wait_state(job_client, job_id, "Stopped", timeout_s=STOPPED_TIMEOUT_S)
        assert stopped.state == "Stopped"
        await expect(page.locator("#state")).to_have_text("Stopped")
        await expect(page.locator('#transitions tr[data-to="Stopped"]')).to_have_count(1)

        # Once the run has closed, another Stop is refused with the client's message.
        await wait_closed(job_client, job_id)
        await page.click("#stop")
        await expect(page.locator("#action-message")).to_have_text(
            f"job {job_id} is already Stopped; nothing to stop"
        )
        await expect(page.locator("#action-message")).to_have_class("error")
    finally:
        await stop_job_quietly(job_client, job_id)


async def test_a_failed_job_shows_its_failure_and_traceback(
    job_client: JobClient, state_dir: Path, dashboard_server: DashboardServer, page: Any
) -> None:
    from playwright.async_api import expect

    pipeline = generator_pipeline(
        "dash-failed", (state_dir / "out").resolve(), splits=1, limit=100,
        transforms=(("map", "tests.pipeline_functions:always_raises"),),
    )
    spec = job_spec(pipeline, state_dir, allowed_restarts=0)
    job_id = spec.job_id
    await job_client.start(spec)
    try:
        await wait_state(job_client, job_id, "Failed", timeout_s=RUNNING_TIMEOUT_S)
        await page.goto(dashboard_server.job_url(job_id))
        await expect(page.locator("#state")).to_have_text("Failed")
        await expect(page.locator("#failure-title")).to_have_text("Failure")
        await expect(page.locator("#failure-message")).to_contain_text("boom: this user function always fails")
        await expect(page.locator("#failure-message")).to_contain_text("in operator map0")
        await expect(page.locator("#failure-traceback")).to_contain_text("in always_raises")
        await expect(page.locator('#transitions tr[data-to="Failed"]')).to_have_count(1)
    finally:
        await stop_job_quietly(job_client, job_id)
