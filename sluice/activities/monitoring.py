"""Monitor: watch one generation's runners and return only when something needs the workflow.

What it returns names what a user needs to act: a failed task's operator, message and user
traceback (as the runner reported them), and for a lost runner its id, pid and host, why it is
considered lost (silent for the heartbeat timeout: hung, stopped or cut off; or its connection
closed: the process exited) and the operators it ran.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from temporalio import activity

from sluice.activities.context import ControllerContext
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.models import MonitorInput, MonitorResult, Program, RunnerEvent, RunnerInfo
from sluice.runner.client import RunnerClient, RunnerSilent
from sluice.workflows.runner_view import operators_of, source_labels

HEARTBEAT_EVERY_S = 1.0


@dataclass
class JobView:
    """The controller's picture of a generation: each subtask's state and the latest metrics."""

    program: Program
    tasks: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    ran: dict[str, set[str]] = field(default_factory=dict)  # runner id -> subtask labels it reported

    def operators_of(self, runner: RunnerInfo, runners: list[RunnerInfo]) -> list[str]:
        """``op[index]`` of every subtask `runner` ran: as it reported them, else as assigned."""
        return operators_of(self.program, self.ran.get(runner.runner_id) or set(), runner, runners)

    def source_labels(self) -> set[str]:
        return set(source_labels(self.program))

    def all_labels(self) -> set[str]:
        return {s.label() for s in self.program.subtasks()}

    def sources_finished(self) -> bool:
        return all(self.tasks.get(label) in ("source_finished", "finished") for label in self.source_labels())

    def all_finished(self) -> bool:
        return all(self.tasks.get(label) == "finished" for label in self.all_labels())

    def summary(self) -> dict[str, object]:
        states: dict[str, int] = {}
        for s in self.tasks.values():
            states[s] = states.get(s, 0) + 1
        totals: dict[str, float] = {}
        for m in self.metrics.values():
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v
        return {"tasks": states, "metrics": totals}


class MonitorActivities:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    @activity.defn(name="monitor_runners")
    async def monitor_runners(self, inp: MonitorInput) -> MonitorResult:
        view = JobView(program=inp.program)
        queue: asyncio.Queue[tuple[RunnerInfo, RunnerEvent | Exception]] = asyncio.Queue()

        async def watch(client: RunnerClient, info: RunnerInfo) -> None:
            try:
                async for event in client.events(heartbeat_timeout_s=inp.heartbeat_timeout_s):
                    await queue.put((info, event))
            except (RunnerUnavailable, RunnerRefused) as e:
                await queue.put((info, e))

        async with self.ctx.runner_clients(inp.job_id, inp.generation, inp.runners) as clients:
            watchers = [asyncio.create_task(watch(c, r)) for c, r in zip(clients, inp.runners)]
            try:
                return await self._watch(inp, view, queue)
            finally:
                for w in watchers:
                    w.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)

    async def _watch(
        self,
        inp: MonitorInput,
        view: JobView,
        queue: asyncio.Queue[tuple[RunnerInfo, RunnerEvent | Exception]],
    ) -> MonitorResult:
        watch = set(inp.watch)
        while True:
            activity.heartbeat(view.summary())
            try:
                info, item = await asyncio.wait_for(queue.get(), timeout=HEARTBEAT_EVERY_S)
            except TimeoutError:
                continue
            if isinstance(item, Exception):
                if "runner_lost" in watch:
                    return MonitorResult(kind="runner_lost", message=lost_message(info, item, view, inp.runners))
                continue
            event = item
            if event.tasks is not None:
                view.tasks.update(event.tasks)
                if event.tasks:
                    view.ran[info.runner_id] = set(event.tasks)
            if event.metrics is not None:
                view.metrics[info.runner_id] = event.metrics
            if event.subtask is not None:
                label = event.subtask.label()
                if event.kind == "task_failed":
                    view.tasks[label] = "failed"
                elif event.kind == "task_finished":
                    view.tasks[label] = "finished"
                elif event.kind == "source_finished":
                    view.tasks[label] = "source_finished"
                elif event.kind == "task_started":
                    view.tasks[label] = "running"
            if event.kind == "task_failed" and "task_failed" in watch:
                return MonitorResult(
                    kind="task_failed",
                    message=event.message or f"subtask {event.subtask} failed",
                    retryable=event.retryable,
                    domain=event.domain,
                    operator=event.operator,
                    traceback=event.traceback,
                )
            # A failure seen only in a heartbeat's task states (its event was missed) still counts;
            # not in `hello`, which the runner follows with the failure events it kept.
            if event.kind == "heartbeat" and "failed" in view.tasks.values() and "task_failed" in watch:
                bad = sorted(label for label, s in view.tasks.items() if s == "failed")
                return MonitorResult(kind="task_failed", message=f"subtasks {', '.join(bad)} failed")
            if "all_finished" in watch and view.all_finished():
                return MonitorResult(kind="all_finished", message="every task finished")
            if "sources_finished" in watch and view.sources_finished():
                return MonitorResult(kind="sources_finished", message="every source reached its end")


def lost_message(info: RunnerInfo, error: Exception, view: JobView, runners: list[RunnerInfo]) -> str:
    """`runner r-1 (pid 123 on 127.0.0.1) sent nothing for 10 s (hung, stopped or cut off); it ran
    window[0], out[0]`, or for a closed stream `... is gone: <why>; it ran ...`."""
    who = f"runner {info.runner_id} ({f'pid {info.pid} on ' if info.pid else 'on '}{info.host})"
    if isinstance(error, RunnerSilent):
        why = f"sent nothing for {error.silent_s:g} s (hung, stopped or cut off)"
    else:
        text = str(error)
        prefix = f"runner {info.runner_id} ({info.control_url}) event stream: "
        why = f"is gone: {text[len(prefix):] if text.startswith(prefix) else text}"
    ops = view.operators_of(info, runners)
    return f"{who} {why}; it ran {', '.join(ops) if ops else 'no subtasks'}"
