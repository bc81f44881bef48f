"""The job's lifecycle metrics, emitted from workflow code through `workflow.metric_meter()`.

Replay-safe: the SDK emits nothing while a workflow task replays history, and a metric is no
command, so recorded histories replay unchanged. They reach Prometheus on a controller worker
that exports the Temporal SDK's metrics (`sluice worker --metrics-port`, docs/metrics.md); on a
worker without an exporter the meter is a no-op.
"""

from __future__ import annotations

from temporalio import workflow

TRANSITIONS_METRIC = "sluice_job_transitions"
RECOVERIES_METRIC = "sluice_job_recoveries"
RESTARTS_METRIC = "sluice_job_restarts"
RESTART_BUDGET_METRIC = "sluice_job_restart_budget"
UPGRADES_METRIC = "sluice_job_upgrades"


def record_transition(job_id: str, source: str, target: str, restarts: int, allowed_restarts: int) -> None:
    """A transition happened: count it (and a recovery), and the restarts against the budget."""
    meter = workflow.metric_meter().with_additional_attributes({"job": job_id})
    meter.create_counter(TRANSITIONS_METRIC, "Job state transitions").add(1, {"from": source, "to": target})
    if target == "Recovering":
        meter.create_counter(RECOVERIES_METRIC, "Recoveries (entries to Recovering)").add(1)
    meter.create_gauge(RESTARTS_METRIC, "Restarts counted against the restart budget").set(restarts)
    meter.create_gauge(RESTART_BUDGET_METRIC, "Restarts allowed (-1: unlimited)").set(allowed_restarts)


def record_upgrade(job_id: str, outcome: str) -> None:
    """An upgrade ended: completed, refused, rejected, rolled_back or abandoned."""
    meter = workflow.metric_meter().with_additional_attributes({"job": job_id})
    meter.create_counter(UPGRADES_METRIC, "Pipeline upgrades by outcome").add(1, {"outcome": outcome})
