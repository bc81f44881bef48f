"""Operator classes by the type names used in pipeline files."""

from __future__ import annotations

from typing import Any

from sluice import connectors
from sluice.engine.aggregates import RunningAggregateOperator
from sluice.engine.operators import Operator
from sluice.engine.stateless import KeyByOperator, ProjectOperator, UnionOperator
from sluice.engine.transforms import FilterOperator, MapOperator
from sluice.engine.windows import SlidingWindowOperator, TumblingWindowOperator

TRANSFORMS: dict[str, type[Operator]] = {
    "map": MapOperator,
    "filter": FilterOperator,
    "project": ProjectOperator,
    "key_by": KeyByOperator,
    "union": UnionOperator,
    "tumbling_window": TumblingWindowOperator,
    "sliding_window": SlidingWindowOperator,
    "aggregate": RunningAggregateOperator,
}


def operator_class(params: dict[str, Any]) -> type[Operator]:
    """The class implementing an operator's `type` (and `role`, for a type that is both a source
    and a sink); KeyError when no operator has that type."""
    cls = TRANSFORMS.get(params["type"]) or connectors.connector_class(params)
    if cls is None:
        raise KeyError(f"no operator type {params['type']!r}")
    return cls


def build_operator(operator_id: str, params: dict[str, Any]) -> Operator:
    """A fresh, unopened operator instance for one subtask."""
    return operator_class(params)(operator_id, params)
