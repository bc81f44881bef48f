"""Random command sequences against open jobs: the real JobWorkflow, fake controller activities.

Hypothesis generates sequences of signals (`stop`, `rescale`, `restart`, `update_config`, unknown
names) and updates (`patch`, `wait_for_state`), valid and malformed (wrong types, missing and
unknown fields, huge and non-finite numbers, a 1.5 MB string, nested junk, absurd parallelism,
overrides of unknown or many operators, no or two arguments, payloads that are not JSON),
interleaved with `wait_for_state` calls the client gives up on and with controller worker
restarts (a new worker: the sticky cache is dropped). The job runs the real workflow on the
session's dev server, on a task queue of its own, with every activity replaced by a fake under
the same name (runners that never exist, checkpoints that always succeed), so a sequence takes
seconds.

After each sequence the invariants of the command contract are checked:
- no WorkflowTaskFailed event in the job's history;
- every invalid signal is in `status.rejected_commands`, with a reason naming the problem, and
  neither the reason nor the recorded payload quotes more than a short prefix of a huge payload;
- every invalid update is refused to its caller with a message naming the problem;
- the job can still be stopped: `stop force`, then the workflow closes within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import RawValue
from temporalio.worker import Worker

from sluice.client import JobClient, JobClosed
from sluice.models import (
    WORKFLOW_TYPE,
    JobConfig,
    JobInput,
    JobSpec,
    JobStatus,
    PipelineSpec,
)
from sluice.workflows.job import JobWorkflow
from tests.e2e_helpers import unique_job_id, wait_closed, wait_until
from tests.fake_controller import FakeController

# Bounds (waits, not timing goals).
RUNNING_TIMEOUT_S = 30.0
STOP_CLOSE_TIMEOUT_S = 30.0
REJECTIONS_SEEN_TIMEOUT_S = 15.0
UPDATE_TIMEOUT_S = 15.0
SEQUENCE_TIMEOUT_S = 120.0  # a whole sequence and its checks; beyond it something hangs
GIVE_UP_AFTER_S = 0.3  # a wait_for_state caller that gives up this soon
# A restarted worker gets the job's next task after the old worker's sticky queue times out.
STICKY_TIMEOUT = timedelta(seconds=1)
WORKFLOW_TASK_TIMEOUT = timedelta(seconds=2)
# What "a short prefix" of a rejected payload means: the reason and the recorded payload together
# stay far below one huge payload, so status stays small whatever a caller sends.
MAX_REJECTION_CHARS = 2_000
HUGE_STRING_CHARS = 1_500_000
# Sequences are short enough that every rejection stays in status (it keeps the last 20).
MAX_STEPS = 10
EXAMPLES = 20

PIPELINE = PipelineSpec.model_validate(
    {
        "name": "fuzz",
        "operators": [{"id": "events", "type": "generator", "splits": 2}, {"id": "out", "type": "null"}],
    }
)


class ControllerWorker:
    """An in-process worker of the real JobWorkflow with the fakes, on its own task queue;
    `restart()` shuts it down and starts a new one (a crash of the controller, as the workflow
    sees it: the sticky cache goes and the next task replays the history)."""

    def __init__(self, client: Client, task_queue: str) -> None:
        self.client = client
        self.task_queue = task_queue
        self.fakes = FakeController()
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None
        self.restarts = 0

    def start(self) -> None:
        fakes = self.fakes
        self.worker = Worker(
            self.client,
            task_queue=self.task_queue,
            workflows=[JobWorkflow],
            activities=fakes.activities(),
            sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        )
        self.task = asyncio.create_task(self.worker.run(), name=f"fuzz-worker-{self.task_queue}")

    async def stop(self) -> None:
        if self.worker is not None and self.task is not None and not self.task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.worker.shutdown(), timeout=STOP_CLOSE_TIMEOUT_S)
        if self.task is not None:
            if not self.task.done():
                self.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, timeout=STOP_CLOSE_TIMEOUT_S)
        self.worker = self.task = None

    async def restart(self) -> None:
        await self.stop()
        self.start()
        self.restarts += 1


@pytest_asyncio.fixture
async def controller(client: Client) -> AsyncIterator[ControllerWorker]:
    """A fake-activity controller worker on a task queue of this test's own."""
    worker = ControllerWorker(client, f"fuzz-{uuid.uuid4().hex[:12]}")
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


