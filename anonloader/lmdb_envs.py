"""One LMDB environment per path and process, shared by everything that reads or writes it.

py-lmdb refuses to open a path twice in one process, so every user of a path (each
:class:`~anonloader.cache.store.AnonCache` shard, each recovery-key store) goes through
:func:`open_env`: a read-only handle is reused by readers, and reopened for writing when a
writer asks. A forked child (a DataLoader worker) closes the handles it inherited and opens its
own: closing only unmaps and closes the child's own descriptors; the parent's handles and locks
are untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

__all__ = ["close_env", "is_open", "open_env"]

#: real path -> (pid, writable, environment, what ``setup`` returned)
_OPEN: dict[str, tuple[int, bool, lmdb.Environment, Any]] = {}


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def open_env(
    path: Path,
    *,
    writable: bool,
    map_size: int,
    max_dbs: int = 0,
    readahead: bool = True,
    setup: Callable[[lmdb.Environment, bool], Any] | None = None,
) -> tuple[lmdb.Environment, Any]:
    """This process's environment of ``path`` (a folder), opened on first use.

    Readers open it ``readonly`` without LMDB's lock file (they assume no concurrent writer);
    writers create the folder. ``setup(env, writable)`` runs once per opening (e.g. to open the
    named databases) and its result is returned with the environment every time; when it
    raises, the environment is closed and nothing is kept.

    Raises:
        lmdb.Error: LMDB cannot open ``path`` (the caller names what it was).
    """
    key = _key(path)
    found = _OPEN.get(key)
    if found is not None and found[0] == os.getpid() and (found[1] or not writable):
        return found[2], found[3]
    if found is not None:  # a read-only handle is reopened for writing
        close_env(path)
    if writable:
        Path(path).mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=map_size, max_dbs=max_dbs, subdir=True)
    else:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=readahead, max_dbs=max_dbs, subdir=True)
    try:
        state = setup(env, writable) if setup is not None else None
    except BaseException:
        env.close()
        raise
    _OPEN[key] = (os.getpid(), writable, env, state)
    return env, state


def is_open(path: Path) -> bool:
    """Whether this process holds an environment of ``path``."""
    found = _OPEN.get(_key(path))
    return found is not None and found[0] == os.getpid()


def close_env(path: Path) -> None:
    """Closes this process's environment of ``path``, if any (the next use reopens it)."""
    found = _OPEN.pop(_key(path), None)
    if found is not None and found[0] == os.getpid():
        found[2].close()


def _drop_inherited() -> None:
    inherited = list(_OPEN.values())
    _OPEN.clear()
    for _, _, env, _ in inherited:
        try:
            env.close()
        except lmdb.Error:
            pass


os.register_at_fork(after_in_child=_drop_inherited)
