"""JobClient: the typed, async way to start and steer sluice jobs.

Everything here is a thin layer over the Temporal client: a job is the `JobWorkflow` whose
workflow id is the job id, commands are the workflow's `patch` update (validated before it enters
history, so a bad command fails here, not later), reads are its `status` query and
`wait_for_state` update, and listing uses the `JobState` / `PipelineName` search attributes.

What the client adds over raw Temporal calls:
- connection settings follow Temporal's environment configuration (TEMPORAL_ADDRESS,
  TEMPORAL_NAMESPACE, TLS, TEMPORAL_API_KEY, config profiles) and always use the pydantic data
  converter that the worker uses;
- closed jobs: a Stopped or Failed job is resumed (`restart`, or `patch` with `stop: none`) by
  starting a new run under the same workflow id from the previous run's spec; the workflow
  restores the latest checkpoint itself;
- errors are typed (`JobNotFound`, `JobClosed`, `JobAlreadyRunning`, `JobFailedError`,
  `ServerUnavailable`) with messages fit to show a user as they are.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from sluice.models import (
    MAX_DURATION_S,
    SEARCH_ATTRIBUTE_PIPELINE,
    SEARCH_ATTRIBUTE_STATE,
    TASK_QUEUE,
    TERMINAL_STATES,
    WORKFLOW_TYPE,
    Failure,
    JobInput,
    JobResult,
    JobSpec,
    JobStatus,
    PatchRequest,
    RescaleCommand,
    RestartCommand,
    SavepointInfo,
    SavepointRequest,
    StopMode,
    UpgradeDecision,
    UpgradeRequest,
    UpgradeStatus,
    WaitForStateRequest,
)

T = TypeVar("T")

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
CONNECT_TIMEOUT_S = 10.0

# Workflow names (the contract with sluice/workflows).
UPDATE_PATCH = "patch"
UPDATE_WAIT_FOR_STATE = "wait_for_state"
UPDATE_SAVEPOINT = "savepoint"
UPDATE_UPGRADE = "upgrade"
UPDATE_APPROVE_UPGRADE = "approve_upgrade"
QUERY_STATUS = "status"
ERROR_TYPE_JOB_FAILED = "JobFailed"
ERROR_TYPE_CONTINUED_AS_NEW = "ContinuedAsNew"
ERROR_TYPE_JOB_CLOSED = "JobClosed"
ERROR_TYPE_WAIT_TIMED_OUT = "WaitTimedOut"

STATE_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_STATE)
PIPELINE_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_PIPELINE)

# A query needs a worker to run the workflow code; without one the server holds the call until its
# deadline, so bound it and say what is missing instead of hanging.
QUERY_TIMEOUT_S = 10.0
# Reading a closed run's status is a convenience on the way to a decision; don't wait long for it.
CLOSED_QUERY_TIMEOUT_S = 3.0
# A command (the `patch` update) waits for a worker to accept it; without one it would wait forever.
COMMAND_TIMEOUT_S = 60.0
# Back-off between attempts when the workflow moves under us (continue-as-new, run closing).
RETRY_PAUSE_S = 0.2

STOP_MODES: tuple[str, ...] = ("none", "checkpoint", "graceful", "immediate", "force")

# Closed-workflow statuses that are not job states (someone ended the workflow from outside).
_OUTSIDE_CLOSE_NAMES: dict[WorkflowExecutionStatus, str] = {
    WorkflowExecutionStatus.TERMINATED: "Terminated",
    WorkflowExecutionStatus.CANCELED: "Canceled",
    WorkflowExecutionStatus.TIMED_OUT: "TimedOut",
}
# Final states from which a new run (restoring the last checkpoint) may be started.
RESUMABLE_STATES: frozenset[str] = frozenset({"Stopped", "Failed", *_OUTSIDE_CLOSE_NAMES.values()})


# ------------------------------------------------------------------------------------ errors


class SluiceClientError(Exception):
    """Base of the client's errors; `str(err)` is a complete message for a user."""


class ServerUnavailable(SluiceClientError):
    """No Temporal frontend answered at the configured address."""


