"""Test doubles for the host registry tests: a job workflow that records every signal it gets,
and the host side of leases (no runners, no `sluice host` process).

A module of its own (not the test module) so the workflow sandbox imports only what it needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RawValue

with workflow.unsafe.imports_passed_through():
    from sluice.hosts.contracts import HOST_HEARTBEAT_EVERY_S, HOST_LEASE

#: Registered under a test-only name, so nothing can mistake it for a JobWorkflow.
FAKE_JOB_WORKFLOW_TYPE = "TestFakeJobWorkflow"
FAKE_JOB_FINISH_SIGNAL = "test_finish"
FAKE_JOB_QUERY = "received"


@workflow.defn(name=FAKE_JOB_WORKFLOW_TYPE)
class FakeJobWorkflow:
    """Stands for a job: keeps every signal (any name, any or no payload) with the workflow
    time it arrived, until told to finish."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.finished = False

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.finished)

    @workflow.signal(name=FAKE_JOB_FINISH_SIGNAL)
    def finish(self) -> None:
        self.finished = True

    @workflow.signal(dynamic=True)
    def any_signal(self, name: str, args: Sequence[RawValue]) -> None:
        payload = workflow.payload_converter().from_payload(args[0].payload) if args else None
        self.received.append({"name": name, "payload": payload, "at": workflow.now().isoformat()})

    @workflow.query(name=FAKE_JOB_QUERY)
    def received_signals(self) -> list[dict[str, Any]]:
        return self.received


class FakeHost:
    """The lease side of one host process: heartbeats each lease until cancelled.

    `freeze()` makes it stop heartbeating while still holding its leases (a hung process);
    `thaw()` lets frozen leases return so the worker can shut down.
    """

    def __init__(self) -> None:
        self.leases_taken = 0
        self._frozen = asyncio.Event()
        self._thawed = asyncio.Event()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._thawed.set()

    @activity.defn(name=HOST_LEASE)
    async def lease(self, host_id: str) -> None:
        self.leases_taken += 1
        while not self._frozen.is_set():
            activity.heartbeat()
            await asyncio.sleep(HOST_HEARTBEAT_EVERY_S)  # cancellation arrives here
        await self._thawed.wait()
