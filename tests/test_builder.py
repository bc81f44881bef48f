"""The Python pipeline builder gives the same PipelineSpec as the equivalent YAML file."""

from __future__ import annotations

import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

from sluice.builder import Pipeline, PipelineBuildError
from sluice.models import AggregateSpec, PipelineSpec

FAN_IN_YAML = """
name: clicks
parallelism: 2
operators:
  - {id: a, type: generator, splits: 4, keys: 100, limit: 10000}
  - {id: b, type: generator, splits: 4, keys: 100, limit: 10000}
  - {id: both, type: union, inputs: [a, b]}
  - {id: by_key, type: key_by, key: key, inputs: [both]}
  - id: counts
    type: tumbling_window
    size_ms: 1000
    aggregates: [{fn: count}, {fn: sum, column: value, as: total}]
    inputs: [by_key]
  - {id: out, type: files, path: out/clicks, format: jsonl, inputs: [counts]}
"""


def fan_in_builder() -> Pipeline:
    p = Pipeline("clicks", parallelism=2)
    a = p.generator("a", splits=4, keys=100, limit=10_000)
    b = p.generator("b", splits=4, keys=100, limit=10_000)
    w = (
        p.union("both", a, b)
        .key_by("by_key", "key")
        .tumbling_window("counts", size_ms=1000, aggregates=[("count",), ("sum", "value", "total")])
    )
    w.files("out", path="out/clicks", format="jsonl")
    return p


def from_yaml(text: str) -> PipelineSpec:
    return PipelineSpec.model_validate(yaml.safe_load(text))


def test_builder_equals_yaml_for_a_two_source_fan_in() -> None:
    built = fan_in_builder().build()
    parsed = from_yaml(FAN_IN_YAML)
    assert built == parsed
    # Same fields set, too: dumps (what the compiler stores) are identical.
    assert built.model_dump(by_alias=True, exclude_unset=True) == parsed.model_dump(by_alias=True, exclude_unset=True)
    assert built.input_ids() == {
        "a": [], "b": [], "both": ["a", "b"], "by_key": ["both"], "counts": ["by_key"], "out": ["counts"]
    }
    assert [type(op).__name__ for op in built.operators] == [
        "GeneratorOperator", "GeneratorOperator", "UnionOperator", "KeyByOperator",
        "TumblingWindowOperator", "FilesSinkOperator",
    ]
    # The builder's plain-data form is itself a valid pipeline file.
    assert PipelineSpec.model_validate(yaml.safe_load(yaml.safe_dump(fan_in_builder().to_dict()))) == parsed


def test_builder_graph_matches_yaml_with_implicit_chain_edges() -> None:
    # A YAML file may rely on "input = the previous operator"; the builder writes inputs out.
    implicit = from_yaml(
        """
name: chain
operators:
  - {id: src, type: generator, limit: 10}
  - {id: big, type: filter, expr: "value > 500"}
  - {id: sink, type: "null"}
"""
    )
    p = Pipeline("chain")
    p.generator("src", limit=10).filter("big", expr="value > 500").null("sink")
    built = p.build()
    assert built.input_ids() == implicit.input_ids()
    assert [op.model_dump(exclude={"inputs"}) for op in built.operators] == [
        op.model_dump(exclude={"inputs"}) for op in implicit.operators
    ]


def is_big(batch: pa.RecordBatch) -> pa.Array:  # referenced by the builder test below
    return pa.array([True] * batch.num_rows)


