"""The runner host: one per machine, offering runner slots through its own Temporal task queue.

A host (`sluice host`, or the local one inside `sluice worker` / `sluice run`) is:

- a Temporal worker on `host_task_queue(host_id)` (the worker-specific task queue pattern) with
  the activities that start and stop runners on this machine, and the lease activity by which
  the registry knows it is alive (its heartbeats are the host's liveness: they cost no history);
- a watcher of its own runners: every runner found under its state directory is followed on its
  event stream; what changes (a subtask started, finished or failed, the process exited, the
  runner went silent) is sent to the runner's job as a `runner_report` signal. A process exit is
  seen within WATCH_SCAN_S; a runner alive but silent within the hang timeout. No job holds an
  activity slot to be watched.

Guarantees: the host registers before it serves (so placement only sees hosts that can start
runners); a host told that it had been declared lost stops every runner it still has (their
generations were superseded: the store's generation fence refuses their commits anyway); a clean
shutdown deregisters first (the jobs are told and recover elsewhere), then stops its runners.
Runners started by an earlier process of the same host (same host id and state directory) are
adopted: watched and stopped like its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode, ServiceClient
from temporalio.worker import Worker

import sluice
from sluice.auth import runner_token
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.hosts.contracts import (
    HOST_HEARTBEAT_EVERY_S,
    HOST_LEASE,
    HOST_START_RUNNERS,
    HOST_STOP_RUNNERS,
    SIGNAL_RUNNER_REPORT,
    HostRegistration,
    HostStartInput,
    HostStopInput,
    ReleaseRequest,
    RunnerReport,
    host_task_queue,
)
from sluice.hosts.endpoint import ObservabilityEndpoint
from sluice.hosts.host_metrics import HostObserver
from sluice.hosts.job_metrics import HeartbeatSeries
from sluice.hosts.pool import DEFAULT_POOL_SIZE, WarmPool
from sluice.models import RunnerEvent, RunnerInfo
from sluice.runner.client import RunnerClient, RunnerSilent
from sluice.schedulers import RunnerStartError
from sluice.schedulers.process import ProcessScheduler, is_runner_process
from sluice.settings import load_secret, runners_dir

log = logging.getLogger("sluice.hosts.host")

DEFAULT_SLOTS = 16
"""Runner slots of `sluice host` when --slots is not given."""
LOCAL_SLOTS = 64
"""Runner slots of the host inside `sluice worker` / `sluice run` (--local-slots)."""
DEFAULT_HANG_TIMEOUT_S = 10.0
"""A runner that sends nothing (not even a heartbeat, every second) for this long is reported
lost: hung, stopped or cut off. A job's own runner_heartbeat_timeout_s applies when shorter."""
WATCH_SCAN_S = 0.25
"""How often the host looks for new runners and for runner processes that are gone."""
REPORT_COALESCE_S = 0.05
"""Task changes that arrive within this window go to the job as one signal."""
REPORT_RETRY_INITIAL_S = 0.5
REPORT_RETRY_MAX_S = 5.0
"""A report that cannot reach Temporal is retried with this backoff while the host lives."""
REGISTER_RETRY_S = 1.0
"""Registration is retried this often until the registry answers (e.g. the server is starting)."""
LOST_RECHECK_S = 1.0
"""After its lease activity ended unexpectedly, the host asks the registry whether it was
declared lost this soon after (a new lease normally arrives at once)."""
REGISTRY_CHECK_S = 2.0
"""How often the host reads the registry (a query: no history) to find out whether it is still
registered; one that was declared lost (e.g. cut off by a partition that has healed) learns it
here, stops its leftover runners and registers again."""
CLOSED_JOBS_CHECK_S = 15.0
"""How often the host asks Temporal whether the jobs it runs runners for are still open. A job
whose workflow closed without tearing down (terminated, or timed out, from outside sluice) would
otherwise keep its runners and its reserved slots for ever: the host stops them and releases the
slots."""
SELF_FENCE_S = 20.0
"""A host that cannot reach Temporal for this long stops its runners itself: it has lost its
lease, and its jobs have recovered elsewhere long since (the store refuses its old generations'
commits anyway). Longer than a Temporal server restart, so a restart alone kills nothing."""


