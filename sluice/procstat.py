"""What the operating system says about a process, for telling one process from a later one.

A PID can be reused once its process is gone; (PID, start time) cannot: a process started later
under the same PID has a later start time. The start time is field 22 of `/proc/PID/stat`
(`starttime`, in clock ticks since boot), so it is only known where `/proc` exists (Linux).
"""

from __future__ import annotations

import os
from pathlib import Path

STAT_STARTTIME_FIELD = 22
"""1-based index of `starttime` in /proc/PID/stat (proc(5))."""
_FIRST_FIELD_AFTER_COMM = 3
"""Fields 1 (pid) and 2 (comm, in parentheses, may contain spaces and ')') precede this one."""


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not exist, is a
    zombie, or the system has no /proc. Equal values for the same PID mean the same process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain ")" itself: the fields we want follow the *last* one.
    fields = stat.rpartition(")")[2].split()
    try:
        if fields[0] in ("Z", "X"):  # zombie or dead: the process we would mean is gone
            return None
        return int(fields[STAT_STARTTIME_FIELD - _FIRST_FIELD_AFTER_COMM])
    except (IndexError, ValueError):
        return None


def start_ticks_supported() -> bool:
    """True when this system reports process start times (so `process_start_ticks` can verify)."""
    return process_start_ticks(os.getpid()) is not None
