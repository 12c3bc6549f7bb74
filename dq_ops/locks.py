"""Exclusive locks between processes writing one local store (or one MLflow sqlite database).

A lock is ``fcntl.flock`` on a lock file: the kernel releases it when its holder exits, however
it exits (``kill -9`` included), so a crashed writer never leaves a stale lock, and a lock that
can be taken at once proves its former holder is gone. Locks are per open file, so two threads
of one process exclude each other too. Object stores have no such primitive through fsspec:
:meth:`dq_ops.store.Store.lock` is a no-op there (one writer per artifact is then up to the
deployment).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder if needed); waits for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_held(path: str | Path) -> bool:
    """Whether a live process holds the lock on ``path`` (a missing lock file: nobody does)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False
