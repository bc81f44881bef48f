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
class SavepointRequests:
    """Pending and finished `savepoint` updates of one run, by ticket (1, 2, ... per run)."""

    queue: list[tuple[int, str | None]] = field(default_factory=list)  # (ticket, name) not yet started
    inflight: int | None = None  # the ticket whose checkpoint is in flight
    results: dict[int, SavepointInfo | str] = field(default_factory=dict)  # the savepoint, or why not
    issued: int = 0

    def add(self, name: str | None) -> int:
        self.issued += 1
        self.queue.append((self.issued, name))
        return self.issued

    def names_pending(self) -> set[str]:
        return {name for _, name in self.queue if name is not None}

    def next(self) -> tuple[int, str | None]:
        ticket, name = self.queue.pop(0)
        self.inflight = ticket
        return ticket, name

    def finish(self, outcome: SavepointInfo | str) -> None:
        """The in-flight savepoint's checkpoint ended: its savepoint, or why there is none."""
        if self.inflight is not None:
            self.results[self.inflight] = outcome
            self.inflight = None

    def withdraw(self, ticket: int) -> None:
        self.queue = [(t, n) for t, n in self.queue if t != ticket]
        if self.inflight == ticket:
            self.inflight = None
