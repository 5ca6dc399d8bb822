"""The optimizer steps of a training loop, stopped cleanly by Ctrl-C.

Every recipe's loop is

    steps = TrainingSteps(start_step, total_steps, ckpt_root, logger)
    for step in steps:
        ...one optimizer step...
        if steps.checkpoint_due(step + 1, cfg.run.save_every):
            checkpoint.save(...)

The first SIGINT (Ctrl-C) sets a flag and nothing else: the step in progress finishes,
`checkpoint_due` is then true, the checkpoint is written, and the loop raises `Interrupted`
naming it (the CLI prints that line and exits 130; `--run.resume=true` continues from it exactly).
A second SIGINT stops at once (KeyboardInterrupt, the last complete checkpoint stays). The handler
is installed only while the loop runs and the previous one is restored however the loop ends.
Under torchrun each rank decides from the flags of all ranks (one sum per step), so all save.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tether.engine import dist
from tether.errors import Interrupted


class TrainingSteps:
    def __init__(self, start_step: int, total_steps: int, ckpt_root: str | Path, logger=None):
        self.start, self.total, self.ckpt_root, self.logger = start_step, total_steps, \
            Path(ckpt_root), logger
        self._signalled = False  # set by the handler
        self._agreed: bool | None = None  # this step's decision, the same on every rank
        self._step = start_step

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for; fixed for the rest of the step once read."""
        if self._agreed is None:
            flag = self._signalled
            if dist.is_distributed():
                flag = dist.all_reduce_sum(float(flag)).item() > 0
            self._agreed = bool(flag)
        return self._agreed

    def checkpoint_due(self, step: int, save_every: int) -> bool:
        """Save after optimizer step `step` (1-based): the last step, every `save_every`
        steps, and the step during which Ctrl-C came."""
        return (step == self.total or bool(save_every and step % save_every == 0)
                or self.requested)

    def _handler(self, signum, frame) -> None:
        if self._signalled:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._signalled = True
        print(f"\ntether: interrupt: finishing step {self._step + 1}, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __iter__(self):
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._handler)
        try:
            for step in range(self.start, self.total):
                self._step, self._agreed = step, None
                yield step
                if self.requested:  # the body saw it too (checkpoint_due): step + 1 is saved
                    self._stop(step + 1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, step: int):
        if self.logger is not None:
            self.logger.close()
        saved = self.ckpt_root / f"step-{step:06d}"
        where = (f"checkpoint {saved} saved" if saved.is_dir() else
                 f"no checkpoint saved for it (the last is in {self.ckpt_root})")
        raise Interrupted(f"interrupted after step {step} of {self.total}: {where}; "
                          "continue with --run.resume=true")
