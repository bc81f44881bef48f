"""The runner's control API, with real runner processes started by the process scheduler.

Covers authentication and generation fencing, bad input, /health, /metrics, the event stream
(and that it notices a SIGKILLed runner within about a second) and /shutdown. The end-to-end test
with a real pipeline is in test_runner_pipeline.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from sluice.auth import GENERATION_HEADER, JOB_HEADER, runner_token
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.models import RunnerInfo
from sluice.runner.client import RunnerClient, RunnerRequestRefused
from sluice.schedulers.process import ProcessScheduler
from tests.processes import pid_exists, wait_pids_gone

SECRET = b"test-secret"
START_TIMEOUT_S = 30.0
GONE_TIMEOUT_S = 5.0
JOB = "job-api"
GEN = 4
KILL_NOTICE_S = 1.5
"""A SIGKILLed runner must be noticed through its closed connection in about a second."""




@pytest_asyncio.fixture
async def runner(state_dir: Path) -> AsyncIterator[tuple[ProcessScheduler, RunnerInfo]]:
    """One live runner of JOB generation GEN; stopped (by PID, through the scheduler) after."""
    sched = ProcessScheduler(state_dir, SECRET)
    try:
        infos = await sched.start_runners(JOB, GEN, 1, 2, START_TIMEOUT_S)
        yield sched, infos[0]
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


@pytest_asyncio.fixture(scope="module")
async def shared_runner(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[ProcessScheduler, RunnerInfo]]:
    """One runner shared by the tests that leave it as they found it (keeps the suite fast)."""
    sched = ProcessScheduler(tmp_path_factory.mktemp("shared-runner"), SECRET)
    try:
        infos = await sched.start_runners(JOB, GEN, 1, 2, START_TIMEOUT_S)
        yield sched, infos[0]
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


def client_for(info: RunnerInfo, *, generation: int | None = None, token: str | None = None) -> RunnerClient:
    info = info.model_copy(update={"generation": generation}) if generation is not None else info
    return RunnerClient(info, JOB, token or runner_token(SECRET, JOB, GEN))


def headers(token: str | None = None) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token or runner_token(SECRET, JOB, GEN)}",
        JOB_HEADER: JOB,
        GENERATION_HEADER: str(GEN),
    }


async def test_health(shared_runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = shared_runner
    async with client_for(info) as c:
        health = await c.health()
    assert health["runner_id"] == info.runner_id
    assert health["generation"] == GEN
    assert health["tasks"] == {}


async def test_wrong_token_is_401(shared_runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = shared_runner
    other_gen_token = runner_token(SECRET, JOB, GEN + 1)
    async with client_for(info, token=other_gen_token) as c:
        with pytest.raises(RunnerRefused) as err:
            await c.health()
    assert isinstance(err.value, RunnerRequestRefused) and err.value.status == 401
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{info.control_url}/health") as resp:  # no credentials at all
            assert resp.status == 401
            assert "token" in (await resp.json())["error"]


async def test_wrong_generation_is_409_naming_both(shared_runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = shared_runner
    async with client_for(info, generation=GEN + 3) as c:
        with pytest.raises(RunnerRefused) as err:
            await c.health()
    assert isinstance(err.value, RunnerRequestRefused) and err.value.status == 409
    assert f"generation {GEN + 3}" in str(err.value) and f"generation {GEN}" in str(err.value)
    async with aiohttp.ClientSession() as s:
        bad_job = {**headers(), JOB_HEADER: "another-job"}
        async with s.get(f"{info.control_url}/health", headers=bad_job) as resp:
            assert resp.status == 409
            assert "another-job" in (await resp.json())["error"]
        no_gen = {k: v for k, v in headers().items() if k != GENERATION_HEADER}
        async with s.get(f"{info.control_url}/health", headers=no_gen) as resp:
            assert resp.status == 400
            assert GENERATION_HEADER in (await resp.json())["error"]


async def test_metrics_are_prometheus_text_without_auth(shared_runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = shared_runner
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{info.control_url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert "# TYPE sluice_checkpoint_duration_seconds histogram" in text
    assert "# TYPE sluice_records_out_total counter" in text
    assert "# TYPE sluice_records_in_total counter" in text


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/checkpoint", b"{not json", "not valid JSON"),
        ("/checkpoint", b"[1, 2]", "JSON object"),
        ("/checkpoint", json.dumps({"epoch": "soon"}).encode(), "epoch"),
        ("/checkpoint", json.dumps({"epoch": 0}).encode(), "epoch"),
        ("/checkpoint", json.dumps({"epoch": 1, "then_stopp": True}).encode(), "then_stopp"),
        ("/stop", json.dumps({"mode": "sometime"}).encode(), "mode"),
        ("/stop", b"", "JSON object"),
        ("/start", json.dumps({"job_id": JOB, "generation": GEN}).encode(), "program"),
        ("/start", json.dumps({"job_id": JOB, "generation": "x"}).encode(), "generation"),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    shared_runner: tuple[ProcessScheduler, RunnerInfo], path: str, body: bytes, expected: str
) -> None:
    _, info = shared_runner
    async with aiohttp.ClientSession(headers=headers()) as s:
        async with s.post(f"{info.control_url}{path}", data=body) as resp:
            assert resp.status == 400
            assert expected in (await resp.json())["error"]
        async with s.get(f"{info.control_url}/checkpoint/abc") as resp:
            assert resp.status == 400 and "epoch" in (await resp.json())["error"]
        async with s.get(f"{info.control_url}/checkpoint/1?timeout=-1") as resp:
            assert resp.status == 400 and "timeout" in (await resp.json())["error"]
        async with s.get(f"{info.control_url}/nowhere") as resp:
            assert resp.status == 404 and "error" in await resp.json()
    async with client_for(info) as c:  # still serving
        assert (await c.health())["generation"] == GEN


async def test_checkpoint_before_start_is_refused(shared_runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = shared_runner
    async with client_for(info) as c:
        with pytest.raises(RunnerRefused, match="not been started"):
            await c.checkpoint(1, then_stop=False)
        done, snapshots, failed = await c.wait_checkpoint(1, timeout_s=0.1)
    assert not done and snapshots == [] and failed is not None and "not been started" in failed


async def test_events_hello_then_heartbeats(shared_runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = shared_runner
    kinds: list[str] = []
    t0 = time.monotonic()
    async with client_for(info) as c:
        async for event in c.events(heartbeat_timeout_s=5.0):
            kinds.append(event.kind)
            assert event.runner_id == info.runner_id and event.generation == GEN
            if event.kind == "heartbeat":
                assert event.tasks == {} and event.metrics is not None
            if len(kinds) == 3:
                break
    assert kinds == ["hello", "heartbeat", "heartbeat"]
    assert time.monotonic() - t0 < 4.0  # one heartbeat per second


async def test_events_notice_a_killed_runner_quickly(runner: tuple[ProcessScheduler, RunnerInfo]) -> None:
    _, info = runner
    assert info.pid is not None
    async with client_for(info) as c:
        stream = c.events()
        first = await anext(stream)
        assert first.kind == "hello"
        os.kill(info.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(RunnerUnavailable):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
        noticed_after = time.monotonic() - killed_at
        await stream.aclose()
        # The next request fails the same way: connection refused, not a hang.
        with pytest.raises(RunnerUnavailable):
            await c.health()
    assert noticed_after < KILL_NOTICE_S, f"noticed after {noticed_after:.2f} s"


async def test_shutdown_exits_and_removes_info_file(
    runner: tuple[ProcessScheduler, RunnerInfo], state_dir: Path
) -> None:
    sched, info = runner
    async with client_for(info) as c:
        await c.shutdown()
    assert await wait_pids_gone([info.pid]) == []  # type: ignore[list-item]
    assert sched.runners(JOB) == []
    assert not pid_exists(info.pid)  # type: ignore[arg-type]


async def test_unreachable_runner_is_unavailable() -> None:
    info = RunnerInfo(runner_id="ghost", generation=GEN, control_port=9, slots=1)  # discard port
    async with client_for(info) as c:
        with pytest.raises(RunnerUnavailable):
            await c.health()
        with pytest.raises(RunnerUnavailable):
            async for _ in c.events():
                pass
