"""What `sluice` prints: the status panel, `-o json` of every read command (the shapes docs/cli.md
documents), `--watch`, `sluice list`'s filters, one-line errors with their exit codes, shell
completion, and `sluice run`'s transitions without a terminal.

Real processes against real dev servers: `idle_server` has no controller worker (a started job
stays in Created), the session's `worker` fixture runs jobs to the end.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sluice.cli import EXIT_FAILED, EXIT_USAGE
from sluice.devserver import DevServer, free_port
from sluice.models import Failure, JobConfig, JobStatus, RejectedCommand, RunnerInfo, TransitionRecord
from sluice.status_view import duration, status_panel, status_parts
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.e2e_helpers import generator_pipeline, job_spec, stop_job_quietly, wait_state, wait_status

CLI_TIMEOUT_S = 60.0
VISIBILITY_TIMEOUT_S = 15.0  # visibility (what `list` searches) is eventually consistent
WATCH_END_TIMEOUT_S = 90.0  # a watched job is stopped with a checkpoint, then the watch ends
DOCS = PROJECT_ROOT / "docs" / "cli.md"
RUN_RECORDS, RUN_RATE = 800, 100  # `sluice run`'s job runs for 8 s, then finishes

PIPELINE = """\
name: {name}
operators:
  - {{id: events, type: generator, limit: 10}}
  - {{id: out, type: files, path: {out}}}
