"""Unit tests of sink path ownership and of the files sink's never-overwriting publish.

Real files in a temporary directory; the race tests use real threads and real processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from temporalio.exceptions import ApplicationError

from sluice.activities.sinks import claim_sinks, commit_sinks, recover_sinks
from sluice.connectors import sink_owner
from sluice.connectors.files import FilesSink, OutputConflict, committed_files
from sluice.connectors.sink_owner import (
    OWNER_MARKER,
    SinkPathOwned,
    UnreadableOwnerMarker,
    claim_path,
    owner_of,
)
from sluice.engine.compiler import compile_program
from sluice.engine.operators import OperatorContext
from sluice.errors import UserError
from sluice.models import CheckpointManifest, JobConfig, OperatorCheckpoint, PipelineSpec
from sluice.workflows.constants import USER_ERROR_TYPE

CLAIMERS = 8
RACE_ROUNDS = 20
JOIN_TIMEOUT_S = 30.0


def _params(path: Path) -> dict[str, Any]:
    return {"id": "out", "type": "files", "path": str(path), "format": "jsonl"}


def _sink(path: Path, index: int = 0, generation: int = 1, job: str = "job") -> FilesSink:
    s = FilesSink("out", _params(path))
    s.open(OperatorContext(job, generation, "out", index, 1), [])
    return s


def _hashes(path: Path) -> dict[str, str]:
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in committed_files(str(path))}


# ------------------------------------------------------------------------------ ownership


def test_first_claim_owns_and_the_owner_may_claim_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim_path(str(out), "job-a")  # creates the directory
    assert owner_of(str(out)) == "job-a"
    claim_path(str(out), "job-a")  # a new run, a restart, ignore_state: still the owner
    assert json.loads((out / OWNER_MARKER).read_text())["job_id"] == "job-a"
    assert committed_files(str(out)) == []  # the marker is not output
    assert [p.name for p in out.iterdir()] == [OWNER_MARKER]  # no temporary file left behind


def test_other_job_is_refused_naming_path_owner_and_remedy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim_path(str(out), "job-a")
    with pytest.raises(SinkPathOwned) as refused:
        claim_path(str(out), "job-b")
    message = str(refused.value)
    assert str(out) in message and "'job-a'" in message and "'job-b'" in message
    assert "use another path" in message and OWNER_MARKER in message
    assert isinstance(refused.value, UserError)
    assert owner_of(str(out)) == "job-a"


def test_deleting_the_marker_releases_the_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim_path(str(out), "job-a")
    (out / OWNER_MARKER).unlink()
    claim_path(str(out), "job-b")
    assert owner_of(str(out)) == "job-b"


def test_paths_inside_or_around_an_owned_path_are_refused(tmp_path: Path) -> None:
    claim_path(str(tmp_path / "a"), "job-a")
    with pytest.raises(SinkPathOwned, match="is inside .*'job-a'"):
        claim_path(str(tmp_path / "a" / "sub"), "job-b")
    assert not (tmp_path / "a" / "sub").exists()  # nothing created in another job's directory
    claim_path(str(tmp_path / "c" / "inner"), "job-c")
    with pytest.raises(SinkPathOwned, match="contains .*'job-c'"):
        claim_path(str(tmp_path / "c"), "job-d")
    assert owner_of(str(tmp_path / "c")) is None  # the refused claim gave its marker back
    claim_path(str(tmp_path / "a" / "mine"), "job-a")  # the owner may nest its own paths


def test_a_symlink_to_an_owned_path_is_the_same_path(tmp_path: Path) -> None:
    claim_path(str(tmp_path / "real"), "job-a")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(SinkPathOwned, match="'job-a'"):
        claim_path(str(tmp_path / "alias"), "job-b")


def test_a_damaged_marker_is_an_error_not_an_owner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / OWNER_MARKER).write_text("garbage")
    with pytest.raises(UnreadableOwnerMarker, match="does not name a job"):
        claim_path(str(out), "job-a")


def test_claim_race_between_threads_has_one_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every claimer first sees no marker (held at a barrier until all have looked), then all try
    to create it at once: exactly one becomes the owner, every other one is refused naming it."""
    real_owner_of = sink_owner.owner_of
    for round_ in range(RACE_ROUNDS):
        out = tmp_path / f"out-{round_}"
        out.mkdir()
        barrier = threading.Barrier(CLAIMERS)
        looked: set[int] = set()

        # gated_owner_of and claim use this round's locals: both run (threads joined) within the round.
        def gated_owner_of(path: str) -> str | None:
            owner = real_owner_of(path)
            me = threading.get_ident()
            if path == str(out) and me not in looked:  # noqa: B023
                looked.add(me)  # noqa: B023
                assert owner is None
                barrier.wait(JOIN_TIMEOUT_S)  # nobody creates the marker before all have seen none  # noqa: B023
            return owner

        monkeypatch.setattr(sink_owner, "owner_of", gated_owner_of)
        results: dict[str, str] = {}

        def claim(job: str) -> None:
            try:
                claim_path(str(out), job)  # noqa: B023
                results[job] = "owner"  # noqa: B023
            except SinkPathOwned as e:
                results[job] = f"refused:{e.owner}"  # noqa: B023

        threads = [threading.Thread(target=claim, args=(f"job-{i}",)) for i in range(CLAIMERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT_S)
        winners = [job for job, r in results.items() if r == "owner"]
        assert len(results) == CLAIMERS and len(winners) == 1, results
        assert all(r == f"refused:{winners[0]}" for job, r in results.items() if job != winners[0]), results
        assert real_owner_of(str(out)) == winners[0]
        assert sorted(p.name for p in out.iterdir()) == [OWNER_MARKER]


def _claim_in_process(path: str, job: str, start: Any, results: Any) -> None:
    start.wait(JOIN_TIMEOUT_S)
    try:
        claim_path(path, job)
        results.put((job, "owner"))
    except SinkPathOwned as e:
        results.put((job, f"refused:{e.owner}"))


def test_claim_race_between_processes_has_one_winner(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(CLAIMERS), ctx.Queue()
    out = str(tmp_path / "out")
    procs = [ctx.Process(target=_claim_in_process, args=(out, f"job-{i}", start, results)) for i in range(CLAIMERS)]
    for p in procs:
        p.start()
    try:
        seen = dict(results.get(timeout=JOIN_TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
    winners = [job for job, r in seen.items() if r == "owner"]
    assert len(winners) == 1, seen
    assert all(r == f"refused:{winners[0]}" for job, r in seen.items() if job != winners[0]), seen
    assert owner_of(out) == winners[0]


def test_one_job_cannot_nest_its_own_sinks(tmp_path: Path) -> None:
    pipeline = PipelineSpec.model_validate({"name": "nested", "operators": [
        {"id": "src", "type": "generator", "limit": 10},
        {"id": "a", "type": "files", "path": str(tmp_path / "out"), "inputs": ["src"]},
        {"id": "b", "type": "files", "path": str(tmp_path / "out" / "b"), "inputs": ["src"]},
    ]})
    with pytest.raises(UserError, match="nested paths"):
        compile_program(pipeline, JobConfig())


# ------------------------------------------------------------------------------ never overwrite


def test_commit_never_replaces_a_different_file(tmp_path: Path) -> None:
    s = _sink(tmp_path)
    s.process(pa.record_batch({"a": [1]}))
    commits = s.snapshot(1).commits
    final, staged = Path(commits[0]["final"]), Path(commits[0]["staged"])
    final.write_text('{"someone": "else"}\n')
    with pytest.raises(OutputConflict, match="never replaced"):
        FilesSink.commit(_params(tmp_path), commits)
    assert final.read_text() == '{"someone": "else"}\n'
    assert staged.exists()  # the job's output is kept for a later commit
    final.unlink()  # the user moves the foreign file away: the retried commit publishes
    assert FilesSink.commit(_params(tmp_path), commits) == 1
    assert final.read_text() == '{"a":1}\n' and not staged.exists()
    s.close()


def test_commit_after_a_crash_between_link_and_unlink_is_idempotent(tmp_path: Path) -> None:
    s = _sink(tmp_path)
    s.process(pa.record_batch({"a": [1, 2]}))
    commits = s.snapshot(1).commits
    final, staged = Path(commits[0]["final"]), Path(commits[0]["staged"])
    os.link(staged, final)  # the first attempt got this far
    assert FilesSink.commit(_params(tmp_path), commits) == 1
    assert not staged.exists() and final.read_text() == '{"a":1}\n{"a":2}\n'
    assert FilesSink.commit(_params(tmp_path), commits) == 1  # and again
    s.close()


def test_commit_accepts_an_identical_copy(tmp_path: Path) -> None:
    s = _sink(tmp_path)
    s.process(pa.record_batch({"a": [1]}))
    commits = s.snapshot(1).commits
    final, staged = Path(commits[0]["final"]), Path(commits[0]["staged"])
    final.write_bytes(staged.read_bytes())
    assert FilesSink.commit(_params(tmp_path), commits) == 1
    assert not staged.exists() and final.read_text() == '{"a":1}\n'
    s.close()


def test_a_rerun_whose_epochs_start_again_adds_files(tmp_path: Path) -> None:
    """Two runs of one job publish epoch 1 of subtask 0 each: both files stay, unchanged."""
    first = _sink(tmp_path, generation=1)
    first.process(pa.record_batch({"a": [1]}))
    FilesSink.commit(_params(tmp_path), first.snapshot(1).commits)
    first.close()
    before = _hashes(tmp_path)
    FilesSink.recover(_params(tmp_path), None)  # the rerun's fresh start
    second = _sink(tmp_path, generation=1)
    second.process(pa.record_batch({"a": [2]}))
    FilesSink.commit(_params(tmp_path), second.snapshot(1).commits)
    second.close()
    after = _hashes(tmp_path)
    assert len(after) == 2 and all(after[f] == h for f, h in before.items())


def test_recover_deletes_only_the_sinks_own_staging_files(tmp_path: Path) -> None:
    s = _sink(tmp_path)
    s.process(pa.record_batch({"a": [1]}))
    published = s.snapshot(1).commits
    FilesSink.commit(_params(tmp_path), published)
    s.process(pa.record_batch({"a": [2]}))
    s.snapshot(2)  # never got a manifest
    s.process(pa.record_batch({"a": [3]}))  # in progress
    s.close()
    foreign = tmp_path / ".staging" / "notes.txt"
    foreign.write_text("not the sink's")
    before = _hashes(tmp_path)
    FilesSink.recover(_params(tmp_path), None)
    assert _hashes(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / ".staging").iterdir()) == ["notes.txt"]


def test_activity_helpers_turn_a_foreign_owner_into_a_user_failure(tmp_path: Path) -> None:
    pipeline = PipelineSpec.model_validate({"name": "p", "operators": [
        {"id": "src", "type": "generator", "limit": 10},
        {"id": "out", "type": "files", "path": str(tmp_path / "out"), "inputs": ["src"]},
    ]})
    program = compile_program(pipeline, JobConfig())
    claim_sinks(program, "job-a")
    (tmp_path / "out" / ".staging").mkdir()
    staged = tmp_path / "out" / ".staging" / "epoch-0000000001-sub-0000-gen-1.jsonl"
    staged.write_text('{"a":1}\n')
    for call in (lambda: claim_sinks(program, "job-b"), lambda: recover_sinks(program, "job-b", None)):
        with pytest.raises(ApplicationError) as failed:
            call()
        assert failed.value.type == USER_ERROR_TYPE and failed.value.non_retryable
        assert "files sink 'out'" in str(failed.value) and "'job-a'" in str(failed.value)
    assert staged.exists()  # a refused recover cleans up nothing
    final = tmp_path / "out" / "part-0000000001-0000-00000000.jsonl"
    manifest = CheckpointManifest(job_id="job-b", epoch=1, generation=1, created_at=datetime.now(UTC),
                                  operators={"out": OperatorCheckpoint(parallelism=1, commits=[
                                      {"staged": str(staged), "final": str(final)}])})
    with pytest.raises(ApplicationError, match="'job-a'"):
        commit_sinks(program, "job-b", manifest)
    assert staged.exists() and not final.exists()  # a refused commit publishes nothing
    assert commit_sinks(program, "job-a", manifest) == 1 and final.exists()
