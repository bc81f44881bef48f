"""Checks on processes that tests started: is a PID still a live (non-zombie) process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

GONE_TIMEOUT_S = 5.0


def pid_exists(pid: int) -> bool:
    """True while `pid` is a process that is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def wait_pids_gone(pids: list[int], timeout_s: float = GONE_TIMEOUT_S) -> list[int]:
    """Wait until none of `pids` is alive; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if pid_exists(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.05)
