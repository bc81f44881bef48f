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
    _PATTERN = re.compile(
        r"checkpoint epoch (\d+) is corrupt: (state file|manifest) (.+?): (.+?)(?=; operator '|$)", re.S
    )

    def __init__(self, epoch: int, file: str, problem: str, *, what: str = "state file") -> None:
        super().__init__(f"checkpoint epoch {epoch} is corrupt: {what} {file}: {problem}")
        self.epoch = epoch
        self.file = file
        self.problem = problem
        self.what = what

    @classmethod
    def parse(cls, message: str) -> CorruptCheckpointError | None:
        """The error whose `str()` appears in `message` (e.g. prefixed by an operator), or None."""
        m = cls._PATTERN.search(message)
        if m is None:
            return None
        return cls(int(m.group(1)), m.group(3), m.group(4), what=m.group(2))


class StaleGeneration(Exception):
    """A writer of a superseded generation tried to publish (a manifest, committed sink output, a
    snapshot): the store's fence names a generation that started after it, so it is refused and
    nothing is published. Retrying cannot help: the writer's generation stays superseded.

    `str()` is ``generation G of job J is superseded by generation F: refused`` (with ``of a newer
    run`` after F when a newer run of the job numbers its generations afresh); that text is what
    the user reads in the job's recovery reason.
    """

    def __init__(self, job_id: str, generation: int, fence: int, *, newer_run: bool = False) -> None:
        run = " of a newer run" if newer_run else ""
        super().__init__(f"generation {generation} of job {job_id} is superseded by generation {fence}{run}: refused")
        self.job_id = job_id
        self.generation = generation
        self.fence = fence
        self.newer_run = newer_run

    @classmethod
    def found_in(cls, exc: BaseException | None) -> StaleGeneration | None:
        """The StaleGeneration that `exc` is or was raised from (its cause chain), or None."""
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:
            if isinstance(exc, cls):
                return exc
            seen.add(id(exc))
            exc = exc.__cause__ or exc.__context__
        return None
