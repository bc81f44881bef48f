"""Contracts shared by the workflow, the activities, the runners, the client and the CLI.

Everything that crosses a process boundary (Temporal payloads, runner HTTP bodies, checkpoint
manifests, pipeline files) is one of these pydantic models, so a malformed value is rejected with
a message that names the field instead of failing somewhere downstream.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

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
    "Upgrading",
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
    """Base of every contract: unknown fields are errors, so typos are caught at the boundary;
    infinities and NaN are refused (a duration or rate must be a real number)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Upper bounds of every number a user can set: each keeps the job runnable (a timer or timeout
# Temporal and Python can represent, a plan the controller can hold in memory).
MAX_NAME_LENGTH = 200  # pipeline names are a search attribute (2,048 bytes at most)
MAX_OPERATORS = 1_000
MAX_PARALLELISM = 256  # per operator
MAX_SUBTASKS = 1_024  # per job, all operators together
MAX_RUNNERS = 128  # runner processes per job
MAX_SPLITS = 100_000
MAX_DURATION_S = 10 * 365 * 86_400.0  # ten years: TTL, healthy duration
MAX_TIMEOUT_S = 86_400.0  # one day: every runner, task, finish and checkpoint timeout
MAX_COUNT = 1_000_000  # restart budgets, checkpoints kept
MAX_INT = 2**53  # nonces and epochs: exact in JSON and JavaScript
# A savepoint's name: a file name in every store (no path separators, no leading dot).
SAVEPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# `JOB/NAME`: the savepoint NAME of job JOB (job ids may hold slashes: the name is after the last).
SAVEPOINT_REF_PATTERN = r"^.+/[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Periodic savepoints (JobConfig.savepoint_interval_s) are named `auto-<epoch>`.
PERIODIC_SAVEPOINT_PREFIX = "auto-"


# --------------------------------------------------------------------------------------------
# Pipeline files


class OperatorBase(Contract):
    kind: ClassVar[str] = "transform"
    id: str = Field(max_length=100, description="unique operator id within the pipeline")
    parallelism: int | None = Field(default=None, ge=1, le=MAX_PARALLELISM)
    inputs: list[str] | None = Field(
        default=None, description="upstream operator ids; default: the previous operator"
    )

    @field_validator("id")
    @classmethod
    def _id_is_identifier(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError(f"operator id {v!r} must be letters, digits, '_' or '-'")
        return v


class SourceBase(OperatorBase):
    """Base of sources: where records enter, and how event time (watermarks) is tracked."""

    kind: ClassVar[str] = "source"
    out_of_orderness_ms: int = Field(
        default=0, ge=0, le=int(MAX_DURATION_S * 1000),
        description=(
            "watermark = highest event time seen (per split) minus this; later records may still arrive within it"
        ),
    )


class GeneratorOperator(SourceBase):
    """Deterministic source: columns split, seq, key, ts, value, a pure function of (split, seq)."""

    type: Literal["generator"]
    splits: int = Field(default=1, ge=1, le=MAX_SPLITS)
    keys: int = Field(default=100, ge=1, le=MAX_INT, description="number of distinct keys")
    limit: int | None = Field(default=None, ge=0, le=MAX_INT, description="records per split; absent = unbounded")
    rate: float | None = Field(
        default=None, gt=0, le=1e9, description="records per second per split; absent = as fast as possible"
    )
    batch_size: int = Field(default=4096, ge=1, le=1_000_000)

    def columns(self) -> list[str]:
        return list(GENERATOR_COLUMNS)


GENERATOR_COLUMNS = ("split", "seq", "key", "ts", "value")
FileFormat = Literal["jsonl", "csv", "parquet"]
ColumnType = Literal["int64", "float64", "string", "bool", "timestamp"]


class FilesSourceOperator(SourceBase):
    """Reads a directory of JSON lines, CSV or Parquet files; one split per file; offsets checkpointed."""

    type: Literal["files"]
    role: Literal["source"]  # selects this class for `type: files`
    path: str
    format: FileFormat = "jsonl"
    columns_: dict[str, ColumnType] | None = Field(
        default=None, alias="schema",
        description="column -> type; absent = inferred from the data (then key columns are checked at run time)",
    )
    event_time: str | None = Field(default=None, description="timestamp column that drives watermarks; absent = none")
    follow: bool = Field(default=False, description="keep watching `path` for new files; never finishes")
    poll_interval_s: float = Field(default=1.0, gt=0, le=3600.0)
    batch_size: int = Field(default=8192, ge=1, le=1_000_000)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def columns(self) -> list[str] | None:
        return list(self.columns_) if self.columns_ is not None else None


def _check_function_ref(v: str) -> str:
    if not _FUNCTION_REF.match(v):
        raise ValueError(f"fn {v!r} must look like 'package.module:function'")
    return v


FunctionRef = Annotated[str, AfterValidator(_check_function_ref)]


def _one_or_many(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


ColumnList = Annotated[list[str], BeforeValidator(_one_or_many), Field(min_length=1)]


class MapOperator(OperatorBase):
    """Calls a Python function `module:function` on each Arrow record batch; returns a batch."""

    type: Literal["map"]
    fn: FunctionRef


class FilterOperator(OperatorBase):
    """Keeps the rows where `expr` (a pyarrow compute expression, e.g. "value > 500") is true, or
    where `fn(batch)` (a Python function returning a boolean mask) is true."""

    type: Literal["filter"]
    expr: str | None = None
    fn: FunctionRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> FilterOperator:
        if (self.expr is None) == (self.fn is None):
            raise ValueError(f"filter {self.id!r} needs exactly one of 'expr' or 'fn'")
        return self


class ProjectOperator(OperatorBase):
    """Keeps and computes columns: `columns` maps each output column to a pyarrow compute
    expression over the input ("value * 2", "key"); a list keeps those columns as they are."""

    type: Literal["project"]
    columns: dict[str, str] | list[str] = Field(min_length=1)

    def outputs(self) -> dict[str, str]:
        return {c: c for c in self.columns} if isinstance(self.columns, list) else dict(self.columns)


class KeyByOperator(OperatorBase):
    """Partitions the stream by the hash of `key` columns: the next operator is keyed."""

    type: Literal["key_by"]
    key: ColumnList


class UnionOperator(OperatorBase):
    """Merges its inputs (which must have the same columns) into one stream; stateless."""

    type: Literal["union"]


AggregateFunction = Literal["count", "sum", "min", "max", "mean"]


class AggregateSpec(Contract):
    """One aggregate column: `fn` over `column` (count needs none), named `as` (default fn or fn_column)."""

    fn: AggregateFunction
    column: str | None = None
    as_: str | None = Field(default=None, alias="as")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _column(self) -> AggregateSpec:
        if self.fn != "count" and self.column is None:
            raise ValueError(f"aggregate {self.fn!r} needs a 'column'")
        return self

    @property
    def name(self) -> str:
        if self.as_:
            return self.as_
        return self.fn if self.column is None else f"{self.fn}_{self.column}"


def _default_aggregates() -> list[AggregateSpec]:
    return [AggregateSpec(fn="count")]


class WindowBase(OperatorBase):
    """Keyed event-time windows; output: key columns, window_start, window_end, one column per aggregate.

    A window [start, end) is emitted once, when the watermark reaches end + allowed_lateness_ms;
    a record for a window already emitted is late: dropped and counted (metric late_records).
    """

    time: str = Field(default="ts", description="event-time column (timestamp or int64 milliseconds)")
    size_ms: int = Field(ge=1, le=int(MAX_DURATION_S * 1000))
    allowed_lateness_ms: int = Field(default=0, ge=0, le=int(MAX_DURATION_S * 1000))
    aggregates: list[AggregateSpec] = Field(default_factory=_default_aggregates, min_length=1)


class TumblingWindowOperator(WindowBase):
    type: Literal["tumbling_window"]


class SlidingWindowOperator(WindowBase):
    type: Literal["sliding_window"]
    slide_ms: int = Field(ge=1, le=int(MAX_DURATION_S * 1000))

    @model_validator(mode="after")
    def _slide_divides_size(self) -> SlidingWindowOperator:
        if self.size_ms % self.slide_ms:
            raise ValueError(
                f"sliding_window {self.id!r}: size_ms ({self.size_ms}) must be a multiple of slide_ms ({self.slide_ms})"
            )
        return self


class RunningAggregateOperator(OperatorBase):
    """Keyed running aggregate with updating output: after each batch, one row per key it touched
    holding the key's new totals (the newest row of a key is its current value)."""

    type: Literal["aggregate"]
    aggregates: list[AggregateSpec] = Field(default_factory=_default_aggregates, min_length=1)


class SinkBase(OperatorBase):
    kind: ClassVar[str] = "sink"


class FilesSinkOperator(SinkBase):
    """Exactly-once file sink: per-epoch staging files, published by the controller's commit phase."""

    type: Literal["files"]
    role: Literal["sink"] = "sink"
    path: str
    format: Literal["jsonl", "parquet"] = "jsonl"


class StdoutSinkOperator(SinkBase):
    """Prints rows as JSON lines on the runner's standard output (at least once; for debugging)."""

    type: Literal["stdout"]


class NullSinkOperator(SinkBase):
    """Discards rows (counts them in its metrics): for benchmarks and tests."""

    type: Literal["null"]


def _operator_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        t, role = v.get("type"), v.get("role")
    else:
        t, role = getattr(v, "type", None), getattr(v, "role", None)
    if t == "files":
        return "files source" if role == "source" else "files sink"
    return t


OperatorSpec = Annotated[
    Annotated[GeneratorOperator, Tag("generator")]
    | Annotated[FilesSourceOperator, Tag("files source")]
    | Annotated[MapOperator, Tag("map")]
    | Annotated[FilterOperator, Tag("filter")]
    | Annotated[ProjectOperator, Tag("project")]
    | Annotated[KeyByOperator, Tag("key_by")]
    | Annotated[UnionOperator, Tag("union")]
    | Annotated[TumblingWindowOperator, Tag("tumbling_window")]
    | Annotated[SlidingWindowOperator, Tag("sliding_window")]
    | Annotated[RunningAggregateOperator, Tag("aggregate")]
    | Annotated[FilesSinkOperator, Tag("files sink")]
    | Annotated[StdoutSinkOperator, Tag("stdout")]
    | Annotated[NullSinkOperator, Tag("null")],
    Discriminator(_operator_tag),
]
#: every operator contract by the tag its union member carries (pydantic names tags in error paths)
OPERATOR_CLASSES: dict[str, type[OperatorBase]] = {
    "generator": GeneratorOperator, "files source": FilesSourceOperator, "map": MapOperator,
    "filter": FilterOperator, "project": ProjectOperator, "key_by": KeyByOperator, "union": UnionOperator,
    "tumbling_window": TumblingWindowOperator, "sliding_window": SlidingWindowOperator,
    "aggregate": RunningAggregateOperator, "files sink": FilesSinkOperator, "stdout": StdoutSinkOperator,
    "null": NullSinkOperator,
}
OPERATOR_TAGS: tuple[str, ...] = tuple(OPERATOR_CLASSES)
#: the types users write (`files` is both a source and a sink)
OPERATOR_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t.split()[0] for t in OPERATOR_TAGS))
#: operators that need keyed input (a key_by upstream) and keep state per key
KEYED_TYPES = frozenset({"tumbling_window", "sliding_window", "aggregate"})


def operator_role(params: dict[str, Any]) -> Literal["source", "transform", "sink"]:
    """Whether an operator (as dumped into Program.operators) is a source, a sink or in between."""
    cls = OPERATOR_CLASSES.get(_operator_tag(params) or "")
    return cls.kind if cls is not None else "transform"  # type: ignore[return-value]


class PipelineSpec(Contract):
    """A pipeline file (YAML or JSON)."""

    name: str = Field(max_length=MAX_NAME_LENGTH)
    parallelism: int = Field(default=1, ge=1, le=MAX_PARALLELISM)
    operators: list[OperatorSpec] = Field(min_length=1, max_length=MAX_OPERATORS)
    host_labels: dict[str, str] = Field(
        default_factory=dict,
        description="runners go only to hosts that have every one of these labels (sluice host --label k=v)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError(f"pipeline name {v!r} must be letters, digits, '_' or '-'")
        return v

    @model_validator(mode="after")
    def _graph(self) -> PipelineSpec:
        seen: set[str] = set()
        all_ids = {op.id for op in self.operators}
        for i, op in enumerate(self.operators):
            if op.id in seen:
                raise ValueError(f"operators[{i}]: duplicate operator id {op.id!r}")
            if op.kind == "source":
                if op.inputs:
                    raise ValueError(f"operator {op.id!r}: a {op.type} source takes no inputs")
            elif i == 0 and not op.inputs:
                raise ValueError(f"operator {op.id!r}: the first operator must be a source")
            dup = sorted({u for u in op.inputs or [] if (op.inputs or []).count(u) > 1})
            if dup:
                raise ValueError(f"operator {op.id!r}: input {dup[0]!r} is listed twice")
            for up in op.inputs or []:
                if up not in all_ids:
                    raise ValueError(f"operator {op.id!r}: input {up!r} is not an operator of this pipeline")
                if up not in seen:
                    raise ValueError(
                        f"operator {op.id!r}: input {up!r} is defined after it (operators are listed "
                        f"inputs first, so a graph has no cycles)"
                    )
            seen.add(op.id)
        return self

    def parallelism_for(self, config: JobConfig) -> dict[str, int]:
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
            if op.kind == "source":
                out[op.id] = []
            else:
                out[op.id] = list(op.inputs) if op.inputs else [prev]  # type: ignore[list-item]
            prev = op.id
        return out


# --------------------------------------------------------------------------------------------
# Job config and commands


Parallelism = Annotated[int, Field(ge=1, le=MAX_PARALLELISM)]
Overrides = dict[Annotated[str, Field(max_length=100)], Parallelism]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]


class JobConfig(Contract):
    """The job's desired configuration; commands change it and the controller converges to it.

    Every number has a lower and an upper bound (and must be finite): a value outside them is
    refused with the allowed range, never accepted and then fatal to the workflow."""

    stop: StopMode = "none"
    checkpoint_interval_s: float = Field(default=10.0, ge=1.0, le=86_400.0)
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    parallelism: Parallelism | None = Field(
        default=None, description="parallelism of every operator; None = the pipeline's"
    )
    overrides: Overrides = Field(default_factory=dict, max_length=MAX_OPERATORS)
    restart_nonce: int = Field(default=0, ge=0, le=MAX_INT)
    restart_mode: RestartMode = "safe"
    allowed_restarts: int = Field(default=20, ge=-1, le=MAX_COUNT, description="-1 = unlimited")
    healthy_duration_s: float = Field(default=120.0, gt=0, le=MAX_DURATION_S)
    runner_heartbeat_timeout_s: float = Field(
        default=10.0, ge=1.0, le=3_600.0,
        description="a runner silent this long (hung, stopped or cut off) is lost",
    )
    task_hang_timeout_s: float = Field(
        default=10.0, ge=1.0, le=MAX_TIMEOUT_S,
        description="an operator (a user function) busy with one batch this long fails its task, named",
    )
    runner_startup_timeout_s: Timeout = 60.0
    task_startup_timeout_s: Timeout = 120.0
    finish_timeout_s: Timeout = 60.0
    checkpoint_timeout_s: Timeout = 600.0
    checkpoints_to_keep: int = Field(default=10, ge=1, le=MAX_COUNT)
    savepoint_interval_s: float | None = Field(
        default=None, ge=1.0, le=MAX_DURATION_S,
        description="take a periodic savepoint (named auto-<epoch>) this often while Running; None = never",
    )
    periodic_savepoints_to_keep: int = Field(
        default=3, ge=1, le=MAX_COUNT, description="periodic savepoints kept; older ones are disposed of",
    )
    restore_epoch: int | None = Field(default=None, ge=1, le=MAX_INT, description="restore this checkpoint")
    from_savepoint: str | None = Field(
        default=None, pattern=SAVEPOINT_REF_PATTERN,
        description="JOB/NAME: start from that savepoint (copied into this job's store on its first start)",
    )
    ignore_state: bool = False
    slots_per_runner: int = Field(default=4, ge=1, le=64, description="subtasks per runner process")


class ConfigPatch(Contract):
    """Any subset of JobConfig (the `update_config` signal), with the same bounds."""

    stop: StopMode | None = None
    checkpoint_interval_s: float | None = Field(default=None, ge=1.0, le=86_400.0)
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    parallelism: Parallelism | None = None
    overrides: Overrides | None = Field(default=None, max_length=MAX_OPERATORS)
    restart_nonce: int | None = Field(default=None, ge=0, le=MAX_INT)
    restart_mode: RestartMode | None = None
    allowed_restarts: int | None = Field(default=None, ge=-1, le=MAX_COUNT)
    healthy_duration_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    runner_heartbeat_timeout_s: float | None = Field(default=None, ge=1.0, le=3_600.0)
    task_hang_timeout_s: float | None = Field(default=None, ge=1.0, le=MAX_TIMEOUT_S)
    runner_startup_timeout_s: Timeout | None = None
    task_startup_timeout_s: Timeout | None = None
    finish_timeout_s: Timeout | None = None
    checkpoint_timeout_s: Timeout | None = None
    checkpoints_to_keep: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    slots_per_runner: int | None = Field(default=None, ge=1, le=64)


class StopCommand(Contract):
    mode: StopMode


class RescaleCommand(Contract):
    parallelism: Parallelism | None = None
    overrides: Overrides | None = Field(default=None, max_length=MAX_OPERATORS)

    @model_validator(mode="after")
    def _one(self) -> RescaleCommand:
        if self.parallelism is None and not self.overrides:
            raise ValueError("rescale needs 'parallelism' or 'overrides'")
        return self


class RestartCommand(Contract):
    force: bool = False
    ignore_state: bool = False


class PatchRequest(Contract):
    """The `patch` update: like the reference's PATCH /pipelines/:id."""

    stop: StopMode | None = None
    parallelism: Parallelism | None = None
    overrides: Overrides | None = Field(default=None, max_length=MAX_OPERATORS)
    checkpoint_interval_s: float | None = Field(default=None, ge=1.0, le=86_400.0)
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    restart: RestartCommand | None = None


class WaitForStateRequest(Contract):
    states: list[JobStateName] = Field(min_length=1, max_length=len(TERMINAL_STATES) + 11)
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_DURATION_S,
        description="the workflow side of the wait ends after this (the caller gave up); None = until closed",
    )




