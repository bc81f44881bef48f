"""Determinism on every change: the committed history corpus replays against today's JobWorkflow.

Every file in tests/histories/ is a real, closed run of a JobWorkflow (regenerated with
`python -m tests.histories.generate`, see tests/histories/README.md). Temporal replays an open
job's history whenever a worker picks it up without a cached copy (a worker restart, a failover,
a query after eviction); a change to the workflow code that issues different commands for the
same events makes every such job fail with a nondeterminism error. Replaying the corpus with
temporalio's `Replayer` finds that offline, in seconds, without a server.

The corpus must also keep covering the job's life: every state name of `JobStateName` must be
entered in some history and every stop mode requested, so coverage cannot silently shrink. And
the replay check itself is checked: a workflow altered to issue one extra timer must be reported
as nondeterministic, so these tests cannot pass vacuously.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import UnsandboxedWorkflowRunner

from sluice.models import JobResult, JobStateName, StopMode
from sluice.workflows.constants import (
    PATCH_FAST_RECOVERY,
    PATCH_LEAN_CHECKPOINTS,
    PATCH_LOCAL_CHECKPOINTS,
    PATCH_RUNNER_HOSTS,
)
from sluice.workflows.job import JobWorkflow
from tests.histories.corpus import (
    CORPUS_DIR,
    activity_summaries,
    activity_types,
    closed,
    failed_local_activities,
    history_files,
    is_local_activity_marker,
    load_history,
    local_activity_markers,
    patches,
    replay_file,
    savepoint_summaries,
    scenario_of,
    states_entered,
    stop_modes_requested,
    union,
)
from tests.histories.scenarios import LOCAL_CHECKPOINT_SCENARIOS, SCENARIOS

FILES = history_files()
# Histories of runs on runner hosts (the `runner-hosts` patch): the same scenarios, recorded after
# the change. FILES stay as they were: they prove that runs started before it still replay.
HOSTS_DIR = CORPUS_DIR / "hosts"
HOSTS_FILES = history_files(HOSTS_DIR)
# Runs with the `fast-recovery` patch (an immediate first restart that kills the failed
# generation) and the `lean-checkpoints` patch (retention inside the checkpoint activity): the
# scenarios those change, recorded after the changes.
LEAN_DIR = CORPUS_DIR / "fast-recovery-lean"
LEAN_FILES = history_files(LEAN_DIR)
LEAN_SCENARIOS = {
    "recovery", "failure_restarts_exhausted", "finished", "stop_checkpoint", "continue_as_new", "savepoints",
}
LEAN_PATCHES = {PATCH_RUNNER_HOSTS, PATCH_FAST_RECOVERY, PATCH_LEAN_CHECKPOINTS}
# Runs with pipeline upgrades (the Upgrading state, newer than the corpora above): an upgrade that
# completes and one that rolls back.
UPGRADES_DIR = CORPUS_DIR / "upgrades"
UPGRADES_FILES = history_files(UPGRADES_DIR)
# States newer than the first corpora: those cannot enter them; the folder of the feature does.
LATER_STATES = {"Upgrading"}
# Runs with the `local-checkpoints` patch (periodic checkpoints as local activities): periodic
# checkpoints then a stop checkpoint, a stop immediate, a TTL, a recovery, a failure, a
# continue-as-new chain, savepoints, a controller worker killed holding a workflow task, and a
# periodic checkpoint held in flight across workflow-task heartbeats, then waited for by a stop
# checkpoint or cancelled by a stop immediate.
LOCAL_DIR = CORPUS_DIR / "local-checkpoints"
LOCAL_FILES = history_files(LOCAL_DIR)
LOCAL_SCENARIOS = LEAN_SCENARIOS | {"stop_immediate", "ttl", "worker_failover_mid_task", *LOCAL_CHECKPOINT_SCENARIOS}
LOCAL_PATCHES = LEAN_PATCHES | {PATCH_LOCAL_CHECKPOINTS}
ALL_FILES = FILES + HOSTS_FILES + LEAN_FILES + UPGRADES_FILES + LOCAL_FILES
REGENERATE = "regenerate with `.venv/bin/python -m tests.histories.generate` (tests/histories/README.md)"


def test_corpus_is_present() -> None:
    assert FILES, f"no history files in tests/histories/; {REGENERATE}"


@pytest.mark.parametrize("path", ALL_FILES, ids=[f"{p.parent.name}/{p.name}" for p in ALL_FILES])
async def test_history_replays_deterministically(path: Path) -> None:
    outcome = await replay_file(path, [JobWorkflow])
    if outcome.problem is not None:
        pytest.fail(
            f"JobWorkflow no longer replays {outcome.problem}\n"
            "A change to the workflow code issues different commands for a recorded history: open jobs "
            "would fail on their next replay. Guard the change with workflow.patched() (see "
            "docs/determinism.md), or, if no job of the old code can be open anywhere, " + REGENERATE,
            pytrace=False,
        )


def test_every_file_is_a_closed_run() -> None:
    """A replay covers the whole run only when the history ends with the run's close."""
    open_runs = [p.name for p in FILES if not closed(load_history(p))]
    assert not open_runs, f"histories of runs that were still open: {open_runs}; {REGENERATE}"


