"""A controller worker killed in each step of a pipeline upgrade: the upgrade resumes exactly.

Two `sluice worker` processes (control only) and one `sluice host` (the runners, so that killing a
controller worker kills no runner) on a dev server of this module's own run a bounded job; the job is
upgraded to a version with one more (pass-through) operator, and the worker holding the job's
sticky workflow task is SIGKILLed while the upgrade waits for approval, while the old generation
takes its then-stop savepoint (slowed by slow batches), while the new generation is being
scheduled (its runners slow to open), or while it is in its health window (output held back).
Another case kills it in the health window of a version that
then fails: the surviving worker rolls it back. Each case checks what a user would: the upgrade
ends as it should (completed, or rolled back with the reason), the job finishes, every run's
history replays, and the committed output is exactly the generated rows: none lost, none twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowUpdateStage

from sluice.client import JobClient, connect
from sluice.devserver import DevServer
from sluice.models import JobStatus, PipelineSpec, UpgradeRequest
from sluice.settings import SECRET_ENV, load_secret
from sluice.workflows.job import JobWorkflow
from tests.conftest import run_sluice
from tests.e2e_helpers import (
    assert_exact_output,
    describe_status,
    expected_rows,
    generator_pipeline,
    job_spec,
    read_committed_rows,
    sink_path,
    stop_job_quietly,
    wait_status,
    wait_until,
)
from tests.histories.corpus import replay_history
from tests.histories.scenarios import last_event_id, run_ids, sticky_holder
from tests.pipeline_functions import FAIL_MARKER_ENV

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90.0
FAILOVER_TIMEOUT_S = 90.0
END_TIMEOUT_S = 180.0
WORKERS = 2
SLOW_BATCHES = "tests.pipeline_functions:slow_batches"
FAILS_WHILE_MARKER = "tests.pipeline_functions:fails_while_marker"
SLOW_ENV = {"SLUICE_TEST_SLOW_BATCH": "0.3"}  # per batch: a savepoint's barrier waits behind batches
LIMIT, RATE = 400, 20.0  # per split: ~20 s of stream, longer than the upgrade and the failover
HEALTH_WINDOW_S = 8.0


@dataclass(frozen=True)
class Case:
    name: str
    new_operator: dict[str, Any]
    reach: Callable[[JobClient, str], Awaitable[None]]  # the upgrade step the kill lands in
    require_approval: bool = False
    fails_after_kill: bool = False  # the new version then fails: the survivor rolls back
    env: dict[str, str] = field(default_factory=dict)


async def _phase(job_client: JobClient, job_id: str, predicate: Callable[[JobStatus], bool], what: str) -> None:
    await wait_status(job_client, job_id, predicate, timeout_s=START_TIMEOUT_S, what=what)


async def awaiting_approval(job_client: JobClient, job_id: str) -> None:
    await _phase(job_client, job_id, lambda s: s.upgrade is not None and s.upgrade.phase == "awaiting_approval",
                 "the upgrade waiting for approval")  # fmt: skip


async def taking_savepoint(job_client: JobClient, job_id: str) -> None:
    await _phase(job_client, job_id, lambda s: s.state == "Upgrading", "Upgrading (the savepoint in flight)")


async def in_health_window(job_client: JobClient, job_id: str) -> None:
    await _phase(job_client, job_id, lambda s: s.upgrade is not None and s.upgrade.phase == "health_window"
                 and len(s.upgrade.deferred_epochs) >= 1, "a held-back checkpoint in the health window")  # fmt: skip


async def switching(job_client: JobClient, job_id: str) -> None:
    await _phase(job_client, job_id, lambda s: s.state == "Scheduling" and s.upgrade is not None
                 and s.upgrade.phase == "switching", "Scheduling the new generation")  # fmt: skip


PASS_THROUGH = {"id": "keep_all", "type": "filter", "expr": "value >= 0"}
# A pass-through user function: the new generation's runners import tests.pipeline_functions,
# which SLUICE_TEST_SLOW_OPEN makes slow to open (the old pipeline imports nothing of it).
SLOW_TO_OPEN = {"id": "slow_open", "type": "map", "fn": SLOW_BATCHES}
CASES = [
    Case("awaiting_approval", PASS_THROUGH, awaiting_approval, require_approval=True),
    Case("savepoint", {"id": "slow2", "type": "map", "fn": SLOW_BATCHES}, taking_savepoint, env=SLOW_ENV),
    Case("switching", SLOW_TO_OPEN, switching, env={"SLUICE_TEST_SLOW_OPEN": "4"}),
    Case("health_window", PASS_THROUGH, in_health_window),
    Case("health_window_then_failure", {"id": "new_map", "type": "map", "fn": FAILS_WHILE_MARKER},
         in_health_window, fails_after_kill=True),  # fmt: skip
]


@pytest.fixture(scope="module")
def upgrade_server(dev_server_factory: Callable[..., DevServer]) -> DevServer:
    return dev_server_factory()


def _pipelines(case: Case, state_dir: Path) -> tuple[PipelineSpec, PipelineSpec]:
    transforms = (("map", SLOW_BATCHES),) if "SLUICE_TEST_SLOW_BATCH" in case.env else ()
    old = generator_pipeline(f"upgrade-{case.name}".replace("_", "-"), state_dir / "out", splits=2, limit=LIMIT,
                             rate=RATE, keys=8, transforms=transforms)  # fmt: skip
    ops = [op.model_dump(by_alias=True, exclude_none=True) for op in old.operators]
    new = PipelineSpec.model_validate({**old.model_dump(), "operators": [*ops[:-1], case.new_operator, ops[-1]]})
    return old, new


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_controller_killed_during_an_upgrade(
    case: Case, upgrade_server: DevServer, process_worker_factory: Callable[..., Any], state_dir: Path
) -> None:
    marker = state_dir / "new-version-fails"
    env = {**case.env, FAIL_MARKER_ENV: str(marker)}
    client = await connect(upgrade_server.address, "default")
    job_client = JobClient(client)
    # Runners on a host of their own: a controller worker's death alone must not look like the
    # new generation failing (a lost host in the health window rolls an upgrade back, rightly).
    secret = load_secret(state_dir).decode()
    host = run_sluice(upgrade_server.address, state_dir / "host", "host", "--slots", "8", "--host-id", "runners",
                      env={**env, SECRET_ENV: secret})  # fmt: skip
    workers = [
        process_worker_factory(state_dir, address=upgrade_server.address, env=env, args=["--local-slots", "0"])
        for _ in range(WORKERS)
    ]
    old, new = _pipelines(case, state_dir)
    spec = job_spec(old, state_dir, checkpoint_interval_s=1.0)
    job_id = spec.job_id
    since = datetime.now(UTC)
    await job_client.start(spec)
    try:
        await wait_status(job_client, job_id, lambda s: s.state == "Running" and s.epoch >= 1,
                          timeout_s=START_TIMEOUT_S, what="Running with a checkpoint")  # fmt: skip
        request = UpgradeRequest(pipeline=new, require_approval=case.require_approval, health_window_s=HEALTH_WINDOW_S)
        await client.get_workflow_handle(job_id).start_update(
            "upgrade", request, wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )
        await case.reach(job_client, job_id)
        victim = await sticky_holder(client, job_id, workers)
        killed_after = await last_event_id(client, job_id)
        victim.kill()
        assert all(w.alive() for w in workers if w is not victim), "the other controller worker died too"
        if case.require_approval:
            await job_client.decide_upgrade(job_id, approve=True)  # served by the survivor
        if case.fails_after_kill:
            marker.write_text("fail")
        wanted = "rolled_back" if case.fails_after_kill else "completed"
        st = await wait_status(job_client, job_id, lambda s: s.upgrade is not None and s.upgrade.phase == wanted,
                               timeout_s=FAILOVER_TIMEOUT_S + END_TIMEOUT_S, what=f"the upgrade {wanted}")  # fmt: skip
        assert st.upgrade is not None
        if case.fails_after_kill:
            assert st.upgrade.reason and st.upgrade.reason.startswith("rollback: "), st.upgrade
        await wait_status(job_client, job_id, lambda s: s.state == "Finished", timeout_s=END_TIMEOUT_S,
                          what="Finished")  # fmt: skip
        await wait_until(lambda: job_client.final_state(job_id), timeout_s=FAILOVER_TIMEOUT_S, what="run closed")
        done = await job_client.status(job_id)
        assert done.state == "Finished", describe_status(done)
        assert (case.new_operator["id"] in done.parallelism) != case.fails_after_kill, describe_status(done)
        assert await last_event_id(client, job_id) > killed_after
        for rid in await run_ids(client, job_id, since):
            history = await client.get_workflow_handle(job_id, run_id=rid).fetch_history()
            failure, _ = await replay_history(history, [JobWorkflow])
            assert failure is None, f"run {rid} does not replay: {type(failure).__name__}: {failure}"
    finally:
        await stop_job_quietly(job_client, job_id)
        host.stop()
    # Every generated row exactly once, across the switch (and the rollback) and the failover.
    reference = generator_pipeline(old.name, sink_path(old), splits=2, limit=LIMIT, rate=RATE, keys=8, transforms=())
    assert_exact_output(read_committed_rows(sink_path(old)), expected_rows(reference))
