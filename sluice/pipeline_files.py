"""Pipeline files (YAML or JSON) -> `PipelineSpec`, with errors that name the file and the field.

A user who mistypes a pipeline file should get one line that says where: for example
`clicks.yaml: operators.1.fn: fn 'bad' must look like 'package.module:function'`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sluice.errors import UserError
from sluice.models import OPERATOR_TAGS, OPERATOR_TYPES, JobConfig, JobSpec, PipelineSpec

JSON_SUFFIXES = frozenset({".json"})
_VALUE_ERROR_PREFIX = "Value error, "

# Limits on what a pipeline file may be before it is parsed or validated. A real pipeline is a
# few kilobytes with a handful of nesting levels; these refuse hostile files (huge, deeply nested,
# YAML alias bombs) with a message instead of a RecursionError, a hang or an exhausted memory.
MAX_FILE_BYTES = 1024 * 1024
MAX_NESTING = 32  # mappings and lists inside each other
MAX_NODES = 100_000  # values in the document with every YAML alias expanded
# How much of the problems an error line shows: the first few, each value quoted in short.
MAX_PROBLEMS_SHOWN = 5
MAX_QUOTED_CHARS = 60
_LONG_QUOTED = re.compile(rf"'([^'\n]{{{MAX_QUOTED_CHARS + 1},}})'")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PipelineFileError(UserError):
    """A pipeline file could not be read or is invalid; the message starts with the file name."""


def _loc(loc: tuple[Any, ...]) -> str:
    # Pydantic puts the discriminator's value into the path of a tagged union member
    # (operators.1.filter.fn); the user wrote operators.1.fn, so drop it.
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, str) and i > 0 and isinstance(loc[i - 1], int) and item in OPERATOR_TAGS:
            continue
        parts.append(str(item))
    return ".".join(parts)


def _operator_named(data: Any, loc: tuple[Any, ...]) -> str:
    """" (operator 'x')" when `loc` points into the operator with id x, so the node is named."""
    if len(loc) >= 2 and loc[0] == "operators" and isinstance(loc[1], int):
        ops = data.get("operators") if isinstance(data, dict) else None
        if isinstance(ops, list) and 0 <= loc[1] < len(ops) and isinstance(ops[loc[1]], dict):
            op_id = ops[loc[1]].get("id")
            if isinstance(op_id, str):
                return f" (operator {op_id!r})"
    return ""


def _operator_field(data: Any, loc: tuple[Any, ...], field: str, default: Any = None) -> Any:
    """The raw value of `field` in the operator `loc` points into, or `default`."""
    if len(loc) >= 2 and loc[0] == "operators" and isinstance(loc[1], int):
        ops = data.get("operators") if isinstance(data, dict) else None
        if isinstance(ops, list) and 0 <= loc[1] < len(ops) and isinstance(ops[loc[1]], dict):
            return ops[loc[1]].get(field, default)
    return default


def _message(err: Any, data: Any = None) -> str:
    kind = err.get("type", "")
    raw_loc = tuple(err.get("loc", ()))
    loc = _loc(raw_loc)
    msg = str(err.get("msg", "")) + _operator_named(data, raw_loc)
    if kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return f"{loc}.type: unknown operator type {tag!r}; expected one of {', '.join(OPERATOR_TYPES)}"
    if kind == "union_tag_not_found":
        if _operator_field(data, raw_loc, "type", default=...) is None:
            # YAML reads `type: null` as no value at all, not as the null sink.
            return f'{loc}.type: null is YAML for "no value"; write type: "null" for the null sink'
        return f"{loc}.type: missing; every operator needs a type ({', '.join(OPERATOR_TYPES)})"
    if kind == "extra_forbidden":
        msg = "unknown field" + _operator_named(data, raw_loc)
    elif msg.startswith(_VALUE_ERROR_PREFIX):
        msg = msg[len(_VALUE_ERROR_PREFIX) :]
    return f"{loc}: {msg}" if loc else msg


def one_line(text: str) -> str:
    """`text` fit for one line of a terminal: control characters (newlines included) escaped,
    and every quoted value longer than MAX_QUOTED_CHARS cut to a prefix."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return _LONG_QUOTED.sub(lambda m: f"'{m.group(1)[:MAX_QUOTED_CHARS]}...'", text)


