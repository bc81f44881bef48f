"""Expected output of keyed window pipelines, computed in plain Python, and reading it back.

The expected windows are computed row by row from the generator's documented formula
(`generator_rows`), with a plain-Python filter and a dict per window: nothing of sluice's engine
(no pyarrow compute, no operator) is involved, so a bug there cannot hide in both.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sluice.connectors.generator import generator_rows
from tests.e2e_helpers import committed_files

WindowRow = tuple[str, int, int, int, int]  # (key, window_start_ms, window_end_ms, count, sum_value)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(value: Any) -> int:
    """Milliseconds since the epoch of an int, a datetime (naive = UTC) or an ISO-8601 string."""
    if isinstance(value, (int, float)):
        return int(value)
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round((dt - EPOCH).total_seconds() * 1000)


def generator_dict_rows(params: dict[str, Any], limit: int) -> Iterable[dict[str, Any]]:
    """Every row of a generator with `params`, `limit` rows per split, as plain dicts."""
    for split in range(params.get("splits", 1)):
        yield from generator_rows(params, split, 0, limit).to_pylist()


def expected_tumbling(
    rows: Iterable[dict[str, Any]], size_ms: int, keep: Callable[[dict[str, Any]], bool] = lambda r: True
) -> Counter[WindowRow]:
    """count and sum(value) per (key, tumbling window of `size_ms`) over `rows` that `keep` accepts."""
    acc: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        if not keep(r):
            continue
        t = _ms(r["ts"])
        start = t - t % size_ms
        a = acc[(r["key"], start)]
        a[0] += 1
        a[1] += r["value"]
    return Counter((k, s, s + size_ms, c, v) for (k, s), (c, v) in acc.items())


def read_window_rows(
    path: Path | str, count: str = "count", total: str = "sum_value", *, upto_epoch: int | None = None
) -> Counter[WindowRow]:
    """Committed window rows (JSON lines) under `path`, as a multiset (duplicates kept); with
    `upto_epoch`, only those of files committed by checkpoints up to that epoch (`part-{epoch}-...`)."""
    out: Counter[WindowRow] = Counter()
    for f in committed_files(path):
        if f.suffix != ".jsonl":
            continue
        if upto_epoch is not None:
            m = re.match(r"part-(\d+)-", f.name)
            assert m, f"unexpected committed file {f}"
            if int(m.group(1)) > upto_epoch:
                continue
        for _n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            out[(obj["key"], _ms(obj["window_start"]), _ms(obj["window_end"]), obj[count], obj[total])] += 1
    return out


def assert_same_windows(actual: Counter[WindowRow], expected: Counter[WindowRow]) -> None:
    """Exactly once: every expected window row once, nothing else; a readable account otherwise."""
    if actual == expected:
        return
    dups = {r: c for r, c in actual.items() if c > 1}
    missing = sorted((expected - actual).elements())
    extra = sorted((actual - expected).elements())
    raise AssertionError(
        f"committed windows differ: {sum(actual.values())} rows, expected {sum(expected.values())}; "
        f"{len(dups)} duplicated (e.g. {sorted(dups)[:3]}), {len(missing)} missing (e.g. {missing[:3]}), "
        f"{len(extra)} unexpected (e.g. {extra[:3]})"
    )
