"""Stop and teardown: graceful or immediate stop through the runners; force kills them."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.activities.context import ControllerContext, heartbeating
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.models import StopInput, TeardownInput
from sluice.runner.client import RunnerClient

FINISH_POLL_S = 0.1


async def wait_all_finished(clients: list[RunnerClient], timeout_s: float) -> None:
    """Return once every task on every runner is finished; raise if one failed or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        states = await asyncio.gather(*(c.health() for c in clients))
        tasks = {
            f"{c.info.runner_id}:{label}": s
            for c, health in zip(clients, states)
            for label, s in (health.get("tasks") or {}).items()
        }
        failed = sorted(k for k, s in tasks.items() if s == "failed")
        if failed:
            raise ApplicationError(f"tasks failed while finishing: {', '.join(failed)}")
        if all(s == "finished" for s in tasks.values()):
            return
        if loop.time() >= deadline:
            pending = sorted(k for k, s in tasks.items() if s != "finished")
            raise ApplicationError(
                f"tasks not finished after {timeout_s:g} s: {', '.join(pending[:10])}", non_retryable=True
            )
        await asyncio.sleep(FINISH_POLL_S)


class StopActivities:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    @activity.defn(name="stop_runners")
    async def stop_runners(self, inp: StopInput) -> None:
        async with heartbeating(), self.ctx.runner_clients(inp.job_id, inp.generation, inp.runners) as clients:
            try:
                await asyncio.gather(*(c.stop(inp.mode) for c in clients))
                await wait_all_finished(clients, inp.finish_timeout_s)
            except (RunnerUnavailable, RunnerRefused) as e:
                raise ApplicationError(f"stop {inp.mode}: {e}", non_retryable=True) from None

    @activity.defn(name="teardown_runners")
    async def teardown_runners(self, inp: TeardownInput) -> int:
        return await self.ctx.scheduler.stop_runners(inp.job_id, generation=inp.generation)
