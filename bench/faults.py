"""Run the fault x state suite N times and print its table: outcome, median recovery time, rows.

    PYTHONPATH=. .venv/bin/python bench/faults.py --runs 3 [-- extra pytest args, e.g. -k sigkill]

Each run is `pytest tests/faults` with $SLUICE_FAULT_TIMES pointing at a file where every case
that got as far as checking its output appends one JSON line (fault, state, outcome, recovery_s,
rows_expected, rows_lost, rows_duplicated; see tests/faults/harness.py). The table has one row
per (fault, state): the outcome path seen most often, the median recovery time over the runs
(fault -> back in Running, or -> the end state; for a fault the job rides out without a
transition, -> its next completed checkpoint), the most rows lost and duplicated in any run, and
how many runs measured the case. Cases that failed before their output was checked are listed
with the pytest summary of each run.

Recovery times are measured with the suite's settings (runner heartbeat timeout 3 s, hang timeout
3 s, checkpoints every second) and with the cases of one fault running side by side, so they
include the machine's load; they are what the suite measured, not guarantees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TIMES_ENV = "SLUICE_FAULT_TIMES"
# The order of the table's rows: faults as docs/reliability.md lists them, states in life order.
STATE_ORDER = [
    "Scheduling", "Running", "Checkpoint", "CheckpointStopping", "Stopping", "Rescaling", "Restarting",
    "Recovering",
]


def run_suite(pytest_args: list[str], times_file: Path) -> tuple[int, str]:
    """One run of the suite; returns pytest's exit code and its last summary line."""
    env = {**os.environ, TIMES_ENV: str(times_file), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", *pytest_args],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith(("FAILED", "ERROR"))] + lines[-1:]
    return proc.returncode, "\n".join(summary)


def load(times_file: Path) -> list[dict[str, Any]]:
    if not times_file.exists():
        return []
    return [json.loads(line) for line in times_file.read_text().splitlines() if line.strip()]


def table(results: list[list[dict[str, Any]]]) -> str:
    """Markdown table over every run's records."""
    cases: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in results:
        for rec in run:
            cases[(rec["fault"], rec["state"])].append(rec)

    def order(key: tuple[str, str]) -> tuple[str, int, str]:
        fault, state = key
        return (fault, STATE_ORDER.index(state) if state in STATE_ORDER else len(STATE_ORDER), state)

    rows = ["| fault | state | outcome | recovery (median s) | rows lost | rows duplicated | runs |",
            "|---|---|---|---|---|---|---|"]
    for key in sorted(cases, key=order):
        recs = cases[key]
        outcome = Counter(r["outcome"] for r in recs).most_common(1)[0][0]
        median = statistics.median(r["recovery_s"] for r in recs)
        lost = max(r["rows_lost"] for r in recs)
        dup = max(r["rows_duplicated"] for r in recs)
        rows.append(f"| {key[0]} | {key[1]} | {outcome} | {median:.1f} | {lost} | {dup} | {len(recs)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="how many times to run the suite (default 3)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    results: list[list[dict[str, Any]]] = []
    worst = 0
    with tempfile.TemporaryDirectory(prefix="sluice-faults-") as tmp:
        for i in range(args.runs):
            times = Path(tmp) / f"run-{i}.jsonl"
            code, summary = run_suite(args.pytest_args, times)
            worst = max(worst, code)
            print(f"run {i + 1}/{args.runs}: pytest exit {code}\n{summary}\n", file=sys.stderr)
            results.append(load(times))
    print(table(results))
    return worst


if __name__ == "__main__":
    sys.exit(main())
