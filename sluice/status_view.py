"""The views of a job's status: the panel `sluice status JOB` shows, and short plain lines.

Besides the state it answers what a user asks when a job misbehaves: since when is it in this
state and why did it change, how old is its last checkpoint, how much of the restart budget is
used, what failed last (domain, operator, message, and the user function's traceback), and which
commands were refused and why; an upgrade in progress; for a Running job, a table of its
operators' rates, watermark lag and backpressure (from the hosts' endpoints). `sluice status -o
json` prints every field of the query instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from sluice.hosts.job_metrics import JobMetrics
from sluice.models import Failure, JobStatus, TransitionRecord, UpgradeStatus

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


def transition_line(t: TransitionRecord) -> str:
    """`2026-01-02 03:04:05 UTC Scheduling -> Running: reason`: one transition on one line."""
    return f"{_when(t.time)} {t.from_state} -> {t.to_state}: {t.reason}"


def _failure_lines(label: str, failure: Failure) -> list[str]:
    where = f", operator {failure.operator!r}" if failure.operator else ""
    lines = [f"{label} ({failure.domain}{where}): {failure.message}"]
    if failure.traceback:
        lines += [TRACEBACK_INDENT + line for line in failure.traceback.rstrip("\n").splitlines()]
    return lines


def _payload(payload: object) -> str:
    """` {payload as JSON}`, cut to MAX_PAYLOAD_CHARS; a string is the payload's JSON already."""
    if payload is None:
        return ""
    text = payload if isinstance(payload, str) else _json_text(payload)
    if len(text) > MAX_PAYLOAD_CHARS:
        text = text[: MAX_PAYLOAD_CHARS - 3] + "..."
    return f" {text}"


