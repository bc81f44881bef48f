"""What travels through a chain (and, later, over TCP between runners): data or in-band control.

Data is an Arrow RecordBatch. Control messages travel in the same stream as the data so that their
position relative to records is exact: everything before a barrier belongs to its epoch, everything
before end-of-stream is all there is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True, slots=True)
class Barrier:
    """Checkpoint barrier: snapshot state for `epoch`; with `then_stop` the task finishes after it."""

    epoch: int
    then_stop: bool = False


@dataclass(frozen=True, slots=True)
class Watermark:
    """Event-time progress: no later record on this stream has an event time below `ts_ms`."""

    ts_ms: int


@dataclass(frozen=True, slots=True)
class Idle:
    """The upstream has no records for now (e.g. a source with nothing to read): leave it out of
    the watermark until it sends records or a watermark again."""


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The upstream has no more records; operators flush what they hold."""


ControlMessage = Barrier | Watermark | Idle | EndOfStream
Message = pa.RecordBatch | Barrier | Watermark | Idle | EndOfStream
