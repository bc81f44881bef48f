"""Savepoints end to end, with real runners and files: a savepoint taken from a running keyed
window job starts another job that produces exactly what the first would have; savepoints are
listed, never deleted by retention, never overwritten, and disposed of on request; periodic
savepoints keep the newest few.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluice.client import CommandRejected, JobClient
from sluice.models import PipelineSpec
from sluice.savepoints import list_savepoints
from sluice.storage import CheckpointStore
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.dataplane_helpers import assert_same_windows, expected_tumbling, generator_dict_rows, read_window_rows
from tests.e2e_helpers import (
    checkpoint_root,
    describe_status,
    job_spec,
    stop_job_quietly,
    wait_state,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
WINDOW_MS = 100
LIMIT = 2000


def _window_pipeline(out: Path) -> PipelineSpec:
    """generator (2 splits, 300 rows/s each: ~7 s) -> key_by -> tumbling window (count, sum) -> files."""
    return PipelineSpec.model_validate({
        "name": "savepoints",
        "parallelism": 2,
        "operators": [
            {"id": "events", "type": "generator", "splits": 2, "keys": 10, "limit": LIMIT, "rate": 300,
             "batch_size": 50},
            {"id": "by_key", "type": "key_by", "key": "key"},
            {"id": "w", "type": "tumbling_window", "size_ms": WINDOW_MS,
             "aggregates": [{"fn": "count"}, {"fn": "sum", "column": "value"}]},
            {"id": "out", "type": "files", "path": str(out)},
        ],
    })  # fmt: skip


def _expected(pipeline: PipelineSpec) -> Counter[Any]:
    rows = list(generator_dict_rows(pipeline.operators[0].model_dump(), LIMIT))
    return expected_tumbling(rows, WINDOW_MS)


async def test_a_savepoint_starts_another_job_that_continues_exactly(job_client: JobClient, state_dir: Path) -> None:
    first = _window_pipeline(state_dir / "out-a")
    spec_a = job_spec(first, state_dir, checkpoint_interval_s=1.0)
    second = _window_pipeline(state_dir / "out-b")
    spec_b = job_spec(second, state_dir, checkpoint_interval_s=1.0, from_savepoint=f"{spec_a.job_id}/before-upgrade")
    await job_client.start(spec_a)
    try:
        await wait_status(job_client, spec_a.job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                          timeout_s=START_TIMEOUT_S, what="Running with a checkpoint")  # fmt: skip
        saved = await job_client.savepoint(spec_a.job_id, "before-upgrade")
        assert saved.name == "before-upgrade" and saved.job_id == spec_a.job_id and saved.size_bytes > 0
        # The same name again is refused (never overwritten); the job runs on.
        with pytest.raises(CommandRejected, match="already has a savepoint named 'before-upgrade'"):
            await job_client.savepoint(spec_a.job_id, "before-upgrade")
        st = await job_client.status(spec_a.job_id)
        assert st.state == "Running" and st.restarts == 0, describe_status(st)
        # A stop without a final checkpoint: A's output is what its checkpoints committed.
        await job_client.stop(spec_a.job_id, "immediate")
        await wait_state(job_client, spec_a.job_id, "Stopped", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec_a.job_id)

    store_a = CheckpointStore(str(checkpoint_root(state_dir)), spec_a.job_id)
    assert [i.name for i in list_savepoints(store_a)] == ["before-upgrade"]
    assert saved.epoch in store_a.completed_epochs()

    await job_client.start(spec_b)
    try:
        done = await wait_state(job_client, spec_b.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.restarts == 0, describe_status(done)
    finally:
        await stop_job_quietly(job_client, spec_b.job_id)
    # B restored A's window state and source positions at the savepoint: A's output up to the
    # savepoint plus all of B's is every window exactly once.
    before = read_window_rows(state_dir / "out-a", upto_epoch=saved.epoch)
    after = read_window_rows(state_dir / "out-b")
    assert sum(before.values()) > 0 and sum(after.values()) > 0, (before, after)
    assert_same_windows(before + after, _expected(first))
    # B owns a copy: its first checkpoint in its own store is the savepoint's epoch.
    store_b = CheckpointStore(str(checkpoint_root(state_dir)), spec_b.job_id)
    assert store_b.completed_epochs()[0] <= saved.epoch < store_b.completed_epochs()[-1]


async def test_retention_keeps_savepoints_and_disposal_removes_them(
    job_client: JobClient, state_dir: Path, temporal_address: str
) -> None:
    pipeline = _window_pipeline(state_dir / "out")
    spec = job_spec(pipeline, state_dir, checkpoint_interval_s=1.0, checkpoints_to_keep=2)
    store = CheckpointStore(str(checkpoint_root(state_dir)), spec.job_id)
    env = cli_env(temporal_address, state_dir)
    await job_client.start(spec)
    try:
        await wait_status(job_client, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                          timeout_s=START_TIMEOUT_S, what="Running with a checkpoint")  # fmt: skip
        taken = await asyncio.to_thread(_cli, env, "savepoint", spec.job_id)
        assert taken.returncode == 0, taken.stderr
        default_name = re.search(r"savepoint (savepoint-\d+) of job", taken.stdout)
        assert default_name, taken.stdout
        (info,) = list_savepoints(store)
        assert info.name == default_name.group(1) and info.pipeline_name == "savepoints"
        # Four more checkpoints: retention (2 kept) deletes older epochs, never the savepoint's.
        await wait_status(job_client, spec.job_id, lambda s: s.epoch >= info.epoch + 4, timeout_s=30,
                          what="four more checkpoints")  # fmt: skip
        await wait_status(job_client, spec.job_id, lambda s: min(store.completed_epochs()) == info.epoch
                          and len(store.completed_epochs()) <= 4, timeout_s=30, what="retention")  # fmt: skip
        listed = await asyncio.to_thread(_cli, env, "savepoints", spec.job_id, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(s["name"], s["epoch"]) for s in json.loads(listed.stdout)] == [(info.name, info.epoch)]
        bad = await asyncio.to_thread(_cli, env, "savepoint", spec.job_id, "--name", "../escape")
        assert bad.returncode == 2 and "savepoint name '../escape'" in bad.stderr, bad.stderr

        disposed = await asyncio.to_thread(_cli, env, "savepoint", spec.job_id, "--dispose", info.name)
        assert disposed.returncode == 0, disposed.stderr
        assert list_savepoints(store) == []
        assert info.epoch not in store.completed_epochs()  # older than every checkpoint kept: gone
        again = await asyncio.to_thread(_cli, env, "savepoint", spec.job_id, "--dispose", info.name)
        assert again.returncode == 1 and f"has no savepoint {info.name!r}" in again.stderr, again.stderr
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    # A closed job takes no savepoint, and says why.
    await wait_state(job_client, spec.job_id, ["Stopped", "Finished"], timeout_s=FINISH_TIMEOUT_S)
    refused = await asyncio.to_thread(_cli, env, "savepoint", spec.job_id)
    assert refused.returncode == 1 and "Running" in refused.stderr, refused.stderr


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_command(*args), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def test_periodic_savepoints_keep_the_newest(job_client: JobClient, state_dir: Path) -> None:
    pipeline = _window_pipeline(state_dir / "out")
    spec = job_spec(pipeline, state_dir, checkpoint_interval_s=1.0, checkpoints_to_keep=1,
                    savepoint_interval_s=1.0, periodic_savepoints_to_keep=2)  # fmt: skip
    store = CheckpointStore(str(checkpoint_root(state_dir)), spec.job_id)
    await job_client.start(spec)
    try:
        await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        first = await wait_until(lambda: (list_savepoints(store) or [None])[0], timeout_s=30,
                                 what="a periodic savepoint")  # fmt: skip
        assert first.name == f"auto-{first.epoch}", first

        def pruned() -> list[Any] | None:
            kept = list_savepoints(store)
            return kept if len(kept) == 2 and first.name not in {i.name for i in kept} else None

        kept = await wait_until(pruned, timeout_s=30, what="the first periodic savepoint pruned")
        assert all(i.name.startswith("auto-") for i in kept), kept
        assert all(i.epoch in store.completed_epochs() for i in kept)
        await wait_until(lambda: first.epoch not in store.completed_epochs(), timeout_s=15,
                         what="the pruned savepoint's checkpoint deleted")  # fmt: skip
        st = await job_client.status(spec.job_id)
        assert st.restarts == 0 and st.state in ("Running", "Finishing", "Finished"), describe_status(st)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
