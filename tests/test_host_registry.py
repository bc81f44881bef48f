"""HostRegistryWorkflow on Temporal's time-skipping test server, with fake jobs (they record the
signals they get) and fake host lease workers on the hosts' own task queues.

- placement through the registry: spread, labels, waiting and `slots_freed`, release;
- liveness: a host whose lease worker goes away, or that hangs, is declared lost within
  HOST_HEARTBEAT_TIMEOUT + HOST_REACQUIRE_TIMEOUT of workflow time, and only the jobs with runners
  there are told; a second process serving the same queue keeps the host alive; a lost host that
  registers again is told so;
- deregister, stale requests, malformed requests, a terminated registry, continue-as-new.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from sluice.activities.placing import PLACEMENT_REJECTED_TYPE, PlacingActivities
from sluice.hosts import registry_client as rc
from sluice.hosts import registry_constants
from sluice.hosts.contracts import (
    HOST_HEARTBEAT_EVERY_S,
    HOST_HEARTBEAT_TIMEOUT,
    HOST_REACQUIRE_TIMEOUT,
    REGISTRY_WORKFLOW_ID,
    SIGNAL_HOST_LOST,
    SIGNAL_SLOTS_FREED,
    HostRegistration,
    PlaceRequest,
    ReleaseRequest,
    host_task_queue,
)
from sluice.hosts.placement import NO_HOST_REASON
from sluice.hosts.registry import HostRegistryWorkflow
from sluice.models import TASK_QUEUE
from tests.registry_fakes import (
    FAKE_JOB_FINISH_SIGNAL,
    FAKE_JOB_QUERY,
    FAKE_JOB_WORKFLOW_TYPE,
    FakeHost,
    FakeJobWorkflow,
)
from tests.time_skipping import time_skipping_env

pytestmark = pytest.mark.timeout(120)

#: Longest a test waits in real time for something the registry does at once.
REAL_WAIT_S = 10.0
POLL_S = 0.05
#: Lost detection: the contract's bound, plus the server's timer granularity and task latency.
DETECTION_SLACK = timedelta(seconds=2)
LOST_WITHIN = HOST_HEARTBEAT_TIMEOUT + HOST_REACQUIRE_TIMEOUT + DETECTION_SLACK
#: A host worker's grace for running leases on shutdown: a frozen host holds its lease this long.
FROZEN_GRACE = timedelta(seconds=60)
#: A low continue-as-new threshold: a few updates cross it.
SMALL_HISTORY = 40
CONTINUE_AS_NEW_UPDATES = 30  # more than enough updates to cross SMALL_HISTORY


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_env(search_attributes=False) as e:
        yield e


@dataclass
class Registry:
    """One test's registry: a fresh HostRegistryWorkflow, its worker, and helpers."""

    env: WorkflowEnvironment
    jobs: list[WorkflowHandle[Any, Any]]
    host_workers: list[Worker]
    hosts_added: list[str]

    @property
    def client(self) -> Client:
        return self.env.client

    def uid(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:6]}"

    async def start_job(self, prefix: str = "job") -> str:
        job_id = self.uid(prefix)
        self.jobs.append(await self.client.start_workflow(FAKE_JOB_WORKFLOW_TYPE, id=job_id, task_queue=TASK_QUEUE))
        return job_id

    async def signals(self, job_id: str, name: str | None = None) -> list[dict[str, Any]]:
        got = await self.client.get_workflow_handle(job_id).query(FAKE_JOB_QUERY, result_type=list[dict[str, Any]])
        return [s for s in got if name is None or s["name"] == name]

    async def start_host_worker(
        self, host_id: str, fake: FakeHost, grace: timedelta = timedelta(0), *, own_client: bool = False
    ) -> Worker:
        """A worker serving the host's task queue with `fake`'s lease (stopped at teardown).
        On shutdown it stops polling at once and cancels running leases after `grace`.
        `own_client`: on a connection of its own, as a second process serving the same queue
        (the SDK allows one worker per queue and client)."""
        client = self.client
        if own_client:
            client = await Client.connect(
                self.client.service_client.config.target_host,
                namespace=self.client.namespace,
                data_converter=pydantic_data_converter,
            )
        worker = Worker(
            client,
            task_queue=host_task_queue(host_id),
            activities=[fake.lease],
            graceful_shutdown_timeout=grace,
            # As `sluice host` must: the SDK otherwise sends heartbeats only every 0.8 x the
            # heartbeat timeout, which stretches the detection bound by 4 s.
            max_heartbeat_throttle_interval=timedelta(seconds=HOST_HEARTBEAT_EVERY_S),
        )
        self.host_workers.append(worker)
        asyncio.get_running_loop().create_task(worker.run())
        return worker

    async def add_host(
        self,
        prefix: str,
        slots: int,
        labels: dict[str, str] | None = None,
        *,
        worker: bool = True,
        grace: timedelta = timedelta(0),
    ) -> tuple[str, FakeHost]:
        """Register a host (serving its queue first, as `sluice host` does, unless `worker` is
        False: a host that died right after registering)."""
        host_id = self.uid(prefix)
        fake = FakeHost()
        if worker:
            await self.start_host_worker(host_id, fake, grace)
        result = await rc.register(self.client, registration(host_id, slots, labels))
        assert result.declared_lost is False
        self.hosts_added.append(host_id)
        return host_id, fake

    async def place(self, job_id: str, runners: int, generation: int = 1, **labels: str) -> Any:
        return await rc.place(
            self.client, PlaceRequest(job_id=job_id, generation=generation, runners=runners, labels=labels)
        )

    async def hosts(self) -> dict[str, Any]:
        return {h.host_id: h for h in await rc.list_hosts(self.client)}