def test_every_scenario_has_its_histories() -> None:
    have = {scenario_of(p) for p in FILES}
    missing = sorted(set(SCENARIOS) - have)
    assert not missing, f"scenarios without a history file: {missing}; {REGENERATE}"
    continued = [p for p in FILES if scenario_of(p) == "continue_as_new"]
    assert len(continued) >= 2, f"continue_as_new must hold its whole chain of runs, has {len(continued)}"
    resumed = [p for p in FILES if scenario_of(p) == "stop_resume"]
    assert len(resumed) >= 2, f"stop_resume must hold the stopped run and the resumed one, has {len(resumed)}"


def test_corpus_covers_every_job_state() -> None:
    entered = union(states_entered(load_history(p)) for p in FILES)
    missing = sorted(set(get_args(JobStateName)) - LATER_STATES - entered)
    assert not missing, f"no history enters {missing}; add a scenario in tests/histories/scenarios.py"


def test_runner_hosts_corpus_covers_every_scenario_state_and_stop_mode() -> None:
    have = {scenario_of(p) for p in HOSTS_FILES}
    missing = sorted(set(SCENARIOS) - have)
    assert not missing, f"tests/histories/hosts/ lacks scenarios {missing}; {REGENERATE} --out tests/histories/hosts"
    histories = [load_history(p) for p in HOSTS_FILES]
    assert all(closed(h) for h in histories)
    assert set(get_args(JobStateName)) - LATER_STATES <= union(states_entered(h) for h in histories)
    assert set(get_args(StopMode)) <= union(stop_modes_requested(h) for h in histories)
    unpatched = [p.name for p, h in zip(HOSTS_FILES, histories) if PATCH_RUNNER_HOSTS not in patches(h)]
    assert not [p.name for p in FILES if PATCH_RUNNER_HOSTS in patches(load_history(p))], "old corpus must stay old"
    assert not unpatched, f"runs without the {PATCH_RUNNER_HOSTS!r} patch marker: {unpatched}"


def _patched_folder(files: list[Path], scenarios: set[str], markers: set[str]) -> dict[str, WorkflowHistory]:
    """The histories of a folder of runs recorded with newer patches, checked for what every such
    folder must hold: exactly `scenarios`, closed runs, a recovery, every run with `markers`, and
    the savepoint path (a savepoint taken, one refused for its name, one by default)."""
    folder = files[0].parent.name if files else "?"
    have = {scenario_of(p) for p in files}
    only = " ".join(f"--only {s}" for s in sorted(scenarios))
    assert have == scenarios, (
        f"tests/histories/{folder}/ holds {sorted(have)}, not {sorted(scenarios)}; "
        f"{REGENERATE} --out tests/histories/{folder} {only}"
    )
    histories = {p.name: load_history(p) for p in files}
    assert all(closed(h) for h in histories.values())
    assert "Recovering" in union(states_entered(h) for h in histories.values())
    for name, h in histories.items():
        assert markers <= patches(h), f"{name}: {patches(h)}"
    summaries = savepoint_summaries(histories["savepoints.run1.json"])
    assert sum(s.startswith("savepoint before-change:") for s in summaries) == 2, summaries
    assert any(s.startswith("savepoint savepoint-") for s in summaries), summaries
    return histories


def test_fast_recovery_lean_corpus_carries_its_patches() -> None:
    histories = _patched_folder(LEAN_FILES, LEAN_SCENARIOS, LEAN_PATCHES)
    # Lean checkpoints: no separate retention activity in any of them.
    assert not [n for n, h in histories.items() if "cleanup_checkpoints" in activity_types(h)]
    newer = {PATCH_FAST_RECOVERY, PATCH_LEAN_CHECKPOINTS}
    older = [p.name for p in FILES + HOSTS_FILES if newer & patches(load_history(p))]
    assert not older, f"older corpora must stay as recorded: {older}"


