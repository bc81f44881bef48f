"""Whether a new pipeline can take over a running job's state: operators are matched by id and
each stateful operator's state schema (what its checkpointed tables hold) is compared.

Pure logic, used by the `check_upgrade` activity; the rules are documented in docs/upgrades.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from sluice.models import KEYED_TYPES, Program, operator_role


class Compatibility(BaseModel):
    """The verdict: `problems` (one line per incompatible operator; empty = compatible) and the
    operators whose state the new pipeline starts without (only those the request allowed)."""

    problems: list[str] = Field(default_factory=list)
    dropped_state: list[str] = Field(default_factory=list)


def upstream_key(program: Program, operator_id: str) -> list[str] | None:
    """The key columns a keyed operator's state is partitioned by: the nearest key_by upstream."""
    seen: set[str] = set()
    todo = list(program.inputs.get(operator_id, []))
    while todo:
        op = todo.pop(0)
        if op in seen:
            continue
        seen.add(op)
        params = program.operators.get(op, {})
        if params.get("type") == "key_by":
            key = params.get("key")
            return [key] if isinstance(key, str) else list(key or [])
        todo.extend(program.inputs.get(op, []))
    return None


def state_schema(program: Program, operator_id: str) -> dict[str, Any] | None:
    """What an operator's checkpointed state depends on; None for a stateless operator.

    Two operators with equal schemas can restore each other's state. Settings that only change
    what happens from now on (a window's allowed lateness, a generator's rate) are not part of it.
    """
    p = program.operators[operator_id]
    kind = p.get("type")
    role = operator_role(p)
    if role == "source":
        if kind == "generator":
            return {"type": kind, "splits": p.get("splits", 1)}  # offsets per split
        return {"type": kind, "path": p.get("path"), "format": p.get("format")}  # offsets per file
    if role == "sink":
        if kind == "files":  # pending commits name the destination
            return {"type": kind, "path": p.get("path"), "format": p.get("format")}
        return None
    if kind in KEYED_TYPES:
        schema: dict[str, Any] = {
            "type": kind,
            "key": upstream_key(program, operator_id),
            "aggregates": [
                [a.get("fn"), a.get("column"), a.get("as_") or a.get("as")] for a in p.get("aggregates") or []
            ],
        }
        if kind != "aggregate":
            schema.update(time=p.get("time"), size_ms=p.get("size_ms"), slide_ms=p.get("slide_ms"))
        return schema
    return None


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
    return ", ".join(sorted(changed))


def check_compatibility(old: Program, new: Program, allow_drop_state: list[str]) -> Compatibility:
    """Compare every stateful operator of the running program with the new one.

    - same id, same state schema: its state carries over (also across a parallelism change);
    - same id, different schema, or removed: incompatible, unless allowed to drop its state;
    - new stateful operators start empty; stateless ones never matter.
    """
    verdict = Compatibility()
    allowed = set(allow_drop_state)
    for op_id in allowed - set(old.operators):
        verdict.problems.append(f"--allow-drop-state {op_id}: the running pipeline has no operator {op_id!r}")
    for op_id in old.operators:
        before = state_schema(old, op_id)
        if before is None:
            continue
        kind = old.operators[op_id].get("type")
        if op_id not in new.operators:
            problem = f"operator {op_id!r} ({kind}) holds state and is not in the new pipeline"
        else:
            after = state_schema(new, op_id)
            if after == before:
                continue
            if after is None:
                problem = f"operator {op_id!r} ({kind}) holds state; in the new pipeline it is a stateless " \
                          f"{new.operators[op_id].get('type')}"  # fmt: skip
            else:
                problem = f"operator {op_id!r} ({kind}): state schema changed: {_difference(before, after)}"
        if op_id in allowed:
            verdict.dropped_state.append(op_id)
        else:
            verdict.problems.append(f"{problem}; pass --allow-drop-state {op_id} to start it with empty state")
    return verdict
