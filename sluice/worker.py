"""The controller worker: hosts JobWorkflow and the controller activities on task queue `sluice`."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from sluice.activities.checkpointing import CheckpointActivities
from sluice.activities.compiling import CompileActivities
from sluice.activities.context import ControllerContext
from sluice.activities.monitoring import MonitorActivities
from sluice.activities.placing import PlacingActivities
from sluice.activities.scheduling import SchedulingActivities
from sluice.activities.stopping import StopActivities
from sluice.hosts.registry import HostRegistryWorkflow
from sluice.models import TASK_QUEUE
from sluice.schedulers.process import ProcessScheduler
from sluice.settings import load_secret
from sluice.workflows.job import JobWorkflow

# Monitors are long-lived (one per running job), so allow many concurrent activities.
MAX_CONCURRENT_ACTIVITIES = 1000


def create_worker(client: Client, state_dir: Path) -> Worker:
    """A worker for `client`'s namespace; runners it starts keep their files under `state_dir`."""
    # User functions (`module:function`) are imported relative to the working directory, as the
    # runners (started with this cwd) do.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    secret = load_secret(state_dir)
    ctx = ControllerContext(state_dir=state_dir, secret=secret, scheduler=ProcessScheduler(state_dir, secret))
    groups = [
        CompileActivities(ctx),
        SchedulingActivities(ctx),
        MonitorActivities(ctx),
        CheckpointActivities(ctx),
        StopActivities(ctx),
        PlacingActivities(ctx),
    ]
    activities = [
        getattr(g, name)
        for g in groups
        for name in dir(g)
        if hasattr(getattr(g, name), "__temporal_activity_definition")
    ]
    return Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[JobWorkflow, HostRegistryWorkflow],
        activities=activities,
        max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
    )


async def run_worker(client: Client, state_dir: Path) -> None:
    """Run a controller worker until cancelled."""
    async with create_worker(client, state_dir):
        await asyncio.Event().wait()
