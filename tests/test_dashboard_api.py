"""The dashboard's JSON API and page (sluice/ui/server.py) against the real dev server and worker.

Through aiohttp's test client, as the page's JavaScript would call it: a finished job's page
data (graph, status, checkpoints), actions the client refuses answered with the client's own
message, and what keeps another site out (escaped job id, JSON-only actions, Host and Origin).
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from sluice.cli import web_ui_link
from sluice.client import JobClient, JobClosed
from sluice.ui.server import create_app
from sluice.ui.views import Dashboard
from tests.e2e_helpers import ADD_ONE, KEEP_EVEN, generator_pipeline, job_spec, unique_job_id, wait_state

pytestmark = pytest.mark.usefixtures("worker")

FINISH_TIMEOUT_S = 90.0


@pytest_asyncio.fixture
async def api(job_client: JobClient) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    """The dashboard app on a loopback port, talking to the session's server."""
    dashboard = Dashboard(job_client, web_ui=web_ui_link)
    async with TestClient(TestServer(create_app(dashboard), host="127.0.0.1")) as http:
        yield http


@pytest.fixture
async def finished_job(job_client: JobClient, state_dir: Path) -> str:
    """A bounded job run to Finished: generator -> filter -> map -> files sink."""
    pipeline = generator_pipeline(
        "dash-api", state_dir / "out", splits=2, limit=200, transforms=(("filter", KEEP_EVEN), ("map", ADD_ONE))
    )
    spec = job_spec(pipeline, state_dir)
    await job_client.start(spec)
    await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    return spec.job_id


async def test_finished_job_page_data_and_refused_actions(
    api: TestClient, job_client: JobClient, finished_job: str  # type: ignore[type-arg]
) -> None:
    path = f"/api/jobs/{quote(finished_job, safe='')}"
    response = await api.get(path)
    assert response.status == 200, await response.text()
    data = await response.json()
    assert data["status"]["state"] == "Finished"
    assert data["web_ui"] == web_ui_link(finished_job)
    assert [op["id"] for op in data["graph"]["operators"]] == ["events", "filter0", "map1", "out"]
    assert [op["role"] for op in data["graph"]["operators"]] == ["source", "transform", "transform", "sink"]
    assert data["graph"]["edges"] == [
        {"from": "events", "to": "filter0"},
        {"from": "filter0", "to": "map1"},
        {"from": "map1", "to": "out"},
    ]
    assert [t["to_state"] for t in data["status"]["transitions"]][-1] == "Finished"

    response = await api.get(f"{path}/checkpoints")
    assert response.status == 200, await response.text()
    checkpoints = (await response.json())["checkpoints"]
    assert checkpoints, "a finished job took at least its final checkpoint"
    newest = checkpoints[0]
    assert newest["verified"] and newest["size"] > 0
    assert newest["duration_s"] is not None and newest["duration_s"] >= 0

    listed = await (await api.get("/api/jobs")).json()
    assert {"job_id": finished_job, "state": "Finished", "pipeline_name": "dash-api"} in listed["jobs"]

    # Refused: the answer carries exactly what the client says when it refuses.
    with pytest.raises(JobClosed) as refused:
        await job_client.stop(finished_job, "checkpoint")
    response = await api.post(f"{path}/stop", json={"mode": "checkpoint"})
    assert response.status == 409
    assert (await response.json()) == {"error": str(refused.value)}
    assert str(refused.value) == f"job {finished_job} is already Finished; nothing to stop"

    response = await api.post(f"{path}/rescale", json={"parallelism": 2})
    assert response.status == 409
    assert (await response.json())["error"] == f"job {finished_job} is already Finished; nothing to rescale"


async def test_bad_actions_are_named(api: TestClient) -> None:  # type: ignore[type-arg]
    missing = unique_job_id("dash-missing")
    response = await api.post(f"/api/jobs/{missing}/stop", json={"mode": "checkpoint"})
    assert response.status == 404
    assert (await response.json()) == {"error": f"job {missing} not found"}

    response = await api.post(f"/api/jobs/{missing}/stop", json={"mode": "softly"})
    assert response.status == 400
    assert (await response.json())["error"] == (
        "unknown stop mode 'softly'; expected one of checkpoint, graceful, immediate, force"
    )

    response = await api.post(f"/api/jobs/{missing}/rescale", json={"parallelism": 0})
    assert response.status == 400
    assert (await response.json())["error"].startswith("parallelism: Input should be greater than or equal to 1")

    response = await api.post(f"/api/jobs/{missing}/restart", json={"force": "yes"})
    assert response.status == 400
    assert (await response.json())["error"] == "force and ignore_state: expected true or false"

    response = await api.post(f"/api/jobs/{missing}/stop", data=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"] == "the body must be one JSON object"

    response = await api.get(f"/api/jobs/{missing}")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert (await response.json()) == {"error": f"job {missing} not found"}


async def test_job_page_escapes_the_job_id(api: TestClient) -> None:  # type: ignore[type-arg]
    job_id = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    response = await api.get(f"/jobs/{quote(job_id, safe='')}")
    assert response.status == 200
    page = await response.text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert html.escape(job_id, quote=True) in page
    assert f'data-job-id="{html.escape(job_id, quote=True)}"' in page
    # Even an injected inline script would not run: only the server's own files do.
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"

    # The API answers as JSON, never as a page a browser would render.
    response = await api.get(f"/api/jobs/{quote(job_id, safe='')}")
    assert response.status == 404 and response.content_type == "application/json"


async def test_actions_only_as_json_from_this_origin(api: TestClient) -> None:  # type: ignore[type-arg]
    missing = unique_job_id("dash-guard")
    # A plain HTML form of another site posts form data: refused before anything is done.
    response = await api.post(f"/api/jobs/{missing}/stop", data={"mode": "force"})
    assert response.status == 415
    assert "JSON body" in (await response.json())["error"]

    response = await api.post(
        f"/api/jobs/{missing}/stop", json={"mode": "force"}, headers={"Origin": "http://evil.example"}
    )
    assert response.status == 403
    assert (await response.json())["error"] == "cross-origin action from 'http://evil.example' refused"

    # A DNS-rebinding page reaches the loopback port under its own name: refused.
    response = await api.get("/api/jobs", headers={"Host": "evil.example:8234"})
    assert response.status == 403
    assert "is not this machine" in (await response.json())["error"]
