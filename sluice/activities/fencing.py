"""Fencing by generation, as the controller activities use it.

A new generation raises the store's fence before it recovers sinks or starts a task
(:func:`raise_generation_fence`); from then on the store refuses every publish (manifest,
committed sink output) of an older generation with :class:`~sluice.errors.StaleGeneration`.
An activity that is refused fails with :func:`stale_generation_error`: not retried (its generation
stays superseded), with the store's message, so the workflow records why and recovers.
"""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.errors import StaleGeneration
from sluice.storage import CheckpointStore

#: the ApplicationError type of an activity refused because its generation is superseded.
#: Details: [{"job_id", "generation", "fence"}].
STALE_GENERATION_TYPE = "StaleGeneration"


def stale_generation_error(e: StaleGeneration) -> ApplicationError:
    """The activity failure for a publish the fence refused: non-retryable, the store's message."""
    return ApplicationError(
        str(e),
        {"job_id": e.job_id, "generation": e.generation, "fence": e.fence},
        type=STALE_GENERATION_TYPE,
        non_retryable=True,
    )


async def raise_generation_fence(store: CheckpointStore, generation: int) -> None:
    """Fence the job at `generation`, which is starting (call from an activity of that generation).

    Its start time is the server's time of scheduling this activity's first attempt, so a retry
    raises the same fence again (idempotent) and a new run of the job (numbering generations from 1
    again) is told from an older one still running somewhere. Raises the non-retryable
    :func:`stale_generation_error` when a newer generation has already started.
    """
    started_at = activity.info().scheduled_time
    try:
        await asyncio.to_thread(store.raise_fence, generation, started_at=started_at)
    except StaleGeneration as e:
        raise stale_generation_error(e) from None