def _too_big(data: Any) -> str | None:
    """Why `data` is too deep or too large to validate, or None.

    Walks the document iteratively (so depth cannot exhaust the stack) and counts each shared
    value (a YAML alias) once per place it is used, memoised per object, so a "billion laughs"
    document is measured in time linear in its distinct values instead of being expanded.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in sizes:
            continue
        children = [v for kv in node.items() for v in kv] if isinstance(node, dict) else node
        containers = [c for c in children if isinstance(c, (dict, list))]
        if not children_done:
            stack.append((node, True))
            stack.extend((c, False) for c in containers if id(c) not in sizes)
            if len(stack) > MAX_NODES:
                return f"more than {MAX_NODES:,} values"
            continue
        sizes[id(node)] = 1 + len(children) - len(containers) + sum(sizes.get(id(c), 0) for c in containers)
        depths[id(node)] = 1 + max((depths.get(id(c), 0) for c in containers), default=0)
        if depths[id(node)] > MAX_NESTING:
            return f"nested more than {MAX_NESTING} levels deep"
        if sizes[id(node)] > MAX_NODES:
            return f"more than {MAX_NODES:,} values (YAML aliases expanded)"
    return None


def parse_pipeline(data: Any, source: str = "<pipeline>") -> PipelineSpec:
    """Validate already-parsed data; errors are `PipelineFileError("{source}: field: message")`,
    one line, never an exception of another type."""
    if not isinstance(data, dict):
        raise PipelineFileError(f"{source}: expected a mapping with name and operators, got {type(data).__name__}")
    problem = _too_big(data)
    if problem:
        raise PipelineFileError(f"{source}: the pipeline is {problem}; is this a pipeline file?")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [_message(e, data) for e in errors[:MAX_PROBLEMS_SHOWN]]
        more = f"; and {len(errors) - MAX_PROBLEMS_SHOWN} more" if len(errors) > MAX_PROBLEMS_SHOWN else ""
        raise PipelineFileError(one_line(f"{source}: " + "; ".join(lines) + more)) from None
    except (RecursionError, ValueError, TypeError) as exc:  # validators on hostile values
        raise PipelineFileError(one_line(f"{source}: invalid pipeline: {exc}")) from None


def _decode(raw: bytes, name: str) -> str:
    """The file's text: UTF-8 (a byte order mark is allowed), or a message where it is not."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PipelineFileError(
            f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, offset {exc.start}); "
            "pipeline files are YAML or JSON in UTF-8"
        ) from None


def _parse_text(text: str, name: str, is_json: bool) -> Any:
    """Parse YAML (safe: no Python tags) or JSON; every parser failure becomes one line."""
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise PipelineFileError(f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PipelineFileError(one_line(f"{name}: invalid YAML{where}: {problem}")) from None
    except RecursionError:
        raise PipelineFileError(f"{name}: nested too deeply to parse; is this a pipeline file?") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # Values the parsers accept syntactically but cannot build: a 5,000-digit integer,
        # a timestamp like 2001-13-45, an unhashable key.
        kind = "JSON" if is_json else "YAML"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "integer string conversion" in detail:
            detail = "a number has too many digits"
        raise PipelineFileError(one_line(f"{name}: invalid {kind}: {detail}")) from None


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read a YAML or JSON pipeline file (by suffix; YAML otherwise) and validate it.

    Every problem, however hostile the file, is a `PipelineFileError` whose message is one line
    starting with the file name."""
    p = Path(path)
    name = one_line(p.name)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PipelineFileError(
                f"{name}: {size:,} bytes; a pipeline file is at most {MAX_FILE_BYTES:,} bytes"
            )
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # the file may grow between stat and read
    except FileNotFoundError:
        raise PipelineFileError(f"{name}: no such file ({one_line(str(p))})") from None
    except OSError as exc:
        raise PipelineFileError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PipelineFileError(f"{name}: more than {MAX_FILE_BYTES:,} bytes; a pipeline file is at most that")
    data = _parse_text(_decode(raw, name), name, p.suffix.lower() in JSON_SUFFIXES)
    return parse_pipeline(data, name)


def job_spec(
    pipeline: PipelineSpec,
    *,
    job_id: str | None = None,
    parallelism: int | None = None,
    checkpoint_interval_s: float | None = None,
    ignore_state: bool = False,
    checkpoint_url: str | None = None,
    from_savepoint: str | None = None,
) -> JobSpec:
    """The JobSpec for running `pipeline` (job id defaults to the pipeline name)."""
    config: dict[str, Any] = {"ignore_state": ignore_state}
    if from_savepoint is not None:
        config["from_savepoint"] = from_savepoint
    if parallelism is not None:
        config["parallelism"] = parallelism
    if checkpoint_interval_s is not None:
        config["checkpoint_interval_s"] = checkpoint_interval_s
    try:
        return JobSpec(
            job_id=job_id or pipeline.name,
            pipeline=pipeline,
            config=JobConfig.model_validate(config),
            checkpoint_url=checkpoint_url,
        )
    except ValidationError as exc:
        raise UserError(one_line("; ".join(_message(e) for e in exc.errors()))) from None
