"""Run the cases of one fault concurrently, report each as its own test.

A case is mostly waiting (for a heartbeat timeout, a backoff, a held checkpoint), so the cases of
one fault run side by side, at most `CONCURRENCY` at a time (runner processes starting at once are
what loads a small machine). Each case runs in a job of its own, so they cannot disturb each
other. The parametrized tests then report each case: `Matrix.check(key)` re-raises that case's
failure (or skip) in the test named after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sluice.client import JobClient
from tests.faults.harness import Controls, FaultJob, fault_pipeline, fault_spec

CONCURRENCY = 4
# pytest-timeout of a matrix test: the first test of a module also runs the module's whole matrix
# (its fixture), several minutes on a loaded 2-core machine when cases fail by timing out.
MATRIX_TIMEOUT_S = 900


@dataclass
class Matrix:
    """Each case's failure (None: passed)."""

    failures: dict[str, BaseException | None] = field(default_factory=dict)

    def check(self, key: str) -> None:
        assert key in self.failures, f"case {key!r} was not run (cases: {sorted(self.failures)})"
        failure = self.failures[key]
        if failure is not None:
            raise failure


def selected(request: Any, keys: list[str], param: str = "case") -> list[str]:
    """The keys whose tests this session runs (e.g. after `-k`), so that a module fixture runs
    only the cases asked for. A test selects key `k` when it uses the requesting fixture and is
    parametrized with `param=k`."""
    name = request.fixturename
    wanted = {
        item.callspec.params.get(param)
        for item in request.session.items
        if name in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")
    }
    return [k for k in keys if k in wanted]


async def run_matrix(
    cases: Mapping[str, Callable[[], Awaitable[None]]], concurrency: int = CONCURRENCY
) -> Matrix:
    """Run every case, at most `concurrency` at once; never raises (failures are kept)."""
    gate = asyncio.Semaphore(concurrency)
    matrix = Matrix()

    async def one(key: str, case: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            try:
                await case()
                matrix.failures[key] = None
            except BaseException as exc:  # noqa: BLE001 - reported by the case's own test
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                matrix.failures[key] = exc

    await asyncio.gather(*(one(k, c) for k, c in cases.items()))
    return matrix


# Rows per source split (at 100 rows/s): 6 s of source time, so that a job that needed a few
# seconds to reach its first checkpoints on a loaded machine still has rows flowing to hold. With
# 3 s, two cases that hold only after a checkpoint or two (a graceful Stopping, a corrupt
# checkpoint in Recovering) twice found no batch to hold within 30 s during a full slow run.
DEFAULT_ROWS_PER_SPLIT = 600


class JobFactory:
    """Makes the jobs of one fault's cases: each with its own output and checkpoint directory."""

    def __init__(self, job_client: JobClient, fault_root: Path, work_dir: Path) -> None:
        self.job_client = job_client
        self.fault_root = fault_root
        self.work_dir = work_dir

    def new(
        self,
        fault: str,
        state: str,
        *,
        checkpoint_url: Path | None = None,
        sink: Path | None = None,
        client: JobClient | None = None,
        limit: int = DEFAULT_ROWS_PER_SPLIT,
        **config: Any,
    ) -> FaultJob:
        name = "".join(c if c.isalnum() else "-" for c in f"f-{fault}-{state}".lower())
        base = self.work_dir / name
        base.mkdir(parents=True, exist_ok=True)
        pipeline = fault_pipeline(name, sink or base / "out", limit=limit)
        spec = fault_spec(pipeline, checkpoint_url or base / "checkpoints", **config)
        return FaultJob(
            client or self.job_client, spec, Controls(self.fault_root, spec.job_id), fault=fault, state=state
        )
