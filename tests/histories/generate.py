"""Regenerate the history corpus: real jobs on a dev server of our own, every run saved.

    .venv/bin/python -m tests.histories.generate                 # every scenario
    .venv/bin/python -m tests.histories.generate --only recovery --only ttl
    .venv/bin/python -m tests.histories.generate --list

What it does: starts a headless `temporal server start-dev` on a free loopback port (its own
temporary state dir), an in-process controller worker (the real one, `sluice.worker`), and runs
the scenarios of `tests.histories.scenarios` (a few at a time, `--jobs`), each driving a real
job with real runner processes. `continue_as_new` runs on a second server whose dynamic config
suggests continue-as-new after `HISTORY_SUGGEST_CAN` events; `worker_failover` runs with two
`sluice worker` processes instead of the in-process worker. Every run of each scenario's job is
saved as `tests/histories/<scenario>.run<N>.json` (the scenario's old files are replaced), and
every saved file is replayed against the current `JobWorkflow` before the script reports.

Exit status: 0 when every scenario ran and every file replayed; 1 otherwise (the message names
the scenario or file); 2 for a usage error. A scenario that fails (a timing hiccup on a busy
machine) is retried up to `ATTEMPTS` times with a fresh job before it counts as failed.
Everything it starts (servers, workers, runners) it stops, by PID, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHistory

from sluice.client import JobClient, connect
from sluice.devserver import DevServer, free_port
from sluice.workflows.job import JobWorkflow
from tests.conftest import LOOPBACK, kill_leftover_runners, run_process_worker, running_worker
from tests.histories.corpus import CORPUS_DIR, FILE_PATTERN, history_file_name, replay_file, scenario_of
from tests.histories.scenarios import (
    ALL_SCENARIOS,
    CAN_SCENARIOS,
    FAILOVER_SCENARIOS,
    SCENARIOS,
    ScenarioContext,
    run_ids,
)

HISTORY_SUGGEST_CAN = 40  # events: a 1 s checkpoint cycle adds ~12, so a new run every few seconds
DEFAULT_JOBS = 3  # scenarios at once on the shared server (each has one or two runner processes)
ATTEMPTS = 2  # per scenario
SCENARIO_TIMEOUT_S = 300.0  # one attempt of one scenario, however stuck
TERMINATE_TIMEOUT_S = 10.0
FAILOVER_WORKERS = 2


@dataclass
class Outcome:
    """One scenario's result: the histories of its runs (oldest first), or why it failed."""

    name: str
    histories: list[WorkflowHistory]
    error: str | None = None
    seconds: float = 0.0


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------------------ servers


@contextlib.asynccontextmanager
async def dev_server(root: Path, name: str, dynamic_config: dict[str, Any] | None = None) -> AsyncIterator[Client]:
    """A headless dev server of our own under `root/name`, stopped (by PID) on exit."""
    server = DevServer(root / name, ip=LOOPBACK, port=free_port(LOOPBACK), headless=True, dynamic_config=dynamic_config)
    await server.astart()
    try:
        yield await connect(server.address, "default")
    finally:
        await server.astop()


# ------------------------------------------------------------------------------ one scenario


async def _attempt(name: str, ctx: ScenarioContext, since: datetime) -> list[WorkflowHistory]:
    await asyncio.wait_for(ALL_SCENARIOS[name](ctx, name), timeout=SCENARIO_TIMEOUT_S)
    histories: list[WorkflowHistory] = []
    for rid in await run_ids(ctx.client, name, since):
        histories.append(await ctx.client.get_workflow_handle(name, run_id=rid).fetch_history())
    return histories


async def _terminate_open(client: Client, job_id: str) -> None:
    """After a failed attempt: end the job's open run, so the next attempt can reuse the id."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            client.get_workflow_handle(job_id).terminate("corpus generator: attempt failed"),
            timeout=TERMINATE_TIMEOUT_S,
        )


async def run_scenario(name: str, client: Client, state_root: Path, address: str | None = None) -> Outcome:
    """Run `name` up to ATTEMPTS times; with `address`, under FAILOVER_WORKERS process workers."""
    started = time.monotonic()
    error = ""
    for attempt in range(1, ATTEMPTS + 1):
        state_dir = state_root / f"{name}-{attempt}"
        state_dir.mkdir(parents=True)
        ctx = ScenarioContext(client=client, job_client=JobClient(client), state_dir=state_dir)
        since = datetime.now(UTC)
        try:
            if address is not None:
                ctx.process_workers = [run_process_worker(address, state_dir) for _ in range(FAILOVER_WORKERS)]
            histories = await _attempt(name, ctx, since)
            return Outcome(name, histories, seconds=time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - reported, retried; Ctrl-C still stops below
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                raise
            error = f"{type(exc).__name__}: {exc}"
            log(f"{name}: attempt {attempt} failed: {error}")
            if attempt == ATTEMPTS:
                traceback.print_exc()
            await _terminate_open(client, name)
        finally:
            for w in ctx.process_workers:
                w.stop()
            kill_leftover_runners(state_dir)
    return Outcome(name, [], error=error, seconds=time.monotonic() - started)


async def run_group(names: Sequence[str], client: Client, state_root: Path, jobs: int) -> list[Outcome]:
    """Run `names` with at most `jobs` at once against `client`'s server."""
    gate = asyncio.Semaphore(jobs)

    async def one(name: str) -> Outcome:
        async with gate:
            log(f"{name}: start")
            out = await run_scenario(name, client, state_root)
            log(f"{name}: {'FAILED' if out.error else 'ok'} ({out.seconds:.0f} s, {len(out.histories)} runs)")
            return out

    return list(await asyncio.gather(*(one(n) for n in names)))


