"""Shared helpers of the engine tests: an independent model of the generator and a user module."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

_M = (1 << 64) - 1
_BASE = datetime(2024, 1, 1, tzinfo=UTC)


def expected_row(split: int, seq: int, keys: int) -> dict[str, Any]:
    """The generator's documented formula, in plain Python integers (no numpy, no Arrow)."""
    z = (split * 0x9E3779B97F4A7C15 + seq) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    z ^= z >> 31
    ts = _BASE + timedelta(milliseconds=seq)
    return {
        "split": split,
        "seq": seq,
        "key": f"key-{z % keys}",
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
        "value": (z >> 32) % 1000,
    }


def read_committed(path: Path) -> list[dict[str, Any]]:
    """Every row of the committed output (files whose names do not start with '.' or '_')."""
    rows: list[dict[str, Any]] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for name in files:
            if not name.startswith((".", "_")):
                with open(os.path.join(root, name)) as f:
                    rows.extend(json.loads(line) for line in f)
    return rows


def user_module(tmp_path: Path, source: str) -> str:
    """Write a uniquely named importable module into tmp_path; returns its name."""
    name = f"userfns_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    return name
