"""Pipeline files (YAML or JSON) -> `PipelineSpec`, with errors that name the file and the field.

A user who mistypes a pipeline file should get one line that says where: for example
`clicks.yaml: operators.1.fn: fn 'bad' must look like 'package.module:function'`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sluice.errors import UserError
from sluice.models import OPERATOR_TAGS, OPERATOR_TYPES, JobConfig, JobSpec, PipelineSpec

JSON_SUFFIXES = frozenset({".json"})
_VALUE_ERROR_PREFIX = "Value error, "


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


def _message(err: Any, data: Any = None) -> str:
    kind = err.get("type", "")
    raw_loc = tuple(err.get("loc", ()))
    loc = _loc(raw_loc)
    msg = str(err.get("msg", "")) + _operator_named(data, raw_loc)
    if kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return f"{loc}.type: unknown operator type {tag!r}; expected one of {', '.join(OPERATOR_TYPES)}"
    if kind == "union_tag_not_found":
        return f"{loc}.type: missing; every operator needs a type ({', '.join(OPERATOR_TYPES)})"
    if kind == "extra_forbidden":
        msg = "unknown field" + _operator_named(data, raw_loc)
    elif msg.startswith(_VALUE_ERROR_PREFIX):
        msg = msg[len(_VALUE_ERROR_PREFIX) :]
    return f"{loc}: {msg}" if loc else msg


def parse_pipeline(data: Any, source: str = "<pipeline>") -> PipelineSpec:
    """Validate already-parsed data; errors are `PipelineFileError("{source}: field: message")`."""
    if not isinstance(data, dict):
        raise PipelineFileError(f"{source}: expected a mapping with name and operators, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        lines = [_message(e, data) for e in exc.errors()]
        raise PipelineFileError(f"{source}: " + "; ".join(lines)) from None


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read a YAML or JSON pipeline file (by suffix; YAML otherwise) and validate it."""
    p = Path(path)
    name = p.name
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise PipelineFileError(f"{name}: no such file ({p})") from None
    except OSError as exc:
        raise PipelineFileError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() in JSON_SUFFIXES:
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise PipelineFileError(f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PipelineFileError(f"{name}: invalid YAML{where}: {problem}") from None
    return parse_pipeline(data, name)


def job_spec(
    pipeline: PipelineSpec,
    *,
    job_id: str | None = None,
    parallelism: int | None = None,
    checkpoint_interval_s: float | None = None,
    ignore_state: bool = False,
    checkpoint_url: str | None = None,
) -> JobSpec:
    """The JobSpec for running `pipeline` (job id defaults to the pipeline name)."""
    config: dict[str, Any] = {"ignore_state": ignore_state}
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
        raise UserError("; ".join(_message(e) for e in exc.errors())) from None
