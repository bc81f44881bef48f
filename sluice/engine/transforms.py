"""Stateless transforms on whole record batches: ``map`` (a user function) and ``filter`` (an
expression of :mod:`sluice.engine.expressions`, or a user function returning a mask)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from sluice.engine.expressions import CompiledExpression, ExpressionError, compile_for
from sluice.engine.functions import load_function
from sluice.engine.operators import Operator, OperatorContext, UserFunctionError


class _UserFunctionOperator(Operator):
    """Resolves ``params['fn']`` at open; the compiler already checked that it imports."""

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.fn_ref: str = params["fn"]
        self.fn: Callable[[pa.RecordBatch], Any] | None = None

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        self.fn = load_function(self.fn_ref)

    def _call(self, batch: pa.RecordBatch) -> Any:
        assert self.fn is not None, "operator used before open()"
        try:
            return self.fn(batch)
        except Exception as exc:
            raise UserFunctionError(self.operator_id, self.fn_ref, exc) from exc


class MapOperator(_UserFunctionOperator):
    """``fn(batch) -> RecordBatch | Table``; an empty result is dropped."""

    type_name = "map"

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        out = self._call(batch)
        if isinstance(out, pa.RecordBatch):
            return [out] if out.num_rows else []
        if isinstance(out, pa.Table):
            return [b for b in out.to_batches() if b.num_rows]
        raise UserFunctionError(
            self.operator_id, self.fn_ref,
            f"returned {type(out).__name__}, expected pyarrow.RecordBatch or pyarrow.Table",
        )


class FilterOperator(Operator):
    """Keeps the rows where ``params['expr']`` is true, or where ``fn(batch) -> mask`` (pyarrow
    array, numpy array or list of bools) is true. A null (in the expression's value or the mask)
    drops its row.

    A bad expression fails open() with an ExpressionError naming the operator and the expression;
    evaluation failures (missing column, type mismatch, invalid value) raise MissingColumnError /
    ExpressionError naming the operator, the expression and the culprit. All are failures of
    domain `user`, not retryable.
    """

    type_name = "filter"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.expr_text: str | None = params.get("expr")
        self.fn_ref: str | None = params.get("fn")
        if (self.expr_text is None) == (self.fn_ref is None):
            raise ValueError(f"filter {operator_id!r} needs exactly one of 'expr' or 'fn'")
        self.fn: Callable[[pa.RecordBatch], Any] | None = None
        self.expr: CompiledExpression | None = None

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        if self.expr_text is not None:
            self.expr = compile_for("filter", self.operator_id, self.expr_text)
        else:
            assert self.fn_ref is not None
            self.fn = load_function(self.fn_ref)

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        mask = self._expr_mask(batch) if self.expr is not None else self._fn_mask(batch)
        if mask is None:
            return []
        if isinstance(mask, pa.ChunkedArray):
            mask = mask.combine_chunks()
        selected = mask.true_count
        if selected == batch.num_rows:
            return [batch]  # common for selective-but-not-here filters; skips the copy
        if selected == 0:
            return []
        return [batch.filter(mask)]

    def _expr_mask(self, batch: pa.RecordBatch) -> pa.Array | pa.ChunkedArray | None:
        assert self.expr is not None
        value = self.expr.evaluate(batch, "filter", self.operator_id)
        if isinstance(value, pa.Scalar):
            if value.type != pa.bool_():
                raise ExpressionError("filter", self.operator_id, self.expr.text,
                                      f"is a {value.type} value, not a condition (true/false)")
            return pa.repeat(value, batch.num_rows) if value.as_py() is True else None
        if value.type != pa.bool_():
            raise ExpressionError("filter", self.operator_id, self.expr.text,
                                  f"gives {value.type} values, not conditions (true/false)")
        return value

    def _fn_mask(self, batch: pa.RecordBatch) -> pa.Array:
        assert self.fn is not None and self.fn_ref is not None, "operator used before open()"
        try:
            raw = self.fn(batch)
        except Exception as exc:
            raise UserFunctionError(self.operator_id, self.fn_ref, exc) from exc
        try:
            if isinstance(raw, pa.ChunkedArray):
                raw = raw.combine_chunks()
            mask = raw if isinstance(raw, pa.Array) else pa.array(np.asarray(raw), type=pa.bool_())
            if mask.type != pa.bool_():
                mask = mask.cast(pa.bool_())
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise UserFunctionError(self.operator_id, self.fn_ref, f"mask is not boolean: {exc}") from exc
        if len(mask) != batch.num_rows:
            raise UserFunctionError(
                self.operator_id, self.fn_ref,
                f"mask has {len(mask)} values for a batch of {batch.num_rows} rows",
            )
        return mask
