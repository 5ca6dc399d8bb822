"""Atomic checkpoints, exact resume, and export to a plain HF model directory.

A checkpoint is a directory `RUN_DIR/checkpoints/step-000123/` holding
    model.safetensors      trainable parameters (all of them for a full fine-tune; the adapter for LoRA)
    optimizer.safetensors  AdamW moments and step counts, keyed "<param name>::<state key>"
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step, data position, optimizer hyper-parameters, scheduler, python RNG
Nothing is pickled: tensors go through safetensors, the rest through JSON.

Atomicity: everything is written into a hidden temporary directory, each file is fsync'ed, the
directory is renamed into place (atomic on POSIX), and only then is the `latest` pointer replaced
(write + fsync + rename). A crash at any point leaves the previous checkpoint and pointer intact;
a half-written temporary directory is never taken for a checkpoint and is swept on the next save.
Pruning renames an old checkpoint to a hidden name before deleting it, so a crash mid-delete
never leaves a half checkpoint under a `step-*` name.

Checking: state.json records each file's size and SHA-256. `latest` takes the newest checkpoint
that passes `problem` (state.json complete and valid JSON, every file there with its recorded size,
every safetensors header whole and its data all there, every file's bytes the ones written); one
that fails is named with the reason on stderr and the one before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tether.engine import dist
from tether.errors import TetherError

LATEST = "latest"
STATE = "state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_KEYS = ("step", "trainer", "optimizer_groups", "scheduler", "python_random")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor: gathers an FSDP2 DTensor shard from all ranks (collective)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def _place_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: this rank's shard of it when `like` is a DTensor."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh,
                                 like.placements)
    return full.to(like.device)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"checkpoint does not match the model: {name} is "
                             f"{tuple(state[name].shape)} there, {tuple(p.shape)} here")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_place_like(state[name].to(p.dtype), p))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """(tensors keyed "<param>::<key>", param-group hyper-parameters without the params)."""
    tensors = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            value = torch.as_tensor(value)
            tensors[f"{name}::{key}"] = _full(value) if value.dim() else value.detach().cpu()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, groups


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    for name, p in model.named_parameters():
        keys = [k.split("::", 1)[1] for k in tensors if k.startswith(f"{name}::")]
        if keys:
            current = optimizer.state.get(p, {})
            optimizer.state[p] = {key: _load_into(current.get(key), tensors[f"{name}::{key}"], p)
                                  for key in keys}
    for group, saved in zip(optimizer.param_groups, groups):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def _load_into(current, saved: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The saved state tensor, copied into the one the optimizer already holds when it has the
    same shape and dtype (`allocate_adam_state` placed it before any step; it stays there), else
    placed like the parameter (moments) or cloned (the `step` scalar)."""
    if (isinstance(current, torch.Tensor) and not hasattr(current, "device_mesh")
            and current.shape == saved.shape and current.dtype == saved.dtype):
        return current.copy_(saved)
    return _place_like(saved, p) if saved.dim() else saved.clone()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file's data, or a directory's entries (so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_root: str | Path, step: int, *, model: nn.Module,
         optimizer: torch.optim.Optimizer, scheduler, trainer_state: dict[str, Any],
         keep_last: int = 2) -> Path | None:
    """Write checkpoint `step` atomically. Collective under FSDP2; rank 0 writes.

    Returns the checkpoint directory on rank 0 (None on other ranks).
    """
    weights = trainable_state(model)
    optim_tensors, groups = optimizer_state(model, optimizer)
    if not dist.is_main():
        dist.barrier()
        return None
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    tmp.mkdir()
    save_file(weights, tmp / "model.safetensors")
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    for f in FILES:
        _fsync_path(tmp / f)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"step": step, "trainer": trainer_state, "optimizer_groups": groups,
             "scheduler": sched, "python_random": _py_random_state(),
             "files": {f: (tmp / f).stat().st_size for f in FILES},
             "sha256": {f: file_sha256(tmp / f) for f in FILES}}
    _fsync_write(tmp / STATE, json.dumps(state, indent=1).encode())  # written last
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    _write_pointer(root, final.name)
    _prune(root, keep_last, step)
    dist.barrier()
    return final


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    _fsync_write(tmp, name.encode())
    os.replace(tmp, root / LATEST)
    _fsync_path(root)


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step` (0: all); those after `step`, left
    by a run resumed from an earlier one, are replaced when the run gets there."""
    steps = sorted(p for p in root.glob("step-*") if p.name <= f"step-{step:06d}")
    for old in steps[:-keep_last] if keep_last > 0 else []:
        doomed = root / f".tmp-prune-{old.name}"
        os.rename(old, doomed)  # atomic: never a half-deleted checkpoint under its own name
        shutil.rmtree(doomed, ignore_errors=True)


def problem(ckpt: str | Path) -> str | None:
    """Why the checkpoint directory `ckpt` cannot be resumed from, or None if it is complete:
    state.json, each file's size and safetensors header, then each file's SHA-256 against the
    one written with it (about a second per GB)."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file():
        return f"no {STATE} (its save never finished)"
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE} is not valid JSON ({err})"
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else STATE_KEYS
    if missing:
        return f"{STATE} lacks {', '.join(missing)}"
    sizes = state.get("files") or {}
    for name in FILES:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if name in sizes and size != sizes[name]:
            return f"{name} is {size} bytes but {sizes[name]} were written"
        if why := _safetensors_problem(path, size):
            return f"{name} {why}"
    digests = state.get("sha256") or {}  # absent in checkpoints written before checksums
    for name in FILES:
        if name in digests and file_sha256(ckpt / name) != digests[name]:
            return f"{name} does not match the checksum written with it (its bytes changed)"
    return None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return f"is truncated ({size} bytes, its header cut)"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a corrupt header"
    if 8 + n + end != size:
        return f"is truncated ({size} of {8 + n + end} bytes)"
    return None


def latest(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer's, else the highest step that passes
    `problem`. Each newer one that fails is named on stderr with the reason."""
    root = Path(ckpt_root)
    candidates = sorted(root.glob("step-*"), reverse=True)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(errors="replace").strip()
        if named in candidates:  # normally the newest already; first in any case
            candidates.remove(named)
            candidates.insert(0, named)
    skipped = []
    for ckpt in candidates:
        if not ckpt.is_dir():
            continue
        why = problem(ckpt)
        if why is None:
            for bad, reason in skipped:
                _note(f"tether: checkpoint {bad} is unusable ({reason}); using {ckpt.name}")
            return ckpt
        skipped.append((ckpt, why))
    for bad, reason in skipped:
        _note(f"tether: checkpoint {bad} is unusable ({reason})")
    return None


def _note(line: str) -> None:
    if dist.is_main():
        print(line, file=sys.stderr, flush=True)


def load(ckpt_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         scheduler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore what `save` wrote; returns the trainer state (step, data position, ...)."""
    ckpt = Path(ckpt_dir)
    if why := problem(ckpt):
        raise TetherError(f"checkpoint {ckpt} is unusable: {why}")
    state = json.loads((ckpt / STATE).read_text())
    try:
        load_trainable_state(model, load_file(ckpt / "model.safetensors"))
    except ValueError as err:
        raise TetherError(f"checkpoint {ckpt}: {err} (was it saved with another "
                          "model.name_or_path or model.lora?)") from None
    if optimizer is not None:
        load_optimizer_state(model, optimizer, load_file(ckpt / "optimizer.safetensors"),
                             state["optimizer_groups"])
    if scheduler is not None:
        sched = dict(state["scheduler"])
        sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)  # the lambdas are code, not state
        scheduler.load_state_dict(sched)
    if restore_rng:
        rng = load_file(ckpt / "rng.safetensors")
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        version, internal, gauss = state["python_random"]
        random.setstate((version, tuple(internal), gauss))
    return {"step": state["step"], **state["trainer"]}


EXPORT_MANIFEST = ".tether-export.json"  # the files one export wrote, so --force replaces only them


def export_target_problem(out: Path, run_dir: Path | None, force: bool) -> str | None:
    """Why `out` may not receive an export (None: it may): never the run directory or a folder
    inside it; an existing non-empty folder only with `force`."""
    out = out.resolve()
    if run_dir is not None:
        run = run_dir.resolve()
        if out == run or run in out.parents:
            return f"{out} is inside the run directory {run}; export to a folder outside the run"
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not force:
        return (f"{out} exists and is not empty; choose a new folder, or pass --force to "
                "replace the files an export writes there (other files are kept)")
    return None


def export(model: nn.Module, tokenizer, out_dir: str | Path, *, force: bool = False,
           run_dir: Path | None = None) -> Path:
    """Write a plain HF directory (safetensors) that `from_pretrained` loads; LoRA is merged.

    A new or empty `out_dir` is written whole and renamed into place (atomic). An existing
    non-empty one is refused unless `force`; then each exported file replaces its namesake
    (os.replace, atomic per file), files a previous export listed in its manifest and this one
    does not write are removed, and every other file in the folder is left alone."""
    out = Path(out_dir).resolve()
    if why := export_target_problem(out, run_dir, force):
        raise TetherError(why)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        (tmp / EXPORT_MANIFEST).write_text(json.dumps({"files": written}) + "\n")
        if not out.exists():
            os.rename(tmp, out)
            return out
        if not any(out.iterdir()):
            out.rmdir()
            os.rename(tmp, out)
            return out
        previous = _manifest_files(out)
        for name in [*written, EXPORT_MANIFEST]:
            os.replace(tmp / name, out / name)
        for name in set(previous) - set(written):
            if (out / name).is_file():
                (out / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _manifest_files(out: Path) -> list[str]:
    """The plain file names a previous export into `out` listed (none if no readable manifest)."""
    try:
        files = json.loads((out / EXPORT_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f for f in files if isinstance(f, str) and f == Path(f).name and f != EXPORT_MANIFEST]


def export_run(run_dir: Path, out_dir: Path, *, force: bool = False,
               inside_run: bool = False) -> Path:
    """`tether export RUN_DIR OUT_DIR [--force]`: the run's latest checkpoint as a plain HF
    directory (`export`'s rules for the target, checked before any model loads). `inside_run`:
    a pipeline's own stage output folder inside the stage's run directory (rlhf, cai)."""
    import yaml

    from tether.config import ModelConfig, from_dict
    from tether.engine.models import load_tokenizer

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise TetherError(f"{run_dir} is not a tether run directory (no config.yaml)")
    ckpt = latest(run_dir / "checkpoints")
    if ckpt is None:
        raise TetherError(f"{run_dir / 'checkpoints'} holds no complete checkpoint to export")
    protected = None if inside_run else run_dir
    if why := export_target_problem(Path(out_dir), protected, force):
        raise TetherError(why)
    save = partial(export, out_dir=out_dir, force=force, run_dir=protected)
    sections = yaml.safe_load(config_path.read_text()) or {}
    model_cfg = from_dict(ModelConfig, sections.get("model", {}), prefix="model.")
    if "rm" in sections:  # a `tether rm` run: a sequence classifier with a score head
        from tether.engine.models import load_reward_model

        tokenizer = load_tokenizer(model_cfg)
        reward_model = load_reward_model(model_cfg, tokenizer.pad_token_id)
        load(ckpt, model=reward_model, restore_rng=False)
        return save(reward_model, tokenizer)
    if "prm" in sections:  # a `tether prm` run: a token classifier scoring each step separator
        from tether.engine.models import load_value_model

        tokenizer = load_tokenizer(model_cfg)
        process_model = load_value_model(model_cfg, tokenizer.pad_token_id)
        load(ckpt, model=process_model, restore_rng=False)
        if hasattr(process_model, "merge_and_unload"):
            process_model = process_model.merge_and_unload()
        prm = sections["prm"] or {}
        process_model.config.tether_prm = {"step_separator": prm.get("step_separator", "\n"),
                                           "aggregate": prm.get("aggregate", "min")}
        return save(process_model, tokenizer)
    model, tokenizer = run_policy(sections, ckpt)
    return save(model, tokenizer)


def run_policy(sections: dict, ckpt: Path):
    """(causal LM with the checkpoint's weights, tokenizer) of a policy run (sft, dpo, grpo, ppo:
    `sections` is its config.yaml); LoRA adapters stay unmerged (peft model)."""
    from tether.config import ModelConfig, from_dict
    from tether.engine.logprobs import CausalLMLogps
    from tether.engine.models import load_causal_lm, load_tokenizer

    model_cfg = from_dict(ModelConfig, sections.get("model", {}), prefix="model.")
    wrapped = CausalLMLogps(load_causal_lm(model_cfg))
    if "ppo" in sections:  # a `tether ppo` run: policy and critic share one checkpoint
        state = load_file(ckpt / "model.safetensors")
        load_trainable_state(wrapped, {k[len("policy."):]: v for k, v in state.items()
                                       if k.startswith("policy.")})
    else:
        load(ckpt, model=wrapped, restore_rng=False)
    return wrapped.model, load_tokenizer(model_cfg)
