"""What every controller activity shares: where state lives, the secret, the scheduler, runner access."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.auth import runner_token
from sluice.models import RunnerInfo
from sluice.runner.client import RunnerClient
from sluice.schedulers.process import ProcessScheduler
from sluice.settings import default_checkpoint_url
from sluice.workflows.constants import USER_ERROR_TYPE

HEARTBEAT_EVERY_S = 1.0


@dataclass
class ControllerContext:
    """Shared by the activities of one controller worker process."""

    state_dir: Path
    secret: bytes
    scheduler: ProcessScheduler

    @property
    def default_checkpoint_url(self) -> str:
        return default_checkpoint_url(self.state_dir)

    @asynccontextmanager
    async def runner_clients(
        self, job_id: str, generation: int, runners: list[RunnerInfo]
    ) -> AsyncIterator[list[RunnerClient]]:
        """Authenticated clients for one generation's runners, closed on exit."""
        token = runner_token(self.secret, job_id, generation)
        async with AsyncExitStack() as stack:
            yield [await stack.enter_async_context(RunnerClient(r, job_id, token)) for r in runners]


def user_error(message: str) -> ApplicationError:
    """A failure retrying cannot fix: the job goes to Failed with domain `user`."""
    return ApplicationError(message, type=USER_ERROR_TYPE, non_retryable=True)


@asynccontextmanager
async def heartbeating(details: Callable[[], Any] = lambda: None) -> AsyncIterator[None]:
    """Heartbeat in the background while the body waits, so cancellation and a dead worker are seen.

    Not in a local activity (a periodic checkpoint of a run with the local-checkpoints patch): the
    server knows nothing of it, so the worker would only log a failed heartbeat every second; its
    cancellation reaches it from the workflow in the same worker, and a dead worker is noticed by
    the workflow task's timeout instead."""
    if activity.info().is_local:
        yield
        return

    async def beat() -> None:
        while True:
            activity.heartbeat(details())
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
