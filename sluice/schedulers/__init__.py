"""Schedulers start and kill runner processes for a job generation.

`process` (local subprocesses, the default) lives in `sluice.schedulers.process`. Every scheduler
offers the `Scheduler` protocol below, so activities do not care which one runs the runners.
"""

from __future__ import annotations

from typing import Protocol

from sluice.models import RunnerInfo


class RunnerStartError(Exception):
    """Runners of a generation could not be started (a process exited early, or the startup
    timeout passed); the message carries the tail of the failing runner's log. Retryable."""


class Scheduler(Protocol):
    """What the scheduling and stopping activities need from a scheduler."""

    async def start_runners(
        self, job_id: str, generation: int, count: int, slots: int, timeout_s: float
    ) -> list[RunnerInfo]: ...

    async def stop_runners(
        self,
        job_id: str,
        *,
        generation: int | None = None,
        below_generation: int | None = None,
        grace_s: float = 5.0,
    ) -> int: ...

    def runners(self, job_id: str) -> list[RunnerInfo]: ...


__all__ = ["RunnerStartError", "Scheduler"]
