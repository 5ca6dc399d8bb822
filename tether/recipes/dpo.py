"""Direct preference optimisation and its family: dpo, cdpo, robust, ipo, hinge, simpo, orpo, kto.

Stages: data -> model -> score (reference log-probs once, cached on disk) -> (resume) -> eval ->
[collate -> optimize -> group weights -> log -> checkpoint]* -> eval.

Chosen and rejected sequences go through the policy in one forward (stacked along the batch and
padded to a common length). A sequence's log-prob is the sum of its completion tokens' log-probs;
SimPO, ORPO and IPO use the per-token mean. The loss of a micro-batch is the *sum* of its pairs'
losses and the optimizer divides by the global number of pairs, so accumulation is exact.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from tether.config import DPOConfig, ModelConfig, PreferenceConfig, save_config
from tether.data.collate import pad_collate
from tether.data.preference import builtin_preference_rows, load_preference_data
from tether.engine import checkpoint, dist
from tether.engine.logprobs import CausalLMLogps
from tether.engine.metrics import MetricsLogger, peak_memory_mb
from tether.engine.models import cache_dir, load_causal_lm, load_tokenizer, resolve_model_dir
from tether.engine.optimize import (autocast, build_optimizer, build_scheduler, resolve_precision,
                                   train_step)
from tether.errors import ConfigError
from tether.losses import (PAIRED_LOSSES, group_robust_weights, kto_loss, masked_mean, orpo_loss,
                           simpo_loss)
from tether.recipes.sft import check_batch_sizes, step_items


@dataclass
class PreferenceBatch:
    """B pairs as 2B rows: rows [:B] are the chosen (KTO: the examples), rows [B:] the rejected
    (KTO: the mismatched KL sequences), right-padded to one length."""
    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) bool, True on real tokens
    loss_mask: torch.Tensor  # (2B, T) bool, True on completion tokens
    ref_logps: torch.Tensor | None  # (2B,) fp32 summed reference log-probs; None if ref-free
    group_ids: torch.Tensor  # (B,) long, index into the run's sorted group names
    desirable: torch.Tensor  # (B,) bool; KTO labels (all True for pairs)

    @property
    def num_pairs(self) -> int:
        return self.group_ids.shape[0]

    def to(self, device) -> "PreferenceBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PreferenceBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def collate_preference(items: list, pad_id: int, groups: list[str]) -> PreferenceBatch:
    firsts, seconds = zip(*(item.sequences for item in items))
    padded = pad_collate(list(firsts) + list(seconds), pad_id)
    ref = None if items[0].ref is None else torch.tensor(
        [it.ref[0] for it in items] + [it.ref[1] for it in items], dtype=torch.float32)
    return PreferenceBatch(
        padded.input_ids, padded.attention_mask, padded.loss_mask, ref,
        torch.tensor([groups.index(it.group) for it in items], dtype=torch.long),
        torch.tensor([getattr(it, "desirable", True) for it in items], dtype=torch.bool))


def sequence_logps(policy: CausalLMLogps, input_ids, attention_mask, loss_mask):
    """(summed completion log-probs (N,), completion token counts (N,)) in one forward."""
    token_logps = policy(input_ids, attention_mask)  # (N, T)
    return (token_logps * loss_mask).sum(-1), loss_mask.sum(-1)


# --- objectives: (seq, batch) -> (per-pair loss (B,), metrics, per-pair reward margin (B,)) -----
# seq holds the policy's summed log-probs `pc`, `pr`, per-token means `ac`, `ar`, the reference's
# `rc`, `rr`, `rac`, `rar` (None when reference-free) and the chosen mean NLL `nll_c`.


def _paired(loss_fn, dc: PreferenceConfig, seq, batch, *, average: bool = False, **kw):
    pc, pr, rc, rr = (seq["ac"], seq["ar"], seq["rac"], seq["rar"]) if average else \
        (seq["pc"], seq["pr"], seq["rc"], seq["rr"])
    loss, metrics = loss_fn(pc, pr, rc, rr, beta=dc.beta, **kw)
    return loss, metrics, (pc - rc) - (pr - rr)


def _simpo(dc: PreferenceConfig, seq, batch):
    loss, metrics = simpo_loss(seq["ac"], seq["ar"], beta=dc.beta, gamma=dc.simpo_gamma)
    return loss, metrics, seq["ac"] - seq["ar"]


def _orpo(dc: PreferenceConfig, seq, batch):
    loss, metrics = orpo_loss(seq["ac"], seq["ar"], lam=dc.orpo_lambda)
    metrics["nll/chosen"] = seq["nll_c"].detach().mean().item()
    return seq["nll_c"] + loss, metrics, seq["ac"] - seq["ar"]


def _kto(dc: PreferenceConfig, seq, batch):
    kl = (seq["pr"] - seq["rr"]).detach().mean()  # mismatched pairs estimate KL(policy || ref)
    loss, metrics = kto_loss(seq["pc"], seq["rc"], batch.desirable, kl, beta=dc.beta,
                             desirable_weight=dc.kto_desirable_weight,
                             undesirable_weight=dc.kto_undesirable_weight)
    ratio = seq["pc"] - seq["rc"]
    metrics["logps/chosen"] = masked_mean(seq["pc"].detach(), batch.desirable).item()
    metrics["logps/rejected"] = masked_mean(seq["pc"].detach(), ~batch.desirable).item()
    return loss, metrics, torch.where(batch.desirable, ratio, -ratio)


OBJECTIVES: dict[str, Callable] = {
    "dpo": partial(_paired, PAIRED_LOSSES["dpo"]),
    "cdpo": lambda dc, s, b: _paired(PAIRED_LOSSES["cdpo"], dc, s, b,
                                     label_smoothing=dc.label_smoothing),
    "robust": lambda dc, s, b: _paired(PAIRED_LOSSES["robust"], dc, s, b,
                                       label_smoothing=dc.label_smoothing),
    "ipo": partial(_paired, PAIRED_LOSSES["ipo"], average=True),  # IPO on per-token means (TRL)
    "hinge": partial(_paired, PAIRED_LOSSES["hinge"]),
    "simpo": _simpo,
    "orpo": _orpo,
    "kto": _kto,
}
REFERENCE_FREE = {"simpo", "orpo"}
TRAIN_STEP_KEYS = {"loss", "units", "grad_norm", "lr", "time/step"}


def build_objective(dc: PreferenceConfig) -> Callable:
    """The loss picked once by name; coefficients checked here, not inside the loop."""
    if dc.loss not in OBJECTIVES:
        raise ConfigError(f"dpo.loss must be one of {', '.join(OBJECTIVES)}, got '{dc.loss}'")
    if dc.loss == "cdpo" and not 0 < dc.label_smoothing <= 0.5:
        raise ConfigError("dpo.loss=cdpo needs 0 < dpo.label_smoothing <= 0.5")
    if dc.loss == "robust" and not 0 <= dc.label_smoothing < 0.5:
        raise ConfigError("dpo.loss=robust needs 0 <= dpo.label_smoothing < 0.5")
    return partial(OBJECTIVES[dc.loss], dc)


def preference_loss(policy: CausalLMLogps, batch: PreferenceBatch, *, objective: Callable,
                    group_weights: torch.Tensor | None, n_groups: int) -> tuple[torch.Tensor, dict]:
    """Summed (group-weighted) loss of the batch's pairs; metrics are sums over pairs."""
    sums, counts = sequence_logps(policy, batch.input_ids, batch.attention_mask,
                                  batch.loss_mask)  # (2B,), (2B,)
    B = batch.num_pairs
    counts = counts.clamp(min=1)
    seq = {"pc": sums[:B], "pr": sums[B:], "ac": sums[:B] / counts[:B], "ar": sums[B:] / counts[B:],
           "nll_c": -sums[:B] / counts[:B], "rc": None, "rr": None, "rac": None, "rar": None}
    if batch.ref_logps is not None:
        ref = batch.ref_logps
        seq.update(rc=ref[:B], rr=ref[B:], rac=ref[:B] / counts[:B], rar=ref[B:] / counts[B:])
    loss, metrics, margin = objective(seq, batch)  # (B,), dict of means, (B,)
    weights = torch.ones_like(loss) if group_weights is None \
        else group_weights.to(loss.device)[batch.group_ids] * n_groups  # uniform -> 1 per pair
    correct = (margin.detach() > 0).float()
    means = {"logps/chosen": sums[:B].detach().mean().item(),
             "logps/rejected": sums[B:].detach().mean().item(), **metrics,
             "rewards/accuracy": correct.mean().item()}
    out = {k: v * B for k, v in means.items()}  # sums over pairs; the recipe divides by the total
    for g in range(n_groups):
        sel = batch.group_ids == g
        out[f"_pairs/{g}"] = sel.sum().item()
        out[f"_correct/{g}"] = correct[sel].sum().item()
        out[f"_loss/{g}"] = loss.detach()[sel].sum().item()
    return (loss * weights).sum(), out