def test_every_operator_type_has_a_method() -> None:
    p = Pipeline("all_ops", parallelism=3)
    g = p.generator("gen", splits=2, rate=10.0, batch_size=100, out_of_orderness_ms=5)
    f = p.files_source(
        "files_in", "in/dir", format="csv", schema={"key": "string", "ts": "timestamp"}, event_time="ts", follow=True
    )
    u = g.union("u", f, parallelism=1)
    m = u.map("m", "examples.clicks:is_big")
    fl = m.filter("fl", fn=is_big).filter("fl2", expr="value > 1")
    pr = fl.project("pr", {"key": "key", "v2": "value * 2", "ts": "ts"})
    k = pr.key_by("k", ["key"])
    k.tumbling_window("tw", size_ms=10, time="ts", allowed_lateness_ms=5).stdout("out1")
    k.sliding_window("sw", size_ms=10, slide_ms=5, aggregates=[{"fn": "max", "column": "v2"}]).null("out2")
    k.aggregate("agg", aggregates=[AggregateSpec(fn="mean", column="v2", **{"as": "avg"})]).files(
        "out3", "out/x", format="parquet"
    )
    pr.project("keep", ["key"]).stdout("out4")
    spec = p.build()
    types = {op.id: op.type for op in spec.operators}
    assert types == {
        "gen": "generator", "files_in": "files", "u": "union", "m": "map", "fl": "filter", "fl2": "filter",
        "pr": "project", "k": "key_by", "tw": "tumbling_window", "out1": "stdout", "sw": "sliding_window",
        "out2": "null", "agg": "aggregate", "out3": "files", "keep": "project", "out4": "stdout",
    }
    ops = {op.id: op for op in spec.operators}
    assert ops["files_in"].kind == "source" and ops["out3"].kind == "sink"
    assert ops["files_in"].columns() == ["key", "ts"]
    assert ops["fl"].fn == f"{__name__}:is_big"
    assert ops["agg"].aggregates[0].name == "avg"
    assert ops["u"].inputs == ["gen", "files_in"] and ops["u"].parallelism == 1
    assert ops["keep"].inputs == ["pr"]


def test_unknown_input_is_a_clear_error() -> None:
    p = Pipeline("p")
    a = p.generator("a")
    with pytest.raises(PipelineBuildError, match="input 'nope' is not an operator defined before it"):
        p.union("u", a, "nope")
    other = Pipeline("other").generator("x")
    with pytest.raises(PipelineBuildError, match="input 'x' belongs to pipeline 'other'"):
        p.union("u", a, other)
    sink = a.null("sink")
    with pytest.raises(PipelineBuildError, match="is a sink"):
        p.union("u", a, sink)  # type: ignore[arg-type]
    with pytest.raises(PipelineBuildError, match="needs at least one input"):
        p.union("u")
    assert p.operator_ids == ["a", "sink"]  # failed calls added nothing


def test_duplicate_id_is_a_clear_error() -> None:
    p = Pipeline("p")
    a = p.generator("a")
    with pytest.raises(PipelineBuildError, match="duplicate operator id 'a' in pipeline 'p'"):
        a.map("a", "mod:fn")
    # The same mistake in a file is reported by the spec's own validation.
    with pytest.raises(ValidationError, match="duplicate operator id 'a'"):
        from_yaml("name: p\noperators: [{id: a, type: generator}, {id: a, type: 'null'}]")


def test_invalid_parameters_are_pydantic_errors_naming_the_field() -> None:
    p = Pipeline("p")
    p.generator("g", splits=0).null("n")
    with pytest.raises(ValidationError) as ei:
        p.build()
    assert any(e["loc"][-1] == "splits" for e in ei.value.errors())

    p = Pipeline("p")
    p.generator("g").filter("f")  # neither expr nor fn
    with pytest.raises(ValidationError, match="needs exactly one of 'expr' or 'fn'"):
        p.build()

    p = Pipeline("p")
    p.generator("g").key_by("k", "key").sliding_window("w", size_ms=10, slide_ms=3)
    with pytest.raises(ValidationError, match="must be a multiple of slide_ms"):
        p.build()

    p = Pipeline("bad name!")
    p.generator("g")
    with pytest.raises(ValidationError, match="pipeline name"):
        p.build()


def test_functions_must_be_importable_references() -> None:
    p = Pipeline("p")
    g = p.generator("g")
    with pytest.raises(PipelineBuildError, match="cannot be referenced by runners"):
        g.map("m", lambda b: b)

    def local(b: pa.RecordBatch) -> pa.RecordBatch:
        return b

    with pytest.raises(PipelineBuildError, match="cannot be referenced by runners"):
        g.map("m", local)
    with pytest.raises(PipelineBuildError, match="aggregates must be a list"):
        g.key_by("k", "key").aggregate("a", aggregates=("count",))  # type: ignore[arg-type]
