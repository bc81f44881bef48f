"""Live per-operator metrics of a job, summed over its runners (interim implementation).

`job_metrics(client, job_id)` is the one entry point: the dashboard and `sluice status` read it.
This version scrapes each runner's unauthenticated `GET /metrics` (Prometheus text, see
sluice/runner/metrics.py) at the address in the job's status, and derives rates from two scrapes
of the same generation. Watermark lag and backpressure are not exposed by runners yet: they stay
None here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from sluice.client import JobClient
from sluice.models import RunnerInfo

# A scrape of one runner: it answers from memory, so a slow one is a stuck one.
SCRAPE_TIMEOUT_S = 3.0
# With no earlier scrape to compare with, the first call scrapes twice this far apart.
RATE_WINDOW_S = 1.0
# An earlier scrape older than this says nothing about the current rate: start over.
RATE_MAX_AGE_S = 30.0
COUNTER_FAMILIES = {"sluice_records_in": "records_in", "sluice_records_out": "records_out"}


class OperatorMetrics(BaseModel):
    """One operator of a job, over all its subtasks on every runner."""

    records_in: float = 0.0
    records_out: float = 0.0
    records_in_per_s: float | None = None
    records_out_per_s: float | None = None
    watermark_lag_s: float | None = Field(default=None, description="max over subtasks; None before a watermark")
    backpressure: float | None = Field(default=None, description="max over subtasks, 0..1; None when unknown")
    subtasks: int = 0


class JobMetrics(BaseModel):
    """Every operator of a job that some runner reported, by operator id."""

    job_id: str
    operators: dict[str, OperatorMetrics] = Field(default_factory=dict)


@dataclass
class _Sample:
    """Totals of one scrape of all runners of a job."""

    at: float  # time.monotonic()
    generation: int
    totals: dict[str, dict[str, float]]  # operator -> counter name -> value
    subtasks: dict[str, set[str]]  # operator -> "runner/subtask" labels seen


_last: dict[str, _Sample] = {}


async def _scrape(session: aiohttp.ClientSession, runner: RunnerInfo) -> str:
    url = f"http://{runner.host}:{runner.control_port}/metrics"
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.text()


async def _sample(runners: list[RunnerInfo], generation: int) -> _Sample:
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        texts = await asyncio.gather(*(_scrape(session, r) for r in runners), return_exceptions=True)
    totals: dict[str, dict[str, float]] = {}
    subtasks: dict[str, set[str]] = {}
    for runner, text in zip(runners, texts):
        if isinstance(text, BaseException):
            continue  # a runner that does not answer contributes nothing to this sample
        for family in text_string_to_metric_families(text):
            name = COUNTER_FAMILIES.get(family.name)
            if name is None:
                continue
            for s in family.samples:
                if not s.name.endswith("_total"):
                    continue
                op = s.labels.get("operator", "?")
                counters = totals.setdefault(op, {})
                counters[name] = counters.get(name, 0.0) + float(s.value)
                subtasks.setdefault(op, set()).add(f"{runner.runner_id}/{s.labels.get('subtask', '?')}")
    return _Sample(at=time.monotonic(), generation=generation, totals=totals, subtasks=subtasks)


async def job_metrics(client: JobClient, job_id: str) -> JobMetrics:
    """The job's per-operator record counts and rates now (empty when it has no runners)."""
    status = await client.status(job_id)
    if not status.runners:
        _last.pop(job_id, None)
        return JobMetrics(job_id=job_id)
    before = _last.get(job_id)
    if before is None or before.generation != status.generation or time.monotonic() - before.at > RATE_MAX_AGE_S:
        before = await _sample(status.runners, status.generation)
        await asyncio.sleep(RATE_WINDOW_S)
    now = await _sample(status.runners, status.generation)
    _last[job_id] = now
    elapsed = now.at - before.at
    operators: dict[str, OperatorMetrics] = {}
    for op, counters in now.totals.items():
        earlier = before.totals.get(op, {})

        def rate(name: str, counters: dict[str, float] = counters, earlier: dict[str, float] = earlier) -> float | None:
            if elapsed <= 0 or name not in earlier:
                return None
            return max(0.0, counters.get(name, 0.0) - earlier[name]) / elapsed

        operators[op] = OperatorMetrics(
            records_in=counters.get("records_in", 0.0),
            records_out=counters.get("records_out", 0.0),
            records_in_per_s=rate("records_in"),
            records_out_per_s=rate("records_out"),
            subtasks=len(now.subtasks.get(op, ())),
        )
    return JobMetrics(job_id=job_id, operators=operators)
