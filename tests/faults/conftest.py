"""Fixtures of the fault x state suite: control files per job, jobs that clean up, tmpfs mounts.

- `fault_root`: the directory of control files, exported as $SLUICE_TEST_FAULT_DIR for runners
  started from this process (the session's in-process worker inherits it when it spawns them).
- `make_job(fault, name, checkpoint_url=None, sink=None, **config)`: a `FaultJob` on the session
  worker, stopped and its runners killed after the test.
- `tmpfs(name, size)`: a tmpfs mounted under the test's tmp dir, always unmounted; the test is
  skipped, with the reason, where this process may not mount.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sluice.client import JobClient
from tests.faults.harness import Controls, FaultJob, fault_pipeline, fault_spec
from tests.faults.mounts import MountNotPermitted, Tmpfs
from tests.pipeline_functions import FAULT_DIR_ENV


@pytest.fixture
def fault_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "controls"
    root.mkdir()
    monkeypatch.setenv(FAULT_DIR_ENV, str(root))
    return root


@pytest_asyncio.fixture
async def make_job(
    job_client: JobClient, fault_root: Path, state_dir: Path, worker: Any
) -> AsyncIterator[Callable[..., FaultJob]]:
    made: list[FaultJob] = []

    def factory(
        fault: str, name: str, *, checkpoint_url: Path | None = None, sink: Path | None = None,
        client: JobClient | None = None, limit: int = 300, **config: Any,
    ) -> FaultJob:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
        pipeline = fault_pipeline(safe, sink or state_dir / "out", limit=limit)
        spec = fault_spec(pipeline, checkpoint_url or state_dir / "checkpoints", **config)
        job = FaultJob(client or job_client, spec, Controls(fault_root, spec.job_id), fault=fault)
        made.append(job)
        return job

    yield factory
    for job in made:
        await job.cleanup()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, int], Tmpfs]]:
    mounted: list[Tmpfs] = []

    def factory(name: str, size_bytes: int) -> Tmpfs:
        fs = Tmpfs(tmp_path / name, size_bytes)
        try:
            fs.mount()
        except MountNotPermitted as exc:
            pytest.skip(f"needs a tmpfs mount (root with CAP_SYS_ADMIN): {exc}")
        mounted.append(fs)
        return fs

    yield factory
    for fs in mounted:
        fs.unmount()
