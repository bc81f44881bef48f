"""The controller worker: JobWorkflow, the host registry and the controller activities on task
queue `sluice`, plus (by default) a local runner host, so one `sluice worker` on one machine runs
jobs with nothing else started."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from sluice import versioning
from sluice.activities.checkpointing import CheckpointActivities
from sluice.activities.compiling import CompileActivities
from sluice.activities.context import ControllerContext
from sluice.activities.monitoring import MonitorActivities
from sluice.activities.placing import PlacingActivities
from sluice.activities.scheduling import SchedulingActivities
from sluice.activities.stopping import StopActivities
from sluice.controller_metrics import ControllerMetrics, client_on_runtime, prometheus_runtime
from sluice.hosts.endpoint import ObservabilityEndpoint
from sluice.hosts.host import LOCAL_SLOTS, HostConfig, RunnerHost, default_host_id
from sluice.hosts.pool import DEFAULT_POOL_SIZE
from sluice.hosts.registry import HostRegistryWorkflow
from sluice.models import TASK_QUEUE
from sluice.schedulers.process import ProcessScheduler
from sluice.settings import load_secret
from sluice.workflows.job import JobWorkflow

log = logging.getLogger(__name__)

MAX_CONCURRENT_ACTIVITIES = 100
"""Controller activities are short (compile, place, checkpoint, stop): no job holds one for its
life (hosts watch runners), so a modest limit serves many jobs. `sluice worker
--max-concurrent-activities N` changes it."""


# How often a worker looks for jobs pinned to a build that no worker serves any more.
ADOPT_ORPHANS_EVERY_S = 30.0


@dataclass
class MetricsPlan:
    """How a controller worker exports its metrics: its Temporal worker is made by `make_worker`
    once `run()` has a client on a runtime with a Prometheus exporter (the runtime is fixed when a
    client connects), and served on `port` of `bind` (with the local host's, when there is one)."""

    client: Client
    make_worker: Callable[[Client], Worker]
    port: int
    bind: str = "127.0.0.1"
    port_is_default: bool = False


class ControllerWorker:
    """A controller worker and, unless local_slots is 0, the local runner host beside it.

    Use as an async context manager, or `run()` until cancelled / `shutdown()`. With a
    MetricsPlan, `worker` is None until `run()` made it, and `endpoint` serves the metrics."""

    def __init__(
        self,
        worker: Worker | None,
        host: RunnerHost | None,
        *,
        build: str | None = None,
        make_current: bool = True,
        metrics: MetricsPlan | None = None,
    ) -> None:
        if worker is None and metrics is None:
            raise ValueError("a ControllerWorker needs a worker, or a MetricsPlan to make one")
        self.worker = worker
        self.host = host
        self.build = build  # None: an unversioned worker
        self.make_current = make_current
        self.metrics = metrics
        self.endpoint: ObservabilityEndpoint | None = None
        self.ready = asyncio.Event()  # serving (its build current, its local host registered)
        self._stopped = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False

    async def run(self) -> None:
        """Serve until `shutdown()` (or cancellation); the local host deregisters on the way out."""
        # The controller worker first: registering the host is an update that this very worker
        # may have to process (the registry workflow runs on the controller task queue), which it
        # only gets once its build is current (or the run it serves is pinned to it).
        self._running = True
        counter: asyncio.Task[None] | None = None
        own_endpoint: ObservabilityEndpoint | None = None
        if self.metrics is not None:
            controller_metrics = await self._export_metrics(self.metrics)
            counter = asyncio.create_task(controller_metrics.refresh_forever())
            if self.host is None or self.host.endpoint is None:
                own_endpoint = ObservabilityEndpoint(
                    self.metrics.bind, self.metrics.port, port_is_default=self.metrics.port_is_default
                )
                self.endpoint = own_endpoint
            else:
                self.endpoint = self.host.endpoint
            self.endpoint.sources.append(controller_metrics.prometheus_text)
        worker = self.worker
        assert worker is not None
        worker_task = asyncio.create_task(worker.run())
        adopter: asyncio.Task[None] | None = None
        try:
            if own_endpoint is not None:
                await own_endpoint.start()
            if self.build is not None:
                if self.make_current:
                    await versioning.make_current(worker.client, self.build)
                adopter = asyncio.create_task(self._adopt_orphans(worker.client))
            if self.host is not None:
                await self.host.start()  # its endpoint (with the controller's metrics) too
            self.ready.set()
            done, _ = await asyncio.wait(
                [worker_task, asyncio.create_task(self._stopped.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if worker_task in done:
                worker_task.result()  # a worker that failed says why
        finally:
            for task in (adopter, counter):
                if task is not None:
                    task.cancel()
            if self.host is not None:
                await self.host.close()
            if not worker_task.done():
                await worker.shutdown()
            await asyncio.gather(worker_task, return_exceptions=True)
            if own_endpoint is not None:
                await own_endpoint.close()
            self._finished.set()

    async def _export_metrics(self, plan: MetricsPlan) -> ControllerMetrics:
        """Connect on a runtime exporting the SDK's metrics and make the Temporal worker on it."""
        runtime, exporter_url = prometheus_runtime()
        client = await client_on_runtime(plan.client, runtime)
        self.worker = plan.make_worker(client)
        return ControllerMetrics(client, exporter_url)

    async def _adopt_orphans(self, client: Client) -> None:
        """Now and then: jobs pinned to a build that no worker serves move to the current build."""
        while True:
            try:
                await versioning.adopt_orphaned_jobs(client)
            except Exception as e:  # noqa: BLE001 - retried on the next round
                log.warning("adopting jobs of builds no worker serves failed (retried): %s", e)
            await asyncio.sleep(ADOPT_ORPHANS_EVERY_S)

    async def shutdown(self) -> None:
        """Stop cleanly: the local host deregisters (through this worker, still polling), then
        the worker stops. With `run()` in progress, that is what it does on its way out."""
        self._stopped.set()
        if self._running:
            await self._finished.wait()
            return
        if self.host is not None:
            await self.host.close()
        if self.worker is not None:
            await self.worker.shutdown()

    async def __aenter__(self) -> ControllerWorker:
        self._task = asyncio.create_task(self.run())
        # Ready once its build is current and the local host is registered (placement sees it).
        ready = asyncio.create_task(self.ready.wait())
        await asyncio.wait([self._task, ready], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task.done():
            self._task.result()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._stopped.set()
        await asyncio.gather(self._task, return_exceptions=True)


def create_worker(
    client: Client,
    state_dir: Path,
    *,
    local_slots: int = LOCAL_SLOTS,
    warm_runners: int = DEFAULT_POOL_SIZE,
    max_concurrent_activities: int = MAX_CONCURRENT_ACTIVITIES,
    host_config: HostConfig | None = None,
    build: str | None = None,
    versioned: bool = True,
    make_current: bool = True,
    metrics_port: int | None = None,
    metrics_port_is_default: bool = False,
) -> ControllerWorker:
    """A controller worker for `client`'s namespace; its local host (local_slots > 0) keeps its
    runners' files under `state_dir`. Versioned (the default): it polls as build `build` (default
    `versioning.build_id()`) of deployment `sluice` and, with `make_current`, makes that build the
    one new jobs go to. With `metrics_port` (0: a free one), it serves its metrics (the Temporal
    SDK's, sluice's jobs by state, and the local host's runners) and the local host's job metrics
    and logs on that port of the local host's address (see docs/metrics.md); with
    `metrics_port_is_default`, a port in use falls back to a free one."""
    # User functions (`module:function`) are imported relative to the working directory, as the
    # runners (started with this cwd) do.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    secret = load_secret(state_dir)
    # The controller's own process scheduler serves runs from before runner hosts.
    ctx = ControllerContext(state_dir=state_dir, secret=secret, scheduler=ProcessScheduler(state_dir, secret))
    groups = [
        CompileActivities(ctx),
        SchedulingActivities(ctx),
        PlacingActivities(ctx),
        MonitorActivities(ctx),
        CheckpointActivities(ctx),
        StopActivities(ctx),
    ]
    activities = [
        getattr(g, name)
        for g in groups
        for name in dir(g)
        if hasattr(getattr(g, name), "__temporal_activity_definition")
    ]
    build = (build or versioning.build_id()) if versioned else None

    def make_worker(on: Client) -> Worker:
        return Worker(
            on,
            task_queue=TASK_QUEUE,
            workflows=[JobWorkflow, HostRegistryWorkflow],
            activities=activities,
            max_concurrent_activities=max_concurrent_activities,
            deployment_config=versioning.deployment_config(build) if build is not None else None,
        )

    host = None
    if local_slots > 0 or host_config is not None:
        config = host_config or HostConfig(
            host_id=default_host_id(state_dir), slots=local_slots, warm_runners=warm_runners
        )
        if metrics_port is not None:
            config = dataclasses.replace(
                config, metrics_port=metrics_port, metrics_port_is_default=metrics_port_is_default
            )
        host = RunnerHost(client, state_dir, config, secret=secret)
    if metrics_port is None:
        return ControllerWorker(make_worker(client), host, build=build, make_current=make_current)
    plan = MetricsPlan(
        client, make_worker, metrics_port, bind=host.config.address if host is not None else "127.0.0.1",
        port_is_default=metrics_port_is_default,
    )  # fmt: skip
    return ControllerWorker(None, host, build=build, make_current=make_current, metrics=plan)


async def run_worker(client: Client, state_dir: Path, **options: Any) -> None:
    """Run a controller worker (and its local host) until cancelled."""
    await create_worker(client, state_dir, **options).run()
