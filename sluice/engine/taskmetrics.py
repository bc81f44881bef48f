"""The two engine metrics a subtask computes besides its record counts: backpressure and watermark lag.

* Backpressure: the fraction of the last interval a subtask spent blocked sending downstream (a
  full local channel, or a remote one whose send buffer is over its bound). Each sender keeps a
  :class:`BlockedClock`, touched only when a send actually has to wait (a local channel) or around
  the one drain of a remote send, so the hot path costs at most two clock reads per batch.
  :class:`BackpressureMeter` turns the clocks' running totals into a fraction over fixed
  intervals of BACKPRESSURE_INTERVAL_S, whoever reads it and however often (a scrape and the
  heartbeat read the same value), and counts a send that is still blocked as blocked.
* Watermark lag: wall clock minus the subtask's current event-time watermark, in seconds
  (:func:`watermark_lag_s`); None before the first watermark.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

#: the interval backpressure is measured over: long enough to smooth single batches, short enough
#: to follow a change within a few heartbeats
BACKPRESSURE_INTERVAL_S = 5.0


class BlockedClock:
    """Total time one sender spent blocked, including a wait still in progress."""

    __slots__ = ("_clock", "_since", "_total")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._total = 0.0
        self._since: float | None = None  # when the wait in progress began

    def start(self) -> None:
        """A send begins to wait (a second start while waiting is ignored)."""
        if self._since is None:
            self._since = self._clock()

    def stop(self) -> None:
        """The wait is over."""
        if self._since is not None:
            self._total += self._clock() - self._since
            self._since = None

    def total(self, now: float | None = None) -> float:
        """Seconds blocked so far, up to `now` for a wait in progress."""
        if self._since is None:
            return self._total
        return self._total + max(0.0, (self._clock() if now is None else now) - self._since)


class BackpressureMeter:
    """The fraction of the last complete interval that the `clocks` (one subtask's senders) spent
    blocked; several senders blocked at once count once per sender, capped at 1.

    Before the first interval completes, the fraction of the time since the meter was made.
    """

    def __init__(
        self,
        clocks: Callable[[], Iterable[BlockedClock]],
        *,
        interval_s: float = BACKPRESSURE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._clocks = clocks
        self._clock = clock
        self.interval_s = interval_s
        self._start = clock()
        self._blocked_at_start = 0.0
        self._last: float | None = None  # the fraction of the last complete interval

    def _blocked(self, now: float) -> float:
        return sum(c.total(now) for c in self._clocks())

    def fraction(self) -> float:
        """Backpressure in 0..1 (see the class docstring)."""
        now = self._clock()
        elapsed = now - self._start
        blocked = self._blocked(now) - self._blocked_at_start
        if elapsed >= self.interval_s:
            self._last = _ratio(blocked, elapsed)
            self._start, self._blocked_at_start = now, blocked + self._blocked_at_start
            return self._last
        if self._last is not None:
            return self._last
        return _ratio(blocked, elapsed)


def _ratio(blocked: float, elapsed: float) -> float:
    if elapsed <= 0:
        return 0.0
    return min(1.0, max(0.0, blocked / elapsed))


def watermark_lag_s(watermark_ms: int | None, now_s: float | None = None) -> float | None:
    """Wall clock (`now_s`, default: now) minus the event-time watermark, in seconds; None when
    there is no watermark yet. Negative when event time runs ahead of the wall clock."""
    if watermark_ms is None:
        return None
    now = time.time() if now_s is None else now_s
    return now - watermark_ms / 1000.0
