#!/usr/bin/env python
"""Data-plane benchmark: events per second through sluice's runners, against bytewax, and the time
to checkpoint a million keys of window state.

Run:  .venv/bin/python bench/dataplane.py [--quick] [--json PATH] [--append-results]   (or `make bench`)

The pipeline (the same everywhere):

    generator -> filter (value < 500: keeps about half) -> key_by key -> tumbling_window 1 s (count) -> null

Everything runs on this machine and is owned by this script: a headless `temporal server
start-dev` on free loopback ports with its own temporary state directory, an in-process controller
worker (task queue `sluice`) whose process scheduler starts the runners, and the bytewax child
processes. Measured, in the same run:

  (a) one runner   parallelism 1, every subtask on one runner (slots_per_runner = subtasks), the
                   runner pinned to core 0. Goal >= 3M events/s.
  (b) two runners  parallelism 2 (2 generator splits), slots_per_runner chosen so there are exactly
                   2 runners, runner i pinned to core i; records cross between them over TCP (the
                   key_by's hash edge). Reported per core and as (a) / (b per core). Goal <= 1.6.
  (c) bytewax      the same pipeline for bytewax 0.21 (bench/bytewax_pipeline.py), one worker,
                   pinned to core 0. Reported with sluice's ratio over it (a / c). Goal >= 10.
  (d) checkpoint   keys=1,000,000, a window of 365 days (nothing closes); checkpoints every 2 s
                   while the state fills; reported: each checkpoint's duration as the runner saw it
                   (sluice_checkpoint_duration_seconds of the window's chain: barrier request ->
                   snapshot written) and as the controller saw it (the checkpoint activity's
                   duration), with the number of keys in that epoch's window state (read from the
                   checkpoint). Goal < 1 s with 1M keys.

Throughput is measured in steady state: a fresh job per measurement (no periodic checkpoint during
it: checkpoint_interval_s 3600), wait until Running, pin the runners (every thread of the process,
/proc/<pid>/task), warm up (3 s), then sample sluice_records_out_total of the generator from every
runner's GET /metrics at the start and the end of a fixed window (10 s): events/s = delta / elapsed.
The runners' CPU time over the window (/proc/<pid>/stat) is reported too: a runner below ~100 % of
its core was starved (the machine is shared) or waited on something. bytewax is measured the same
way, by its input's row count over the same windows. Each measurement is repeated (3 times, fresh
job or process each time, configurations interleaved) and the median is reported.

The stage profile (before everything else, in a child process pinned to core 0) times each step
of the one-runner data path directly on 65536-row batches: ns per generated event per stage.

Cleanup (also on error or Ctrl-C): every job still open is force-stopped, every runner of every
job is stopped by pid through ProcessScheduler(state_dir).stop_runners, a bytewax child still
running is killed, the worker shuts down, the server is stopped, and the temporary state directory
is removed (unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so `sluice` imports when run as a script from anywhere
    sys.path.insert(0, str(REPO))

BYTEWAX_SCRIPT = Path(__file__).resolve().parent / "bytewax_pipeline.py"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

# Operator ids of the pipeline.
GEN, FILTER, KEY_BY, WINDOW, SINK = "events", "half", "by_key", "counts", "out"
FILTER_EXPR = "value < 500"
WINDOW_MS = 1000
LONG_WINDOW_MS = 365 * 24 * 3600 * 1000  # (d): nothing closes within the run
THROUGHPUT_CHECKPOINT_S = 3600.0  # no periodic checkpoint during a throughput measurement
STEP_TIMEOUT_S = 120.0

GOAL_ONE_RUNNER = 3_000_000.0
GOAL_TWO_RUNNER_FACTOR = 1.6
GOAL_BYTEWAX_RATIO = 10.0
GOAL_CHECKPOINT_S = 1.0


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the pipeline


def pipeline(
    parallelism: int, keys: int, batch_size: int, window_ms: int = WINDOW_MS, name: str = "bench_dataplane"
) -> Any:
    from sluice.models import PipelineSpec

    return PipelineSpec.model_validate(
        {
            "name": name,
            "parallelism": parallelism,
            "operators": [
                {"id": GEN, "type": "generator", "splits": parallelism, "keys": keys, "batch_size": batch_size},
                {"id": FILTER, "type": "filter", "expr": FILTER_EXPR},
                {"id": KEY_BY, "type": "key_by", "key": ["key"]},
                {"id": WINDOW, "type": "tumbling_window", "size_ms": window_ms},
                {"id": SINK, "type": "null"},
            ],
        }
    )


def layout(parallelism: int, runners: int) -> tuple[int, int, int]:
    """(subtasks, slots_per_runner, window chain index) for `parallelism` spread over `runners`."""
    from sluice.engine.compiler import compile_program, runners_needed
    from sluice.models import JobConfig

    program = compile_program(pipeline(parallelism, 100, 1024), JobConfig())
    subtasks = len(program.subtasks())
    slots = -(-subtasks // runners)
    if runners_needed(program, slots) != runners:
        raise RuntimeError(f"{subtasks} subtasks cannot make exactly {runners} runners")
    return subtasks, slots, program.chain_of(WINDOW)


# ----------------------------------------------------------------------------- processes


def pin_process(pid: int, cores: set[int]) -> int:
    """Set the CPU affinity of every thread of `pid` (threads started later inherit it from the
    thread that starts them). Returns how many threads were pinned."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
            n += 1
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that just ended
    return n


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def core_busy_seconds() -> dict[str, float]:
    """Busy (non-idle, non-iowait) CPU seconds of each core since boot, from /proc/stat."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                out[name] = (sum(v[:8]) - v[3] - v[4]) / _CLK_TCK  # all but idle and iowait (guest is in user)
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def machine_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    import numpy
    import pyarrow
    import temporalio

    model = "?"
    flags: list[str] = []
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("cpu MHz") and mhz is None:
                mhz = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass

    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        from importlib.metadata import version

        bytewax_version = version("bytewax")
    except Exception:  # noqa: BLE001
        bytewax_version = None
    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu_model": model,
        "cpu_mhz": mhz,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "nproc": run(["nproc"]) or str(os.cpu_count()),
        "free": run(["free", "-m"]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        "temporalio": temporalio.__version__,
        "bytewax": bytewax_version,
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "loadavg_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def op_total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, operator: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if labels.get("operator") == operator)


OPS = (GEN, FILTER, KEY_BY, WINDOW, SINK)


@dataclass
class Sample:
    t: float  # perf_counter, middle of the scrapes
    records_out: dict[str, float]  # operator -> sum over subtasks and runners
    records_in: dict[str, float]
    cpu_s: dict[int, float | None]  # runner pid -> CPU seconds
    checkpoints: dict[str, tuple[float, float]]  # chain -> (sum, count) of checkpoint durations
    cores: dict[str, float] = field(default_factory=dict)  # core -> busy seconds (all processes)


async def scrape(session: Any, runners: list[Any]) -> Sample:
    async def one(r: Any) -> str:
        async with session.get(f"{r.control_url}/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()

    t0 = time.perf_counter()
    cpu = {r.pid: cpu_seconds(r.pid) for r in runners}
    cores = core_busy_seconds()
    texts = await asyncio.gather(*(one(r) for r in runners))
    t1 = time.perf_counter()
    out: dict[str, float] = {op: 0.0 for op in OPS}
    inn: dict[str, float] = {op: 0.0 for op in OPS}
    cps: dict[str, list[float]] = {}
    for text in texts:
        s = parse_metrics(text)
        for op in OPS:
            out[op] += op_total(s, "sluice_records_out_total", op)
            inn[op] += op_total(s, "sluice_records_in_total", op)
        for suffix, i in (("_sum", 0), ("_count", 1)):
            for labels, v in s.get("sluice_checkpoint_duration_seconds" + suffix, []):
                cps.setdefault(labels.get("chain", "?"), [0.0, 0.0])[i] += v
    return Sample((t0 + t1) / 2, out, inn, cpu, {k: (v[0], v[1]) for k, v in cps.items()}, cores)


# ----------------------------------------------------------------------------- statistics


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------- key coverage


def rows_until_all_keys(keys: int, split: int = 0, keep_below: int | None = 500, chunk: int = 1 << 22) -> int:
    """How many rows split `split` of a generator with `keys` keys must emit until every key has
    appeared in a row the filter keeps (value < keep_below): from there on the window state holds
    all `keys` keys. Same formula as sluice.connectors.generator."""
    import numpy as np

    from sluice.connectors.generator import MIX1, MIX2, SPLIT_STRIDE, VALUE_MODULUS

    seen = np.zeros(keys, dtype=bool)
    remaining = keys
    start = 0
    while True:
        seq = np.arange(start, start + chunk, dtype=np.uint64)
        z = seq + np.uint64((split * SPLIT_STRIDE) & ((1 << 64) - 1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        h = z ^ (z >> np.uint64(31))
        k = (h % np.uint64(keys)).astype(np.int64)
        pos = np.arange(chunk)
        if keep_below is not None:
            kept = ((h >> np.uint64(32)) % np.uint64(VALUE_MODULUS)) < np.uint64(keep_below)
            k, pos = k[kept], pos[kept]
        uniq, first = np.unique(k, return_index=True)
        new = ~seen[uniq]
        n_new = int(new.sum())
        if n_new == remaining:
            return start + int(pos[first[new]].max()) + 1
        seen[uniq[new]] = True
        remaining -= n_new
        start += chunk
        if start > 1 << 40:
            raise RuntimeError("keys never covered")


# ----------------------------------------------------------------------------- stage profile


def stage_profile(keys: int, batch_size: int, reps: int) -> dict[str, Any]:
    """ns per generated event of each step of the one-runner data path, timed directly (this
    process should be pinned to one core). Steps marked (P>1) only run with parallelism > 1."""
    import numpy as np
    import pyarrow as pa

    from sluice.connectors.generator import GeneratorSource, generator_rows
    from sluice.connectors.null import NullSink
    from sluice.engine.framing import decode_messages, encode_messages
    from sluice.engine.keys import key_hashes, partition
    from sluice.engine.messages import Watermark
    from sluice.engine.operators import OperatorContext
    from sluice.engine.registry import build_operator
    from sluice.engine.transforms import FilterOperator
    from sluice.engine.windows import TumblingWindowOperator

    n = batch_size
    gen_params = {"id": GEN, "type": "generator", "splits": 1, "keys": keys, "batch_size": n}

    def ctx(op: str) -> OperatorContext:
        return OperatorContext(job_id="profile", generation=1, operator_id=op, subtask_index=0, parallelism=1)

    def timed(fn: Any) -> float:
        fn()  # warm
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        # The minimum: the machine is shared, and a batch slowed down by someone else's process
        # says nothing about the stage.
        return min(samples) / n * 1e9  # per generated event

    out: dict[str, Any] = {"keys": keys, "batch_size": n, "reps": reps}
    stages: dict[str, float] = {}
    seq = [1 << 20]

    def next_rows() -> pa.RecordBatch:
        seq[0] += n
        return generator_rows(gen_params, 0, seq[0], seq[0] + n)

    stages["generator_rows (numpy hash, key strings, batch)"] = timed(next_rows)
    src = GeneratorSource(GEN, gen_params)
    src.open(ctx(GEN), [])

    def poll() -> None:
        src.poll(time.monotonic())
        src.watermark()

    stages["  GeneratorSource.poll + watermark (includes generator_rows)"] = timed(poll)
    batch = next_rows()
    filt = FilterOperator(FILTER, {"id": FILTER, "type": "filter", "expr": FILTER_EXPR})
    filt.open(ctx(FILTER), [])
    stages["filter value < 500 (expression, batch.filter)"] = timed(lambda: filt.process(batch))
    kept = filt.process(batch)[0]
    out["kept_fraction"] = kept.num_rows / n
    try:
        kb = build_operator(KEY_BY, {"id": KEY_BY, "type": "key_by", "key": ["key"]})
        kb.open(ctx(KEY_BY), [])
        stages["key_by (column check, pass-through)"] = timed(lambda: kb.process(kept))
    except KeyError:
        stages["key_by (column check, pass-through)"] = float("nan")
    stages["(P>1) key_hashes on kept rows"] = timed(lambda: key_hashes(kept, ["key"]))
    h = key_hashes(kept, ["key"])
    stages["(P>1) partition into 2 (argsort, take, slices)"] = timed(lambda: partition(kept, h, 2))
    half = partition(kept, h, 2)[1]
    assert half is not None
    stages["(P>1) IPC encode + decode of the half sent to the peer"] = timed(
        lambda: decode_messages(encode_messages([half]))
    )

    # The window in steady state: batches in order, a watermark after each (as the source sends).
    win = TumblingWindowOperator(
        WINDOW, {"id": WINDOW, "type": "tumbling_window", "size_ms": WINDOW_MS, "key": ["key"]}
    )
    win.open(ctx(WINDOW), [])
    sink = NullSink(SINK, {"id": SINK, "type": "null"})
    sink.open(ctx(SINK), [])
    from sluice.connectors.generator import TS_BASE_MS

    feed: list[tuple[pa.RecordBatch, int]] = []
    s = 2 << 20
    for _ in range(reps + 1):
        b = filt.process(generator_rows(gen_params, 0, s, s + n))[0]
        feed.append((b, TS_BASE_MS + s + n - 1))
        s += n
    it = iter(feed)
    emitted: list[int] = []

    def window_step(process: bool, watermark: bool) -> None:
        b, wm = next(it)
        if process:
            win.process(b)
        if watermark:
            rows = win.on_watermark(Watermark(wm))
            emitted.append(sum(r.num_rows for r in rows))
            for r in rows:
                sink.process(r)

    # process and on_watermark are timed together (the state depends on both), then the emission
    # alone is estimated by timing process alone on a fresh operator.
    stages["tumbling_window process + on_watermark (emit) + null sink"] = timed(lambda: window_step(True, True))
    out["window_rows_out_per_event"] = (sum(emitted) / len(emitted) / n) if emitted else None
    win2 = TumblingWindowOperator(
        WINDOW, {"id": WINDOW, "type": "tumbling_window", "size_ms": WINDOW_MS, "key": ["key"]}
    )
    win2.open(ctx(WINDOW), [])
    it2 = iter(feed)
    stages["  of which process alone (append partials)"] = timed(lambda: win2.process(next(it2)[0]))
    out["stages_ns_per_event"] = stages
    top = [k for k in stages if not k.startswith("  ") and not k.startswith("(P>1)")]
    out["sum_p1_ns_per_event"] = sum(stages[k] for k in top if not math.isnan(stages[k]))
    out["numpy"] = np.__version__
    return out


def kernel_loop(keys: int, batch_size: int, seconds: float, start_at: float) -> dict[str, Any]:
    """The machine baseline: the one-runner data path's operators called directly in a loop
    (generator_rows -> filter -> window process + watermark -> null), no task, channel or runner.
    Waits until wall-clock `start_at` (so two copies measure the same interval), warms up 0.5 s,
    then counts generated events for `seconds`."""
    from sluice.connectors.generator import TS_BASE_MS, generator_rows
    from sluice.connectors.null import NullSink
    from sluice.engine.messages import Watermark
    from sluice.engine.operators import OperatorContext
    from sluice.engine.transforms import FilterOperator
    from sluice.engine.windows import TumblingWindowOperator

    def ctx(op: str) -> OperatorContext:
        return OperatorContext(job_id="kernel", generation=1, operator_id=op, subtask_index=0, parallelism=1)

    gen = {"id": GEN, "type": "generator", "splits": 1, "keys": keys, "batch_size": batch_size}
    filt = FilterOperator(FILTER, {"id": FILTER, "type": "filter", "expr": FILTER_EXPR})
    win = TumblingWindowOperator(
        WINDOW, {"id": WINDOW, "type": "tumbling_window", "size_ms": WINDOW_MS, "key": ["key"]}
    )
    sink = NullSink(SINK, {"id": SINK, "type": "null"})
    for op, name in ((filt, FILTER), (win, WINDOW), (sink, SINK)):
        op.open(ctx(name), [])
    seq = 0

    def step() -> None:
        nonlocal seq
        batch = generator_rows(gen, 0, seq, seq + batch_size)
        seq += batch_size
        for b in filt.process(batch):
            win.process(b)
        for b in win.on_watermark(Watermark(TS_BASE_MS + seq - 1)):
            sink.process(b)

    while time.time() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.time())))
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:
        step()
    t0, s0, c0 = time.perf_counter(), seq, time.process_time()
    while time.perf_counter() < t0 + seconds:
        step()
    dt = time.perf_counter() - t0
    return {"events_per_s": (seq - s0) / dt, "elapsed_s": dt, "cpu_fraction": (time.process_time() - c0) / dt,
            "affinity": sorted(os.sched_getaffinity(0))}


def kernel_baseline(keys: int, batch_size: int, seconds: float, cores: list[int]) -> list[dict[str, Any]]:
    """kernel_loop in one child process per core in `cores`, all measuring the same interval."""
    start_at = time.time() + 2.5  # after every child has imported pyarrow
    procs = []
    for core in cores:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_kernel", str(keys), "--_batch", str(batch_size),
               "--_seconds", str(seconds), "--_start-at", repr(start_at)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      preexec_fn=lambda c=core: os.sched_setaffinity(0, {c})))
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"kernel baseline failed:\n{stderr[-3000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def stage_profile_child(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the stage profile in a child process pinned to core 0; returns its results."""
    results = []
    for keys in args.keys:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage-profile", str(keys),
               "--_batch", str(args.batch_size), "--_reps", str(args.profile_reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        if proc.returncode != 0:
            raise RuntimeError(f"stage profile failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    state_dir: Path
    args: argparse.Namespace
    jc: Any = None
    session: Any = None
    jobs: list[str] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spec(self, job_id: str, parallelism: int, keys: int, batch_size: int, slots: int,
             window_ms: int = WINDOW_MS, checkpoint_s: float = THROUGHPUT_CHECKPOINT_S) -> Any:
        from sluice.models import JobConfig, JobSpec

        return JobSpec(
            job_id=job_id,
            pipeline=pipeline(parallelism, keys, batch_size, window_ms),
            config=JobConfig(checkpoint_interval_s=checkpoint_s, slots_per_runner=slots, checkpoints_to_keep=1000),
            checkpoint_url=str(self.state_dir / "checkpoints"),
        )

    async def start(self, spec: Any, runners: int, cores: list[int]) -> Any:
        """Start the job, wait for Running, check the runner count and pin runner i to cores[i]."""
        from sluice.schedulers.process import is_runner_process

        self.jobs.append(spec.job_id)
        await self.jc.start(spec)
        st = await self.jc.wait_for_state(spec.job_id, ["Running"], timeout_s=STEP_TIMEOUT_S)
        if len(st.runners) != runners:
            raise RuntimeError(f"job {spec.job_id}: {len(st.runners)} runners, expected {runners}")
        for r, core in zip(sorted(st.runners, key=lambda r: r.runner_id), cores):
            if r.pid is None or not is_runner_process(r.pid, spec.job_id, st.generation):
                raise RuntimeError(f"pid {r.pid} is not a runner of {spec.job_id}; not pinning it")
            pin_process(r.pid, {core})
        return st

    async def stop(self, job_id: str) -> None:
        """Force stop (runners killed: a throughput job has nothing worth keeping), then make
        sure no runner of the job is left."""
        from sluice.client import JobFailedError
        from sluice.schedulers.process import ProcessScheduler

        try:
            await self.jc.stop(job_id, mode="force")
            await self.jc.wait_for_state(job_id, ["Stopped", "Failed"], timeout_s=60)
        except JobFailedError as e:
            log(f"{job_id}: failed while stopping: {e}")
        except Exception as e:  # noqa: BLE001 - the runners are stopped below regardless
            log(f"{job_id}: force stop did not complete: {e}")
        n = await ProcessScheduler(self.state_dir).stop_runners(job_id, grace_s=2.0)
        if n:
            log(f"{job_id}: stopped {n} leftover runner(s)")

    # ------------------------------------------------------------------ (a), (b)

    async def throughput(self, case: str, keys: int, batch_size: int, rep: int,
                         spy_dir: Path | None = None) -> dict[str, Any]:
        parallelism, runners = (1, 1) if case == "one" else (2, 2)
        subtasks, slots, _ = layout(parallelism, runners)
        job_id = f"dp-{case}-k{keys}-b{batch_size}-r{rep}-{uuid.uuid4().hex[:6]}"
        spec = self.spec(job_id, parallelism, keys, batch_size, slots)
        t_start = time.perf_counter()
        st = await self.start(spec, runners, cores=list(range(runners)))
        startup_s = time.perf_counter() - t_start
        try:
            rs = st.runners
            await asyncio.sleep(self.args.warmup_s)
            s0 = await scrape(self.session, rs)
            if spy_dir is None:
                await asyncio.sleep(self.args.measure_s)
            else:
                spied = await self.py_spy(rs, spy_dir, f"{case}-k{keys}-b{batch_size}")
            s1 = await scrape(self.session, rs)
            st2 = await self.jc.status(job_id)
            if st2.state != "Running" or st2.generation != st.generation:
                raise RuntimeError(f"job {job_id} was {st2.state} (generation {st2.generation}) after measuring: "
                                   f"{st2.transitions[-1].reason if st2.transitions else ''}")
        finally:
            await self.stop(job_id)
        dt = s1.t - s0.t
        events = s1.records_out[GEN] - s0.records_out[GEN]
        cpu = {pid: ((s1.cpu_s[pid] or 0) - (s0.cpu_s[pid] or 0)) / dt for pid in s1.cpu_s}
        r = {
            "case": case, "keys": keys, "batch_size": batch_size, "rep": rep, "job_id": job_id,
            "parallelism": parallelism, "runners": runners, "subtasks": subtasks, "slots_per_runner": slots,
            "startup_s": startup_s, "elapsed_s": dt, "events": events, "events_per_s": events / dt,
            "events_per_s_per_core": events / dt / runners,
            "kept_fraction": ((s1.records_out[FILTER] - s0.records_out[FILTER]) / events) if events else None,
            "window_in_per_s": (s1.records_in[WINDOW] - s0.records_in[WINDOW]) / dt,
            "window_out_per_s": (s1.records_out[WINDOW] - s0.records_out[WINDOW]) / dt,
            "runner_cpu": [cpu[p] for p in sorted(cpu)],
            "core_busy": {c: (s1.cores[c] - s0.cores.get(c, 0.0)) / dt for c in sorted(s1.cores)},
            "events_per_cpu_s": events / max(1e-9, sum((s1.cpu_s[p] or 0) - (s0.cpu_s[p] or 0) for p in s1.cpu_s)),
            "loadavg": os.getloadavg(),
        }
        if spy_dir is not None:
            r["py_spy"] = spied
        log(f"{case:>3} runner(s) keys={keys} batch={batch_size}: {r['events_per_s'] / 1e6:.2f} M events/s "
            f"({r['events_per_s_per_core'] / 1e6:.2f} M/core; runner CPU "
            f"{', '.join(f'{c * 100:.0f}%' for c in r['runner_cpu'])}; cores busy "
            f"{', '.join(f'{c * 100:.0f}%' for c in r['core_busy'].values())}; kept {r['kept_fraction'] or 0:.2f})")
        return r

    async def py_spy(self, runners: list[Any], out_dir: Path, name: str) -> list[dict[str, Any]]:
        """Sample every runner with py-spy for the measuring window; the self and inclusive time
        of the busiest functions per runner."""
        out_dir.mkdir(parents=True, exist_ok=True)
        procs = []
        for r in sorted(runners, key=lambda r: r.runner_id):
            path = out_dir / f"{name}-{r.runner_id}.txt"
            proc = await asyncio.create_subprocess_exec(
                self.args.py_spy_bin, "record", "--pid", str(r.pid),
                "--duration", str(max(1, round(self.args.measure_s))),
                "--rate", str(SPY_RATE), "--format", "raw", "--output", str(path), "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            procs.append((r, path, proc))
        out = []
        try:
            for r, path, proc in procs:
                _, err = await asyncio.wait_for(proc.communicate(), timeout=self.args.measure_s + 60)
                if proc.returncode != 0 or not path.exists():
                    log(f"py-spy of {r.runner_id} failed: {err.decode(errors='replace')[-500:]}")
                    continue
                summary = spy_summary(path.read_text(), SPY_RATE * max(1, round(self.args.measure_s)))
                summary.update({"runner_id": r.runner_id, "file": str(path)})
                out.append(summary)
        finally:
            for _, _, proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        return out

    # ------------------------------------------------------------------ (c)

    async def bytewax(self, keys: int, rep: int) -> dict[str, Any]:
        cmd = [sys.executable, str(BYTEWAX_SCRIPT), "--keys", str(keys), "--batch-size", str(self.args.bytewax_batch),
               "--window-ms", str(WINDOW_MS), "--warmup-s", str(self.args.warmup_s),
               "--measure-s", str(self.args.measure_s)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, {0}))
        self.children.append(proc)
        try:
            timeout = self.args.warmup_s + self.args.measure_s + 300
            stdout, stderr = await asyncio.to_thread(proc.communicate, None, timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.children.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"bytewax run failed ({proc.returncode}):\n{stderr.decode(errors='replace')[-3000:]}")
        r = json.loads(stdout.decode().strip().splitlines()[-1])
        r.update({"case": "bytewax", "keys": keys, "rep": rep, "events_per_cpu_s": r["rows"] / max(r["cpu_s"], 1e-9)})
        log(f"bytewax keys={keys}: {r['events_per_s'] / 1e3:.1f} k events/s (run {r['total_s']:.1f} s, "
            f"batch {r['batch_size']})")
        return r

    # ------------------------------------------------------------------ machine baseline

    async def kernel(self, keys: int, rep: int) -> list[dict[str, Any]]:
        seconds = min(self.args.measure_s, 5.0)
        alone = await asyncio.to_thread(kernel_baseline, keys, self.args.batch_size, seconds, [0])
        pair = await asyncio.to_thread(kernel_baseline, keys, self.args.batch_size, seconds, [0, 1])
        a = alone[0]["events_per_s"]
        per_core = sum(r["events_per_s"] for r in pair) / 2
        log(f"baseline keys={keys}: operators in a loop, alone on core 0 {a / 1e6:.2f} M events/s; two copies "
            f"on cores 0, 1 {per_core / 1e6:.2f} M/core (x{per_core / a:.2f})")
        return [
            {"case": "kernel_alone", "keys": keys, "rep": rep, "events_per_s": a,
             "cpu_fraction": alone[0]["cpu_fraction"]},
            {"case": "kernel_pair", "keys": keys, "rep": rep, "events_per_s": per_core * 2,
             "events_per_s_per_core": per_core,
             "per_process": [r["events_per_s"] for r in pair], "scaling": per_core / a},
        ]

    # ------------------------------------------------------------------ (d)

    async def checkpoint(self, keys: int, wanted: int) -> dict[str, Any]:
        """Fill window state with `keys` keys; record every checkpoint until `wanted` of them held
        all keys (or the time runs out)."""
        from sluice.storage import CheckpointStore

        need_rows = rows_until_all_keys(keys)
        subtasks, slots, window_chain = layout(1, 1)
        job_id = f"dp-ckpt-k{keys}-{uuid.uuid4().hex[:6]}"
        spec = self.spec(job_id, 1, keys, self.args.batch_size, slots, window_ms=LONG_WINDOW_MS,
                         checkpoint_s=self.args.checkpoint_interval_s)
        log(f"checkpoint: keys={keys}: the window state holds every key after {need_rows:,} generated rows")
        st = await self.start(spec, 1, cores=[0])
        runners = st.runners
        store = CheckpointStore(spec.checkpoint_url, job_id)
        chain = str(window_chain)
        epochs: list[dict[str, Any]] = []
        full = 0
        deadline = time.monotonic() + self.args.checkpoint_timeout_s
        last = await scrape(self.session, runners)
        t_begin = last.t
        try:
            while full < wanted and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                cur = await scrape(self.session, runners)
                s0, c0 = last.checkpoints.get(chain, (0.0, 0.0))
                s1, c1 = cur.checkpoints.get(chain, (0.0, 0.0))
                if c1 > c0:
                    if c1 - c0 > 1:
                        log(f"checkpoint: {c1 - c0:g} checkpoints between two scrapes; averaging them")
                    # Epochs of a fresh job are 1, 2, ...: the n-th snapshot of the window's chain is epoch n.
                    epoch = int(c1)
                    rec = {"epoch": epoch, "runner_s": (s1 - s0) / (c1 - c0),
                           "generated_rows": cur.records_out[GEN], "window_rows_in": cur.records_in[WINDOW],
                           "seen_at_s": cur.t - t_begin}
                    await self._wait_epoch(job_id, epoch)  # the controller completes it a little later
                    rec.update(await asyncio.to_thread(_state_facts, store, epoch))
                    epochs.append(rec)
                    if rec.get("state_keys") == keys:
                        full += 1
                    log(f"checkpoint epoch {epoch}: {rec.get('state_keys', 0):,} keys "
                        f"({rec.get('state_rows', 0):,} rows), runner {rec['runner_s'] * 1000:.0f} ms "
                        f"({rec['generated_rows'] / 1e6:.1f} M rows generated)")
                last = cur
        finally:
            await self.stop(job_id)
        controller = await self._checkpoint_activities(job_id)
        for rec in epochs:
            c = controller.get(rec["epoch"])
            if c:
                rec.update(c)
        at_full = [e for e in epochs if e.get("state_keys") == keys]
        return {
            "keys": keys, "job_id": job_id, "rows_needed": need_rows, "window_ms": LONG_WINDOW_MS,
            "checkpoint_interval_s": self.args.checkpoint_interval_s, "epochs": epochs,
            "full_runner_s": summarize([e["runner_s"] for e in at_full]),
            "full_controller_s": summarize([e["controller_s"] for e in at_full if "controller_s" in e]),
            "full_state_bytes": median([e["state_bytes"] for e in at_full]),
            "complete": len(at_full) >= wanted,
        }

    async def _wait_epoch(self, job_id: str, epoch: int) -> bool:
        """Wait (up to 10 s) until the controller's last completed checkpoint is >= `epoch`."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (await self.jc.status(job_id)).epoch >= epoch:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _checkpoint_activities(self, job_id: str) -> dict[int, dict[str, float]]:
        """epoch -> the checkpoint activity's own duration and its schedule -> completion time in
        the workflow history (the controller's view)."""
        from temporalio.api.enums.v1 import EventType

        from sluice.models import CheckpointInfo

        client = self.jc.client
        handle = client.get_workflow_handle(job_id)
        scheduled: dict[int, float] = {}
        out: dict[int, dict[str, float]] = {}
        async for ev in handle.fetch_history_events():
            if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                if ev.activity_task_scheduled_event_attributes.activity_type.name == "checkpoint":
                    scheduled[ev.event_id] = ev.event_time.ToDatetime().timestamp()
            elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                attrs = ev.activity_task_completed_event_attributes
                if attrs.scheduled_event_id in scheduled:
                    [info] = await client.data_converter.decode(attrs.result.payloads, [CheckpointInfo])
                    out[info.epoch] = {
                        "controller_s": info.duration_s,
                        "history_s": ev.event_time.ToDatetime().timestamp() - scheduled[attrs.scheduled_event_id],
                    }
        return out

    # ------------------------------------------------------------------ cleanup

    async def cleanup(self) -> None:
        from bench_common import stop_jobs_and_runners

        for proc in list(self.children):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await stop_jobs_and_runners(self.jc, self.state_dir, self.jobs)


def _state_facts(store: Any, epoch: int) -> dict[str, Any]:
    """Distinct keys, rows, windows and bytes of the window's state in checkpoint `epoch` (a
    memory-mapped read). A state may hold several rows of partials per key (not compacted yet)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sluice.engine.keys import KEY_HASH_COLUMN

    manifest = store.read_manifest(epoch)
    if manifest is None or WINDOW not in manifest.operators:
        return {}
    rows = 0
    size = 0
    hashes: list[Any] = []
    panes: set[int] = set()
    for rel in manifest.operators[WINDOW].state_files:
        path = f"{store.job_root}/{rel}"
        size += os.path.getsize(path)
        with pa.memory_map(path) as f:
            table = pa.ipc.open_file(f).read_all()
        rows += table.num_rows
        if table.num_rows:
            hashes.append(pc.unique(table.column(KEY_HASH_COLUMN).combine_chunks()))
            if "window_start" in table.column_names:
                panes.update(pc.unique(table.column("window_start")).to_pylist())
    keys = len(pc.unique(pa.chunked_array(hashes).combine_chunks())) if hashes else 0
    return {"state_keys": keys, "state_rows": rows, "state_bytes": size, "state_windows": len(panes)}


SPY_RATE = 250  # py-spy samples per second


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)' with sluice's and site-packages' paths shortened."""
    func, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where[-1:].isdigit() else where
    for marker in ("site-packages/", "/sluice/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/sluice/":
                path = "sluice/" + path
            break
    return f"{func} ({path})" if func else frame


def spy_summary(raw: str, possible: int, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed stacks) output.
    `possible` = rate x duration: the samples a thread busy all the time would give."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    own_n: dict[str, int] = {}  # innermost sluice frame: where sluice's code spends, callees included
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        ours = [f for f in frames if "(sluice/" in f and "(sluice/runner/" not in f]
        own = ours[-1] if ours else ("(idle: event loop)" if "select (selectors.py)" in frames[-1] else "(other)")
        own_n[own] = own_n.get(own, 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n

    def rows(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []

    return {"samples": total, "busy_fraction": total / possible if possible else None,
            "self": rows(self_n), "inclusive": rows(incl_n), "sluice": rows(own_n)}


# ----------------------------------------------------------------------------- results


def build_results(runs: list[dict[str, Any]], ckpt: dict[str, Any] | None, profile: list[dict[str, Any]],
                  args: argparse.Namespace) -> dict[str, Any]:
    def pick(case: str, keys: int, batch: int | None = None) -> list[dict[str, Any]]:
        return [r for r in runs if r["case"] == case and r["keys"] == keys
                and (batch is None or r.get("batch_size") == batch)]

    summary: dict[str, Any] = {}
    for keys in args.keys:
        one = pick("one", keys, args.batch_size)
        two = pick("two", keys, args.batch_size)
        bw = pick("bytewax", keys)
        a = median([r["events_per_s"] for r in one])
        b = median([r["events_per_s"] for r in two])
        c = median([r["events_per_s"] for r in bw])
        s: dict[str, Any] = {
            "one": summarize([r["events_per_s"] for r in one]),
            "one_cpu": median([r["runner_cpu"][0] for r in one]),
            "one_per_cpu_s": median([r["events_per_cpu_s"] for r in one]),
            "two": summarize([r["events_per_s"] for r in two]),
            "two_per_core": summarize([r["events_per_s_per_core"] for r in two]),
            "two_cpu": median([sum(r["runner_cpu"]) / len(r["runner_cpu"]) for r in two]),
            "two_per_cpu_s": median([r["events_per_cpu_s"] for r in two]),
            "bytewax": summarize([r["events_per_s"] for r in bw]),
            "bytewax_per_cpu_s": median([r["events_per_cpu_s"] for r in bw]),
            "kept_fraction": median([r["kept_fraction"] for r in one if r.get("kept_fraction")]),
            "window_out_per_event": median(
                [r["window_out_per_s"] / r["events_per_s"] for r in one if r["events_per_s"]]
            ),
        }
        alone = pick("kernel_alone", keys)
        pair = pick("kernel_pair", keys)
        k1 = median([r["events_per_s"] for r in alone])
        s["kernel_alone"] = summarize([r["events_per_s"] for r in alone])
        s["kernel_pair_per_core"] = summarize([r["events_per_s_per_core"] for r in pair])
        s["machine_scaling"] = median([r["scaling"] for r in pair])  # per-core speed with both cores busy / alone
        s["two_factor"] = (a / (b / 2)) if a and b else None  # (a) / (b per core)
        s["framework_share"] = (a / k1) if a and k1 else None  # (a) / operators in a loop
        s["two_factor_machine_adjusted"] = (
            (s["two_factor"] * s["machine_scaling"]) if s["two_factor"] and s["machine_scaling"] else None
        )
        s["bytewax_ratio"] = (a / c) if a and c else None
        s["goal_one_met"] = a is not None and a >= GOAL_ONE_RUNNER
        s["goal_two_met"] = s["two_factor"] is not None and s["two_factor"] <= GOAL_TWO_RUNNER_FACTOR
        s["goal_bytewax_met"] = s["bytewax_ratio"] is not None and s["bytewax_ratio"] >= GOAL_BYTEWAX_RATIO
        summary[str(keys)] = s
    sweep: dict[str, Any] = {}
    for batch in sorted({r["batch_size"] for r in runs if r["case"] == "one"}):
        for keys in args.keys:
            rs = pick("one", keys, batch)
            if rs:
                sweep[f"{keys}/{batch}"] = {
                    "keys": keys, "batch_size": batch, **summarize([r["events_per_s"] for r in rs])
                }
    return {
        "benchmark": "dataplane",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "config": {
            "keys": args.keys, "batch_size": args.batch_size, "batch_sweep": args.batch_sweep, "repeats": args.repeats,
            "warmup_s": args.warmup_s, "measure_s": args.measure_s, "bytewax_batch": args.bytewax_batch,
            "checkpoint_keys": args.checkpoint_keys, "checkpoint_interval_s": args.checkpoint_interval_s,
            "filter": FILTER_EXPR, "window_ms": WINDOW_MS,
        },
        "summary": summary,
        "batch_sweep": sweep,
        "checkpoint": ckpt,
        "profile": profile,
        "runs": runs,
    }


def _m(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def _k(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e3:.1f}"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _range(s: dict[str, Any], fmt: Any) -> str:
    return "-" if not s["n"] else f"{fmt(s['min'])}-{fmt(s['max'])}"


def print_table(res: dict[str, Any]) -> None:
    print()
    print(f"{'keys':>7} {'(a) 1 runner':>13} {'(b) 2 runners':>14} {'per core':>9} {'a/(b/core)':>10} "
          f"{'(c) bytewax':>12} {'a/c':>7} {'loop alone':>11} {'pair/alone':>10}")
    print(f"{'':>7} {'M events/s':>13} {'M events/s':>14} {'M/s':>9} {'goal<=1.6':>10} {'k events/s':>12} "
          f"{'goal>=10':>7} {'M events/s':>11} {'(machine)':>10}")
    for keys, s in res["summary"].items():
        print(f"{int(keys):>7} {_m(s['one']['median']):>13} {_m(s['two']['median']):>14} "
              f"{_m(s['two_per_core']['median']):>9} {_x(s['two_factor']):>10} {_k(s['bytewax']['median']):>12} "
              f"{_x(s['bytewax_ratio'], 0):>7} {_m(s['kernel_alone']['median']):>11} {_x(s['machine_scaling']):>10}")
    if res["batch_sweep"]:
        print("\none runner, by generator batch_size (M events/s, median):")
        for row in res["batch_sweep"].values():
            print(f"  keys={row['keys']:>7} batch={row['batch_size']:>7}: {_m(row['median'])} (n={row['n']}, "
                  f"{_range(row, _m)})")
    ck = res.get("checkpoint")
    if ck:
        print(f"\ncheckpoint of {ck['keys']:,} keys of window state: runner {_x(ck['full_runner_s']['median'], 3)} s, "
              f"controller {_x(ck['full_controller_s']['median'], 3)} s (median of {ck['full_runner_s']['n']}); "
              f"state file {(ck['full_state_bytes'] or 0) / 1e6:.1f} MB")
    for r in res.get("py_spy") or []:
        for sp in r.get("py_spy", []):
            print(f"\npy-spy, {r['case']} runner(s) at {_m(r['events_per_s_per_core'])} M events/s per core, "
                  f"{sp['runner_id']}; share of samples by innermost sluice function (callees included) | by function:")
            for (name, share), (name2, share2) in zip(sp["sluice"][:12], sp["self"][:12]):
                print(f"  {share * 100:5.1f}%  {name:<58} | {share2 * 100:5.1f}%  {name2}")
    for p in res["profile"]:
        print(f"\nstage profile, keys={p['keys']}, batch {p['batch_size']} (ns per generated event):")
        for name, v in p["stages_ns_per_event"].items():
            print(f"  {name:<62} {v:8.1f}")
        print(f"  {'sum of the P=1 stages':<62} {p['sum_p1_ns_per_event']:8.1f}")


def markdown(res: dict[str, Any], command: str, m: dict[str, Any], total_s: float) -> str:
    cfg = res["config"]
    date = res["time"][:10]
    L: list[str] = []
    L.append(f"## Data plane ({date})")
    L.append("")
    mem = m["free"].splitlines()[1].split()[1] if m["free"] else "?"
    L.append(f"Machine: {m['cpu_model']} ({'AVX2' if m['avx2'] else 'no AVX2'}{', AVX-512' if m['avx512f'] else ''}), "
             f"`nproc` = {m['nproc']}, {mem} MB memory (`free -m`), {m['platform']}; Python {m['python']}, pyarrow "
             f"{m['pyarrow']}, numpy {m['numpy']}, temporalio {m['temporalio']}, bytewax {m['bytewax']}. Load average "
             f"{', '.join(f'{x:.1f}' for x in m['loadavg_start'])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in m['loadavg_end'])} at the end (other sessions' test suites share "
             f"this machine). Code: commit {m['git_commit']}"
             f"{' plus uncommitted changes in the working tree' if m['git_dirty'] else ''}"
             + ("" if m.get("git_commit_end") in (None, m["git_commit"]) else
                f" at the start, {m['git_commit_end']} at the end (the engine changed during the run; each job "
                f"ran the code of its start)") + ".")
    L.append("")
    L.append("```")
    L.append(command)
    L.append("```")
    L.append("")
    L.append(f"Pipeline: `generator -> filter ({cfg['filter']}) -> key_by key -> tumbling_window {cfg['window_ms']} ms "
             f"(count) -> null`, generator batch_size {cfg['batch_size']}, splits = parallelism. Each number is the "
             f"median of {cfg['repeats']} measurements (a fresh job or process each; configurations interleaved), each "
             f"{cfg['measure_s']:g} s after a {cfg['warmup_s']:g} s warm-up; events = rows the generator emitted "
             f"(`sluice_records_out_total{{operator=\"{GEN}\"}}` summed over runners; bytewax: rows its input "
             f"emitted). Baseline = the same operators called in a loop in one process (no runner, task, channel), "
             f"alone on core 0, and two copies at once on cores 0 and 1 (`pair/alone` = per-core speed when both "
             f"cores are busy, a property of the machine). Total run {total_s / 60:.1f} min.")
    L.append("")
    L.append("| keys | (a) 1 runner, 1 core | (b) 2 runners, TCP | (b) per core | (a) / (b per core) | "
             "(c) bytewax, 1 worker | (a) / (c) | baseline alone | baseline pair/alone |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for keys, s in res["summary"].items():
        L.append(
            f"| {int(keys):,} | **{_m(s['one']['median'])} M/s** ({_range(s['one'], _m)}) | "
            f"{_m(s['two']['median'])} M/s ({_range(s['two'], _m)}) | {_m(s['two_per_core']['median'])} M/s | "
            f"**{_x(s['two_factor'])}** | {_k(s['bytewax']['median'])} k/s ({_range(s['bytewax'], _k)}) | "
            f"**{_x(s['bytewax_ratio'], 0)}x** | {_m(s['kernel_alone']['median'])} M/s | {_x(s['machine_scaling'])} |")
    L.append("")
    L.append("Goals:")
    L.append("")
    for keys, s in res["summary"].items():
        a = s["one"]["median"]
        L.append(f"- keys={int(keys):,}: (a) >= 3M events/s: **{'met' if s['goal_one_met'] else 'NOT met'}** "
                 f"({_m(a)} M/s); (b) per core within 1.6x of (a): **{'met' if s['goal_two_met'] else 'NOT met'}** "
                 f"({_x(s['two_factor'])}x; {_x(s['two_factor_machine_adjusted'])}x "
                 f"after discounting the machine's own "
                 f"pair/alone of {_x(s['machine_scaling'])}); (c) sluice >= 10x bytewax: "
                 f"**{'met' if s['goal_bytewax_met'] else 'NOT met'}** ({_x(s['bytewax_ratio'], 0)}x).")
    ck = res.get("checkpoint")
    if ck:
        ok = ck["full_runner_s"]["median"] is not None and ck["full_runner_s"]["median"] < GOAL_CHECKPOINT_S
        L.append(f"- (d) checkpoint of {ck['keys']:,} keys < 1 s: **{'met' if ok else 'NOT met'}** "
                 f"({_x(ck['full_runner_s']['median'], 3)} s at the runner, "
                 f"{_x(ck['full_controller_s']['median'], 3)} s "
                 f"for the controller; median of {ck['full_runner_s']['n']}).")
    L.append("")
    L.append("Other facts from the same runs (medians): the filter kept "
             + ", ".join(f"{_x(s['kept_fraction'])}" for k, s in res["summary"].items())
             + " of the rows; the window emitted "
             + ", ".join(f"{_x(s['window_out_per_event'], 3)} rows per generated event (keys={int(k):,})"
                         for k, s in res["summary"].items())
             + f". bytewax's input hands out {cfg['bytewax_batch']} rows per `next_batch`.")
    if res["batch_sweep"]:
        L.append("")
        L.append("(a) one runner by generator batch_size (M events/s):")
        L.append("")
        L.append("| keys | batch_size | n | median | range |")
        L.append("|---:|---:|---:|---:|---:|")
        for row in res["batch_sweep"].values():
            L.append(
                f"| {row['keys']:,} | {row['batch_size']:,} | {row['n']} | {_m(row['median'])} | {_range(row, _m)} |"
            )
    if ck:
        L.append("")
        L.append(f"(d) Checkpoints while the window state of a `keys={ck['keys']:,}` job filled (same pipeline, window "
                 f"{ck['window_ms'] // 86_400_000} days: one window, nothing closes; every key is in the state after "
                 f"{ck['rows_needed']:,} generated rows; "
                 f"a checkpoint every {ck['checkpoint_interval_s']:g} s). Runner = "
                 f"`sluice_checkpoint_duration_seconds` of the window's chain for that epoch (POST /checkpoint -> "
                 f"barrier through the chain -> snapshot written); controller = the checkpoint activity's duration "
                 f"(barriers, snapshots collected, manifest, commit):")
        L.append("")
        L.append("| epoch | keys in window state | rows (partials) | state file | runner | controller |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        for e in ck["epochs"]:
            L.append(f"| {e.get('epoch')} | {e.get('state_keys', 0):,} | {e.get('state_rows', 0):,} | "
                     f"{e.get('state_bytes', 0) / 1e6:.1f} MB | "
                     f"{_ms(e.get('runner_s'))} | {_ms(e.get('controller_s'))} |")
    for p in res["profile"]:
        L.append("")
        L.append(f"Stage profile, keys={p['keys']:,}, {p['batch_size']}-row batches, each step timed directly in one "
                 f"process pinned to core 0 (ns per generated event, fastest of {p['reps']} batches; the filter keeps "
                 f"{p['kept_fraction']:.2f}; (P>1) = only with parallelism > 1):")
        L.append("")
        L.append("| stage | ns/event |")
        L.append("|---|---:|")
        for name, v in p["stages_ns_per_event"].items():
            label = ("&nbsp;&nbsp;" + name.strip()) if name.startswith("  ") else name
            L.append(f"| {label} | {v:.1f} |")
        s = res["summary"].get(str(p["keys"]))
        measured = (1e9 / s["one"]["median"]) if s and s["one"]["median"] else None
        L.append(f"| **sum of the P=1 stages** | **{p['sum_p1_ns_per_event']:.1f}** |")
        if measured:
            L.append(f"| measured (a): 1e9 / events per second | {measured:.1f} |")
    for r in res.get("py_spy") or []:
        for sp in r.get("py_spy", []):
            L.append("")
            L.append(f"py-spy of {sp['runner_id']} in an extra ({'a' if r['case'] == 'one' else 'b'}) run, keys="
                     f"{r['keys']:,} ({_m(r['events_per_s_per_core'])} M events/s per core while sampled), share of "
                     f"samples by innermost sluice function (callees included): "
                     + "; ".join(f"`{name}` {share * 100:.0f}%" for name, share in sp["sluice"][:8])
                     + "; by function (self): "
                     + "; ".join(f"`{name}` {share * 100:.0f}%" for name, share in sp["self"][:6]))
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from sluice.client import JobClient, connect
    from sluice.devserver import DevServer, free_port
    from sluice.worker import create_worker

    t_begin = time.perf_counter()
    # The bench force-stops its jobs, also while a checkpoint is in flight: the controller's
    # activities then fail as expected. Their warnings (with tracebacks) would drown the log; a
    # job that fails while being measured is caught by the state check after each measurement.
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    m = machine()
    profile: list[dict[str, Any]] = []
    if not args.no_profile:
        log("stage profile (child process pinned to core 0)")
        profile = await asyncio.to_thread(stage_profile_child, args)
    state_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-dp-"))
    bench = Bench(state_dir=state_dir, args=args)
    server = DevServer(state_dir / "temporal", port=free_port(), ui_port=None, headless=True)
    print(f"state dir {state_dir}; starting dev server on {server.address}", flush=True)
    await server.astart()
    runs: list[dict[str, Any]] = []
    spied: list[dict[str, Any]] = []
    ckpt = None
    try:
        client = await connect(server.address)
        bench.jc = JobClient(client)
        controller = create_worker(client, state_dir)
        async with controller, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            bench.session = session
            try:
                for rep in range(1, 0 if args.no_throughput else args.repeats + 1):
                    log(f"repeat {rep}/{args.repeats}")
                    for keys in args.keys:
                        runs.append(await bench.throughput("one", keys, args.batch_size, rep))
                        runs.append(await bench.throughput("two", keys, args.batch_size, rep))
                        if not args.no_bytewax:
                            runs.append(await bench.bytewax(keys, rep))
                        if not args.no_baseline:
                            runs.extend(await bench.kernel(keys, rep))
                    for batch in args.batch_sweep:
                        if batch != args.batch_size:
                            runs.append(await bench.throughput("one", args.keys[0], batch, rep))
                if args.py_spy is not None:
                    log(f"py-spy runs (not counted in the results above), profiles in {args.py_spy}")
                    for case in ("one", "two"):
                        spied.append(
                            await bench.throughput(case, args.keys[0], args.batch_size, 0, spy_dir=args.py_spy)
                        )
                if not args.no_checkpoint:
                    ckpt = await bench.checkpoint(args.checkpoint_keys, args.checkpoint_count)
            finally:
                await bench.cleanup()
    finally:
        await server.astop()
        if args.keep:
            print(f"kept {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
    res = build_results(runs, ckpt, profile, args)
    res["py_spy"] = spied
    m["loadavg_end"] = os.getloadavg()
    m["git_commit_end"] = machine_commit()
    res["machine"] = m
    res["total_s"] = time.perf_counter() - t_begin
    return res


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short smoke run: 1 repeat, short windows, keys 100000 only, "
                   "checkpoint of 100000 keys, no batch sweep (numbers not for RESULTS.md)")
    p.add_argument("--repeats", type=int, default=None, help="measurements per configuration (default 3; quick 1)")
    p.add_argument("--warmup-s", type=float, default=None, help="seconds after Running before sampling (default 3)")
    p.add_argument("--measure-s", type=float, default=None, help="sampling window in seconds (default 10)")
    p.add_argument("--keys", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated key counts (default 100000,100)")
    p.add_argument("--batch-size", type=int, default=65536, help="generator batch_size (default 65536)")
    p.add_argument("--batch-sweep", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="more batch sizes for (a) with the first --keys (default 16384,262144; quick none)")
    p.add_argument("--bytewax-batch", type=int, default=4096, help="rows per bytewax next_batch (default 4096)")
    p.add_argument("--checkpoint-keys", type=int, default=None, help="keys for (d) (default 1000000; quick 100000)")
    p.add_argument("--checkpoint-count", type=int, default=None,
                   help="checkpoints with every key to record (default 5; quick 1)")
    p.add_argument("--checkpoint-interval-s", type=float, default=2.0,
                   help="checkpoint interval of the (d) job (default 2)")
    p.add_argument("--checkpoint-timeout-s", type=float, default=240.0,
                   help="give up on (d) after this long (default 240)")
    p.add_argument("--profile-reps", type=int, default=None, help="batches per stage in the stage profile (default 30)")
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                   help="after the measurements, one more (a) and (b) run sampled with py-spy (must be installed: "
                   "pip install py-spy); raw profiles to DIR, summaries printed and in the JSON")
    p.add_argument("--no-throughput", action="store_true", help="skip (a), (b), (c) and the baseline")
    p.add_argument("--no-bytewax", action="store_true", help="skip (c)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the machine baseline (operators in a loop, 1 and 2 cores)")
    p.add_argument("--no-checkpoint", action="store_true", help="skip (d)")
    p.add_argument("--no-profile", action="store_true", help="skip the stage profile")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every sample and summary as JSON")
    p.add_argument("--append-results", action="store_true", help=f"append a 'Data plane' section to {RESULTS_MD.name} "
                   "(refused with --quick or a partial run)")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write that section to PATH too")
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory (server log, runner logs)")
    p.add_argument("--_stage-profile", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_batch", type=int, default=65536, help=argparse.SUPPRESS)
    p.add_argument("--_reps", type=int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--_kernel", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    p.add_argument("--_start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._kernel is not None:  # a child of kernel_baseline
        print(json.dumps(kernel_loop(args._kernel, args._batch, args._seconds, args._start_at)))
        return 0
    if args._stage_profile is not None:  # the child of stage_profile_child
        print(json.dumps(stage_profile(args._stage_profile, args._batch, args._reps)))
        return 0
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (1.5 if q else 3.0)
    args.measure_s = args.measure_s if args.measure_s is not None else (3.0 if q else 10.0)
    args.keys = args.keys or ([100_000] if q else [100_000, 100])
    args.batch_sweep = args.batch_sweep if args.batch_sweep is not None else ([] if q else [16384, 262144])
    args.checkpoint_keys = args.checkpoint_keys or (100_000 if q else 1_000_000)
    args.checkpoint_count = args.checkpoint_count or (1 if q else 5)
    args.profile_reps = args.profile_reps or (5 if q else 30)
    if args.py_spy is not None:
        found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(found).exists():
            p.error("--py-spy: no py-spy next to the interpreter or on PATH (pip install py-spy)")
        args.py_spy_bin = found
    if (os.cpu_count() or 1) < 2:
        p.error("needs at least 2 cores (runners are pinned to cores 0 and 1)")
    command = "$ .venv/bin/python bench/dataplane.py " + " ".join(sys.argv[1:])
    res = asyncio.run(main_async(args))
    print_table(res)
    print(f"\ntotal {res['total_s']:.1f} s; load {res['machine']['loadavg_end']}")
    md = markdown(res, command.strip(), res["machine"], res["total_s"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(md + "\n")
        print(f"wrote {args.markdown}")
    if args.append_results:
        complete = (not q and not args.no_throughput and not args.no_bytewax and not args.no_checkpoint
                    and not args.no_profile and not args.no_baseline
                    and res["checkpoint"] is not None and res["checkpoint"]["complete"])
        if not complete:
            print(f"not appending to {RESULTS_MD}: a quick or partial run", file=sys.stderr)
            return 1
        with open(RESULTS_MD, "a") as f:
            f.write("\n" + md + "\n")
        print(f"appended the 'Data plane' section to {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
