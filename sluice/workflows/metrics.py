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
    """A transition happened: count it (and a recovery), and the restarts against the budget
    (the budget gauge is left out for an unlimited budget: gauges cannot be negative)."""
    try:
        meter = workflow.metric_meter().with_additional_attributes({"job": job_id})
        meter.create_counter(TRANSITIONS_METRIC, "Job state transitions").add(1, {"from": source, "to": target})
        if target == "Recovering":
            meter.create_counter(RECOVERIES_METRIC, "Recoveries (entries to Recovering)").add(1)
        meter.create_gauge(RESTARTS_METRIC, "Restarts counted against the restart budget").set(restarts)
        if allowed_restarts >= 0:
            meter.create_gauge(RESTART_BUDGET_METRIC, "Restarts allowed").set(allowed_restarts)
    except Exception as e:  # noqa: BLE001 - a metric must never fail a workflow task
        workflow.logger.warning("job %s: transition metrics not recorded: %s", job_id, e)


def record_upgrade(job_id: str, outcome: str) -> None:
    """An upgrade ended: completed, refused, rejected, rolled_back or abandoned."""
    try:
        meter = workflow.metric_meter().with_additional_attributes({"job": job_id})
        meter.create_counter(UPGRADES_METRIC, "Pipeline upgrades by outcome").add(1, {"outcome": outcome})
    except Exception as e:  # noqa: BLE001 - a metric must never fail a workflow task
        workflow.logger.warning("job %s: upgrade metric not recorded: %s", job_id, e)
