"""Metrics: one JSON line per step in RUN_DIR/metrics.jsonl, a rich progress bar with ETA, and
TensorBoard events when tensorboard is installed. Only rank 0 writes. Every metric name is
defined once in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from tether.engine import dist


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class MetricsLogger:
    """`log(step, metrics)` appends to metrics.jsonl (and TensorBoard); `progress` drives the bar."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, description: str = "train",
                 tensorboard: bool = True, progress: bool = True, start_step: int = 0):
        self.enabled = dist.is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.progress = None
        self.start = time.time()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run: drop lines logged after its checkpoint
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if _step_of(line) <= start_step] if start_step else []
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None
        if progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task(description, total=total_steps,
                                               completed=start_step, info="")
            self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def advance(self, step: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf (dropped) for a line a killed run left cut short."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf
