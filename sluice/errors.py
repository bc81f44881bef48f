"""Error types that cross module boundaries, with the domain the job's failure is reported in."""

from __future__ import annotations


class UserError(Exception):
    """The pipeline or its configuration is wrong: retrying will not help (domain `user`)."""


class RunnerUnavailable(Exception):
    """A runner could not be reached: its process is gone or its connection broke."""


class RunnerRefused(Exception):
    """A runner answered with a client error (bad token, wrong generation, bad request)."""
