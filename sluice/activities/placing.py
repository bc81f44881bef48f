"""Reserve and release runner slots in the host registry, for a job workflow.

The job workflow cannot call another workflow's updates itself; these activities do it through
the worker's own client. A refusal by the registry (a stale generation, a malformed request) is
not retryable: asking again cannot change the answer.
"""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.activities.context import ControllerContext
from sluice.hosts import registry_client
from sluice.hosts.contracts import (
    ACTIVITY_PLACE_RUNNERS,
    ACTIVITY_RELEASE_SLOTS,
    Placement,
    PlaceRequest,
    ReleaseRequest,
)

#: Error type of a placement or release the registry refused (not retryable).
PLACEMENT_REJECTED_TYPE = "PlacementRejected"


class PlacingActivities:
    """The controller's side of slot reservations (the registry itself is a workflow)."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    @activity.defn(name=ACTIVITY_PLACE_RUNNERS)
    async def place_runners(self, req: PlaceRequest) -> Placement:
        """Reserve slots for the job's generation; a Placement with shares, or a waiting reason
        (then nothing is reserved and the job gets `slots_freed` when asking again may help)."""
        try:
            return await registry_client.place(activity.client(), req)
        except registry_client.RegistryRejected as e:
            raise ApplicationError(str(e), type=PLACEMENT_REJECTED_TYPE, non_retryable=True) from None

    @activity.defn(name=ACTIVITY_RELEASE_SLOTS)
    async def release_slots(self, req: ReleaseRequest) -> int:
        """Release the job's reservations (all, or generations below a number); runners released."""
        try:
            return await registry_client.release(activity.client(), req)
        except registry_client.RegistryRejected as e:
            raise ApplicationError(str(e), type=PLACEMENT_REJECTED_TYPE, non_retryable=True) from None
