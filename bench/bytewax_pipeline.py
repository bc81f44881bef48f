#!/usr/bin/env python
"""The data-plane benchmark's pipeline written for bytewax 0.21, run as a child of bench/dataplane.py.

    generator-like input -> filter(value < 500) -> key_on(key) -> tumbling window count (1 s) -> null

Run alone:  .venv/bin/python bench/bytewax_pipeline.py [--keys 100000] [--warmup-s 3] [--measure-s 10]

The rows are sluice's generator rows, the same values (sluice.connectors.generator.generator_rows:
split, seq, key "key-<n>", ts = 2024-01-01 + seq ms, value in [0, 1000)), computed a batch at a
time with numpy and handed to bytewax as Python tuples `(split, seq, key, ts, value)` with `ts` a
timezone-aware datetime, as bytewax's event clock wants. The input is a `DynamicSource` whose
partition emits `--batch-size` rows per `next_batch` (a generator of rows, unbounded). One worker
(`bytewax.testing.run_main`, in this thread); the parent pins this process to one core.

Measured like sluice's generator: the rows the input has emitted, counted at the start and the end
of a fixed window after a warm-up (single worker, so a batch has gone through the whole dataflow
before the next `next_batch` call). Then the input ends, the dataflow drains and exits, and one
JSON line with the numbers is printed on stdout (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the rows come from sluice's generator
    sys.path.insert(0, str(REPO))

import bytewax  # noqa: E402
import bytewax.operators as op  # noqa: E402
import pyarrow as pa  # noqa: E402
from bytewax.dataflow import Dataflow  # noqa: E402
from bytewax.inputs import DynamicSource, StatelessSourcePartition  # noqa: E402
from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window  # noqa: E402
from bytewax.outputs import DynamicSink, StatelessSinkPartition  # noqa: E402
from bytewax.testing import run_main  # noqa: E402

from sluice.connectors.generator import generator_rows  # noqa: E402

UTC_MS = pa.timestamp("ms", tz="UTC")
ALIGN = datetime(2024, 1, 1, tzinfo=UTC)


class Meter:
    """Rows emitted by the input, with the two samples that bound the measured window."""

    def __init__(self, warmup_s: float, measure_s: float) -> None:
        self.warmup_s = warmup_s
        self.measure_s = measure_s
        self.rows = 0
        self.t_first: float | None = None
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None
        self.windows_out = 0

    def done(self, now: float) -> bool:
        """Take the samples when their time has come; True once the window is over."""
        if self.t_first is None:
            self.t_first = now
        if self.start is None and now - self.t_first >= self.warmup_s:
            self.start = (now, self.rows)
        if self.start is not None and self.end is None and now - self.start[0] >= self.measure_s:
            self.end = (now, self.rows)
        return self.end is not None


def python_rows(params: dict[str, Any], split: int, start: int, stop: int) -> list[tuple]:
    """sluice's generator rows [start, stop) of `split` as tuples (split, seq, key, ts, value)."""
    b = generator_rows(params, split, start, stop)
    return list(
        zip(
            b.column(0).to_pylist(),
            b.column(1).to_pylist(),
            b.column(2).to_pylist(),
            b.column(3).cast(UTC_MS).to_pylist(),  # aware datetimes
            b.column(4).to_pylist(),
        )
    )


class _GeneratorPartition(StatelessSourcePartition[tuple]):
    def __init__(self, params: dict[str, Any], split: int, batch_size: int, meter: Meter) -> None:
        self.params = params
        self.split = split
        self.batch_size = batch_size
        self.meter = meter
        self.offset = 0

    def next_batch(self) -> list[tuple]:
        if self.meter.done(time.perf_counter()):
            raise StopIteration
        start = self.offset
        self.offset += self.batch_size
        rows = python_rows(self.params, self.split, start, self.offset)
        self.meter.rows += len(rows)
        return rows


class GeneratorInput(DynamicSource[tuple]):
    """An unbounded generator of sluice's rows; worker i reads split i."""

    def __init__(self, keys: int, batch_size: int, meter: Meter) -> None:
        self.params = {"keys": keys}
        self.batch_size = batch_size
        self.meter = meter

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _GeneratorPartition:
        return _GeneratorPartition(self.params, worker_index, self.batch_size, self.meter)


class _NullPartition(StatelessSinkPartition[Any]):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def write_batch(self, items: list[Any]) -> None:
        self.meter.windows_out += len(items)


class NullOutput(DynamicSink[Any]):
    """Discards what it gets (counts it)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _NullPartition:
        return _NullPartition(self.meter)


def row_ts(row: tuple) -> datetime:
    return row[3]


def keep(row: tuple) -> bool:
    return row[4] < 500


def row_key(row: tuple) -> str:
    return row[2]


def build_flow(keys: int, batch_size: int, window_ms: int, meter: Meter) -> Dataflow:
    flow = Dataflow("sluice_bench_dataplane")
    rows = op.input("events", flow, GeneratorInput(keys, batch_size, meter))
    kept = op.filter("half", rows, keep)
    keyed = op.key_on("by_key", kept, row_key)
    clock = EventClock(ts_getter=row_ts, wait_for_system_duration=timedelta(0))
    windower = TumblingWindower(length=timedelta(milliseconds=window_ms), align_to=ALIGN)
    # count_window is key_on + this fold; the key_on above is the pipeline's key_by.
    counts = fold_window("count", keyed, clock, windower, lambda: 0, lambda n, _: n + 1, lambda a, b: a + b,
                         ordered=False)
    op.output("out", counts.down, NullOutput(meter))
    return flow


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=65536, help="rows per next_batch (default 65536)")
    p.add_argument("--window-ms", type=int, default=1000)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--measure-s", type=float, default=10.0)
    args = p.parse_args()
    meter = Meter(args.warmup_s, args.measure_s)
    flow = build_flow(args.keys, args.batch_size, args.window_ms, meter)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    run_main(flow)
    total_s = time.perf_counter() - t0
    assert meter.start is not None and meter.end is not None
    (ta, na), (tb, nb) = meter.start, meter.end
    result = {
        "events_per_s": (nb - na) / (tb - ta),
        "rows": nb - na,
        "elapsed_s": tb - ta,
        "rows_total": meter.rows,
        "windows_out": meter.windows_out,
        "total_s": total_s,
        "cpu_s": time.process_time() - cpu0,
        "affinity": sorted(os.sched_getaffinity(0)),
        "bytewax": getattr(bytewax, "__version__", None) or _version("bytewax"),
        "keys": args.keys,
        "batch_size": args.batch_size,
    }
    print(json.dumps(result), flush=True)
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
