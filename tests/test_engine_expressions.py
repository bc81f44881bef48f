"""The expression language, and the stateless operators built on it: filter, project, key_by, union."""

from __future__ import annotations

import pickle
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyarrow import acero

from sluice.engine.expressions import (
    ExpressionError,
    InvalidExpression,
    MissingColumnError,
    columns_of,
    compile_expression,
    parse_expression,
)
from sluice.engine.operators import OperatorContext
from sluice.engine.registry import build_operator
from sluice.engine.stateless import check_same_schema

CTX = OperatorContext("job", 1, "op", 0, 1)


def data() -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array(["a", "b", "c", None, "ab"]),
            pa.array([1, -7, 600, 500, None], pa.int64()),
            pa.array([0.5, 2.0, None, -1.5, 3.25]),
            pa.array([True, False, None, True, False]),
            pa.array([1_704_067_200_000 + i for i in range(5)], pa.timestamp("ms")),
            pa.array([10, 20, 30, 40, 50], pa.int64()),
        ],
        names=["key", "value", "x", "flag", "ts", "my col"],
    )


def evaluate(text: str) -> list[Any] | Any:
    out = compile_expression(text).evaluate(data(), "filter", "f")
    return out.as_py() if isinstance(out, pa.Scalar) else out.to_pylist()


def via_acero(text: str) -> list[Any]:
    table = pa.Table.from_batches([data()])
    return acero.Declaration.from_sequence([
        acero.Declaration("table_source", acero.TableSourceNodeOptions(table)),
        acero.Declaration("project", acero.ProjectNodeOptions([parse_expression(text)], ["out"])),
    ]).to_table().column("out").to_pylist()


@pytest.mark.parametrize(("text", "expected"), [
    ("value > 500", [False, False, True, False, None]),
    ("value + 1", [2, -6, 601, 501, None]),
    ("value - 1 * 2", [-1, -9, 598, 498, None]),
    ("value % 3", [1, 2, 0, 2, None]),  # Python's sign rule: -7 % 3 == 2
    ("value / 2", [0, -3, 300, 250, None]),  # integer division, as in Arrow
    ("x / 2", [0.25, 1.0, None, -0.75, 1.625]),
    ("-value", [-1, 7, -600, -500, None]),
    ("x ** 2", [0.25, 4.0, None, 2.25, 10.5625]),
    ("0 < value <= 500", [True, False, False, True, None]),
    ("value == 1 or key == 'b'", [True, True, False, None, None]),
    ("not flag", [False, True, None, False, True]),
    ("flag & (value > 0) | ~flag", [True, True, None, True, True]),
    ("key in ['a', 'c']", [True, False, True, False, False]),
    ("key not in ('a',)", [False, True, True, True, True]),
    ("value in [1, 500]", [True, False, False, True, False]),
    ("key is None", [False, False, False, True, False]),
    ("x is not None", [True, True, False, True, True]),
    ("col('my col') * 2", [20, 40, 60, 80, 100]),
    ("abs(value)", [1, 7, 600, 500, None]),
    ("round(x * 1.26, 1)", [0.6, 2.5, None, -1.9, 4.1]),
    ("floor(x)", [0.0, 2.0, None, -2.0, 3.0]),
    ("ceil(x)", [1.0, 2.0, None, -1.0, 4.0]),
    ("upper(key)", ["A", "B", "C", None, "AB"]),
    ("lower(upper(key))", ["a", "b", "c", None, "ab"]),
    ("utf8_length(key)", [1, 1, 1, None, 2]),
    ("starts_with(key, 'a')", [True, False, False, None, True]),
    ("if_else(value > 100, 'big', 'small')", ["small", "small", "big", "big", None]),
    ("coalesce(key, 'none')", ["a", "b", "c", "none", "ab"]),
    ("is_null(value)", [False, False, False, False, True]),
    ("is_valid(x)", [True, True, False, True, True]),
    ("cast(value, 'float64') / 2", [0.5, -3.5, 300.0, 250.0, None]),
    ("cast(x, 'string')", ["0.5", "2", None, "-1.5", "3.25"]),
    ("ts >= '2024-01-01T00:00:00.003'", [False, False, False, True, True]),
    ("year(ts)", [2024] * 5),
    ("1 + 2", 3),
])
def test_expressions_evaluate(text: str, expected: Any) -> None:
    assert evaluate(text) == expected