def pipeline_version(pipeline: PipelineSpec) -> str:
    """A short, stable fingerprint of a pipeline spec (first 12 hex digits of its SHA-256)."""
    return hashlib.sha256(pipeline.model_dump_json().encode()).hexdigest()[:12]


UpgradeMode = Literal["savepoint", "last-state", "stateless"]
UpgradePhase = Literal[
    "checking",  # the new pipeline is compiled and compared with the job's state (old generation runs)
    "awaiting_approval",  # compatible; waits for `approve_upgrade` (old generation runs, checkpoints)
    "savepoint",  # Upgrading: the old generation takes its then-stop savepoint (or is torn down)
    "switching",  # the new generation is being scheduled from the restore point
    "health_window",  # the new generation runs; its output is held back until the window ends
    "completed",  # healthy: held-back output published, the new pipeline is the job's
    "refused",  # incompatible (nothing changed): `problems` names each operator
    "rejected",  # an approver said no (nothing changed)
    "rolling_back",  # Upgrading: the new generation failed; back to the savepoint and old pipeline
    "rolled_back",  # the old pipeline runs again from the restore point; `reason` says why
    "abandoned",  # a stop, or a failure before the switch, ended it (the old pipeline stays)
]
#: phases in which an upgrade is still going on (commands that would interfere are refused)
ACTIVE_UPGRADE_PHASES: frozenset[str] = frozenset(
    {"checking", "awaiting_approval", "savepoint", "switching", "health_window", "rolling_back"}
)
#: how long a new generation must stay healthy before its upgrade counts as done
DEFAULT_HEALTH_WINDOW_S = 60.0


