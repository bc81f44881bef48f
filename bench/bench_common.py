"""What the benchmarks share: leaving nothing running behind them."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from pathlib import Path

from sluice.client import JobClient
from sluice.schedulers.process import ProcessScheduler


async def stop_jobs_and_runners(jc: JobClient | None, state_dir: Path, jobs: Iterable[str]) -> None:
    """Force-stop every job still open, then kill any runner of theirs that is left (never raises)."""
    jobs = list(jobs)
    for job_id in jobs:
        try:
            if jc is not None and await jc.final_state(job_id) is None:
                await asyncio.wait_for(jc.stop(job_id, mode="force"), timeout=10)
                await jc.wait_for_state(job_id, ["Stopped", "Failed"], timeout_s=20)
        except Exception as e:  # noqa: BLE001 - the runners are killed below regardless
            print(f"cleanup: could not stop job {job_id}: {e}", file=sys.stderr)
    sched = ProcessScheduler(state_dir)
    for job_id in jobs:
        try:
            n = await sched.stop_runners(job_id, grace_s=2.0)
            if n:
                print(f"cleanup: stopped {n} leftover runner(s) of {job_id}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: stop_runners({job_id}) failed: {e}", file=sys.stderr)
