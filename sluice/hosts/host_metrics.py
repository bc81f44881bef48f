"""What a runner host reports about itself and its runners on its endpoint (sluice/hosts/endpoint.py).

- Prometheus text: every live runner's own `/metrics` (scraped concurrently, each bounded by
  RUNNER_SCRAPE_TIMEOUT_S: a runner that does not answer is left out of that scrape, never holds it
  up) and the host's gauges (slots, runners, warm runners).
- A job's per-operator metrics: from the heartbeats of the job's runners here, newest generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from sluice.hosts.job_metrics import JobMetrics, combine

if TYPE_CHECKING:
    from sluice.hosts.host import RunnerHost, RunnerWatch

log = logging.getLogger("sluice.hosts.host_metrics")

RUNNER_SCRAPE_TIMEOUT_S = 2.0
"""Longest wait for one runner's /metrics during a host scrape."""


class _HostGauges:
    """The host's own gauges, read at scrape time."""

    def __init__(self, host: RunnerHost) -> None:
        self._host = host

    def collect(self) -> Iterator[Metric]:
        host = self._host
        labels = [host.config.host_id]
        gauges = [
            ("sluice_host_slots", "Runner slots this host offers", host.config.slots),
            ("sluice_host_slots_used", "Runner slots in use (runners running, not stopping)", host.runners_in_use()),
            ("sluice_host_runners", "Runner processes the host follows (also stopping ones)", len(host.watches())),
            ("sluice_host_warm_runners", "Warm runner processes ready to take an assignment",
             host.pool.ready_count() if host.pool is not None else 0),
        ]  # fmt: skip
        for name, text, value in gauges:
            family = GaugeMetricFamily(name, text, labels=["host"])
            family.add_metric(labels, float(value))
            yield family


class HostObserver:
    """The endpoint's view of one RunnerHost."""

    def __init__(self, host: RunnerHost) -> None:
        self.host = host
        self.state_dir: Path = host.state_dir
        self._gauges = CollectorRegistry(auto_describe=False)
        self._gauges.register(_HostGauges(host))

    async def prometheus_text(self) -> str:
        """The host's gauges and every live runner's metrics, as Prometheus texts joined (the
        endpoint merges the families)."""
        live = [w for w in self.host.watches() if not w.ended and not w.stopping]
        timeout = aiohttp.ClientTimeout(total=RUNNER_SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            texts = await asyncio.gather(*(self._scrape(session, w) for w in live))
        return "".join([generate_latest(self._gauges).decode(), *texts])

    async def _scrape(self, session: aiohttp.ClientSession, w: RunnerWatch) -> str:
        try:
            async with session.get(f"{w.info.control_url}/metrics") as resp:
                if resp.status == 200:
                    return await resp.text()
                log.debug("runner %s answered /metrics with %d", w.info.runner_id, resp.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.debug("runner %s did not answer /metrics: %s", w.info.runner_id, e)
        return ""

    def job_metrics(self, job_id: str) -> JobMetrics:
        """The job's per-operator metrics from its runners here (the newest generation only: an
        older one is being stopped)."""
        mine = [w for w in self.host.watches() if w.job_id == job_id and not w.ended and not w.stopping]
        if not mine:
            return JobMetrics(job_id=job_id)
        generation = max(w.generation for w in mine)
        operators = combine(w.heartbeats.operators() for w in mine if w.generation == generation)
        return JobMetrics(job_id=job_id, generation=generation, hosts=[self.host.config.host_id], operators=operators)