class UpgradeRequest(Contract):
    """The `upgrade` update: switch the running job to `pipeline`, keeping its state.

    `mode`: `savepoint` takes a then-stop savepoint of the old generation and starts the new one
    from it; `last-state` tears the old generation down and starts from its last checkpoint;
    `stateless` starts the new pipeline with empty state (a rollback still returns to the last
    checkpoint). `allow_drop_state` names operators whose state may be lost (an incompatible or
    removed stateful operator). During `health_window_s` the new generation must not fail and must
    complete a checkpoint; otherwise the job rolls back to the old pipeline and its restore point."""

    pipeline: PipelineSpec
    mode: UpgradeMode = "savepoint"
    allow_drop_state: list[str] = Field(default_factory=list, max_length=MAX_OPERATORS)
    require_approval: bool = False
    health_window_s: float = Field(default=DEFAULT_HEALTH_WINDOW_S, ge=0.0, le=MAX_DURATION_S)


class UpgradeDecision(Contract):
    """The `approve_upgrade` update: go ahead with the waiting upgrade, or reject it."""

    approve: bool
    reason: str | None = Field(default=None, max_length=1_000)


class UpgradeStatus(Contract):
    """One upgrade of a job, as `status` shows it (the newest one)."""

    number: int
    phase: UpgradePhase
    mode: UpgradeMode
    require_approval: bool = False
    health_window_s: float = DEFAULT_HEALTH_WINDOW_S
    allow_drop_state: list[str] = Field(default_factory=list)
    from_version: str
    to_version: str
    new_pipeline: PipelineSpec
    previous_pipeline: PipelineSpec
    previous_parallelism: int | None = None
    previous_overrides: dict[str, int] = Field(default_factory=dict)
    dropped_state: list[str] = Field(default_factory=list, description="operators that start with empty state")
    problems: list[str] = Field(default_factory=list, description="refused: why, one per operator")
    savepoint: str | None = Field(default=None, description="the savepoint taken before the switch")
    restore_epoch: int | None = Field(
        default=None, description="the new generation's restore point; also the rollback point"
    )
    deferred_epochs: list[int] = Field(
        default_factory=list, description="health window: checkpoints whose output is held back until it ends"
    )
    reason: str | None = Field(default=None, description="why it was refused, rejected, rolled back or abandoned")
    requested_at: datetime
    switched_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_UPGRADE_PHASES


