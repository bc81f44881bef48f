"""Hostile callers of the runners, and where secrets must never show up.

With real runner processes (started by the process scheduler):
- the control API refuses requests without a token, with another job's token, with an older
  generation's token, a replayed request of an older generation, and oversized or hostile bodies,
  each with a clear 4xx and a JSON error; the runner stays healthy and does nothing it was told;
- the data port refuses connections whose hello carries a bad token.

With a real job run by a `sluice worker` process on a dev server of its own: neither the shared
secret nor any runner token appears in the workflow history (every event, every payload), in the
server's files (its database and log), in the command line of a runner or of the worker, in a
runner's environment (the secret), or in any file under the state dir except the secret file.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from sluice.auth import GENERATION_HEADER, JOB_HEADER, runner_token
from sluice.client import JobClient, connect
from sluice.engine.channels import ChannelClosed, ChannelId, RemoteSender
from sluice.models import RunnerInfo
from sluice.runner.server import MAX_BODY_BYTES
from sluice.schedulers.process import ProcessScheduler
from sluice.settings import load_secret
from tests.e2e_helpers import (
    generator_pipeline,
    job_spec,
    stop_job_quietly,
    wait_closed,
    wait_state,
    wait_status,
)
from tests.processes import pid_exists

SECRET = b"hostile-callers-secret"
JOB = "job-hostile"
OTHER_JOB = "job-other"
GEN = 2  # generation 1 is the "older generation" whose credentials must no longer work
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
ACCEPT_TIMEOUT_S = 10.0
JOB_TIMEOUT_S = 120.0
LOOPBACK = "127.0.0.1"


def creds(token: str, job: str = JOB, generation: int = GEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", JOB_HEADER: job, GENERATION_HEADER: str(generation)}


GOOD = runner_token(SECRET, JOB, GEN)
OLD = runner_token(SECRET, JOB, GEN - 1)

# (what, headers) for callers that must be refused with 401 whatever they ask for.
UNAUTHENTICATED: list[tuple[str, dict[str, str]]] = [
    ("no credentials", {}),
    ("no token", {JOB_HEADER: JOB, GENERATION_HEADER: str(GEN)}),
    ("empty bearer", creds("")),
    ("basic auth", {**creds(GOOD), "Authorization": f"Basic {GOOD}"}),
    ("forged token", creds("0" * 64)),
    ("token with a suffix", creds(GOOD + "0")),
    ("token prefix", creds(GOOD[:32])),
    ("another job's token", creds(runner_token(SECRET, OTHER_JOB, GEN))),
    ("another job's token and headers", creds(runner_token(SECRET, OTHER_JOB, GEN), job=OTHER_JOB)),
    ("older generation's token", creds(OLD)),
    ("replayed request of the older generation", creds(OLD, generation=GEN - 1)),
    ("next generation's token", creds(runner_token(SECRET, JOB, GEN + 1), generation=GEN + 1)),
    ("another secret's token", creds(runner_token(b"another-secret", JOB, GEN))),
]
# Requests a hostile caller would like to make: each would change the runner if it were obeyed.
HARMFUL: list[tuple[str, str, bytes]] = [
    ("GET", "/health", b""),
    ("GET", "/events", b""),
    ("POST", "/stop", json.dumps({"mode": "immediate"}).encode()),
    ("POST", "/checkpoint", json.dumps({"epoch": 1, "then_stop": True}).encode()),
    ("POST", "/shutdown", b""),
    ("POST", "/start", json.dumps({"job_id": JOB, "generation": GEN}).encode()),
]


@pytest_asyncio.fixture
async def runner(state_dir: Path) -> AsyncIterator[RunnerInfo]:
    """One live runner of JOB generation GEN; stopped (by PID, through the scheduler) after."""
    sched = ProcessScheduler(state_dir, SECRET)
    try:
        infos = await sched.start_runners(JOB, GEN, 1, 2, START_TIMEOUT_S)
        yield infos[0]
    finally:
        await sched.stop_runners(JOB, grace_s=1.0)


async def assert_healthy(session: aiohttp.ClientSession, info: RunnerInfo) -> None:
    """The runner answers its controller, was never started or stopped, and its process lives."""
    async with session.get(f"{info.control_url}/health", headers=creds(GOOD)) as resp:
        assert resp.status == 200, await resp.text()
        health = await resp.json()
    assert health["generation"] == GEN and health["tasks"] == {}, health
    assert info.pid is not None and pid_exists(info.pid)


async def test_control_api_refuses_foreign_and_stale_credentials(runner: RunnerInfo) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for what, headers in UNAUTHENTICATED:
            for method, path, body in HARMFUL:
                async with s.request(method, f"{runner.control_url}{path}", headers=headers, data=body) as resp:
                    assert resp.status == 401, (what, method, path, resp.status, await resp.text())
                    error = (await resp.json())["error"]
                    assert "token" in error, (what, error)
                    # An unauthenticated caller learns nothing about the job or its generation.
                    assert JOB not in error and str(GEN) not in error, (what, error)
        # The right token with another job's or generation's headers is fenced (409).
        for headers in (creds(GOOD, job=OTHER_JOB), creds(GOOD, generation=GEN - 1)):
            async with s.post(f"{runner.control_url}/stop", headers=headers, data=b'{"mode": "immediate"}') as resp:
                assert resp.status == 409, await resp.text()
        await assert_healthy(s, runner)


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


HOSTILE_BODIES: list[tuple[str, str, bytes, tuple[int, ...]]] = [
    ("oversized", "/checkpoint", b" " * (MAX_BODY_BYTES + 1024), (413,)),
    ("deeply nested JSON", "/checkpoint", nested_json(200_000), (400,)),
    ("deeply nested object", "/stop", b'{"mode": ' + nested_json(100_000) + b"}", (400,)),
    ("a 10,000-digit number", "/checkpoint", b'{"epoch": ' + b"9" * 10_000 + b"}", (400,)),
    ("epoch beyond any integer", "/checkpoint", b'{"epoch": 1e999}', (400,)),
    ("invalid UTF-8", "/stop", b'{"mode": "\xff\xfe"}', (400,)),
    ("NUL bytes", "/stop", b"\x00" * 1024, (400,)),
    ("a 1.5 MB string", "/stop", json.dumps({"mode": "x" * 1_500_000}).encode(), (400,)),
]


@pytest.mark.parametrize("what,path,body,statuses", HOSTILE_BODIES, ids=[h[0] for h in HOSTILE_BODIES])
async def test_hostile_bodies_get_a_clear_4xx_and_the_runner_stays_healthy(
    runner: RunnerInfo, what: str, path: str, body: bytes, statuses: tuple[int, ...]
) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(f"{runner.control_url}{path}", headers=creds(GOOD), data=body) as resp:
            text = await resp.text()
            assert resp.status in statuses, (what, resp.status, text[:300])
            error = json.loads(text)["error"]
            assert error and len(error) < 2_000, (what, error[:300])
        # The same body without credentials is refused before it is read.
        async with s.post(f"{runner.control_url}{path}", data=body) as resp:
            assert resp.status == 401, (what, resp.status)
        await assert_healthy(s, runner)


async def test_oversized_headers_are_refused_and_the_runner_stays_healthy(runner: RunnerInfo) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        huge = {**creds(GOOD), "Authorization": "Bearer " + "a" * 100_000}
        async with s.get(f"{runner.control_url}/health", headers=huge) as resp:
            assert 400 <= resp.status < 500, resp.status
        await assert_healthy(s, runner)


DATA_CHANNEL = ChannelId(edge="events->out", sender=0, receiver=0)

# (what, job in the hello, generation in the hello, token)
BAD_HELLOS: list[tuple[str, str, int, str]] = [
    ("forged token", JOB, GEN, "f" * 64),
    ("empty token", JOB, GEN, ""),
    ("another job's token", JOB, GEN, runner_token(SECRET, OTHER_JOB, GEN)),
    ("another job", OTHER_JOB, GEN, runner_token(SECRET, OTHER_JOB, GEN)),
    ("older generation's token", JOB, GEN, OLD),
    ("replayed hello of the older generation", JOB, GEN - 1, OLD),
    ("another secret's token", JOB, GEN, runner_token(b"another-secret", JOB, GEN)),
]


@pytest.mark.parametrize("what,job,generation,token", BAD_HELLOS, ids=[b[0] for b in BAD_HELLOS])
async def test_data_port_refuses_bad_tokens(
    runner: RunnerInfo, what: str, job: str, generation: int, token: str
) -> None:
    assert runner.data_port is not None
    sender = await RemoteSender.connect(
        LOOPBACK, runner.data_port, job_id=job, generation=generation, token=token, channel=DATA_CHANNEL
    )
    try:
        with pytest.raises(ChannelClosed, match="not authorized") as refused:
            await sender.wait_accepted(timeout_s=ACCEPT_TIMEOUT_S)
        assert token == "" or token not in str(refused.value), "the refusal echoes the token"
    finally:
        await sender.close()
    async with aiohttp.ClientSession() as s:
        await assert_healthy(s, runner)


# ------------------------------------------------------------------------------ secrets


def process_cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def process_environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


async def history_bytes(client: Any, job_id: str) -> bytes:
    """Every event of every run of the job, serialized: payloads, failures, headers, memo."""
    parts: list[bytes] = []
    async for wf in client.list_workflows(f'WorkflowId="{job_id}"'):
        history = await client.get_workflow_handle(job_id, run_id=wf.run_id).fetch_history()
        parts += [e.SerializeToString() for e in history.events]
    return b"".join(parts)


def files_containing(root: Path, needles: list[bytes], skip: set[Path]) -> list[str]:
    found: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in skip):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)} contains {needle[:8]!r}..." for needle in needles if needle in data]
    return found


@pytest.mark.slow
async def test_no_secret_in_history_command_lines_environments_or_logs(
    dev_server_factory: Callable[..., Any],
    process_worker_factory: Callable[..., Any],
    state_dir: Path,
) -> None:
    server = dev_server_factory()  # its own server: only this worker process sees the job
    client = await connect(server.address, "default")
    jobs = JobClient(client)
    worker = process_worker_factory(state_dir, address=server.address)
    pipeline = generator_pipeline("secrets", state_dir / "out", splits=2, limit=None, rate=200)
    spec = job_spec(pipeline, state_dir, parallelism=2, slots_per_runner=1, checkpoint_interval_s=1.0)
    await jobs.start(spec)
    try:
        await wait_state(jobs, spec.job_id, "Running", timeout_s=JOB_TIMEOUT_S)
        status = await wait_status(jobs, spec.job_id, lambda st: st.epoch >= 1, what="a checkpoint")
        # A rescale starts a second generation: two generations' tokens to look for.
        await jobs.rescale(spec.job_id, parallelism=1)
        status = await wait_status(
            jobs, spec.job_id, lambda st: st.state == "Running" and st.generation >= 2, what="generation 2 running"
        )
        runner_pids = [r.pid for r in status.runners if r.pid is not None]
        assert runner_pids
        secret = load_secret(state_dir)
        tokens = [runner_token(secret, spec.job_id, g).encode() for g in range(1, status.generation + 1)]
        needles = [secret, *tokens]

        leaks: list[str] = []
        for pid in [worker.pid, *runner_pids]:
            cmdline = process_cmdline(pid).encode()
            leaks += [f"command line of pid {pid} contains {n[:8]!r}..." for n in needles if n in cmdline]
        for pid in runner_pids:
            if secret in process_environ(pid).encode():
                leaks.append(f"the environment of runner {pid} holds the shared secret")

        await jobs.stop(spec.job_id, "checkpoint")
        await wait_closed(jobs, spec.job_id, timeout_s=JOB_TIMEOUT_S)
        history = await history_bytes(client, spec.job_id)
        assert b"generation 2" in history or b"schedule generation 2" in history  # the history is there
        leaks += [f"workflow history contains {n[:8]!r}..." for n in needles if n in history]
        worker.stop()  # flush its log before reading it
        leaks += files_containing(state_dir, needles, skip={state_dir / "secret"})
        # The server's own files too: its database holds every history and heartbeat detail.
        leaks += files_containing(server.state_dir, needles, skip=set())
        assert files_containing(server.state_dir, [spec.job_id.encode()], skip=set()), "the search sees nothing"
        assert not leaks, "\n".join(leaks)
    finally:
        await stop_job_quietly(jobs, spec.job_id)
        worker.stop()
        await asyncio.sleep(0)  # let the client's pending callbacks run before the server goes
