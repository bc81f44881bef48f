"""What a user reads about a failure of their own code: stable messages and short tracebacks.

* :func:`user_traceback` formats an exception's traceback (its causes included) with only the
  frames of the user's code: frames of sluice itself and of the standard library (asyncio,
  threading, concurrent.futures) are dropped, so the file and line that failed stand out. The
  text is at most :data:`MAX_TRACEBACK_CHARS`; a longer one keeps its end (the innermost frames
  and the exception), which says most.
* :func:`thread_traceback` does the same for the current stack of a thread that is stuck in user
  code (a function that never returns), so a hang names the line it hangs on.
* :func:`stable_text` removes what differs between two runs of the same failure (memory
  addresses in reprs), so the controller can tell a failure that repeats identically from a new one.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
import traceback
from types import FrameType

import sluice

#: longest traceback text handed to the controller (it travels in events and workflow history)
MAX_TRACEBACK_CHARS = 4096
#: longest failure message kept from a user's exception text
MAX_MESSAGE_CHARS = 1000

_SLUICE_DIR = os.path.dirname(os.path.abspath(sluice.__file__)) + os.sep
_STDLIB_DIRS = tuple(
    os.path.abspath(p) + os.sep
    for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")}
    if p
)
_SITE_DIRS = tuple(
    os.path.abspath(p) + os.sep
    for p in {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")}
    if p
)
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{5,}\b")


def is_user_file(filename: str) -> bool:
    """True for a frame of user code (or a library it calls), False for sluice and the stdlib."""
    path = os.path.abspath(filename)
    if path.startswith(_SLUICE_DIR):
        return False
    if any(path.startswith(d) for d in _SITE_DIRS):
        return True  # e.g. pyarrow.compute raising on the user's call: part of the explanation
    if any(path.startswith(d) for d in _STDLIB_DIRS):
        return False
    return not filename.startswith("<frozen ")


def _only_user_frames(te: traceback.TracebackException) -> None:
    seen: set[int] = set()
    todo: list[traceback.TracebackException | None] = [te]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        cur.stack = traceback.StackSummary.from_list([f for f in cur.stack if is_user_file(f.filename)])
        todo += [cur.__cause__, cur.__context__]


def _cut(text: str) -> str:
    if len(text) <= MAX_TRACEBACK_CHARS:
        return text
    keep = MAX_TRACEBACK_CHARS - 60
    return f"[... {len(text) - keep} characters cut ...]\n" + text[-keep:]


def user_traceback(exc: BaseException) -> str | None:
    """The traceback of `exc` (with its causes) limited to user frames, or None when no frame of
    user code is in it (then the message says all)."""
    te = traceback.TracebackException.from_exception(exc)
    _only_user_frames(te)
    if not _has_frames(te):
        return None
    return _cut("".join(te.format()))


def _has_frames(te: traceback.TracebackException) -> bool:
    seen: set[int] = set()
    todo: list[traceback.TracebackException | None] = [te]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if len(cur.stack):
            return True
        todo += [cur.__cause__, cur.__context__]
    return False


def thread_traceback(thread_id: int | None) -> str | None:
    """Where thread `thread_id` is now, limited to user frames (None if it is gone or not in user
    code). Used when a user function does not return: the innermost line is where it waits."""
    if thread_id is None:
        return None
    frame: FrameType | None = sys._current_frames().get(thread_id)
    if frame is None:
        return None
    frames = [f for f in traceback.extract_stack(frame) if is_user_file(f.filename)]
    if not frames:
        return None
    text = "Stack of the call that did not return (most recent call last):\n"
    text += "".join(traceback.StackSummary.from_list(frames).format())
    return _cut(text)


def stable_text(text: str) -> str:
    """`text` without memory addresses, and at most MAX_MESSAGE_CHARS long: the same failure gives
    the same text in every run (a repeat that retrying will not fix is recognised by it)."""
    text = _ADDRESS.sub("0x...", text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text