class SavepointRequest(Contract):
    """The `savepoint` update: take a checkpoint now and keep it under `name` (default
    `savepoint-<epoch>`) until it is disposed; retention never deletes it."""

    name: str | None = Field(default=None, pattern=SAVEPOINT_NAME_PATTERN)


class SavepointInfo(Contract):
    """One savepoint, as its record in the checkpoint store says (`savepoints/<name>.json`)."""

    name: str
    job_id: str
    epoch: int
    created_at: datetime
    size_bytes: int = Field(ge=0, description="state files of the checkpoint")
    pipeline_name: str
    pipeline_version: str = Field(description="first 12 hex digits of the SHA-256 of the pipeline spec")


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


EdgeKind = Literal["pointwise", "hash", "rebalance"]


class Edge(Contract):
    """A connection between two chains: from the tail operator of one to the head of another.

    `pointwise`: equal parallelism, subtask i sends to subtask i. `hash`: every row goes to the
    subtask owning its key's hash (out of a `key_by`, `key` names the columns). `rebalance`: every
    sender reaches every receiver, batches dealt round-robin. Control messages (watermarks,
    barriers, end of stream) go to every receiver a sender is connected to.
    """

    from_op: str
    to_op: str
    kind: EdgeKind
    key: list[str] | None = None

    @property
    def name(self) -> str:
        return f"{self.from_op}->{self.to_op}"