@pytest.mark.parametrize("text", [
    "value > 500", "value + x * 2", "value % 3", "-value % 7", "0 < value <= 500 and key != 'b'",
    "key in ['a', 'c']", "abs(value) > 3 or flag", "if_else(flag, value, -1)", "coalesce(x, 0.0) - 1",
])
def test_evaluation_agrees_with_the_arrow_expression(text: str) -> None:
    """The direct evaluator and the pyarrow Expression returned by parse_expression agree."""
    assert evaluate(text) == via_acero(text)


def test_columns_of() -> None:
    assert columns_of("value > 1 and upper(key) == 'A' or col('my col') in [1]") == {"value", "key", "my col"}
    assert columns_of("1 + 2") == set()
    assert compile_expression("value").column == "value"
    assert compile_expression("value + 0").column is None


@pytest.mark.parametrize(("text", "message"), [
    ("lambda x: x", "unsupported syntax 'Lambda' in expression \"lambda x: x\""),
    ("evil(x)", "unknown function 'evil'"),
    ("__import__('os').system('true')", "unsupported syntax 'Attribute'"),
    ("os.system('x')", "unsupported syntax 'Attribute'"),
    ("x[0]", "unsupported syntax 'Subscript'"),
    ("a if b else c", "unsupported syntax 'IfExp'"),
    ("x // 2", "unsupported syntax 'FloorDiv'"),
    ("[x for x in y]", "unsupported syntax 'ListComp'"),
    ("f'{x}'", "unsupported syntax 'JoinedStr'"),
    ("value >", "invalid syntax"),
    ("x = 1", "invalid syntax"),
    ("", "nothing to evaluate"),
    ("round(x, y)", "argument 'ndigits' of round() must be a literal"),
    ("starts_with(key)", "starts_with() takes 1 plus pattern arguments"),
    ("abs(x, y)", "abs() takes 1 arguments"),
    ("round(x, ndigits=2)", "keyword arguments are not supported"),
    ("cast(x, 'nope')", "unknown type 'nope'"),
    ("col(x)", "col() takes one string literal"),
    ("x in y", "'in' needs a literal list"),
    ("x in [1, 'a']", "must share one type"),
    ("x is 1", "'is' only compares with None"),
    ("b'bytes'", "unsupported literal"),
])
def test_expressions_are_rejected_with_the_offending_part(text: str, message: str) -> None:
    with pytest.raises(InvalidExpression) as info:
        parse_expression(text)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def open_op(params: dict[str, Any]) -> Any:
    op = build_operator(params["id"], params)
    op.open(CTX, [])
    return op


def test_filter_with_an_expression_keeps_true_rows() -> None:
    op = open_op({"id": "f", "type": "filter", "expr": "value > 0 and key != 'c'", "fn": None})
    (out,) = op.process(data())
    assert out.column("key").to_pylist() == ["a"]
    assert out.schema == data().schema
    everything = open_op({"id": "f", "type": "filter", "expr": "value > -100 or value is None"})
    assert everything.process(data()) == [data()]
    assert open_op({"id": "f", "type": "filter", "expr": "value > 10000"}).process(data()) == []
    assert open_op({"id": "f", "type": "filter", "expr": "True"}).process(data())[0].num_rows == 5


def test_filter_reports_a_bad_expression_at_open() -> None:
    op = build_operator("f", {"id": "f", "type": "filter", "expr": "value >> 2"})
    with pytest.raises(ExpressionError) as info:
        op.open(CTX, [])
    assert str(info.value) == "filter 'f': expression \"value >> 2\": unsupported syntax 'RShift'"
    assert info.value.retryable is False


def test_filter_runtime_errors_name_operator_expression_and_culprit() -> None:
    op = open_op({"id": "f", "type": "filter", "expr": "missing > 1"})
    with pytest.raises(MissingColumnError) as missing:
        op.process(data())
    assert str(missing.value) == ("filter 'f': column 'missing' (read by expression \"missing > 1\") is not in the "
                                  "input (columns: key, value, x, flag, ts, my col)")
    assert isinstance(missing.value, KeyError)
    assert missing.value.retryable is False  # a restart would replay the same input
    op = open_op({"id": "f", "type": "filter", "expr": "value > 0 and key > 3"})
    with pytest.raises(ExpressionError, match=r"filter 'f': expression \"value > 0 and key > 3\": 'key > 3' cannot be "
                                              r"computed for column 'key' \(string\), 3 \(int64\)"):
        op.process(data())
    op = open_op({"id": "f", "type": "filter", "expr": "value / (value - value) > 1"})
    with pytest.raises(ExpressionError, match="divide by zero"):
        op.process(data())
    op = open_op({"id": "f", "type": "filter", "expr": "value + 1"})
    with pytest.raises(ExpressionError, match="gives int64 values, not conditions"):
        op.process(data())
    with pytest.raises(ExpressionError) as info:
        open_op({"id": "f", "type": "filter", "expr": "cast(key, 'int64') > 0"}).process(data())
    restored = pickle.loads(pickle.dumps(info.value))
    assert str(restored) == str(info.value) and restored.operator_id == "f"


