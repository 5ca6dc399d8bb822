"""Append-only logs of sampled batches: one JSON line per batch, flushed (and fsynced) as soon as
the batch is made, so that a killed sampling stage resumes at its first missing batch
(`tether prefs`, `tether cai`). A log is locked while it is written: a second process that would
append the same batches is an error instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from tether.engine.locks import lock
from tether.errors import ConfigError


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary sibling, then an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_partial(path: Path) -> dict[int, dict]:
    """Sampled batches so far: {batch index: record}. A last line cut off by a kill is cut from
    the file (its batch is sampled again), so the next batch appended starts on a line of its
    own."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(whole))
    records = (json.loads(line) for line in whole.decode("utf-8").splitlines())
    return {record["batch"]: record for record in records}


def settings_guard(path: Path, settings: dict) -> None:
    """A log is resumed only by the settings that began it: <log>.settings.json keeps their hash
    (and the settings, to read); other settings are an error naming both files."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    guard = path.with_name(path.name + ".settings.json")
    if guard.is_file() and json.loads(guard.read_text())["hash"] != digest:
        raise ConfigError(f"{path} was sampled with other settings ({guard}); write to another "
                          "directory, or delete both files to sample it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = guard.with_name(f".{guard.name}.tmp")
    tmp.write_text(json.dumps({"hash": digest, "settings": settings}, indent=1))
    os.replace(tmp, guard)


def logged_batches(path: Path, n_batches: int, make: Callable[[int], dict], *,
                   progress: Callable[[int], None] = lambda done: None) -> list[dict]:
    """make(b) for every batch b in range(n_batches) that the log lacks, each appended as
    {"batch": b, **make(b)}, flushed and fsynced, before the next is made; progress(batches
    done) after each. Returns every batch's record, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        lock(log, f"another process is writing {path}; wait for it")
        done = read_partial(path)  # read under the lock: no batch is made twice
        progress(sum(b in done for b in range(n_batches)))
        for b in range(n_batches):
            if b not in done:
                done[b] = {"batch": b, **make(b)}
                log.write(json.dumps(done[b], ensure_ascii=False) + "\n")
                log.flush()
                os.fsync(log.fileno())
                progress(sum(k in done for k in range(n_batches)))
    return [done[b] for b in range(n_batches)]
