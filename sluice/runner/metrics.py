"""Prometheus metrics of one runner process, in a registry of its own.

Record counts are owned by the engine's subtasks; this module reads them at scrape time (a custom
collector) instead of asking the engine to call into Prometheus on its hot path. A subtask exposes
them as `SubtaskRunner.metrics`: `{"records_in.<operator>": n, "records_out.<operator>": n, ...}`; a
subtask without that attribute simply contributes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.models import SubtaskRef

# Buckets for checkpoint durations: from a quick local barrier to a slow remote store.
CHECKPOINT_BUCKETS_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: per-operator counters a subtask may expose, with their help text
COUNTER_HELP: dict[str, str] = {
    "records_in": "Records received per operator subtask",
    "records_out": "Records emitted per operator subtask",
    "late_records": "Records dropped by an event-time operator because their window had already been emitted",
}
RECORD_COUNTERS: tuple[str, ...] = tuple(COUNTER_HELP)
#: per-operator gauges a subtask may expose: {name in the subtask's mapping: (metric, help text)}
GAUGE_HELP: dict[str, tuple[str, str]] = {
    "watermark_lag_s": (
        "sluice_watermark_lag_seconds",
        "Wall clock minus the operator subtask's current event-time watermark (absent before the first)",
    ),
    "backpressure": (
        "sluice_backpressure_ratio",
        "Fraction of the last interval the operator's subtask spent blocked sending downstream (0..1)",
    ),
}
OPERATOR_GAUGES: tuple[str, ...] = tuple(GAUGE_HELP)
#: heartbeat key of the number of this runner's subtasks running an operator
SUBTASKS_KEY = "subtasks"


def subtask_counters(task: Any) -> dict[str, dict[str, float]]:
    """The per-operator counters a subtask exposes, as {operator: {counter: value}}.

    Accepts the engine's flat form (`{"records_in.<op>": n, "records_out.<op>": n}`) and a nested
    one (`{op: {"records_in": n}}`); a subtask exposing nothing (or garbage) contributes {}.
    """
    raw = getattr(task, "metrics", None)
    if callable(raw):
        raw = raw()
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, dict[str, float]] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            for name, v in value.items():
                if isinstance(v, (int, float)):
                    out.setdefault(str(key), {})[str(name)] = float(v)
        elif isinstance(value, (int, float)) and isinstance(key, str) and "." in key:
            name, op = key.split(".", 1)
            out.setdefault(op, {})[name] = float(value)
    return out


class _TaskCollector(Collector):
    """Reads record counters and task states from the live subtasks at every scrape."""

    def __init__(
        self, labels: dict[str, str], tasks: Callable[[], Iterable[tuple[SubtaskRef, Any, str]]]
    ) -> None:
        self._labels = labels
        self._tasks = tasks

    def collect(self) -> Iterator[Metric]:
        base = list(self._labels)
        families = {
            name: CounterMetricFamily(f"sluice_{name}", COUNTER_HELP[name], labels=[*base, "operator", "subtask"])
            for name in RECORD_COUNTERS
        }
        gauges = {
            name: GaugeMetricFamily(metric, text, labels=[*base, "operator", "subtask"])
            for name, (metric, text) in GAUGE_HELP.items()
        }
        states = GaugeMetricFamily(
            "sluice_tasks", "Subtasks of this runner by state", labels=[*base, "state"]
        )
        by_state: dict[str, int] = {}
        for ref, task, state in self._tasks():
            by_state[state] = by_state.get(state, 0) + 1
            for op, counters in subtask_counters(task).items():
                labels = [*self._labels.values(), op, str(ref.index)]
                for name in RECORD_COUNTERS:
                    value = counters.get(name)
                    if value is not None:
                        families[name].add_metric(labels, value)
                for name in OPERATOR_GAUGES:
                    value = counters.get(name)
                    if value is not None:
                        gauges[name].add_metric(labels, value)
        for state, n in sorted(by_state.items()):
            states.add_metric([*self._labels.values(), state], n)
        yield from families.values()
        yield from gauges.values()
        yield states


class RunnerMetrics:
    """All metrics of one runner: a private registry, so tests can run many runners in a process."""

    def __init__(
        self,
        *,
        job_id: str,
        generation: int,
        runner_id: str,
        tasks: Callable[[], Iterable[tuple[SubtaskRef, Any, str]]],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"job": job_id, "generation": str(generation), "runner": runner_id}
        self._labels = labels
        self.registry.register(_TaskCollector(labels, tasks))
        self.checkpoint_duration = Histogram(
            "sluice_checkpoint_duration_seconds",
            "Time from a checkpoint request to a subtask's snapshot of that epoch",
            labelnames=[*labels, "chain"],
            buckets=CHECKPOINT_BUCKETS_S,
            registry=self.registry,
        )

    def observe_checkpoint(self, ref: SubtaskRef, seconds: float) -> None:
        self.checkpoint_duration.labels(*self._labels.values(), str(ref.chain)).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in this runner's registry."""
        return generate_latest(self.registry)


def heartbeat_metrics(tasks: Iterable[Any]) -> dict[str, float]:
    """Totals for the event stream's heartbeat: `records_in`, `records_out`, and per operator
    `records_out.<operator>` / `records_in.<operator>` summed over this runner's subtasks;
    `watermark_lag_s.<operator>` / `backpressure.<operator>` as the highest over them (a lag only
    once one has a watermark); `subtasks.<operator>`, how many of them run the operator."""
    out: dict[str, float] = {name: 0.0 for name in RECORD_COUNTERS}
    for task in tasks:
        for op, counters in subtask_counters(task).items():
            key = f"{SUBTASKS_KEY}.{op}"
            out[key] = out.get(key, 0.0) + 1
            for name in RECORD_COUNTERS:
                value = counters.get(name)
                if value is not None:
                    out[name] += value
                    key = f"{name}.{op}"
                    out[key] = out.get(key, 0.0) + value
            for name in OPERATOR_GAUGES:
                value = counters.get(name)
                if value is not None:
                    key = f"{name}.{op}"
                    out[key] = max(out.get(key, value), value)
    return out
