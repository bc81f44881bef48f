"""Helpers for end-to-end tests: pipelines and specs, expected output, committed output, waits.

Everything here is independent of sluice's own data plane where it matters: the expected rows are
computed from `generator_rows` (the documented formula) with each pipeline's map/filter applied by
a plain-Python reimplementation (`REFERENCE_FUNCTIONS`), and the committed output is read back
from the files a user would see (names under the sink's path not starting with '.' or '_').
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sluice.client import STATE_KEY, JobClient
from sluice.connectors.generator import generator_rows
from sluice.models import GeneratorOperator, JobConfig, JobSpec, JobStatus, PipelineSpec

Row = tuple[int, int, str, int]  # (split, seq, key, value)
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
POLL_S = 0.1
TS_BASE = datetime(2024, 1, 1, tzinfo=UTC)

# ------------------------------------------------------------------------------ user functions
# Plain-Python reimplementations of tests/pipeline_functions.py, one row (a dict) at a time.
# A filter returns a bool; a map returns the new row.


def _keep_even(row: dict[str, Any]) -> bool:
    return row["seq"] % 2 == 0


def _add_one(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "value": row["value"] + 1}


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    return row


REFERENCE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tests.pipeline_functions:keep_even": _keep_even,
    "tests.pipeline_functions:add_one": _add_one,
    "tests.pipeline_functions:steered": _identity,  # steered only delays or hangs; rows pass as they are
}

KEEP_EVEN = "tests.pipeline_functions:keep_even"
ADD_ONE = "tests.pipeline_functions:add_one"

# ------------------------------------------------------------------------------ ids and specs


def unique_job_id(prefix: str) -> str:
    """A job id no other test (or earlier run against the same server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def generator_pipeline(
    name: str,
    out_path: Path | str,
    *,
    splits: int = 4,
    limit: int | None = 1000,
    rate: float | None = None,
    keys: int = 50,
    batch_size: int | None = None,
    parallelism: int = 1,
    transforms: Sequence[tuple[str, str]] = (("filter", KEEP_EVEN),),
) -> PipelineSpec:
    """generator -> transforms (each `(type, fn)`: "map"/"filter") -> files sink at `out_path`."""
    gen: dict[str, Any] = {"id": "events", "type": "generator", "splits": splits, "keys": keys}
    if limit is not None:
        gen["limit"] = limit
    if rate is not None:
        gen["rate"] = rate
    if batch_size is not None:
        gen["batch_size"] = batch_size
    ops: list[dict[str, Any]] = [gen]
    for i, (kind, fn) in enumerate(transforms):
        ops.append({"id": f"{kind}{i}", "type": kind, "fn": fn})
    ops.append({"id": "out", "type": "files", "path": str(out_path), "format": "jsonl"})
    return PipelineSpec.model_validate({"name": name, "parallelism": parallelism, "operators": ops})


def job_spec(
    pipeline: PipelineSpec,
    state_dir: Path,
    *,
    job_id: str | None = None,
    checkpoint_interval_s: float = 1.0,
    **config: Any,
) -> JobSpec:
    """A JobSpec with its checkpoints under `state_dir/checkpoints` and a unique job id."""
    return JobSpec(
        job_id=job_id or unique_job_id(pipeline.name),
        pipeline=pipeline,
        config=JobConfig(checkpoint_interval_s=checkpoint_interval_s, **config),
        checkpoint_url=str(checkpoint_root(state_dir)),
    )


def checkpoint_root(state_dir: Path) -> Path:
    return Path(state_dir) / "checkpoints"


def sink_path(pipeline: PipelineSpec) -> Path:
    """The (single) files sink's path of `pipeline`."""
    paths = [Path(op.path) for op in pipeline.operators if op.type == "files"]  # type: ignore[union-attr]
    assert len(paths) == 1, f"pipeline {pipeline.name} has {len(paths)} files sinks"
    return paths[0]


# ------------------------------------------------------------------------------ expected output


def expected_rows(pipeline: PipelineSpec, upto: dict[int, int] | None = None) -> list[Row]:
    """The rows a bounded generator -> map/filter chain -> sink pipeline must commit, sorted.

    The generator's rows come from `generator_rows` (the documented formula); each map/filter is
    applied by its reference implementation in REFERENCE_FUNCTIONS, not by sluice's engine.
    `upto` ({split: rows}) replaces the generator's limit per split (for unbounded jobs).
    """
    gen = pipeline.operators[0]
    assert isinstance(gen, GeneratorOperator), "the first operator must be the generator"
    if upto is None:
        assert gen.limit is not None, "expected rows of an unbounded generator are infinite"
        upto = {split: gen.limit for split in range(gen.splits)}
    steps: list[tuple[str, Callable[[dict[str, Any]], Any]]] = []
    for op in pipeline.operators[1:]:
        if op.type in ("map", "filter"):
            fn = REFERENCE_FUNCTIONS.get(op.fn)  # type: ignore[union-attr]
            assert fn is not None, f"no reference implementation for {op.fn}"  # type: ignore[union-attr]
            steps.append((op.type, fn))
    out: list[Row] = []
    for split, limit in sorted(upto.items()):
        batch = generator_rows(gen, split, 0, limit)
        for row in batch.to_pylist():
            keep = True
            for kind, fn in steps:
                if kind == "filter":
                    if not fn(row):
                        keep = False
                        break
                else:
                    row = fn(row)
            if keep:
                out.append((row["split"], row["seq"], row["key"], row["value"]))
    out.sort()
    return out


# ------------------------------------------------------------------------------ committed output


def committed_files(path: Path | str) -> list[Path]:
    """Committed output under `path`: every file whose name (and folders) do not start with '.'/'_'."""
    root = Path(path)
    out: list[Path] = []
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        out.extend(Path(dirpath) / f for f in files if not f.startswith((".", "_")))
    return sorted(out)


def read_committed_rows(path: Path | str, *, check_ts: bool = True) -> list[Row]:
    """All committed rows as (split, seq, key, value), sorted (duplicates kept).

    With `check_ts`, every row's `ts` must be the ISO-8601 UTC time 2024-01-01 + seq ms.
    """
    rows: list[Row] = []
    for f in committed_files(path):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise AssertionError(f"{f}:{n}: not JSON ({exc}): {line[:200]!r}") from None
                row = (obj["split"], obj["seq"], obj["key"], obj["value"])
                if check_ts:
                    ts = datetime.fromisoformat(obj["ts"].replace("Z", "+00:00"))
                    want = TS_BASE + timedelta(milliseconds=obj["seq"])
                    assert ts == want, f"{f}:{n}: ts {obj['ts']} != {want.isoformat()} for seq {obj['seq']}"
                rows.append(row)
    rows.sort()
    return rows


def assert_exact_output(actual: list[Row], expected: list[Row]) -> None:
    """Exactly-once: the same multiset of rows, with a readable account of what differs."""
    if actual == expected:
        return
    a, e = Counter(actual), Counter(expected)
    dups = {r: c for r, c in a.items() if c > 1}
    missing = sorted((e - a).elements())
    extra = sorted(r for r in (a - e).elements() if r not in e)
    raise AssertionError(
        f"committed output differs: {len(actual)} rows, expected {len(expected)}; "
        f"{sum(c - 1 for c in dups.values())} duplicates (e.g. {sorted(dups)[:3]}), "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
    )


def assert_stream_prefix(actual: list[Row], pipeline: PipelineSpec) -> dict[int, int]:
    """For an unbounded (or unfinished) job: the committed rows of every split are exactly the
    expected rows of a prefix of that split, once each. Returns {split: rows generated so far},
    i.e. one past the highest committed seq of each split (0 for a split with no rows).
    """
    gen = pipeline.operators[0]
    assert isinstance(gen, GeneratorOperator)
    upto = {s: 0 for s in range(gen.splits)}
    for split, seq, _, _ in actual:
        assert split in upto, f"row of split {split}, but the generator has {gen.splits} splits"
        upto[split] = max(upto[split], seq + 1)
    assert_exact_output(actual, expected_rows(pipeline, upto))
    return upto


def manifest_epochs(state_dir: Path, job_id: str) -> list[int]:
    """Epochs that have a manifest on disk (the only proof a checkpoint exists), sorted."""
    from sluice.storage import CheckpointStore

    return CheckpointStore(str(checkpoint_root(state_dir)), job_id).completed_epochs()


def read_manifest(state_dir: Path, job_id: str, epoch: int) -> dict[str, Any]:
    from sluice.storage import CheckpointStore

    store = CheckpointStore(str(checkpoint_root(state_dir)), job_id)
    m = store.read_manifest(epoch)
    assert m is not None, f"no manifest for epoch {epoch} of {job_id}"
    return m.model_dump()


# ------------------------------------------------------------------------------ reads and waits


async def search_attribute_state(client: Any, job_id: str) -> str | None:
    """The JobState search attribute of the job's latest run (from describe, not visibility)."""
    desc = await client.get_workflow_handle(job_id).describe()
    return desc.typed_search_attributes.get(STATE_KEY)


async def wait_until(
    check: Callable[[], Awaitable[T | None] | T | None],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = POLL_S,
    what: str = "condition",
    last: Callable[[], Any] | None = None,
) -> T:
    """Call `check` until it returns something truthy; return it. `AssertionError` on timeout.

    Exceptions from `check` are retried until the deadline (the last one is reported).
    """
    deadline = time.monotonic() + timeout_s
    error: BaseException | None = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            error = None
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            error = exc
        if time.monotonic() >= deadline:
            detail = f"; last error: {error!r}" if error else ""
            if last is not None:
                with_last = last()
                if asyncio.iscoroutine(with_last):
                    try:
                        with_last = await with_last
                    except Exception as exc:  # noqa: BLE001
                        with_last = f"<{exc!r}>"
                detail += f"; last seen: {with_last}"
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
        await asyncio.sleep(interval_s)


def describe_status(st: JobStatus | None) -> str:
    """A short account of a status for failure messages."""
    if st is None:
        return "<no status>"
    trans = "; ".join(f"{t.from_state}->{t.to_state} ({t.reason[:160]})" for t in st.transitions[-8:])
    return (
        f"state={st.state} gen={st.generation} epoch={st.epoch} restarts={st.restarts} "
        f"parallelism={st.parallelism} runners={[r.pid for r in st.runners]} failure={st.failure} "
        f"rejected={[r.reason for r in st.rejected_commands][-3:]} transitions=[{trans}]"
    )


async def wait_status(
    job_client: JobClient,
    job_id: str,
    predicate: Callable[[JobStatus], bool],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "status condition",
    fail_on_failed: bool = True,
) -> JobStatus:
    """Poll `status()` until `predicate(status)`; fails fast if the job reaches Failed."""
    seen: list[JobStatus] = []

    async def check() -> JobStatus | None:
        st = await job_client.status(job_id, timeout_s=5.0)
        seen[:] = [st]
        if fail_on_failed and st.state == "Failed" and not predicate(st):
            raise AssertionError(f"job {job_id} Failed while waiting for {what}: {describe_status(st)}")
        return st if predicate(st) else None

    return await wait_until(
        check, timeout_s=timeout_s, what=f"{job_id}: {what}", last=lambda: describe_status(seen[0] if seen else None)
    )


async def wait_state(
    job_client: JobClient, job_id: str, states: str | Iterable[str], timeout_s: float = DEFAULT_TIMEOUT_S
) -> JobStatus:
    """`wait_for_state` with the job's status in the error message when it times out."""
    wanted = [states] if isinstance(states, str) else list(states)
    try:
        return await job_client.wait_for_state(job_id, wanted, timeout_s=timeout_s)
    except TimeoutError:
        st = None
        try:
            st = await job_client.status(job_id, timeout_s=5.0)
        except Exception:  # noqa: BLE001
            pass
        raise AssertionError(
            f"{job_id} did not reach {wanted} within {timeout_s:g} s: {describe_status(st)}"
        ) from None


async def wait_search_attribute(client: Any, job_id: str, state: str, timeout_s: float = 15.0) -> str:
    """Wait until the JobState search attribute reads `state` (it is upserted on transitions)."""
    seen: list[Any] = []

    async def check() -> str | None:
        value = await search_attribute_state(client, job_id)
        seen[:] = [value]
        return value if value == state else None

    return await wait_until(
        check, timeout_s=timeout_s, what=f"{job_id}: JobState={state}", last=lambda: seen[0] if seen else None
    )


async def stop_job_quietly(job_client: JobClient, job_id: str, mode: str = "force", timeout_s: float = 30.0) -> None:
    """Best-effort cleanup at the end of a test: stop the job if it is still open."""
    try:
        if await job_client.final_state(job_id) is not None:
            return
        await asyncio.wait_for(job_client.stop(job_id, mode), timeout=timeout_s)
        await job_client.wait_for_state(job_id, ["Stopped", "Finished", "Failed"], timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 - cleanup must not hide the test's own failure
        pass


# ------------------------------------------------------------------------------ processes


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def pid_is_runner(pid: int, job_id: str) -> bool:
    """True if `pid` is alive and is a sluice runner of `job_id` (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return pid_alive(pid) and "sluice.runner" in args and job_id in args


def kill_runner(pid: int, job_id: str) -> None:
    """SIGKILL one runner process of `job_id` (checked first: never some other process)."""
    assert pid_is_runner(pid, job_id), f"pid {pid} is not a live runner of {job_id}"
    os.kill(pid, signal.SIGKILL)


async def wait_closed(job_client: JobClient, job_id: str, timeout_s: float = 30.0) -> str:
    """Wait until the job's latest workflow run has closed; returns its final state.

    The `status` query (and `wait_for_state`) report a terminal state as soon as the workflow
    enters it; the run itself closes a moment later, after tearing the runners down.
    """
    return await wait_until(
        lambda: job_client.final_state(job_id), timeout_s=timeout_s, what=f"{job_id}: workflow run closed"
    )