# ------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Signal:
    """A signal; `args` are its payloads (a RawValue is sent as it is, not encoded).

    `problem` is None for a well-formed signal (the state may still reject it); otherwise a
    word its rejection reason must contain ("" when any reason will do)."""

    name: str
    args: tuple[Any, ...]
    problem: str | None = None

    def __repr__(self) -> str:
        return f"Signal({self.name!r}, {_short(self.args)}, problem={self.problem!r})"


@dataclass(frozen=True)
class Update:
    """A `patch` or `wait_for_state` update with an arbitrary payload; `problem` as for Signal."""

    name: str
    arg: Any
    problem: str | None = None

    def __repr__(self) -> str:
        return f"Update({self.name!r}, {_short(self.arg)}, problem={self.problem!r})"


@dataclass(frozen=True)
class GiveUpWaiting:
    """`wait_for_state` for a state the job will not reach soon; the caller gives up."""

    states: tuple[str, ...]


@dataclass(frozen=True)
class RestartWorker:
    """Shut the controller worker down and start a new one."""


@dataclass(frozen=True)
class Pause:
    seconds: float


Step = Signal | Update | GiveUpWaiting | RestartWorker | Pause


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text):,} chars)"


def raw_json(text: str) -> RawValue:
    """A payload the client sends as it is: JSON text, valid or not."""
    return RawValue(Payload(metadata={"encoding": b"json/plain"}, data=text.encode()))


@dataclass(frozen=True)
class Big:
    """A big value, built only when sent: failure reports show its short name, not 1.5 MB."""

    label: str

    def __repr__(self) -> str:
        return f"<{self.label}>"

    def build(self) -> Any:
        return BIG_VALUES[self.label]()


BIG_VALUES = {
    "1.5 MB string": lambda: "x" * HUGE_STRING_CHARS,
    "2,000 unknown overrides": lambda: {f"ghost{i}": 2 for i in range(2_000)},
    "60 nested lists": lambda: json.loads("[" * 60 + "]" * 60),
}
HUGE, many_unknown_overrides, nested_junk = (Big(label) for label in BIG_VALUES)


def materialize(value: Any) -> Any:
    """`value` with every Big in it built."""
    if isinstance(value, Big):
        return value.build()
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(materialize(v) for v in value)
    return value


HUGE_NUMBERS = [10**9, 1e12, 1e15, 10**30, -(10**30), 2**64]
NON_FINITE = [float("inf"), float("-inf"), float("nan")]

# Well-formed signals: the job's state decides whether each is applied or rejected.
valid_signals = st.sampled_from(
    [
        Signal("rescale", ({"parallelism": 2},)),
        Signal("rescale", ({"overrides": {"events": 2}},)),
        Signal("rescale", ({"parallelism": 1},)),
        Signal("restart", ({},)),
        Signal("restart", ({"force": True},)),
        Signal("update_config", ({"checkpoint_interval_s": 2},)),
        Signal("update_config", ({"ttl_s": 3600},)),
        Signal("stop", ({"mode": "none"},)),
    ]
)
# Stops that end the job: rarer, so that most sequences keep it open to the end.
ending_signals = st.sampled_from(
    [Signal("stop", ({"mode": m},)) for m in ("checkpoint", "graceful", "immediate", "force")]
)