def default_host_id(state_dir: Path) -> str:
    """This machine's name plus a short digest of the state directory: stable across restarts
    (so a restarted host adopts its runners) and distinct for two state directories."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:6]
    return f"{socket.gethostname()}-{digest}"


@dataclass
class HostConfig:
    """What `sluice host` is told: its id, slots, addresses and labels."""

    host_id: str
    slots: int = DEFAULT_SLOTS
    bind: str = "127.0.0.1"
    advertise: str | None = None  # the address runners advertise; default: the bind address
    labels: dict[str, str] = field(default_factory=dict)
    hang_timeout_s: float = DEFAULT_HANG_TIMEOUT_S
    warm_runners: int = DEFAULT_POOL_SIZE  # pre-started runner processes kept ready (0: none)
    #: the metrics and logs endpoint's port on the advertise address (None: no endpoint; 0: a free one)
    metrics_port: int | None = None
    #: metrics_port is only the default: if it is in use, a free port is taken instead
    metrics_port_is_default: bool = False

    @property
    def address(self) -> str:
        if self.advertise:
            return self.advertise
        return "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind


@dataclass
class RunnerWatch:
    """One runner the host follows, and what it has told the runner's job so far."""

    job_id: str
    generation: int
    info: RunnerInfo
    hang_timeout_s: float
    sent_tasks: dict[str, str] = field(default_factory=dict)
    stopping: bool = False  # this host is stopping it: its end is not a loss
    ended: bool = False  # its loss was reported: nothing more is sent
    follow: asyncio.Task[None] | None = None
    sender: asyncio.Task[None] | None = None
    outbox: asyncio.Queue[RunnerReport] = field(default_factory=asyncio.Queue)
    heartbeats: HeartbeatSeries = field(default_factory=HeartbeatSeries)  # for the endpoint's rates

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.job_id, self.generation, self.info.runner_id)


