"""The run ritual, once: what every trainer does around its loop (docs/cli.md, "Run directories").

    session = Run.start(cfg, "sft", total_steps, model=policy, optimizer=optimizer,
                        scheduler=scheduler)          # session.step: where training starts
    for step in session.steps():                      # Ctrl-C: the step finishes, is saved
        ...one optimizer step...
        session.save(step + 1)                        # when due, with the trainer's state
    session.logger.close()
    ...the final evaluation...
    session.finish(write_report)                      # "run directory" line, report.html

start: RUN_DIR is created and locked for the run's lifetime (a second run into it is an error
naming the holder's pid; the OS drops a dead holder's lock, so a stale lock is simply taken). A
directory that holds an earlier run is refused unless `run.resume` (continue it) or
`run.overwrite` (delete that run's files, `RUN_FILES`, first). On resume the latest checkpoint's
config and data fingerprint must equal this run's in every key that changes the maths (all but
`SAME_MATHS`), unless `run.allow_config_change`; then model, optimizer, scheduler and RNG are
restored and `state` holds what the trainer saved. config.yaml is written, the MetricsLogger
opened, and the first line says where checkpoints go and how often.

save: a checkpoint after the last step, every `run.save_every` steps, every
`run.save_every_minutes` of wall time and after a Ctrl-C, holding the trainer's state, the config
and the data fingerprint; the newest `run.keep_last` are kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import torch

from tether.config import save_config, to_dict
from tether.engine import checkpoint, dist
from tether.engine.interrupt import TrainingSteps
from tether.engine.locks import lock_with_pid
from tether.engine.metrics import MetricsLogger
from tether.engine.optimize import resolve_precision
from tether.errors import ConfigError

LOCK = ".tether.lock"
# What a run writes in RUN_DIR: an earlier run is recognised by these, and `run.overwrite`
# deletes exactly these (files or folders), nothing else in the directory.
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.html", "eval.json",
             "stage.json", "checkpoints", "tensorboard", "model", "policy", "reward_model",
             "process_reward_model")
PREVIOUS_RUN = ("config.yaml", "metrics.jsonl", "checkpoints")
# Keys a resumed run may change freely: none changes the maths of training (bookkeeping, logging,
# evaluation, memory knobs whose results agree to rounding, and the data paths: the data's
# content is compared instead, so moved data resumes). A key ending in "." is a whole section.
SAME_MATHS = ("run.output_dir", "run.save_every", "run.save_every_minutes", "run.keep_last",
              "run.log_every", "run.eval_every", "run.tensorboard", "run.progress", "run.report",
              "train.max_steps", "train.epochs", "train.micro_batch_size",
              "train.gradient_checkpointing", "train.logprob_chunk_size", "model.lean_layers",
              "data.pad_to_multiple_of", "data.path", "data.eval_path", "diagnostics.",
              "rewards.")
HOW_TO_START = ("run.resume", "run.overwrite", "run.allow_config_change")  # not compared
_HELD: dict[Path, IO] = {}  # run directories this process holds the lock of


def init_process(train) -> torch.device:
    """A trainer's first act: torchrun's process group (world size 1 without it), this rank's
    device, and `train.precision` resolved for it (auto -> bf16 or fp32)."""
    dist.init()
    device = dist.device()
    train.precision = resolve_precision(train.precision, device)
    return device


@dataclass
class Run:
    cfg: Any  # the recipe's config (its `run` section is a RunConfig)
    dir: Path
    total_steps: int
    model: Any
    optimizer: Any
    scheduler: Any
    logger: MetricsLogger
    step: int = 0  # the step training starts from (0, or the resumed checkpoint's)
    state: dict = field(default_factory=dict)  # the trainer state the checkpoint held
    data: dict = field(default_factory=dict)  # the data fingerprint
    _steps: TrainingSteps | None = None
    _saved_at: float = field(default_factory=time.monotonic)

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def resumed(self) -> bool:
        return self.step > 0

    @classmethod
    def start(cls, cfg, description: str, total_steps: int, *, model, optimizer,
              scheduler) -> "Run":
        """Lock RUN_DIR, refuse or clear an earlier run, resume, save config.yaml, open the
        logger."""
        rc, run_dir = cfg.run, Path(cfg.run.output_dir)
        if not rc.output_dir.strip():
            raise ConfigError("config key 'run.output_dir' is empty: name a folder (an empty one "
                              "would write into the current folder)")
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            _hold(run_dir)
        _refuse_or_clear(rc, run_dir)
        data = data_fingerprint(cfg.data) if hasattr(cfg, "data") else {}
        step, state, notes = 0, {}, []
        if rc.resume:
            step, state, notes = _resume(cfg, run_dir, data, model, optimizer, scheduler)
        if dist.is_main():
            save_config(cfg, run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, total_steps=total_steps, description=description,
                               tensorboard=rc.tensorboard, progress=rc.progress, start_step=step)
        run = cls(cfg, run_dir, total_steps, model, optimizer, scheduler, logger, step, state,
                  data)
        for note in [run.schedule_line(), *notes]:
            logger.print(note)
        return run

    def schedule_line(self) -> str:
        """Where checkpoints go and how often: the run's first line."""
        rc = self.cfg.run
        when = ([f"every {rc.save_every} steps"] if rc.save_every else []) \
            + ([f"every {rc.save_every_minutes:g} minutes"] if rc.save_every_minutes else []) \
            + ["at the end and on Ctrl-C"]
        keep = f"the last {rc.keep_last}" if rc.keep_last else "all"
        resumed = f"; resumed from step {self.step}" if self.resumed else ""
        return f"checkpoints: {self.checkpoints}, {', '.join(when)}; keeping {keep}{resumed}"

    def steps(self) -> TrainingSteps:
        """The loop's steps from `step` to `total_steps` (Ctrl-C: the step finishes, is saved)."""
        self._steps = TrainingSteps(self.step, self.total_steps, self.checkpoints, self.logger)
        return self._steps

    def save(self, step: int, **trainer_state) -> Path | None:
        """Checkpoint optimizer step `step` (1-based) when due: the last step, every
        run.save_every steps, run.save_every_minutes after the previous save, or after Ctrl-C."""
        rc = self.cfg.run
        if not (self._steps.checkpoint_due(step, rc.save_every) or self._clock_due()):
            return None
        state = {"total_steps": self.total_steps, **trainer_state,
                 "config": to_dict(self.cfg), "data": self.data}
        path = checkpoint.save(self.checkpoints, step, model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler,
                               trainer_state=state, keep_last=rc.keep_last)
        self._saved_at = time.monotonic()
        return path

    def _clock_due(self) -> bool:
        """run.save_every_minutes since the last save, agreed by every rank."""
        minutes = self.cfg.run.save_every_minutes
        due = bool(minutes) and time.monotonic() - self._saved_at >= 60 * minutes
        if dist.is_distributed():
            due = dist.all_reduce_sum(float(due)).item() > 0
        return due

    def finish(self, write_report: Callable[[Path], Path] | None = None) -> None:
        """The run's last lines (where it is; report.html when run.report), then the lock goes."""
        self.logger.print(f"run directory: {self.dir} (export with `tether export {self.dir} "
                          "OUT_DIR`)")
        if write_report is not None and self.cfg.run.report and dist.is_main():
            self.logger.print(f"report: {write_report(self.dir)} (`tether eval {self.dir}` adds "
                              "the held-out evaluation to it)")
        _release(self.dir)


