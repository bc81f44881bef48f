"""Operator classes by the type names used in pipeline files."""

from __future__ import annotations

from typing import Any

from sluice import connectors
from sluice.engine.operators import Operator
from sluice.engine.transforms import FilterOperator, MapOperator

TRANSFORMS: dict[str, type[Operator]] = {"map": MapOperator, "filter": FilterOperator}


def operator_class(type_name: str) -> type[Operator]:
    """The class implementing `type_name`; KeyError when no operator has that type."""
    cls = TRANSFORMS.get(type_name) or connectors.source_class(type_name) or connectors.sink_class(type_name)
    if cls is None:
        raise KeyError(f"no operator type {type_name!r}")
    return cls


def build_operator(operator_id: str, params: dict[str, Any]) -> Operator:
    """A fresh, unopened operator instance for one subtask."""
    return operator_class(params["type"])(operator_id, params)