class Program(Contract):
    """The physical program: every operator's parameters and parallelism, grouped into chains
    (operators fused over forward edges), and the edges between chains."""

    name: str
    operators: dict[str, dict[str, Any]]  # id -> operator spec (model_dump of the pipeline's)
    inputs: dict[str, list[str]]
    parallelism: dict[str, int]
    chains: list[Chain]
    edges: list[Edge] = Field(default_factory=list)

    def subtasks(self) -> list[SubtaskRef]:
        return [SubtaskRef(chain=c, index=i) for c, ch in enumerate(self.chains) for i in range(ch.parallelism)]

    def chain_of(self, operator_id: str) -> int:
        for i, ch in enumerate(self.chains):
            if operator_id in ch.operators:
                return i
        raise KeyError(f"operator {operator_id!r} is in no chain")

    def edges_into(self, chain: int) -> list[Edge]:
        head = self.chains[chain].operators[0]
        return [e for e in self.edges if e.to_op == head]

    def edges_out_of(self, chain: int) -> list[Edge]:
        tail = self.chains[chain].operators[-1]
        return [e for e in self.edges if e.from_op == tail]

    def senders(self, edge: Edge, receiver: int) -> list[int]:
        """Subtask indexes of `edge`'s upstream that send to subtask `receiver` of its downstream."""
        if edge.kind == "pointwise":
            return [receiver]
        return list(range(self.parallelism[edge.from_op]))

    def receivers(self, edge: Edge, sender: int) -> list[int]:
        """Subtask indexes of `edge`'s downstream that subtask `sender` of its upstream sends to."""
        if edge.kind == "pointwise":
            return [sender]
        return list(range(self.parallelism[edge.to_op]))


