"""From a pipeline file to the physical program: parallelism, chains, edges, runner assignment.

Chaining rule: an operator is fused into its input's chain over a *forward* edge: it has one
input, that input has no other consumer, both have the same parallelism, and the input is not a
`key_by` (whose output is always repartitioned by key). Every other connection is an :class:`Edge`
between the tail of one chain and the head of another: `hash` out of a `key_by`, `pointwise`
between equal parallelisms, `rebalance` otherwise.

Everything the compiler refuses is a UserError naming the operator: an unknown input, a sink used
as an input, a keyed operator without a `key_by` input, a column missing from the schema a source
declares, a function that cannot be imported, two sinks sharing a path.
"""

from __future__ import annotations

import math
import os
from typing import Any

from sluice.engine.functions import FunctionLoadError, load_function
from sluice.errors import UserError
from sluice.models import (
    KEYED_TYPES,
    MAX_RUNNERS,
    MAX_SUBTASKS,
    Chain,
    Edge,
    EdgeKind,
    JobConfig,
    PipelineSpec,
    Program,
    RunnerAssignment,
    RunnerInfo,
    SubtaskRef,
)

#: columns a window adds to its key columns
WINDOW_COLUMNS = ("window_start", "window_end")


def effective_parallelism(pipeline: PipelineSpec, config: JobConfig) -> dict[str, int]:
    """Per operator: config override, else config parallelism, else its own, else the pipeline's."""
    unknown = sorted(set(config.overrides) - {op.id for op in pipeline.operators})
    if unknown:
        raise UserError(f"parallelism override names unknown operator(s): {', '.join(map(repr, unknown))}")
    parallelism = pipeline.parallelism_for(config)
    # Bounded before anything is built per subtask: an absurd rescale is refused, not materialised.
    total = sum(parallelism.values())
    if total > MAX_SUBTASKS:
        raise UserError(
            f"parallelism {parallelism} needs up to {total} subtasks; a job may have at most {MAX_SUBTASKS}"
        )
    return parallelism


def plan_problem(pipeline: PipelineSpec, config: JobConfig) -> str | None:
    """Why `config`'s parallelism cannot run `pipeline` (None when it can), without importing any
    user function: pure, so the workflow runs it to reject a bad rescale before accepting it."""
    try:
        chains, _, _ = _plan(pipeline, effective_parallelism(pipeline, config), expressions=False)
        _check_runners(chains, config)
    except UserError as e:
        return str(e)
    return None


def _check_runners(chains: list[Chain], config: JobConfig) -> None:
    """A job's runner processes are bounded: a plan needing more is refused, never spawned."""
    subtasks = sum(ch.parallelism for ch in chains)
    runners = math.ceil(subtasks / config.slots_per_runner)
    if runners > MAX_RUNNERS:
        raise UserError(
            f"{subtasks} subtasks at {config.slots_per_runner} per runner need {runners} runners; a job may "
            f"have at most {MAX_RUNNERS} (raise slots_per_runner or lower the parallelism)"
        )


def _check_functions(pipeline: PipelineSpec) -> None:
    for op in pipeline.operators:
        ref = getattr(op, "fn", None)
        if ref is None:
            continue
        try:
            load_function(ref)
        except FunctionLoadError as exc:
            raise UserError(f"operator {op.id!r}: cannot import function {ref!r}: {exc}") from exc


