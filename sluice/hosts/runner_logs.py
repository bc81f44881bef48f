"""A job's runner log files on this machine: which generations there are, their last lines, and
what the runners write next.

Runners log to `<state dir>/runners/<job>/gen-<G>/runner-<R>.log` (sluice/schedulers/process.py).
Every line handed out is prefixed with the runner's id, `[gG-rR] `, so the lines of several
runners (and hosts) can be interleaved. Used by a host's `GET /jobs/{job_id}/logs` and by
`sluice logs` when no host endpoint answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sluice.schedulers.process import job_dir_name
from sluice.settings import runners_dir

#: how often a follower looks for new lines
LOG_FOLLOW_S = 0.5
#: lines of each log shown when no number is asked for
DEFAULT_TAIL_LINES = 100


class LogsNotFound(Exception):
    """The job (or the asked generation) has no runner logs here; the message says what exists."""


def job_logs_dir(state_dir: Path, job_id: str) -> Path:
    return runners_dir(state_dir) / job_dir_name(job_id)


def generations(state_dir: Path, job_id: str) -> list[int]:
    """The job's generations with runner files here, oldest first."""
    root = job_logs_dir(state_dir, job_id)
    return sorted(int(d.name[4:]) for d in root.glob("gen-*") if d.name[4:].isdigit())


def pick_generation(state_dir: Path, job_id: str, generation: int | None) -> int:
    """`generation`, or the newest one here; LogsNotFound when there is none or not that one."""
    root = job_logs_dir(state_dir, job_id)
    gens = generations(state_dir, job_id)
    if not gens:
        raise LogsNotFound(f"no runner logs of job {job_id} under {root}")
    if generation is None:
        return gens[-1]
    if generation not in gens:
        raise LogsNotFound(
            f"job {job_id} has no runner logs of generation {generation} under {root} "
            f"(generations: {', '.join(map(str, gens))})"
        )
    return generation


@dataclass
class LogReader:
    """The log files of one generation of a job (one runner, or all), read from where it stopped."""

    state_dir: Path
    job_id: str
    generation: int
    runner: int | None = None
    offsets: dict[Path, int] = field(default_factory=dict)

    def files(self) -> list[Path]:
        folder = job_logs_dir(self.state_dir, self.job_id) / f"gen-{self.generation}"
        pattern = f"runner-{self.runner}.log" if self.runner is not None else "runner-*.log"
        found = [f for f in folder.glob(pattern) if f.stem.removeprefix("runner-").isdigit()]
        return sorted(found, key=lambda f: int(f.stem.removeprefix("runner-")))

    def _prefix(self, path: Path) -> str:
        return f"[g{self.generation}-r{path.stem.removeprefix('runner-')}] "

    def tail(self, lines: int) -> list[str]:
        """The last `lines` lines of each file, prefixed; later reads start after them."""
        out: list[str] = []
        for f in self.files():
            data = f.read_bytes()
            self.offsets[f] = len(data)
            if lines:
                out += [self._prefix(f) + line for line in data.decode("utf-8", "replace").splitlines()[-lines:]]
        return out

    def new_lines(self) -> list[str]:
        """What the runners wrote since the last read, prefixed (whole lines only)."""
        out: list[str] = []
        for f in self.files():
            try:
                size = f.stat().st_size
            except FileNotFoundError:  # deleted (`sluice delete`) while followed
                continue
            start = self.offsets.get(f, 0)
            if size <= start:
                continue
            with open(f, "rb") as fh:
                fh.seek(start)
                chunk = fh.read(size - start)
            end = chunk.rfind(b"\n") + 1  # a line still being written comes with the next read
            if end == 0:
                continue
            self.offsets[f] = start + end
            out += [self._prefix(f) + line for line in chunk[:end].decode("utf-8", "replace").splitlines()]
        return out
