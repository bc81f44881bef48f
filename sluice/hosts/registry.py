"""HostRegistryWorkflow: the one place that knows every runner host and every reserved slot.

One entity workflow per namespace (id REGISTRY_WORKFLOW_ID, on the controller task queue). Hosts
come and go through the `register` / `deregister` updates; jobs reserve and release runner slots
through `place` / `release`; `sluice hosts` reads the `hosts` query.

Liveness: for every registered host the workflow keeps one lease activity (HOST_LEASE) running on
the host's own task queue. The host heartbeats it. A lease that stops heartbeating (or fails) is
replaced at once by a new one, which any process polling that queue may take up (a restarted
host, a second process). When nobody takes a lease up within HOST_REACQUIRE_TIMEOUT (its
schedule-to-start timeout), the host is declared lost: its reservations are dropped, every job
that had runners there gets a `host_lost` signal, and the host must kill its leftover runners if
it ever registers again (`declared_lost`). Every decision follows from an activity's own timeout,
never from comparing clocks, so replays decide the same.

Signals to jobs are best effort: a job that is closed or missing never fails the registry.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, VersioningBehavior
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    TimeoutType,
    is_cancelled_exception,
)
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, Field

    # `import a.b.c as X`, not `from a.b import c`: the latter would bypass the pass-through (the
    # sandbox already holds its own `sluice.hosts`), and tests could not lower a limit.
    import sluice.hosts.registry_constants as RC
    from sluice.hosts.contracts import (
        HOST_HEARTBEAT_TIMEOUT,
        HOST_LEASE,
        HOST_REACQUIRE_TIMEOUT,
        QUERY_HOSTS,
        REGISTRY_WORKFLOW_TYPE,
        SIGNAL_HOST_LOST,
        SIGNAL_SLOTS_FREED,
        UPDATE_DEREGISTER,
        UPDATE_PLACE,
        UPDATE_REGISTER,
        UPDATE_RELEASE,
        HostLost,
        HostRecord,
        HostRegistration,
        Placement,
        PlaceRequest,
        RegisterResult,
        ReleaseRequest,
    )
    from sluice.hosts.placement import format_labels
    from sluice.hosts.placement import place as compute_placement
    from sluice.models import TASK_QUEUE

#: Error type of an update the registry refuses in its handler (the validator refuses most first).
REGISTRY_REJECTED_TYPE = "RegistryRejected"


class Reservation(BaseModel):
    """Runner slots one job holds on one host, for one generation."""

    generation: int = Field(ge=0)
    runners: int = Field(ge=1)


class RegistryState(BaseModel):
    """The registry's durable state, handed whole to the next run by a continue-as-new.

    Dicts keep insertion order through JSON, so iterating them is deterministic (sets of strings
    are not: their order depends on the process's hash seed).
    """

    hosts: dict[str, HostRegistration] = Field(default_factory=dict)
    #: host_id -> job_id -> what the job holds there
    reservations: dict[str, dict[str, Reservation]] = Field(default_factory=dict)
    #: job ids whose last `place` could not be satisfied -> the sequence number of that request
    #: (tells a stale failed signal from a newer wait)
    waiting: dict[str, int] = Field(default_factory=dict)
    #: hosts declared lost, oldest first (at most RC.LOST_HOSTS_KEPT)
    lost: list[str] = Field(default_factory=list)


def _seconds(td: Any) -> str:
    return f"{td.total_seconds():g} s"


def _check_id(what: str, value: str) -> None:
    """Reject an empty, blank or overlong id with a message naming it."""
    if not value or not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > RC.MAX_ID_LENGTH:
        raise ValueError(f"{what} is longer than {RC.MAX_ID_LENGTH} characters")


# Auto-upgrade (Worker Versioning): the registry serves every build's jobs and hosts, so it runs
# on whichever build is current; a change to its code must replay its histories (workflow.patched).
@workflow.defn(name=REGISTRY_WORKFLOW_TYPE, versioning_behavior=VersioningBehavior.AUTO_UPGRADE)
class HostRegistryWorkflow:
    """The host registry (see the module docstring). Runs forever, renewing its history by
    continue-as-new; every update handler is synchronous, so an accepted update is applied in the
    workflow task that accepted it."""

    @workflow.init
    def __init__(self, carried: RegistryState | None = None) -> None:
        state = carried or RegistryState()
        self.hosts: dict[str, HostRegistration] = dict(state.hosts)
        self.reservations: dict[str, dict[str, Reservation]] = {h: dict(r) for h, r in state.reservations.items()}
        self.waiting: dict[str, int] = dict(state.waiting)
        self.lost: list[str] = list(state.lost)
        self.wait_seq = max(self.waiting.values(), default=0)
        # Not carried: the next run starts a fresh lease per host and has no signals in flight.
        # host_id -> (the loop's number, its task): a loop that is no longer the host's current
        # one (cancelled, replaced) stops instead of renewing leases beside its successor.
        self.leases: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self.lease_loops_started = 0
        self.outbox: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ main loop

    @workflow.run
    async def run(self, carried: RegistryState | None = None) -> None:
        """Keep a lease per host; continue as new when history grows (never returns otherwise)."""
        for host_id in list(self.hosts):
            self._ensure_lease(host_id)
        self._show_details()
        await workflow.wait_condition(self._continue_as_new_due)
        # A safe point: every update applied and every signal to a job delivered (or failed), so
        # nothing accepted is lost with this run. Lease activities of this run are cancelled by
        # the server when it closes; the next run starts new ones.
        await workflow.wait_condition(
            lambda: workflow.all_handlers_finished() and all(t.done() for t in self.outbox)
        )
        workflow.continue_as_new(self._carried())

    def _continue_as_new_due(self) -> bool:
        """Both inputs come from history: deterministic."""
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() >= RC.CONTINUE_AS_NEW_EVENTS

    def _carried(self) -> RegistryState:
        return RegistryState(
            hosts=self.hosts, reservations=self.reservations, waiting=self.waiting, lost=self.lost
        )

    # ------------------------------------------------------------------ leases

    def _ensure_lease(self, host_id: str) -> None:
        """Start the host's lease loop unless one is running."""
        current = self.leases.get(host_id)
        if current is None or current[1].done():
            self.lease_loops_started += 1
            number = self.lease_loops_started
            self.leases[host_id] = (number, asyncio.create_task(self._lease_loop(host_id, number)))

    def _stop_lease(self, host_id: str) -> None:
        """Cancel the host's lease loop (and with it its lease activity), if any."""
        current = self.leases.pop(host_id, None)
        if current is not None and not current[1].done():
            current[1].cancel()

    def _is_current_loop(self, host_id: str, number: int) -> bool:
        current = self.leases.get(host_id)
        return host_id in self.hosts and current is not None and current[0] == number

    async def _lease_loop(self, host_id: str, number: int) -> None:
        """One lease after another on the host's task queue, until the host shuts down (a lease
        returns), deregisters (this loop is cancelled) or is declared lost (nobody took a lease
        up in time). Loop `number` only acts while it is the host's current loop."""
        previous: str | None = None  # how the last lease ended: words for the lost reason
        unanswered = 0  # renewals in a row that timed out without a single heartbeat
        while self._is_current_loop(host_id, number):
            record = self.hosts[host_id]
            try:
                await workflow.execute_activity(
                    HOST_LEASE,
                    host_id,
                    task_queue=record.task_queue,
                    schedule_to_start_timeout=HOST_REACQUIRE_TIMEOUT,
                    heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                    start_to_close_timeout=RC.LEASE_START_TO_CLOSE,
                    retry_policy=RetryPolicy(maximum_attempts=1),
                    summary=f"lease of host {host_id}",
                )
            except ActivityError as e:
                if is_cancelled_exception(e) or not self._is_current_loop(host_id, number):
                    return  # deregistered, or replaced by a loop on the host's new task queue
                cause = e.cause
                if isinstance(cause, TemporalTimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
                    self._declare_lost(host_id, self._lost_reason(host_id, record.task_queue, previous))
                    return
                never_beat = (
                    isinstance(cause, TemporalTimeoutError)
                    and cause.type == TimeoutType.HEARTBEAT
                    and previous is not None
                    and not cause.last_heartbeat_details
                )
                unanswered = unanswered + 1 if never_beat else 0
                if unanswered >= RC.UNANSWERED_RENEWALS_TO_LOSE:
                    # Renewed leases that never heartbeated were handed to polls the host had open
                    # before it died or was cut off (the server keeps such polls for up to a
                    # minute): nobody took them up, as with a schedule-to-start timeout. Two in a
                    # row, because a frozen process may hold one poll of a queue another live
                    # process of the same host also serves.
                    self._declare_lost(host_id, self._lost_reason(host_id, record.task_queue, previous))
                    return
                if never_beat:
                    continue
                if isinstance(cause, TemporalTimeoutError):
                    # Missed heartbeats (or the long start-to-close): another process serving
                    # the queue (a restarted host) may take the next lease up at once.
                    previous = f"no heartbeat for {_seconds(HOST_HEARTBEAT_TIMEOUT)}"
                    workflow.logger.info("host %s: lease timed out (%s); renewing", host_id, cause.type)
                    continue
                previous = f"its lease failed ({_short(str(cause or e), 200)})"
                workflow.logger.warning("host %s: lease failed: %s; renewing", host_id, cause or e)
            except Exception as e:  # noqa: BLE001 - a bug here must not end the host's liveness check
                if is_cancelled_exception(e):
                    return
                previous = f"its lease failed ({_short(str(e), 200)})"
                workflow.logger.error("host %s: lease loop error: %s", host_id, e, exc_info=True)
            else:
                # The host returned its lease: it is shutting down and deregisters next (a
                # registration starts a new loop).
                workflow.logger.info("host %s returned its lease", host_id)
                return
            # A failure of the lease itself (not a timeout): pause, so a host that fails every
            # lease at once cannot spin this workflow's history.
            await workflow.sleep(RC.LEASE_FAILURE_PAUSE, summary=f"pause before renewing lease of host {host_id}")

    @staticmethod
    def _lost_reason(host_id: str, task_queue: str, previous: str | None) -> str:
        reacquire = f"no process took up its task queue {task_queue} within {_seconds(HOST_REACQUIRE_TIMEOUT)}"
        if previous is None:  # its first lease was never taken up
            return f"host {host_id} lost: {reacquire}"
        return f"host {host_id} lost: {previous} and {reacquire}"

    def _declare_lost(self, host_id: str, reason: str) -> None:
        """Forget the host and its reservations, remember it as lost, tell the jobs."""
        workflow.logger.warning("%s", reason)
        self.leases.pop(host_id, None)  # the caller is that lease loop, which ends now
        jobs = self._remove_host(host_id)
        if host_id in self.lost:
            self.lost.remove(host_id)
        self.lost.append(host_id)
        del self.lost[: -RC.LOST_HOSTS_KEPT]
        for job_id in jobs:
            self._signal(job_id, SIGNAL_HOST_LOST, HostLost(host_id=host_id, reason=reason))
        self._notify_waiting(f"host {host_id} lost")
        self._show_details()

    # ------------------------------------------------------------------ state helpers

    def _remove_host(self, host_id: str) -> list[str]:
        """Drop the host and its reservations; the job ids that had reservations there."""
        self.hosts.pop(host_id, None)
        held = self.reservations.pop(host_id, {})
        return sorted(held)

    def _records(self) -> list[HostRecord]:
        """Every host with its reservations summed up, in host_id order."""
        records: list[HostRecord] = []
        for host_id in sorted(self.hosts):
            reg = self.hosts[host_id]
            held = self.reservations.get(host_id, {})
            jobs = {job_id: held[job_id].runners for job_id in sorted(held)}
            records.append(
                HostRecord(
                    host_id=reg.host_id,
                    task_queue=reg.task_queue,
                    address=reg.address,
                    slots=reg.slots,
                    slots_in_use=sum(jobs.values()),
                    labels=dict(reg.labels),
                    version=reg.version,
                    jobs=jobs,
                    endpoint=reg.endpoint,
                )
            )
        return records

    def _reserved_generation(self, job_id: str) -> int | None:
        """The newest generation the job holds slots for, if any."""
        gens = [held[job_id].generation for held in self.reservations.values() if job_id in held]
        return max(gens) if gens else None

    def _drop_job(self, job_id: str, below_generation: int | None = None) -> dict[str, int]:
        """Drop the job's reservations (all, or those of generations below a number): host_id ->
        runners released there."""
        released: dict[str, int] = {}
        for host_id in list(self.reservations):
            held = self.reservations[host_id]
            r = held.get(job_id)
            if r is None or (below_generation is not None and r.generation >= below_generation):
                continue
            del held[job_id]
            released[host_id] = r.runners
            if not held:
                del self.reservations[host_id]
        return released

    def _signal(self, job_id: str, name: str, payload: Any) -> None:
        """Send a signal to a job in the background; a closed or missing job is logged, never
        an error of the registry (and no longer counts as waiting)."""
        seq = self.waiting.get(job_id)

        async def send() -> None:
            try:
                await workflow.get_external_workflow_handle(job_id).signal(name, payload)
            except Exception as e:  # noqa: BLE001 - the job is closed or missing: not our failure
                workflow.logger.info("signal %s to job %s not delivered: %s", name, job_id, e)
                if seq is not None and self.waiting.get(job_id) == seq:
                    del self.waiting[job_id]  # nobody is waiting under that id any more

        self.outbox = [t for t in self.outbox if not t.done()]
        self.outbox.append(asyncio.create_task(send()))

    def _notify_waiting(self, reason: str) -> None:
        """Tell every waiting job that asking again may succeed."""
        for job_id in list(self.waiting):
            self._signal(job_id, SIGNAL_SLOTS_FREED, _short(reason, RC.SLOTS_FREED_REASON_CHARS))

    def _show_details(self) -> None:
        """The Markdown the Web UI shows as the workflow's current details."""
        records = self._records()
        lines = [
            (
                f"**{len(records)} hosts**, {sum(r.slots_in_use for r in records)}/{sum(r.slots for r in records)} "
                f"slots in use, {len(self.waiting)} jobs waiting, {len(self.lost)} hosts lost recently"
            ),
            "",
        ]
        for r in records[:50]:
            labels = f" [{format_labels(r.labels)}]" if r.labels else ""
            lines.append(f"- `{r.host_id}`{labels}: {r.slots_in_use}/{r.slots} slots, {len(r.jobs)} jobs")
        workflow.set_current_details("\n".join(lines))

    # ------------------------------------------------------------------ register / deregister

    @workflow.update(name=UPDATE_REGISTER)
    def register(self, reg: HostRegistration) -> RegisterResult:
        """Add or refresh a host; `declared_lost` when it had been declared lost meanwhile."""
        declared_lost = reg.host_id in self.lost
        if declared_lost:
            self.lost.remove(reg.host_id)
        old = self.hosts.get(reg.host_id)
        self.hosts[reg.host_id] = reg
        if old is not None and old.task_queue != reg.task_queue:
            self._stop_lease(reg.host_id)  # its lease waits on the old queue
        self._ensure_lease(reg.host_id)
        if old is None or reg.slots > old.slots or reg.labels != old.labels:
            self._notify_waiting(f"host {reg.host_id} registered with {reg.slots} slots")
        workflow.logger.info("host %s registered (%d slots, declared_lost=%s)", reg.host_id, reg.slots, declared_lost)
        self._show_details()
        return RegisterResult(declared_lost=declared_lost)

    @register.validator
    def _validate_register(self, reg: HostRegistration) -> None:
        _check_id("host_id", reg.host_id)
        _check_id("task_queue", reg.task_queue)
        if reg.task_queue == TASK_QUEUE:
            raise ValueError(
                f"host {reg.host_id}: task queue {TASK_QUEUE!r} is the controller's; a host polls its own"
            )
        # A shared queue would hand one host's leases to the other: neither's liveness would count.
        for other in self.hosts.values():
            if other.task_queue == reg.task_queue and other.host_id != reg.host_id:
                raise ValueError(
                    f"host {reg.host_id}: task queue {reg.task_queue!r} is already host {other.host_id}'s"
                )
        for key in reg.labels:
            _check_id("label name", key)

    @workflow.update(name=UPDATE_DEREGISTER)
    def deregister(self, host_id: str) -> list[str]:
        """Remove a host that shuts down; the job ids that had reservations there (each told by
        `host_lost`). An unknown host: nothing to do, []."""
        if host_id not in self.hosts:
            return []
        self._stop_lease(host_id)
        jobs = self._remove_host(host_id)
        for job_id in jobs:
            self._signal(job_id, SIGNAL_HOST_LOST, HostLost(host_id=host_id, reason=f"host {host_id} shut down"))
        workflow.logger.info("host %s deregistered (jobs there: %s)", host_id, ", ".join(jobs) or "none")
        self._show_details()
        return jobs

    @deregister.validator
    def _validate_deregister(self, host_id: str) -> None:
        if not isinstance(host_id, str):
            raise TypeError(f"deregister expects a host id (a string), got {type(host_id).__name__}")
        _check_id("host_id", host_id)

    # ------------------------------------------------------------------ place / release

    def _check_place(self, req: PlaceRequest) -> None:
        _check_id("job_id", req.job_id)
        if req.generation < 0:
            raise ValueError(f"job {req.job_id}: generation must be >= 0, got {req.generation}")
        current = self._reserved_generation(req.job_id)
        if current is not None and req.generation < current:
            raise ValueError(
                f"stale placement request: job {req.job_id} asks for generation {req.generation}, "
                f"but already holds slots for generation {current}"
            )
        for key in req.labels:
            _check_id("label name", key)

    @workflow.update(name=UPDATE_PLACE)
    def place(self, req: PlaceRequest) -> Placement:
        """Reserve slots for a generation (replacing the job's older reservations), or say why
        not and remember the job as waiting (it gets `slots_freed` when asking again may help)."""
        try:
            self._check_place(req)  # the state may have moved since the validator ran
        except ValueError as e:
            raise ApplicationError(str(e), type=REGISTRY_REJECTED_TYPE, non_retryable=True) from None
        placement = compute_placement(self._records(), req)
        if placement.waiting_reason is not None:
            self.wait_seq += 1
            self.waiting[req.job_id] = self.wait_seq
            workflow.logger.info("job %s waits for slots: %s", req.job_id, placement.waiting_reason)
            self._show_details()
            return placement
        before = self._drop_job(req.job_id)
        for share in placement.shares:
            self.reservations.setdefault(share.host_id, {})[req.job_id] = Reservation(
                generation=req.generation, runners=share.runners
            )
        self.waiting.pop(req.job_id, None)
        after = {s.host_id: s.runners for s in placement.shares}
        if any(n > after.get(host_id, 0) for host_id, n in before.items()):
            self._notify_waiting(f"job {req.job_id} placed generation {req.generation} on fewer slots")
        self._show_details()
        return placement

    @place.validator
    def _validate_place(self, req: PlaceRequest) -> None:
        self._check_place(req)

    @workflow.update(name=UPDATE_RELEASE)
    def release(self, req: ReleaseRequest) -> int:
        """Drop the job's reservations (all, or generations below N); the runners released.
        Anything freed is announced to every waiting job. Releasing all also ends the job's own
        wait: it needs nothing more."""
        released = sum(self._drop_job(req.job_id, req.below_generation).values())
        if req.below_generation is None:
            self.waiting.pop(req.job_id, None)
        if released:
            self._notify_waiting(f"job {req.job_id} released {released} slots")
            self._show_details()
        return released

    @release.validator
    def _validate_release(self, req: ReleaseRequest) -> None:
        _check_id("job_id", req.job_id)
        if req.below_generation is not None and req.below_generation < 0:
            raise ValueError(f"job {req.job_id}: below_generation must be >= 0, got {req.below_generation}")

    # ------------------------------------------------------------------ query

    @workflow.query(name=QUERY_HOSTS)
    def hosts_query(self) -> list[HostRecord]:
        """Every registered host, in host_id order, with slots_in_use and jobs filled in."""
        return self._records()


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

