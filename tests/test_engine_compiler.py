"""Compiler: parallelism resolution, chaining, refusals with messages that name the nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.engine.compiler import assign, compile_program, runners_needed
from sluice.errors import UserError
from sluice.models import JobConfig, PipelineSpec, RunnerInfo
from tests.engine_helpers import user_module


def _pipeline(*ops: dict, parallelism: int = 2) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "p", "parallelism": parallelism, "operators": list(ops)})


@pytest.fixture
def fns(tmp_path: Path) -> str:
    return user_module(tmp_path, """
        def ident(batch):
            return batch
        not_callable = 3
    """)


def test_linear_pipeline_is_one_chain(fns: str, tmp_path: Path) -> None:
    p = _pipeline(
        {"id": "src", "type": "generator"},
        {"id": "m", "type": "map", "fn": f"{fns}:ident"},
        {"id": "out", "type": "files", "path": "rel/out"},
    )
    prog = compile_program(p, JobConfig())
    assert [c.operators for c in prog.chains] == [["src", "m", "out"]]
    assert prog.chains[0].parallelism == 2 and prog.parallelism == {"src": 2, "m": 2, "out": 2}
    assert Path(prog.operators["out"]["path"]).is_absolute()


def test_parallelism_precedence(fns: str) -> None:
    p = _pipeline(
        {"id": "src", "type": "generator", "parallelism": 5},
        {"id": "m", "type": "map", "fn": f"{fns}:ident", "parallelism": 5},
    )
    assert compile_program(p, JobConfig()).parallelism == {"src": 5, "m": 5}
    assert compile_program(p, JobConfig(parallelism=3)).parallelism == {"src": 3, "m": 3}
    prog = compile_program(p, JobConfig(parallelism=3, overrides={"m": 4}))
    assert prog.parallelism == {"src": 3, "m": 4}
    assert [c.operators for c in prog.chains] == [["src"], ["m"]]
    assert [(e.from_op, e.to_op, e.kind) for e in prog.edges] == [("src", "m", "rebalance")]


def _keyed_window_pipeline() -> PipelineSpec:
    return _pipeline(
        {"id": "a", "type": "generator"},
        {"id": "b", "type": "generator", "parallelism": 3},
        {"id": "both", "type": "union", "inputs": ["a", "b"]},
        {"id": "big", "type": "filter", "expr": "value > 10"},
        {"id": "by_key", "type": "key_by", "key": "key"},
        {"id": "w", "type": "tumbling_window", "size_ms": 100},
        {"id": "out", "type": "files", "path": "out"},
        {"id": "copy", "type": "null", "inputs": ["w"]},
    )


def test_graph_chains_and_edges() -> None:
    prog = compile_program(_keyed_window_pipeline(), JobConfig())
    assert [c.operators for c in prog.chains] == [["a"], ["b"], ["both", "big", "by_key"], ["w"], ["out"], ["copy"]]
    assert [(e.from_op, e.to_op, e.kind, e.key) for e in prog.edges] == [
        ("a", "both", "pointwise", None),
        ("b", "both", "rebalance", None),
        ("by_key", "w", "hash", ["key"]),
        ("w", "out", "pointwise", None),
        ("w", "copy", "pointwise", None),
    ]
    assert prog.operators["w"]["key"] == ["key"]
    chain_w = prog.chain_of("w")
    assert [e.from_op for e in prog.edges_into(chain_w)] == ["by_key"]
    assert [e.to_op for e in prog.edges_out_of(chain_w)] == ["out", "copy"]
    hash_edge = prog.edges[2]
    assert prog.senders(hash_edge, 1) == [0, 1] and prog.receivers(prog.edges[0], 1) == [1]


def test_graph_refusals_name_the_node(fns: str) -> None:
    cases = [
        ([{"id": "a", "type": "generator"}, {"id": "w", "type": "tumbling_window", "size_ms": 10}],
         "operator 'w' (tumbling_window) keeps state per key: its input 'a' must be a 'key_by' operator"),
        ([{"id": "a", "type": "generator"}, {"id": "k", "type": "key_by", "key": ["nope"]}],
         "operator 'k': key column(s) 'nope' not in the input's columns (split, seq, key, ts, value)"),
        ([{"id": "a", "type": "generator"}, {"id": "k", "type": "key_by", "key": "key"},
          {"id": "w", "type": "tumbling_window", "size_ms": 10, "time": "when"}],
         "operator 'w': time column 'when' not in the input's columns"),
        ([{"id": "a", "type": "generator"}, {"id": "k", "type": "key_by", "key": "key"},
          {"id": "w", "type": "aggregate", "aggregates": [{"fn": "sum", "column": "amount"}]}],
         "operator 'w': aggregate column(s) 'amount' not in the input's columns"),
        ([{"id": "a", "type": "generator"}, {"id": "b", "type": "generator"},
          {"id": "m", "type": "map", "fn": f"{fns}:ident", "inputs": ["a", "b"]}],
         "operator 'm' has several inputs ('a', 'b'); merge them with a 'union' operator first"),
        ([{"id": "a", "type": "files", "role": "source", "path": "in", "schema": {"t": "int64"}, "event_time": "t"}],
         "operator 'a': event_time column 't' must be declared in 'schema' as a timestamp"),
        ([{"id": "a", "type": "generator"}, {"id": "p", "type": "project", "inputs": ["a"],
          "columns": ["value", "key", "ts", "seq", "split"]},
          {"id": "u", "type": "union", "inputs": ["a", "p"]}],
         "operator 'u': inputs have different columns"),
        ([{"id": "a", "type": "generator"}, {"id": "p", "type": "project", "columns": {"v": "value * 2"}},
          {"id": "k", "type": "key_by", "key": "key"}],
         "operator 'k': key column(s) 'key' not in the input's columns (v)"),
    ]
    for ops, message in cases:
        with pytest.raises(UserError) as err:
            compile_program(_pipeline(*ops), JobConfig())
        assert message in str(err.value)


def test_fan_out_ends_the_chain(fns: str) -> None:
    p = _pipeline(
        {"id": "a", "type": "generator"},
        {"id": "m1", "type": "map", "fn": f"{fns}:ident", "inputs": ["a"]},
        {"id": "m2", "type": "map", "fn": f"{fns}:ident", "inputs": ["a"]},
    )
    prog = compile_program(p, JobConfig())
    assert [c.operators for c in prog.chains] == [["a"], ["m1"], ["m2"]]
    assert [e.kind for e in prog.edges] == ["pointwise", "pointwise"]


def test_unknown_override_named() -> None:
    p = _pipeline({"id": "src", "type": "generator"})
    with pytest.raises(UserError, match="'nope'"):
        compile_program(p, JobConfig(overrides={"nope": 2}))


def test_bad_function_messages(fns: str) -> None:
    p = _pipeline({"id": "src", "type": "generator"}, {"id": "big", "type": "filter", "fn": "no_such_pkg.mod:fn"})
    with pytest.raises(UserError) as err:
        compile_program(p, JobConfig())
    assert str(err.value).startswith(
        "operator 'big': cannot import function 'no_such_pkg.mod:fn': ModuleNotFoundError:"
    )
    p = _pipeline({"id": "src", "type": "generator"}, {"id": "big", "type": "filter", "fn": f"{fns}:missing"})
    with pytest.raises(UserError, match="AttributeError"):
        compile_program(p, JobConfig())
    p = _pipeline({"id": "src", "type": "generator"}, {"id": "big", "type": "filter", "fn": f"{fns}:not_callable"})
    with pytest.raises(UserError, match="not callable"):
        compile_program(p, JobConfig())


def test_import_time_error_named(tmp_path: Path) -> None:
    mod = user_module(tmp_path, "raise RuntimeError('boom at import')\n")
    p = _pipeline({"id": "src", "type": "generator"}, {"id": "m", "type": "map", "fn": f"{mod}:f"})
    with pytest.raises(UserError, match="operator 'm': cannot import function .*RuntimeError: boom at import"):
        compile_program(p, JobConfig())


def _runners(n: int, slots: int) -> list[RunnerInfo]:
    return [RunnerInfo(runner_id=f"r{i}", generation=1, control_port=1000 + i, slots=slots) for i in range(n)]


def test_runners_needed_and_assign() -> None:
    prog = compile_program(_pipeline({"id": "src", "type": "generator"}, parallelism=5), JobConfig())
    assert runners_needed(prog, 2) == 3 and runners_needed(prog, 8) == 1
    out = assign(prog, _runners(5, 1))
    assert [[s.index for s in a.subtasks] for a in out] == [[0], [1], [2], [3], [4]]
    out = assign(prog, _runners(2, 3))
    assert [[s.index for s in a.subtasks] for a in out] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError):
        assign(prog, _runners(2, 2))


def test_unknown_input_cycle_and_parallelism_are_named() -> None:
    from pydantic import ValidationError

    cases = [
        ([{"id": "a", "type": "generator"}, {"id": "b", "type": "filter", "expr": "x > 1", "inputs": ["zzz"]}],
         "operator 'b': input 'zzz' is not an operator of this pipeline"),
        ([{"id": "a", "type": "generator"}, {"id": "b", "type": "union", "inputs": ["a", "c"]},
          {"id": "c", "type": "filter", "expr": "x > 1", "inputs": ["b"]}],
         "operator 'b': input 'c' is defined after it (operators are listed inputs first, so a graph has no cycles)"),
        ([{"id": "a", "type": "generator", "parallelism": 0}], "operators.0.generator.parallelism"),
        ([{"id": "a", "type": "generator"}, {"id": "u", "type": "union", "inputs": ["a", "a"]}],
         "operator 'u': input 'a' is listed twice"),
    ]
    for ops, message in cases:
        with pytest.raises(ValidationError) as err:
            _pipeline(*ops)
        assert message in str(err.value)


def test_pipeline_file_errors_name_the_operator() -> None:
    from sluice.pipeline_files import PipelineFileError, parse_pipeline

    cases = [
        ([{"id": "a", "type": "generator", "parallelism": 0}],
         "x.yaml: operators.0.parallelism: Input should be greater than or equal to 1 (operator 'a')"),
        ([{"id": "a", "type": "generator"}, {"id": "w", "type": "tumbling_window"}],
         "x.yaml: operators.1.size_ms: Field required (operator 'w')"),
        ([{"id": "a", "type": "generator", "colour": "red"}],
         "x.yaml: operators.0.colour: unknown field (operator 'a')"),
        ([{"id": "a", "type": "nope"}], "unknown operator type 'nope'; expected one of generator, files, map"),
    ]
    for ops, message in cases:
        with pytest.raises(PipelineFileError) as err:
            parse_pipeline({"name": "p", "operators": ops}, "x.yaml")
        assert message in str(err.value)


def test_operator_table_matches_the_pipeline_contract() -> None:
    import typing

    from sluice.models import OPERATOR_CLASSES, OperatorSpec

    union = typing.get_args(OperatorSpec)[0]
    members = {}
    for member in typing.get_args(union):
        cls, tag = typing.get_args(member)[:2]
        members[tag.tag] = cls
    assert members == OPERATOR_CLASSES
