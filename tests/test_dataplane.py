"""The data plane end to end: a fan-in keyed window over several runners, exactly once under a
runner SIGKILL and under rescales of the windowed operator, backpressure, and watermarks.

Every test runs real runner processes under the session's controller worker and compares the
committed output (the files a user reads) with windows computed in plain Python from the
generator's documented formula.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sluice.client import JobClient
from sluice.models import JobStatus, PipelineSpec
from tests.dataplane_helpers import assert_same_windows, expected_tumbling, generator_dict_rows, read_window_rows
from tests.e2e_helpers import (
    ADD_ONE,
    assert_exact_output,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    kill_runner,
    read_committed_rows,
    stop_job_quietly,
    wait_state,
    wait_status,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
WINDOW_MS = 100
MIN_VALUE = 100


def _window_pipeline(out: Path, *, limit: int, rate: float | None = None, parallelism: int = 3) -> PipelineSpec:
    """Two generators -> union -> filter -> key_by -> tumbling window (count, sum) -> files."""
    def gen(op_id: str, splits: int, keys: int) -> dict[str, Any]:
        g: dict[str, Any] = {
            "id": op_id, "type": "generator", "splits": splits, "keys": keys, "limit": limit, "batch_size": 250
        }
        if rate is not None:
            g["rate"] = rate
        return g

    return PipelineSpec.model_validate({
        "name": "windows",
        "parallelism": parallelism,
        "operators": [
            gen("clicks", 3, 20),
            gen("views", 2, 30),
            {"id": "both", "type": "union", "inputs": ["clicks", "views"]},
            {"id": "big", "type": "filter", "expr": f"value >= {MIN_VALUE}"},
            {"id": "by_key", "type": "key_by", "key": "key"},
            {"id": "w", "type": "tumbling_window", "size_ms": WINDOW_MS,
             "aggregates": [{"fn": "count"}, {"fn": "sum", "column": "value"}]},
            {"id": "out", "type": "files", "path": str(out)},
        ],
    })


def _expected(pipeline: PipelineSpec, limit: int) -> Any:
    rows: list[dict[str, Any]] = []
    for op in pipeline.operators[:2]:
        rows.extend(generator_dict_rows(op.model_dump(), limit))
    return expected_tumbling(rows, WINDOW_MS, keep=lambda r: r["value"] >= MIN_VALUE)


async def test_fan_in_keyed_window_over_three_runners(job_client: JobClient, state_dir: Path) -> None:
    limit = 3000
    pipeline = _window_pipeline(state_dir / "out", limit=limit)
    spec = job_spec(pipeline, state_dir, slots_per_runner=4)
    await job_client.start(spec)
    try:
        running = await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        assert len(running.runners) == 3, describe_status(running)
        assert all(r.data_port for r in running.runners), "runners must advertise a data port"
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.restarts == 0, describe_status(done)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert_same_windows(read_window_rows(state_dir / "out"), _expected(pipeline, limit))


@pytest.mark.slow
async def test_runner_sigkill_mid_window_is_exactly_once(job_client: JobClient, state_dir: Path) -> None:
    limit = 3000
    # 400 rows/s per split: ~7 s of Running, windows of 100 ms event time close every 0.25 s.
    pipeline = _window_pipeline(state_dir / "out", limit=limit, rate=400)
    spec = job_spec(pipeline, state_dir, slots_per_runner=4)
    await job_client.start(spec)
    try:
        await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        first = await wait_status(
            job_client, spec.job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint"
        )
        victim = first.runners[-1]
        assert victim.pid is not None
        kill_runner(victim.pid, spec.job_id)
        recovered = await wait_status(
            job_client, spec.job_id, lambda s: s.restarts >= 1 and s.state in ("Running", "Finishing", "Finished"),
            timeout_s=60, what="recovery after SIGKILL",
        )
        assert recovered.generation > first.generation, describe_status(recovered)
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.restarts == 1, describe_status(done)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert_same_windows(read_window_rows(state_dir / "out"), _expected(pipeline, limit))


@pytest.mark.slow
async def test_rescale_window_2_5_1_is_exactly_once(job_client: JobClient, state_dir: Path) -> None:
    limit = 3000
    pipeline = _window_pipeline(state_dir / "out", limit=limit, rate=300, parallelism=2)
    spec = job_spec(pipeline, state_dir, slots_per_runner=4)
    await job_client.start(spec)
    try:
        await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        await wait_status(job_client, spec.job_id, lambda s: s.epoch >= 1, timeout_s=30, what="first checkpoint")
        for p in (5, 1):
            before = await job_client.status(spec.job_id)
            await job_client.rescale(spec.job_id, overrides={"w": p})
            st = await wait_status(
                job_client, spec.job_id,
                lambda s: s.parallelism.get("w") == p and s.state == "Running" and s.generation > before.generation,  # noqa: B023
                timeout_s=60, what=f"rescale of w to {p}",
            )
            await wait_status(
                job_client, spec.job_id, lambda s: s.epoch > st.epoch,  # noqa: B023 - awaited here
                timeout_s=30, what="a checkpoint after the rescale",
            )
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.restarts == 0, describe_status(done)
        assert done.parallelism["w"] == 1
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert_same_windows(read_window_rows(state_dir / "out"), _expected(pipeline, limit))


# ------------------------------------------------------------------------------ metrics


async def _scrape(status: JobStatus) -> str:
    text = ""
    async with aiohttp.ClientSession() as session:
        for r in status.runners:
            async with session.get(f"{r.control_url}/metrics") as resp:
                text += await resp.text()
    return text


def _metric(text: str, name: str, operator: str) -> float:
    """Sum of a per-operator counter over every subtask in a Prometheus exposition."""
    total = 0.0
    for m in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', text, re.M):
        if f'operator="{operator}"' in m.group(1):
            total += float(m.group(2))
    return total


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


SCRAPE_SKEW_BATCHES = 10


async def test_slow_sink_backpressure_keeps_memory_bounded(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The slow stage handles ~20 batches/s; the generator alone makes millions of rows per
    # second, so without backpressure the runners would buffer gigabytes within seconds.
    monkeypatch.setenv("SLUICE_TEST_SLOW_BATCH", "0.05")
    batch = 2000
    pipeline = PipelineSpec.model_validate({
        "name": "backpressure",
        "operators": [
            {"id": "gen", "type": "generator", "splits": 1, "keys": 1000, "batch_size": batch},
            {"id": "by_key", "type": "key_by", "key": "key"},
            {"id": "slow", "type": "map", "fn": "tests.pipeline_functions:slow_batches"},
            {"id": "sink", "type": "null"},
        ],
    })
    spec = job_spec(pipeline, state_dir, slots_per_runner=1, checkpoint_interval_s=60)
    await job_client.start(spec)
    try:
        st = await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        assert len(st.runners) == 2, describe_status(st)
        pids = [r.pid for r in st.runners if r.pid is not None]
        await asyncio.sleep(2.0)  # past start-up allocations
        baseline = {pid: _rss_mb(pid) for pid in pids}
        peak = dict(baseline)
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            for pid in pids:
                peak[pid] = max(peak[pid], _rss_mb(pid))
        text = await _scrape(st)
        produced = _metric(text, "sluice_records_out_total", "gen")
        consumed = _metric(text, "sluice_records_in_total", "slow")
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    growth = {pid: peak[pid] - baseline[pid] for pid in pids}
    assert max(growth.values()) < 64, f"runner memory grew by {growth} MB over 6 s (baseline {baseline})"
    # The source ran only as far ahead of the slow stage as the bounded buffers allow.
    assert consumed > 0, text
    in_flight = produced - consumed
    # The two counters are scraped from two runners one after the other while the source runs on:
    # a few batches of skew (SCRAPE_SKEW_BATCHES), against millions of rows without backpressure.
    assert in_flight <= (200 + SCRAPE_SKEW_BATCHES) * batch, (
        f"{in_flight:.0f} rows in flight between the source and the slow stage"
    )


@pytest.mark.parametrize("parallelism", [1, 2], ids=["one-subtask", "idle-subtask"])
async def test_watermarks_count_out_of_order_and_drop_late(
    job_client: JobClient, state_dir: Path, parallelism: int
) -> None:
    # With parallelism 2 one source subtask owns no file: it is idle, and must not hold event
    # time back (else no window would ever be emitted).
    src = state_dir / "in"
    src.mkdir()
    # ts in ms; bound 100 ms: the watermark trails the highest ts by 100.
    times = [0, 50, 120, 60, 250, 90, 130, 400, 1000]
    (src / "events.jsonl").write_text("".join(json.dumps({"key": "a", "ts": t, "value": 1}) + "\n" for t in times))
    out = state_dir / "out"
    pipeline = PipelineSpec.model_validate({
        "name": "watermarks",
        "parallelism": parallelism,
        "operators": [
            {"id": "events", "type": "files", "role": "source", "path": str(src), "format": "jsonl",
             "schema": {"key": "string", "ts": "timestamp", "value": "int64"}, "event_time": "ts",
             "out_of_orderness_ms": 100, "batch_size": 1, "follow": True},
            {"id": "by_key", "type": "key_by", "key": "key"},
            {"id": "w", "type": "tumbling_window", "size_ms": 100,
             "aggregates": [{"fn": "count"}, {"fn": "sum", "column": "value"}]},
            {"id": "out", "type": "files", "path": str(out)},
        ],
    })
    spec = job_spec(pipeline, state_dir)
    await job_client.start(spec)
    try:
        st = await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        # 60 is behind the highest time (120) but within the bound: counted in [0, 100).
        # 90 arrives after the watermark (150) passed [0, 100)'s end: late, dropped and counted.
        expected = {("a", 0, 100, 3, 3), ("a", 100, 200, 2, 2), ("a", 200, 300, 1, 1), ("a", 400, 500, 1, 1)}
        await wait_until(lambda: set(read_window_rows(out)) >= expected, timeout_s=30, what="windows committed")
        assert_same_windows(read_window_rows(out), Counter(expected))
        st = await job_client.status(spec.job_id)
        text = await _scrape(st)
        assert _metric(text, "sluice_late_records_total", "w") == 1, text
    finally:
        await stop_job_quietly(job_client, spec.job_id)


async def test_rebalance_and_fan_out_deliver_every_row_once(job_client: JobClient, state_dir: Path) -> None:
    # generator (parallelism 2) -> map (parallelism 3, a rebalance over TCP and in-process
    # channels) -> files, and the same map also feeds a null sink (fan-out).
    pipeline = generator_pipeline("rebalance", state_dir / "out", splits=4, limit=2000, transforms=(("map", ADD_ONE),))
    spec = job_spec(pipeline, state_dir, parallelism=2, overrides={"map0": 3}, slots_per_runner=3)
    spec.pipeline.operators.append(
        PipelineSpec.model_validate({"name": "x", "operators": [
            {"id": "g", "type": "generator"}, {"id": "discard", "type": "null", "inputs": ["g"]}]}).operators[1]
    )
    spec.pipeline.operators[-1].inputs = ["map0"]  # type: ignore[union-attr]
    await job_client.start(spec)
    try:
        done = await wait_state(job_client, spec.job_id, "Finished", timeout_s=FINISH_TIMEOUT_S)
        assert done.restarts == 0, describe_status(done)
        assert done.parallelism["map0"] == 3, describe_status(done)
        assert "3 runners" in done.transitions[2].reason, describe_status(done)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert_exact_output(read_committed_rows(state_dir / "out"), expected_rows(pipeline))


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"key": "a", "value": 1}\n{"key": "b", "value": 2}\n{"key": "c", "value": oops}\n',
         ["line 3", "oops"]),
        ('{"key": "a", "value": 1}\n{"key": "b", "value": "abc"}\n',
         ["line 2", "'value'", "abc", "int64"]),
    ],
    ids=["malformed-line", "schema-mismatch"],
)
async def test_bad_input_fails_the_job_naming_operator_subtask_and_value(
    job_client: JobClient, state_dir: Path, content: str, fragments: list[str]
) -> None:
    src = state_dir / "in"
    src.mkdir()
    (src / "part-1.jsonl").write_text(content)
    out = state_dir / "out"
    pipeline = PipelineSpec.model_validate({
        "name": "bad-input",
        "operators": [
            {"id": "events", "type": "files", "role": "source", "path": str(src),
             "schema": {"key": "string", "value": "int64"}},
            {"id": "out", "type": "files", "path": str(out)},
        ],
    })
    spec = job_spec(pipeline, state_dir)
    await job_client.start(spec)
    try:
        failed = await wait_state(job_client, spec.job_id, "Failed", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert failed.failure is not None and failed.failure.domain == "user", describe_status(failed)
    message = failed.failure.message
    for fragment in ["operator 'events' subtask 0", "part-1.jsonl", *fragments]:
        assert fragment in message, message
    assert failed.restarts == 0, "bad data is not retried: a restart would read the same line"
    assert read_committed_rows(out, check_ts=False) == [], "no partial output is committed"


async def test_immediate_stop_of_a_shuffling_job_is_clean(job_client: JobClient, client: Any, state_dir: Path) -> None:
    # Runners get the stop one after the other: subtasks whose upstream stopped first must not
    # report failures (the stop activity would fail and be retried).
    pipeline = _window_pipeline(state_dir / "out", limit=1_000_000, rate=2000)
    spec = job_spec(pipeline, state_dir, slots_per_runner=4)
    await job_client.start(spec)
    try:
        await wait_state(job_client, spec.job_id, "Running", timeout_s=START_TIMEOUT_S)
        await asyncio.sleep(1.0)
        await job_client.stop(spec.job_id, "immediate")
        stopped = await wait_state(job_client, spec.job_id, "Stopped", timeout_s=FINISH_TIMEOUT_S)
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    assert ("Stopping", "Stopped") in [(t.from_state, t.to_state) for t in stopped.transitions]
    history = await client.get_workflow_handle(spec.job_id).fetch_history()
    scheduled: dict[int, str] = {}
    attempts: dict[str, list[int]] = {}
    for event in history.events:
        attrs = event.activity_task_scheduled_event_attributes
        if event.HasField("activity_task_scheduled_event_attributes"):
            scheduled[event.event_id] = attrs.activity_type.name
        if event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            attempts.setdefault(scheduled[started.scheduled_event_id], []).append(started.attempt)
    assert attempts.get("stop_runners") == [1], f"stop_runners attempts: {attempts}"
