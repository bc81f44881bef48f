"""What a job knows of its current generation's runners, from its hosts' reports (pure).

Hosts watch their own runners and signal the job (`runner_report`); the registry signals
`host_lost`. This model folds those signals into the job's picture of the generation, and says
when something needs the workflow, exactly as the monitor activity did: a task failed, a runner
was lost, every source or every task finished. It is carried across continue-as-new, so a report
that arrived before a new run is not forgotten. Only reports of the current generation count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from sluice.engine.compiler import assign
from sluice.hosts.contracts import HostLost, RunnerReport
from sluice.models import MonitorResult, Program, RunnerInfo, SubtaskRef, operator_role

WatchKind = Literal["task_failed", "runner_lost", "sources_finished", "all_finished"]


class RunnerView(BaseModel):
    """The current generation as reported: subtask states, the first failure, the first loss."""

    generation: int = 0
    running: bool = False  # the generation reached Running (its tasks all started)
    tasks: dict[str, str] = Field(default_factory=dict)
    failed: MonitorResult | None = None
    lost: MonitorResult | None = None

    def apply_report(self, report: RunnerReport, program: Program | None, runners: list[RunnerInfo]) -> bool:
        """Fold one host report in; False if it is about another generation (ignored)."""
        if report.generation != self.generation:
            return False
        self.tasks.update(report.tasks)
        if report.kind == "task_failed" and self.failed is None:
            self.failed = MonitorResult(
                kind="task_failed", message=report.message, retryable=report.retryable,
                domain=report.domain, operator=report.operator, traceback=report.traceback,
            )  # fmt: skip
        elif report.kind == "lost" and report.hung and not self.running:
            pass  # silent while its tasks start: the start's own timeout (task_startup_timeout_s) rules
        elif report.kind == "lost" and self.lost is None:
            runner = next((r for r in runners if r.runner_id == report.runner_id), None)
            ops = operators_of(program, report.ran, runner, runners)
            self.lost = MonitorResult(
                kind="runner_lost", message=f"{report.message}; it ran {', '.join(ops) if ops else 'no subtasks'}"
            )
        return True

    def apply_host_lost(self, lost: HostLost, program: Program | None, runners: list[RunnerInfo]) -> bool:
        """A host of this generation was declared lost: its runners are lost with it."""
        mine = [r for r in runners if r.host_id == lost.host_id]
        if not mine:
            return False
        if self.lost is None:
            ops = [op for r in mine for op in operators_of(program, [], r, runners)]
            names = ", ".join(r.runner_id for r in mine)
            self.lost = MonitorResult(
                kind="runner_lost",
                message=f"{lost.reason}; its runners {names} ran {', '.join(ops) if ops else 'no subtasks'}",
            )
        return True

    def outcome(self, watch: list[WatchKind], program: Program | None) -> MonitorResult | None:
        """What needs the workflow under this watch, or None (the order of the monitor's checks)."""
        if "task_failed" in watch:
            if self.failed is not None:
                return self.failed
            bad = sorted(label for label, s in self.tasks.items() if s == "failed")
            if bad:
                return MonitorResult(kind="task_failed", message=f"subtasks {', '.join(bad)} failed")
        if "runner_lost" in watch and self.lost is not None:
            return self.lost
        if program is None:
            return None
        labels = [s.label() for s in program.subtasks()]
        if "all_finished" in watch and labels and all(self.tasks.get(label) == "finished" for label in labels):
            return MonitorResult(kind="all_finished", message="every task finished")
        if "sources_finished" in watch:
            sources = source_labels(program)
            if sources and all(self.tasks.get(label) in ("source_finished", "finished") for label in sources):
                return MonitorResult(kind="sources_finished", message="every source reached its end")
        return None


def source_labels(program: Program) -> list[str]:
    return [
        s.label()
        for s in program.subtasks()
        if operator_role(program.operators[program.chains[s.chain].operators[0]]) == "source"
    ]


def operators_of(
    program: Program | None, labels: list[str] | set[str], runner: RunnerInfo | None, runners: list[RunnerInfo]
) -> list[str]:
    """``op[index]`` of every subtask a runner ran: as reported (labels), else as assigned."""
    if program is None:
        return []
    chosen = set(labels)
    if not chosen and runner is not None:
        try:
            chosen = {
                ref.label() for a in assign(program, runners) if a.runner_id == runner.runner_id for ref in a.subtasks
            }
        except ValueError:  # naming the operators must never hide the loss
            chosen = set()
    refs: list[SubtaskRef] = []
    for label in chosen:
        chain, _, index = label.partition("/")
        if chain.isdigit() and index.isdigit() and int(chain) < len(program.chains):
            refs.append(SubtaskRef(chain=int(chain), index=int(index)))
    refs.sort(key=lambda r: (r.chain, r.index))
    return [f"{op}[{r.index}]" for r in refs for op in program.chains[r.chain].operators]

# Monitor watch sets: in Running every event matters; while stopping or taking a final
# checkpoint, finished tasks are expected and only failures need the workflow.
WATCH_ALL: list[WatchKind] = ["task_failed", "runner_lost", "sources_finished", "all_finished"]
WATCH_FAILURES: list[WatchKind] = ["task_failed", "runner_lost"]
