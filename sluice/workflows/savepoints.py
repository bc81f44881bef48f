"""Savepoints on the workflow side: the queue of `savepoint` updates that Running serves.

A request waits in the queue until Running has no checkpoint in flight, then its checkpoint is
taken (as a workflow step: the activity `checkpoint`, summary "savepoint NAME"); the update
returns the savepoint, or fails when the job leaves Running before it was taken. Nothing here
is carried across continue-as-new: Running never continues as new while requests wait, and a
continue-as-new waits for every update handler to finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.models import SavepointInfo


@dataclass
class Pending:
    ticket: int
    name: str | None  # None: the default name
    periodic: bool = False  # taken on the job's savepoint interval: nobody waits for it


@dataclass
class SavepointRequests:
    """Pending and finished savepoints of one run, by ticket (1, 2, ... per run)."""

    queue: list[Pending] = field(default_factory=list)  # not yet started
    inflight: Pending | None = None  # the one whose checkpoint is in flight
    results: dict[int, SavepointInfo | str] = field(default_factory=dict)  # for the updates waiting
    issued: int = 0

    def add(self, name: str | None, *, periodic: bool = False) -> int:
        self.issued += 1
        self.queue.append(Pending(self.issued, name, periodic))
        return self.issued

    def names_pending(self) -> set[str]:
        return {p.name for p in self.queue if p.name is not None}

    def periodic_pending(self) -> bool:
        return any(p.periodic for p in (*self.queue, self.inflight) if p is not None)

    def next(self) -> Pending:
        self.inflight = self.queue.pop(0)
        return self.inflight

    def in_flight(self, ticket: int) -> bool:
        return self.inflight is not None and self.inflight.ticket == ticket

    def finish(self, outcome: SavepointInfo | str) -> None:
        """The in-flight savepoint's checkpoint ended: its savepoint, or why there is none."""
        done, self.inflight = self.inflight, None
        if done is None:
            return
        if done.periodic:
            if not isinstance(outcome, SavepointInfo):
                workflow.logger.warning("periodic savepoint not taken: %s", outcome)
            return
        self.results[done.ticket] = outcome

    def withdraw(self, ticket: int) -> None:
        self.queue = [p for p in self.queue if p.ticket != ticket]
        if self.in_flight(ticket):
            self.inflight = None
