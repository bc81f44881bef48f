"""History cost of a running job: events and bytes per periodic checkpoint, per hour at the
default checkpoint interval, and the dev server's database growth per 1,000 checkpoints.

It starts a headless dev server (its own SQLite file in a temporary directory) and a controller
worker with a local runner host, runs one job (an unbounded, rate-limited generator -> files,
checkpointing every `--interval` seconds) until `--checkpoints` checkpoints completed, stops it,
and reads its history. Per checkpoint = the events between two consecutive checkpoints (their
`checkpoint` activities scheduled, or their local activity markers), in steady state (the median
over the run), with the event types of one cycle. History counts are deterministic; to compare
two versions of sluice, run this file on each (it needs nothing from the version it measures but
`JobClient`, `create_worker` and the job models).

    PYTHONPATH=. .venv/bin/python bench/history.py [--checkpoints 60] [--interval 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory

from bench.bench_common import stop_jobs_and_runners
from sluice.models import JobConfig, JobSpec, PipelineSpec

try:  # the continue-as-new threshold of the version measured
    from sluice.workflows.constants import CONTINUE_AS_NEW_EVENTS
except ImportError:  # pragma: no cover
    CONTINUE_AS_NEW_EVENTS = 4096

DEFAULT_INTERVAL_S = JobConfig.model_fields["checkpoint_interval_s"].default


def is_checkpoint(event: HistoryEvent) -> bool:
    """The event that stands for one checkpoint: its activity scheduled, or, for a periodic
    checkpoint run as a local activity (the local-checkpoints patch), its marker."""
    if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
        return event.activity_task_scheduled_event_attributes.activity_type.name == "checkpoint"
    if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
        return False
    data = event.marker_recorded_event_attributes.details.get("data")
    if data is None or not data.payloads:
        return False
    try:  # the SDK's local activity marker: JSON naming the activity type
        return json.loads(data.payloads[0].data).get("activity_type") == "checkpoint"
    except (ValueError, AttributeError):
        return False


def per_checkpoint(history: WorkflowHistory) -> tuple[list[int], list[int], Counter[str]]:
    """Events and bytes between consecutive checkpoints (see `is_checkpoint`), and the event types
    of one typical cycle (the last complete one)."""
    events = list(history.events)
    marks = [i for i, e in enumerate(events) if is_checkpoint(e)]
    counts, sizes = [], []
    kinds: Counter[str] = Counter()
    for a, b in zip(marks, marks[1:]):
        cycle = events[a:b]
        counts.append(len(cycle))
        sizes.append(sum(e.ByteSize() for e in cycle))
        kinds = Counter(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in cycle)
    return counts, sizes, kinds


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from sluice.client import JobClient, connect
    from sluice.devserver import DevServer, free_port
    from sluice.worker import create_worker

    state_dir = Path(tempfile.mkdtemp(prefix="sluice-bench-history-"))
    server = DevServer(state_dir / "temporal", port=free_port(), ui_port=None, headless=True)
    db = state_dir / "temporal" / "temporal.sqlite"
    await server.astart()
    job_id = "bench-history"
    jc = None
    try:
        client = await connect(server.address)
        jc = JobClient(client)
        pipeline = PipelineSpec.model_validate({
            "name": "bench-history",
            "operators": [
                {"id": "events", "type": "generator", "splits": 1, "rate": 50},
                {"id": "out", "type": "files", "path": str(state_dir / "out")},
            ],
        })  # fmt: skip
        spec = JobSpec(job_id=job_id, pipeline=pipeline, checkpoint_url=str(state_dir / "checkpoints"),
                       config=JobConfig(checkpoint_interval_s=args.interval, checkpoints_to_keep=3))  # fmt: skip
        async with create_worker(client, state_dir / "controller", warm_runners=0):
            await jc.start(spec)
            st = await jc.wait_for_state(job_id, ["Running"], timeout_s=120)
            start_epoch, db_before, t0 = st.epoch, _size(db), time.monotonic()
            used_before, rows_before = _db_used(db), _db_rows(db)
            while (st := await jc.status(job_id)).epoch < start_epoch + args.checkpoints:
                await asyncio.sleep(0.5)
            db_growth = _size(db) - db_before
            used_growth, rows_after = _db_used(db) - used_before, _db_rows(db)
            done = st.epoch - start_epoch
            elapsed = time.monotonic() - t0
            await jc.stop(job_id, "immediate")
            await jc.wait_for_state(job_id, ["Stopped"], timeout_s=60)
            history = await client.get_workflow_handle(job_id).fetch_history()
        counts, sizes, kinds = per_checkpoint(history)
        events, size = statistics.median(counts), statistics.median(sizes)
        per_hour = 3600 / DEFAULT_INTERVAL_S
        return {
            "checkpoints": done,
            "seconds": round(elapsed, 1),
            "events_per_checkpoint": events,
            "bytes_per_checkpoint": size,
            "cycle": dict(sorted(kinds.items())),
            "events_per_hour_at_default_interval": events * per_hour,
            "bytes_per_hour_at_default_interval": size * per_hour,
            "db_growth_bytes_per_1000_checkpoints": round(db_growth / max(done, 1) * 1000),
            "db_used_growth_bytes_per_1000_checkpoints": round(used_growth / max(done, 1) * 1000),
            "db_rows_per_1000_checkpoints": {
                table: round((rows_after[table] - rows_before.get(table, 0)) / max(done, 1) * 1000)
                for table in sorted(rows_after)
                if rows_after[table] != rows_before.get(table, 0)
            },
            "history_events_total": len(list(history.events)),
            "checkpoints_per_run": int(CONTINUE_AS_NEW_EVENTS // events),
            "default_interval_s": DEFAULT_INTERVAL_S,
        }
    finally:
        await stop_jobs_and_runners(jc, state_dir / "controller", [job_id])
        await server.astop()
        shutil.rmtree(state_dir, ignore_errors=True)


def _size(path: Path) -> int:
    """The SQLite database with its WAL: what the server has written."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _db_used(path: Path) -> int:
    """Bytes of the database in use (its pages less the free ones, the WAL's committed pages
    included): unlike the files' sizes, not moved by when SQLite checkpoints its WAL."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        pages, free, size = (
            db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size")
        )
    return int((pages - free) * size)


def _db_rows(path: Path) -> dict[str, int]:
    """Rows per table of the server's database: which tables a checkpoint grows (history nodes,
    timer tasks, ...)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: int(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=int, default=60, help="checkpoints to measure (default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="checkpoint interval in seconds (default 1)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    results = asyncio.run(measure(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
