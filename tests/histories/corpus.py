"""Reading the history corpus: file names, loading, replaying, and what the histories cover.

Pure logic, no server: used by tests/test_replay.py (every file must replay cleanly, and the
corpus must keep covering every job state and stop mode) and by the generator (which replays
what it just saved before it reports success).

File layout: `tests/histories/<scenario>.run<N>.json`, one file per workflow run of the
scenario's job, N counting runs from 1 in the order they started (a continue-as-new chain or a
resumed job has several). The job id of a scenario is the scenario name, so a file's workflow
id is its name up to the first dot. The content is `WorkflowHistory.to_json()` of the run, the
same format `temporal workflow show --output json` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, WorkflowRunner
from temporalio.workflow import NondeterminismError

from sluice.models import SEARCH_ATTRIBUTE_STATE
from sluice.workflows.states.running import CHECKPOINT_TIMER_SUMMARY

CORPUS_DIR = Path(__file__).resolve().parent
FILE_PATTERN = re.compile(r"^(?P<scenario>[a-z0-9_]+)\.run(?P<run>[0-9]+)\.json$")

# Events a finished run ends with: the corpus holds closed runs only, so a replay covers the
# whole life of the run, up to its last command.
CLOSING_EVENTS = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    }
)

# Commands that carry a stop mode: the `stop` signal ({"mode": M}), the `update_config` signal
# and the `patch` update ({"stop": M}).
STOP_FIELDS = {"stop": "mode", "update_config": "stop", "patch": "stop"}


def history_file_name(scenario: str, run: int) -> str:
    """`<scenario>.run<N>.json`; `scenario` is lower case letters, digits and '_'."""
    name = f"{scenario}.run{run}.json"
    if not FILE_PATTERN.match(name):
        raise ValueError(f"scenario name {scenario!r} must be lower case letters, digits and '_'")
    return name


def history_files(directory: Path = CORPUS_DIR) -> list[Path]:
    """Every history file of the corpus, sorted by name."""
    return sorted(p for p in directory.glob("*.json") if FILE_PATTERN.match(p.name))


def scenario_of(path: Path) -> str:
    """The scenario (and job id) a history file belongs to."""
    m = FILE_PATTERN.match(path.name)
    if m is None:
        raise ValueError(f"{path.name}: not a corpus file name (<scenario>.run<N>.json)")
    return m.group("scenario")


def load_history(path: Path) -> WorkflowHistory:
    """The history in `path`, with the workflow id its scenario names."""
    return WorkflowHistory.from_json(scenario_of(path), path.read_text(encoding="utf-8"))


def _json_payload(payload: Payload) -> Any:
    """A JSON payload's value (None for anything else: binary/null payloads carry no command)."""
    if payload.metadata.get("encoding", b"") != b"json/plain":
        return None
    try:
        return json.loads(payload.data)
    except ValueError:
        return None


def states_entered(history: WorkflowHistory) -> list[str]:
    """Job states in the order the run recorded them: the JobState search attribute it was
    started with, then every upsert (the workflow upserts it on each transition)."""
    out: list[str] = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            fields = event.workflow_execution_started_event_attributes.search_attributes.indexed_fields
        elif event.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        else:
            continue
        if SEARCH_ATTRIBUTE_STATE in fields:
            value = _json_payload(fields[SEARCH_ATTRIBUTE_STATE])
            if isinstance(value, str) and (not out or out[-1] != value):
                out.append(value)
    return out


def commands(history: WorkflowHistory) -> list[tuple[str, Any]]:
    """Signals and accepted updates sent to the run, as (name, first argument), in order."""
    out: list[tuple[str, Any]] = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attrs = event.workflow_execution_signaled_event_attributes
            args = [_json_payload(p) for p in attrs.input.payloads]
            out.append((attrs.signal_name, args[0] if args else None))
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            req = event.workflow_execution_update_accepted_event_attributes.accepted_request.input
            args = [_json_payload(p) for p in req.args.payloads]
            out.append((req.name, args[0] if args else None))
    return out


def stop_modes_requested(history: WorkflowHistory) -> set[str]:
    """Stop modes named by any stop command in the run (accepted or rejected alike)."""
    modes: set[str] = set()
    for name, arg in commands(history):
        field = STOP_FIELDS.get(name)
        if field and isinstance(arg, dict) and isinstance(arg.get(field), str):
            modes.add(arg[field])
    return modes


def closed(history: WorkflowHistory) -> bool:
    """True if the run's last event closes it (completed, failed or continued as new)."""
    return bool(history.events) and history.events[-1].event_type in CLOSING_EVENTS


@dataclass(frozen=True)
class ReplayOutcome:
    """What replaying one file gave: `problem` is None when it replayed cleanly."""

    path: Path
    problem: str | None
    nondeterministic: bool


async def replay_history(
    history: WorkflowHistory, workflows: Sequence[type], *, workflow_runner: WorkflowRunner | None = None
) -> tuple[BaseException | None, bool]:
    """Replay one history against `workflows` with sluice's pydantic data converter.

    Returns (the replay failure or None, whether it is a nondeterminism error); never raises
    for a replay failure.
    """
    kwargs: dict[str, Any] = {"workflows": list(workflows), "data_converter": pydantic_data_converter}
    if workflow_runner is not None:
        kwargs["workflow_runner"] = workflow_runner
    result = await Replayer(**kwargs).replay_workflow(history, raise_on_replay_failure=False)
    failure = result.replay_failure
    return failure, isinstance(failure, NondeterminismError)


async def replay_file(
    path: Path, workflows: Sequence[type], *, workflow_runner: WorkflowRunner | None = None
) -> ReplayOutcome:
    """Replay `path` (see `replay_history`): the outcome names the file and the error, and says
    whether it was a nondeterminism error (a workflow change that breaks open histories)."""
    failure, nondeterministic = await replay_history(load_history(path), workflows, workflow_runner=workflow_runner)
    if failure is None:
        return ReplayOutcome(path, None, False)
    return ReplayOutcome(path, f"{path.name}: {type(failure).__name__}: {failure}", nondeterministic)


def union(sets: Iterable[Iterable[str]]) -> set[str]:
    out: set[str] = set()
    for s in sets:
        out.update(s)
    return out


def patches(history: WorkflowHistory) -> set[str]:
    """The ids of the `workflow.patched()` markers a run recorded."""
    found: set[str] = set()
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
            continue
        attrs = event.marker_recorded_event_attributes
        if attrs.marker_name != "core_patch":
            continue
        for payload in attrs.details["patch-data"].payloads:
            patch_id = json.loads(payload.data).get("id")
            if patch_id:
                found.add(patch_id)
    return found


def activity_types(history: WorkflowHistory) -> set[str]:
    """The names of the activities a run scheduled."""
    return {
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }


def savepoint_summaries(history: WorkflowHistory) -> list[str]:
    """The summaries of a run's savepoint checkpoints ("savepoint NAME: checkpoint epoch N")."""
    out = []
    for e in history.events:
        if e.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED or not e.user_metadata.HasField("summary"):
            continue
        summary = json.loads(e.user_metadata.summary.data)
        if isinstance(summary, str) and summary.startswith("savepoint "):
            out.append(summary)
    return out


def is_local_activity_marker(event: HistoryEvent) -> bool:
    """The marker that records a local activity's result (the SDK's `core_local_activity`)."""
    return (
        event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and event.marker_recorded_event_attributes.marker_name == "core_local_activity"
    )


def local_activity_markers(history: WorkflowHistory) -> list[tuple[str, str]]:
    """(activity type, summary) of each local activity a run completed (its marker): periodic
    checkpoints of runs with the local-checkpoints patch ("checkpoint epoch N")."""
    out = []
    for e in history.events:
        if not is_local_activity_marker(e):
            continue
        data = e.marker_recorded_event_attributes.details["data"].payloads[0]
        summary = json.loads(e.user_metadata.summary.data) if e.user_metadata.HasField("summary") else ""
        out.append((json.loads(data.data).get("activity_type", ""), summary))
    return out


def failed_local_activities(history: WorkflowHistory) -> list[tuple[str, str]]:
    """(summary, failure message) of each local activity of a run that ended without a result
    (cancelled, e.g. a periodic checkpoint when the job was stopped at once, or failed)."""
    return [
        (json.loads(e.user_metadata.summary.data) if e.user_metadata.HasField("summary") else "",
         e.marker_recorded_event_attributes.failure.message)
        for e in history.events
        if is_local_activity_marker(e) and e.marker_recorded_event_attributes.HasField("failure")
    ]  # fmt: skip


def activity_summaries(history: WorkflowHistory, activity_type: str) -> list[str]:
    """The summaries of the (regular) activities of one type a run scheduled."""
    return [
        json.loads(e.user_metadata.summary.data)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type
        and e.user_metadata.HasField("summary")
    ]


def local_checkpoint_since(history: WorkflowHistory) -> datetime | None:
    """When the periodic local checkpoint the (open) run is taking started (its checkpoint-interval
    timer fired), or None when none is in flight. In flight means: the run's last event starts a
    workflow task (the one that runs the checkpoint, or its heartbeat), and the timer fired after
    the last local activity marker. Such a checkpoint shows nowhere else: it is no pending activity."""
    events = list(history.events)
    if not events or events[-1].event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
        return None
    interval_timers = {
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED
        and e.user_metadata.HasField("summary")
        and json.loads(e.user_metadata.summary.data) == CHECKPOINT_TIMER_SUMMARY
    }
    fired = [
        i for i, e in enumerate(events)
        if e.event_type == EventType.EVENT_TYPE_TIMER_FIRED
        and e.timer_fired_event_attributes.started_event_id in interval_timers
    ]  # fmt: skip
    markers = [i for i, e in enumerate(events) if is_local_activity_marker(e)]
    if not fired or fired[-1] < max(markers, default=-1):
        return None
    return events[fired[-1]].event_time.ToDatetime(tzinfo=UTC)


def local_checkpoint_in_flight(history: WorkflowHistory) -> bool:
    """Whether the (open) run is taking a periodic local checkpoint (see `local_checkpoint_since`)."""
    return local_checkpoint_since(history) is not None
