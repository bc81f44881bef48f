"""Contracts shared by the workflow, the activities, the runners, the client and the CLI.

Everything that crosses a process boundary (Temporal payloads, runner HTTP bodies, checkpoint
manifests, pipeline files) is one of these pydantic models, so a malformed value is rejected with
a message that names the field instead of failing somewhere downstream.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# --------------------------------------------------------------------------------------------
# Names that are public contracts (queries, search attributes, CLI output).

JobStateName = Literal[
    "Created",
    "Compiling",
    "Scheduling",
    "Running",
    "Rescaling",
    "Restarting",
    "CheckpointStopping",
    "Stopping",
    "Finishing",
    "Recovering",
    "Failing",
    "Stopped",
    "Finished",
    "Failed",
]
TERMINAL_STATES: tuple[str, ...] = ("Stopped", "Finished", "Failed")

StopMode = Literal["none", "checkpoint", "graceful", "immediate", "force"]
RestartMode = Literal["safe", "force"]
ErrorDomain = Literal["user", "internal", "external"]

TASK_QUEUE = "sluice"
WORKFLOW_TYPE = "JobWorkflow"
SEARCH_ATTRIBUTE_STATE = "JobState"
SEARCH_ATTRIBUTE_PIPELINE = "PipelineName"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Contract(BaseModel):
    """Base of every contract: unknown fields are errors, so typos are caught at the boundary."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Pipeline files