def _bad_number_signals() -> list[Signal]:
    """Every field with numbers outside its bounds (models.py), one signal each."""
    too_big = HUGE_NUMBERS  # beyond every bound below
    negative = [-1, -(10**30)]
    bad: dict[tuple[str, str], list[Any]] = {
        ("rescale", "parallelism"): too_big + NON_FINITE + negative + [0, 1.5],
        ("update_config", "checkpoint_interval_s"): too_big + NON_FINITE + negative + [0, 0.5],
        ("update_config", "ttl_s"): too_big + NON_FINITE + negative + [0],
        ("update_config", "restart_nonce"): [10**30, 2**64, *NON_FINITE, *negative, 1.5],
        ("update_config", "runner_heartbeat_timeout_s"): too_big + NON_FINITE + negative + [0],
        ("update_config", "allowed_restarts"): [10**30, -2, float("nan")],
        ("update_config", "checkpoints_to_keep"): [10**30, 0],
    }
    out = [Signal(cmd, ({name: n},), name) for (cmd, name), values in bad.items() for n in values]
    out += [Signal("rescale", ({"overrides": {"events": n}},), "overrides") for n in bad[("rescale", "parallelism")]]
    out.append(Signal("rescale", (raw_json('{"parallelism": Infinity}'),), "parallelism"))
    out.append(Signal("update_config", (raw_json('{"ttl_s": NaN}'),), "ttl_s"))
    out.append(Signal("update_config", (raw_json('{"checkpoint_interval_s": 1e999}'),), "checkpoint_interval_s"))
    return out


# Signals whose arguments do not fit a handler: no argument (what `temporal workflow signal`
# sends without --input), two arguments, a payload that is not JSON at all.
UNFIT_ARGUMENTS = [
    Signal("stop", (), ""),
    Signal("rescale", ({"parallelism": 2}, {"parallelism": 3}), ""),
    Signal("stop", (raw_json('{"mode": '),), ""),
    Signal("restart", (RawValue(Payload(metadata={"encoding": b"binary/plain"}, data=b"\xff\x00")),), ""),
]
invalid_signals = st.one_of(
    st.sampled_from(_bad_number_signals()),
    st.sampled_from(UNFIT_ARGUMENTS),
    st.sampled_from(
        [
            # wrong types
            Signal("stop", ("force",), "JSON object"),
            Signal("stop", (["force"],), "JSON object"),
            Signal("stop", (None,), "JSON object"),
            Signal("stop", (42,), "JSON object"),
            Signal("stop", ({"mode": 3},), "mode"),
            Signal("restart", ({"force": "maybe"},), "force"),
            Signal("restart", ({"ignore_state": [1]},), "ignore_state"),
            Signal("update_config", ({"checkpoint_interval_s": "soon"},), "checkpoint_interval_s"),
            Signal("update_config", ({"stop": {"mode": "force"}},), "stop"),
            # missing and unknown fields
            Signal("stop", ({},), "mode"),
            Signal("stop", ({"mode": "gentle"},), "mode"),
            Signal("stop", ({"mode": "force", "why": "because"},), "why"),
            Signal("rescale", ({},), "parallelism"),
            Signal("restart", ({"forcefully": True},), "forcefully"),
            Signal("update_config", ({"checkpoint_interval": 5},), "checkpoint_interval"),
            # a 1.5 MB string, nested junk
            Signal("stop", ({"mode": HUGE},), "mode"),
            Signal("update_config", ({"unknown_field": HUGE},), "unknown_field"),
            Signal("rescale", ({"overrides": {"events": nested_junk}},), "overrides"),
            Signal("update_config", ({"overrides": nested_junk},), "overrides"),
            # absurd parallelism and overrides of unknown or many operators
            Signal("rescale", ({"overrides": {"ghost": 2}},), "ghost"),
            Signal("rescale", ({"overrides": many_unknown_overrides},), "overrides"),
            Signal("update_config", ({"overrides": {"ghost": 2}},), "ghost"),
            # unknown signal names
            Signal("pause", ({"mode": "now"},), "pause"),
            Signal("Stop", ({"mode": "force"},), "Stop"),
            Signal("resume", (), "resume"),
            Signal("s" * 300, ({},), "sssssssssssssssssss"),
        ]
    ),
)

