"""Checks of a desired config against the pipeline that must hold before a command is accepted.

Pure functions: they run inside the workflow (signal handlers, update validators), so an invalid
rescale is rejected up front instead of failing the job when it is applied.
"""

from __future__ import annotations

from sluice.models import JobConfig, PipelineSpec


def parallelism_problem(pipeline: PipelineSpec, config: JobConfig) -> str | None:
    """Why `config`'s parallelism cannot run `pipeline`, or None when it can."""
    known = {op.id for op in pipeline.operators}
    unknown = sorted(set(config.overrides) - known)
    if unknown:
        return (
            f"override names unknown operator {', '.join(repr(u) for u in unknown)}; "
            f"operators are {', '.join(sorted(known))}"
        )
    par = pipeline.parallelism_for(config)
    for op_id, ups in pipeline.input_ids().items():
        for up in ups:
            if par[up] != par[op_id]:
                return (
                    f"operators {up!r} (parallelism {par[up]}) and {op_id!r} (parallelism "
                    f"{par[op_id]}) are joined by a forward edge and need the same parallelism "
                    "(repartitioning edges arrive with the data-plane work)"
                )
    return None