"""


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`sluice ARGS` in a subprocess: exit codes and stderr as a user sees them (no terminal)."""
    return subprocess.run(
        sluice_command(*args), cwd=PROJECT_ROOT, env=env or dict(os.environ), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single `error: ...` line a failed command must print on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "╭" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def documented_keys() -> dict[str, set[str]]:
    """Each command's top-level JSON keys as docs/cli.md shows them (`<!-- json-shape: CMD -->`
    followed by a json block; for a list, the keys of its first element)."""
    shapes: dict[str, set[str]] = {}
    for command, body in re.findall(r"<!-- json-shape: (\w+) -->\s*```json\n(.*?)```", DOCS.read_text(), re.S):
        example = json.loads(body)
        shapes[command] = set(example[0] if isinstance(example, list) else example)
    return shapes


def keys_of(document: Any) -> set[str]:
    """The top-level keys of a command's JSON (of its first element, for a list)."""
    if isinstance(document, list):
        assert document, "an empty list shows no keys"
        document = document[0]
    return set(document)


# ------------------------------------------------------------------------------ the status panel


def test_duration_is_short_and_human() -> None:
    assert [duration(s) for s in (0, 45, 192, 7_500, 360_000)] == ["0s", "45s", "3m 12s", "2h 5m", "4d 4h"]


def _render(renderable: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=200, highlight=False, color_system=None).print(renderable)
    return out.getvalue()


def test_status_panel_shows_every_section() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    failure = Failure(
        message="operator 'parse' (map m:parse) raised ValueError: bad", domain="user", operator="parse",
        traceback='Traceback (most recent call last):\n  File "/src/m.py", line 12, in parse\nValueError: bad\n',
    )
    rejected = [
        RejectedCommand(time=now - timedelta(seconds=10 - i), command="rescale", payload=f'{{"parallelism": -{i}}}',
                        reason=f"refusal {i}")
        for i in range(5)
    ]  # fmt: skip
    status = JobStatus(
        job_id="j", pipeline_name="p", state="Failed", generation=4, epoch=2, restarts=3,
        config=JobConfig(allowed_restarts=20), parallelism={"events": 2, "parse": 1},
        runners=[RunnerInfo(runner_id="g4-r0", generation=4, host="127.0.0.1", host_id="h1", control_port=1,
                            data_port=2, pid=10, slots=4)],
        failure=failure, rejected_commands=rejected, waiting_for="a free runner slot",
        transitions=[TransitionRecord(time=now - timedelta(seconds=65), from_state="Failing", to_state="Failed",
                                      reason="the same failure 3 times")],
    )  # fmt: skip
    parts = status_parts(status, now=now, checkpoint_time=now - timedelta(seconds=30))
    plain = _render(status_panel(status, parts, boxed=False)).splitlines()
    assert plain[0] == "j: Failed for 1m 5s (since 2026-01-02 03:03:00 UTC)"
    assert plain[1] == "last transition: Failing -> Failed at 2026-01-02 03:03:00 UTC: the same failure 3 times"
    assert "generation: 4" in plain
    assert "last checkpoint: epoch 2, 30s ago (2026-01-02 03:03:35 UTC)" in plain
    assert "restarts: 3 of 20 allowed (the count resets after 120 s healthy)" in plain
    assert "parallelism: events=2, parse=1" in plain
    assert "runners: 1 on h1" in plain
    assert "waiting for: a free runner slot" in plain
    assert "failure (user, operator 'parse'): operator 'parse' (map m:parse) raised ValueError: bad" in plain
    assert '      File "/src/m.py", line 12, in parse' in plain  # the traceback, under the failure
    at = plain.index("rejected commands (newest 3 of 5):")
    assert [line.rsplit(": ", 1)[1] for line in plain[at + 1 : at + 4]] == ["refusal 4", "refusal 3", "refusal 2"]
    assert '2026-01-02 03:03:59 UTC rescale {"parallelism": -4}: refusal 4' in plain[at + 1]
    # On a terminal: the same lines in a box titled with the job and its pipeline.
    boxed = _render(status_panel(status, parts))
    assert boxed.splitlines()[0].startswith("╭─ job j · pipeline p ")
    assert "│ j: Failed for 1m 5s" in boxed
    # No checkpoint yet; an unknown age shows the epoch alone.
    fresh = status.model_copy(update={"epoch": 0})
    assert "last checkpoint: none yet" in _render(status_panel(fresh, status_parts(fresh, now=now), boxed=False))
    assert "last checkpoint: epoch 2\n" in _render(status_panel(status, status_parts(status, now=now), boxed=False))


# ------------------------------------------------------------------------------ usage errors


USAGE_ERRORS: list[tuple[str, list[str], str]] = [
    ("unknown-option", ["status", "j", "--bogus"], "error: No such option: --bogus (see '"),
    ("unknown-command", ["stauts", "j"], "error: No such command 'stauts'"),
    ("missing-argument", ["status"], "error: Missing argument 'JOB'"),
    ("bad-output", ["list", "-o", "yaml"], "'yaml' is not one of 'table', 'json'"),
    ("unknown-state", ["list", "--state", "Runing"], "error: unknown state 'Runing'; expected one of: Created"),
    ("bad-number", ["rescale", "j", "--parallelism", "0"], "--parallelism"),
    ("malformed-override", ["rescale", "j", "--override", "big"], "error: --override 'big': expected OPERATOR=N"),
    ("bad-watch-interval", ["status", "j", "-w", "--interval", "0.01"], "--interval"),
]


@pytest.mark.parametrize("args,needle", [(a, n) for _, a, n in USAGE_ERRORS], ids=[i for i, _, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_and_exit_2(args: list[str], needle: str) -> None:
    result = run_cli(*args, env=cli_env("127.0.0.1:1"))  # nothing answers there: nothing is asked
    assert result.returncode == EXIT_USAGE, result.stderr
    assert needle in one_error_line(result)


def test_invalid_pipeline_file_exits_2_and_null_type_says_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: p\noperators:\n  - {id: g, type: generator}\n  - {id: o, type: null}\n")
    for command in ("validate", "start"):
        result = run_cli(command, str(path), env=cli_env("127.0.0.1:1"))
        assert result.returncode == EXIT_USAGE, result.stderr
        assert one_error_line(result) == (
            'error: p.yaml: operators.1.type: null is YAML for "no value"; write type: "null" for the null sink'
        )


def test_unreachable_server_exits_1_with_one_line() -> None:
    for args in (["status", "j"], ["list"], ["hosts", "-o", "json"], ["history", "j"]):
        result = run_cli(*args, env=cli_env(f"127.0.0.1:{free_port()}"))
        assert result.returncode == EXIT_FAILED, result.stderr
        assert "cannot reach Temporal at 127.0.0.1:" in one_error_line(result)


def test_shell_completion_is_enabled() -> None:
    # Typer detects the user's shell from the parent processes (under `make` that is sh, which it
    # does not support); its test switch makes `--show-completion` take the shell's name instead.
    env = {**cli_env("127.0.0.1:1"), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = subprocess.run(
        [sys.executable, "-c", "from sluice.cli import app; app(prog_name='sluice')", "--show-completion", "bash"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "_SLUICE_COMPLETE=complete_bash" in shown.stdout and "complete " in shown.stdout, shown.stdout


def complete(env: dict[str, str], *words: str) -> list[str]:
    """What bash completion offers after `sluice WORDS` (the last word is the one being typed)."""
    env = {**env, "_SLUICE_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(["sluice", *words]),
           "COMP_CWORD": str(len(words))}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", "from sluice.cli import app; app(prog_name='sluice')"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


# ------------------------------------------------------------------------------ jobs that stay Created


@pytest.fixture(scope="module")
def idle_server(dev_server_factory: Callable[..., DevServer]) -> Iterator[DevServer]:
    """A server no controller worker polls: started jobs stay open in Created."""
    yield dev_server_factory()


def _wait_listed(env: dict[str, str], args: list[str], check: Callable[[list[dict[str, Any]]], bool]) -> list[Any]:
    """`sluice list ARGS -o json` once `check` holds for it (visibility catches up in a moment)."""
    deadline = time.monotonic() + VISIBILITY_TIMEOUT_S
    while True:
        listed = run_cli("list", *args, "-o", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows: list[dict[str, Any]] = json.loads(listed.stdout)
        if check(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_list_filters_open_all_state_and_pipeline(idle_server: DevServer, tmp_path: Path) -> None:
    env = cli_env(idle_server.address, tmp_path / "state")
    tag = f"{time.time_ns()}"
    ids = {"a": f"list-a-{tag}", "b": f"list-b-{tag}", "c": f"list-c-{tag}"}
    pipelines = {"a": f"alpha{tag}", "b": f"beta{tag}", "c": f"beta{tag}"}
    for key, job_id in ids.items():
        path = tmp_path / f"{key}.yaml"
        path.write_text(PIPELINE.format(name=pipelines[key], out=tmp_path / f"out-{key}"))
        started = run_cli("start", str(path), "--job-id", job_id, env=env)
        assert started.returncode == 0, started.stderr
    # Close c's run from outside: its JobState stays Created, but it is no longer open.
    temporal = Path(sys.executable).parent / "temporal"
    closed = subprocess.run([str(temporal), "workflow", "terminate", "--address", idle_server.address,
                             "--workflow-id", ids["c"], "--reason", "test"], capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)  # fmt: skip
    assert closed.returncode == 0, closed.stderr

    def mine(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {r["job_id"]: r for r in rows if r["job_id"] in ids.values()}

    every = _wait_listed(env, ["--all"], lambda rows: len(mine(rows)) == 3 and not mine(rows)[ids["c"]]["open"])
    assert {k: (r["state"], r["open"]) for k, r in mine(every).items()} == {
        ids["a"]: ("Created", True), ids["b"]: ("Created", True), ids["c"]: ("Created", False)
    }, every
    assert set(mine(_wait_listed(env, [], lambda rows: ids["c"] not in mine(rows)))) == {ids["a"], ids["b"]}
    of_beta = _wait_listed(env, ["--pipeline", pipelines["b"], "--all"], lambda rows: len(rows) == 2)
    assert {r["job_id"] for r in of_beta} == {ids["b"], ids["c"]}, of_beta
    assert [r["job_id"] for r in _wait_listed(env, ["--pipeline", pipelines["b"]], lambda rows: len(rows) == 1)] == [
        ids["b"]
    ]
    # --state searches closed runs too; repeated, it means any of them.
    by_state = _wait_listed(env, ["--state", "Created", "--state", "Running"], lambda rows: len(mine(rows)) == 3)
    assert set(mine(by_state)) == set(ids.values()), by_state
    assert not mine(_wait_listed(env, ["--state", "Running"], lambda rows: True))
    # The table: a header, then one line per job with its pipeline.
    table = run_cli("list", "--pipeline", pipelines["a"], env=env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["JOB", "STATE", "PIPELINE", "STARTED", "(UTC)"]
    assert table.stdout.splitlines()[1].split()[:3] == [ids["a"], "Created", pipelines["a"]], table.stdout
    bad = run_cli("list", "--pipeline", 'x" OR "1', env=env)
    assert bad.returncode == EXIT_USAGE and "--pipeline" in one_error_line(bad)
    # Shell completion offers job ids that match what was typed.
    assert set(complete(env, "status", f"list-a-{tag}"[:-3])) == {ids["a"]}
    assert set(complete(env, "status", "list-")) >= set(ids.values())


def test_rejected_command_and_unknown_job_exit_1(idle_server: DevServer, tmp_path: Path) -> None:
    env = cli_env(idle_server.address, tmp_path / "state")
    job_id = f"reject-{time.time_ns()}"
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(name="reject", out=tmp_path / "out"))
    assert run_cli("start", str(path), "--job-id", job_id, env=env).returncode == 0
    refused = run_cli("restart", job_id, "--restore-epoch", "1", env=env)
    assert refused.returncode == EXIT_FAILED
    assert one_error_line(refused) == (
        f"error: job {job_id} is open; restoring epoch 1 needs a Stopped or Failed job (stop it first)"
    )
    for args in (["status", "no-such-job"], ["status", "no-such-job", "-w"], ["history", "no-such-job", "-o", "json"]):
        missing = run_cli(*args, env=env)
        assert missing.returncode == EXIT_FAILED, missing.stderr
        assert one_error_line(missing) == "error: job no-such-job not found"


# ------------------------------------------------------------------------------ running jobs


def unbounded_job(name: str, temporal_address: str, tmp_path: Path) -> tuple[dict[str, str], Any]:
    """(the CLI's environment, the spec of an endless gentle job writing under tmp_path)."""
    state = tmp_path / "state"
    spec = job_spec(generator_pipeline(name, tmp_path / "out", splits=1, limit=None, rate=50), state)
    return cli_env(temporal_address, state), spec


@pytest.mark.usefixtures("worker")
async def test_read_commands_json_has_the_documented_keys(
    temporal_address: str, job_client: Any, tmp_path: Path
) -> None:
    env, spec = unbounded_job("shapes", temporal_address, tmp_path)
    await job_client.start(spec)
    try:
        await wait_status(job_client, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 1, timeout_s=60)
        saved = await asyncio.to_thread(run_cli, "savepoint", spec.job_id, "--name", "shape", env=env)
        assert saved.returncode == 0, saved.stderr
        documented = documented_keys()
        assert set(documented) == {"status", "list", "history", "checkpoints", "savepoints", "hosts"}
        commands = {
            "status": ["status", spec.job_id], "list": ["list", "--pipeline", "shapes"],
            "history": ["history", spec.job_id], "checkpoints": ["checkpoints", spec.job_id],
            "savepoints": ["savepoints", spec.job_id], "hosts": ["hosts"],
        }  # fmt: skip
        for name, args in commands.items():
            shown = await asyncio.to_thread(run_cli, *args, "-o", "json", env=env)
            assert shown.returncode == 0, (name, shown.stderr)
            assert keys_of(json.loads(shown.stdout)) == documented[name], (name, shown.stdout)
        alias = await asyncio.to_thread(run_cli, "status", spec.job_id, "--json", env=env)  # the old spelling
        assert json.loads(alias.stdout)["job_id"] == spec.job_id

        # The panel without a terminal: the same lines as on one, unboxed and unwrapped.
        panel = await asyncio.to_thread(run_cli, "status", spec.job_id, env=env)
        assert panel.returncode == 0, panel.stderr
        lines = panel.stdout.splitlines()
        assert re.fullmatch(rf"{spec.job_id}: Running for \d+[smh].* \(since .* UTC\)", lines[0]), lines
        assert re.search(r"^last checkpoint: epoch \d+, \d+s ago", panel.stdout, re.M), panel.stdout
        assert "restarts: 0 of 20 allowed" in panel.stdout and "parallelism: events=1, filter0=1, out=1" in lines
        assert "│" not in panel.stdout
    finally:
        await stop_job_quietly(job_client, spec.job_id)


def _watch_process(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(sluice_command(*args), cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.usefixtures("worker")
async def test_status_watch_prints_changes_and_ends_with_the_job(
    temporal_address: str, job_client: Any, tmp_path: Path
) -> None:
    env, spec = unbounded_job("watched", temporal_address, tmp_path)
    await job_client.start(spec)
    try:
        await wait_state(job_client, spec.job_id, "Running", timeout_s=60)
        watch = _watch_process(env, "status", spec.job_id, "--watch", "--interval", "0.5")
        as_json = _watch_process(env, "status", spec.job_id, "-w", "-o", "json", "--interval", "0.5")
        await asyncio.sleep(2)  # a few refreshes of a job that only checkpoints (once a second)
        await job_client.stop(spec.job_id, "checkpoint")
        code, out, err = await asyncio.to_thread(_finish, watch, WATCH_END_TIMEOUT_S)
        json_code, json_out, json_err = await asyncio.to_thread(_finish, as_json, WATCH_END_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert code == 0, err
    blocks = [b for b in out.split("\n\n") if b.strip()]
    heads = [b.splitlines()[0].split(" for ")[0] for b in blocks]
    assert heads[0] == f"{spec.job_id}: Running" and heads[-1] == f"{spec.job_id}: Stopped", out
    assert all(a != b for a, b in zip(blocks, blocks[1:], strict=False)), "a block only when something changed"
    assert json_code == 0, json_err
    states = [json.loads(line)["state"] for line in json_out.splitlines()]
    assert states[0] == "Running" and states[-1] == "Stopped", json_out


@pytest.mark.usefixtures("worker")
async def test_status_watch_of_a_failing_job_exits_1(temporal_address: str, tmp_path: Path) -> None:
    env = cli_env(temporal_address, tmp_path / "state")
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"name: bad\noperators:\n  - {{id: events, type: generator, limit: 10}}\n"
        f"  - {{id: big, type: filter, fn: 'nope.module:fn'}}\n  - {{id: out, type: files, path: {tmp_path / 'o'}}}\n"
    )
    job_id = f"watch-fail-{time.time_ns()}"
    started = await asyncio.to_thread(run_cli, "start", str(path), "--job-id", job_id, env=env)
    assert started.returncode == 0, started.stderr
    watched = await asyncio.to_thread(run_cli, "status", job_id, "-w", "--interval", "0.5", env=env)
    assert watched.returncode == EXIT_FAILED, watched.stderr
    last = [b for b in watched.stdout.split("\n\n") if b.strip()][-1]
    assert last.startswith(f"{job_id}: Failed") and "cannot import function 'nope.module:fn'" in last, last


@pytest.mark.usefixtures("worker")
async def test_list_watch_without_a_terminal_prints_changes_until_ctrl_c(
    temporal_address: str, job_client: Any, tmp_path: Path
) -> None:
    name = f"lw{time.time_ns()}"
    env, spec = unbounded_job(name, temporal_address, tmp_path)
    watch = _watch_process(env, "list", "--pipeline", name, "--all", "-w", "--interval", "0.5")
    try:
        assert watch.stdout is not None
        first = await asyncio.to_thread(watch.stdout.readline)  # the watch runs: then the job starts
        assert first == "no jobs\n", first
        await job_client.start(spec)
        await wait_state(job_client, spec.job_id, "Running", timeout_s=60)
        await asyncio.sleep(3)  # visibility shows Running a moment later
    finally:
        await stop_job_quietly(job_client, spec.job_id)
        await asyncio.sleep(3)
        watch.send_signal(signal.SIGINT)
        code, out, err = await asyncio.to_thread(_finish, watch, CLI_TIMEOUT_S)
    assert code == 130, err
    blocks = [b.splitlines() for b in out.split("\n\n") if b.strip()]
    states = [row.split()[1] for block in blocks for row in block[1:] if row.split()[0] == spec.job_id]
    assert "Running" in states and states[-1] == "Stopped", out
    # About 16 refreshes, but a block only when the list changed: once per state at most.
    assert len(blocks) <= 8 and all(a != b for a, b in zip(blocks, blocks[1:], strict=False)), out


@pytest.mark.usefixtures("worker")
async def test_run_without_a_terminal_prints_each_transition_as_it_happens(
    temporal_address: str, tmp_path: Path
) -> None:
    path = tmp_path / "run.yaml"
    name = f"runlines{time.time_ns()}"
    path.write_text(f"name: {name}\noperators:\n"
                    f"  - {{id: events, type: generator, limit: {RUN_RECORDS}, rate: {RUN_RATE}}}\n"
                    f"  - {{id: out, type: files, path: {tmp_path / 'out'}}}\n")  # fmt: skip
    env = cli_env(temporal_address, tmp_path / "state")

    def run_and_time_lines() -> tuple[int, list[tuple[float, str]], str]:
        proc = subprocess.Popen(sluice_command("run", str(path)), cwd=PROJECT_ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None
        arrivals = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
        _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        ended = time.monotonic()
        return proc.returncode, [(ended - t, line) for t, line in arrivals], err  # (seconds before the end, line)

    code, lines, err = await asyncio.to_thread(run_and_time_lines)
    assert code == 0, err
    text = [line for _, line in lines]
    transitions = [re.sub(r"^\S+ \S+ UTC ", "", line).split(":")[0] for line in text if " UTC " in line]
    assert transitions == ["Created -> Compiling", "Compiling -> Scheduling", "Scheduling -> Running",
                           "Running -> Finishing", "Finishing -> Finished"], text  # fmt: skip
    assert f"job {name} is Finished (last checkpoint: epoch 1)" in text, text
    # As it happens: Running was printed while the job ran (RUN_RECORDS / RUN_RATE seconds), not at
    # the end; the margin allows for a loaded machine's slow status queries.
    before_end = dict((line.split(" UTC ")[-1].split(":")[0], ago) for ago, line in lines if " UTC " in line)
    assert before_end["Scheduling -> Running"] > RUN_RECORDS / RUN_RATE / 3, lines