def test_filter_with_a_function_still_works(tmp_path: Any) -> None:
    from tests.engine_helpers import user_module

    mod = user_module(
        tmp_path,
        "def positive(batch):\n"
        "    return [v is not None and v > 0 for v in batch.column('value').to_pylist()]\n",
    )
    op = open_op({"id": "f", "type": "filter", "fn": f"{mod}:positive", "expr": None})
    assert op.process(data())[0].column("value").to_pylist() == [1, 600, 500]


def test_project_computes_columns_and_keeps_references_zero_copy() -> None:
    op = open_op({"id": "p", "type": "project",
                  "columns": {"name": "key", "double": "value * 2", "one": "1", "spaced": "col('my col')"}})
    batch = data()
    (out,) = op.process(batch)
    assert out.schema.names == ["name", "double", "one", "spaced"]
    assert out.column("double").to_pylist() == [2, -14, 1200, 1000, None]
    assert out.column("one").to_pylist() == [1] * 5
    assert out.column("name").buffers()[1].address == batch.column("key").buffers()[1].address
    kept = open_op({"id": "p", "type": "project", "columns": ["my col", "key"]})
    (out,) = kept.process(batch)
    assert out.schema.names == ["my col", "key"]
    with pytest.raises(MissingColumnError, match=r"project 'p': column 'nope' \(for output 'nope'\)"):
        open_op({"id": "p", "type": "project", "columns": ["nope"]}).process(batch)
    with pytest.raises(ExpressionError, match=re.escape("project 'q': expression \"value +\": invalid syntax")):
        open_op({"id": "q", "type": "project", "columns": {"v": "value +"}})


def test_key_by_passes_batches_and_names_missing_key_columns() -> None:
    op = open_op({"id": "kb", "type": "key_by", "key": ["key", "value"]})
    assert op.process(data()) == [data()]
    bad = open_op({"id": "kb", "type": "key_by", "key": "user"})
    with pytest.raises(KeyError) as info:
        bad.process(data())
    assert str(info.value) == ("key_by 'kb': key column 'user' is not in the input "
                               "(columns: key, value, x, flag, ts, my col)")


def test_union_passes_through_and_schema_check_names_differences() -> None:
    op = open_op({"id": "u", "type": "union"})
    assert op.process(data()) == [data()]
    schema = data().schema
    check_same_schema("u", schema, schema)
    check_same_schema("u", schema, pa.schema([f.with_nullable(False) for f in schema]))
    other = pa.schema([("key", pa.large_string()), ("value", pa.int64()), ("extra", pa.bool_())])
    with pytest.raises(ValueError) as info:
        check_same_schema("u", pa.schema([("key", pa.string()), ("value", pa.int64()), ("x", pa.float64())]), other)
    assert str(info.value) == ("union 'u': inputs have different columns: missing 'x'; unexpected 'extra'; "
                               "'key' is large_string instead of string")
    with pytest.raises(ValueError, match="another order"):
        check_same_schema(
            "u", pa.schema([("a", pa.int8()), ("b", pa.int8())]), pa.schema([("b", pa.int8()), ("a", pa.int8())])
        )


def test_filter_is_fast() -> None:
    """Filtering costs little more than Arrow's own filter kernel (a loose bound: CI machines vary)."""
    import time

    from sluice.connectors.generator import generator_rows

    batch = generator_rows({"keys": 100000}, 0, 0, 65536)
    op = open_op({"id": "f", "type": "filter", "expr": "value > 500"})
    mask = pc.greater(batch.column("value"), pa.scalar(500))
    best_op = best_kernel = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        op.process(batch)
        t1 = time.perf_counter()
        batch.filter(mask)
        t2 = time.perf_counter()
        best_op, best_kernel = min(best_op, t1 - t0), min(best_kernel, t2 - t1)
    assert best_op < 2 * best_kernel + 0.002