valid_updates = st.sampled_from(
    [
        Update("patch", {"checkpoint_interval_s": 3}),
        Update("patch", {"parallelism": 2}),
        Update("patch", {"ttl_s": 7200}),
    ]
)
invalid_updates = st.sampled_from(
    [
        Update("patch", {"parallelism": 10**9}, "parallelism"),
        Update("patch", {"parallelism": float("inf")}, "parallelism"),
        Update("patch", {"checkpoint_interval_s": 1e15}, "checkpoint_interval_s"),
        Update("patch", {"ttl_s": float("nan")}, "ttl_s"),
        Update("patch", {"ttl_s": -1}, "ttl_s"),
        Update("patch", {"stop": "gentle"}, "stop"),
        Update("patch", {"nonsense": 1}, "nonsense"),
        Update("patch", "stop please", "PatchRequest"),
        Update("patch", {"overrides": {"ghost": 2}}, "ghost"),
        Update("patch", {"overrides": many_unknown_overrides}, "overrides"),
        Update("patch", {"stop": HUGE}, "stop"),
        Update("patch", {"restart": {"force": "maybe"}}, "force"),
        Update("wait_for_state", {"states": ["Runing"]}, "states"),
        Update("wait_for_state", {"states": []}, "states"),
        Update("wait_for_state", {}, "states"),
        Update("wait_for_state", {"states": ["Running"], "timeout": 5}, "timeout"),
    ]
)
steps: st.SearchStrategy[Step] = st.one_of(
    invalid_signals,
    invalid_signals,
    invalid_signals,
    valid_signals,
    invalid_updates,
    valid_updates,
    st.builds(GiveUpWaiting, st.sampled_from([("Finished",), ("Stopped",), ("Failed", "Finished"), ("Rescaling",)])),
    st.builds(Pause, st.sampled_from([0.0, 0.2, 1.0])),
)

@st.composite
def sequences(draw: st.DrawFn) -> tuple[list[Step], Signal | None]:
    """Up to MAX_STEPS steps with at most one worker restart among them (each costs a sticky
    queue timeout), and sometimes a stop that ends the job at the end."""
    body = draw(st.lists(steps, min_size=1, max_size=MAX_STEPS))
    if draw(st.booleans()):
        body.insert(draw(st.integers(min_value=0, max_value=len(body))), RestartWorker())
    return body, draw(st.one_of(st.none(), ending_signals))



# ------------------------------------------------------------------------------ running a sequence


@dataclass
class Outcome:
    """What the sequence did, for the invariants and for failure messages."""

    job_id: str
    sent_invalid: list[Signal] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    update_problems: list[str] = field(default_factory=list)


async def run_step(step: Step, jobs: JobClient, controller: ControllerWorker, out: Outcome) -> None:
    handle = jobs.client.get_workflow_handle(out.job_id)
    if isinstance(step, Signal):
        try:
            args = materialize(list(step.args))
            if len(args) == 1:
                await handle.signal(step.name, args[0])
            else:
                await handle.signal(step.name, args=args)
        except Exception as exc:  # noqa: BLE001 - the job closed: the caller is told, nothing to record
            out.log.append(f"{step!r}: not delivered ({type(exc).__name__}: {str(exc)[:100]})")
            return
        out.log.append(f"{step!r}: sent")
        if step.problem is not None:
            out.sent_invalid.append(step)
    elif isinstance(step, Update):
        await run_update(step, handle, out)
    elif isinstance(step, GiveUpWaiting):
        try:
            await jobs.wait_for_state(out.job_id, list(step.states), timeout_s=GIVE_UP_AFTER_S)
            out.log.append(f"{step!r}: reached")
        except (TimeoutError, JobClosed, Exception) as exc:  # noqa: BLE001 - giving up is the point
            out.log.append(f"{step!r}: {type(exc).__name__}")
    elif isinstance(step, RestartWorker):
        await controller.restart()
        out.log.append("worker restarted")
    else:
        await asyncio.sleep(step.seconds)
        out.log.append(f"paused {step.seconds} s")


def failure_text(exc: BaseException) -> str:
    """What a caller can read of a refused update: the messages along its chain of causes."""
    parts: list[str] = []
    cause: BaseException | None = exc.cause if isinstance(exc, WorkflowUpdateFailedError) else exc
    while cause is not None and len(parts) < 10:
        parts.append(str(getattr(cause, "message", None) or cause))
        cause = cause.__cause__
    return ": ".join(parts)