class JobNotFound(SluiceClientError):
    """No workflow with this job id exists in the namespace."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class JobAlreadyRunning(SluiceClientError):
    """`start` was asked for a job id whose workflow is open."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is already running")
        self.job_id = job_id


class JobClosed(SluiceClientError):
    """The command needs an open job, but the job's workflow has closed in `state`."""

    def __init__(self, job_id: str, state: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class JobFailedError(SluiceClientError):
    """The job reached Failed (while it was being waited for)."""

    def __init__(self, job_id: str, failure: Failure) -> None:
        super().__init__(f"job {job_id} failed ({failure.domain} error): {failure.message}")
        self.job_id = job_id
        self.failure = failure


class CommandRejected(SluiceClientError):
    """The workflow refused a command (its update validator or handler raised)."""


class JobListing(NamedTuple):
    """One row of `JobClient.list`."""

    job_id: str
    state: str
    pipeline_name: str


# ------------------------------------------------------------------------------------ connect


async def connect(address: str | None = None, namespace: str | None = None, *, profile: str | None = None) -> Client:
    """A Temporal client for sluice, configured like every Temporal tool.

    Settings come from Temporal's environment configuration (`temporalio.envconfig`: the
    TEMPORAL_CONFIG_FILE profile, then TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_TLS*,
    TEMPORAL_API_KEY, ...); explicit `address` / `namespace` win; defaults are localhost:7233 and
    "default". The data converter is always pydantic's, as on the worker. Raises
    `ServerUnavailable` with the address when nothing answers.
    """
    from temporalio.envconfig import ClientConfig

    try:
        cfg: dict[str, Any] = dict(ClientConfig.load_client_connect_config(profile=profile))
    except Exception as exc:  # a malformed config file is a user error worth naming
        raise SluiceClientError(f"invalid Temporal environment configuration: {exc}") from exc
    target = address or cfg.pop("target_host", None) or DEFAULT_ADDRESS
    cfg.pop("target_host", None)
    cfg["namespace"] = namespace or cfg.get("namespace") or DEFAULT_NAMESPACE
    try:
        return await asyncio.wait_for(
            Client.connect(target, data_converter=pydantic_data_converter, **cfg), timeout=CONNECT_TIMEOUT_S
        )
    except (TimeoutError, RuntimeError, RPCError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServerUnavailable(
            f"cannot reach Temporal at {target} (namespace {cfg['namespace']}): {detail}; "
            "start one with `sluice server` or set TEMPORAL_ADDRESS"
        ) from exc


async def server_reachable(address: str, namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 2.0) -> bool:
    """True when a Temporal frontend answers at `address` within `timeout_s`."""
    try:
        await asyncio.wait_for(Client.connect(address, namespace=namespace), timeout=timeout_s)
        return True
    except Exception:
        return False


def pipeline_summary(spec: JobSpec) -> str:
    """One line for the Web UI's static summary: the pipeline name and its operators in order."""
    ops = " → ".join(f"{op.id} ({op.type})" for op in spec.pipeline.operators)
    return f"{spec.pipeline.name}: {ops}"


def _failure_from(exc: BaseException | None) -> Failure | None:
    """The job's Failure carried by a JobFailed ApplicationError anywhere in `exc`'s cause chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ApplicationError) and exc.type == ERROR_TYPE_JOB_FAILED:
            if exc.details:
                detail = exc.details[0]
                try:
                    return Failure.model_validate(detail if isinstance(detail, dict) else dict(detail))
                except Exception:
                    pass
            return Failure(message=exc.message)
        exc = exc.__cause__
        seen += 1
    return None


def _application_error(exc: BaseException | None) -> ApplicationError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ApplicationError):
            return exc
        exc = exc.__cause__
        seen += 1
    return None


def _reraise_if_cancelling() -> None:
    """Raise CancelledError if the current task is being cancelled (so cancellation is not lost)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# ------------------------------------------------------------------------------------ client


class JobClient:
    """Typed async client for sluice jobs (one `JobWorkflow` per job; workflow id = job id).

    Every method addresses the job's latest run, so it keeps working across continue-as-new and
    across resumptions of a stopped job.
    """

    def __init__(
        self, client: Client, *, task_queue: str = TASK_QUEUE, command_timeout_s: float = COMMAND_TIMEOUT_S
    ) -> None:
        self.client = client
        self.task_queue = task_queue
        self.command_timeout_s = command_timeout_s

    @classmethod
    async def connect(cls, address: str | None = None, namespace: str | None = None) -> JobClient:
        """`connect()` and wrap the result."""
        return cls(await connect(address, namespace))

    # -------------------------------------------------------------- helpers

    def _handle(self, job_id: str, run_id: str | None = None) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(job_id, run_id=run_id)

    async def _result(self, job_id: str, run_id: str) -> JobResult:
        """The JobResult a completed run returned."""
        handle: WorkflowHandle[Any, JobResult] = self.client.get_workflow_handle(
            job_id, run_id=run_id, result_type=JobResult
        )
        return await handle.result(follow_runs=False)

    async def describe(self, job_id: str) -> WorkflowExecutionDescription:
        """The latest run's description; `JobNotFound` if the id never ran."""
        try:
            return await self._handle(job_id).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise JobNotFound(job_id) from exc
            raise

    async def final_state(self, job_id: str, desc: WorkflowExecutionDescription | None = None) -> str | None:
        """The job's final state if its latest run is closed, else None.

        The JobState search attribute (upserted on the terminal transition) is the source; when
        the workflow was closed from outside (terminated, cancelled, timed out) the Temporal
        status name is returned instead, since the job never reached a terminal state.
        """
        desc = desc or await self.describe(job_id)
        status = desc.status
        if status in (None, WorkflowExecutionStatus.RUNNING):
            return None
        if status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
            # Only seen in a race with the successor's creation: the job is open.
            return None
        if status in _OUTSIDE_CLOSE_NAMES:
            return _OUTSIDE_CLOSE_NAMES[status]
        if status == WorkflowExecutionStatus.FAILED:
            return "Failed"
        state = desc.typed_search_attributes.get(STATE_KEY)
        if state in TERMINAL_STATES:
            return state
        try:  # COMPLETED without the attribute: the result says which terminal state
            result = await self._result(job_id, desc.run_id)
            return str(result.state)
        except Exception:
            return "Finished"

    async def _job_input(self, job_id: str, run_id: str) -> JobInput:
        """The JobInput of a run: the first history event's input."""
        handle = self._handle(job_id, run_id)
        async for event in handle.fetch_history_events():
            if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                break
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            value: JobInput
            (value,) = await self.client.data_converter.decode(payloads, [JobInput])
            return value
        raise SluiceClientError(f"job {job_id}: cannot read the input of run {run_id}")

    async def spec(self, job_id: str, run_id: str | None = None) -> JobSpec:
        """The spec run `run_id` (default: the latest run) of the job was started with: its
        pipeline, config and checkpoint store.

        Commands change the config afterwards (rescale, checkpoint interval): `status().config`
        is the current one. Raises `JobNotFound` for an unknown id.
        """
        if run_id is None:
            run_id = (await self.describe(job_id)).run_id
        return (await self._job_input(job_id, run_id)).spec

    async def _failure(self, job_id: str, run_id: str) -> Failure:
        """The failure a closed, Failed run ended with."""
        try:
            await self._handle(job_id, run_id).result()
        except WorkflowFailureError as exc:
            return _failure_from(exc.cause) or Failure(message=str(exc.cause or exc))
        return Failure(message="the workflow failed without a failure message")

    # -------------------------------------------------------------- start / resume

    async def start(self, spec: JobSpec) -> str:
        """Start `spec` as a new job (or a new run of a closed one); returns the job id.

        Raises `JobAlreadyRunning` if a run with this id is open. A closed id may be reused: the
        new run starts from `spec` as given (set `config.ignore_state` to not restore state).
        """
        try:
            await self.client.start_workflow(
                WORKFLOW_TYPE,
                JobInput(spec=spec),
                id=spec.job_id,
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(STATE_KEY, "Created"),
                        SearchAttributePair(PIPELINE_KEY, spec.pipeline.name),
                    ]
                ),
                static_summary=pipeline_summary(spec),
                static_details=(
                    f"**{spec.pipeline.name}**, parallelism {spec.config.parallelism or spec.pipeline.parallelism}, "
                    f"checkpoint every {spec.config.checkpoint_interval_s:g} s"
                ),
            )
        except WorkflowAlreadyStartedError as exc:
            raise JobAlreadyRunning(spec.job_id) from exc
        return spec.job_id

    async def resume(
        self,
        job_id: str,
        *,
        spec: JobSpec | None = None,
        ignore_state: bool = False,
        patch: PatchRequest | None = None,
        restore_epoch: int | None = None,
    ) -> str:
        """Start a new run of a closed job that restores its latest checkpoint (unless `ignore_state`),
        or checkpoint `restore_epoch` (abandoning the later ones) when given.

        The spec is `spec` if given, else the previous run's input with the config it had at the
        end (from its `status` query when a worker answers). `config.stop` is reset to "none"
        and `patch`'s config fields are applied. Raises `JobClosed` for a Finished job unless
        `ignore_state` (its sources are done; restoring would produce nothing), and
        `JobAlreadyRunning` if the job is open.
        """
        if restore_epoch is not None and (ignore_state or restore_epoch < 1):
            raise ValueError("restore_epoch must be an epoch >= 1, and cannot be combined with ignore_state")
        desc = await self.describe(job_id)
        state = await self.final_state(job_id, desc)
        if state is None:
            raise JobAlreadyRunning(job_id)
        if state not in RESUMABLE_STATES and not ignore_state and spec is None:
            raise JobClosed(
                job_id,
                state,
                f"job {job_id} is already {state}; its sources are done, so there is nothing to resume "
                "(restart it with ignore_state to run it from the beginning)",
            )
        if spec is None:
            spec = (await self._job_input(job_id, desc.run_id)).spec
            try:  # the config the job had at the end includes commands applied during the run
                final = await self._handle(job_id, desc.run_id).query(
                    QUERY_STATUS, result_type=JobStatus, rpc_timeout=timedelta(seconds=CLOSED_QUERY_TIMEOUT_S)
                )
                spec = spec.model_copy(update={"config": final.config})
            except Exception:
                pass  # no worker, or the query failed: the run's input config is the best we have
        updates: dict[str, Any] = {"stop": "none", "ignore_state": ignore_state, "restore_epoch": restore_epoch}
        if patch is not None:
            for field in ("parallelism", "overrides", "checkpoint_interval_s", "ttl_s"):
                value = getattr(patch, field)
                if value is not None:
                    updates[field] = value
        config = spec.config.model_copy(update=updates)
        spec = spec.model_copy(
            update={"job_id": job_id, "config": type(spec.config).model_validate(config.model_dump())}
        )
        return await self.start(spec)

    # -------------------------------------------------------------- commands

    async def patch(self, job_id: str, request: PatchRequest) -> JobStatus | None:
        """Apply `request` (the `patch` update) and return the job's status after it was accepted.

        On a closed job, `stop: none` or a restart starts a new run that restores the latest
        checkpoint (see `resume`) and returns None (the new run's status comes from its worker:
        use `status` or `wait_for_state`); anything else raises `JobClosed`. Gives up (an error
        naming the job's state) when the job neither accepts the command nor closes in time.
        """
        deadline = time.monotonic() + self.command_timeout_s
        while True:
            if time.monotonic() > deadline:
                raise SluiceClientError(
                    f"job {job_id} is closing but did not close within {self.command_timeout_s:g} s; "
                    "try again, or see `sluice status`"
                )
            desc = await self.describe(job_id)
            state = await self.final_state(job_id, desc)
            if state is not None:
                return await self._patch_closed(job_id, state, request)
            try:
                return await asyncio.wait_for(
                    self._handle(job_id).execute_update(UPDATE_PATCH, request, result_type=JobStatus),
                    timeout=self.command_timeout_s,
                )
            except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
                _reraise_if_cancelling()
                raise SluiceClientError(
                    f"job {job_id}: no controller worker accepted the command within "
                    f"{self.command_timeout_s:g} s (is `sluice worker` running?); it may still be "
                    "applied when a worker picks it up"
                ) from None
            except WorkflowUpdateFailedError as exc:
                app = _application_error(exc.cause)
                # Continued as new, or reached a terminal state and is closing: ask the next run,
                # or handle it as a closed job once it has closed.
                if app is not None and app.type in (ERROR_TYPE_CONTINUED_AS_NEW, ERROR_TYPE_JOB_CLOSED):
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                raise CommandRejected(f"job {job_id}: {app.message if app else exc.cause or exc}") from exc
            except RPCError as exc:
                # The run closed (or continued as new) between describe and update: look again.
                if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                raise

    async def _patch_closed(self, job_id: str, state: str, request: PatchRequest) -> JobStatus | None:
        resumes = request.stop == "none" or request.restart is not None
        if not resumes:
            verb = "stop" if request.stop is not None else "change"
            raise JobClosed(job_id, state, f"job {job_id} is already {state}; nothing to {verb}")
        ignore = request.restart.ignore_state if request.restart else False
        await self.resume(job_id, ignore_state=ignore, patch=request)
        return None

    async def stop(self, job_id: str, mode: StopMode | str = "checkpoint") -> JobStatus | None:
        """Ask the job to stop in `mode` (none|checkpoint|graceful|immediate|force).

        Returns once the workflow accepted the command (not when the job has stopped: use
        `wait_for_state`). `mode` "none" resumes a Stopped job. Raises `ValueError` for an
        unknown mode, `JobClosed` if the job already ended ("job X is already Finished; nothing
        to stop").
        """
        if mode not in STOP_MODES:
            raise ValueError(f"unknown stop mode {mode!r}; expected one of {', '.join(STOP_MODES)}")
        return await self.patch(job_id, PatchRequest(stop=mode))

    async def rescale(
        self, job_id: str, parallelism: int | None = None, overrides: dict[str, int] | None = None
    ) -> JobStatus | None:
        """Change the default parallelism and/or per-operator overrides (checkpoint, reschedule)."""
        cmd = RescaleCommand(parallelism=parallelism, overrides=overrides)  # validates: one of them
        desc = await self.describe(job_id)
        state = await self.final_state(job_id, desc)
        if state is not None:
            raise JobClosed(job_id, state, f"job {job_id} is already {state}; nothing to rescale")
        return await self.patch(job_id, PatchRequest(parallelism=cmd.parallelism, overrides=cmd.overrides))

    async def restart(
        self, job_id: str, force: bool = False, ignore_state: bool = False, restore_epoch: int | None = None
    ) -> JobStatus | None:
        """Restart the job: an open one through the `patch` update (safe: final checkpoint first,
        or `force`); a closed Stopped/Failed one by starting a new run that restores its latest
        checkpoint (returns None then). `ignore_state` starts from scratch.

        `restore_epoch` (closed Stopped/Failed jobs only) restores that older checkpoint instead,
        e.g. when the latest is corrupt; checkpoints after it are abandoned, and output committed
        after it is written again.
        """
        if restore_epoch is not None:
            if force or ignore_state:
                raise ValueError("restore_epoch cannot be combined with force or ignore_state")
            if await self.final_state(job_id) is None:
                raise CommandRejected(
                    f"job {job_id} is open; restoring epoch {restore_epoch} needs a Stopped or Failed job "
                    "(stop it first)"
                )
            await self.resume(job_id, restore_epoch=restore_epoch)
            return None
        return await self.patch(job_id, PatchRequest(restart=RestartCommand(force=force, ignore_state=ignore_state)))

    # -------------------------------------------------------------- reads

    async def savepoint(self, job_id: str, name: str | None = None) -> SavepointInfo:
        """Take a savepoint of a Running job (a checkpoint kept under `name`, by default
        `savepoint-<epoch>`, until disposed); returns once it is in the store. Raises
        `CommandRejected` when the job is not Running, the name is taken, or the checkpoint failed."""
        info: SavepointInfo = await self._update(
            job_id, UPDATE_SAVEPOINT, SavepointRequest(name=name), SavepointInfo, "a savepoint needs a Running job"
        )
        return info

    async def upgrade(self, job_id: str, request: UpgradeRequest) -> UpgradeStatus:
        """Upgrade a Running job to `request.pipeline`, keeping its state (docs/upgrades.md).
        Returns once the new generation runs (its health window began) or, with
        `require_approval`, once the upgrade waits for `approve_upgrade`. Raises `CommandRejected`
        when refused (each incompatible operator named), rejected or abandoned."""
        status: UpgradeStatus = await self._update(
            job_id, UPDATE_UPGRADE, request, UpgradeStatus, "an upgrade needs a Running job"
        )
        return status

    async def decide_upgrade(self, job_id: str, approve: bool, reason: str | None = None) -> UpgradeStatus:
        """Approve (then returns once the new generation runs) or reject the waiting upgrade."""
        status: UpgradeStatus = await self._update(
            job_id, UPDATE_APPROVE_UPGRADE, UpgradeDecision(approve=approve, reason=reason), UpgradeStatus,
            "no upgrade is waiting for approval",
        )  # fmt: skip
        return status

    async def _update(self, job_id: str, name: str, arg: Any, result_type: type[T], closed: str) -> T:
        """Run update `name` on the job's open run; errors as the user should read them."""
        await self.describe(job_id)  # JobNotFound for an unknown id
        try:
            result: T = await self._handle(job_id).execute_update(name, arg, result_type=result_type)
            return result
        except WorkflowUpdateFailedError as exc:
            app = _application_error(exc.cause)
            raise CommandRejected(f"job {job_id}: {app.message if app else exc.cause or exc}") from exc
        except RPCError as exc:
            if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                state = await self.final_state(job_id)
                raise JobClosed(job_id, state or "closed", f"job {job_id} is {state or 'closed'}; {closed}") from exc
            raise

    async def status(self, job_id: str, *, timeout_s: float = QUERY_TIMEOUT_S) -> JobStatus:
        """The `status` query of the latest run (open or closed; needs a controller worker)."""
        handle = self._handle(job_id)
        try:
            status: JobStatus = await handle.query(
                QUERY_STATUS, result_type=JobStatus, rpc_timeout=timedelta(seconds=timeout_s)
            )
            return status
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise JobNotFound(job_id) from exc
            state = await self.final_state(job_id)
            where = f"job {job_id} is {state}" if state else f"job {job_id} is open"
            raise SluiceClientError(
                f"{where}, but its status could not be queried ({exc.message or exc.status.name}); "
                "is a controller worker (`sluice worker`) running?"
            ) from exc
        except WorkflowQueryFailedError as exc:
            raise SluiceClientError(f"job {job_id}: status query failed: {exc}") from exc

    async def _closed_status(self, job_id: str, desc: WorkflowExecutionDescription, state: str) -> JobStatus:
        """Status of a closed run: its query if a worker answers, else built from its input/result."""
        try:
            status: JobStatus = await self._handle(job_id, desc.run_id).query(
                QUERY_STATUS, result_type=JobStatus, rpc_timeout=timedelta(seconds=CLOSED_QUERY_TIMEOUT_S)
            )
            return status
        except Exception:
            pass
        spec = (await self._job_input(job_id, desc.run_id)).spec
        epoch = generation = restarts = 0
        failure: Failure | None = None
        if state == "Failed":
            failure = await self._failure(job_id, desc.run_id)
        else:
            try:
                result = await self._result(job_id, desc.run_id)
                epoch, generation, restarts = result.epoch, result.generation, result.restarts
            except Exception:
                pass
        return JobStatus(
            job_id=job_id,
            pipeline_name=spec.pipeline.name,
            state=state if state in TERMINAL_STATES else "Failed",
            generation=generation,
            epoch=epoch,
            restarts=restarts,
            config=spec.config,
            failure=failure,
        )

    async def wait_for_state(
        self, job_id: str, states: list[str] | tuple[str, ...] | str, timeout_s: float | None = None
    ) -> JobStatus:
        """Wait until the job is in one of `states` and return its status (push, not polling).

        Raises `JobFailedError` when the job reaches Failed and Failed was not asked for,
        `JobClosed` when it ended in another state that can never lead to the ones asked for,
        and `TimeoutError` after `timeout_s`. Survives continue-as-new (retries on the new run).
        """
        wanted = [states] if isinstance(states, str) else list(states)
        WaitForStateRequest(states=wanted)  # validates the names before any call
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        async def attempt() -> JobStatus:
            while True:
                desc = await self.describe(job_id)
                state = await self.final_state(job_id, desc)
                if state is not None:
                    if state in wanted:
                        return await self._closed_status(job_id, desc, state)
                    if state == "Failed":
                        raise JobFailedError(job_id, await self._failure(job_id, desc.run_id))
                    raise JobClosed(
                        job_id, state, f"job {job_id} is {state}; it will not reach {' or '.join(wanted)}"
                    )
                # The workflow's side of the wait ends with ours: a waiter that gave up never
                # holds the job open.
                left = remaining()
                request = WaitForStateRequest(
                    states=wanted,
                    timeout_s=None if left is None else min(max(left, 0.001), MAX_DURATION_S),
                )
                try:
                    status: JobStatus = await self._handle(job_id).execute_update(
                        UPDATE_WAIT_FOR_STATE, request, result_type=JobStatus
                    )
                    return status
                except WorkflowUpdateFailedError as exc:
                    failure = _failure_from(exc.cause)
                    if failure is not None:
                        raise JobFailedError(job_id, failure) from exc
                    app = _application_error(exc.cause)
                    if app is not None and app.type in (ERROR_TYPE_CONTINUED_AS_NEW, ERROR_TYPE_JOB_CLOSED):
                        await asyncio.sleep(RETRY_PAUSE_S)
                        continue  # the successor run answers, or the closed run is read above
                    if app is not None and app.type == ERROR_TYPE_WAIT_TIMED_OUT:
                        raise TimeoutError()  # noqa: B904 - the update failure stays the context
                    raise CommandRejected(f"job {job_id}: {app.message if app else exc.cause or exc}") from exc
                except WorkflowUpdateRPCTimeoutOrCancelledError:
                    # Temporal turns our own cancellation (the timeout below) into this error;
                    # otherwise it is the server's long-poll deadline: ask again.
                    _reraise_if_cancelling()
                    continue
                except RPCError as exc:
                    # The run closed or continued as new before the update was accepted.
                    if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                        await asyncio.sleep(RETRY_PAUSE_S)
                        continue
                    raise

        try:
            return await asyncio.wait_for(attempt(), timeout=remaining())
        except (TimeoutError, asyncio.CancelledError) as exc:
            _reraise_if_cancelling()  # a cancellation from our caller stays a cancellation
            raise TimeoutError(
                f"job {job_id} did not reach {' or '.join(wanted)} within {timeout_s:g} s"
            ) from exc

    async def list(self, state: str | None = None) -> list[JobListing]:
        """Jobs in the namespace (latest run of each id), optionally only those in `state`."""
        query = f'WorkflowType="{WORKFLOW_TYPE}"'
        if state is not None:
            if '"' in state or "\\" in state:
                raise ValueError(f"invalid state {state!r}")
            query += f' AND {SEARCH_ATTRIBUTE_STATE}="{state}"'
        rows: list[JobListing] = []
        seen: set[str] = set()
        # Newest first, so the first row of an id is its latest run.
        async for wf in self.client.list_workflows(query):
            if wf.id in seen:
                continue
            seen.add(wf.id)
            rows.append(
                JobListing(
                    job_id=wf.id,
                    state=wf.typed_search_attributes.get(STATE_KEY) or "?",
                    pipeline_name=wf.typed_search_attributes.get(PIPELINE_KEY) or "?",
                )
            )
        return rows