# --- reference log-probs: one no-grad pass before training, cached on disk ---------------------


@torch.no_grad()
def reference_logps(policy: CausalLMLogps, items: list, *, pad_id: int, micro_batch_size: int,
                    device, precision: str) -> torch.Tensor:
    """(N, 2) summed log-probs of each item's two sequences under `policy` (no grad, eval mode)."""
    was_training = policy.training
    policy.eval()
    out = []
    for i in range(0, len(items), micro_batch_size):
        firsts, seconds = zip(*(it.sequences for it in items[i:i + micro_batch_size]))
        b = pad_collate(list(firsts) + list(seconds), pad_id).to(device)
        with autocast(device, precision):
            sums, _ = sequence_logps(policy, b.input_ids, b.attention_mask, b.loss_mask)
        n = len(firsts)
        out.append(torch.stack([sums[:n], sums[n:]], dim=1).float().cpu())
    policy.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def reference_cache_path(cfg: DPOConfig, data_hash: str, tokenizer, unpaired: bool) -> Path:
    """$TETHER_CACHE/ref_logps/<sha256 of model, weights size/mtime, data, lengths, tokenizer>."""
    ref_cfg = ModelConfig(name_or_path=cfg.dpo.ref_model) if cfg.dpo.ref_model else cfg.model
    model_dir = resolve_model_dir(ref_cfg).resolve()
    weights = sorted(model_dir.glob("*.safetensors"))
    stats = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    key = json.dumps([str(model_dir), stats, data_hash, cfg.data.max_length, cfg.data.truncation,
                      tokenizer.name_or_path, resolve_precision(cfg.train.precision, dist.device()),
                      "unpaired" if unpaired else "paired"])
    return cache_dir() / "ref_logps" / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def score_reference(cfg: DPOConfig, policy: CausalLMLogps, items: list, path: Path, *, pad_id,
                    device, precision: str) -> tuple[torch.Tensor, str]:
    """Cached reference log-probs, or a no-grad pass: a separate `dpo.ref_model` (deleted after),
    the LoRA policy with its adapter disabled, or the policy itself before any update."""
    if cfg.dpo.cache_reference and path.is_file():
        logps = load_file(path)["logps"]
        if logps.shape[0] == len(items):
            return logps, f"reference log-probs: read from the cache {path}"
    score = partial(reference_logps, items=items, pad_id=pad_id,
                    micro_batch_size=cfg.train.micro_batch_size, device=device, precision=precision)
    if cfg.dpo.ref_model:
        ref = CausalLMLogps(load_causal_lm(ModelConfig(name_or_path=cfg.dpo.ref_model)),
                            chunk_size=cfg.train.logprob_chunk_size).to(device)
        logps = score(ref)
        del ref
        gc.collect()
    elif cfg.model.lora.r > 0:
        with policy.model.disable_adapter():
            logps = score(policy)
    else:
        logps = score(policy)
    if cfg.dpo.cache_reference and dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{random.getrandbits(32)}")
        save_file({"logps": logps.contiguous()}, tmp)
        tmp.replace(path)
    dist.barrier()
    return logps, f"reference log-probs: scored {len(items)} items (cache: {path})"


