"""A controller worker's metrics: the Temporal SDK's own, and sluice's jobs by state.

- The Temporal SDK's metrics (workflow and activity task latencies, polls, slots, requests...: the
  `temporal_*` families) come from a Temporal Runtime with a Prometheus exporter, bound to a
  private loopback port: the worker's client must be connected on that runtime
  (:func:`client_on_runtime`), and the worker's endpoint serves the exporter's text as part of
  its own `GET /metrics`, so there is one port to scrape per process.
- `sluice_jobs{state}`: open jobs by their `JobState` search attribute, counted through visibility
  every JOB_STATES_REFRESH_S (a count per state: no workflow is queried, nothing is added to any
  history). Closed jobs are not counted.

- From the checkpoint activity (:func:`record_checkpoint`, through `activity.metric_meter()`, so
  they go out with the SDK's metrics): each checkpoint's duration and state size, and the files
  its sinks committed, labelled with the job.

Job transitions and recoveries are not counted here: they happen in workflow code, whose
histories must not change for a metric (docs/metrics.md lists this gap).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Iterator
from typing import get_args

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from temporalio import activity
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import ServiceClient

from sluice.models import SEARCH_ATTRIBUTE_STATE, CheckpointManifest, JobStateName

log = logging.getLogger("sluice.controller_metrics")

JOB_STATES_REFRESH_S = 5.0
"""How often the jobs-by-state gauge is counted again."""
EXPORTER_SCRAPE_TIMEOUT_S = 2.0
"""Longest wait for the Temporal runtime's exporter during a scrape."""
LOOPBACK = "127.0.0.1"
JOB_STATES: tuple[str, ...] = get_args(JobStateName)
CHECKPOINT_DURATION_METRIC = "sluice_checkpoint_activity_duration_seconds"
CHECKPOINT_SIZE_METRIC = "sluice_checkpoint_size_bytes"
COMMITTED_FILES_METRIC = "sluice_checkpoint_committed_files"
#: from a quick local checkpoint to a slow one on a remote store
CHECKPOINT_DURATION_BUCKETS_S: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: from a stateless job's few bytes to gigabytes of keyed state
CHECKPOINT_SIZE_BUCKETS_BYTES: tuple[float, ...] = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10)


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def prometheus_runtime() -> tuple[Runtime, str]:
    """A Temporal Runtime exporting the SDK's metrics in Prometheus text on a free loopback port,
    and the exporter's URL."""
    address = f"{LOOPBACK}:{_free_port(LOOPBACK)}"
    exporter = PrometheusConfig(
        bind_address=address,
        histogram_bucket_overrides={
            CHECKPOINT_DURATION_METRIC: list(CHECKPOINT_DURATION_BUCKETS_S),
            CHECKPOINT_SIZE_METRIC: list(CHECKPOINT_SIZE_BUCKETS_BYTES),
        },
    )
    runtime = Runtime(telemetry=TelemetryConfig(metrics=exporter))
    return runtime, f"http://{address}/metrics"


async def client_on_runtime(client: Client, runtime: Runtime) -> Client:
    """A new connection with `client`'s settings (namespace, converter, TLS...) on `runtime`."""
    config = client.config()
    service_config = dataclasses.replace(client.service_client.config, runtime=runtime)
    config["service_client"] = await ServiceClient.connect(service_config)
    return Client(**config)


def record_checkpoint(job_id: str, manifest: CheckpointManifest, duration_s: float, committed_files: int) -> None:
    """Called by the checkpoint activity once a checkpoint is complete. A worker without a metrics
    exporter has a no-op meter; a metric that cannot be recorded is logged, never raised (a
    checkpoint must not fail for a metric)."""
    try:
        meter = activity.metric_meter().with_additional_attributes({"job": job_id})
        size = sum(d.size for op in manifest.operators.values() for d in op.state_digests.values())
        meter.create_histogram_float(
            CHECKPOINT_DURATION_METRIC, "Duration of a checkpoint: barriers to committed sinks", "s"
        ).record(duration_s)
        meter.create_histogram(CHECKPOINT_SIZE_METRIC, "State files of a checkpoint", "By").record(size)
        meter.create_counter(
            COMMITTED_FILES_METRIC, "Files the sinks published at checkpoints (exactly once)"
        ).add(committed_files)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("recording the metrics of checkpoint %d of job %s failed", manifest.epoch, job_id)


class _JobGauges:
    """`sluice_jobs{state}` from the last count."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("sluice_jobs", "Open jobs by state (JobState search attribute)", labels=["state"])
        for state, n in self.counts.items():
            family.add_metric([state], float(n))
        yield family


class ControllerMetrics:
    """The controller's metrics source for an ObservabilityEndpoint (see the module docstring)."""

    def __init__(self, client: Client, exporter_url: str) -> None:
        self.client = client
        self.exporter_url = exporter_url
        self._gauges = _JobGauges()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._gauges)

    async def count_jobs(self) -> dict[str, int]:
        """Count open jobs per state now (and keep it for the gauge)."""
        counts: dict[str, int] = {}
        for state in JOB_STATES:
            query = f'{SEARCH_ATTRIBUTE_STATE}="{state}" AND ExecutionStatus="Running"'
            counts[state] = (await self.client.count_workflows(query)).count
        self._gauges.counts = counts
        return counts

    async def refresh_forever(self) -> None:
        """Count every JOB_STATES_REFRESH_S until cancelled; a failed count keeps the last one."""
        while True:
            try:
                await self.count_jobs()
            except Exception as e:  # noqa: BLE001 - Temporal unreachable: retried next round
                log.warning("counting jobs by state failed (retried): %s", e)
            await asyncio.sleep(JOB_STATES_REFRESH_S)

    async def prometheus_text(self) -> str:
        """The SDK exporter's text followed by sluice's controller gauges."""
        sdk = ""
        try:
            timeout = aiohttp.ClientTimeout(total=EXPORTER_SCRAPE_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.exporter_url) as resp:
                sdk = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("the Temporal runtime's metrics exporter did not answer: %s", e)
        if sdk and not sdk.endswith("\n"):
            sdk += "\n"
        return sdk + generate_latest(self._registry).decode()