# ------------------------------------------------------------------------------ files


def write_histories(outcome: Outcome, out_dir: Path) -> list[Path]:
    """Replace `outcome.name`'s files in `out_dir` with one file per run."""
    for old in out_dir.glob("*.json"):
        if FILE_PATTERN.match(old.name) and scenario_of(old) == outcome.name:
            old.unlink()
    paths: list[Path] = []
    for n, history in enumerate(outcome.histories, 1):
        path = out_dir / history_file_name(outcome.name, n)
        # Compact lines, one event per line: small files, readable diffs.
        events = json.loads(history.to_json())["events"]
        text = '{"events": [\n' + ",\n".join(json.dumps(e, separators=(",", ":")) for e in events) + "\n]}\n"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


async def replay_all(paths: Sequence[Path]) -> list[str]:
    """Replay each file against the current JobWorkflow; the problems found, one line each."""
    problems: list[str] = []
    for path in paths:
        outcome = await replay_file(path, [JobWorkflow])
        if outcome.problem:
            problems.append(outcome.problem)
    return problems


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.histories.generate", description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", default=[], metavar="SCENARIO", help="regenerate only these")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help=f"scenarios at once (default {DEFAULT_JOBS})")
    p.add_argument("--out", type=Path, default=CORPUS_DIR, help="where the files go (default: this folder)")
    p.add_argument("--list", action="store_true", help="print the scenario names and exit")
    args = p.parse_args(argv)
    unknown = [n for n in args.only if n not in ALL_SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(ALL_SCENARIOS)}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


async def generate(names: Sequence[str], out_dir: Path, jobs: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sluice-histories-"))
    started = time.monotonic()
    outcomes: list[Outcome] = []
    try:
        main_group = [n for n in names if n not in CAN_SCENARIOS and n not in FAILOVER_SCENARIOS]
        failover = [n for n in names if n in FAILOVER_SCENARIOS]
        if main_group or failover:
            async with dev_server(tmp, "temporal") as client:
                if main_group:
                    state = tmp / "state"
                    state.mkdir()
                    async with running_worker(client, state):
                        outcomes += await run_group(main_group, client, state / "jobs", jobs)
                address = client.service_client.config.target_host
                for name in failover:  # alone: two workers of their own, no in-process worker
                    log(f"{name}: start")
                    out = await run_scenario(name, client, tmp / "failover", address=address)
                    log(f"{name}: {'FAILED' if out.error else 'ok'} ({out.seconds:.0f} s, {len(out.histories)} runs)")
                    outcomes.append(out)
        can = [n for n in names if n in CAN_SCENARIOS]
        if can:
            config = {"limit.historyCount.suggestContinueAsNew": HISTORY_SUGGEST_CAN}
            async with dev_server(tmp, "temporal-can", config) as client:
                state = tmp / "state-can"
                state.mkdir()
                async with running_worker(client, state):
                    outcomes += await run_group(can, client, state / "jobs", jobs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    failed = [o for o in outcomes if o.error or not o.histories]
    written: list[Path] = []
    for o in outcomes:
        if not o.error and o.histories:
            written += write_histories(o, out_dir)
    problems = await replay_all(written)
    log(
        f"{len(written)} history files from {len(outcomes) - len(failed)} scenarios "
        f"in {time.monotonic() - started:.0f} s"
    )
    for o in failed:
        print(f"error: scenario {o.name} failed: {o.error or 'no runs recorded'}", file=sys.stderr)
    for p in problems:
        print(f"error: replay of {p}", file=sys.stderr)
    return 1 if failed or problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        print("\n".join(ALL_SCENARIOS))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(generate(args.only or list(SCENARIOS), args.out, args.jobs))


if __name__ == "__main__":
    sys.exit(main())