def test_local_checkpoints_corpus_carries_its_patch() -> None:
    histories = _patched_folder(LOCAL_FILES, LOCAL_SCENARIOS, LOCAL_PATCHES)
    assert len([n for n in histories if n.startswith("continue_as_new.")]) >= 3
    for name, h in histories.items():
        # Periodic checkpoints are local activities; only final checkpoints and savepoints stay
        # regular activities.
        regular = activity_summaries(h, "checkpoint")
        assert all(s.endswith(" then stop") or s.startswith("savepoint ") for s in regular), (name, regular)
        assert all(t == "checkpoint" and s.startswith("checkpoint epoch ") for t, s in local_activity_markers(h)), name
    for scenario in ("finished", "stop_checkpoint", "worker_failover_mid_task"):
        h = histories[f"{scenario}.run1.json"]
        assert local_activity_markers(h), f"{scenario}: no periodic checkpoint recorded as a local activity"
    # A held checkpoint: a stop immediate cancelled it; a stop checkpoint, handled while it ran
    # (its update in a workflow-task heartbeat, before the checkpoint's marker), waited for it.
    cancelled = failed_local_activities(histories["held_checkpoint_stop_immediate.run1.json"])
    assert [m for _, m in cancelled] == ["Activity cancelled"], cancelled
    waited = histories["held_checkpoint_stop_checkpoint.run1.json"]
    assert not failed_local_activities(waited)
    events = list(waited.events)
    held_until = max(i for i, e in enumerate(events) if is_local_activity_marker(e))
    held_from = max(i for i, e in enumerate(events[:held_until]) if e.event_type == EventType.EVENT_TYPE_TIMER_FIRED)
    during = {e.event_type for e in events[held_from:held_until]}
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED in during, "the stop was not handled during it"
    older = [p.name for p in FILES + HOSTS_FILES + LEAN_FILES if PATCH_LOCAL_CHECKPOINTS in patches(load_history(p))]
    assert not older, f"older corpora must stay as recorded: {older}"


def test_corpus_covers_every_stop_mode() -> None:
    requested = union(stop_modes_requested(load_history(p)) for p in FILES)
    missing = sorted(set(get_args(StopMode)) - requested)
    assert not missing, f"no history requests stop mode {missing}; add a scenario in tests/histories/scenarios.py"


# ------------------------------------------------------------------------------ the check is real


@workflow.defn(name="JobWorkflow", sandboxed=False)
class JobWorkflowWithExtraTimer(JobWorkflow):
    """JobWorkflow as a careless change would leave it: one extra timer before anything else."""

    @workflow.run
    async def run(self, raw: dict[str, Any]) -> JobResult:
        await workflow.sleep(0.001)
        return await super().run(raw)


async def test_replay_reports_a_nondeterministic_change() -> None:
    path = next(p for p in FILES if scenario_of(p) == "finished")
    outcome = await replay_file(path, [JobWorkflowWithExtraTimer], workflow_runner=UnsandboxedWorkflowRunner())
    assert outcome.problem is not None and outcome.nondeterministic, (
        f"replaying {path.name} against a workflow with an extra timer was not reported as "
        f"nondeterministic: {outcome.problem}"
    )
    assert path.name in outcome.problem


async def test_the_same_file_replays_against_the_real_workflow_unsandboxed() -> None:
    """The alteration, not the unsandboxed runner, is what the check above detects."""
    path = next(p for p in FILES if scenario_of(p) == "finished")
    outcome = await replay_file(path, [JobWorkflow], workflow_runner=UnsandboxedWorkflowRunner())
    assert outcome.problem is None, outcome.problem


def test_upgrades_corpus_records_an_upgrade_and_a_rollback() -> None:
    assert {scenario_of(p) for p in UPGRADES_FILES} == {"upgrades"}, (
        f"{REGENERATE} --out tests/histories/upgrades --only upgrades"
    )
    (history,) = [load_history(p) for p in UPGRADES_FILES]
    assert closed(history)
    assert LATER_STATES <= set(states_entered(history))
    assert {"check_upgrade", "commit_epochs"} <= activity_types(history)
    assert states_entered(history).count("Upgrading") == 3  # upgrade 1, upgrade 2, its rollback
    every_state = union(states_entered(load_history(p)) for p in ALL_FILES)
    assert set(get_args(JobStateName)) <= every_state
