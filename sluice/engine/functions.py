"""Resolving user functions referenced as ``package.module:function``."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any


class FunctionLoadError(Exception):
    """A function reference could not be resolved; the message says why (exception type included).

    Not retryable: the same code gives the same answer on the next try.
    """

    retryable = False


def _ensure_cwd_on_path() -> None:
    # `python -m` puts the working directory on sys.path but console scripts (`sluice worker`) do
    # not; user modules such as `examples.clicks` are expected to resolve the same way in both.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load_function(ref: str) -> Callable[..., Any]:
    """Import `ref` (``module:function``) and return the callable.

    Raises FunctionLoadError with ``"<ExceptionType>: <message>"`` when the module cannot be imported
    (including errors raised while importing it), the attribute is missing, or it is not callable.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise FunctionLoadError(f"ValueError: {ref!r} must look like 'package.module:function'")
    _ensure_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # a user module may raise anything, even sys.exit()
        raise FunctionLoadError(f"{type(exc).__name__}: {exc}") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError as exc:
        raise FunctionLoadError(f"AttributeError: module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(fn):
        raise FunctionLoadError(f"TypeError: {ref!r} is a {type(fn).__name__}, not callable")
    return fn
