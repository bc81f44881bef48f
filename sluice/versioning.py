"""Worker Versioning: which build of sluice runs a job's workflow code.

Controller workers poll task queue `sluice` as one version of the Worker Deployment `sluice`: the
build id is sluice's version plus a digest of the code that writes workflow histories, so any
change to it is a new build. JobWorkflow is *pinned*: a run stays on the build that started it,
and moves to the deployment's current build at its next continue-as-new. The host registry serves
every build's jobs and auto-upgrades: it always runs on the current build.

A worker makes its build the current one when it starts (new jobs go to it) unless told not to;
jobs pinned to a build that no worker serves any more (its workers were all stopped before the
jobs moved on) are moved to the current build (`adopt_orphaned_jobs`), which is safe because every
build replays the histories of the builds before it (tests/test_replay.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from google.protobuf.field_mask_pb2 import FieldMask
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflow.v1 import VersioningOverride, WorkflowExecutionOptions
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
    DescribeWorkerDeploymentRequest,
    SetWorkerDeploymentCurrentVersionRequest,
    UpdateWorkflowExecutionOptionsRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import WorkerDeploymentConfig

from sluice import __version__
from sluice.models import TASK_QUEUE

log = logging.getLogger(__name__)
T = TypeVar("T")

DEPLOYMENT_NAME = "sluice"
BUILD_ID_ENV = "SLUICE_BUILD_ID"  # overrides the computed build id (e.g. a release tag)
# The code whose change makes a new build: everything that decides what a workflow records.
_PACKAGE = Path(__file__).resolve().parent
_HISTORY_CODE = ("workflows", "hosts/registry.py", "hosts/registry_constants.py", "hosts/contracts.py", "models.py")
# A build id becomes known to the server with its first poll: making it current waits this long.
MAKE_CURRENT_TIMEOUT_S = 30.0
# The server rate-limits requests to one deployment; a busy answer is retried this long.
BUSY_TIMEOUT_S = 30.0
# A poller not seen for this long is gone (pollers re-poll at least every ~70 s while alive).
POLLER_GONE_AFTER = timedelta(seconds=90)
# Open workflows of sluice pinned to another build than `current` (the server's own search
# attributes: no describe per job, so a worker with thousands of jobs stays cheap).
ORPHAN_QUERY = (
    f"TaskQueue = '{TASK_QUEUE}' AND ExecutionStatus = 'Running' AND TemporalWorkflowVersioningBehavior = 'Pinned' "
    f"AND TemporalWorkerDeploymentVersion != '{DEPLOYMENT_NAME}:{{current}}'"
)


def build_id() -> str:
    """This code's build id: `$SLUICE_BUILD_ID`, else `<version>-<digest of the history code>`."""
    override = os.environ.get(BUILD_ID_ENV, "").strip()
    if override:
        return override
    digest = hashlib.sha256()
    for rel in _HISTORY_CODE:
        path = _PACKAGE / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f.relative_to(_PACKAGE).as_posix().encode())
            digest.update(f.read_bytes())
    return f"{__version__}-{digest.hexdigest()[:10]}"


def deployment_config(build: str) -> WorkerDeploymentConfig:
    """A controller worker's versioning: deployment `sluice`, this build, pinned by default."""
    return WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(DEPLOYMENT_NAME, build),
        use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.PINNED,
    )


async def _patiently(call: Callable[[], Awaitable[T]], timeout_s: float = BUSY_TIMEOUT_S) -> T:
    """`call()`, again while the server says the deployment is busy (it rate-limits the requests
    to one deployment: RESOURCE_EXHAUSTED)."""
    deadline = time.monotonic() + timeout_s
    pause = 0.2
    while True:
        try:
            return await call()
        except RPCError as e:
            if e.status != RPCStatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


async def current_build(client: Client) -> str | None:
    """The build new jobs go to (None: the deployment has no current version yet)."""
    request = DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=DEPLOYMENT_NAME)
    try:
        resp = await _patiently(lambda: client.workflow_service.describe_worker_deployment(request))
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    current = resp.worker_deployment_info.routing_config.current_deployment_version
    return current.build_id or None


async def make_current(client: Client, build: str, *, timeout_s: float = MAKE_CURRENT_TIMEOUT_S) -> None:
    """Route new jobs to `build`. Retried until the server knows the build (a worker of it polled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.workflow_service.set_worker_deployment_current_version(
                SetWorkerDeploymentCurrentVersionRequest(
                    namespace=client.namespace, deployment_name=DEPLOYMENT_NAME, build_id=build,
                    identity=client.identity, ignore_missing_task_queues=True,
                )  # fmt: skip
            )
            log.info("worker deployment %s: build %s is current", DEPLOYMENT_NAME, build)
            return
        except RPCError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"could not make build {build} of worker deployment {DEPLOYMENT_NAME} current within "
                    f"{timeout_s:g} s: {e.message}"
                ) from e
            # Not known yet (no poll of this build reached the server), or the deployment is busy.
            await asyncio.sleep(0.5)


async def live_builds(client: Client) -> set[str]:
    """Builds with a worker polling the workflow queue recently."""
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=TASK_QUEUE),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )  # fmt: skip
    )
    now = datetime.now(UTC)
    out = set()
    for poller in resp.pollers:
        seen = poller.last_access_time.ToDatetime(tzinfo=UTC)
        if now - seen < POLLER_GONE_AFTER and poller.deployment_options.build_id:
            out.add(poller.deployment_options.build_id)
    return out


async def adopt_orphaned_jobs(client: Client) -> list[str]:
    """Move open jobs pinned to a build that no worker serves to the current build (an
    auto-upgrade override). Returns their workflow ids. Without this, such a job would wait
    for a worker of its build forever."""
    current = await current_build(client)
    if current is None:
        return []
    alive = await live_builds(client)
    moved: list[str] = []
    async for wf in client.list_workflows(ORPHAN_QUERY.format(current=current)):
        versions = wf.search_attributes.get("TemporalWorkerDeploymentVersion") or []
        pinned = str(versions[0]).partition(":")[2] if versions else ""
        if not pinned or pinned == current or pinned in alive:
            continue
        await client.workflow_service.update_workflow_execution_options(
            UpdateWorkflowExecutionOptionsRequest(
                namespace=client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=wf.id, run_id=wf.run_id),
                workflow_execution_options=WorkflowExecutionOptions(
                    versioning_override=VersioningOverride(auto_upgrade=True)
                ),
                update_mask=FieldMask(paths=["versioning_override"]),
            )
        )
        log.warning("job %s was pinned to build %s, which no worker serves: moved to build %s", wf.id, pinned, current)
        moved.append(wf.id)
    return moved