class RunnerHost:
    """A machine's runner host (see the module docstring). Use as an async context manager, or
    `start()` / `close()`."""

    def __init__(
        self, client: Client, state_dir: Path, config: HostConfig, *, secret: bytes | None = None
    ) -> None:
        self.client = client
        self.state_dir = Path(state_dir)
        self.config = config
        self.secret = secret if secret is not None else load_secret(self.state_dir)
        self.pool: WarmPool | None = None  # made at start(): its processes start at once
        self.scheduler = ProcessScheduler(
            self.state_dir, self.secret, host=config.bind, advertise_host=config.address
        )
        self.task_queue = host_task_queue(config.host_id)
        self._watches: dict[tuple[str, int, str], RunnerWatch] = {}
        self._reserved_jobs: set[str] = set()  # jobs with slots reserved here (the registry, last read)
        self._senders: set[asyncio.Task[None]] = set()  # report senders, until their last report
        self._scan_now = asyncio.Event()  # set when a runner's event stream broke: scan at once
        self._hang_timeouts: dict[tuple[str, int], float] = {}
        self._closing = False
        self._worker: Worker | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._recheck: asyncio.Task[None] | None = None
        self.registered = False  # true once the registry knows this host (placement can use it)
        self.endpoint: ObservabilityEndpoint | None = None
        if config.metrics_port is not None:
            # Made now, so a controller worker can add its own metrics before start() binds it.
            self.endpoint = ObservabilityEndpoint(
                config.address, config.metrics_port, port_is_default=config.metrics_port_is_default
            )
            observer = HostObserver(self)
            self.endpoint.host = observer
            self.endpoint.sources.append(observer.prometheus_text)

    # ---------------------------------------------------------------------------- life

    @property
    def registration(self) -> HostRegistration:
        return HostRegistration(
            host_id=self.config.host_id,
            task_queue=self.task_queue,
            address=self.config.address,
            slots=self.config.slots,
            labels=self.config.labels,
            version=sluice.__version__,
            endpoint=self.endpoint.url if self.endpoint is not None else None,
        )

    def watches(self) -> list[RunnerWatch]:
        """The runners this host follows (also those stopping or ended, until their files go)."""
        return list(self._watches.values())

    def runners_in_use(self) -> int:
        """Runner slots in use: runners running here that are not being stopped."""
        return self._runners_in_use()

    def activities(self) -> list[Any]:
        return [self.host_start_runners, self.host_stop_runners, self.host_lease]

    async def start(self) -> None:
        """Serve the host's task queue, register, and watch runners (adopting leftovers)."""
        if self.config.warm_runners > 0:
            self.pool = WarmPool(self.state_dir / "warm-runners.log", size=self.config.warm_runners)
            self.scheduler.pool = self.pool
        self._worker = Worker(
            self.client,
            task_queue=self.task_queue,
            activities=self.activities(),
            # One lease, and starts/stops of runners: a few at a time is plenty.
            max_concurrent_activities=max(16, self.config.slots + 4),
            # The lease's heartbeats must reach the server every second: by default the SDK sends
            # them only every 0.8 x the heartbeat timeout, which would stretch the loss bound.
            max_heartbeat_throttle_interval=timedelta(seconds=HOST_HEARTBEAT_EVERY_S),
            # One poll at a time: a host process that freezes or is cut off then holds at most
            # one stale poll, which the registry's lease renewals account for.
            max_concurrent_activity_task_polls=1,
            default_heartbeat_throttle_interval=timedelta(seconds=HOST_HEARTBEAT_EVERY_S),
        )
        self._tasks.append(asyncio.create_task(self._worker.run(), name=f"host-worker-{self.config.host_id}"))
        self._tasks.append(asyncio.create_task(self._watch_loop(), name=f"host-watch-{self.config.host_id}"))
        if self.endpoint is not None:
            await self.endpoint.start()  # before registering: the registration names its URL
        await self._register()
        self._tasks.append(asyncio.create_task(self._registry_check_loop(), name=f"host-lease-{self.config.host_id}"))
        self._tasks.append(asyncio.create_task(self._closed_jobs_loop(), name=f"host-jobs-{self.config.host_id}"))
        log.info(
            "host %s serving task queue %s with %d slots (address %s)",
            self.config.host_id, self.task_queue, self.config.slots, self.config.address,
        )

    async def close(self) -> None:
        """Deregister (the jobs with runners here are told and recover elsewhere), stop every
        runner of this host, stop serving."""
        if self._closing:
            return
        self._closing = True
        from sluice.hosts.registry_client import deregister

        try:
            jobs = await asyncio.wait_for(deregister(self.client, self.config.host_id), timeout=10.0)
            if jobs:
                log.info(
                    "host %s deregistered; jobs told to recover elsewhere: %s", self.config.host_id, ", ".join(jobs)
                )
        except Exception as e:  # noqa: BLE001 - shutting down regardless; the lease will expire
            log.warning("host %s could not deregister (%s): its lease expires instead", self.config.host_id, e)
        await self.stop_all_runners()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
        if self._recheck is not None:
            self._recheck.cancel()
        for t in self._tasks[1:]:
            t.cancel()
        followers = [t for w in self._watches.values() for t in (w.follow, w.sender) if t is not None]
        followers += self._senders  # also those of forgotten runners, still delivering a last report
        for t in followers:
            t.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker.shutdown()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.endpoint is not None:
            await self.endpoint.close()

    async def __aenter__(self) -> RunnerHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _register(self, client: Client | None = None) -> None:
        from sluice.hosts.registry_client import register

        while True:
            try:
                result = await register(client or self.client, self.registration)
                break
            except Exception as e:  # noqa: BLE001 - e.g. the server is still starting
                log.warning("host %s: registration failed (%s); retrying", self.config.host_id, e)
                await asyncio.sleep(REGISTER_RETRY_S)
        self.registered = True
        if result.declared_lost:
            log.warning(
                "host %s had been declared lost: its jobs recovered elsewhere; stopping its leftover runners",
                self.config.host_id,
            )
            await self.stop_all_runners()

    async def _registry_check_loop(self) -> None:
        """Re-register when the registry no longer lists this host; stop every runner when
        Temporal has been out of reach for SELF_FENCE_S (see both constants)."""
        from sluice.hosts.registry_client import list_hosts

        last_contact = time.monotonic()
        fenced = False
        client: Client | None = self.client
        while not self._closing:
            await asyncio.sleep(REGISTRY_CHECK_S)
            try:
                if client is None:
                    # A fresh connection: the old one may sit in a long reconnect backoff after
                    # a partition, and the heal must be noticed at once.
                    config = self.client.config()
                    config["service_client"] = await ServiceClient.connect(self.client.service_client.config)
                    client = Client(**config)
                hosts = await list_hosts(client, timeout_s=REGISTRY_CHECK_S * 2)
            except Exception as e:  # noqa: BLE001 - unreachable: count the time, try again
                client = None
                out_of_reach = time.monotonic() - last_contact
                if out_of_reach >= SELF_FENCE_S and not fenced:
                    log.warning(
                        "host %s: Temporal out of reach for %.0f s (%s): lease lost, stopping its runners",
                        self.config.host_id, out_of_reach, e,
                    )
                    fenced = True
                    await self.stop_all_runners()
                continue
            last_contact = time.monotonic()
            fenced = False
            mine = [h for h in hosts if h.host_id == self.config.host_id]
            self._reserved_jobs = set(mine[0].jobs) if mine else set()
            if not self._closing and not mine:
                await self._register(client)

    async def _closed_jobs_loop(self) -> None:
        while True:
            await asyncio.sleep(CLOSED_JOBS_CHECK_S)
            try:
                await self.stop_runners_of_closed_jobs()
            except Exception as e:  # noqa: BLE001 - Temporal unreachable: the next round tries again
                log.warning("host %s: checking for closed jobs failed (retried): %s", self.config.host_id, e)

    async def stop_runners_of_closed_jobs(self) -> list[str]:
        """Stop the runners (and release the slots) of every job here whose workflow is closed;
        returns those jobs. A job that continued as new is open (its latest run is)."""
        from sluice.hosts.registry_client import release

        closed: list[str] = []
        running_here = {w.job_id for w in self._watches.values() if not w.ended and not w.stopping}
        for job_id in sorted(running_here | self._reserved_jobs):
            try:
                desc = await self.client.get_workflow_handle(job_id).describe()
            except RPCError as e:
                if e.status != RPCStatusCode.NOT_FOUND:
                    raise
                status_name = "gone"  # deleted, or past its retention
            else:
                if desc.status == WorkflowExecutionStatus.RUNNING:
                    continue
                status_name = desc.status.name.lower() if desc.status else "closed"
            log.warning("host %s: job %s is %s without having stopped its runners here: stopping them",
                        self.config.host_id, job_id, status_name)  # fmt: skip
            await self._stop(HostStopInput(job_id=job_id, grace_s=0.0))
            await release(self.client, ReleaseRequest(job_id=job_id))
            self._reserved_jobs.discard(job_id)
            closed.append(job_id)
        return closed

    async def stop_all_runners(self) -> int:
        for w in self._watches.values():
            w.stopping = True
        stopped = 0
        root = runners_dir(self.state_dir)
        if root.is_dir():
            for job_dir in root.iterdir():
                stopped += await self.scheduler.stop_runners(unquote(job_dir.name))
        return stopped

    # ---------------------------------------------------------------------------- activities

    @activity.defn(name=HOST_START_RUNNERS)
    async def host_start_runners(self, inp: HostStartInput) -> list[RunnerInfo]:
        """Start runners first_index.. of (job, generation) here, once older generations of the
        job on this host are stopped; returns them (with this host's id) once all serve."""
        await self._stop(HostStopInput(job_id=inp.job_id, below_generation=inp.generation))
        in_use = self._runners_in_use(exclude_job=None)
        if in_use + inp.count > self.config.slots:
            raise ApplicationError(
                f"host {self.config.host_id} has {self.config.slots - in_use} of {self.config.slots} "
                f"runner slots free, {inp.count} asked"
            )
        hang = min(self.config.hang_timeout_s, inp.hang_timeout_s or self.config.hang_timeout_s)
        self._hang_timeouts[(inp.job_id, inp.generation)] = hang
        try:
            infos = await self.scheduler.start_runners(
                inp.job_id, inp.generation, inp.count, inp.slots_per_runner, inp.startup_timeout_s,
                first_index=inp.first_index,
            )
        except RunnerStartError as e:
            raise ApplicationError(
                f"runners of generation {inp.generation} did not start on host {self.config.host_id}: {e}"
            ) from None
        return [i.model_copy(update={"host_id": self.config.host_id}) for i in infos]

    @activity.defn(name=HOST_STOP_RUNNERS)
    async def host_stop_runners(self, inp: HostStopInput) -> int:
        """Stop the job's runners here (all, one generation, or those below one); idempotent."""
        return await self._stop(inp)

    async def _stop(self, inp: HostStopInput) -> int:
        for w in self._watches.values():
            if w.job_id == inp.job_id and _matches(w.generation, inp):
                w.stopping = True
        grace: dict[str, Any] = {} if inp.grace_s is None else {"grace_s": inp.grace_s}
        return await self.scheduler.stop_runners(
            inp.job_id, generation=inp.generation, below_generation=inp.below_generation, **grace
        )

    @activity.defn(name=HOST_LEASE)
    async def host_lease(self, host_id: str) -> str:
        """Held for as long as this host lives: its heartbeats are the host's liveness. Returns
        when the host shuts down. If the registry ends it (a new lease, a new registry run, or
        the host was declared lost), the host asks the registry where it stands."""
        if host_id != self.config.host_id:
            raise ApplicationError(
                f"lease for host {host_id} reached host {self.config.host_id}", non_retryable=True
            )
        try:
            while not self._closing:
                activity.heartbeat(
                    {"host_id": self.config.host_id, "slots": self.config.slots, "in_use": self._runners_in_use()}
                )
                await asyncio.sleep(HOST_HEARTBEAT_EVERY_S)
        except asyncio.CancelledError:
            if not self._closing and (self._recheck is None or self._recheck.done()):
                self._recheck = asyncio.create_task(self._recheck_after_lease())
            raise
        return "host shut down"

    async def _recheck_after_lease(self) -> None:
        await asyncio.sleep(LOST_RECHECK_S)
        if not self._closing:
            await self._register()

    def _runners_in_use(self, exclude_job: str | None = None) -> int:
        return sum(
            1 for w in self._watches.values() if not w.ended and not w.stopping and w.job_id != exclude_job
        )

    # ---------------------------------------------------------------------------- watching

    async def _watch_loop(self) -> None:
        while True:
            try:
                self._scan()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad file
                log.exception("host %s: runner scan failed", self.config.host_id)
            # A broken event stream (most often a process that just died) scans again at once.
            try:
                await asyncio.wait_for(self._scan_now.wait(), WATCH_SCAN_S)
            except TimeoutError:
                pass
            self._scan_now.clear()

    def _scan(self) -> None:
        """Follow runners that appeared; report those whose process is gone."""
        root = runners_dir(self.state_dir)
        seen: set[tuple[str, int, str]] = set()
        if root.is_dir():
            for job_dir in root.iterdir():
                job_id = unquote(job_dir.name)
                for info in self.scheduler.runner_infos(job_id):
                    gen = info.generation
                    key = (job_id, gen, info.runner_id)
                    seen.add(key)
                    if key not in self._watches:
                        self._follow(job_id, gen, info)
        for key, w in list(self._watches.items()):
            if w.ended or w.stopping:
                # Remembered while its info file exists, so a dead runner is reported once.
                if key not in seen:
                    self._forget(w)
                continue
            assert w.info.pid is not None
            if not is_runner_process(w.info.pid, w.job_id, w.generation, started_ticks=w.info.started_ticks):
                code = self.scheduler.exit_code(w.info.pid)
                how = f"exited with code {code}" if code is not None else "exited"
                self._lost(w, f"{_who(w, self.config.host_id)} {how}")

    def _follow(self, job_id: str, generation: int, info: RunnerInfo) -> None:
        hang = self._hang_timeouts.get((job_id, generation), self.config.hang_timeout_s)
        w = RunnerWatch(job_id=job_id, generation=generation, info=info, hang_timeout_s=hang)
        self._watches[w.key] = w
        w.follow = asyncio.create_task(self._follow_events(w), name=f"follow-{info.runner_id}")
        w.sender = asyncio.create_task(self._send_reports(w), name=f"report-{info.runner_id}")
        self._senders.add(w.sender)
        w.sender.add_done_callback(self._senders.discard)

    def _forget(self, w: RunnerWatch) -> None:
        self._watches.pop(w.key, None)
        if w.follow is not None:
            w.follow.cancel()
        # The sender finishes what is queued (a loss must reach the job), then ends.
        w.outbox.put_nowait(_END)

    async def _follow_events(self, w: RunnerWatch) -> None:
        token = runner_token(self.secret, w.job_id, w.generation)
        try:
            while True:
                try:
                    async with RunnerClient(w.info, w.job_id, token) as client:
                        async for event in client.events(heartbeat_timeout_s=w.hang_timeout_s):
                            self._on_event(w, event)
                except RunnerSilent:
                    # Reported, and followed on: a job still starting its tasks ignores silence
                    # (its start has its own timeout), and a runner that speaks again is watched.
                    if not w.ended and not w.stopping:
                        message = (
                            f"{_who(w, self.config.host_id)} sent nothing for {w.hang_timeout_s:g} s "
                            "(hung, stopped or cut off)"
                        )
                        w.outbox.put_nowait(self._report(w, "lost", tasks={}, message=message,
                                                         ran=sorted(w.sent_tasks), hung=True))  # fmt: skip
        except (RunnerUnavailable, RunnerRefused) as e:
            # A process that exited is reported by the scan, with its exit code; give it the time.
            self._scan_now.set()
            await asyncio.sleep(2 * WATCH_SCAN_S)
            if not w.ended and not w.stopping:
                self._lost(w, f"{_who(w, self.config.host_id)} is unreachable: {e}")

    def _on_event(self, w: RunnerWatch, event: RunnerEvent) -> None:
        if event.kind == "heartbeat" and event.metrics is not None:
            w.heartbeats.add(event.metrics)
        if w.ended or w.stopping:
            return
        changed: dict[str, str] = {}
        if event.tasks:
            # A failure goes to the job only with its details (the task_failed event, which the
            # runner also replays after `hello`): a bare "failed" state seen first in a heartbeat
            # would make the job recover from a failure that is not retryable.
            changed.update({k: v for k, v in event.tasks.items() if v != "failed" and w.sent_tasks.get(k) != v})
        if event.subtask is not None:
            state = _EVENT_STATES.get(event.kind)
            if state is not None and w.sent_tasks.get(event.subtask.label()) != state:
                changed[event.subtask.label()] = state
        w.sent_tasks.update(changed)
        if event.kind == "task_failed":
            w.outbox.put_nowait(
                self._report(
                    w, "task_failed", tasks=changed,
                    message=event.message or f"subtask {event.subtask} failed",
                    retryable=event.retryable, domain=event.domain,
                    operator=event.operator, traceback=event.traceback,
                )
            )
        elif changed:
            w.outbox.put_nowait(self._report(w, "tasks", tasks=changed))

    def _lost(self, w: RunnerWatch, message: str) -> None:
        if w.ended or w.stopping:
            return
        w.ended = True
        log.warning("host %s: job %s generation %d: %s", self.config.host_id, w.job_id, w.generation, message)
        labels = sorted(w.sent_tasks)
        w.outbox.put_nowait(self._report(w, "lost", tasks={}, message=message, ran=labels))
        if w.follow is not None and w.follow is not asyncio.current_task():
            w.follow.cancel()

    def _report(self, w: RunnerWatch, kind: str, *, tasks: dict[str, str], ran: list[str] | None = None,
                **fields: Any) -> RunnerReport:  # fmt: skip
        return RunnerReport(
            job_id=w.job_id, generation=w.generation, runner_id=w.info.runner_id,
            host_id=self.config.host_id, kind=kind, tasks=tasks, ran=ran or [], **fields,
        )  # fmt: skip

    async def _send_reports(self, w: RunnerWatch) -> None:
        """Send the runner's reports to its job, in order; consecutive task changes coalesce."""
        handle = self.client.get_workflow_handle(w.job_id)
        while True:
            report = await w.outbox.get()
            if report is _END:
                return
            if report.kind == "tasks":
                await asyncio.sleep(REPORT_COALESCE_S)
                while not w.outbox.empty():
                    nxt = w.outbox.get_nowait()
                    if nxt.kind != "tasks":
                        await self._signal(handle, w, report)
                        report = nxt
                        if nxt is _END:
                            return
                        break
                    report.tasks.update(nxt.tasks)
            await self._signal(handle, w, report)

    async def _signal(self, handle: Any, w: RunnerWatch, report: RunnerReport) -> None:
        delay = REPORT_RETRY_INITIAL_S
        while True:
            try:
                await handle.signal(SIGNAL_RUNNER_REPORT, report)
                return
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:
                    return  # the job closed: nobody to tell
                log.warning("host %s: report to job %s failed (%s); retrying", self.config.host_id, w.job_id, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, REPORT_RETRY_MAX_S)


_END: Any = RunnerReport(job_id="", generation=0, runner_id="", host_id="", kind="tasks")
"""Marks the end of a watch's outbox."""

_EVENT_STATES = {
    "task_started": "running",
    "source_finished": "source_finished",
    "task_finished": "finished",
    "task_failed": "failed",
}


def _matches(generation: int, inp: HostStopInput) -> bool:
    if inp.generation is not None and generation != inp.generation:
        return False
    return inp.below_generation is None or generation < inp.below_generation


def _who(w: RunnerWatch, host_id: str) -> str:
    pid = f"pid {w.info.pid} " if w.info.pid else ""
    return f"runner {w.info.runner_id} ({pid}on host {host_id})"
