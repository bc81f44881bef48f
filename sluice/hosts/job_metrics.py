"""A job's per-operator metrics as its runners' heartbeats describe them, and their JSON shape.

Each runner heartbeats every second with its totals per operator (`records_in.<op>`,
`records_out.<op>`, `watermark_lag_s.<op>`, `backpressure.<op>`, `subtasks.<op>`; see
sluice/runner/metrics.py). A host keeps the recent heartbeats of each runner it follows
(:class:`HeartbeatSeries`) and derives rates from them; :func:`combine` adds up runners (on a
host) and hosts (in sluice/observe.py) the same way: counts and rates summed, watermark lag and
backpressure the highest.

The JSON of :class:`JobMetrics` is what `GET /jobs/{job_id}/metrics` answers and what
`sluice.observe.job_metrics` returns; docs/metrics.md documents it. Add fields, never rename them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, Field

#: heartbeats older than this are dropped from the rate computation: rates follow changes within
#: a few seconds and still smooth over single heartbeats
RATE_WINDOW_S = 10.0


class OperatorMetrics(BaseModel):
    """One operator of a job, over the subtasks that were counted."""

    records_in: float = Field(0.0, description="records received, total since the generation started")
    records_out: float = Field(0.0, description="records emitted, total since the generation started")
    records_in_per_s: float = Field(0.0, description="records received per second, recently (0 until known)")
    records_out_per_s: float = Field(0.0, description="records emitted per second, recently (0 until known)")
    watermark_lag_s: float | None = Field(
        None, description="wall clock minus the event-time watermark, the highest over subtasks; null: none yet"
    )
    backpressure: float = Field(0.0, description="fraction of time blocked sending downstream, the highest (0..1)")
    subtasks: int = Field(0, description="subtasks counted")


class JobMetrics(BaseModel):
    """A job's metrics per operator, from the hosts that run its runners."""

    job_id: str
    generation: int | None = Field(None, description="the generation counted (the newest seen)")
    hosts: list[str] = Field(default_factory=list, description="hosts whose runners were counted")
    unreachable: list[str] = Field(
        default_factory=list, description="hosts of the job that could not be asked (no endpoint, or no answer)"
    )
    operators: dict[str, OperatorMetrics] = Field(default_factory=dict)


def combine(parts: Iterable[Mapping[str, OperatorMetrics]]) -> dict[str, OperatorMetrics]:
    """Per operator: counts, rates and subtasks summed; watermark lag and backpressure the highest."""
    out: dict[str, OperatorMetrics] = {}
    for part in parts:
        for op, m in part.items():
            acc = out.get(op)
            if acc is None:
                out[op] = m.model_copy()
                continue
            lags = [x for x in (acc.watermark_lag_s, m.watermark_lag_s) if x is not None]
            out[op] = OperatorMetrics(
                records_in=acc.records_in + m.records_in,
                records_out=acc.records_out + m.records_out,
                records_in_per_s=acc.records_in_per_s + m.records_in_per_s,
                records_out_per_s=acc.records_out_per_s + m.records_out_per_s,
                watermark_lag_s=max(lags) if lags else None,
                backpressure=max(acc.backpressure, m.backpressure),
                subtasks=acc.subtasks + m.subtasks,
            )
    return dict(sorted(out.items()))


class HeartbeatSeries:
    """The recent heartbeat metrics of one runner, with the time each arrived (monotonic)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, Mapping[str, float]]] = deque()

    def add(self, metrics: Mapping[str, float], now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        self._samples.append((t, metrics))
        # Keep two at least, so a runner heartbeating slower than the window still has a rate.
        while len(self._samples) > 2 and t - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def _rate(self, key: str) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0
        return max(0.0, (last.get(key, 0.0) - first.get(key, 0.0)) / (t1 - t0))

    def operators(self) -> dict[str, OperatorMetrics]:
        """Per operator of this runner, from its latest heartbeat and the rates over the window."""
        if not self._samples:
            return {}
        latest = self._samples[-1][1]
        ops = sorted({k.split(".", 1)[1] for k in latest if k.startswith("subtasks.")})
        return {
            op: OperatorMetrics(
                records_in=latest.get(f"records_in.{op}", 0.0),
                records_out=latest.get(f"records_out.{op}", 0.0),
                records_in_per_s=self._rate(f"records_in.{op}"),
                records_out_per_s=self._rate(f"records_out.{op}"),
                watermark_lag_s=latest.get(f"watermark_lag_s.{op}"),
                backpressure=latest.get(f"backpressure.{op}", 0.0),
                subtasks=int(latest.get(f"subtasks.{op}", 0)),
            )
            for op in ops
        }
