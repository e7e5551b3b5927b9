"""Locks between processes sharing a latent store (`fcntl.flock`: the kernel drops a lock when the process
holding it dies, so a crashed or killed run never blocks the next one; no stale lock to clean up).

Lock files live in `<root>/.locks/`, never inside an entry, so removing an entry never removes a lock
someone waits on:
  <key>.lock          the entry is in use: every process using it holds it shared; removing the entry
                      (`cache rm`, pruning, eviction) takes it exclusively and without waiting
  <key>/<file>.lock   writing <file> of the entry (an inverted chunk, x0, a checkpoint, ...)
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCKS = ".locks"


def entry_lock_path(root: Path, key: str) -> Path:
    return Path(root) / LOCKS / f"{key}.lock"


def file_lock_path(root: Path, key: str, name: str) -> Path:
    return Path(root) / LOCKS / key / f"{name}.lock"


class Lock:
    """An flock on a lock file. Where the lock file cannot be created (a read-only store, where nothing can
    be written either) acquiring succeeds without locking."""

    def __init__(self, path: Path, *, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self.fd: int | None = None
        self.held = False

    def acquire(self, blocking: bool = True) -> bool:
        """True once held; False when `blocking` is off and another process holds it."""
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                self.held = True  # read-only store: nothing to protect
                return True
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # The file may have been removed (entry removal) while we waited: then the lock is on a
            # file nobody else will open; take the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.held = fd, True
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None
        self.held = False

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
