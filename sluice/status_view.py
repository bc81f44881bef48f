"""The plain-text view of a job's status that `sluice status JOB` prints.

Besides the state line it answers what a user asks when a job misbehaves: why did it last change
state, what failed last (domain, operator, message, and the user function's traceback), and which
command was last refused and why; for a Running job, a table of its operators' rates, watermark
lag and backpressure (from the hosts' endpoints). `sluice status --json` prints every field instead.
"""

from __future__ import annotations

import json
from datetime import datetime

from sluice.hosts.job_metrics import JobMetrics
from sluice.models import Failure, JobStatus, UpgradeStatus

#: longest payload of a rejected command shown on its line (the JSON view has all of it)
MAX_PAYLOAD_CHARS = 200
TRACEBACK_INDENT = "    "


def state_line(status: JobStatus) -> str:
    """`job: State (generation G, epoch E, restarts R)`."""
    return (
        f"{status.job_id}: {status.state} (generation {status.generation}, epoch {status.epoch}, "
        f"restarts {status.restarts})"
    )


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _failure_lines(label: str, failure: Failure) -> list[str]:
    where = f", operator {failure.operator!r}" if failure.operator else ""
    lines = [f"{label} ({failure.domain}{where}): {failure.message}"]
    if failure.traceback:
        lines += [TRACEBACK_INDENT + line for line in failure.traceback.rstrip("\n").splitlines()]
    return lines


def _payload(payload: object) -> str:
    if payload is None:
        return ""
    try:
        text = json.dumps(payload, sort_keys=True, default=str)
    except (TypeError, ValueError):
        text = repr(payload)
    if len(text) > MAX_PAYLOAD_CHARS:
        text = text[: MAX_PAYLOAD_CHARS - 3] + "..."
    return f" {text}"


def status_lines(status: JobStatus) -> list[str]:
    """Every line of the plain view, in order: state, last transition, what it waits for, where
    its runners run, parallelism, restarts and budget, failure (and the error the job last
    recovered from, when it differs), last rejected command."""
    lines = [state_line(status)]
    if status.transitions:
        t = status.transitions[-1]
        lines.append(f"last transition: {t.from_state} -> {t.to_state} at {_when(t.time)}: {t.reason}")
    if status.waiting_for:
        lines.append(f"waiting: {status.waiting_for}")
    if status.runners:
        hosts: dict[str, int] = {}
        for r in status.runners:
            where = r.host_id or r.host
            hosts[where] = hosts.get(where, 0) + 1
        lines.append("runners: " + ", ".join(f"{n} on {h}" for h, n in sorted(hosts.items())))
    if status.parallelism:
        lines.append("parallelism: " + ", ".join(f"{op}={n}" for op, n in status.parallelism.items()))
    allowed = status.config.allowed_restarts
    budget = "unlimited" if allowed == -1 else f"{allowed} allowed"
    lines.append(f"restarts: {status.restarts} ({budget}; the count resets after "
                 f"{status.config.healthy_duration_s:g} s healthy)")  # fmt: skip
    if status.upgrade is not None:
        lines.append(upgrade_line(status.job_id, status.upgrade))
    if status.failure is not None:
        lines += _failure_lines("failure", status.failure)
    last_error = status.last_error
    if last_error is not None and (status.failure is None or last_error.signature() != status.failure.signature()):
        lines += _failure_lines("last error", last_error)
    if status.rejected_commands:
        rejected = status.rejected_commands[-1]
        lines.append(
            f"last rejected command: {rejected.command}{_payload(rejected.payload)} at {_when(rejected.time)}: "
            f"{rejected.reason}"
        )
    return lines


def _lag(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def operator_table_lines(metrics: JobMetrics) -> list[str]:
    """The per-operator table of a Running job: subtasks, records in and out per second, watermark
    lag, backpressure; then which hosts could not be asked (their runners are not counted)."""
    if not metrics.operators:
        return ["operators: no metrics yet (the runners heartbeat every second)"]
    width = max(len("operator"), *(len(op) for op in metrics.operators))
    header = f"{'subtasks':>8}  {'in/s':>10}  {'out/s':>10}  {'wm lag':>9}  {'backpressure':>12}"
    lines = [f"{'operator':<{width}}  {header}"]
    for op, m in metrics.operators.items():
        lines.append(
            f"{op:<{width}}  {m.subtasks:>8}  {m.records_in_per_s:>10.1f}  {m.records_out_per_s:>10.1f}  "
            f"{_lag(m.watermark_lag_s):>9}  {m.backpressure:>11.0%} "
        )
    if metrics.unreachable:
        lines.append(f"not counted (no metrics endpoint answered): hosts {', '.join(metrics.unreachable)}")
    return lines


def upgrade_line(job_id: str, up: UpgradeStatus) -> str:
    """`upgrade N (mode, version A -> B): phase[: reason]`, what to do next when it waits."""
    line = f"upgrade {up.number} of {job_id} ({up.mode}, pipeline version {up.from_version} -> {up.to_version}): "
    line += up.phase.replace("_", " ")
    if up.phase == "health_window":
        line += f" ({up.health_window_s:g} s; output held back until it ends)"
    if up.dropped_state:
        line += f"; empty state for {', '.join(up.dropped_state)}"
    if up.reason:
        line += f": {up.reason}"
    if up.phase == "awaiting_approval":
        line += f": sluice approve {job_id} / sluice reject {job_id}"
    return line