def registration(host_id: str, slots: int, labels: dict[str, str] | None = None) -> HostRegistration:
    return HostRegistration(
        host_id=host_id, task_queue=host_task_queue(host_id), address=f"{host_id}.local:7000",
        slots=slots, labels=labels or {}, version="test",
    )


async def _terminate_registry(client: Client) -> None:
    with contextlib.suppress(RPCError):
        await rc.registry_handle(client).terminate("test teardown")


@pytest_asyncio.fixture(loop_scope="session")
async def registry(env: WorkflowEnvironment) -> AsyncIterator[Registry]:
    await _terminate_registry(env.client)  # a fresh registry per test
    reg = Registry(env=env, jobs=[], host_workers=[], hosts_added=[])
    async with Worker(env.client, task_queue=TASK_QUEUE, workflows=[HostRegistryWorkflow, FakeJobWorkflow]):
        try:
            yield reg
        finally:
            for job in reg.jobs:
                with contextlib.suppress(RPCError):
                    await job.signal(FAKE_JOB_FINISH_SIGNAL)
            await _terminate_registry(env.client)
            for worker in reg.host_workers:
                if worker.is_running:
                    await worker.shutdown()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = REAL_WAIT_S) -> None:
    """Wait (real time) until `check()` is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(POLL_S)


async def received(reg: Registry, job_id: str, name: str) -> None:
    """Wait until job `job_id` got signal `name`."""

    async def got() -> bool:
        return bool(await reg.signals(job_id, name))

    await eventually(got, f"job {job_id} gets {name}")


async def assert_replays(client: Client, run_id: str | None = None) -> None:
    """The registry's run (default: the current one) replays without a nondeterminism error."""
    history = await client.get_workflow_handle(REGISTRY_WORKFLOW_ID, run_id=run_id).fetch_history()
    replayer = Replayer(workflows=[HostRegistryWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)


def _shares(placement: Any) -> dict[str, int]:
    return {s.host_id: s.runners for s in placement.shares}


# ------------------------------------------------------------------------------ placement


async def test_two_hosts_share_a_generation_spread(registry: Registry) -> None:
    a, _ = await registry.add_host("a", 2)
    b, _ = await registry.add_host("b", 2)
    job = await registry.start_job()
    placement = await registry.place(job, 3)
    assert placement.waiting_reason is None
    first, second = sorted([a, b])
    assert _shares(placement) == {first: 2, second: 1}
    assert [s.first_index for s in placement.shares] == [0, 2]
    assert placement.shares[0].task_queue == host_task_queue(first)
    assert placement.shares[0].address == f"{first}.local:7000"
    hosts = await registry.hosts()
    assert hosts[first].slots_in_use == 2 and hosts[first].jobs == {job: 2}
    assert hosts[second].slots_in_use == 1 and hosts[second].slots_free == 1
    # A new generation replaces the old one's reservations (they count as free).
    again = await registry.place(job, 4, generation=2)
    assert _shares(again) == {first: 2, second: 2}
    assert sum(h.slots_in_use for h in (await registry.hosts()).values()) == 4


async def test_labels_choose_hosts(registry: Registry) -> None:
    eu, _ = await registry.add_host("eu", 4, {"zone": "eu"})
    await registry.add_host("us", 4, {"zone": "us"})
    job = await registry.start_job()
    assert _shares(await registry.place(job, 2, zone="eu")) == {eu: 2}
    other = await registry.start_job()
    refused = await registry.place(other, 1, zone="asia")
    assert refused.shares == [] and refused.waiting_reason is not None
    assert "no host has labels zone=asia" in refused.waiting_reason


async def test_a_waiting_job_is_told_when_a_host_registers(registry: Registry) -> None:
    job = await registry.start_job()
    waiting = await registry.place(job, 2)
    assert waiting.shares == [] and waiting.waiting_reason is not None
    assert NO_HOST_REASON in waiting.waiting_reason
    assert await registry.hosts() == {}  # nothing reserved
    host, _ = await registry.add_host("late", 2)
    await received(registry, job, SIGNAL_SLOTS_FREED)
    assert _shares(await registry.place(job, 2)) == {host: 2}


async def test_release_tells_waiting_jobs(registry: Registry) -> None:
    host, _ = await registry.add_host("h", 2)
    holder, waiter = await registry.start_job("holder"), await registry.start_job("waiter")
    assert _shares(await registry.place(holder, 2)) == {host: 2}
    refused = await registry.place(waiter, 1)
    assert refused.waiting_reason == f"needs 1 runner slot, 0 free: {host} 0/2 free"
    assert await rc.release(registry.client, ReleaseRequest(job_id=holder, below_generation=1)) == 0
    assert await rc.release(registry.client, ReleaseRequest(job_id=holder)) == 2
    await received(registry, waiter, SIGNAL_SLOTS_FREED)
    assert await registry.signals(holder) == []
    assert _shares(await registry.place(waiter, 1)) == {host: 1}
    # A job that gives up waiting (releases everything) is not told any more.
    quitter, third = await registry.start_job("quitter"), await registry.start_job("third")
    assert (await registry.place(quitter, 2)).waiting_reason is not None
    assert (await registry.place(third, 2)).waiting_reason is not None
    assert await rc.release(registry.client, ReleaseRequest(job_id=quitter)) == 0
    assert await rc.release(registry.client, ReleaseRequest(job_id=waiter)) == 1
    await received(registry, third, SIGNAL_SLOTS_FREED)
    assert await registry.signals(quitter) == []


async def test_stale_and_malformed_requests_are_refused(registry: Registry) -> None:
    await registry.add_host("h", 4)
    job = await registry.start_job()
    await registry.place(job, 1, generation=5)
    with pytest.raises(rc.RegistryRejected, match="stale placement request.*generation 4.*generation 5"):
        await registry.place(job, 1, generation=4)
    with pytest.raises(rc.RegistryRejected, match="job_id must not be empty"):
        await rc.release(registry.client, ReleaseRequest(job_id=" "))
    bad = registration("bad", 1).model_copy(update={"task_queue": TASK_QUEUE})
    with pytest.raises(rc.RegistryRejected, match="controller's"):
        await rc.register(registry.client, bad)
    taken = registration("other", 1).model_copy(update={"task_queue": host_task_queue(registry.hosts_added[0])})
    with pytest.raises(rc.RegistryRejected, match="already host"):
        await rc.register(registry.client, taken)
    assert await rc.deregister(registry.client, "never-registered") == []
    # The placing activity turns a refusal into a non-retryable failure.
    acts = PlacingActivities(ctx=None)  # type: ignore[arg-type]  # the context is not used
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment(client=registry.client).run(
            acts.place_runners, PlaceRequest(job_id=job, generation=1, runners=1)
        )
    assert refused.value.type == PLACEMENT_REJECTED_TYPE and refused.value.non_retryable
    placed = await ActivityEnvironment(client=registry.client).run(
        acts.place_runners, PlaceRequest(job_id=job, generation=6, runners=2)
    )
    assert sum(s.runners for s in placed.shares) == 2
    assert await ActivityEnvironment(client=registry.client).run(acts.release_slots, ReleaseRequest(job_id=job)) == 2


async def test_a_terminated_registry_is_recreated(registry: Registry) -> None:
    await registry.add_host("h", 1)
    await _terminate_registry(registry.client)
    job = await registry.start_job()
    placement = await registry.place(job, 1)  # place ensures the registry exists first
    assert placement.waiting_reason is not None and NO_HOST_REASON in placement.waiting_reason


# ------------------------------------------------------------------------------ liveness
#
# The test server does not skip time while an activity is outstanding, and a registry with hosts
# always has leases outstanding: these tests run in real time, one detection window each.


async def _first_signal(reg: Registry, job_id: str, name: str) -> dict[str, Any]:
    """The first `name` signal job `job_id` gets within the detection bound (plus real slack)."""
    await eventually(
        lambda: _has_signal(reg, job_id, name),
        f"job {job_id} gets {name}",
        timeout_s=(LOST_WITHIN + DETECTION_SLACK).total_seconds(),
    )
    return (await reg.signals(job_id, name))[0]


async def _has_signal(reg: Registry, job_id: str, name: str) -> bool:
    return bool(await reg.signals(job_id, name))


async def _pinned_job(reg: Registry, host_id: str, runners: int) -> str:
    """A job holding `runners` slots on `host_id` (hosts carry their id as a label)."""
    job = await reg.start_job(f"on-{host_id}")
    assert _shares(await reg.place(job, runners, host=host_id)) == {host_id: runners}
    return job


async def _add_pinned_host(reg: Registry, prefix: str, **kw: Any) -> tuple[str, FakeHost]:
    host_id = reg.uid(prefix)
    fake = FakeHost()
    if kw.pop("worker", True):
        await reg.start_host_worker(host_id, fake, kw.pop("grace", timedelta(0)))
    assert (await rc.register(reg.client, registration(host_id, 2, {"host": host_id}))).declared_lost is False
    return host_id, fake


async def test_hosts_that_go_away_are_declared_lost_and_only_their_jobs_told(registry: Registry) -> None:
    dying, _ = await _add_pinned_host(registry, "dying")  # its worker shuts down: the lease fails
    hung, frozen = await _add_pinned_host(registry, "hung", grace=FROZEN_GRACE)  # stops heartbeating
    ghost, _ = await _add_pinned_host(registry, "ghost", worker=False)  # never serves its queue
    steady, _ = await _add_pinned_host(registry, "steady")
    on = {h: await _pinned_job(registry, h, 2) for h in (dying, hung, ghost, steady)}
    waiting = await registry.start_job("waiting")
    assert (await registry.place(waiting, 1, host="nowhere")).waiting_reason is not None

    went_away = await registry.env.get_current_time()
    await registry.host_workers[0].shutdown()
    frozen.freeze()
    stopping = asyncio.get_running_loop().create_task(registry.host_workers[1].shutdown())  # stops polling
    try:
        lost = {h: await _first_signal(registry, on[h], SIGNAL_HOST_LOST) for h in (dying, ghost, hung)}
    finally:
        frozen.thaw()
        await stopping

    for host_id, signal in lost.items():
        assert signal["payload"]["host_id"] == host_id
        assert datetime.fromisoformat(signal["at"]) - went_away <= LOST_WITHIN
    assert lost[dying]["payload"]["reason"].startswith(f"host {dying} lost: its lease failed (")
    assert lost[ghost]["payload"]["reason"] == (
        f"host {ghost} lost: no process took up its task queue {host_task_queue(ghost)} within 3 s"
    )
    assert lost[hung]["payload"]["reason"] == (
        f"host {hung} lost: no heartbeat for {HOST_HEARTBEAT_TIMEOUT.total_seconds():g} s "
        f"and no process took up its task queue "
        f"{host_task_queue(hung)} within 3 s"
    )
    # Missed heartbeats, then the reacquire timeout: not earlier than the heartbeat timeout.
    assert datetime.fromisoformat(lost[hung]["at"]) - went_away >= HOST_HEARTBEAT_TIMEOUT
    assert list(await registry.hosts()) == [steady]  # reservations there are gone with the hosts
    for host_id in (dying, hung, ghost):
        assert len(await registry.signals(on[host_id], SIGNAL_HOST_LOST)) == 1
    assert await registry.signals(on[steady]) == []  # only the jobs with runners there are told
    await received(registry, waiting, SIGNAL_SLOTS_FREED)

    # A lost host that registers again is told to kill its leftovers, once.
    assert (await rc.register(registry.client, registration(dying, 2))).declared_lost is True
    assert (await rc.register(registry.client, registration(dying, 2))).declared_lost is False
    await assert_replays(registry.client)


async def test_hosts_served_by_some_process_stay_registered(registry: Registry) -> None:
    twice, first = await _add_pinned_host(registry, "twice")
    second = FakeHost()
    await registry.start_host_worker(twice, second, own_client=True)
    steady, steady_fake = await _add_pinned_host(registry, "steady")
    leaving, _ = await _add_pinned_host(registry, "leaving")
    on = {h: await _pinned_job(registry, h, 2) for h in (twice, steady, leaving)}

    await eventually(
        lambda: _true(first.leases_taken + second.leases_taken == 1), "a process of `twice` takes its lease"
    )
    holder, other = (0, second) if first.leases_taken else (1, first)
    await registry.host_workers[holder].shutdown()  # the process holding the lease goes away
    assert await rc.deregister(registry.client, leaving) == [on[leaving]]
    quiet_from = await registry.env.get_current_time()
    await registry.env.sleep(LOST_WITHIN)  # a whole detection window

    assert await registry.env.get_current_time() - quiet_from >= LOST_WITHIN
    assert other.leases_taken >= 1  # the renewed lease went to the other process
    assert steady_fake.leases_taken == 1  # one lease, heartbeating all along
    hosts = await registry.hosts()
    assert list(hosts) == sorted([twice, steady])
    assert hosts[twice].jobs == {on[twice]: 2}
    assert await registry.signals(on[twice]) == []
    assert await registry.signals(on[steady]) == []
    # The deregistered host's job was told it shut down, and nothing more (its lease is gone).
    (gone,) = await registry.signals(on[leaving])
    assert gone["name"] == SIGNAL_HOST_LOST
    assert gone["payload"] == {"host_id": leaving, "reason": f"host {leaving} shut down"}
    assert (await rc.register(registry.client, registration(leaving, 2))).declared_lost is False


async def _true(value: bool) -> bool:
    return value


async def test_deregister_returns_the_jobs_there_and_tolerates_missing_jobs(registry: Registry) -> None:
    host, _ = await registry.add_host("leaving", 3)
    job = await registry.start_job()
    missing = registry.uid("no-such-job")  # never started: signalling it must not fail the registry
    assert _shares(await registry.place(job, 2)) == {host: 2}
    assert _shares(await registry.place(missing, 1)) == {host: 1}
    assert await rc.deregister(registry.client, host) == sorted([job, missing])
    await received(registry, job, SIGNAL_HOST_LOST)
    assert await registry.hosts() == {}
    assert await rc.deregister(registry.client, host) == []
    assert (await registry.place(job, 1, generation=2)).waiting_reason is not None  # still answers


# ------------------------------------------------------------------------------ continue-as-new


async def test_continue_as_new_keeps_hosts_reservations_waiting_and_lost(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_constants, "CONTINUE_AS_NEW_EVENTS", SMALL_HISTORY)
    ghost, _ = await registry.add_host("ghost", 1, worker=False)
    on_ghost = await registry.start_job("on-ghost")
    await registry.place(on_ghost, 1)
    await _first_signal(registry, on_ghost, SIGNAL_HOST_LOST)  # declared lost in the first run
    host, fake = await registry.add_host("kept", 4)
    job = await registry.start_job()
    waiter = await registry.start_job("waiter")
    await registry.place(job, 3)
    assert (await registry.place(waiter, 2)).waiting_reason is not None
    first_run = (await rc.registry_handle(registry.client).describe()).run_id
    for generation in range(2, 2 + CONTINUE_AS_NEW_UPDATES):
        await registry.place(job, 3, generation=generation)
        if (await rc.registry_handle(registry.client).describe()).run_id != first_run:
            break
    else:
        raise AssertionError("the registry did not continue as new")
    hosts = await registry.hosts()
    assert list(hosts) == [host] and hosts[host].jobs == {job: 3}
    with pytest.raises(rc.RegistryRejected, match="stale"):  # the generation is carried too
        await registry.place(job, 3, generation=1)
    assert await rc.release(registry.client, ReleaseRequest(job_id=job)) == 3
    await received(registry, waiter, SIGNAL_SLOTS_FREED)  # still known as waiting
    await eventually(lambda: _true(fake.leases_taken >= 2), "the next run renews the host's lease")
    assert (await rc.register(registry.client, registration(ghost, 1))).declared_lost is True
    await assert_replays(registry.client, first_run)  # the run that continued as new
    await assert_replays(registry.client)
