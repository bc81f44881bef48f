"""Build pipelines in Python: the same :class:`~sluice.models.PipelineSpec` a YAML file gives.

::

    from sluice.builder import Pipeline

    p = Pipeline("clicks", parallelism=2)
    a = p.generator("a", splits=4, keys=100, limit=10_000)
    b = p.generator("b", splits=4, keys=100, limit=10_000)
    w = (
        p.union("both", a, b)
        .key_by("by_key", "key")
        .tumbling_window("counts", size_ms=1000, aggregates=[("count",), ("sum", "value", "total")])
    )
    w.files("out", path="out/clicks", format="jsonl")
    spec = p.build()

Guarantees:

* Sources and :meth:`Pipeline.union` are methods of :class:`Pipeline`; every other operator is a
  method of the :class:`Stream` it reads, returning the new operator's stream (sinks return a
  :class:`Sink`, which has nothing to chain). Every non-source operator gets ``inputs`` written
  out, so the spec does not depend on the order operators were added in.
* Only the parameters you pass are written into the spec (an argument left at ``None`` means "the
  operator's default"), so a builder and a YAML file that say the same thing give equal specs.
* Mistakes the builder can see (an id used twice, an input that is not a stream of this pipeline
  or an id defined before) raise :class:`PipelineBuildError` at the call that makes them; all
  others are pydantic's ValidationError from :meth:`Pipeline.build`, naming the field.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from sluice.models import AggregateSpec, ColumnType, FileFormat, PipelineSpec

__all__ = ["AggregateLike", "Pipeline", "PipelineBuildError", "Sink", "Stream"]

AggregateLike = tuple[str, ...] | Mapping[str, Any] | AggregateSpec
"""One aggregate: ``("count",)``, ``("sum", "value")``, ``("sum", "value", "total")`` (fn,
column, output name), a dict as in YAML (``{"fn": "sum", "column": "value", "as": "total"}``), or
an :class:`~sluice.models.AggregateSpec`."""

FunctionLike = str | Callable[..., Any]
"""A user function: ``"package.module:function"``, or a module-level function object (turned into
that reference; it must be importable by the runners, so not defined in ``__main__``)."""


class PipelineBuildError(ValueError):
    """A pipeline cannot be built as asked (duplicate id, unknown input, unusable function)."""


def _fn_ref(fn: FunctionLike) -> str:
    if isinstance(fn, str):
        return fn
    if not callable(fn):
        raise PipelineBuildError(f"fn must be 'module:function' or a function, got {fn!r}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    name = getattr(fn, "__name__", "")
    if not module or module == "__main__" or qualname != name or not inspect.isfunction(fn) or name == "<lambda>":
        raise PipelineBuildError(
            f"function {qualname or fn!r} cannot be referenced by runners: pass a module-level "
            f"function of an importable module, or a 'module:function' string"
        )
    return f"{module}:{name}"


def _aggregate(a: AggregateLike) -> dict[str, Any]:
    if isinstance(a, AggregateSpec):
        return a.model_dump(by_alias=True, exclude_unset=True)
    if isinstance(a, Mapping):
        return dict(a)
    if isinstance(a, tuple) and 1 <= len(a) <= 3:
        out: dict[str, Any] = {"fn": a[0]}
        if len(a) > 1 and a[1] is not None:
            out["column"] = a[1]
        if len(a) > 2 and a[2] is not None:
            out["as"] = a[2]
        return out
    raise PipelineBuildError(f"aggregate must be (fn[, column[, as]]), a dict or an AggregateSpec; got {a!r}")


def _given(**params: Any) -> dict[str, Any]:
    """The parameters actually passed: None means "not given, the operator's default"."""
    return {k: v for k, v in params.items() if v is not None}


class Pipeline:
    """A pipeline under construction; :meth:`build` turns it into a validated PipelineSpec.

    `parallelism` is the pipeline's default parallelism (each operator can override it).
    """

    def __init__(self, name: str, parallelism: int | None = None) -> None:
        self.name = name
        self.parallelism = parallelism
        self._operators: list[dict[str, Any]] = []
        self._ids: set[str] = set()

    # -- sources ----------------------------------------------------------------------------------

    def generator(
        self,
        id: str,
        *,
        splits: int | None = None,
        keys: int | None = None,
        limit: int | None = None,
        rate: float | None = None,
        batch_size: int | None = None,
        out_of_orderness_ms: int | None = None,
        parallelism: int | None = None,
    ) -> Stream:
        """Deterministic source (type ``generator``): columns split, seq, key, ts, value.
        Defaults: splits 1, keys 100, limit unbounded, rate unlimited, batch_size 4096."""
        return self._add(
            id,
            "generator",
            [],
            _given(
                splits=splits,
                keys=keys,
                limit=limit,
                rate=rate,
                batch_size=batch_size,
                out_of_orderness_ms=out_of_orderness_ms,
                parallelism=parallelism,
            ),
        )

    def files_source(
        self,
        id: str,
        path: str,
        *,
        format: FileFormat | None = None,
        schema: Mapping[str, ColumnType] | None = None,
        event_time: str | None = None,
        follow: bool | None = None,
        poll_interval_s: float | None = None,
        batch_size: int | None = None,
        out_of_orderness_ms: int | None = None,
        parallelism: int | None = None,
    ) -> Stream:
        """Files source (type ``files``, role ``source``): JSON lines, CSV or Parquet files under
        `path`, one split per file. Defaults: format jsonl, schema inferred, no event time."""
        params = _given(
            path=path,
            format=format,
            schema=dict(schema) if schema is not None else None,
            event_time=event_time,
            follow=follow,
            poll_interval_s=poll_interval_s,
            batch_size=batch_size,
            out_of_orderness_ms=out_of_orderness_ms,
            parallelism=parallelism,
        )
        return self._add(id, "files", [], {"role": "source", **params})

    # -- fan-in -----------------------------------------------------------------------------------

    def union(self, id: str, *inputs: Stream | str, parallelism: int | None = None) -> Stream:
        """Merge `inputs` (streams of this pipeline, or ids of operators defined before; same
        columns) into one stream (type ``union``)."""
        if not inputs:
            raise PipelineBuildError(f"union {id!r} needs at least one input")
        return self._add(id, "union", list(inputs), _given(parallelism=parallelism))

    # -- result -----------------------------------------------------------------------------------

    def build(self) -> PipelineSpec:
        """The PipelineSpec, validated exactly as a pipeline file is (pydantic ValidationError
        naming the field on a bad parameter)."""
        data: dict[str, Any] = {"name": self.name, "operators": [dict(op) for op in self._operators]}
        if self.parallelism is not None:
            data["parallelism"] = self.parallelism
        return PipelineSpec.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        """The pipeline as the plain data of a pipeline file (what :meth:`build` validates)."""
        spec = self.build()
        return spec.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @property
    def operator_ids(self) -> list[str]:
        return [op["id"] for op in self._operators]

    # -- internal ---------------------------------------------------------------------------------

    def _resolve(self, upstream: Stream | Sink | str, for_id: str) -> str:
        if isinstance(upstream, Sink):
            raise PipelineBuildError(
                f"operator {for_id!r}: input {upstream.id!r} is a sink; a sink has no output stream"
            )
        if isinstance(upstream, Stream):
            if upstream.pipeline is not self:
                raise PipelineBuildError(
                    f"operator {for_id!r}: input {upstream.id!r} belongs to pipeline "
                    f"{upstream.pipeline.name!r}, not {self.name!r}"
                )
            return upstream.id
        if isinstance(upstream, str):
            if upstream not in self._ids:
                known = ", ".join(self.operator_ids) or "none"
                raise PipelineBuildError(
                    f"operator {for_id!r}: input {upstream!r} is not an operator defined before it (defined: {known})"
                )
            return upstream
        raise PipelineBuildError(
            f"operator {for_id!r}: an input must be a Stream of this pipeline or an operator id, got {upstream!r}"
        )

    def _add(self, id: str, type_: str, inputs: Sequence[Stream | Sink | str], params: dict[str, Any]) -> Stream:
        if not isinstance(id, str):
            raise PipelineBuildError(f"operator id must be a string, got {id!r}")
        if id in self._ids:
            raise PipelineBuildError(f"duplicate operator id {id!r} in pipeline {self.name!r}")
        op: dict[str, Any] = {"id": id, "type": type_, **params}
        if inputs:
            op["inputs"] = [self._resolve(u, id) for u in inputs]
        self._operators.append(op)
        self._ids.add(id)
        return Stream(self, id)


class Stream:
    """The output of an operator of a :class:`Pipeline`; its methods add the next operator, which
    reads this stream, and return that operator's output."""

    def __init__(self, pipeline: Pipeline, id: str) -> None:
        self.pipeline = pipeline
        self.id = id

    def __repr__(self) -> str:
        return f"Stream({self.pipeline.name}.{self.id})"

    def _next(self, id: str, type_: str, params: dict[str, Any], others: Iterable[Stream | str] = ()) -> Stream:
        return self.pipeline._add(id, type_, [self, *others], params)

    def map(self, id: str, fn: FunctionLike, *, parallelism: int | None = None) -> Stream:
        """``fn(batch) -> batch`` on each record batch (type ``map``)."""
        return self._next(id, "map", _given(fn=_fn_ref(fn), parallelism=parallelism))

    def filter(
        self,
        id: str,
        *,
        expr: str | None = None,
        fn: FunctionLike | None = None,
        parallelism: int | None = None,
    ) -> Stream:
        """Keep the rows where `expr` (a pyarrow compute expression) or `fn(batch)` (a boolean
        mask) is true; exactly one of the two (type ``filter``)."""
        return self._next(
            id, "filter", _given(expr=expr, fn=_fn_ref(fn) if fn is not None else None, parallelism=parallelism)
        )

    def project(self, id: str, columns: Mapping[str, str] | Sequence[str], *, parallelism: int | None = None) -> Stream:
        """Keep and compute columns: a list keeps those, a dict maps output column -> expression
        (type ``project``)."""
        cols: Any = columns  # a bare string is left for the spec's validation to reject, as in YAML
        if isinstance(columns, Mapping):
            cols = dict(columns)
        elif not isinstance(columns, str):
            cols = list(columns)
        return self._next(id, "project", _given(columns=cols, parallelism=parallelism))

    def key_by(self, id: str, key: str | Sequence[str], *, parallelism: int | None = None) -> Stream:
        """Partition by the hash of the `key` column(s); the next operator is keyed (type ``key_by``)."""
        return self._next(id, "key_by", _given(key=key if isinstance(key, str) else list(key), parallelism=parallelism))

    def union(self, id: str, *others: Stream | str, parallelism: int | None = None) -> Stream:
        """Merge this stream with `others` (type ``union``)."""
        return self._next(id, "union", _given(parallelism=parallelism), others)

    def tumbling_window(
        self,
        id: str,
        *,
        size_ms: int,
        time: str | None = None,
        allowed_lateness_ms: int | None = None,
        aggregates: Sequence[AggregateLike] | None = None,
        parallelism: int | None = None,
    ) -> Stream:
        """Keyed event-time tumbling windows of `size_ms` (type ``tumbling_window``). Defaults:
        time column ``ts``, no allowed lateness, aggregates ``[("count",)]``."""
        return self._next(
            id, "tumbling_window", self._window(size_ms, time, allowed_lateness_ms, aggregates, parallelism)
        )

    def sliding_window(
        self,
        id: str,
        *,
        size_ms: int,
        slide_ms: int,
        time: str | None = None,
        allowed_lateness_ms: int | None = None,
        aggregates: Sequence[AggregateLike] | None = None,
        parallelism: int | None = None,
    ) -> Stream:
        """Keyed event-time windows of `size_ms` every `slide_ms` (a divisor of size_ms; type
        ``sliding_window``)."""
        params = self._window(size_ms, time, allowed_lateness_ms, aggregates, parallelism)
        return self._next(id, "sliding_window", {"slide_ms": slide_ms, **params})

    def aggregate(
        self, id: str, *, aggregates: Sequence[AggregateLike] | None = None, parallelism: int | None = None
    ) -> Stream:
        """Keyed running aggregate with updating output (type ``aggregate``); default ``[("count",)]``."""
        return self._next(id, "aggregate", _given(aggregates=self._aggregates(aggregates), parallelism=parallelism))

    # -- sinks ------------------------------------------------------------------------------------

    def files(
        self, id: str, path: str, *, format: Literal["jsonl", "parquet"] | None = None, parallelism: int | None = None
    ) -> Sink:
        """Exactly-once file sink under `path` (type ``files``, role ``sink``); format jsonl
        (default) or parquet."""
        self._next(id, "files", _given(path=path, format=format, parallelism=parallelism))
        return Sink(self.pipeline, id)

    def stdout(self, id: str, *, parallelism: int | None = None) -> Sink:
        """Print rows as JSON lines on the runner's stdout (type ``stdout``)."""
        self._next(id, "stdout", _given(parallelism=parallelism))
        return Sink(self.pipeline, id)

    def null(self, id: str, *, parallelism: int | None = None) -> Sink:
        """Discard rows, counting them (type ``null``)."""
        self._next(id, "null", _given(parallelism=parallelism))
        return Sink(self.pipeline, id)

    # -- internal ---------------------------------------------------------------------------------

    @staticmethod
    def _aggregates(aggregates: Sequence[AggregateLike] | None) -> list[dict[str, Any]] | None:
        if aggregates is None:
            return None
        if isinstance(aggregates, (str, tuple, Mapping, AggregateSpec)):
            # A lone aggregate, e.g. aggregates=("count",): almost certainly meant as a list of one.
            raise PipelineBuildError(f"aggregates must be a list of aggregates, got {aggregates!r}")
        return [_aggregate(a) for a in aggregates]

    def _window(
        self,
        size_ms: int,
        time: str | None,
        allowed_lateness_ms: int | None,
        aggregates: Sequence[AggregateLike] | None,
        parallelism: int | None,
    ) -> dict[str, Any]:
        return _given(
            size_ms=size_ms,
            time=time,
            allowed_lateness_ms=allowed_lateness_ms,
            aggregates=self._aggregates(aggregates),
            parallelism=parallelism,
        )


class Sink:
    """A sink operator of a :class:`Pipeline`: the end of a stream (nothing chains after it)."""

    def __init__(self, pipeline: Pipeline, id: str) -> None:
        self.pipeline = pipeline
        self.id = id

    def __repr__(self) -> str:
        return f"Sink({self.pipeline.name}.{self.id})"
