"""The source interface: a non-blocking poll driven by the task loop.

A source never blocks or sleeps itself: the task polls it between control messages, so barriers,
stops and the HTTP server on the same event loop are served promptly. A poll returns a batch, or
says how long until it may have data (rate limiting, waiting for input), or that it is finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from sluice.engine.operators import Operator


@dataclass(frozen=True, slots=True)
class Poll:
    """Result of :meth:`Source.poll`: exactly one of `batch`, `idle_s` > 0, `finished`."""

    batch: pa.RecordBatch | None = None
    idle_s: float = 0.0
    finished: bool = False


FINISHED = Poll(finished=True)


class Source(Operator):
    """Base of sources. Its snapshot must capture exactly what has been emitted so far."""

    def poll(self, now: float) -> Poll:
        """Emit the next batch if one is due at monotonic time `now`."""
        raise NotImplementedError

    def watermark(self) -> int | None:
        """Event time (ms since the epoch) that no later record of this subtask will be below, if
        it advanced since the last call; None otherwise (also for sources without event time).
        The task asks after every batch and sends the watermark downstream, in band."""
        return None

    def is_idle(self) -> bool:
        """True while the source has nothing to read but is not finished (e.g. a following files
        source between new files): downstream then leaves it out of the watermark, so event time
        keeps moving with the other sources, until it emits a batch again."""
        return False

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        raise TypeError(f"source {self.operator_id!r} takes no input")
