"""`--watch` for the read commands (`sluice status -w`, `sluice list -w`): show a view again and
again until Ctrl-C, or until the thing watched is done.

On a terminal the view is redrawn in place every interval (rich's Live). Without one (a pipe, a
file, CI) a new block is printed only when what is shown changed, so a log of a long watch holds
each change once. With `-o json` each change is one JSON document on one line (JSON Lines).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

S = TypeVar("S")

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.5  # a faster redraw only loads the Temporal server


@dataclass
class View(Generic[S]):
    """How to show one snapshot `S` of what is watched."""

    render: Callable[[S], RenderableType]
    """the view for a terminal or a pipe"""
    document: Callable[[S], Any]
    """the JSON document of `-o json`"""
    done: Callable[[S], int | None] = lambda _snapshot: None
    """the exit code once the watch should end (e.g. the job reached a terminal state), else None"""


async def watch(
    fetch: Callable[[], Awaitable[S]],
    view: View[S],
    *,
    interval_s: float,
    as_json: bool,
    console: Console,
    transient_errors: tuple[type[BaseException], ...],
) -> int:
    """Fetch and show until `view.done` gives an exit code (returned) or Ctrl-C (KeyboardInterrupt
    propagates). The first fetch's errors propagate (e.g. the job does not exist); later ones of
    `transient_errors` (the server restarting, a query timing out) are shown and the watch goes on."""
    snapshot = await fetch()
    if console.is_terminal and not as_json:
        return await _redraw(fetch, view, snapshot, interval_s, console, transient_errors)
    last: str | None = None
    last_error: str | None = None
    while True:
        document = view.document(snapshot)
        key = json.dumps(document, sort_keys=True, default=str)
        if key != last:
            last = key
            if as_json:
                console.out(json.dumps(document, default=str), highlight=False)
            else:
                console.print(view.render(snapshot))
                console.out("")  # a blank line between blocks
        code = view.done(snapshot)
        if code is not None:
            return code
        while True:
            await asyncio.sleep(interval_s)
            try:
                snapshot = await fetch()
                break
            except transient_errors as exc:
                if str(exc) != last_error:  # say it once, not every interval
                    last_error = str(exc)
                    print(f"warning: {exc}; retrying every {interval_s:g} s", file=sys.stderr, flush=True)


async def _redraw(
    fetch: Callable[[], Awaitable[S]],
    view: View[S],
    snapshot: S,
    interval_s: float,
    console: Console,
    transient_errors: tuple[type[BaseException], ...],
) -> int:
    """The terminal's watch: one view redrawn in place, with a footer saying how to leave."""
    footer = Text(f"every {interval_s:g} s; Ctrl-C to leave", style="dim")
    with Live(Group(view.render(snapshot), footer), console=console, auto_refresh=False) as live:
        while True:
            code = view.done(snapshot)
            if code is not None:
                return code
            await asyncio.sleep(interval_s)
            try:
                snapshot = await fetch()
            except transient_errors as exc:
                problem = Text(f"cannot refresh: {exc}; retrying", style="yellow")
                live.update(Group(view.render(snapshot), problem, footer), refresh=True)
                continue
            live.update(Group(view.render(snapshot), footer), refresh=True)
