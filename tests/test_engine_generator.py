"""The generator's rows follow its documented formula and its splits/offsets survive rescaling."""

from __future__ import annotations

import pyarrow as pa

from sluice.connectors.generator import SCHEMA, GeneratorSource, generator_rows, owned_splits
from sluice.engine.operators import OperatorContext
from tests.engine_helpers import expected_row


def test_rows_match_documented_formula() -> None:
    for split in (0, 1, 7, 12345):
        batch = generator_rows({"keys": 13}, split, 1000, 1100)
        assert batch.schema == SCHEMA
        rows = pa.Table.from_batches([batch]).to_pylist()
        for row in rows:
            exp = expected_row(split, row["seq"], 13)
            assert row["key"] == exp["key"] and row["value"] == exp["value"]
            assert row["split"] == split
            assert row["ts"].strftime("%Y-%m-%dT%H:%M:%S.") + f"{row['ts'].microsecond // 1000:03d}Z" == exp["ts"]
        assert [r["seq"] for r in rows] == list(range(1000, 1100))


def test_rows_are_deterministic_and_range_independent() -> None:
    whole = generator_rows({"keys": 100}, 3, 0, 500)
    parts = [generator_rows({"keys": 100}, 3, a, a + 100) for a in range(0, 500, 100)]
    assert pa.Table.from_batches([whole]).equals(pa.Table.from_batches(parts))
    assert generator_rows({"keys": 100}, 3, 10, 10).num_rows == 0


def test_keys_cover_range() -> None:
    keys = set(generator_rows({"keys": 5}, 0, 0, 1000).column("key").to_pylist())
    assert keys == {f"key-{i}" for i in range(5)}


def test_split_ownership_partitions_splits() -> None:
    for parallelism in (1, 2, 3, 8, 11):
        owned = [s for i in range(parallelism) for s in owned_splits(10, parallelism, i)]
        assert sorted(owned) == list(range(10))


def _source(parallelism: int, index: int, restored: list[pa.Table], **params: object) -> GeneratorSource:
    spec = {"id": "gen", "type": "generator", **params}
    src = GeneratorSource("gen", spec)
    src.open(OperatorContext("job", 1, "gen", index, parallelism), restored)
    return src


def test_restore_keeps_offsets_of_owned_splits_across_parallelism() -> None:
    old = [_source(2, i, [], splits=5, limit=100, batch_size=7) for i in range(2)]
    for src in old:
        for _ in range(3):
            assert src.poll(0.0).batch is not None
    tables = [src.snapshot(1).table for src in old]
    merged = {s: o for t in tables for s, o in zip(t["split"].to_pylist(), t["offset"].to_pylist())}
    new = [_source(3, i, tables, splits=5, limit=100, batch_size=7) for i in range(3)]
    restored = {s: o for src in new for s, o in src.offsets.items()}
    assert restored == merged


def test_bounded_source_finishes_after_limit() -> None:
    src = _source(1, 0, [], splits=2, limit=10, batch_size=4)
    seen = []
    while True:
        poll = src.poll(0.0)
        if poll.finished:
            break
        assert poll.batch is not None
        seen.extend(zip(poll.batch["split"].to_pylist(), poll.batch["seq"].to_pylist()))
    assert sorted(seen) == [(s, q) for s in range(2) for q in range(10)]


def test_rate_limit_paces_emission() -> None:
    src = _source(1, 0, [], splits=1, rate=1000.0, batch_size=1000)
    first = src.poll(100.0)  # pacing starts at the first poll: nothing is due yet
    assert first.batch is None and first.idle_s > 0
    later = src.poll(100.5)
    assert later.batch is not None and later.batch.num_rows == 500