class RunnerInfo(Contract):
    """A runner process of one generation, as its scheduler started it."""

    runner_id: str
    generation: int
    host: str = "127.0.0.1"
    control_port: int
    data_port: int | None = None
    pid: int | None = None
    slots: int
    host_id: str | None = None  # the runner host that started it (None: the worker's own scheduler)
    #: the process's start time (clock ticks since boot, /proc/PID/stat field 22) as the runner
    #: read it itself; with `pid` it names exactly this process, even after the PID is reused.
    #: None where the system does not report it, and in files written before it existed.
    started_ticks: int | None = None

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
    restore: CheckpointManifest | None = None
    peers: list[RunnerInfo] = Field(default_factory=list)
    assignments: list[RunnerAssignment] = Field(default_factory=list)
    task_hang_timeout_s: float = Field(
        default=10.0, ge=0.01, le=MAX_TIMEOUT_S,
        description="a batch busy in a chain with user code this long fails its task (JobConfig.task_hang_timeout_s)",
    )


class StateFileDigest(Contract):
    """Size and SHA-256 of one state file, computed while it was written: restoring checks the
    file against them, so a truncated, rewritten or bit-flipped file is found before it is used."""

    size: int = Field(ge=0, description="bytes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex")


class OperatorSnapshot(Contract):
    """What one operator subtask contributed to a checkpoint."""

    state_files: list[str] = Field(default_factory=list)
    # path (as in state_files) -> its digest; empty in snapshots of older runners
    state_digests: dict[str, StateFileDigest] = Field(default_factory=dict)
    commits: list[dict[str, Any]] = Field(default_factory=list)  # pre-committed sink output


