"""What differs between an existing job and a pipeline file started for it again.

`sluice run FILE` / `sluice start FILE` on a job that exists resume it; before they do, they tell
the user what the file would change: the pipeline itself (operators added, removed or changed,
which a resume refuses: that is `sluice upgrade`'s job) or only parallelism (where the job keeps
what `sluice rescale` last set, unless asked to take the file's). Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sluice.models import JobConfig, PipelineSpec

# Operator fields that are about parallelism, not about what the operator computes.
_PARALLELISM_FIELDS = frozenset({"parallelism"})
# Operator fields compared through the graph instead (implicit inputs follow the operators' order).
_GRAPH_FIELDS = frozenset({"inputs"})


@dataclass
class JobChanges:
    """The differences between a job (its pipeline and last config) and a file's spec."""

    pipeline: list[str] = field(default_factory=list)
    """One phrase per change of the pipeline itself, e.g. "operator 'big' changed (expr)"."""
    parallelism: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Operator -> (the job's parallelism as last set, the file's) where they differ."""

    def parallelism_text(self, *, file_first: bool = False) -> str:
        """Each operator whose parallelism differs: "big=2 (file: 1)", or with `file_first`
        (when the file's was taken) "big=1 (job had 2)"."""
        return ", ".join(
            f"{op}={file} (job had {job})" if file_first else f"{op}={job} (file: {file})"
            for op, (job, file) in self.parallelism.items()
        )


def _operator_fields(op: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = op.model_dump(mode="json", by_alias=True)
    return {k: v for k, v in dumped.items() if k not in _PARALLELISM_FIELDS | _GRAPH_FIELDS}


def pipeline_changes(job: PipelineSpec, file: PipelineSpec) -> list[str]:
    """What `file` changes in the job's pipeline `job`, parallelism aside: operators added,
    removed, or changed (naming the fields that differ, `inputs` for a rewired operator), and
    pipeline-level fields (name, host_labels). Empty when only parallelism differs."""
    changes: list[str] = []
    job_ops = {op.id: op for op in job.operators}
    file_ops = {op.id: op for op in file.operators}
    job_inputs, file_inputs = job.input_ids(), file.input_ids()
    for op_id in job_ops:
        if op_id not in file_ops:
            changes.append(f"operator {op_id!r} removed")
    for op_id, op in file_ops.items():
        if op_id not in job_ops:
            changes.append(f"operator {op_id!r} added")
            continue
        before, after = _operator_fields(job_ops[op_id]), _operator_fields(op)
        fields = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if job_inputs[op_id] != file_inputs[op_id]:
            fields.append("inputs")
        if fields:
            changes.append(f"operator {op_id!r} changed ({', '.join(fields)})")
    top_level = job.model_dump(mode="json", exclude={"operators", "parallelism"})
    file_top = file.model_dump(mode="json", exclude={"operators", "parallelism"})
    for key in sorted(top_level.keys() | file_top.keys()):
        if top_level.get(key) != file_top.get(key):
            changes.append(f"pipeline {key} changed ({top_level.get(key)!r} -> {file_top.get(key)!r})")
    return changes


def parallelism_changes(
    job: PipelineSpec, job_config: JobConfig, file: PipelineSpec, file_config: JobConfig
) -> dict[str, tuple[int, int]]:
    """Operator -> (job's effective parallelism under its last config, the file's) where they
    differ, for the operators both pipelines have."""
    before, after = job.parallelism_for(job_config), file.parallelism_for(file_config)
    return {op: (before[op], after[op]) for op in after if op in before and before[op] != after[op]}


def compare(job: PipelineSpec, job_config: JobConfig, file: PipelineSpec, file_config: JobConfig) -> JobChanges:
    """Everything a file changes in a job (see `pipeline_changes`, `parallelism_changes`)."""
    return JobChanges(
        pipeline=pipeline_changes(job, file),
        parallelism=parallelism_changes(job, job_config, file, file_config),
    )