async def run_update(step: Update, handle: Any, out: Outcome) -> None:
    try:
        await asyncio.wait_for(
            handle.execute_update(step.name, materialize(step.arg), result_type=JobStatus),
            timeout=UPDATE_TIMEOUT_S if step.name == "patch" else GIVE_UP_AFTER_S,
        )
        result = "accepted"
    except WorkflowUpdateFailedError as exc:
        message = failure_text(exc)
        result = f"refused: {message[:200]}"
        if step.problem is not None:
            if step.problem not in message:
                out.update_problems.append(f"{step!r} refused without naming {step.problem!r}: {message[:300]}")
            if len(message) > MAX_REJECTION_CHARS:
                out.update_problems.append(f"{step!r} refusal is {len(message):,} chars: {message[:200]}...")
    except TimeoutError:
        result = "caller gave up"
    except Exception as exc:  # noqa: BLE001 - the job closed meanwhile
        result = f"{type(exc).__name__}: {str(exc)[:100]}"
    out.log.append(f"{step!r}: {result}")
    if step.problem is not None and result == "accepted":
        out.update_problems.append(f"{step!r} was accepted")


# ------------------------------------------------------------------------------ invariants


async def workflow_task_failures(client: Client, job_id: str) -> list[str]:
    """Every WorkflowTaskFailed event in every run of the job, with its cause and message."""
    found: list[str] = []
    async for wf in client.list_workflows(f'WorkflowId="{job_id}"'):
        history = await client.get_workflow_handle(job_id, run_id=wf.run_id).fetch_history()
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                attrs = event.workflow_task_failed_event_attributes
                found.append(f"run {wf.run_id} event {event.event_id}: {attrs.failure.message[:300]}")
    return found


def rejection_size(entry: Any) -> int:
    return len(entry.reason) + len(json.dumps(entry.payload, default=str))


def unmatched_rejections(sent: list[Signal], status: JobStatus) -> list[Signal]:
    """Invalid signals without their rejection in status, matched in order of sending."""
    entries = list(status.rejected_commands)
    missing: list[Signal] = []
    i = 0
    for sig in sent:
        j = i
        while j < len(entries):
            e = entries[j]
            text = f"{e.command} {e.reason}"
            if (e.command == sig.name or sig.name[:20] in text) and (sig.problem or "") in text:
                break
            j += 1
        if j == len(entries):
            missing.append(sig)
        else:
            i = j + 1
    return missing


async def check_invariants(jobs: JobClient, out: Outcome) -> None:
    problems: list[str] = list(out.update_problems)
    # Every invalid signal recorded, named and short (signals are asynchronous: wait for them),
    # unless a workflow task failed: then the job is wedged and waiting longer shows nothing more.
    seen: list[JobStatus] = []
    task_failures: list[str] = []

    async def settled() -> bool:
        task_failures[:] = await workflow_task_failures(jobs.client, out.job_id)
        if task_failures:
            return True
        st_ = await jobs.status(out.job_id, timeout_s=5.0)
        seen[:] = [st_]
        return not unmatched_rejections(out.sent_invalid, st_)

    try:
        await wait_until(settled, timeout_s=REJECTIONS_SEEN_TIMEOUT_S, what="rejections recorded")
    except AssertionError:
        pass
    problems += [f"WorkflowTaskFailed: {f}" for f in task_failures]
    if not seen:
        problems.append("the status query never answered")
    elif not task_failures:
        for sig in unmatched_rejections(out.sent_invalid, seen[0]):
            problems.append(f"{sig!r} is not in rejected_commands (reason naming {sig.problem!r})")
    for entry in seen[0].rejected_commands if seen else []:
        if rejection_size(entry) > MAX_REJECTION_CHARS:
            problems.append(
                f"rejection of {entry.command[:40]!r} quotes {rejection_size(entry):,} chars: {entry.reason[:150]}..."
            )
    if not task_failures:
        # The job can still be stopped, and closes.
        try:
            if await jobs.final_state(out.job_id) is None:
                await jobs.stop(out.job_id, "force")
            final = await wait_closed(jobs, out.job_id, timeout_s=STOP_CLOSE_TIMEOUT_S)
            if final != "Stopped":
                problems.append(f"stop force ended the job {final}")
        except JobClosed:
            pass  # closed by the sequence itself
        except Exception as exc:  # noqa: BLE001
            problems.append(f"stop force did not close the job: {type(exc).__name__}: {str(exc)[:300]}")
        # Nor did anything fail a workflow task since (stopping included).
        problems += [f"WorkflowTaskFailed: {f}" for f in await workflow_task_failures(jobs.client, out.job_id)]
    assert not problems, "\n".join(problems + ["sequence:"] + out.log)