class SubtaskSnapshot(Contract):
    subtask: SubtaskRef
    epoch: int
    operators: dict[str, OperatorSnapshot] = Field(default_factory=dict)


class OperatorCheckpoint(Contract):
    parallelism: int
    state_files: list[str] = Field(default_factory=list)
    # path (as in state_files) -> size and sha256; manifests written by older code have none, and
    # their state files are then only checked to be readable Arrow files
    state_digests: dict[str, StateFileDigest] = Field(default_factory=dict)
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
    savepoint: SavepointInfo | None = None  # when the checkpoint was taken as a savepoint


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
    operator: str | None = None  # task_failed: the operator that failed, when known
    traceback: str | None = None  # task_failed: the user function's traceback, when one raised


# --------------------------------------------------------------------------------------------
# Status (the `status` query) and results


class Failure(Contract):
    """Why a job failed or recovers: what a user reads in `sluice status`."""

    message: str
    domain: ErrorDomain = "internal"
    operator: str | None = Field(default=None, description="the operator where it happened, when known")
    traceback: str | None = Field(default=None, description="the user function's traceback, when one raised")

    def signature(self) -> tuple[str | None, str]:
        """What makes two failures 'the same' (repeating deterministically): operator and message."""
        return (self.operator, self.message)


class RejectedCommand(Contract):
    time: datetime
    command: str
    payload: Any = None  # the payload's JSON, at most a short prefix of it
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
    last_error: Failure | None = Field(
        default=None, description="the failure the job last recovered from (while it recovers: why)"
    )
    rejected_commands: list[RejectedCommand] = Field(default_factory=list)
    transitions: list[TransitionRecord] = Field(default_factory=list)
    waiting_for: str | None = Field(
        default=None, description="Scheduling: why the job waits (e.g. no free runner slot), else null"
    )
    checkpoint_url: str | None = Field(default=None, description="the job's checkpoint store, once compiled")
    upgrade: UpgradeStatus | None = Field(default=None, description="the newest pipeline upgrade, if any")


