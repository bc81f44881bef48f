#!/usr/bin/env python
"""Micro-benchmark: what running user functions off the event loop costs per batch.

Run:  .venv/bin/python bench/user_code.py [--rows N] [--batch-sizes 1024,8192] [--repeats 5]

A chain with a user function (`map` `fn`) runs each batch on the subtask's own thread, awaited by
the event loop with a hang watchdog (sluice/engine/offload.py), instead of calling it inline on the
loop. This measures the difference directly, in one process, with no runner, network or Temporal:
one `SubtaskRunner` of `generator (bounded) -> map (identity) -> null` is driven to its end, once
inline (the chain forced onto the loop, as before) and once on its thread (the default), for each
batch size, configurations interleaved, median of the repeats. Reported: rows/s and microseconds
per batch for both, and the difference per batch (the cost of the thread handoff).

Against a tree without the thread (older sluice), `--inline-only` runs just the inline variant.
Everything is in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sluice.engine.compiler import compile_program  # noqa: E402
from sluice.engine.task import SubtaskRunner  # noqa: E402
from sluice.models import JobConfig, PipelineSpec, SubtaskRef  # noqa: E402
from sluice.storage import CheckpointStore  # noqa: E402

#: the user function: returns its batch (the work measured is sluice's, not the function's)
MODULE_SOURCE = "def identity(batch):\n    return batch\n"


async def one_run(tmp: Path, module: str, rows: int, batch_size: int, inline: bool) -> float:
    """Seconds to push `rows` rows through generator -> map -> null in one subtask."""
    pipeline = PipelineSpec.model_validate({
        "name": "bench-user-code",
        "operators": [
            {"id": "gen", "type": "generator", "splits": 1, "limit": rows, "batch_size": batch_size},
            {"id": "m", "type": "map", "fn": f"{module}:identity"},
            {"id": "out", "type": "null"},
        ],
    })
    program = compile_program(pipeline, JobConfig())
    store = CheckpointStore(str(tmp / "ckpt"), "bench")
    st = SubtaskRunner(ref=SubtaskRef(chain=0, index=0), program=program, job_id="bench", generation=1,
                       store=store, restore=None, on_event=lambda *a: None)
    if inline:
        st._uses_thread = False  # the chain on the loop, as before user code moved to a thread
    await st.open()
    finished = asyncio.Event()
    st.on_event = lambda kind, *a: finished.set() if kind == "source_finished" else None
    task = asyncio.ensure_future(st.run())
    t0 = time.perf_counter()
    await finished.wait()
    elapsed = time.perf_counter() - t0
    st.stop("immediate")
    await task
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batch-sizes", default="1024,8192")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inline-only", action="store_true", help="only the inline variant (for older trees)")
    args = p.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    variants = [True] if args.inline_only else [True, False]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        module = f"bench_userfns_{uuid.uuid4().hex[:8]}"
        (tmp / f"{module}.py").write_text(MODULE_SOURCE)
        sys.path.insert(0, str(tmp))
        results: dict[tuple[int, bool], list[float]] = {}
        for _ in range(args.repeats):
            for size in sizes:
                for inline in variants:
                    secs = asyncio.run(one_run(tmp, module, args.rows, size, inline))
                    results.setdefault((size, inline), []).append(secs)
    print(f"{'batch':>7} {'variant':>8} {'rows/s':>12} {'us/batch':>9}")
    for size in sizes:
        per_batch: dict[bool, float] = {}
        for inline in variants:
            secs = statistics.median(results[(size, inline)])
            batches = -(-args.rows // size)
            per_batch[inline] = secs / batches * 1e6
            name = "inline" if inline else "thread"
            print(f"{size:>7} {name:>8} {args.rows / secs:>12,.0f} {per_batch[inline]:>9.1f}")
        if len(per_batch) == 2:
            print(f"{size:>7} {'cost':>8} {'':>12} {per_batch[False] - per_batch[True]:>9.1f}  "
                  "(thread - inline, per batch)")


if __name__ == "__main__":
    main()
