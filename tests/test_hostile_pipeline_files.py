"""Hostile pipeline files: every one is refused with one line naming the file, never a traceback.

`load_pipeline` is fed hypothesis-generated files (deep nesting, invalid UTF-8, huge strings and
numbers, wrong types, binary junk, YAML alias bombs, Python tags) and must either return a valid
`PipelineSpec` or raise `PipelineFileError` whose message is one short line starting with the file
name. The `sluice start` CLI, run as a real process against the session's dev server, must print
one `error: FILE: ...` line, exit 2 (an invalid pipeline file is a usage error) and start nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.cli import EXIT_USAGE
from sluice.models import MAX_NAME_LENGTH, MAX_SPLITS
from sluice.pipeline_files import MAX_FILE_BYTES, PipelineFileError, load_pipeline
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command

# An error line longer than this is not "one line a user reads" (it quotes the file at them).
MAX_ERROR_CHARS = 1_000
CLI_TIMEOUT_S = 60.0
EXAMPLES = 150

VALID: dict[str, Any] = {
    "name": "hostile",
    "operators": [
        {"id": "events", "type": "generator", "splits": 2, "limit": 10},
        {"id": "keep", "type": "filter", "expr": "value > 5"},
        {"id": "out", "type": "null"},
    ],
}


# ------------------------------------------------------------------------------ hostile values


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


hostile_scalars = st.one_of(
    st.sampled_from(
        [
            10**30, -(10**30), 10**15, 1e12, 1e308, float("inf"), float("-inf"), float("nan"), -1, 0,
            "x" * 100_000, "\x00\x01\x1b[31m", "line\nbreak", "é" * 10_000, True, None, "",
            1_000_000_000, 2**63, -(2**63) - 1,
        ]
    ),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50).map(lambda b: b.decode("latin-1")),
)
hostile_values = st.one_of(
    hostile_scalars,
    st.integers(min_value=40, max_value=3_000).map(nested),
    st.lists(hostile_scalars, max_size=5),
    st.dictionaries(st.text(max_size=10), hostile_scalars, max_size=5),
)

# Where in a valid pipeline a hostile value goes: (path of keys) - an operator field, the name,
# the operator list itself, an unknown field.
TARGETS: list[tuple[Any, ...]] = [
    ("name",),
    ("parallelism",),
    ("operators",),
    ("operators", 0),
    ("operators", 0, "id"),
    ("operators", 0, "type"),
    ("operators", 0, "splits"),
    ("operators", 0, "limit"),
    ("operators", 0, "rate"),
    ("operators", 0, "keys"),
    ("operators", 0, "parallelism"),
    ("operators", 1, "expr"),
    ("operators", 1, "inputs"),
    ("operators", 2, "id"),
    ("operators", 2, "nonsense"),
    ("unknown_top_level",),
]


def with_value(path: tuple[Any, ...], value: Any) -> Any:
    data = json.loads(json.dumps(VALID))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def dump(data: Any, as_json: bool) -> bytes:
    if as_json:
        # Python's json writes Infinity/NaN, which JSON files in the wild also contain.
        return json.dumps(data).encode()
    return yaml.safe_dump(data, allow_unicode=True).encode()


def billion_laughs(levels: int, fanout: int) -> bytes:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * fanout)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines += ["name: bomb", f"operators: *a{levels - 1}"]
    return "\n".join(lines).encode()


RAW_FILES: list[tuple[str, bytes]] = [
    ("deep-flow.yaml", b"name: x\noperators: " + b"[" * 20_000 + b"]" * 20_000),
    ("deep-block.yaml", b"name: x\noperators:\n" + b"".join(b"  " * i + b"- \n" for i in range(3_000))),
    ("deep.json", b'{"name": "x", "operators": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("latin1.yaml", "name: caf\xe9\noperators: []\n".encode("latin-1")),
    ("bad-utf8.json", b'{"name": "\xff\xfe\xfd", "operators": []}'),
    ("utf16.yaml", "name: x\noperators: []\n".encode("utf-16")),
    ("laughs.yaml", billion_laughs(9, 10)),
    ("python-tag.yaml", b"name: !!python/object/apply:os.system ['echo owned']\noperators: []\n"),
    ("python-name.yaml", b"name: x\noperators: [!!python/name:os.system {}]\n"),
    ("long-int.yaml", b"name: x\nparallelism: " + b"9" * 10_000 + b"\noperators: []\n"),
    ("long-int.json", b'{"name": "x", "parallelism": ' + b"9" * 10_000 + b', "operators": []}'),
    ("bad-date.yaml", b"name: 2024-13-45\noperators: []\n"),
    ("unhashable-key.yaml", b"? [a, b]\n: c\nname: x\n"),
    ("nul.yaml", b"name: x\x00\noperators: []\n"),
    ("binary.yaml", bytes(range(256)) * 4),
    ("huge-name.yaml", b"name: " + b"n" * 100_000 + b"\noperators: [{id: g, type: generator}]\n"),
    (
        "huge-splits.yaml",
        b"name: splits\noperators: [{id: g, type: generator, splits: 1000000000}, {id: o, type: null}]\n",
    ),
    ("oversized.yaml", b"# " + b"x" * (MAX_FILE_BYTES + 10) + b"\nname: x\n"),
    ("newline-key.yaml", b'name: x\noperators:\n- {id: g, type: generator, "evil\\nkey\\r\\x1b[2J": 1}\n'),
    ("empty.yaml", b""),
    ("list.json", b"[1, 2, 3]"),
    ("scalar.yaml", b"just a string"),
    ("many-errors.yaml", yaml.safe_dump({"name": "x", "operators": [{"id": str(i)} for i in range(1_000)]}).encode()),
]


# ------------------------------------------------------------------------------ checks


def assert_refused_in_one_line(path: Path) -> str:
    """`load_pipeline(path)` raises PipelineFileError with one short line naming the file."""
    with pytest.raises(PipelineFileError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert message.startswith(f"{path.name}: "), message[:300]
    assert "\n" not in message and "\r" not in message, message[:300]
    assert len(message) <= MAX_ERROR_CHARS, message[:300]
    return message


def load_or_refuse(path: Path) -> None:
    """Either a valid pipeline or a one-line refusal; any other exception fails the test."""
    try:
        load_pipeline(path)
    except PipelineFileError:
        assert_refused_in_one_line(path)


# ------------------------------------------------------------------------------ load_pipeline


@pytest.mark.parametrize("name,raw", RAW_FILES, ids=[n for n, _ in RAW_FILES])
def test_hostile_file_is_refused_in_one_line(tmp_path: Path, name: str, raw: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(raw)
    message = assert_refused_in_one_line(path)
    assert "Traceback" not in message


def test_what_the_refusals_say(tmp_path: Path) -> None:
    """The messages name the problem, so a user knows what to fix."""
    expected = {
        "deep-flow.yaml": "nested too deeply",
        "deep.json": "nested too deeply",
        "latin1.yaml": "not UTF-8",
        "laughs.yaml": "more than 100,000 values",
        "python-tag.yaml": "could not determine a constructor",
        "long-int.yaml": "too many digits",
        "huge-name.yaml": f"name: String should have at most {MAX_NAME_LENGTH} characters",
        "huge-splits.yaml": f"operators.0.splits: Input should be less than or equal to {MAX_SPLITS}",
        "oversized.yaml": f"a pipeline file is at most {MAX_FILE_BYTES:,} bytes",
        "newline-key.yaml": "operators.0.evil\\nkey\\r\\x1b[2J: unknown field",
        "many-errors.yaml": "and ",
    }
    raws = dict(RAW_FILES)
    for name, needle in expected.items():
        path = tmp_path / name
        path.write_bytes(raws[name])
        message = assert_refused_in_one_line(path)
        assert needle in message, message


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(TARGETS), value=hostile_values, as_json=st.booleans())
def test_hostile_values_anywhere(tmp_path: Path, path: tuple[Any, ...], value: Any, as_json: bool) -> None:
    try:
        raw = dump(with_value(path, value), as_json)
    except (ValueError, RecursionError, yaml.YAMLError):
        return  # not even the dumper can write it: no such file exists
    file = tmp_path / f"p.{'json' if as_json else 'yaml'}"
    file.write_bytes(raw)
    load_or_refuse(file)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.binary(min_size=1, max_size=2_000),
    at=st.integers(min_value=0, max_value=400),
    as_json=st.booleans(),
)
def test_binary_junk_spliced_into_a_valid_file(tmp_path: Path, junk: bytes, at: int, as_json: bool) -> None:
    raw = dump(VALID, as_json)
    file = tmp_path / f"p.{'json' if as_json else 'yaml'}"
    file.write_bytes(raw[:at] + junk + raw[at:])
    load_or_refuse(file)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(levels=st.integers(min_value=2, max_value=12), fanout=st.integers(min_value=2, max_value=20))
def test_alias_bombs_are_measured_not_expanded(tmp_path: Path, levels: int, fanout: int) -> None:
    file = tmp_path / "bomb.yaml"
    file.write_bytes(billion_laughs(levels, fanout))
    assert_refused_in_one_line(file)  # small bombs fail validation, large ones the size limit


# ------------------------------------------------------------------------------ the CLI


CLI_FILES = [
    "deep-flow.yaml", "latin1.yaml", "laughs.yaml", "python-tag.yaml", "long-int.json",
    "huge-name.yaml", "huge-splits.yaml", "newline-key.yaml", "binary.yaml",
]  # fmt: skip


async def test_sluice_start_refuses_hostile_files_and_starts_nothing(
    tmp_path: Path, temporal_address: str, job_client: Any
) -> None:
    before = await _workflow_count(job_client)
    raws = dict(RAW_FILES)
    for name in CLI_FILES:
        path = tmp_path / name
        path.write_bytes(raws[name])
        result = await asyncio.to_thread(
            subprocess.run,
            sluice_command("start", str(path)),
            cwd=PROJECT_ROOT,
            env=cli_env(temporal_address, tmp_path / "state"),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=CLI_TIMEOUT_S,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == EXIT_USAGE, (name, result.returncode, result.stderr[-2000:])
        assert len(lines) == 1, (name, result.stderr[-2000:])
        assert lines[0].startswith(f"error: {name}: "), lines[0][:300]
        assert len(lines[0]) <= MAX_ERROR_CHARS + len("error: "), lines[0][:300]
        assert result.stdout == "", result.stdout[:300]
    assert await _workflow_count(job_client) == before, "a refused pipeline file started a workflow"


async def _workflow_count(job_client: Any) -> int:
    """JobWorkflows on the session server (started by any test)."""
    return int((await job_client.client.count_workflows('WorkflowType="JobWorkflow"')).count)


def test_yaml_null_as_operator_type_is_explained(tmp_path: Path) -> None:
    """`type: null` is YAML's empty value, not the null sink: the message says how to write it."""
    path = tmp_path / "p.yaml"
    path.write_text("name: p\noperators: [{id: g, type: generator}, {id: o, type: null}]\n")
    message = assert_refused_in_one_line(path)
    assert 'operators.1.type: null is YAML for "no value"; write type: "null"' in message, message
    path.write_text("name: p\noperators: [{id: g, type: generator}, {id: o, type: 'null'}]\n")
    assert [op.type for op in load_pipeline(path).operators] == ["generator", "null"]


