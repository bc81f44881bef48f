#!/usr/bin/env python
"""Runner start latency, cold vs warm: how long until a newly started runner serves.

Run:  .venv/bin/python bench/warm_start.py [--runs N]

A sample is one `ProcessScheduler.start_runners(job, generation, 1, 1, ...)` call, timed from the
call to its return, i.e. until the runner has bound its ports and written its info file (the
moment the controller may talk to it). Cold: the scheduler spawns `python -m sluice.runner ...`.
Warm: the scheduler hands the runner to a ready process of a `WarmPool` (size 1), which is
refilled and waited for between samples (not timed). Cold and warm samples alternate, so load
from other processes on a shared machine hits both alike. Each runner is stopped after its
sample. Prints the median of each and their ratio; nothing is asserted.

Cleanup (also on error or Ctrl-C): every runner is stopped through the scheduler (by PID, after
its checks), the pool is closed, and the temporary state directory is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sluice

from sluice.hosts.pool import WarmPool  # noqa: E402
from sluice.schedulers.process import ProcessScheduler  # noqa: E402

SECRET = b"bench-warm-start"
JOB = "bench-warm-start"
DEFAULT_RUNS = 5
START_TIMEOUT_S = 60.0
POOL_READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0


async def one_start(sched: ProcessScheduler, generation: int) -> float:
    """Seconds from start_runners to its return (the runner serves); the runner is stopped after."""
    t0 = time.perf_counter()
    await sched.start_runners(JOB, generation, 1, 1, START_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    await sched.stop_runners(JOB, generation=generation, grace_s=STOP_GRACE_S)
    return elapsed


async def measure(state_dir: Path, runs: int) -> tuple[list[float], list[float]]:
    pool = WarmPool(state_dir / "warm-pool.log", size=1)
    cold_sched = ProcessScheduler(state_dir, SECRET)
    warm_sched = ProcessScheduler(state_dir, SECRET, pool=pool)
    cold: list[float] = []
    warm: list[float] = []
    generation = 0
    try:
        for _ in range(runs):
            generation += 1
            cold.append(await one_start(cold_sched, generation))
            if not pool.wait_ready(POOL_READY_TIMEOUT_S):
                raise RuntimeError(f"no warm process ready after {POOL_READY_TIMEOUT_S:g} s (see {pool.log_path})")
            generation += 1
            warm_pid = pool.pids()[0]
            warm.append(await one_start(warm_sched, generation))
            if warm_pid in pool.pids():
                raise RuntimeError("the warm sample did not use the warm process")
    finally:
        await cold_sched.stop_runners(JOB, grace_s=STOP_GRACE_S)
        pool.close()
    return cold, warm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="samples of each kind (default 5)")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be >= 1")
    state_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-warm-"))
    try:
        cold, warm = asyncio.run(measure(state_dir, args.runs))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    cold_ms = statistics.median(cold) * 1000
    warm_ms = statistics.median(warm) * 1000
    print(f"runner start until it serves, median of {args.runs} (cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}):")
    print(f"  cold  {cold_ms:8.1f} ms   samples: {' '.join(f'{s * 1000:.0f}' for s in cold)}")
    print(f"  warm  {warm_ms:8.1f} ms   samples: {' '.join(f'{s * 1000:.0f}' for s in warm)}")
    print(f"  cold / warm = {cold_ms / warm_ms:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
