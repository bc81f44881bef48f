"""What the dashboard shows of a job, as JSON-ready dicts, and the actions it offers.

Everything is read through `JobClient` (status, spec, history), the job's checkpoint store (as
`sluice checkpoints` reads it) and `sluice.observe.job_metrics`; nothing here talks HTTP. Reads
that cannot change are cached: a run's spec by run id, a store's checkpoint reports until its
list of completed epochs changes, checkpoint durations by epoch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType

from sluice import settings
from sluice.client import JobClient, JobNotFound, SluiceClientError
from sluice.models import TERMINAL_STATES, CheckpointInfo, JobSpec, JobStatus, RescaleCommand
from sluice.observe import job_metrics
from sluice.storage import CheckpointReport, CheckpointStore, report_checkpoints

# The `status` query of an open job; the page polls, so a slow answer is shown as an error soon.
STATUS_TIMEOUT_S = 5.0
# The name of the checkpoint activity in a run's history (sluice/activities/checkpointing.py).
CHECKPOINT_ACTIVITY = "checkpoint"
# Stop modes a user picks on the page ("none", which resumes, is the Restart button's business).
PAGE_STOP_MODES: tuple[str, ...] = ("checkpoint", "graceful", "immediate", "force")


def graph_of(spec: JobSpec, parallelism: dict[str, int]) -> dict[str, Any]:
    """The pipeline as the page draws it: operators in file order (id, type, role, parallelism)
    and the edges between them (default edges filled in: each operator reads the previous one)."""
    effective = {**spec.pipeline.parallelism_for(spec.config), **parallelism}
    operators = [
        {"id": op.id, "type": op.type, "role": op.kind, "parallelism": effective.get(op.id)}
        for op in spec.pipeline.operators
    ]
    edges = [{"from": up, "to": op} for op, ups in spec.pipeline.input_ids().items() for up in ups]
    return {"operators": operators, "edges": edges}


def _checkpoint_row(report: CheckpointReport, duration_s: float | None) -> dict[str, Any]:
    return {**report.as_dict(), "duration_s": duration_s}


class Dashboard:
    """The dashboard's reads and actions over one Temporal namespace."""

    def __init__(self, jobs: JobClient, *, web_ui: Callable[[str], str], state_dir: Path | None = None) -> None:
        self.jobs = jobs
        self.web_ui = web_ui
        self.state_dir = state_dir
        self._specs: dict[tuple[str, str], JobSpec] = {}
        self._reports: dict[tuple[str, str], tuple[list[int], list[CheckpointReport]]] = {}
        self._durations: dict[str, dict[int, float]] = {}
        self._durations_read: dict[str, tuple[str, list[int]]] = {}

    # ------------------------------------------------------------------ reads

    async def list_jobs(self) -> list[dict[str, str]]:
        """Every job of the namespace (latest run of each id), newest first."""
        return [row._asdict() for row in await self.jobs.list()]

    async def _spec(self, job_id: str) -> tuple[str, JobSpec]:
        """(run id, spec) of the job's latest run; `JobNotFound` for an unknown id."""
        run_id = (await self.jobs.describe(job_id)).run_id or ""
        key = (job_id, run_id)
        if key not in self._specs:
            self._specs[key] = await self.jobs.spec(job_id, run_id or None)
        return run_id, self._specs[key]

    async def status(self, job_id: str) -> JobStatus:
        """The job's status: its query; for a closed run whose query nobody answers, the status
        the client rebuilds from the run's input and result."""
        try:
            return await self.jobs.status(job_id, timeout_s=STATUS_TIMEOUT_S)
        except JobNotFound:
            raise
        except SluiceClientError:
            final = await self.jobs.final_state(job_id)
            if final is None or final not in TERMINAL_STATES:
                raise
            return await self.jobs.wait_for_state(job_id, [final], timeout_s=STATUS_TIMEOUT_S)

    async def job(self, job_id: str) -> dict[str, Any]:
        """The job's page data: status, graph, run id and its Temporal Web UI link."""
        run_id, spec = await self._spec(job_id)
        status = await self.status(job_id)
        return {
            "job_id": job_id,
            "run_id": run_id,
            "web_ui": self.web_ui(job_id),
            "status": status.model_dump(mode="json"),
            "graph": graph_of(spec, status.parallelism),
            "stop_modes": list(PAGE_STOP_MODES),
        }

    async def metrics(self, job_id: str) -> dict[str, Any]:
        """Live per-operator records/s, watermark lag and backpressure (`sluice.observe`)."""
        return (await job_metrics(self.jobs, job_id)).model_dump(mode="json")

    async def checkpoints(self, job_id: str) -> dict[str, Any]:
        """The job's completed checkpoints in its store (epoch, time, size, verified) with the
        duration of each one the current run took (older runs' durations are not kept)."""
        run_id, spec = await self._spec(job_id)
        status = await self.status(job_id)
        url = status.checkpoint_url or spec.checkpoint_url or settings.default_checkpoint_url(
            settings.state_dir(self.state_dir)
        )
        store = CheckpointStore(url, job_id)
        epochs = await asyncio.to_thread(store.completed_epochs)
        cached = self._reports.get((url, job_id))
        if cached is None or cached[0] != epochs:
            # Verifying reads every state file: only when the list of checkpoints changed.
            reports = await asyncio.to_thread(report_checkpoints, store)
            self._reports[(url, job_id)] = (epochs, reports)
        else:
            reports = cached[1]
        durations = await self._checkpoint_durations(job_id, run_id, epochs)
        return {
            "job_id": job_id,
            "checkpoint_url": url,
            "checkpoints": [_checkpoint_row(r, durations.get(r.epoch)) for r in reversed(reports)],
        }

    async def _checkpoint_durations(self, job_id: str, run_id: str, epochs: list[int]) -> dict[int, float]:
        """Epoch -> seconds, from the checkpoint activities' results in the run's history (read
        again only when the run or its list of checkpoints changed)."""
        known = self._durations.setdefault(job_id, {})
        if self._durations_read.get(job_id) == (run_id, epochs):
            return known
        handle = self.jobs.client.get_workflow_handle(job_id, run_id=run_id or None)
        checkpoint_events: set[int] = set()
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                if event.activity_task_scheduled_event_attributes.activity_type.name == CHECKPOINT_ACTIVITY:
                    checkpoint_events.add(event.event_id)
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                done = event.activity_task_completed_event_attributes
                if done.scheduled_event_id not in checkpoint_events or not done.result.payloads:
                    continue
                (info,) = await self.jobs.client.data_converter.decode(done.result.payloads, [CheckpointInfo])
                known[info.epoch] = info.duration_s
        # Only the checkpoints still in the store are shown: forget the others (a long-lived
        # dashboard would otherwise keep one entry per checkpoint ever taken).
        kept = set(epochs)
        self._durations[job_id] = known = {e: d for e, d in known.items() if e in kept}
        self._durations_read[job_id] = (run_id, epochs)
        return known

    # ------------------------------------------------------------------ actions

    async def stop(self, job_id: str, mode: str) -> str:
        """Ask the job to stop in `mode`; returns what to tell the user."""
        if mode not in PAGE_STOP_MODES:
            raise ValueError(f"unknown stop mode {mode!r}; expected one of {', '.join(PAGE_STOP_MODES)}")
        await self.jobs.stop(job_id, mode)
        return f"stop ({mode}) accepted"

    async def rescale(self, job_id: str, parallelism: int | None, overrides: dict[str, int] | None) -> str:
        """Rescale the job (checkpoint, then reschedule); returns what to tell the user."""
        cmd = RescaleCommand(parallelism=parallelism, overrides=overrides)  # validates before any call
        await self.jobs.rescale(job_id, parallelism=cmd.parallelism, overrides=cmd.overrides)
        what = f"parallelism {cmd.parallelism}" if cmd.parallelism else ""
        if cmd.overrides:
            what = ", ".join([*([what] if what else []), *(f"{k}={v}" for k, v in cmd.overrides.items())])
        return f"rescale to {what} accepted"

    async def restart(self, job_id: str, force: bool, ignore_state: bool) -> str:
        """Restart the job (an open one in place, a closed one as a new run); returns what to tell."""
        status = await self.jobs.restart(job_id, force=force, ignore_state=ignore_state)
        return "a new run started" if status is None else f"restart accepted; state {status.state}"
