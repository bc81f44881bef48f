"""Typed calls to the host registry workflow (see sluice/hosts/registry.py).

Every helper first makes sure the registry exists (starting it if it never ran, or if someone
terminated it), then calls its update or query on the latest run, so calls keep working across
the registry's continue-as-new. Failures are typed: `RegistryRejected` when the registry refused
the call (its message says why), `RegistryUnavailable` when no controller worker answered in time.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from sluice.hosts.contracts import (
    HOST_LEASE,
    QUERY_HOSTS,
    REGISTRY_WORKFLOW_ID,
    REGISTRY_WORKFLOW_TYPE,
    UPDATE_DEREGISTER,
    UPDATE_PLACE,
    UPDATE_REGISTER,
    UPDATE_RELEASE,
    HostRecord,
    HostRegistration,
    Placement,
    PlaceRequest,
    RegisterResult,
    ReleaseRequest,
)
from sluice.models import TASK_QUEUE

#: An update waits for a controller worker to run it; without one it would wait forever.
REGISTRY_CALL_TIMEOUT_S = 60.0
#: A query is answered by a worker too; bound it and say what is missing.
REGISTRY_QUERY_TIMEOUT_S = 10.0
#: Pause before asking again when the registry's run moves under us (continue-as-new).
RETRY_PAUSE_S = 0.2

T = TypeVar("T")


class RegistryError(Exception):
    """Base of the registry client's errors; `str(err)` is a complete message for a user."""


class RegistryRejected(RegistryError):
    """The registry refused the call (malformed, or a stale placement request)."""


class RegistryUnavailable(RegistryError):
    """The registry did not answer in time: no controller worker is polling task queue `sluice`."""


def registry_handle(client: Client) -> WorkflowHandle[Any, Any]:
    """A handle on the registry's latest run (no run id: it follows continue-as-new)."""
    return client.get_workflow_handle(REGISTRY_WORKFLOW_ID)


async def ensure_registry(client: Client) -> WorkflowHandle[Any, Any]:
    """Start the registry unless it is running; a handle on its latest run either way.

    Safe to call from many processes at once: an open registry is used as it is, and a start
    that loses a race to another one is not an error.
    """
    try:
        await client.start_workflow(
            REGISTRY_WORKFLOW_TYPE,
            id=REGISTRY_WORKFLOW_ID,
            task_queue=TASK_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary="sluice host registry: runner hosts and their reserved slots",
        )
    except WorkflowAlreadyStartedError:
        pass  # another caller started it between our check and our start
    return registry_handle(client)


def _reraise_if_cancelling() -> None:
    """Raise CancelledError if the current task is being cancelled (so cancellation is not lost)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _message(exc: WorkflowUpdateFailedError) -> str:
    """Why the registry refused an update: its validator's or handler's message."""
    cause = exc.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or exc)


async def _update(client: Client, name: str, arg: Any, result_type: type[T], timeout_s: float) -> T:
    """Run update `name` on the registry's latest run; retried while the run moves under us."""

    async def attempt() -> T:
        while True:
            handle = await ensure_registry(client)
            try:
                return await handle.execute_update(name, arg, result_type=result_type)
            except WorkflowUpdateFailedError as exc:
                raise RegistryRejected(f"host registry refused {name}: {_message(exc)}") from exc
            except WorkflowUpdateRPCTimeoutOrCancelledError:
                # Our own timeout arrives as this error; otherwise the server's long poll ended.
                _reraise_if_cancelling()
            except RPCError as exc:
                # The run closed (continue-as-new, or terminated) before it accepted the update.
                if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                    raise
            await asyncio.sleep(RETRY_PAUSE_S)

    try:
        return await asyncio.wait_for(attempt(), timeout=timeout_s)
    except TimeoutError as exc:
        _reraise_if_cancelling()
        raise RegistryUnavailable(
            f"host registry did not answer {name} within {timeout_s:g} s; "
            f"is a controller worker (`sluice worker`) polling task queue {TASK_QUEUE!r}?"
        ) from exc


async def register(
    client: Client, reg: HostRegistration, *, timeout_s: float = REGISTRY_CALL_TIMEOUT_S
) -> RegisterResult:
    """Register (or refresh) a host. `declared_lost`: its leftover runners must be killed."""
    return await _update(client, UPDATE_REGISTER, reg, RegisterResult, timeout_s)


async def deregister(client: Client, host_id: str, *, timeout_s: float = REGISTRY_CALL_TIMEOUT_S) -> list[str]:
    """Remove a host that shuts down; the job ids that had runners reserved there."""
    return await _update(client, UPDATE_DEREGISTER, host_id, list[str], timeout_s)


async def place(client: Client, req: PlaceRequest, *, timeout_s: float = REGISTRY_CALL_TIMEOUT_S) -> Placement:
    """Reserve slots for a job's generation, or learn why not (then nothing is reserved)."""
    return await _update(client, UPDATE_PLACE, req, Placement, timeout_s)


async def release(client: Client, req: ReleaseRequest, *, timeout_s: float = REGISTRY_CALL_TIMEOUT_S) -> int:
    """Release a job's reservations (all, or generations below a number); runners released."""
    return await _update(client, UPDATE_RELEASE, req, int, timeout_s)


async def list_hosts(client: Client, *, timeout_s: float = REGISTRY_QUERY_TIMEOUT_S) -> list[HostRecord]:
    """Every registered host in host_id order, with its slots in use and jobs."""
    deadline = time.monotonic() + timeout_s
    while True:
        handle = await ensure_registry(client)
        left = max(0.001, deadline - time.monotonic())
        try:
            return await handle.query(
                QUERY_HOSTS, result_type=list[HostRecord], rpc_timeout=timedelta(seconds=left)
            )
        except WorkflowQueryFailedError as exc:
            raise RegistryError(f"host registry query failed: {exc}") from exc
        except RPCError as exc:
            if (
                exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(RETRY_PAUSE_S)  # the run moved under us: ask the new one
                continue
            if exc.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
                raise RegistryUnavailable(
                    f"host registry did not answer within {timeout_s:g} s; is a controller worker "
                    f"(`sluice worker`) polling task queue {TASK_QUEUE!r}?"
                ) from exc
            raise


async def last_heartbeats(client: Client) -> dict[str, datetime]:
    """Each host's last lease heartbeat, as the server saw it (from the registry's pending lease
    activities: heartbeats cost no history, so the registry's own state does not hold them)."""
    desc = await registry_handle(client).describe()
    out: dict[str, datetime] = {}
    for pending in desc.raw_description.pending_activities:
        if pending.activity_type.name != HOST_LEASE or not pending.heartbeat_details.payloads:
            continue
        (details,) = await client.data_converter.decode(pending.heartbeat_details.payloads)
        host_id = details.get("host_id") if isinstance(details, dict) else None
        if host_id and pending.HasField("last_heartbeat_time"):
            out[host_id] = pending.last_heartbeat_time.ToDatetime(tzinfo=UTC)
    return out
