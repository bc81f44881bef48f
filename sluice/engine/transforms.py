"""Stateless transforms that call user functions on whole record batches: ``map`` and ``filter``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

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


class FilterOperator(_UserFunctionOperator):
    """``fn(batch) -> mask`` (pyarrow array, numpy array or list of bools); keeps rows where true.

    A null in the mask drops its row.
    """

    type_name = "filter"

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        raw = self._call(batch)
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
        out = batch.filter(mask)
        return [out] if out.num_rows else []
