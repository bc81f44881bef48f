"""The typed messages between runner hosts, the host registry and job workflows.

Names used on the wire (workflow id, update, query and signal names, activity names) are
constants here, so every side spells them once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field

from sluice.models import Contract, ErrorDomain

#: The registry workflow: one per namespace, on the controller task queue.
REGISTRY_WORKFLOW_ID = "sluice-host-registry"
REGISTRY_WORKFLOW_TYPE = "HostRegistryWorkflow"

#: Each host polls its own task queue (the worker-specific task queue pattern).
HOST_TASK_QUEUE_PREFIX = "sluice-host-"

# The registry's updates and query (see sluice/hosts/registry.py).
UPDATE_REGISTER = "register"
UPDATE_DEREGISTER = "deregister"
UPDATE_PLACE = "place"
UPDATE_RELEASE = "release"
QUERY_HOSTS = "hosts"

# Activities a job workflow runs on the controller task queue to reserve and release slots.
ACTIVITY_PLACE_RUNNERS = "place_runners"
ACTIVITY_RELEASE_SLOTS = "release_slots"

# Activities that run on a host's own task queue.
HOST_START_RUNNERS = "host_start_runners"
HOST_STOP_RUNNERS = "host_stop_runners"
HOST_LEASE = "host_lease"

# Signals a job workflow receives from hosts and from the registry.
SIGNAL_RUNNER_REPORT = "runner_report"
SIGNAL_HOST_LOST = "host_lost"
SIGNAL_SLOTS_FREED = "slots_freed"

# A host is declared lost when its lease activity misses heartbeats for HOST_HEARTBEAT_TIMEOUT
# and then no process serving its task queue takes a new lease up: none picks it up within
# HOST_REACQUIRE_TIMEOUT, or two renewals in a row go to polls of a gone process and never
# heartbeat. About 6-9 s from the last heartbeat (+ the server's timer granularity). Flink's
# TaskManager heartbeat timeout is 50 s.
HOST_HEARTBEAT_TIMEOUT = timedelta(seconds=3)
HOST_REACQUIRE_TIMEOUT = timedelta(seconds=3)
#: How often a host heartbeats its lease (free: heartbeats are not history events).
HOST_HEARTBEAT_EVERY_S = 1.0


def host_task_queue(host_id: str) -> str:
    return HOST_TASK_QUEUE_PREFIX + host_id


class HostRegistration(Contract):
    """What a host tells the registry about itself (on start, and again on re-registration)."""

    host_id: str = Field(min_length=1, max_length=200)
    task_queue: str
    address: str = Field(description="the address its runners advertise to peers and controllers")
    slots: int = Field(ge=0, description="runner processes this host may run at once")
    labels: dict[str, str] = Field(default_factory=dict)
    version: str = ""
    endpoint: str | None = Field(
        default=None, description="URL of its metrics and logs endpoint (None: it serves none)"
    )


class HostRecord(Contract):
    """A registered host as the registry sees it (the `hosts` query, `sluice hosts`)."""

    host_id: str
    task_queue: str
    address: str
    slots: int
    slots_in_use: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    version: str = ""
    jobs: dict[str, int] = Field(default_factory=dict, description="job id -> runners reserved here")
    endpoint: str | None = Field(default=None, description="URL of its metrics and logs endpoint, if any")

    @property
    def slots_free(self) -> int:
        return max(0, self.slots - self.slots_in_use)


class RegisterResult(Contract):
    """`declared_lost`: this host had been declared lost (its jobs recovered elsewhere): whatever
    runners it still has belong to superseded generations and must be stopped."""

    declared_lost: bool = False


class PlaceRequest(Contract):
    """Reserve `runners` runner slots for a job's new generation (older generations' reservations
    of the job are released by the same call)."""

    job_id: str
    generation: int
    runners: int = Field(ge=0)
    labels: dict[str, str] = Field(default_factory=dict, description="a host must have all of these")


class HostShare(Contract):
    """The runners of a generation placed on one host."""

    host_id: str
    task_queue: str
    address: str
    runners: int = Field(ge=1)
    first_index: int = Field(ge=0, description="runner indices first_index .. first_index+runners-1")


class Placement(Contract):
    """The answer to a PlaceRequest: the shares (all runners placed), or why not (nothing
    reserved; the job is told by a `slots_freed` signal when it is worth asking again)."""

    shares: list[HostShare] = Field(default_factory=list)
    waiting_reason: str | None = None


class ReleaseRequest(Contract):
    """Release a job's reservations: all of them, or those of generations below a number."""

    job_id: str
    below_generation: int | None = None


class HostStartInput(Contract):
    """host_start_runners: start runners first_index.. of (job, generation) on this host."""

    job_id: str
    generation: int
    count: int = Field(ge=1)
    first_index: int = Field(ge=0)
    slots_per_runner: int = Field(ge=1)
    startup_timeout_s: float = Field(gt=0)
    hang_timeout_s: float | None = Field(
        default=None, gt=0, description="the job's runner heartbeat timeout (the host's own applies when shorter)"
    )


class HostStopInput(Contract):
    """host_stop_runners: stop the job's runners here (all, one generation, or those below one)."""

    job_id: str
    generation: int | None = None
    below_generation: int | None = None
    # Seconds between SIGTERM and SIGKILL; 0: SIGKILL at once (a failed generation, whose state
    # is the last checkpoint's). None: the host's default grace.
    grace_s: float | None = Field(default=None, ge=0)


class RunnerReport(Contract):
    """What a host tells a job about one of its runners (signal `runner_report`).

    `tasks`: subtask label ("chain/index") -> state, for the labels whose state changed.
    kind `lost`: the runner exited or went silent; `message` says which and how.
    kind `task_failed`: as the runner reported it (operator, message, user traceback).
    """

    job_id: str
    generation: int
    runner_id: str
    host_id: str
    kind: Literal["tasks", "task_failed", "lost"]
    hung: bool = Field(default=False, description="lost: alive but silent (not exited)")
    tasks: dict[str, str] = Field(default_factory=dict)
    message: str = ""
    retryable: bool = True
    domain: ErrorDomain = "internal"
    operator: str | None = None
    traceback: str | None = None
    ran: list[str] = Field(default_factory=list, description="lost: the subtask labels it ran")


class HostLost(Contract):
    """The registry declared a host lost (signal `host_lost` to every job with runners there)."""

    host_id: str
    reason: str
