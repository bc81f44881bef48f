"""The `sluice` CLI contract: user errors are one clear line and a non-zero exit, and the
commands scripts rely on (start / wait / stop / list) behave as documented.

The job-command tests run against a dev server of their own with no controller worker polling,
so a started job stays in Created and nothing else in the session can touch it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sluice.cli import EXIT_TIMEOUT, EXIT_USAGE, app
from sluice.devserver import DevServer, free_port
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command

CLI_TIMEOUT_S = 60.0

GOOD_PIPELINE = """\
name: demo
operators:
  - {id: events, type: generator, limit: 10}
  - {id: big, type: filter, fn: "examples.clicks:is_big"}
  - {id: out, type: files, path: out/demo}
"""


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run `sluice ARGS` in a subprocess (a real console: exit codes and stderr as users see them)."""
    return subprocess.run(
        sluice_command(*args),
        cwd=PROJECT_ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ pipeline files


BAD_PIPELINES: list[tuple[str, str, list[str]]] = [
    ("invalid-yaml", "name: x\noperators: [\n  - {id: a", ["clicks.yaml", "invalid YAML", "line"]),
    (
        "unknown-type",
        "name: x\noperators:\n  - {id: a, type: generatorx}\n",
        ["clicks.yaml", "operators.0.type", "generatorx"],
    ),
    (
        "parallelism-zero",
        "name: x\nparallelism: 0\noperators:\n  - {id: a, type: generator}\n",
        ["clicks.yaml", "parallelism", "greater than or equal to 1"],
    ),
    (
        "operator-parallelism-zero",
        "name: x\noperators:\n  - {id: a, type: generator, parallelism: 0}\n",
        ["clicks.yaml", "operators.0.parallelism"],
    ),
    (
        "bad-fn",
        "name: x\noperators:\n  - {id: a, type: generator}\n  - {id: b, type: filter, fn: not_a_ref}\n",
        ["clicks.yaml", "operators.1.fn", "not_a_ref"],
    ),
    (
        "unknown-field",
        "name: x\noperators:\n  - {id: a, type: generator, splitz: 3}\n",
        ["clicks.yaml", "operators.0.splitz", "unknown field"],
    ),
]


@pytest.mark.parametrize("text,needles", [(t, n) for _, t, n in BAD_PIPELINES], ids=[i for i, _, _ in BAD_PIPELINES])
def test_bad_pipeline_file_names_file_and_field(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, "clicks.yaml", text)
    result = CliRunner().invoke(app, ["start", str(path)])
    assert result.exit_code == EXIT_USAGE
    out = result.output
    for needle in needles:
        assert needle in out, out
    assert "Traceback" not in out


def test_bad_json_pipeline(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", '{"name": "x", "operators": [}')
    result = CliRunner().invoke(app, ["start", str(path)])
    assert result.exit_code != 0
    assert "p.json: invalid JSON at line 1" in result.output


def test_missing_pipeline_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["start", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0
    assert "nope.yaml: no such file" in result.output


def test_pipeline_error_in_a_real_process_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path, "clicks.yaml", BAD_PIPELINES[4][1])
    result = run_cli("start", str(path))
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: clicks.yaml: operators.1.fn:"), lines[0]


def test_example_pipeline_is_valid() -> None:
    from sluice.engine.compiler import compile_program
    from sluice.models import JobConfig
    from sluice.pipeline_files import load_pipeline

    spec = load_pipeline(PROJECT_ROOT / "examples" / "clicks.yaml")
    assert spec.name == "clicks"
    assert [op.type for op in spec.operators] == ["generator", "filter", "key_by", "tumbling_window", "files"]
    windows = load_pipeline(PROJECT_ROOT / "examples" / "windows.yaml")
    for pipeline in (spec, windows):
        compile_program(pipeline, JobConfig())  # the examples pass every compile check


def test_version_prints_version_and_build() -> None:
    from sluice import __version__, versioning

    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sluice {__version__} (build {versioning.build_id()})"


def test_validate_compiles_without_starting(tmp_path: Path) -> None:
    ok = run_cli("validate", str(PROJECT_ROOT / "examples" / "clicks.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "clicks.yaml: valid: pipeline 'clicks', 5 operators" in ok.stdout
    # Parses, but cannot compile: the user function does not import. A start would fail later.
    bad = write(tmp_path, "bad.yaml", GOOD_PIPELINE.replace("examples.clicks:is_big", "nope.module:fn"))
    result = run_cli("validate", str(bad))
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "operator 'big': cannot import function 'nope.module:fn'" in lines[0], result.stderr


# ------------------------------------------------------------------------------ usage errors


def test_stop_unknown_mode_is_a_usage_error() -> None:
    result = run_cli("stop", "some-job", "--mode", "gentle", env=cli_env("127.0.0.1:1"))
    assert result.returncode == EXIT_USAGE
    assert "unknown stop mode 'gentle'" in result.stderr
    assert "checkpoint" in result.stderr  # lists the valid modes
    assert "Traceback" not in result.stderr


def test_wait_unknown_state_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["wait", "j", "--state", "Runing"])
    assert result.exit_code == EXIT_USAGE
    assert "unknown state 'Runing'" in result.output


def test_rescale_needs_a_target() -> None:
    result = CliRunner().invoke(app, ["rescale", "j"])
    assert result.exit_code == EXIT_USAGE
    assert "--parallelism" in result.output


def test_unreachable_server_is_one_clear_line() -> None:
    result = run_cli("status", "j", env=cli_env(f"127.0.0.1:{free_port()}"))
    assert result.returncode == 1
    assert "cannot reach Temporal at 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ dev server


def test_devserver_start_stop_leaves_no_process(tmp_path: Path) -> None:
    server = DevServer(tmp_path / "srv", port=free_port(), headless=True)
    server.start()
    pid = server.pid
    assert pid is not None and server.running()
    assert (tmp_path / "srv" / "temporal.sqlite").exists()
    server.stop()
    assert not server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_devserver_command_has_the_chosen_flags(tmp_path: Path) -> None:
    cmd = DevServer(tmp_path, dynamic_config={"limit.historyCount.suggestContinueAsNew": 200}).command()
    joined = " ".join(cmd)
    for flag in (
        "--ip 127.0.0.1",
        "--search-attribute JobState=Keyword",
        "--search-attribute PipelineName=Keyword",
        "history.transferProcessorMaxPollRPS=10000",
        "history.timerProcessorMaxPollRPS=10000",
        "limit.historyCount.suggestContinueAsNew=200",
        "--sqlite-pragma journal_mode=wal",
        "--sqlite-pragma synchronous=normal",
        f"--db-filename {tmp_path / 'temporal.sqlite'}",
    ):
        assert flag in joined, flag


def test_devserver_exit_during_startup_shows_log(tmp_path: Path) -> None:
    from sluice.devserver import DevServerError

    (tmp_path / "temporal.sqlite").write_bytes(b"this is not a database" * 100)
    server = DevServer(tmp_path, port=free_port(), headless=True)
    try:
        with pytest.raises(DevServerError, match="exited with code") as info:
            server.start()
        assert "temporal.log" in str(info.value)
        assert not server.running()
    finally:
        server.stop()


# ------------------------------------------------------------------------------ job commands


@pytest.fixture(scope="module")
def idle_server(dev_server_factory: Callable[..., DevServer]) -> Iterator[DevServer]:
    """A server no controller worker polls: started jobs stay open in Created."""
    yield dev_server_factory()


def test_start_list_wait_timeout_and_duplicate(idle_server: DevServer, tmp_path: Path) -> None:
    env = cli_env(idle_server.address, tmp_path / "state")
    path = write(tmp_path, "demo.yaml", GOOD_PIPELINE)
    job_id = f"cli-{time.time_ns()}"

    started = run_cli("start", str(path), "--job-id", job_id, env=env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == job_id

    again = run_cli("start", str(path), "--job-id", job_id, env=env)
    assert again.returncode == 1
    assert f"job {job_id} is already running" in again.stderr

    waited = run_cli("wait", job_id, "--state", "Running", "--timeout", "1", env=env)
    assert waited.returncode == EXIT_TIMEOUT, waited.stderr
    assert "did not reach Running" in waited.stderr

    deadline = time.monotonic() + 10
    while True:  # visibility is eventually consistent
        listed = run_cli("list", "--state", "Created", env=env)
        assert listed.returncode == 0, listed.stderr
        if job_id in listed.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(line.split()[:3] == [job_id, "Created", "demo"] for line in listed.stdout.splitlines()), listed.stdout
    assert listed.stdout.splitlines()[0].split() == ["JOB", "STATE", "PIPELINE", "STARTED", "(UTC)"], listed.stdout
    as_json = run_cli("list", "--state", "Created", "-o", "json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    mine = [row for row in json.loads(as_json.stdout) if row["job_id"] == job_id]
    assert [(r["state"], r["pipeline"], r["open"]) for r in mine] == [("Created", "demo", True)], as_json.stdout

    missing = run_cli("status", "no-such-job", env=env)
    assert missing.returncode == 1
    assert "job no-such-job not found" in missing.stderr


@pytest.mark.usefixtures("worker")
async def test_start_wait_returns_when_running_or_fails_with_the_compile_error(
    temporal_address: str, tmp_path: Path
) -> None:
    # The session's worker runs in this event loop: the CLI runs in a thread meanwhile.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=cli_env(temporal_address, tmp_path / "state"))

    # The sink under tmp_path: a relative path would resolve against the worker's directory.
    text = GOOD_PIPELINE.replace("path: out/demo", f"path: {tmp_path / 'out'}")
    good = write(tmp_path, "demo.yaml", text.replace("limit: 10", "rate: 10"))
    job_id = f"cli-wait-{time.time_ns()}"
    started = await asyncio.to_thread(cli, "start", str(good), "--job-id", job_id, "--wait")
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.splitlines()[0] == job_id
        assert started.stdout.splitlines()[1].startswith(f"{job_id}: Running"), started.stdout
    finally:
        await asyncio.to_thread(cli, "stop", job_id, "--mode", "force")
    # Parses (so it starts), but its function cannot be imported: the job fails while compiling.
    bad = write(tmp_path, "bad.yaml", text.replace("examples.clicks:is_big", "nope.module:fn"))
    failed = await asyncio.to_thread(cli, "start", str(bad), "--job-id", f"{job_id}-bad", "--wait")
    assert failed.returncode == 1, failed.stdout
    assert "cannot import function 'nope.module:fn'" in failed.stderr, failed.stderr


@pytest.mark.usefixtures("worker")
async def test_history_logs_and_delete_of_a_job(
    temporal_address: str, job_client: Any, tmp_path: Path, session_state_dir: Path
) -> None:
    from tests.e2e_helpers import checkpoint_root, generator_pipeline, job_spec, stop_job_quietly, wait_state

    state = tmp_path / "state"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=cli_env(temporal_address, state))

    spec = job_spec(generator_pipeline("history", tmp_path / "out", splits=1, limit=None, rate=50), state)
    await job_client.start(spec)
    try:
        await wait_state(job_client, spec.job_id, "Running", timeout_s=60)
        refused = await asyncio.to_thread(cli, "delete", spec.job_id, "--yes")
        assert refused.returncode == 1 and f"job {spec.job_id} is open; stop it first" in refused.stderr
        await job_client.stop(spec.job_id, "checkpoint")
        await wait_state(job_client, spec.job_id, "Stopped", timeout_s=60)
    finally:
        await stop_job_quietly(job_client, spec.job_id)

    shown = await asyncio.to_thread(cli, "history", spec.job_id)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split()[2:4] for line in shown.stdout.splitlines()[1:]]
    assert ["Created", "Compiling"] in rows and ["CheckpointStopping", "Stopped"] in rows, shown.stdout
    as_json = await asyncio.to_thread(cli, "history", spec.job_id, "-o", "json")
    assert json.loads(as_json.stdout)[-1]["to_state"] == "Stopped"

    # The runners' logs on this machine (the session worker's state directory).
    logged = await asyncio.to_thread(cli, "logs", spec.job_id, "--state-dir", str(session_state_dir))
    assert logged.returncode == 0, logged.stderr
    assert any(line.startswith("[g1-r0] ") and "serving on" in line for line in logged.stdout.splitlines()), logged
    nothing = await asyncio.to_thread(cli, "logs", spec.job_id, "--generation", "9", "--state-dir",
                                      str(session_state_dir))  # fmt: skip
    assert nothing.returncode == 1 and "no runner logs of generation 9" in nothing.stderr

    job_root = checkpoint_root(state) / spec.job_id
    assert job_root.is_dir()
    unconfirmed = await asyncio.to_thread(cli, "delete", spec.job_id)  # no terminal to ask on
    assert unconfirmed.returncode == EXIT_USAGE and "confirm with --yes" in unconfirmed.stderr
    assert job_root.is_dir()
    deleted = await asyncio.to_thread(cli, "delete", spec.job_id, "--yes", "--state-dir", str(session_state_dir))
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted job {spec.job_id} (Stopped)" in deleted.stdout
    assert not job_root.exists()
    assert not (session_state_dir / "runners" / spec.job_id).exists()
    assert (tmp_path / "out").is_dir()  # the output stays
