#!/usr/bin/env python
"""Lifecycle latency benchmark: how long sluice's controller takes to move a job through its life.

Run:  .venv/bin/python bench/lifecycle.py [--runs N] [--json PATH]   (or `make bench`)

Everything runs on this machine and is owned by this script: a headless `temporal server
start-dev` on free loopback ports with its own temporary state directory, an in-process controller
worker (task queue `sluice`), and an extra in-process worker on its own task queue for the baseline.

Each measured run starts a fresh job: an unbounded, rate-limited `generator` source feeding a
`files` sink, parallelism 2, one slot per runner (so two runner processes), a checkpoint every
second. On that job, in order:

  start      JobClient.start -> Running (the wait_for_state update returns); cross-checked with the
             time of the Running transition in status().transitions.
  kill       after a checkpoint completed: SIGKILL one runner (a pid from status().runners, verified
             to be a sluice runner of this job and generation) -> Running again with a higher
             generation (status polled every 20 ms until the job leaves Running, then the
             wait_for_state update). Split from the transitions: kill -> Recovering (failure
             detection) and Recovering -> Running (backoff, teardown, compile, schedule, start).
  stop       after a checkpoint of the new generation completed: JobClient.stop(mode="checkpoint")
             -> Stopped (the wait_for_state update returns); also -> the workflow closed (result).

Baseline, on the same server in the same process: a trivial workflow that runs one no-op activity
and completes (start -> result), sampled between the lifecycle runs. Every lifecycle number is also
reported as a ratio to the baseline's median: the machine is shared and noisy, so ratios are what
compare across runs and machines.

Cleanup (also on error or Ctrl-C): every job still open is force-stopped, every runner of every job
is stopped by pid through ProcessScheduler(state_dir).stop_runners, the workers shut down, the
server is stopped, and the temporary state directory is removed (unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

# The workflow sandbox re-imports this module for BenchBaseline: touch the file system only outside.
if not workflow.unsafe.in_sandbox():
    REPO = Path(__file__).resolve().parents[1]
    if str(REPO) not in sys.path:  # so `sluice` imports when run as a script from anywhere
        sys.path.insert(0, str(REPO))

BASELINE_TASK_QUEUE = "sluice-bench-baseline"
POLL_S = 0.02
STEP_TIMEOUT_S = 60.0  # no single lifecycle step should come near this; it only bounds a hang


# ----------------------------------------------------------------------------- baseline workflow


@activity.defn(name="bench_noop")
async def bench_noop() -> None:
    return None


@workflow.defn(name="BenchBaseline")
class BenchBaseline:
    """The floor: one workflow task, one activity, one more workflow task, completion."""

    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(bench_noop, start_to_close_timeout=timedelta(seconds=30))


# ----------------------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "p90": None, "min": None, "max": None, "mean": None}
    s = sorted(values)
    if len(s) == 1:
        p90 = s[0]
    else:  # linear interpolation between closest ranks (statistics' "inclusive" method)
        p90 = statistics.quantiles(s, n=10, method="inclusive")[8]
    return {
        "n": len(s),
        "median": statistics.median(s),
        "p90": p90,
        "min": s[0],
        "max": s[-1],
        "mean": statistics.fmean(s),
    }


def ts(dt: datetime) -> float:
    """A transition time (timezone-aware, from workflow.now()) as a Unix timestamp."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ----------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    state_dir: Path
    rate: float
    verbose: bool
    client: Client | None = None
    jobs: list[str] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ------------------------------------------------------------------ baseline

    async def baseline_samples(self, count: int) -> list[float]:
        assert self.client is not None
        out: list[float] = []
        for _ in range(count):
            wf_id = f"bench-baseline-{uuid.uuid4().hex[:12]}"
            t0 = time.perf_counter()
            await self.client.execute_workflow(
                BenchBaseline.run, id=wf_id, task_queue=BASELINE_TASK_QUEUE,
                execution_timeout=timedelta(seconds=STEP_TIMEOUT_S),
            )
            out.append(time.perf_counter() - t0)
        self.baseline.extend(out)
        return out

    # ------------------------------------------------------------------ one lifecycle run

    def spec(self, job_id: str) -> Any:
        from sluice.models import JobConfig, JobSpec, PipelineSpec

        pipeline = PipelineSpec.model_validate(
            {
                "name": "bench_lifecycle",
                "parallelism": 2,
                "operators": [
                    # unbounded (no limit), rate limited: rows per second per split
                    {"id": "events", "type": "generator", "splits": 2, "keys": 100, "rate": self.rate},
                    {"id": "out", "type": "files", "path": str(self.state_dir / "out" / job_id)},
                ],
            }
        )
        return JobSpec(
            job_id=job_id,
            pipeline=pipeline,
            config=JobConfig(checkpoint_interval_s=1, slots_per_runner=1),
            checkpoint_url=str(self.state_dir / "checkpoints"),
        )

    async def wait_epoch(self, jc: Any, job_id: str, above: int, generation: int) -> Any:
        """Poll status until a checkpoint above `above` completed in `generation`; return the status."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            st = await jc.status(job_id)
            if st.state != "Running":
                raise RuntimeError(f"job {job_id} left Running while waiting for a checkpoint: {st.state}")
            if st.epoch > above and st.generation == generation:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: no checkpoint above epoch {above} within {STEP_TIMEOUT_S:g} s")
            await asyncio.sleep(POLL_S)

    async def run_once(self, jc: Any, index: int) -> dict[str, Any]:
        from sluice.schedulers.process import is_runner_process

        job_id = f"bench-{index}-{uuid.uuid4().hex[:8]}"
        self.jobs.append(job_id)
        r: dict[str, Any] = {"job_id": job_id}

        # 1. start -> Running
        wall0 = time.time()
        t0 = time.perf_counter()
        await jc.start(self.spec(job_id))
        st = await jc.wait_for_state(job_id, ["Running"], timeout_s=STEP_TIMEOUT_S)
        r["start_to_running_s"] = time.perf_counter() - t0
        running_tr = [t for t in st.transitions if t.to_state == "Running"]
        created_tr = st.transitions[0]
        r["start_to_running_transition_s"] = ts(running_tr[-1].time) - wall0
        r["start_workflow_first_task_s"] = ts(created_tr.time) - wall0  # Created -> Compiling
        r["runners_gen1"] = len(st.runners)
        gen1 = st.generation
        self.log(f"{job_id}: Running in {r['start_to_running_s']:.3f} s, generation {gen1}, {len(st.runners)} runners")

        # 3. SIGKILL one runner -> Running again, higher generation
        st = await self.wait_epoch(jc, job_id, above=0, generation=gen1)
        victim = st.runners[0]
        if victim.pid is None or not is_runner_process(victim.pid, job_id, gen1):
            raise RuntimeError(f"pid {victim.pid} is not a runner of {job_id} generation {gen1}; not killing it")
        kill_wall = time.time()
        t0 = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:  # until the controller noticed (state or generation changed)
            st = await jc.status(job_id)
            if st.state != "Running" or st.generation != gen1:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: the runner's death was not noticed within {STEP_TIMEOUT_S:g} s")
            await asyncio.sleep(POLL_S)
        r["kill_noticed_by_poll_s"] = time.perf_counter() - t0
        if not (st.state == "Running" and st.generation > gen1):
            st = await jc.wait_for_state(job_id, ["Running"], timeout_s=STEP_TIMEOUT_S)
        r["kill_to_running_s"] = time.perf_counter() - t0
        if st.generation <= gen1:
            raise RuntimeError(f"job {job_id}: Running again but generation {st.generation} <= {gen1}")
        gen2 = st.generation
        after = [t for t in st.transitions if ts(t.time) >= kill_wall - 0.005]
        rec = next((t for t in after if t.to_state == "Recovering"), None)
        run2 = [t for t in after if t.to_state == "Running"]
        if rec is not None and run2:
            r["kill_to_recovering_s"] = ts(rec.time) - kill_wall
            r["recovering_to_running_s"] = ts(run2[-1].time) - ts(rec.time)
            r["kill_to_running_transition_s"] = ts(run2[-1].time) - kill_wall
            r["recovering_reason"] = rec.reason
        r["restarts_after_kill"] = st.restarts
        self.log(
            f"{job_id}: killed pid {victim.pid}; Running again (generation {gen2}) in "
            f"{r['kill_to_running_s']:.3f} s (detect {r.get('kill_to_recovering_s', float('nan')):.3f} s)"
        )

        # 2. stop (checkpoint) -> Stopped
        st = await self.wait_epoch(jc, job_id, above=st.epoch, generation=gen2)
        epoch_before = st.epoch
        t0 = time.perf_counter()
        stop_wall = time.time()
        await jc.stop(job_id, mode="checkpoint")
        r["stop_accepted_s"] = time.perf_counter() - t0
        st = await jc.wait_for_state(job_id, ["Stopped"], timeout_s=STEP_TIMEOUT_S)
        r["stop_to_stopped_s"] = time.perf_counter() - t0
        await jc.client.get_workflow_handle(job_id).result()
        r["stop_to_closed_s"] = time.perf_counter() - t0
        stopped_tr = [t for t in st.transitions if t.to_state == "Stopped"]
        if stopped_tr:
            r["stop_to_stopped_transition_s"] = ts(stopped_tr[-1].time) - stop_wall
        r["final_epoch"] = st.epoch
        r["transitions"] = [  # the job's whole life, seconds since JobClient.start was called
            {"at_s": round(ts(t.time) - wall0, 4), "from": t.from_state, "to": t.to_state, "reason": t.reason}
            for t in st.transitions
        ]
        r["kill_at_s"] = round(kill_wall - wall0, 4)
        r["stop_at_s"] = round(stop_wall - wall0, 4)
        if st.epoch <= epoch_before:
            raise RuntimeError(f"job {job_id}: Stopped without a final checkpoint (epoch {st.epoch} <= {epoch_before})")
        self.log(f"{job_id}: Stopped in {r['stop_to_stopped_s']:.3f} s (final epoch {st.epoch})")
        return r

    # ------------------------------------------------------------------ cleanup

    async def cleanup(self, jc: Any) -> None:
        from bench_common import stop_jobs_and_runners

        await stop_jobs_and_runners(jc, self.state_dir, self.jobs)


# ----------------------------------------------------------------------------- report

ROWS: list[tuple[str, str]] = [
    ("baseline_s", "baseline: trivial workflow, 1 no-op activity (start -> result)"),
    ("start_to_running_s", "start -> Running (wait_for_state)"),
    ("start_to_running_transition_s", "  start -> Running transition (status.transitions)"),
    ("kill_to_running_s", "runner SIGKILL -> Running, new generation"),
    ("kill_to_recovering_s", "  kill -> Recovering (transition)"),
    ("recovering_to_running_s", "  Recovering -> Running (transitions)"),
    ("stop_to_stopped_s", "stop(checkpoint) -> Stopped (wait_for_state)"),
    ("stop_to_stopped_transition_s", "  stop -> Stopped transition (status.transitions)"),
    ("stop_to_closed_s", "  stop -> workflow closed (result)"),
]


def build_results(runs: list[dict[str, Any]], baseline: list[float], warmup: list[dict[str, Any]]) -> dict[str, Any]:
    import temporalio

    samples: dict[str, list[float]] = {"baseline_s": baseline}
    for key, _ in ROWS[1:]:
        samples[key] = [r[key] for r in runs if r.get(key) is not None]
    summary = {k: summarize(v) for k, v in samples.items()}
    base = summary["baseline_s"]["median"]
    for _k, s in summary.items():
        s["ratio_to_baseline"] = (s["median"] / base) if (s["median"] is not None and base) else None
    return {
        "benchmark": "lifecycle",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "temporalio": temporalio.__version__,
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "summary": summary,
        "samples": samples,
        "runs": runs,
        "warmup_runs": warmup,
    }


def print_table(results: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    print()
    print(f"{'step':<52} {'n':>3} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} {'x base':>7}")
    print(f"{'(milliseconds)':<52}")
    for key, label in ROWS:
        s = results["summary"][key]
        ratio = s["ratio_to_baseline"]
        print(
            f"{label:<52} {s['n']:>3} {ms(s['median']):>8} {ms(s['p90']):>8} {ms(s['min']):>8} {ms(s['max']):>8} "
            f"{'-' if ratio is None else f'{ratio:.1f}':>7}"
        )
    m = results["machine"]
    print(f"\n{m['nproc']} cores, Python {m['python']}, temporalio {m['temporalio']}, load {m['loadavg_at_end']}")


# ----------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from sluice.client import JobClient, connect
    from sluice.devserver import DevServer, free_port
    from sluice.worker import create_worker

    state_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    bench = Bench(state_dir=state_dir, rate=args.rate, verbose=not args.quiet)
    server = DevServer(state_dir / "temporal", port=free_port(), ui_port=None, headless=True)
    t_begin = time.perf_counter()
    print(f"state dir {state_dir}; starting dev server on {server.address}", flush=True)
    await server.astart()
    jc = None
    try:
        client = await connect(server.address)
        bench.client = client
        jc = JobClient(client)
        controller = create_worker(client, state_dir)
        baseline_worker = Worker(
            client, task_queue=BASELINE_TASK_QUEUE, workflows=[BenchBaseline], activities=[bench_noop]
        )
        runs: list[dict[str, Any]] = []
        warmup: list[dict[str, Any]] = []
        async with controller, baseline_worker:
            try:
                await bench.baseline_samples(2)  # warm-up: not recorded
                bench.baseline.clear()
                for i in range(args.warmup):
                    bench.log(f"warm-up run {i + 1}/{args.warmup}")
                    warmup.append(await bench.run_once(jc, -(i + 1)))
                for i in range(args.runs):
                    bench.log(f"run {i + 1}/{args.runs}")
                    samples = await bench.baseline_samples(args.baseline_per_run)
                    bench.log("baseline " + ", ".join(f"{s * 1000:.0f} ms" for s in samples))
                    runs.append(await bench.run_once(jc, i + 1))
                samples = await bench.baseline_samples(args.baseline_per_run)
                bench.log("baseline " + ", ".join(f"{s * 1000:.0f} ms" for s in samples))
            finally:
                await bench.cleanup(jc)
        results = build_results(runs, bench.baseline, warmup)
        results["config"] = {
            "runs": args.runs,
            "warmup": args.warmup,
            "baseline_per_run": args.baseline_per_run,
            "pipeline": f"generator(splits 2, unbounded, rate {args.rate:g}/s per split) -> files",
            "parallelism": 2,
            "slots_per_runner": 1,
            "checkpoint_interval_s": 1,
            "dev_server": server.command()[1:],
        }
        results["total_s"] = time.perf_counter() - t_begin
        return results
    finally:
        await server.astop()
        if args.keep:
            print(f"kept {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="measured lifecycle runs (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded lifecycle runs first (default 1)")
    p.add_argument("--baseline-per-run", type=int, default=3,
                   help="baseline samples before each run and at the end (default 3)")
    p.add_argument("--rate", type=float, default=1000.0, help="generator rows per second per split (default 1000)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory (server log, runner logs)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be >= 1")
    results = asyncio.run(main_async(args))
    print_table(results)
    print(f"total {results['total_s']:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
