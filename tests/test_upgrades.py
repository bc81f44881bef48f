"""Pipeline upgrades end to end, with real runners and files: the state and the output of a keyed
window job carry over to a new pipeline version exactly once; an incompatible version is refused
with the operator named; a version that fails in its health window rolls back to the savepoint and
the old pipeline, and none of its output is ever published; an approval can reject an upgrade.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluice.client import CommandRejected, JobClient
from sluice.models import PipelineSpec, UpgradeRequest
from tests.conftest import PROJECT_ROOT, cli_env, sluice_command
from tests.dataplane_helpers import assert_same_windows, expected_tumbling, generator_dict_rows, read_window_rows
from tests.e2e_helpers import describe_status, job_spec, stop_job_quietly, wait_state, wait_status
from tests.pipeline_functions import FAIL_MARKER_ENV

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
WINDOW_MS = 100
LIMIT = 2000
# A filter that keeps every row (values are 0..999): a new version whose output equals the old one's.
KEEP_ALL = [{"id": "keep_all", "type": "filter", "expr": "value >= 0"}]


def _operators(out: Path, *, size_ms: int = WINDOW_MS, before_key: list[dict[str, Any]] | None = None) -> Any:
    """generator (2 splits, 300 rows/s each: ~7 s) -> [extra] -> key_by -> tumbling window -> files."""
    return [
        {"id": "events", "type": "generator", "splits": 2, "keys": 10, "limit": LIMIT, "rate": 300,
         "batch_size": 50},
        *(before_key or []),
        {"id": "by_key", "type": "key_by", "key": "key"},
        {"id": "w", "type": "tumbling_window", "size_ms": size_ms,
         "aggregates": [{"fn": "count"}, {"fn": "sum", "column": "value"}]},
        {"id": "out", "type": "files", "path": str(out)},
    ]  # fmt: skip


def _pipeline(operators: Any) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "upgrades", "parallelism": 2, "operators": operators})


def _expected(pipeline: PipelineSpec) -> Counter[Any]:
    rows = list(generator_dict_rows(pipeline.operators[0].model_dump(), LIMIT))
    return expected_tumbling(rows, WINDOW_MS)


async def _running_with_checkpoint(job_client: JobClient, job_id: str) -> None:
    await wait_status(job_client, job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                      timeout_s=START_TIMEOUT_S, what="Running with a checkpoint")  # fmt: skip


async def test_an_upgrade_keeps_state_and_output_exactly_once(job_client: JobClient, state_dir: Path) -> None:
    out = state_dir / "out"
    old = _pipeline(_operators(out))
    # A filter that keeps every row (values are 0..999): the output must be exactly the old one's.
    new = _pipeline(_operators(out, before_key=KEEP_ALL))
    spec = job_spec(old, state_dir, checkpoint_interval_s=1.0)
    await job_client.start(spec)
    try:
        await _running_with_checkpoint(job_client, spec.job_id)
        up = await job_client.upgrade(spec.job_id, UpgradeRequest(pipeline=new, health_window_s=2.0))
        assert up.phase == "health_window" and up.savepoint and up.restore_epoch, up
        st = await job_client.status(spec.job_id)
        assert "keep_all" in st.parallelism and st.state == "Running", describe_status(st)
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert done.upgrade is not None and done.upgrade.phase == "completed", done.upgrade
    assert done.restarts == 0, describe_status(done)
    reasons = [t.reason for t in done.transitions if t.to_state == "Upgrading"]
    assert reasons and "upgrade 1 to pipeline version" in reasons[0], done.transitions
    # Windows that were open at the switch were restored from the savepoint and completed by the
    # new version: every window once, with every row counted.
    assert_same_windows(read_window_rows(out), _expected(old))


async def test_a_last_state_upgrade_with_dropped_state(job_client: JobClient, state_dir: Path) -> None:
    """last-state: the old generation is torn down (no savepoint) and the new one restores the
    last checkpoint; the window whose size changed starts empty, as allowed."""
    out = state_dir / "out"
    old = _pipeline(_operators(out))
    new = _pipeline(_operators(out, size_ms=2 * WINDOW_MS))
    spec = job_spec(old, state_dir, checkpoint_interval_s=1.0)
    await job_client.start(spec)
    try:
        await _running_with_checkpoint(job_client, spec.job_id)
        up = await job_client.upgrade(spec.job_id, UpgradeRequest(
            pipeline=new, mode="last-state", allow_drop_state=["w"], health_window_s=1.0))  # fmt: skip
        assert up.savepoint is None and up.dropped_state == ["w"] and up.restore_epoch, up
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert done.upgrade is not None and done.upgrade.phase == "completed", done.upgrade
    rows = read_window_rows(out)
    assert max(rows.values()) == 1, "a window committed twice"
    sizes = Counter(end - start for (_key, start, end, _count, _total) in rows)
    assert set(sizes) == {WINDOW_MS, 2 * WINDOW_MS}, sizes  # old windows up to the switch, new ones after
    # No row counted twice; the rows of windows still open at the restore point went with the
    # dropped state (that is what --allow-drop-state accepts), every other row is counted.
    counted = sum(count for (_k, _s, _e, count, _t) in rows)
    assert 0.9 * 2 * LIMIT < counted <= 2 * LIMIT, counted


async def test_a_stateless_upgrade_reprocesses_from_the_beginning(job_client: JobClient, state_dir: Path) -> None:
    """stateless: the new version starts with empty state, its sources from their beginning: every
    window is produced again (complete), on top of what the old version had committed."""
    out = state_dir / "out"
    old = _pipeline(_operators(out))
    new = _pipeline(_operators(out, before_key=KEEP_ALL))
    spec = job_spec(old, state_dir, checkpoint_interval_s=1.0)
    await job_client.start(spec)
    try:
        await _running_with_checkpoint(job_client, spec.job_id)
        up = await job_client.upgrade(spec.job_id, UpgradeRequest(pipeline=new, mode="stateless", health_window_s=1.0))
        assert up.savepoint is None and up.restore_epoch, up  # the rollback point: the last checkpoint
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert done.upgrade is not None and done.upgrade.phase == "completed", done.upgrade
    assert any("with empty state" in t.reason for t in done.transitions), done.transitions
    expected, actual = _expected(old), read_window_rows(out)
    assert not expected - actual, "a window is missing"
    again = actual - expected  # what the old version committed before the switch, produced twice
    assert sum(again.values()) > 0 and not again - expected, again


async def test_an_incompatible_upgrade_is_refused_naming_the_operator(
    job_client: JobClient, state_dir: Path, temporal_address: str
) -> None:
    out = state_dir / "out"
    spec = job_spec(_pipeline(_operators(out)), state_dir, checkpoint_interval_s=1.0)
    new_file = state_dir / "bigger-windows.yaml"
    new_file.write_text(_pipeline(_operators(out, size_ms=200)).model_dump_json(by_alias=True))
    await job_client.start(spec)
    try:
        await _running_with_checkpoint(job_client, spec.job_id)
        refused = await asyncio.to_thread(_cli, cli_env(temporal_address, state_dir), "upgrade", spec.job_id,
                                          str(new_file))  # fmt: skip
        assert refused.returncode == 1, refused
        assert "operator 'w' (tumbling_window): state schema changed: size_ms 100 -> 200" in refused.stderr
        assert "--allow-drop-state w" in refused.stderr, refused.stderr
        st = await job_client.status(spec.job_id)
        assert st.state == "Running" and st.upgrade is not None and st.upgrade.phase == "refused", describe_status(st)
        assert st.parallelism.keys() == {"events", "by_key", "w", "out"}
        env = cli_env(temporal_address, state_dir)
        bad_mode = await asyncio.to_thread(_cli, env, "upgrade", spec.job_id, str(new_file), "--mode", "bogus")
        assert bad_mode.returncode == 2 and "--mode 'bogus'" in bad_mode.stderr, bad_mode
        nothing = await asyncio.to_thread(_cli, env, "approve", spec.job_id)
        assert nothing.returncode == 1 and "no upgrade is waiting for approval" in nothing.stderr, nothing
        # Asking for a stateless operator's state to be dropped names the mistake too.
        with pytest.raises(CommandRejected, match="the running pipeline has no operator 'nope'"):
            await job_client.upgrade(spec.job_id, UpgradeRequest(
                pipeline=_pipeline(_operators(out)), allow_drop_state=["nope"]))  # fmt: skip
    finally:
        await stop_job_quietly(job_client, spec.job_id)


async def test_a_failing_new_version_rolls_back_and_output_stays_exactly_once(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = state_dir / "out"
    marker = state_dir / "new-version-fails"
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))  # runners inherit it: the new version reads it
    old = _pipeline(_operators(out))
    failing = _pipeline(_operators(out, before_key=[
        {"id": "new_map", "type": "map", "fn": "tests.pipeline_functions:fails_while_marker"}]))  # fmt: skip
    spec = job_spec(old, state_dir, checkpoint_interval_s=1.0)
    await job_client.start(spec)
    try:
        await _running_with_checkpoint(job_client, spec.job_id)
        up = await job_client.upgrade(spec.job_id, UpgradeRequest(pipeline=failing, health_window_s=60.0))
        assert up.phase == "health_window", up
        # The new version works for a while: its checkpoints complete, their output held back...
        held = await wait_status(job_client, spec.job_id, lambda s: s.upgrade is not None
                                 and len(s.upgrade.deferred_epochs) >= 1, timeout_s=30,
                                 what="a held-back checkpoint")  # fmt: skip
        assert held.state == "Running" and "new_map" in held.parallelism, describe_status(held)
        marker.write_text("fail")  # ...then it fails, inside its health window
        rolled = await wait_status(job_client, spec.job_id, lambda s: s.upgrade is not None
                                   and s.upgrade.phase == "rolled_back", timeout_s=FINISH_TIMEOUT_S,
                                   what="the upgrade rolled back")  # fmt: skip
        assert rolled.upgrade is not None and rolled.upgrade.reason is not None
        assert rolled.upgrade.reason.startswith("rollback: ") and "failing while" in rolled.upgrade.reason
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert "new_map" not in done.parallelism and done.restarts == 0, describe_status(done)
    assert any("rollback of upgrade 1" in t.reason for t in done.transitions), done.transitions
    # The failed version's checkpoints completed but their output was held back, then discarded;
    # the old pipeline went on from the savepoint: every window exactly once.
    assert_same_windows(read_window_rows(out), _expected(old))


async def test_an_upgrade_waits_for_approval_and_can_be_rejected(job_client: JobClient, state_dir: Path) -> None:
    out = state_dir / "out"
    old = _pipeline(_operators(out))
    new = _pipeline(_operators(out, before_key=KEEP_ALL))
    spec = job_spec(old, state_dir, checkpoint_interval_s=1.0)
    await job_client.start(spec)
    try:
        await _running_with_checkpoint(job_client, spec.job_id)
        up = await job_client.upgrade(spec.job_id, UpgradeRequest(pipeline=new, require_approval=True))
        assert up.phase == "awaiting_approval", up
        before = (await job_client.status(spec.job_id)).epoch
        # The old generation runs and checkpoints while the upgrade waits.
        await wait_status(job_client, spec.job_id, lambda s: s.epoch > before, timeout_s=30, what="a checkpoint")
        with pytest.raises(CommandRejected, match="upgrade 1 is in progress"):
            await job_client.rescale(spec.job_id, 1)
        rejected = await job_client.decide_upgrade(spec.job_id, approve=False, reason="not on a Friday")
        assert rejected.phase == "rejected" and rejected.reason == "rejected: not on a Friday", rejected
        st = await job_client.status(spec.job_id)
        assert st.state == "Running" and "keep_all" not in st.parallelism, describe_status(st)
        with pytest.raises(CommandRejected, match="no upgrade is waiting for approval"):
            await job_client.decide_upgrade(spec.job_id, approve=True)
        await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert_same_windows(read_window_rows(out), _expected(old))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_command(*args), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
