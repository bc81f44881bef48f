"""The upgrade compatibility check (sluice/upgrades.py): which stateful operators can carry their
state into a new pipeline version, and the message that names each that cannot."""

from __future__ import annotations

from typing import Any

from sluice.engine.compiler import compile_program
from sluice.models import JobConfig, PipelineSpec, Program
from sluice.upgrades import check_compatibility, state_schema


def _program(*middle: dict[str, Any], key: str = "key", size_ms: int = 100, sink: str = "/tmp/out") -> Program:
    ops = [
        {"id": "events", "type": "generator", "splits": 2},
        *middle,
        {"id": "by_key", "type": "key_by", "key": key},
        {"id": "w", "type": "tumbling_window", "size_ms": size_ms, "allowed_lateness_ms": 0,
         "aggregates": [{"fn": "count"}, {"fn": "sum", "column": "value", "as": "total"}]},
        {"id": "out", "type": "files", "path": sink},
    ]  # fmt: skip
    return compile_program(PipelineSpec.model_validate({"name": "p", "operators": ops}), JobConfig())


def test_stateless_changes_and_new_operators_keep_every_state() -> None:
    old = _program()
    new = _program({"id": "f", "type": "filter", "expr": "value > 3"})
    assert check_compatibility(old, new, []).problems == []
    assert state_schema(new, "f") is None and state_schema(new, "by_key") is None


def test_a_changed_window_is_refused_naming_operator_and_change() -> None:
    verdict = check_compatibility(_program(), _program(size_ms=200), [])
    assert verdict.problems == [
        "operator 'w' (tumbling_window): state schema changed: size_ms 100 -> 200; "
        "pass --allow-drop-state w to start it with empty state"
    ]


def test_a_changed_key_is_refused() -> None:
    (problem,) = check_compatibility(_program(), _program(key="split"), []).problems
    assert "operator 'w'" in problem and "key ['key'] -> ['split']" in problem


def test_a_removed_stateful_operator_is_refused_unless_allowed() -> None:
    old = _program()
    ops = [{"id": "events", "type": "generator", "splits": 2}, {"id": "out", "type": "files", "path": "/tmp/out"}]
    new = compile_program(PipelineSpec.model_validate({"name": "p", "operators": ops}), JobConfig())
    (problem,) = check_compatibility(old, new, []).problems
    assert problem.startswith("operator 'w' (tumbling_window) holds state and is not in the new pipeline")
    allowed = check_compatibility(old, new, ["w"])
    assert allowed.problems == [] and allowed.dropped_state == ["w"]


def test_allowed_drops_and_unknown_names() -> None:
    verdict = check_compatibility(_program(), _program(size_ms=200), ["w", "nope"])
    assert verdict.dropped_state == ["w"]
    assert verdict.problems == ["--allow-drop-state nope: the running pipeline has no operator 'nope'"]


def test_source_and_sink_destinations_are_state() -> None:
    (problem,) = check_compatibility(_program(), _program(sink="/tmp/elsewhere"), []).problems
    assert "operator 'out' (files)" in problem and "path '/tmp/out' -> '/tmp/elsewhere'" in problem
    ops_old = [{"id": "events", "type": "generator", "splits": 2}, {"id": "out", "type": "null"}]
    ops_new = [{"id": "events", "type": "generator", "splits": 4, "rate": 5}, {"id": "out", "type": "null"}]
    old, new = (compile_program(PipelineSpec.model_validate({"name": "p", "operators": o}), JobConfig())
                for o in (ops_old, ops_new))  # fmt: skip
    (problem,) = check_compatibility(old, new, []).problems
    assert "operator 'events' (generator): state schema changed: splits 2 -> 4" in problem
