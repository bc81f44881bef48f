"""Runner hosts on several machines (network namespaces): placement, host loss, partitions,
hosts joining, controller workers lost, and many jobs on few controller activity slots.

Each test builds its own network: a Temporal dev server on the bridge address, controller
workers with no local host (`sluice worker --local-slots 0`), and one `sluice host` per
namespace. Output is checked row by row against the generator's formula (exactly once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_asyncio

from sluice.client import JobClient, connect
from sluice.hosts.contracts import HOST_HEARTBEAT_TIMEOUT, HOST_REACQUIRE_TIMEOUT
from sluice.hosts.registry_client import list_hosts
from sluice.models import JobStatus
from tests.e2e_helpers import (
    assert_exact_output,
    expected_rows,
    read_committed_rows,
    wait_state,
    wait_status,
    wait_until,
)
from tests.multihost.cluster import Cluster, shuffling_pipeline
from tests.multihost.netns import Namespace, Network

# Bounds of the waits (generous: a shared 2-core machine); the measured times are printed.
START_TIMEOUT_S = 90.0
RECOVERY_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
HOST_LOSS_BOUND_S = HOST_HEARTBEAT_TIMEOUT.total_seconds() + HOST_REACQUIRE_TIMEOUT.total_seconds()


@pytest_asyncio.fixture
async def cluster(network: Callable[..., Network], tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(network(4), tmp_path)  # the server's machine and three runner hosts
    await c.start_server()
    try:
        yield c
    finally:
        c.stop()


async def wait_hosts(c: Cluster, count: int) -> None:
    client = await connect(c.address)

    async def check() -> bool:
        return len(await list_hosts(client)) >= count

    await wait_until(check, timeout_s=START_TIMEOUT_S, what=f"{count} hosts registered",
                     last=lambda: c.log("worker-0") + "".join(c.log(f"host-{h}") for h in c.hosts))  # fmt: skip


def hosts_of(st: JobStatus) -> set[str]:
    return {r.host_id or "?" for r in st.runners}


def runner_pids(ns: Namespace) -> list[int]:
    out = []
    for pid in ns.pids():
        try:
            if b"sluice.runner" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


async def test_runners_spread_over_hosts_and_a_killed_host_recovers_elsewhere(cluster: Cluster) -> None:
    c = cluster
    c.start_worker()
    for ns in c.machines:
        c.start_host(ns, 2)
    await wait_hosts(c, 3)
    jc = await c.job_client()
    pipeline = shuffling_pipeline(
        "spread", c.shared / "out-spread", limit=900, rate=45.0, parallelism={"events": 3, "filter0": 3, "out": 2}
    )
    spec = c.spec(pipeline, slots_per_runner=2)
    await jc.start(spec)
    st = await wait_status(jc, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 2,
                           timeout_s=START_TIMEOUT_S, what="Running with 2 checkpoints")  # fmt: skip
    assert hosts_of(st) == {"h1", "h2", "h3"}, f"runners not spread: {[(r.runner_id, r.host_id) for r in st.runners]}"
    assert all(r.host != "127.0.0.1" for r in st.runners), "runners must advertise their host's address"

    victim_id = st.runners[0].host_id
    victim = next(ns for ns in c.machines if c.host_id(ns) == victim_id)
    generation = st.generation
    victim_runners = [r.runner_id for r in st.runners if r.host_id == victim_id]
    killed_at = time.monotonic()
    victim.kill_all()  # the machine died: its host and its runners, at once
    st = await wait_status(jc, spec.job_id, lambda s: s.generation > generation and s.state == "Running",
                           timeout_s=RECOVERY_TIMEOUT_S, what="Running again elsewhere")  # fmt: skip
    print(f"host {victim_id} killed -> Running elsewhere in {time.monotonic() - killed_at:.1f} s")
    assert victim_id not in hosts_of(st)
    assert st.restarts >= 1
    # Whoever noticed first (the registry: host lost; a peer: its channel from the dead runner
    # closed) names the lost host or its runner.
    assert st.last_error is not None, st
    names = (f"host {victim_id}", victim.address, *victim_runners)
    assert any(name in st.last_error.message for name in names), st.last_error

    await wait_state(jc, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    assert_exact_output(read_committed_rows(c.shared / "out-spread"), expected_rows(pipeline))


async def test_a_partitioned_host_is_replaced_and_its_old_runners_commit_nothing(cluster: Cluster) -> None:
    c = cluster
    c.start_worker()
    for ns in c.machines:
        c.start_host(ns, 2)
    await wait_hosts(c, 3)
    jc = await c.job_client()
    out = c.shared / "out-partition"
    pipeline = shuffling_pipeline(
        "partition", out, limit=900, rate=45.0, parallelism={"events": 3, "filter0": 3, "out": 2}
    )
    spec = c.spec(pipeline, slots_per_runner=2)
    await jc.start(spec)
    st = await wait_status(jc, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 2,
                           timeout_s=START_TIMEOUT_S, what="Running with 2 checkpoints")  # fmt: skip
    victim_id = st.runners[0].host_id
    victim = next(ns for ns in c.machines if c.host_id(ns) == victim_id)
    old_runners = [r.pid for r in st.runners if r.host_id == victim_id and r.pid]
    assert old_runners and set(old_runners) <= set(runner_pids(victim)), "the victim host runs runners of the job"
    generation = st.generation
    cut_at = time.monotonic()
    victim.cut()
    try:
        st = await wait_status(jc, spec.job_id, lambda s: s.generation > generation and s.state == "Running",
                               timeout_s=RECOVERY_TIMEOUT_S, what="Running again without the cut host")  # fmt: skip
        print(f"host {victim_id} cut off -> Running elsewhere in {time.monotonic() - cut_at:.1f} s")
        assert victim_id not in hosts_of(st)
    finally:
        victim.restore()
    healed_at = time.monotonic()

    async def old_runners_ended() -> bool:
        return not set(old_runners) & set(runner_pids(victim))

    await wait_until(old_runners_ended, timeout_s=30.0, what="the cut host's old runners to end after the heal",
                     last=lambda: c.log(f"host-{victim_id}"))  # fmt: skip
    print(f"old runners ended {time.monotonic() - healed_at:.1f} s after the link came back")
    await wait_state(jc, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    # 0 duplicated, 0 lost: nothing of the superseded generation was committed.
    assert_exact_output(read_committed_rows(out), expected_rows(pipeline))


async def test_no_free_slot_waits_then_joining_hosts_are_used_and_a_lost_controller_loses_nothing(
    cluster: Cluster,
) -> None:
    c = cluster
    h1, h2, h3 = c.machines
    c.start_worker()
    doomed_worker = c.start_worker(h3)  # a second controller worker, on another machine
    c.start_host(h1, 2)
    await wait_hosts(c, 1)
    jc = await c.job_client()
    out = c.shared / "out-join"
    pipeline = shuffling_pipeline(
        "join", out, limit=1200, rate=40.0, parallelism={"events": 3, "filter0": 3, "out": 2}
    )
    spec = c.spec(pipeline, slots_per_runner=2)  # 3 runners: more than h1's 2 slots
    await jc.start(spec)
    st = await wait_status(jc, spec.job_id, lambda s: s.state == "Scheduling" and bool(s.waiting_for),
                           timeout_s=START_TIMEOUT_S, what="Scheduling, waiting for slots")  # fmt: skip
    assert "no free runner slot" in (st.waiting_for or ""), st.waiting_for
    assert "needs 3" in (st.waiting_for or ""), st.waiting_for

    joined_at = time.monotonic()
    c.start_host(h2, 2)
    st = await wait_status(jc, spec.job_id, lambda s: s.state == "Running", timeout_s=START_TIMEOUT_S,
                           what="Running once a host joined")  # fmt: skip
    print(f"host joined -> Running in {time.monotonic() - joined_at:.1f} s")
    assert hosts_of(st) == {"h1", "h2"}
    assert st.waiting_for is None

    # A third host joins; a rescale to 5 runners needs it.
    c.start_host(h3, 2)
    await wait_hosts(c, 3)
    await jc.rescale(spec.job_id, overrides={"events": 4, "filter0": 4, "out": 5})
    generation = st.generation
    st = await wait_status(jc, spec.job_id, lambda s: s.state == "Running" and s.generation > generation,
                           timeout_s=START_TIMEOUT_S, what="Running rescaled")  # fmt: skip
    assert len(st.runners) == 5 and "h3" in hosts_of(st), [(r.runner_id, r.host_id) for r in st.runners]

    # The controller worker on h3 dies (SIGKILL): the other carries on, nothing is lost.
    doomed_worker.kill()
    doomed_worker.wait(timeout=10)
    await wait_state(jc, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    assert_exact_output(read_committed_rows(out), expected_rows(pipeline))


JOBS = 30
INTERVAL_S = 5.0


async def test_thirty_jobs_checkpoint_on_schedule_with_ten_controller_activity_slots(cluster: Cluster) -> None:
    c = cluster
    c.start_worker(max_activities=10)
    for ns in c.machines:
        c.start_host(ns, 10)
    await wait_hosts(c, 3)
    jc = await c.job_client()
    specs = []
    for i in range(JOBS):
        pipeline = shuffling_pipeline(f"many{i}", c.shared / f"out-many{i}", limit=100_000, rate=5.0,
                                      parallelism={"events": 1, "filter0": 1, "out": 1})  # fmt: skip
        specs.append(c.spec(pipeline, checkpoint_interval_s=INTERVAL_S))
    await asyncio.gather(*(jc.start(s) for s in specs))

    async def all_running() -> list[JobStatus] | None:
        sts = await asyncio.gather(*(jc.status(s.job_id) for s in specs))
        return sts if all(st.state == "Running" and st.epoch >= 1 for st in sts) else None

    started = await wait_until(all_running, timeout_s=180.0, what=f"{JOBS} jobs Running with a checkpoint")
    assert {st.generation for st in started} == {1}, "no job needed a recovery"
    first = {st.job_id: st.epoch for st in started}
    window_s = 4 * INTERVAL_S
    await asyncio.sleep(window_s)
    later = await asyncio.gather(*(jc.status(s.job_id) for s in specs))
    # On schedule: 4 checkpoints in the window; at least 3 even on a loaded machine.
    behind = {st.job_id: st.epoch - first[st.job_id] for st in later if st.epoch - first[st.job_id] < 3}
    assert not behind, f"jobs whose checkpoints fell behind (epochs in {window_s:g} s): {behind}"
    await asyncio.gather(*(jc.stop(s.job_id, "immediate") for s in specs))
    for s in specs:
        await wait_state(jc, s.job_id, "Stopped", timeout_s=60.0)
    assert not await JobClient.list(jc, "Running")
