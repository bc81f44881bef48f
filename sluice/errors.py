"""Error types that cross module boundaries, with the domain the job's failure is reported in."""

from __future__ import annotations

import re


class UserError(Exception):
    """The pipeline or its configuration is wrong: retrying will not help (domain `user`)."""


class RunnerUnavailable(Exception):
    """A runner could not be reached: its process is gone or its connection broke."""


class RunnerRefused(Exception):
    """A runner answered with a client error (bad token, wrong generation, bad request)."""


class CorruptCheckpointError(Exception):
    """A checkpoint's manifest or one of its state files is missing, unreadable, or not what the
    manifest recorded (size, sha256): restoring that checkpoint again cannot help.

    `str()` is ``checkpoint epoch E is corrupt: <what> <file>: <problem>``; that text crosses the
    runner protocol (which carries only a message), and :meth:`parse` recovers the fields from it.
    """

    # A runner joins the failures of its subtasks with "; operator '...": the first one is kept.
    _PATTERN = re.compile(r"checkpoint epoch (\d+) is corrupt: (state file|manifest) (.+?): (.+?)(?=; operator '|$)", re.S)

    def __init__(self, epoch: int, file: str, problem: str, *, what: str = "state file") -> None:
        super().__init__(f"checkpoint epoch {epoch} is corrupt: {what} {file}: {problem}")
        self.epoch = epoch
        self.file = file
        self.problem = problem
        self.what = what

    @classmethod
    def parse(cls, message: str) -> "CorruptCheckpointError | None":
        """The error whose `str()` appears in `message` (e.g. prefixed by an operator), or None."""
        m = cls._PATTERN.search(message)
        if m is None:
            return None
        return cls(int(m.group(1)), m.group(3), m.group(4), what=m.group(2))