class OperatorBase(Contract):
    id: str = Field(description="unique operator id within the pipeline")
    parallelism: int | None = Field(default=None, ge=1)
    inputs: list[str] | None = Field(
        default=None, description="upstream operator ids; default: the previous operator"
    )

    @field_validator("id")
    @classmethod
    def _id_is_identifier(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError(f"operator id {v!r} must be letters, digits, '_' or '-'")
        return v


class GeneratorOperator(OperatorBase):
    """Deterministic source: columns split, seq, key, ts, value, a pure function of (split, seq)."""

    type: Literal["generator"]
    splits: int = Field(default=1, ge=1)
    keys: int = Field(default=100, ge=1, description="number of distinct keys")
    limit: int | None = Field(default=None, ge=0, description="records per split; absent = unbounded")
    rate: float | None = Field(
        default=None, gt=0, description="records per second per split; absent = as fast as possible"
    )
    batch_size: int = Field(default=4096, ge=1, le=1_000_000)


def _check_function_ref(v: str) -> str:
    if not _FUNCTION_REF.match(v):
        raise ValueError(f"fn {v!r} must look like 'package.module:function'")
    return v


FunctionRef = Annotated[str, AfterValidator(_check_function_ref)]


class MapOperator(OperatorBase):
    """Calls a Python function `module:function` on each Arrow record batch; returns a batch."""

    type: Literal["map"]
    fn: FunctionRef


class FilterOperator(OperatorBase):
    """Calls `module:function` on each batch; it returns a boolean mask (array) of rows to keep."""

    type: Literal["filter"]
    fn: FunctionRef


class FilesSinkOperator(OperatorBase):
    """Exactly-once file sink: per-epoch staging files, published by the controller's commit phase."""

    type: Literal["files"]
    path: str
    format: Literal["jsonl"] = "jsonl"


OperatorSpec = Annotated[
    Union[GeneratorOperator, MapOperator, FilterOperator, FilesSinkOperator],
    Field(discriminator="type"),
]
SOURCE_TYPES = frozenset({"generator"})
SINK_TYPES = frozenset({"files"})


class PipelineSpec(Contract):
    """A pipeline file (YAML or JSON)."""

    name: str
    parallelism: int = Field(default=1, ge=1)
    operators: list[OperatorSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError(f"pipeline name {v!r} must be letters, digits, '_' or '-'")
        return v

    @model_validator(mode="after")
    def _graph(self) -> "PipelineSpec":
        seen: set[str] = set()
        for i, op in enumerate(self.operators):
            if op.id in seen:
                raise ValueError(f"operators[{i}]: duplicate operator id {op.id!r}")
            if op.type in SOURCE_TYPES:
                if op.inputs:
                    raise ValueError(f"operator {op.id!r}: a {op.type} source takes no inputs")
            elif i == 0 and not op.inputs:
                raise ValueError(f"operator {op.id!r}: the first operator must be a source")
            for up in op.inputs or []:
                if up not in seen:
                    raise ValueError(
                        f"operator {op.id!r}: input {up!r} is not an operator defined before it"
                    )
            seen.add(op.id)
        return self

    def parallelism_for(self, config: "JobConfig") -> dict[str, int]:
        """Each operator's effective parallelism: override, else the job's, else its own, else the pipeline's."""
        return {
            op.id: config.overrides.get(op.id) or config.parallelism or op.parallelism or self.parallelism
            for op in self.operators
        }

    def input_ids(self) -> dict[str, list[str]]:
        """Upstream operator ids of every operator, with the default chain edges filled in."""
        out: dict[str, list[str]] = {}
        prev: str | None = None
        for op in self.operators:
            if op.type in SOURCE_TYPES:
                out[op.id] = []
            else:
                out[op.id] = list(op.inputs) if op.inputs else [prev]  # type: ignore[list-item]
            prev = op.id
        return out


# --------------------------------------------------------------------------------------------
# Job config and commands


class JobConfig(Contract):
    """The job's desired configuration; commands change it and the controller converges to it."""

    stop: StopMode = "none"
    checkpoint_interval_s: float = Field(default=10.0, ge=1.0, le=86_400.0)
    ttl_s: float | None = Field(default=None, gt=0)
    parallelism: int | None = Field(
        default=None, ge=1, description="parallelism of every operator; None = the pipeline's"
    )
    overrides: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    restart_nonce: int = 0
    restart_mode: RestartMode = "safe"
    allowed_restarts: int = Field(default=20, ge=-1, description="-1 = unlimited")
    healthy_duration_s: float = Field(default=120.0, gt=0)
    runner_heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    runner_startup_timeout_s: float = Field(default=60.0, gt=0)
    task_startup_timeout_s: float = Field(default=120.0, gt=0)
    finish_timeout_s: float = Field(default=60.0, gt=0)
    checkpoint_timeout_s: float = Field(default=600.0, gt=0)
    checkpoints_to_keep: int = Field(default=10, ge=1)
    restore_epoch: int | None = Field(default=None, ge=1, description="restore this checkpoint")
    ignore_state: bool = False
    slots_per_runner: int = Field(default=4, ge=1, description="subtasks per runner process")


class ConfigPatch(Contract):
    """Any subset of JobConfig (the `update_config` signal)."""

    stop: StopMode | None = None
    checkpoint_interval_s: float | None = Field(default=None, ge=1.0, le=86_400.0)
    ttl_s: float | None = Field(default=None, gt=0)
    parallelism: int | None = Field(default=None, ge=1)
    overrides: dict[str, Annotated[int, Field(ge=1)]] | None = None
    restart_nonce: int | None = None
    restart_mode: RestartMode | None = None
    allowed_restarts: int | None = Field(default=None, ge=-1)
    healthy_duration_s: float | None = Field(default=None, gt=0)
    runner_heartbeat_timeout_s: float | None = Field(default=None, gt=0)
    runner_startup_timeout_s: float | None = Field(default=None, gt=0)
    task_startup_timeout_s: float | None = Field(default=None, gt=0)
    finish_timeout_s: float | None = Field(default=None, gt=0)
    checkpoint_timeout_s: float | None = Field(default=None, gt=0)
    checkpoints_to_keep: int | None = Field(default=None, ge=1)
    slots_per_runner: int | None = Field(default=None, ge=1)


class StopCommand(Contract):
    mode: StopMode


class RescaleCommand(Contract):
    parallelism: int | None = Field(default=None, ge=1)
    overrides: dict[str, Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _one(self) -> "RescaleCommand":
        if self.parallelism is None and not self.overrides:
            raise ValueError("rescale needs 'parallelism' or 'overrides'")
        return self


class RestartCommand(Contract):
    force: bool = False
    ignore_state: bool = False


class PatchRequest(Contract):
    """The `patch` update: like the reference's PATCH /pipelines/:id."""

    stop: StopMode | None = None
    parallelism: int | None = Field(default=None, ge=1)
    overrides: dict[str, Annotated[int, Field(ge=1)]] | None = None
    checkpoint_interval_s: float | None = Field(default=None, ge=1.0, le=86_400.0)
    ttl_s: float | None = Field(default=None, gt=0)
    restart: RestartCommand | None = None


class WaitForStateRequest(Contract):
    states: list[JobStateName] = Field(min_length=1)


class JobSpec(Contract):
    """Input of a job: what to run and how. The workflow id is `job_id`."""

    job_id: str
    pipeline: PipelineSpec
    config: JobConfig = Field(default_factory=JobConfig)
    checkpoint_url: str | None = Field(
        default=None, description="pyarrow.fs URI or local directory; None = the worker's default"
    )


# --------------------------------------------------------------------------------------------
# Compiled program and runners


class SubtaskRef(Contract):
    """One parallel instance of a chain: `chain` indexes Program.chains."""

    chain: int
    index: int

    def label(self) -> str:
        return f"{self.chain}/{self.index}"


class Chain(Contract):
    """Operators fused into one task (forward edges, equal parallelism)."""

    operators: list[str]
    parallelism: int


class Program(Contract):
    """The physical program: every operator's parameters and parallelism, grouped into chains."""

    name: str
    operators: dict[str, dict[str, Any]]  # id -> operator spec (model_dump of the pipeline's)
    inputs: dict[str, list[str]]
    parallelism: dict[str, int]
    chains: list[Chain]

    def subtasks(self) -> list[SubtaskRef]:
        return [SubtaskRef(chain=c, index=i) for c, ch in enumerate(self.chains) for i in range(ch.parallelism)]


class RunnerInfo(Contract):
    """A runner process of one generation, as its scheduler started it."""

    runner_id: str
    generation: int
    host: str = "127.0.0.1"
    control_port: int
    data_port: int | None = None
    pid: int | None = None
    slots: int

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"


class RunnerAssignment(Contract):
    runner_id: str
    subtasks: list[SubtaskRef]


class StartRequest(Contract):
    """Body of a runner's POST /start: what to run, and the checkpoint to restore."""

    job_id: str
    generation: int
    program: Program
    subtasks: list[SubtaskRef]
    checkpoint_url: str
    restore: "CheckpointManifest | None" = None
    peers: list[RunnerInfo] = Field(default_factory=list)
    assignments: list[RunnerAssignment] = Field(default_factory=list)


class OperatorSnapshot(Contract):
    """What one operator subtask contributed to a checkpoint."""

    state_files: list[str] = Field(default_factory=list)
    commits: list[dict[str, Any]] = Field(default_factory=list)  # pre-committed sink output


class SubtaskSnapshot(Contract):
    subtask: SubtaskRef
    epoch: int
    operators: dict[str, OperatorSnapshot] = Field(default_factory=dict)


class OperatorCheckpoint(Contract):
    parallelism: int
    state_files: list[str] = Field(default_factory=list)
    commits: list[dict[str, Any]] = Field(default_factory=list)


class CheckpointManifest(Contract):
    """Written last and atomically: the only proof that a checkpoint exists."""

    job_id: str
    epoch: int
    generation: int
    created_at: datetime
    then_stop: bool = False
    operators: dict[str, OperatorCheckpoint]


class CheckpointInfo(Contract):
    """Result of the checkpoint activity."""

    epoch: int
    manifest_path: str
    then_stop: bool
    duration_s: float
    committed_files: int = 0


RunnerEventKind = Literal[
    "hello",  # first event of a stream: the runner's current view (in `tasks`)
    "heartbeat",
    "task_started",
    "task_finished",
    "task_failed",
    "source_finished",
    "checkpoint_done",
]


class RunnerEvent(Contract):
    """One line of a runner's event stream (GET /events, newline-delimited JSON)."""

    kind: RunnerEventKind
    runner_id: str
    generation: int
    time: datetime
    subtask: SubtaskRef | None = None
    epoch: int | None = None
    message: str | None = None
    retryable: bool = True
    domain: ErrorDomain = "internal"
    tasks: dict[str, str] | None = None  # subtask label -> starting|running|source_finished|finished|failed
    metrics: dict[str, float] | None = None


# --------------------------------------------------------------------------------------------
# Status (the `status` query) and results


class Failure(Contract):
    message: str
    domain: ErrorDomain = "internal"


class RejectedCommand(Contract):
    time: datetime
    command: str
    payload: Any = None
    reason: str


class TransitionRecord(Contract):
    time: datetime
    from_state: str
    to_state: str
    reason: str


class JobStatus(Contract):
    """The `status` query: scripts rely on these field names."""

    job_id: str
    pipeline_name: str
    state: JobStateName
    generation: int
    epoch: int
    restarts: int
    config: JobConfig
    parallelism: dict[str, int] = Field(default_factory=dict)
    runners: list[RunnerInfo] = Field(default_factory=list)
    failure: Failure | None = None
    rejected_commands: list[RejectedCommand] = Field(default_factory=list)
    transitions: list[TransitionRecord] = Field(default_factory=list)


class MonitorResult(Contract):
    """Why the monitor activity returned: something needs the workflow."""

    kind: Literal["task_failed", "runner_lost", "sources_finished", "all_finished"]
    message: str = ""
    retryable: bool = True
    domain: ErrorDomain = "internal"


# --------------------------------------------------------------------------------------------
# Activity inputs (what the workflow hands the controller activities)


class CompileInput(Contract):
    spec: JobSpec


class CompileResult(Contract):
    program: Program
    checkpoint_url: str
    latest_epoch: int = Field(description="newest completed checkpoint in the store, 0 if none")
    highest_epoch: int = Field(description="newest epoch ever attempted in the store, 0 if none")


class ScheduleInput(Contract):
    job_id: str
    generation: int
    program: Program
    slots_per_runner: int
    startup_timeout_s: float


class StartExecutionInput(Contract):
    job_id: str
    generation: int
    program: Program
    runners: list[RunnerInfo]
    checkpoint_url: str
    restore_epoch: int | None


class MonitorInput(Contract):
    job_id: str
    generation: int
    program: Program
    runners: list[RunnerInfo]
    heartbeat_timeout_s: float
    watch: list[Literal["task_failed", "runner_lost", "sources_finished", "all_finished"]]


class CheckpointInput(Contract):
    job_id: str
    generation: int
    program: Program
    runners: list[RunnerInfo]
    checkpoint_url: str
    epoch: int
    then_stop: bool
    finish_timeout_s: float


class CleanupInput(Contract):
    job_id: str
    checkpoint_url: str
    keep: int
    protect: list[int] = Field(default_factory=list)


class StopInput(Contract):
    job_id: str
    generation: int
    runners: list[RunnerInfo]
    mode: Literal["graceful", "immediate"]
    finish_timeout_s: float


class TeardownInput(Contract):
    job_id: str
    generation: int | None = Field(default=None, description="None = every generation")


class JobInput(Contract):
    """The workflow's input: the job, plus the state carried over a continue-as-new (opaque)."""

    spec: JobSpec
    carried: dict[str, Any] | None = None


class JobResult(Contract):
    """The workflow's result when the job ends Stopped or Finished (Failed fails the workflow)."""

    job_id: str
    state: JobStateName
    epoch: int
    generation: int
    restarts: int


StartRequest.model_rebuild()
