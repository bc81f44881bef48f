"""Event-time tracking at a source: the watermark is what every split has reached, minus a bound.

Each split's event times are assumed to arrive at most `out_of_orderness_ms` behind the highest one
seen on that split so far. The source's watermark is the lowest of its active splits' highest event
times minus that bound: a split that has not started yet holds it back (it may still produce old
records), a finished split no longer does. When every split has finished, the end of stream
(watermark +infinity) follows.
"""

from __future__ import annotations


class WatermarkTracker:
    """Per-split highest event time, and the watermark they allow."""

    def __init__(self, out_of_orderness_ms: int) -> None:
        self.bound = out_of_orderness_ms
        self._high: dict[object, int | None] = {}
        self._emitted: int | None = None

    def add_split(self, split: object) -> None:
        """A split that will produce records (it holds the watermark back until it has)."""
        self._high.setdefault(split, None)

    def observe(self, split: object, max_event_time_ms: int) -> None:
        """`split` produced records up to `max_event_time_ms`."""
        current = self._high.get(split)
        if current is None or max_event_time_ms > current:
            self._high[split] = max_event_time_ms

    def finish(self, split: object) -> None:
        """`split` ends: it no longer holds the watermark back."""
        self._high.pop(split, None)

    def advance(self) -> int | None:
        """The new watermark if it moved forward since the last call, else None."""
        if not self._high or any(v is None for v in self._high.values()):
            return None
        wm = min(v for v in self._high.values() if v is not None) - self.bound
        if self._emitted is not None and wm <= self._emitted:
            return None
        self._emitted = wm
        return wm