# ------------------------------------------------------------------------------ the directory


def _hold(run_dir: Path) -> None:
    """Lock RUN_DIR/.tether.lock for this run. A lock this process still holds there is from an
    earlier run in the same process that ended by an exception: it is released first."""
    _release(run_dir)
    _HELD[run_dir.resolve()] = lock_with_pid(
        run_dir / LOCK, f"{run_dir} is in use by another tether run (pid {{pid}}); wait for it "
                        "to finish or give another --run.output_dir")


def _release(run_dir: Path) -> None:
    held = _HELD.pop(run_dir.resolve(), None)
    if held is not None:
        held.close()


def previous_run(run_dir: Path) -> list[str]:
    """The files of an earlier run in RUN_DIR (empty: none, or no directory)."""
    return [name for name in PREVIOUS_RUN if (run_dir / name).exists()]


def _refuse_or_clear(rc, run_dir: Path) -> None:
    """An earlier run in RUN_DIR: resumed (run.resume), replaced (run.overwrite: its RUN_FILES
    deleted) or refused with the three ways on."""
    if rc.resume and rc.overwrite:
        raise ConfigError("run.resume and run.overwrite are both true: resume the run in "
                          f"{run_dir}, or overwrite it, not both")
    found = previous_run(run_dir)
    if found and not (rc.resume or rc.overwrite):
        raise ConfigError(f"{run_dir} holds an earlier run ({', '.join(found)}): continue it "
                          "with --run.resume=true, write to a new --run.output_dir, or delete "
                          "its run files with --run.overwrite=true")
    if rc.overwrite:
        if dist.is_main():
            for path in (run_dir / name for name in RUN_FILES):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        dist.barrier()


