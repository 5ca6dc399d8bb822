"""Sequence log-probs of preference pairs, and the reference log-probs cached on disk.

The DPO family compares each sequence's summed completion log-prob under the policy with the
same under a frozen reference. The reference's never change, so they are computed once in a
no-grad pass (`reference_logps`) and kept in `$TETHER_CACHE/ref_logps/<key>.safetensors`
(`cached_pair_logps`), keyed by everything that decides them (`reference_cache_path`).

`load_reference` chooses the reference model once for every recipe that has one (DPO, GRPO,
PPO): a frozen copy, the LoRA policy with its adapter disabled, or none; `Reference.use` gives
the model to score with.
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from tether.config import ModelConfig
from tether.data.preference import PreferenceBatch, pair_rows
from tether.engine import dist
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import cache_dir, load_causal_lm
from tether.engine.optimize import autocast, step_items


def sequence_logps(policy: CausalLMLogps, input_ids, attention_mask, loss_mask, *,
                   prompt_len: int = 0, share_prompts: bool = False):
    """(summed completion log-probs (N,), completion token counts (N,)) in one forward.

    prompt_len P >= 1 (rows laid out by `pair_rows`: prompts left-padded to P columns): only
    columns [P:] go through the lm_head, and with `share_prompts` rows i and N/2 + i, which hold
    the same prompt, run it once (its KV cache serves both; gradients flow through it)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, T)
    if prompt_len == 0:
        token_logps = policy(input_ids, attention_mask, positions)  # (N, T)
    else:
        N = input_ids.shape[0]
        shared = torch.arange(N, device=input_ids.device) % (N // 2) if share_prompts else None
        token_logps = policy(input_ids, attention_mask, positions, start=prompt_len,
                             shared_prefix=shared)  # (N, T - P)
        loss_mask = loss_mask[:, prompt_len:]
    return (token_logps * loss_mask).sum(-1), loss_mask.sum(-1)


@torch.no_grad()
def reference_logps(policy: CausalLMLogps, items: list, *, pad_id: int, micro_batch_size: int,
                    device, precision: str, multiple: int = 0) -> torch.Tensor:
    """(N, 2) summed log-probs of each item's two sequences under `policy` (no grad, eval mode),
    laid out as in training: each item's shared prompt runs once."""
    was_training = policy.training
    policy.eval()
    out = []
    for i in range(0, len(items), micro_batch_size):
        ids, attn, loss, prompt_len = pair_rows(items[i:i + micro_batch_size], pad_id, multiple)
        with autocast(device, precision):
            sums, _ = sequence_logps(policy, ids.to(device), attn.to(device), loss.to(device),
                                     prompt_len=prompt_len, share_prompts=True)  # (2b,)
        out.append(sums.float().cpu().view(2, -1).T)  # (b, 2)
    policy.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def kto_kl(policy: CausalLMLogps, batches: list[PreferenceBatch], device, precision) -> torch.Tensor:
    """KTO's reference point before clamping (Ethayarajh et al. 2024; TRL): the mean over every
    mismatched sequence of the step (all micro-batches, all ranks) of policy - reference summed
    log-probs, without gradients. Rows [B:] of each batch hold the mismatched sequences."""
    total, count = 0.0, 0
    for b in batches:
        B = b.num_pairs
        with autocast(device, precision):
            sums, _ = sequence_logps(policy, *b.trimmed(slice(B, None)),
                                     prompt_len=b.prompt_len)  # (B,) mismatched rows
        total += (sums.float() - b.ref_logps[B:].to(sums.device)).sum().item()
        count += B
    return (dist.all_reduce_sum(total) / dist.all_reduce_sum(count).clamp(min=1)).float().cpu()


def items_used(n_train: int, n_eval: int, total_steps: int, batch_size: int, seed: int) -> list:
    """Indices into train + eval items of those the run will see: every eval item, and the train
    items of steps [0, total_steps), all of them once the run reaches a second epoch. Within the
    first epoch, `step_items` with a batch of total_steps * batch_size is exactly the union of the
    first total_steps batches (the same seeded permutation, cut once)."""
    if total_steps >= n_train // batch_size:
        train = range(n_train)
    else:
        train = step_items(list(range(n_train)), 0, total_steps * batch_size, seed)
    return sorted(train) + list(range(n_train, n_train + n_eval))


def reference_cache_path(model_dir: Path, *key_parts) -> Path:
    """$TETHER_CACHE/ref_logps/<sha256 of the reference model directory, its safetensors files'
    names, sizes and mtimes, and `key_parts` (data hash, lengths, tokenizer, precision, ...)>."""
    model_dir = model_dir.resolve()
    weights = sorted(model_dir.glob("*.safetensors"))
    stats = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    key = json.dumps([str(model_dir), stats, *key_parts])
    return cache_dir() / "ref_logps" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def read_cached_logps(path: Path) -> tuple[torch.Tensor | None, str | None]:
    """(the cached (N, 2) log-probs, None), or (None, why) when the file is damaged (truncated,
    not safetensors, no `logps` tensor): a cache is never worth an error, only a recompute."""
    try:
        return load_file(path)["logps"], None
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def cached_pair_logps(n_items: int, needed: list[int], path: Path, *, use_cache: bool,
                      score: Callable[[list[int]], torch.Tensor]) -> tuple[torch.Tensor, str]:
    """(N, 2) log-probs of N items, NaN for those outside `needed`: read from the cache file
    where it has them, else `score(missing indices) -> (len(missing), 2)` for the needed ones it
    lacks; the file (written atomically, by rank 0) then grows to hold them. Returns a note too."""
    logps = torch.full((n_items, 2), float("nan"))
    cached, damaged = read_cached_logps(path) if use_cache and path.is_file() else (None, None)
    if damaged and dist.is_main():
        print(f"reference log-probs: the cache {path} is unreadable ({damaged}); scoring "
              "afresh and replacing it", flush=True)
    if cached is not None and cached.shape == logps.shape:
        logps = cached
    missing = [i for i in needed if torch.isnan(logps[i]).any()]
    if not missing:
        return logps, f"reference log-probs: read from the cache {path}"
    if dist.is_main():
        print(f"reference log-probs: scoring {len(missing)} items (no grad)...", flush=True)
    logps[missing] = score(missing)
    if use_cache and dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
        save_file({"logps": logps.contiguous()}, tmp)
        tmp.replace(path)
    dist.barrier()
    return logps, (f"reference log-probs: scored {len(missing)} items (those of the {n_items} "
                   f"that this run uses and the cache lacked; cache: {path})")


# --- the reference model, chosen once for every recipe that has one ----------------------------


@dataclass
class Reference:
    """The model a policy is tethered to, chosen once by `load_reference`:

    - "copy": a frozen model loaded from `source` (the policy's initial weights, or a separate
      reference model); resident (`model`, loaded once) or loaded for each `use` and freed after;
    - "adapter": the LoRA policy with its adapter disabled (its base model: no second copy);
    - "none": no reference (the recipe needs none, and one would cost a copy).
    The recipe decides whether it needs one; this only decides what it is."""
    kind: str  # "copy" | "adapter" | "none"
    policy: CausalLMLogps
    source: ModelConfig | None = None  # the reference's weights ("adapter": the policy's base)
    model: CausalLMLogps | None = None  # the resident frozen copy ("copy", resident)
    initial: bool = False  # "copy" of the policy's own initial weights
    chunk_size: int = 0

    @property
    def description(self) -> str:
        """For the run's first line."""
        return {"copy": "frozen copy", "adapter": "adapter-disabled base",
                "none": "no reference"}[self.kind]

    @contextmanager
    def use(self, *, policy_unchanged: bool = False) -> Iterator[CausalLMLogps]:
        """The reference to score with, for the duration of the block: the resident copy; the
        policy itself while `policy_unchanged` and the copy is of its initial weights; a copy
        loaded now (then freed); or the LoRA policy with its adapter disabled."""
        if self.kind == "none":
            raise RuntimeError("this run has no reference model")
        if self.kind == "adapter":
            with self.policy.model.disable_adapter():
                yield self.policy
        elif self.model is not None:
            yield self.model
        elif self.initial and policy_unchanged:
            yield self.policy
        else:
            ref = CausalLMLogps(load_causal_lm(self.source), chunk_size=self.chunk_size)
            try:
                yield ref.to(dist.device())
            finally:
                del ref
                gc.collect()

    def apply(self, fn: Callable, *, policy_unchanged: bool = False):
        """fn(reference model), within `use`."""
        with self.use(policy_unchanged=policy_unchanged) as ref:
            return fn(ref)


def load_reference(model_cfg: ModelConfig, policy: CausalLMLogps, *, needed: bool,
                   ref_model: str | None = None, resident: bool = True,
                   chunk_size: int) -> Reference:
    """The reference of `policy` (loaded from `model_cfg`): `ref_model` when given, else the
    policy's initial weights, as the LoRA policy with its adapter disabled (always available: it
    costs nothing) or, when `needed`, a frozen copy (`resident`: loaded now, frozen and sharded
    like the policy; else loaded for each `Reference.use`)."""
    base = replace(model_cfg, lora=replace(model_cfg.lora, r=0))
    if ref_model is None and model_cfg.lora.r > 0:
        return Reference("adapter", policy, base, chunk_size=chunk_size)
    if not needed:
        return Reference("none", policy)
    source = base if ref_model is None else replace(base, name_or_path=ref_model, gguf_file=None)
    model = None
    if resident:
        model = CausalLMLogps(load_causal_lm(source), chunk_size=chunk_size)
        model = dist.shard(model.requires_grad_(False).to(dist.device())).eval()
    return Reference("copy", policy, source, model, initial=ref_model is None,
                     chunk_size=chunk_size)