def _params(pipeline: PipelineSpec, keys: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    params: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    for op in pipeline.operators:
        p = op.model_dump(mode="json", by_alias=True)
        if "path" in p:
            # Resolved here, once, so runners and the controller's commit phase agree on the
            # directory whatever their working directories are.
            p["path"] = os.path.abspath(os.path.expanduser(p["path"]))
            if op.kind == "sink":
                for other, other_id in paths.items():
                    if p["path"] == other:
                        raise UserError(f"operators {other_id!r} and {op.id!r} write to the same path {other!r}")
                    if _nested(p["path"], other):
                        raise UserError(
                            f"operators {other_id!r} and {op.id!r} write to nested paths {other!r} and "
                            f"{p['path']!r}: one's output would be part of the other's"
                        )
                paths[p["path"]] = op.id
        if op.id in keys:
            p["key"] = list(keys[op.id])
        params[op.id] = p
    return params


def _nested(a: str, b: str) -> bool:
    """True when absolute paths `a` and `b` are the same directory or one lies inside the other
    (a sink's committed output is every file under its path, so those would mix)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _edge_kind(up: str, down: str, parallelism: dict[str, int], types: dict[str, str]) -> EdgeKind:
    if types[up] == "key_by":
        return "hash"
    return "pointwise" if parallelism[up] == parallelism[down] else "rebalance"


def _columns_known(op: Any, ups: list[str], cols: dict[str, list[str] | None]) -> list[str] | None:
    """The columns `op` outputs when they can be told without running it (None = unknown)."""
    if op.kind == "source":
        return op.columns()
    first = cols[ups[0]] if ups else None
    if op.type in ("filter", "key_by", "union"):
        return first
    if op.type == "project":
        return list(op.outputs())
    if op.type in ("tumbling_window", "sliding_window", "aggregate"):
        return None  # filled in by _check_keyed, which knows the key
    return None  # map: whatever the function returns


def _require(op_id: str, what: str, names: list[str], available: list[str] | None) -> None:
    if available is None:
        return
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(
            f"operator {op_id!r}: {what} {', '.join(map(repr, missing))} not in the input's columns "
            f"({', '.join(available)})"
        )


def _plan(
    pipeline: PipelineSpec, parallelism: dict[str, int], *, expressions: bool = True
) -> tuple[list[Chain], list[Edge], dict[str, list[str]]]:
    """Chains, edges and every keyed operator's key columns; raises UserError naming the node.
    `expressions=False` skips parsing expressions (pure Python, for the workflow's rescale check)."""
    inputs = pipeline.input_ids()
    ops = {op.id: op for op in pipeline.operators}
    types: dict[str, str] = {op.id: op.type for op in pipeline.operators}
    consumers: dict[str, list[str]] = {op.id: [] for op in pipeline.operators}
    for op_id, ups in inputs.items():
        for up in ups:
            consumers[up].append(op_id)

    cols: dict[str, list[str] | None] = {}
    keys: dict[str, list[str]] = {}
    chains: list[Chain] = []
    chain_of: dict[str, int] = {}
    edges: list[Edge] = []
    for op in pipeline.operators:  # listed inputs-first (validated by PipelineSpec): no cycles
        ups = inputs[op.id]
        for up in ups:
            if ops[up].kind == "sink":
                raise UserError(f"operator {op.id!r}: input {up!r} is a {types[up]} sink, which has no output")
        if op.type != "union" and len(ups) > 1 and op.type not in KEYED_TYPES:
            raise UserError(f"operator {op.id!r} has several inputs ({', '.join(map(repr, ups))}); "
                            f"merge them with a 'union' operator first")
        if op.type == "union":
            known = [cols[u] for u in ups if cols[u] is not None]
            for u in ups:
                if cols[u] is not None and known and cols[u] != known[0]:  # same columns, same order
                    raise UserError(f"operator {op.id!r}: inputs have different columns: {ups[0]!r} has "
                                    f"{', '.join(known[0])}; {u!r} has {', '.join(cols[u])}")  # type: ignore[arg-type]
        event_time = getattr(op, "event_time", None)
        if op.kind == "source" and event_time is not None:
            declared = getattr(op, "columns_", None)
            if declared is not None and declared.get(event_time) != "timestamp":
                raise UserError(f"operator {op.id!r}: event_time column {event_time!r} must be declared in "
                                f"'schema' as a timestamp (schema: {declared})")
        if op.type == "key_by":
            _require(op.id, "key column(s)", op.key, cols[ups[0]])
        if expressions and op.type == "filter" and op.expr:
            _require(op.id, "column(s)", _expression_columns(op.id, op.expr), cols[ups[0]])
        if expressions and op.type == "project":
            needed: list[str] = []
            for expr in op.outputs().values():
                needed += [c for c in _expression_columns(op.id, expr) if c not in needed]
            _require(op.id, "column(s)", needed, cols[ups[0]])
        cols[op.id] = _columns_known(op, ups, cols)
        if op.type in KEYED_TYPES:
            key = _check_keyed(op, ups, ops, cols)
            keys[op.id] = key
            extra = list(WINDOW_COLUMNS) if op.type != "aggregate" else []
            cols[op.id] = key + extra + [a.name for a in op.aggregates]  # type: ignore[union-attr]
        if op.kind == "sink":
            cols[op.id] = None

        forward = (
            len(ups) == 1 and consumers[ups[0]] == [op.id] and parallelism[ups[0]] == parallelism[op.id]
            and types[ups[0]] != "key_by"
        )
        if forward:
            chain_of[op.id] = chain_of[ups[0]]
            chains[chain_of[op.id]].operators.append(op.id)
            continue
        chain_of[op.id] = len(chains)
        chains.append(Chain(operators=[op.id], parallelism=parallelism[op.id]))
        for up in ups:
            kind = _edge_kind(up, op.id, parallelism, types)
            edge_key = list(ops[up].key) if kind == "hash" else None  # type: ignore[union-attr]
            edges.append(Edge(from_op=up, to_op=op.id, kind=kind, key=edge_key))
    return chains, edges, keys


def _expression_columns(op_id: str, expr: str) -> list[str]:
    from sluice.engine.expressions import columns_of  # imported late: pyarrow.compute is heavy

    try:
        return sorted(columns_of(expr))
    except ValueError as exc:
        raise UserError(f"operator {op_id!r}: {exc}") from exc


def _check_keyed(op: Any, ups: list[str], ops: dict[str, Any], cols: dict[str, list[str] | None]) -> list[str]:
    """A keyed operator's key: every input must be a key_by, all with the same key columns."""
    not_keyed = [u for u in ups if ops[u].type != "key_by"]
    if not_keyed:
        raise UserError(f"operator {op.id!r} ({op.type}) keeps state per key: its input "
                        f"{not_keyed[0]!r} must be a 'key_by' operator")
    key = list(ops[ups[0]].key)
    for u in ups[1:]:
        if list(ops[u].key) != key:
            raise UserError(f"operator {op.id!r}: inputs {ups[0]!r} and {u!r} are keyed by different "
                            f"columns ({', '.join(key)} vs {', '.join(ops[u].key)})")
    for u in ups:
        available = cols[u]
        if op.type != "aggregate":
            _require(op.id, "time column", [op.time], available)
        _require(op.id, "aggregate column(s)", [a.column for a in op.aggregates if a.column], available)
    return key


def compile_program(pipeline: PipelineSpec, config: JobConfig) -> Program:
    """Validate `pipeline` under `config` and produce its physical program.

    Raises UserError naming the operator(s) for: an override of an unknown operator, a graph the
    engine cannot run, a column missing from a declared schema, two sinks sharing a path, or a
    user function that cannot be imported or is not callable.
    """
    parallelism = effective_parallelism(pipeline, config)
    chains, edges, keys = _plan(pipeline, parallelism)
    _check_runners(chains, config)
    params = _params(pipeline, keys)
    _check_functions(pipeline)
    return Program(
        name=pipeline.name, operators=params, inputs=pipeline.input_ids(), parallelism=parallelism,
        chains=chains, edges=edges,
    )


def runners_needed(program: Program, slots_per_runner: int) -> int:
    """How many runners of `slots_per_runner` slots hold every subtask (at least 1)."""
    if slots_per_runner < 1:
        raise ValueError("slots_per_runner must be at least 1")
    return max(1, math.ceil(len(program.subtasks()) / slots_per_runner))


def assign(program: Program, runners: list[RunnerInfo]) -> list[RunnerAssignment]:
    """Spread subtasks over `runners`: subtask i of every chain goes to runner i % n (so parallelism
    N over N runners puts one on each); a full runner passes its subtask to the next with a free slot.

    Returns one assignment per runner, in the order given (possibly with no subtasks).
    Raises ValueError when the runners have fewer slots than the program has subtasks.
    """
    if not runners:
        raise ValueError("no runners to assign subtasks to")
    total = len(program.subtasks())
    slots = sum(r.slots for r in runners)
    if total > slots:
        raise ValueError(f"{total} subtasks do not fit in {slots} slots of {len(runners)} runners")
    n = len(runners)
    placed: list[list[SubtaskRef]] = [[] for _ in runners]
    for ref in program.subtasks():
        for step in range(n):
            r = (ref.index + step) % n
            if len(placed[r]) < runners[r].slots:
                placed[r].append(ref)
                break
    return [RunnerAssignment(runner_id=r.runner_id, subtasks=p) for r, p in zip(runners, placed)]
