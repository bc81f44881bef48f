"""From a pipeline file to the physical program: parallelism, chains, and runner assignment.

Chaining rule: an operator is fused into its input's chain when the edge between them is a
*forward* edge: one input, that input has no other consumer, and both have the same parallelism.
Every other edge would need a shuffle (redistribution between subtasks), which arrives with the
data-plane work; until then such a pipeline is refused with a UserError naming the nodes.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from sluice.engine.functions import FunctionLoadError, load_function
from sluice.errors import UserError
from sluice.models import (
    SINK_TYPES,
    Chain,
    JobConfig,
    PipelineSpec,
    Program,
    RunnerAssignment,
    RunnerInfo,
    SubtaskRef,
)

EdgeKind = Literal["forward", "shuffle"]
#: operator types whose `fn` parameter names a user function
FUNCTION_OPERATOR_TYPES = frozenset({"map", "filter"})
_NOT_YET = "shuffles and fan-in/fan-out arrive with the data-plane work; for now a pipeline must be linear with equal parallelism"


def effective_parallelism(pipeline: PipelineSpec, config: JobConfig) -> dict[str, int]:
    """Per operator: config override, else config parallelism, else its own, else the pipeline's."""
    unknown = sorted(set(config.overrides) - {op.id for op in pipeline.operators})
    if unknown:
        raise UserError(f"parallelism override names unknown operator(s): {', '.join(map(repr, unknown))}")
    return pipeline.parallelism_for(config)


def plan_problem(pipeline: PipelineSpec, config: JobConfig) -> str | None:
    """Why `config`'s parallelism cannot run `pipeline` (None when it can), without importing any
    user function: pure, so the workflow runs it to reject a bad rescale before accepting it."""
    try:
        _chains(pipeline, pipeline.input_ids(), effective_parallelism(pipeline, config))
    except UserError as e:
        return str(e)
    return None


def _check_functions(pipeline: PipelineSpec) -> None:
    for op in pipeline.operators:
        if op.type in FUNCTION_OPERATOR_TYPES:
            ref = op.fn  # type: ignore[union-attr]
            try:
                load_function(ref)
            except FunctionLoadError as exc:
                raise UserError(f"operator {op.id!r}: cannot import function {ref!r}: {exc}") from exc


def _params(pipeline: PipelineSpec) -> dict[str, dict[str, Any]]:
    params: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    for op in pipeline.operators:
        p = op.model_dump(mode="json")
        if op.type == "files":
            # Resolved here, once, so runners and the controller's commit phase agree on the
            # directory whatever their working directories are.
            p["path"] = os.path.abspath(os.path.expanduser(p["path"]))
            if p["path"] in paths:
                raise UserError(f"operators {paths[p['path']]!r} and {op.id!r} write to the same path {p['path']!r}")
            paths[p["path"]] = op.id
        params[op.id] = p
    return params


def _edge_kind(up: str, down: str, parallelism: dict[str, int], consumers: dict[str, list[str]],
               inputs: dict[str, list[str]]) -> EdgeKind:
    if len(inputs[down]) == 1 and consumers[up] == [down] and parallelism[up] == parallelism[down]:
        return "forward"
    return "shuffle"


def _chains(pipeline: PipelineSpec, inputs: dict[str, list[str]], parallelism: dict[str, int]) -> list[Chain]:
    consumers: dict[str, list[str]] = {op.id: [] for op in pipeline.operators}
    for op_id, ups in inputs.items():
        for up in ups:
            consumers[up].append(op_id)
    types = {op.id: op.type for op in pipeline.operators}

    chains: list[Chain] = []
    chain_of: dict[str, int] = {}
    for op in pipeline.operators:  # operators are listed inputs-first (validated by PipelineSpec)
        ups = inputs[op.id]
        for up in ups:
            if types[up] in SINK_TYPES:
                raise UserError(f"operator {op.id!r}: input {up!r} is a {types[up]} sink, which has no output")
        if len(ups) > 1:
            raise UserError(f"operator {op.id!r} has several inputs ({', '.join(map(repr, ups))}): {_NOT_YET}")
        if len(consumers[op.id]) > 1:
            raise UserError(f"operator {op.id!r} feeds several operators "
                            f"({', '.join(map(repr, consumers[op.id]))}): {_NOT_YET}")
        if not ups:
            chain_of[op.id] = len(chains)
            chains.append(Chain(operators=[op.id], parallelism=parallelism[op.id]))
            continue
        up = ups[0]
        if _edge_kind(up, op.id, parallelism, consumers, inputs) == "forward":
            chain = chains[chain_of[up]]
            chain.operators.append(op.id)
            chain_of[op.id] = chain_of[up]
        else:
            raise UserError(
                f"edge {up!r} (parallelism {parallelism[up]}) -> {op.id!r} (parallelism {parallelism[op.id]}) "
                f"needs a shuffle: {_NOT_YET}"
            )
    return chains


def compile_program(pipeline: PipelineSpec, config: JobConfig) -> Program:
    """Validate `pipeline` under `config` and produce its physical program.

    Raises UserError naming the operator(s) for: an override of an unknown operator, a graph the
    engine cannot run yet, two sinks sharing a path, or a user function that cannot be imported or
    is not callable.
    """
    parallelism = effective_parallelism(pipeline, config)
    inputs = pipeline.input_ids()
    params = _params(pipeline)
    chains = _chains(pipeline, inputs, parallelism)
    _check_functions(pipeline)
    return Program(name=pipeline.name, operators=params, inputs=inputs, parallelism=parallelism, chains=chains)


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