@torch.no_grad()
def evaluate(policy, batches: list[PreferenceBatch], loss_fn, device, precision):
    """(mean loss per pair, reward accuracy) on the held-out pairs; nan when there are none."""
    was_training = policy.training
    policy.eval()
    total, correct, pairs = 0.0, 0.0, 0
    for batch in batches:
        with autocast(device, precision):
            _, m = loss_fn(policy, batch.to(device), group_weights=None)
        total += sum(v for k, v in m.items() if k.startswith("_loss/"))
        correct += sum(v for k, v in m.items() if k.startswith("_correct/"))
        pairs += batch.num_pairs
    policy.train(was_training)
    total, correct, pairs = (dist.all_reduce_sum(x).item() for x in (total, correct, pairs))
    return (total / pairs, correct / pairs) if pairs else (float("nan"), float("nan"))


def run(cfg: DPOConfig) -> dict:
    dist.init()
    device = dist.device()
    tc, dc, run_dir = cfg.train, cfg.dpo, Path(cfg.run.output_dir)
    tc.precision = resolve_precision(tc.precision, device)
    micro_steps = check_batch_sizes(cfg)
    objective = build_objective(dc)
    unpaired = dc.loss == "kto"
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # --- data: preference rows -> chosen/rejected pairs (KTO: unpaired examples) --------------
    tokenizer = load_tokenizer(cfg.model)
    builtin = builtin_preference_rows() if cfg.data.path is None else None
    train_items, eval_items, data_hash = load_preference_data(
        cfg.data, tokenizer, unpaired=unpaired, rows=builtin,
        source="built-in arithmetic preference set" if builtin else None)
    if len(train_items) < tc.batch_size:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) exceeds the {len(train_items)} "
                          "training items; lower it or add data")
    groups = sorted({it.group for it in train_items + eval_items})
    named_groups = groups != [""]
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = len(train_items) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)

    # --- model ----------------------------------------------------------------------------------
    model = load_causal_lm(cfg.model)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    policy = CausalLMLogps(model, chunk_size=tc.logprob_chunk_size).to(device)

    # --- score: reference log-probs once, before any update (and before resume) ----------------
    ref_note = "reference-free loss: no reference model"
    if dc.loss not in REFERENCE_FREE:
        path = reference_cache_path(cfg, data_hash, tokenizer, unpaired)
        logps, ref_note = score_reference(cfg, policy, train_items + eval_items, path,
                                          pad_id=pad_id, device=device, precision=tc.precision)
        for item, row in zip(train_items + eval_items, logps.tolist()):
            item.ref = (row[0], row[1])

    policy = dist.shard(policy)
    policy.train()
    optimizer = build_optimizer(policy, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    group_weights = torch.full((len(groups),), 1.0 / len(groups)) if dc.group_robust else None
    loss_fn = partial(preference_loss, objective=objective, n_groups=len(groups))

    # --- resume: model, optimizer, scheduler, RNG, data position and group weights -------------
    ckpt_root = run_dir / "checkpoints"
    start_step = 0
    if cfg.run.resume:
        last = checkpoint.latest(ckpt_root)
        if last is None:
            raise ConfigError(f"run.resume is true but {ckpt_root} holds no checkpoint")
        state = checkpoint.load(last, model=policy, optimizer=optimizer, scheduler=scheduler)
        start_step = state["step"]
        if group_weights is not None:
            group_weights = torch.tensor(state["group_weights"], dtype=torch.float32)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, total_steps=total_steps, description=f"dpo ({dc.loss})",
                           tensorboard=cfg.run.tensorboard, progress=cfg.run.progress,
                           start_step=start_step)
    logger.print(ref_note)

    collate = lambda items: collate_preference(items, pad_id, groups)  # noqa: E731
    eval_share = eval_items[dist.rank()::dist.world_size()]
    eval_batches = [collate(eval_share[i:i + tc.micro_batch_size])
                    for i in range(0, len(eval_share), tc.micro_batch_size)]
    n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    logger.print(f"dpo ({dc.loss}): {len(train_items)} train / {len(eval_items)} eval items, "
                 f"groups {groups if named_groups else 'none'}, {total_steps} steps of "
                 f"{tc.batch_size}, {n_params / 1e6:.1f}M trainable parameters, {tc.precision} "
                 f"on {device}")
    eval_before = evaluate(policy, eval_batches, loss_fn, device, tc.precision)
    logger.log(start_step, {"eval/loss": eval_before[0], "eval/rewards/accuracy": eval_before[1]})

    # --- train ----------------------------------------------------------------------------------
    history, margins = [], []
    for step in range(start_step, total_steps):
        items = step_items(train_items, step, tc.batch_size, tc.seed)[
            dist.shard_indices(tc.batch_size)]
        micro_batches = [collate(items[i * tc.micro_batch_size:(i + 1) * tc.micro_batch_size])
                         .to(device) for i in range(micro_steps)]
        try:
            m = train_step(policy, micro_batches,
                           loss_fn=partial(loss_fn, group_weights=group_weights),
                           count_units=lambda b: b.num_pairs, optimizer=optimizer,
                           scheduler=scheduler, device=device, precision=tc.precision,
                           max_grad_norm=tc.max_grad_norm)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {step + 1}: {err}") from None
        pairs = m["units"]
        metrics = {"loss/dpo": m["loss"]}
        metrics.update({k if "/" in k else f"{dc.loss}/{k}": v / pairs for k, v in m.items()
                        if k not in TRAIN_STEP_KEYS and not k.startswith("_")})
        group_pairs = torch.tensor([m[f"_pairs/{g}"] for g in range(len(groups))])
        group_loss = torch.tensor([m[f"_loss/{g}"] for g in range(len(groups))])
        if named_groups:
            for g, name in enumerate(groups):
                if group_pairs[g] > 0:
                    name = name or "none"
                    metrics[f"rewards/accuracy/{name}"] = m[f"_correct/{g}"] / group_pairs[g].item()
                    metrics[f"loss/group/{name}"] = (group_loss[g] / group_pairs[g]).item()
        if group_weights is not None:  # mean loss of each group seen this step (0 if absent)
            group_weights, _ = group_robust_weights(group_loss / group_pairs.clamp(min=1),
                                                    group_weights, step_size=dc.group_step_size)
            metrics.update({f"group_weights/{name or 'none'}": w
                            for name, w in zip(groups, group_weights.tolist())})
        metrics.update({"optim/lr": m["lr"], "optim/grad_norm": m["grad_norm"],
                        "pairs/step": pairs, "time/step": m["time/step"],
                        "memory/peak_mb": peak_memory_mb(),
                        "epoch": (step + 1) / steps_per_epoch})
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            metrics["eval/loss"], metrics["eval/rewards/accuracy"] = evaluate(
                policy, eval_batches, loss_fn, device, tc.precision)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == total_steps:
            logger.log(step + 1, metrics)
        history.append(m["loss"])
        margins.append(metrics["rewards/margin"])
        logger.advance(step + 1, f"loss {m['loss']:.4f} acc {metrics['rewards/accuracy']:.2f}")
        if step + 1 == total_steps or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
            state = {"total_steps": total_steps}
            if group_weights is not None:
                state["group_weights"] = group_weights.tolist()
            checkpoint.save(ckpt_root, step + 1, model=policy, optimizer=optimizer,
                            scheduler=scheduler, trainer_state=state, keep_last=cfg.run.keep_last)
    logger.close()

    eval_after = evaluate(policy, eval_batches, loss_fn, device, tc.precision)
    logger.log(total_steps, {"eval/loss": eval_after[0], "eval/rewards/accuracy": eval_after[1]})
    logger.print(f"held-out loss per pair: {eval_before[0]:.4f} -> {eval_after[0]:.4f}; reward "
                 f"accuracy {eval_before[1]:.1%} -> {eval_after[1]:.1%}")
    logger.print(f"run directory: {run_dir} (export with `tether export {run_dir} OUT_DIR`)")
    return {"losses": history, "margins": margins, "eval_before": eval_before,
            "eval_after": eval_after, "group_weights": group_weights, "groups": groups,
            "ref_logps": None if dc.loss in REFERENCE_FREE else
            torch.tensor([it.ref for it in train_items + eval_items]),
            "items": train_items + eval_items, "policy": policy, "tokenizer": tokenizer,
            "run_dir": run_dir}
