"""Exclusive locks on files a process writes: a log being appended to (`tether label`, `tether
prefs`, sampled batches) or a run directory (`tether.engine.run`).

A lock is an advisory `flock` on an open file, held until that file is closed or the process
ends. The OS releases the lock of a process that dies (kill -9 included), so a stale lock is
never left behind: the next process simply takes it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from tether.errors import ConfigError


def lock(f: IO, busy: str) -> None:
    """Lock the open file `f`; held by another process: ConfigError(busy)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(busy) from None


def lock_with_pid(path: Path, busy: str) -> IO:
    """Lock the file at `path` (created if absent) and write this process's pid into it; keep
    the returned file open for as long as the lock is needed. Held by another process:
    ConfigError(busy with "{pid}" filled in by the holder's pid)."""
    f = open(path, "a+", encoding="utf-8")
    try:
        lock(f, "")
    except ConfigError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(busy.format(pid=pid)) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
