"""The dashboard from the command line: `sluice ui --port P` and the URL `sluice run` prints.

Both run as subprocesses against the session's dev server, as a user starts them; each is
stopped by its own PID (SIGTERM / SIGINT) and must exit 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from sluice.devserver import free_port
from sluice.settings import load_secret
from tests.conftest import LOOPBACK, PROJECT_ROOT, cli_env, sluice_command
from tests.e2e_helpers import ADD_ONE, unique_job_id

pytestmark = pytest.mark.usefixtures("worker")

LINE_TIMEOUT_S = 120.0  # until the awaited line is printed (run: server check, worker, Running)
EXIT_TIMEOUT_S = 150.0  # `sluice run` stops its job with a checkpoint (up to 120 s) after Ctrl-C
HTTP_TIMEOUT_S = 15.0


async def _read_until(proc: asyncio.subprocess.Process, prefix: str, seen: list[str]) -> str:
    """The first stdout line starting with `prefix` (lines read on the way are kept in `seen`)."""
    assert proc.stdout is not None

    async def scan() -> str:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"exited ({await proc.wait()}) before printing {prefix!r}: {seen}")
            line = raw.decode(errors="replace").strip()
            seen.append(line)
            if line.startswith(prefix):
                return line

    try:
        return await asyncio.wait_for(scan(), LINE_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"no line {prefix!r} within {LINE_TIMEOUT_S:g} s: {seen}") from None


async def _drain(proc: asyncio.subprocess.Process, seen: list[str]) -> None:
    """Keep reading stdout (into `seen`), so a full pipe never blocks the process."""
    assert proc.stdout is not None
    async for raw in proc.stdout:
        seen.append(raw.decode(errors="replace").rstrip())


async def _get(url: str) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as http:
        async with http.get(url) as response:
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else None
            return response.status, text, body


@pytest_asyncio.fixture
async def spawn(temporal_address: str) -> AsyncIterator[Any]:
    """Start `sluice ARGS...` (stdout piped); every process still running at the end is killed."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*args: str, **env: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *sluice_command(*args), cwd=PROJECT_ROOT, env=cli_env(temporal_address, **env),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sluice_ui_serves_the_dashboard_on_its_port(spawn: Any) -> None:
    port = free_port(LOOPBACK)
    proc = await spawn("ui", "--port", str(port))
    line = await _read_until(proc, "dashboard:", [])
    assert line == f"dashboard: http://127.0.0.1:{port}/ (Ctrl-C stops it)"

    status, page, _ = await _get(f"http://127.0.0.1:{port}/")
    assert status == 200 and "sluice jobs" in page
    status, _, body = await _get(f"http://127.0.0.1:{port}/api/jobs")
    assert status == 200 and isinstance(body["jobs"], list)

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S) == 0


async def test_sluice_ui_names_a_taken_port(spawn: Any) -> None:
    with_port = await spawn("ui", "--port", "0")
    line = await _read_until(with_port, "dashboard:", [])
    taken = line.split(":")[-1].split("/")[0]  # "dashboard: http://127.0.0.1:PORT/ (...)"
    proc = await spawn("ui", "--port", taken)
    out = (await asyncio.wait_for(proc.communicate(), EXIT_TIMEOUT_S))[0].decode()
    assert proc.returncode == 1
    assert out.startswith(f"error: cannot serve the dashboard on 127.0.0.1:{taken}: ")
    with_port.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(with_port.wait(), EXIT_TIMEOUT_S) == 0


async def test_sluice_run_prints_the_dashboard_url_beside_the_web_ui_link(
    spawn: Any, tmp_path: Path, session_state_dir: Path
) -> None:
    job_id = unique_job_id("dash-run")
    pipeline = {
        "name": "dash_run",
        "operators": [
            {"id": "events", "type": "generator", "splits": 1, "rate": 100.0, "batch_size": 10},
            {"id": "bump", "type": "map", "fn": ADD_ONE},
            {"id": "out", "type": "files", "path": str((tmp_path / "out").resolve())},
        ],
    }
    file = tmp_path / "pipeline.json"
    file.write_text(json.dumps(pipeline))
    # Its worker's runners may serve the session worker's jobs (one task queue): one secret.
    proc = await spawn(
        "run", str(file), "--job-id", job_id, "--dashboard-port", "0", "--state-dir", str(tmp_path / "state"),
        SLUICE_SECRET=load_secret(session_state_dir).decode(),
        COLUMNS="200",  # rich folds longer lines at the default 80 columns of a pipe
    )
    seen: list[str] = []
    web_ui = await _read_until(proc, "Web UI:", seen)
    dashboard = await _read_until(proc, "Dashboard:", seen)
    assert web_ui.endswith(f"/namespaces/default/workflows/{job_id}")
    drain = asyncio.create_task(_drain(proc, seen))
    url = dashboard.removeprefix("Dashboard: ")
    assert url.startswith("http://127.0.0.1:") and url.endswith(f"/jobs/{job_id}")

    status, page, _ = await _get(url)
    assert status == 200 and f'data-job-id="{job_id}"' in page
    status, _, body = await _get(url.replace("/jobs/", "/api/jobs/"))
    assert status == 200, body
    assert body["status"]["state"] == "Running"
    assert [op["id"] for op in body["graph"]["operators"]] == ["events", "bump", "out"]

    proc.send_signal(signal.SIGINT)  # Ctrl-C: stop with a checkpoint, then exit 0
    assert await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S) == 0, seen
    await drain
    assert any(line.startswith(f"job {job_id} is Stopped") for line in seen), seen
