"""examples/windows.yaml written with the Python builder; prints the pipeline spec as YAML.

    .venv/bin/python -m examples.windows > /tmp/windows.yaml && .venv/bin/sluice run /tmp/windows.yaml
"""

from __future__ import annotations

import yaml

from sluice.builder import Pipeline
from sluice.models import PipelineSpec


def pipeline() -> PipelineSpec:
    p = Pipeline("windows", parallelism=2)
    clicks = p.generator("clicks", splits=4, keys=1000, limit=20_000)
    views = p.generator("views", splits=2, keys=1000, limit=20_000)
    (
        p.union("both", clicks, views)
        .filter("big", expr="value >= 100")
        .key_by("by_key", "key")
        .tumbling_window("counts", size_ms=100,
                         aggregates=[("count",), ("sum", "value", "total"), ("max", "value")])
        .files("out", path="out/windows", format="parquet")
    )
    return p.build()


if __name__ == "__main__":
    print(yaml.safe_dump(pipeline().model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False))