def _json_text(payload: object) -> str:
    try:
        return json.dumps(payload, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(payload)


def runners_text(status: JobStatus) -> str:
    """`2 on host-a, 1 on host-b`: how many of the job's runners run where."""
    hosts: dict[str, int] = {}
    for r in status.runners:
        where = r.host_id or r.host
        hosts[where] = hosts.get(where, 0) + 1
    return ", ".join(f"{n} on {h}" for h, n in sorted(hosts.items()))


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
        lines.append("runners: " + runners_text(status))
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


# ------------------------------------------------------------------------------ the status panel

#: rejected commands the panel lists (the newest); `-o json` has every recorded one
REJECTED_SHOWN = 3
#: colour of the state in the panel: green when healthy, yellow while changing, red when failing
STATE_STYLES: dict[str, str] = {
    "Running": "bold green",
    "Finished": "bold green",
    "Stopped": "bold",
    "Failed": "bold red",
    "Failing": "bold red",
    "Recovering": "bold yellow",
}
_DEFAULT_STATE_STYLE = "bold cyan"


def duration(seconds: float) -> str:
    """A short human duration: `45s`, `3m 12s`, `2h 5m`, `4d 3h` (two units at most)."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86_400)
    hours, s = divmod(s, 3_600)
    minutes, s = divmod(s, 60)
    for big, big_unit, small, small_unit in (
        (days, "d", hours, "h"), (hours, "h", minutes, "m"), (minutes, "m", s, "s"),
    ):  # fmt: skip
        if big:
            return f"{big}{big_unit} {small}{small_unit}"
    return f"{s}s"


def state_since(status: JobStatus, now: datetime) -> str:
    """`Running for 3m 12s (since 2026-01-02 03:04:05 UTC)`: the state and its last transition's time."""
    if not status.transitions:
        return status.state
    since = status.transitions[-1].time
    return f"{status.state} for {duration((now - since).total_seconds())} (since {_when(since)})"


def _line(label: str, value: str | Text) -> Text:
    """One `label: value` line of the panel, the label in bold."""
    line = Text.assemble((label, "bold"), ": ")
    line.append_text(value if isinstance(value, Text) else Text(value))
    return line


def checkpoint_text(status: JobStatus, checkpoint_time: datetime | None, now: datetime) -> str:
    """`epoch 12, 8s ago`: the job's restore point and how old it is (age unknown: just the epoch)."""
    if status.epoch == 0:
        return "none yet"
    if checkpoint_time is None:
        return f"epoch {status.epoch}"
    return f"epoch {status.epoch}, {duration((now - checkpoint_time).total_seconds())} ago ({_when(checkpoint_time)})"


def restarts_text(status: JobStatus) -> str:
    """`2 of 20 allowed (the count resets after 120 s healthy)`."""
    allowed = status.config.allowed_restarts
    budget = f"{status.restarts} (unlimited; " if allowed == -1 else f"{status.restarts} of {allowed} allowed ("
    return f"{budget}the count resets after {status.config.healthy_duration_s:g} s healthy)"


def _failure_text(label: str, failure: Failure) -> Text:
    """`failure (domain, operator 'x'): message`, then the user function's traceback, dimmed."""
    first, *rest = _failure_lines(label, failure)
    head, _, message = first.partition(": ")
    text = Text.assemble((head, "bold red"), ": " + message)
    for line in rest:
        text.append("\n" + line, style="dim")
    return text


def status_parts(status: JobStatus, *, now: datetime, checkpoint_time: datetime | None = None) -> list[RenderableType]:
    """The sections of `sluice status JOB`, in order: state and since when, the reason of the last
    transition, generation, last checkpoint and its age, restarts against the budget, parallelism
    per operator, runners, what the job waits for, an upgrade in progress, the failure (with the
    user function's traceback), the error it last recovered from, and the newest rejected commands.

    Callers may append sections of their own before :func:`status_panel` draws them."""
    parts: list[RenderableType] = []
    style = STATE_STYLES.get(status.state, _DEFAULT_STATE_STYLE)
    parts.append(Text.assemble((f"{status.job_id}: ", "bold"), (state_since(status, now), style)))
    if status.transitions:
        t = status.transitions[-1]
        parts.append(_line("last transition", f"{t.from_state} -> {t.to_state} at {_when(t.time)}: {t.reason}"))
    parts.append(_line("generation", str(status.generation)))
    parts.append(_line("last checkpoint", checkpoint_text(status, checkpoint_time, now)))
    parts.append(_line("restarts", restarts_text(status)))
    if status.parallelism:
        parts.append(_line("parallelism", ", ".join(f"{op}={n}" for op, n in status.parallelism.items())))
    if status.runners:
        parts.append(_line("runners", runners_text(status)))
    if status.waiting_for:
        parts.append(_line("waiting for", Text(status.waiting_for, style="yellow")))
    if status.upgrade is not None:
        parts.append(Text(upgrade_line(status.job_id, status.upgrade), style="cyan"))
    if status.failure is not None:
        parts.append(_failure_text("failure", status.failure))
    last_error = status.last_error
    if last_error is not None and (status.failure is None or last_error.signature() != status.failure.signature()):
        parts.append(_failure_text("last error", last_error))
    if status.rejected_commands:
        shown = status.rejected_commands[-REJECTED_SHOWN:]
        total = len(status.rejected_commands)
        count = f" (newest {len(shown)} of {total})" if total > len(shown) else ""
        rejected = Text.assemble(("rejected commands", "bold"), f"{count}:")
        for cmd in reversed(shown):
            rejected.append(f"\n  {_when(cmd.time)} {cmd.command}{_payload(cmd.payload)}: {cmd.reason}")
        parts.append(rejected)
    return parts


def status_panel(status: JobStatus, parts: Sequence[RenderableType], *, boxed: bool = True) -> RenderableType:
    """Draw the sections `parts` (from :func:`status_parts`, plus any a caller appended) as one
    panel titled with the job and its pipeline; `boxed=False` gives the same lines without the box
    (for a pipe or a file, where a box would only cut long lines)."""
    body = Group(*parts)
    if not boxed:
        return body
    title = f"job {status.job_id} · pipeline {status.pipeline_name}"
    return Panel(body, title=title, title_align="left", expand=False)