async def start_job(jobs: JobClient, spec: JobSpec) -> None:
    """Start the job as `JobClient.start` does, but with a short workflow task timeout: a task
    handed to a worker that then shuts down is retried after it, not after the default 10 s."""
    await jobs.client.start_workflow(
        WORKFLOW_TYPE,
        JobInput(spec=spec),
        id=spec.job_id,
        task_queue=jobs.task_queue,
        task_timeout=WORKFLOW_TASK_TIMEOUT,
    )


async def run_sequence(steps_: list[Step], ending: Signal | None, controller: ControllerWorker) -> None:
    jobs = JobClient(controller.client, task_queue=controller.task_queue, command_timeout_s=UPDATE_TIMEOUT_S)
    job_id = unique_job_id("fuzz")
    spec = JobSpec(job_id=job_id, pipeline=PIPELINE, config=JobConfig(checkpoint_interval_s=1.0))
    await start_job(jobs, spec)
    out = Outcome(job_id)

    async def run() -> None:
        await jobs.wait_for_state(job_id, ["Running"], timeout_s=RUNNING_TIMEOUT_S)
        for step in [*steps_, *([ending] if ending else [])]:
            await run_step(step, jobs, controller, out)
        await check_invariants(jobs, out)

    try:
        await asyncio.wait_for(run(), timeout=SEQUENCE_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(
            f"the sequence did not finish within {SEQUENCE_TIMEOUT_S:g} s:\n" + "\n".join(out.log)
        ) from None
    finally:
        with contextlib.suppress(Exception):  # never leave the job open for the next example
            await jobs.client.get_workflow_handle(job_id).terminate("fuzz test cleanup")


# ------------------------------------------------------------------------------ the tests


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # each example takes seconds: no shrinking
)
@given(sequence=sequences())
async def test_random_command_sequences_keep_the_contract(
    controller: ControllerWorker, sequence: tuple[list[Step], Signal | None]
) -> None:
    steps_, ending = sequence
    await run_sequence(steps_, ending, controller)


KNOWN_CASES: dict[str, list[Step]] = {
    "caller_gave_up_waiting": [GiveUpWaiting(("Finished",))],
    "unknown_signal_name": [Signal("pause", ({"mode": "now"},), "pause")],
    "signal_without_argument": [Signal("stop", (), "")],
    "signal_with_two_arguments": [Signal("rescale", ({"parallelism": 2}, {"parallelism": 3}), "")],
    "signal_payload_not_json": [Signal("stop", (raw_json('{"mode": '),), "")],
    "signal_payload_binary": [UNFIT_ARGUMENTS[3]],
    "huge_string": [Signal("stop", ({"mode": HUGE},), "mode")],
    "many_unknown_overrides": [Signal("rescale", ({"overrides": many_unknown_overrides},), "overrides")],
    "non_finite_numbers": [
        Signal("rescale", ({"parallelism": float("inf")},), "parallelism"),
        Signal("update_config", (raw_json('{"ttl_s": NaN}'),), "ttl_s"),
    ],
    "huge_numbers": [Signal("update_config", ({"restart_nonce": 10**30},), "restart_nonce")],
    "worker_restart_between_commands": [
        Signal("rescale", ({"parallelism": 10**9},), "parallelism"),
        RestartWorker(),
        Signal("update_config", ({"checkpoint_interval_s": 1e15},), "checkpoint_interval_s"),
        GiveUpWaiting(("Stopped",)),
        RestartWorker(),
    ],
}


@pytest.mark.parametrize("case", list(KNOWN_CASES))
async def test_known_hostile_sequences(controller: ControllerWorker, case: str) -> None:
    """The sequences that once broke the contract, each alone: a small reproduction apiece."""
    await run_sequence(KNOWN_CASES[case], None, controller)