class MonitorResult(Contract):
    """Why the monitor activity returned: something needs the workflow."""

    kind: Literal["task_failed", "runner_lost", "sources_finished", "all_finished"]
    message: str = ""
    retryable: bool = True
    domain: ErrorDomain = "internal"
    operator: str | None = None
    traceback: str | None = None


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
    task_hang_timeout_s: float = 10.0  # JobConfig.task_hang_timeout_s, handed to every runner
    # Operators whose state in the restore point is left out (an upgrade allowed dropping it).
    drop_state: list[str] = Field(default_factory=list)


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
    savepoint: str | None = None  # keep the checkpoint as this savepoint once it completed
    pipeline_version: str = ""  # recorded with a savepoint
    # Retention, applied by the activity once the checkpoint completed (runs with the
    # lean-checkpoints patch); None: the workflow runs `cleanup_checkpoints` itself afterwards.
    retention: CleanupInput | None = None
    # An upgrade's health window: write the manifest but hold the sinks' commit phase back
    # (published by `commit_epochs` once the window ends healthy; discarded by a rollback).
    defer_commit: bool = False


class UpgradeCheckInput(Contract):
    """Compile `spec` (the new pipeline) and compare its state with the running `program`'s."""

    spec: JobSpec
    program: Program
    allow_drop_state: list[str] = Field(default_factory=list)


class UpgradeCheckResult(Contract):
    """The new program, and either the problems that refuse the upgrade or the operators whose
    state it drops (allowed by the request)."""

    program: Program
    problems: list[str] = Field(default_factory=list)
    dropped_state: list[str] = Field(default_factory=list)


class CommitEpochsInput(Contract):
    """Publish the held-back output of `epochs` (in order), fenced by `generation`."""

    job_id: str
    generation: int
    program: Program
    checkpoint_url: str
    epochs: list[int]


class CleanupInput(Contract):
    job_id: str
    checkpoint_url: str
    keep: int
    protect: list[int] = Field(default_factory=list)
    periodic_savepoints_to_keep: int | None = None  # None: periodic savepoints are not pruned


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


CheckpointInput.model_rebuild()
