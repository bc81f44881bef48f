"""Durable file-system steps shared by the checkpoint store and the sinks."""

from __future__ import annotations

import os


def fsync_dir(path: str, *, best_effort: bool = False) -> None:
    """Make the renames and links made in directory `path` durable.

    `best_effort`: where a directory cannot be opened or synced (some file systems), carry on
    instead of raising; for callers whose data files are already synced on their own.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)