def rerun(run_dir: Path) -> dict[str, bool]:
    """run.resume / run.overwrite for a pipeline stage run again in `run_dir` (`tether rlhf`,
    cai, goodhart, compare): resume from its checkpoint when it has one, else start afresh over
    whatever an earlier attempt left there."""
    resume = checkpoint.latest(Path(run_dir) / "checkpoints") is not None
    return {"resume": resume, "overwrite": not resume}


# ------------------------------------------------------------------------------ resume


def _resume(cfg, run_dir: Path, data: dict, model, optimizer, scheduler):
    """(start step, trainer state, lines to print) from the latest checkpoint, after checking
    that it was trained with this run's maths and data."""
    root = run_dir / "checkpoints"
    last = checkpoint.latest(root)
    if last is None:
        raise ConfigError(f"run.resume is true but {root} holds no checkpoint")
    state = checkpoint.load(last, model=model, optimizer=optimizer, scheduler=scheduler)
    old = state.pop("config", None) or _saved_config(run_dir)
    changed = {k: v for k, v in (config_changes(old, to_dict(cfg)) if old else {}).items()
               if k not in HOW_TO_START}
    if "data" in state and state["data"] != data:
        changed["data"] = (_describe(state["data"]), _describe(data))
    state.pop("data", None)
    maths = {k: v for k, v in changed.items() if not _same_maths(k)}
    listed = lambda keys: ", ".join(f"{k} {changed[k][0]} -> {changed[k][1]}"  # noqa: E731
                                    for k in keys)
    if maths and not cfg.run.allow_config_change:
        raise ConfigError(f"run.resume: {last} was trained with other settings ({listed(maths)}):"
                          " resume with its settings, start a new run in another "
                          "--run.output_dir, or continue with the new ones with "
                          "--run.allow_config_change=true")
    notes = [f"resume: changed settings ({listed(changed)})"
             + ("; run.allow_config_change: the run continues with the new ones" if maths
                else "")] if changed else []
    return state["step"], state, notes


def _saved_config(run_dir: Path) -> dict | None:
    """config.yaml of the run being resumed (for checkpoints that predate configs in them)."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 1e-3, ...}: sections flattened to dotted keys; a mapping-valued key (e.g.
    grpo.group_rewards, whose values are lists) stays one value."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and any(not isinstance(v, (dict, list)) for v in
                                           value.values()):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} where the two configs differ (JSON-normalised)."""
    norm = lambda d: _flat(json.loads(json.dumps(d)))  # noqa: E731 (tuples -> lists, ...)
    a, b = norm(old), norm(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _same_maths(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAME_MATHS)


# ------------------------------------------------------------------------------ data


def data_fingerprint(data_cfg) -> dict[str, str]:
    """{"data.path": sha256, "data.eval_path": sha256} of the local data files (a dataset
    directory: of its files' names and contents); built-in data has no entry, its settings are
    in the config."""
    out = {}
    for key in ("path", "eval_path"):
        value = getattr(data_cfg, key, None)
        if value is not None and Path(value).exists():
            out[f"data.{key}"] = _content_hash(Path(value))
    return out


def _content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0" if path.is_dir() else b"")
        with open(f, "rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()[:16]


def _describe(fingerprint: dict) -> str:
    return "{" + ", ".join(f"{k} sha256 {v}" for k, v in sorted(fingerprint.items())) + "}"