HOSTILE_JOB_IDS = ["j" * 5_000, "line\nbreak", "", "   ", "\x1b[2J"]


async def test_hostile_job_ids_are_one_line_and_start_nothing(
    tmp_path: Path, temporal_address: str, job_client: Any
) -> None:
    """`--job-id` becomes the workflow id: a blank, unprintable or over-long one is a usage error;
    a command naming a job the server cannot even look up is one line, not a traceback."""
    before = await _workflow_count(job_client)
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\noperators: [{id: g, type: generator, limit: 1}, {id: o, type: 'null'}]\n")
    for job_id in HOSTILE_JOB_IDS:
        result = await _run_cli(tmp_path, temporal_address, "start", str(path), "--job-id", job_id)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == EXIT_USAGE, (job_id[:20], result.returncode, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: --job-id"), result.stderr[-2000:]
    status = await _run_cli(tmp_path, temporal_address, "status", "j" * 5_000)
    lines = status.stderr.strip().splitlines()
    assert status.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), status.stderr[-2000:]
    assert "Traceback" not in status.stderr
    assert await _workflow_count(job_client) == before, "a refused job id started a workflow"


async def _run_cli(tmp_path: Path, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        sluice_command(*args),
        cwd=PROJECT_ROOT,
        env=cli_env(address, tmp_path / "state"),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=CLI_TIMEOUT_S,
    )
