"""onnxruntime sessions that survive ``fork``.

An ``InferenceSession`` owns a thread pool. A forked process (a DataLoader worker) inherits the
session's memory but none of its threads, so running it there, or merely destroying it — the
garbage collector in a worker freeing a detector it inherited — can block forever on the pool's
locks. Every session made with :func:`new_session` is recorded with the process that made it:
a forked child pins the inherited ones (never run, never destroyed: the child ends with
``os._exit``), and :func:`is_current` tells their owners to build their own.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

__all__ = ["is_current", "new_session"]

_MADE_IN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # session -> pid
_INHERITED: list[Any] = []  # sessions of a parent process, kept alive in a forked child


def _pin_inherited() -> None:
    _INHERITED.extend(_MADE_IN.keys())


os.register_at_fork(after_in_child=_pin_inherited)


def new_session(model: Any, options: Any = None, providers: Any = None) -> Any:
    """``onnxruntime.InferenceSession(model, options, providers=providers)``, recorded as made
    in this process. Raises what onnxruntime raises (callers turn it into ModelLoadError)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model, options, providers=providers)
    _MADE_IN[session] = os.getpid()
    return session


def is_current(session: Any) -> bool:
    """Whether ``session`` was made by :func:`new_session` in this process (False for None and
    for a session inherited through ``fork``: build a new one)."""
    return session is not None and _MADE_IN.get(session) == os.getpid()
