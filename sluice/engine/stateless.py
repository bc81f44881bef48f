"""Stateless relational operators: ``project``, ``key_by`` and ``union``.

* ``project`` computes each output column from an expression (:mod:`sluice.engine.expressions`);
  an output that is just a column reference is the input column itself, never copied.
* ``key_by`` passes batches through unchanged after checking that its key columns exist: the
  partitioning by key is done by the task's output router with :mod:`sluice.engine.keys`.
* ``union`` passes batches through; the task checks that its inputs agree on columns with
  :func:`check_same_schema`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from sluice.engine.expressions import (
    CompiledExpression,
    MissingColumnError,
    as_array,
    compile_for,
)
from sluice.engine.operators import Operator, OperatorContext
from sluice.models import KeyByOperator as KeyBySpec
from sluice.models import ProjectOperator as ProjectSpec


def spec_params(model: type[Any], params: dict[str, Any]) -> dict[str, Any]:
    """`params` restricted to the fields `model` declares (by name or alias): the compiler adds
    keys of its own (``key`` for keyed operators) that the pipeline-file contracts forbid."""
    known: set[str] = set()
    for name, field in model.model_fields.items():
        known.add(name)
        if field.alias:
            known.add(field.alias)
    return {k: v for k, v in params.items() if k in known}


class ProjectOperator(Operator):
    """Keeps and computes columns: ``columns`` is a list of input columns to keep, or a mapping
    output name -> expression, in output order."""

    type_name = "project"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = ProjectSpec.model_validate(spec_params(ProjectSpec, params))
        self.outputs: list[tuple[str, CompiledExpression | str]] = []

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        if isinstance(self.spec.columns, list):
            # a list names columns as they are (spaces and all), not expressions
            self.outputs = [(c, c) for c in self.spec.columns]
        else:
            self.outputs = [(name, compile_for("project", self.operator_id, text))
                            for name, text in self.spec.columns.items()]

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        arrays: list[pa.Array] = []
        names: list[str] = []
        for name, source in self.outputs:
            if isinstance(source, str) or source.column is not None:
                column = source if isinstance(source, str) else source.column
                assert column is not None
                idx = batch.schema.get_field_index(column)
                if idx < 0:
                    raise MissingColumnError("project", self.operator_id, column, batch.schema.names,
                                             context=f" (for output {name!r})")
                arrays.append(batch.column(idx))
            else:
                value = as_array(source.evaluate(batch, "project", self.operator_id), batch.num_rows)
                if isinstance(value, pa.ChunkedArray):
                    value = value.combine_chunks()
                arrays.append(value)
            names.append(name)
        return [pa.RecordBatch.from_arrays(arrays, names=names)]


class KeyByOperator(Operator):
    """Pass-through that checks the key columns exist in every batch (the task partitions by them)."""

    type_name = "key_by"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = KeyBySpec.model_validate(spec_params(KeyBySpec, params))
        self.key: list[str] = list(self.spec.key)

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        check_key_columns("key_by", self.operator_id, self.key, batch.schema)
        return [batch] if batch.num_rows else []


class UnionOperator(Operator):
    """Pass-through: merging its inputs is the task's work (see :func:`check_same_schema`)."""

    type_name = "union"


def check_key_columns(operator: str, operator_id: str, key: list[str], schema: pa.Schema) -> None:
    """Raise MissingColumnError (a KeyError) naming the operator, the first missing key column and
    the columns there are."""
    for name in key:
        if schema.get_field_index(name) < 0:
            raise MissingColumnError(operator, operator_id, name, schema.names, role="key column")


def check_same_schema(operator_id: str, expected: pa.Schema, got: pa.Schema) -> None:
    """Raise ValueError naming `operator_id` and every differing column when `got` does not have
    the columns of `expected` (same names, types and order; nullability and metadata ignored)."""
    exp = [(f.name, f.type) for f in expected]
    have = [(f.name, f.type) for f in got]
    if exp == have:
        return
    problems: list[str] = []
    exp_types, got_types = dict(exp), dict(have)
    missing = [n for n, _ in exp if n not in got_types]
    extra = [n for n, _ in have if n not in exp_types]
    if missing:
        problems.append(f"missing {', '.join(map(repr, missing))}")
    if extra:
        problems.append(f"unexpected {', '.join(map(repr, extra))}")
    for n, t in exp:
        if n in got_types and got_types[n] != t:
            problems.append(f"{n!r} is {got_types[n]} instead of {t}")
    if not problems:
        problems.append(f"columns in another order ({', '.join(expected.names)} expected, got {', '.join(got.names)})")
    raise ValueError(f"union {operator_id!r}: inputs have different columns: {'; '.join(problems)}")


__all__ = ["KeyByOperator", "ProjectOperator", "UnionOperator", "check_key_columns", "check_same_schema", "spec_params"]
