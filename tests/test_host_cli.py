"""`sluice host` and `sluice hosts` on one machine (loopback), against the session's server and
controller worker: a host registers with its labels, a labelled pipeline runs only there, a host
shut down (SIGTERM) deregisters and its job waits in Scheduling with the reason until a host with
those labels joins again."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sluice.client import JobClient
from sluice.hosts.registry_client import list_hosts
from sluice.settings import load_secret
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.e2e_helpers import generator_pipeline, job_spec, stop_job_quietly, wait_status, wait_until

pytestmark = pytest.mark.usefixtures("worker")

HOST_ID = "cli-test-host"
LABEL = "zone=cli-test"
CLI_TIMEOUT_S = 60.0


def start_host(address: str, state_dir: Path, session_state_dir: Path) -> subprocess.Popen[bytes]:
    """`sluice host` with the session worker's secret (so the controller can reach its runners)."""
    env = cli_env(address, state_dir / "host", SLUICE_SECRET=load_secret(session_state_dir).decode())
    log = open(state_dir / "host.log", "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            sluice_command("host", "--slots", "2", "--host-id", HOST_ID, "--label", LABEL, "--warm-runners", "1"),
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def wait_registered(client: Any, present: bool) -> None:
    async def check() -> bool:
        return any(h.host_id == HOST_ID for h in await list_hosts(client)) == present

    await wait_until(check, timeout_s=CLI_TIMEOUT_S, what=f"host {HOST_ID} {'registered' if present else 'gone'}")


async def hosts_cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`sluice hosts ...` in a thread: the session's controller worker (in this event loop) answers."""
    return await asyncio.to_thread(
        subprocess.run, sluice_command("hosts", *args), cwd=PROJECT_ROOT, env=cli_env(address),
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip


async def test_host_registers_runs_labelled_jobs_and_deregisters_on_sigterm(
    client: Any, job_client: JobClient, temporal_address: str, state_dir: Path, session_state_dir: Path
) -> None:
    host = start_host(temporal_address, state_dir, session_state_dir)
    spec = None
    try:
        await wait_registered(client, True)
        listed = await hosts_cli(temporal_address, "-o", "json")
        assert listed.returncode == 0, listed.stderr
        mine = [h for h in json.loads(listed.stdout) if h["host_id"] == HOST_ID]
        assert len(mine) == 1, listed.stdout
        assert mine[0]["slots"] == 2 and mine[0]["slots_free"] == 2 and mine[0]["labels"] == {"zone": "cli-test"}
        assert mine[0]["task_queue"] == f"sluice-host-{HOST_ID}" and mine[0]["version"]
        # The lease's last heartbeat, as the server saw it: within the last few seconds.
        beat = datetime.fromisoformat(mine[0]["last_heartbeat"])
        assert timedelta(0) <= datetime.now(UTC) - beat < timedelta(seconds=10), mine[0]
        table = await hosts_cli(temporal_address)
        assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:2] == ["HOST", "ADDRESS"]
        assert table.stdout.splitlines()[0].split()[-1] == "HEARTBEAT", table.stdout
        assert any(line.startswith(HOST_ID) and "0/2" in line and line.endswith(" s ago")
                   for line in table.stdout.splitlines()), table.stdout  # fmt: skip

        pipeline = generator_pipeline("labelled", state_dir / "out", splits=2, limit=None, rate=20.0)
        pipeline = pipeline.model_copy(update={"host_labels": {"zone": "cli-test"}})
        spec = job_spec(pipeline, state_dir, slots_per_runner=2)
        await job_client.start(spec)
        st = await wait_status(job_client, spec.job_id, lambda s: s.state == "Running", what="Running")
        assert {r.host_id for r in st.runners} == {HOST_ID}, st.runners

        # SIGTERM: the host deregisters (the job is told and recovers) and stops its runners.
        await asyncio.to_thread(stop, host)
        assert host.returncode == 0, (state_dir / "host.log").read_text()[-2000:]
        await wait_registered(client, False)
        st = await wait_status(
            job_client, spec.job_id, lambda s: s.state == "Scheduling" and bool(s.waiting_for),
            what="Scheduling, waiting for a host with its labels",
        )  # fmt: skip
        assert "zone=cli-test" in (st.waiting_for or ""), st.waiting_for
        assert st.restarts >= 1 and st.last_error is not None and HOST_ID in st.last_error.message

        host = start_host(temporal_address, state_dir, session_state_dir)  # it comes back
        st = await wait_status(job_client, spec.job_id, lambda s: s.state == "Running", what="Running again")
        assert {r.host_id for r in st.runners} == {HOST_ID} and st.waiting_for is None
    finally:
        if spec is not None:
            await stop_job_quietly(job_client, spec.job_id)
        await asyncio.to_thread(stop, host)
