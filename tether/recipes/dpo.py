"""Direct preference optimisation and its family: each loss a row of `tether.losses.PREFERENCE_LOSSES`.

Stages: data -> model -> score (reference log-probs once, cached on disk) -> (resume) -> eval ->
[collate -> optimize -> group weights -> log -> checkpoint]* -> eval; each a function, sharing
one `DPORun` (`set_up`). The reference is `tether.engine.reference.load_reference`'s.

Chosen and rejected go through the policy in one forward, their shared prompt run once per pair
and the lm_head on completion tokens only (`tether.engine.reference.sequence_logps`). A
sequence's log-prob is the sum of its completion tokens' log-probs; SimPO, ORPO and IPO use the
per-token mean. A micro-batch's loss is the *sum* over its pairs and the optimizer divides by the
step's pair count, so accumulation is exact. KTO's reference point is one detached estimate per
step (all micro-batches and ranks), from a no-grad forward over the mismatched sequences.

Without `data.path` the run trains on the built-in sentiment pairs and, before and after,
samples completions for held-out prompts: their VADER score (the ground truth) and the KL of the
policy to the reference on them (docs/dpo.md); with `rewards.gold` also every `gold_every` steps,
with the gold score and the warnings of docs/diagnostics.md (`tether.eval.online`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from tether.config import DPOConfig, EvalConfig, PreferenceConfig, choice_error
from tether.data.formats import truncation_counts, truncation_message
from tether.data.preference import (PreferenceBatch, builtin_sentiment_rows, collate_preference,
                                    load_preference_data)
from tether.data.tasks import sentiment
from tether.engine import dist
from tether.engine.logprobs import CausalLMLogps
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import load_causal_lm, load_tokenizer, resolve_model_dir
from tether.engine.optimize import (autocast, build_optimizer, build_scheduler, check_batch_sizes,
                                   step_items, train_step)
from tether.engine.reference import (Reference, cached_pair_logps, items_used, kto_kl,
                                     load_reference, reference_cache_path, reference_logps,
                                     sequence_logps)
from tether.engine.run import Run, init_process
from tether.errors import ConfigError
from tether.eval import online
from tether.eval.evaluate import heldout_metrics
from tether.eval.report import write_report
from tether.losses import (PREFERENCE_LOSSES, PreferenceLoss, group_robust_weights, masked_mean,
                           preference_coefficients)
from tether.rewards import SentimentReward


# --- the objective: (seq, batch) -> (per-pair loss (B,), metrics, per-pair reward margin (B,)) ---
# seq["sum"] holds the policy's and the reference's summed log-probs (pc, pr, rc, rr), seq["mean"]
# their per-token means; the reference's are None when the loss is reference-free (KTO: rr None).


def _paired(row: PreferenceLoss, coefficients: dict, seq, batch):
    pc, pr, rc, rr = seq[row.logps]  # (B,) each
    kw = coefficients if batch.label_smoothing is None else \
        {**coefficients, "label_smoothing": batch.label_smoothing}  # soft labels, one per pair
    if row.reference:
        loss, metrics = row.fn(pc, pr, rc, rr, **kw)
        return loss, metrics, (pc - rc) - (pr - rr)
    loss, metrics = row.fn(pc, pr, **kw)
    return loss, metrics, pc - pr


def _unpaired(row: PreferenceLoss, coefficients: dict, seq, batch):
    pc, _, rc, _ = seq[row.logps]  # (B,) the examples and their reference
    loss, metrics = row.fn(pc, rc, batch.desirable, batch.kl, **coefficients)
    metrics["logps/chosen"] = masked_mean(pc.detach(), batch.desirable).item()
    metrics["logps/rejected"] = masked_mean(pc.detach(), ~batch.desirable).item()
    ratio = pc - rc  # (B,)
    return loss, metrics, torch.where(batch.desirable, ratio, -ratio)


@dataclass(frozen=True)
class Objective:
    """The loss picked once by name, with its coefficients resolved (a null one takes the
    loss's paper default)."""
    name: str
    row: PreferenceLoss
    coefficients: dict[str, float]  # keyword -> value, as the loss function takes them

    def __call__(self, seq, batch):
        adapt = _paired if self.row.paired else _unpaired
        return adapt(self.row, self.coefficients, seq, batch)

    @property
    def summary(self) -> str:
        """The loss and its resolved coefficients, for the run's first line."""
        return ", ".join([self.name, *(f"{k}={v:g}" for k, v in self.coefficients.items())])


TRAIN_STEP_KEYS = {"loss", "units", "grad_norm", "lr", "seconds"}


def build_objective(dc: PreferenceConfig) -> Objective:
    """The loss picked once by name; coefficients checked here, not inside the loop."""
    if dc.loss not in PREFERENCE_LOSSES:
        raise choice_error("dpo.loss", dc.loss, list(PREFERENCE_LOSSES))
    row = PREFERENCE_LOSSES[dc.loss]
    if dc.soft_label_key and not row.soft_labels:
        raise ConfigError(f"dpo.soft_label_key needs dpo.loss "
                          f"{' or '.join(n for n, r in PREFERENCE_LOSSES.items() if r.soft_labels)}"
                          f", not '{dc.loss}'")
    if dc.loss == "cdpo" and not dc.soft_label_key and not 0 < dc.label_smoothing <= 0.5:
        raise ConfigError("dpo.loss=cdpo needs 0 < dpo.label_smoothing <= 0.5")
    if dc.loss == "robust" and not 0 <= dc.label_smoothing < 0.5:
        raise ConfigError("dpo.loss=robust needs 0 <= dpo.label_smoothing < 0.5")
    given = {key: getattr(dc, key) for key in row.coefficients}
    return Objective(dc.loss, row, preference_coefficients(dc.loss, given))


def preference_loss(policy: CausalLMLogps, batch: PreferenceBatch, *, objective: Callable,
                    group_weights: torch.Tensor | None, n_groups: int) -> tuple[torch.Tensor, dict]:
    """Summed (group-weighted) loss of the batch's pairs; metrics are sums over pairs. KTO
    (batch.kl set) forwards only the examples: the mismatched rows were scored by `kto_kl`.
    A pair's prompt runs once for both of its sequences."""
    B, kto = batch.num_pairs, batch.kl is not None
    rows = slice(0, B) if kto else slice(None)
    sums, counts = sequence_logps(policy, *batch.trimmed(rows), prompt_len=batch.prompt_len,
                                  share_prompts=not kto)  # (2B,) or (B,)
    counts = counts.clamp(min=1)
    ref = batch.ref_logps  # (2B,), (B,) or None
    rc, rr = (None, None) if ref is None else (ref[:B], ref[B:] if batch.kl is None else None)
    seq = {"sum": (sums[:B], sums[B:], rc, rr),
           "mean": (sums[:B] / counts[:B], sums[B:] / counts[B:],
                    None if rc is None else rc / counts[:B],
                    None if rr is None else rr / counts[B:])}
    loss, metrics, margin = objective(seq, batch)  # (B,), dict of means, (B,)
    weights = torch.ones_like(loss) if group_weights is None \
        else group_weights.to(loss.device)[batch.group_ids] * n_groups  # uniform -> 1 per pair
    correct = (margin.detach() > 0).float()
    means = {"logps/chosen": sums[:B].detach().mean().item(),
             "logps/rejected": sums[B:].detach().mean().item() if batch.kl is None else 0.0,
             **metrics, "rewards/accuracy": correct.mean().item()}
    out = {k: v * B for k, v in means.items()}  # sums over pairs; the recipe divides by the total
    for g in range(n_groups):
        sel = batch.group_ids == g
        out[f"_pairs/{g}"] = sel.sum().item()
        out[f"_correct/{g}"] = correct[sel].sum().item()
        out[f"_loss/{g}"] = loss.detach()[sel].sum().item()
    return (loss * weights).sum(), out


# --- reference log-probs: one no-grad pass before training, cached on disk ---------------------


def reference_of(cfg: DPOConfig, policy: CausalLMLogps) -> Reference:
    """`dpo.ref_model` (loaded for each use, then freed); with LoRA the policy with its adapter
    disabled (no copy); otherwise the policy itself while it has not been updated, or its initial
    weights loaded again (then freed) once it has trained."""
    return load_reference(cfg.model, policy, needed=True, ref_model=cfg.dpo.ref_model,
                          resident=False, chunk_size=cfg.train.logprob_chunk_size)


def score_reference(cfg: DPOConfig, policy: CausalLMLogps, items: list, needed: list[int],
                    path: Path, *, pad_id, device, precision: str) -> tuple[torch.Tensor, str]:
    """(N, 2) reference log-probs of the items (NaN for items this run never uses), from the
    cache at `path` where it has them, else a no-grad pass over the needed ones it lacks (with a
    separate `dpo.ref_model`, deleted after; the LoRA policy with its adapter disabled; or the
    policy itself before any update)."""
    reference = reference_of(cfg, policy)
    score = lambda missing: reference.apply(partial(  # noqa: E731
        reference_logps, items=[items[i] for i in missing], pad_id=pad_id,
        micro_batch_size=cfg.train.micro_batch_size, device=device, precision=precision,
        multiple=cfg.data.pad_to_multiple_of),
        policy_unchanged=True)
    return cached_pair_logps(len(items), needed, path, use_cache=cfg.dpo.cache_reference,
                             score=score)


@torch.no_grad()
def evaluate(policy, batches: list[PreferenceBatch], loss_fn, device, precision, *, kto: bool):
    """(mean loss per pair, reward accuracy) on held-out pairs (nan: none); ends in train mode."""
    policy.eval()
    if kto:  # the reference point from all held-out mismatched sequences
        kl = kto_kl(policy, batches, device, precision)
        batches = [replace(b, kl=kl) for b in batches]
    total, correct, pairs = 0.0, 0.0, 0
    for batch in batches:
        with autocast(device, precision):
            _, m = loss_fn(policy, batch.to(device), group_weights=None)
        total += sum(v for k, v in m.items() if k.startswith("_loss/"))
        correct += sum(v for k, v in m.items() if k.startswith("_correct/"))
        pairs += batch.num_pairs
    policy.train()
    total, correct, pairs = (dist.all_reduce_sum(x).item() for x in (total, correct, pairs))
    return (total / pairs, correct / pairs) if pairs else (float("nan"), float("nan"))


# --- held-out generations: ground-truth score, KL to the reference, online diagnostics ------


IN_RUN_KEYS = ("kl/k1", "kl/k3", "completions/mean_length", "completions/distinct_2",
               "policy/entropy", "gold/mean", "eval/sentiment")  # what a DPO run logs of them


def heldout_generations(cfg: DPOConfig, policy: CausalLMLogps, tokenizer, prompts: list, *,
                        initial: bool, gold=None) -> tuple[dict[str, float], list[dict]]:
    """One completion per held-out prompt sampled from the policy (`cfg.generation`'s backend,
    temperature 1, a seeded generator of its own: the training RNG is untouched), each rank an
    equal share, scored by `tether eval`'s path (`evaluate.heldout_metrics`): kl/k1 (the mean of
    log pi(y|x) - log ref(y|x) summed over the completion: a sampled estimate of the
    sequence-level KL(policy || reference), 0 while the policy is the reference), kl/k3,
    policy/entropy, completions/mean_length, completions/distinct_2, gold/mean with a gold
    function, and on the built-in set `eval/sentiment` (mean VADER compound); and the
    samples.jsonl rows of the first SAMPLES_KEPT prompts. ({}, []) without prompts."""
    prompts = prompts[:len(prompts) - len(prompts) % dist.world_size()]  # equal shares
    if not prompts:
        return {}, []
    share = prompts[dist.rank()::dist.world_size()]
    reference = None if initial and not cfg.dpo.ref_model else \
        partial(reference_of(cfg, policy).apply, policy_unchanged=initial)
    sampler = EvalConfig(samples_per_prompt=1, max_new_tokens=sentiment.MAX_NEW_TOKENS,
                         temperature=1.0, top_p=1.0, batch_size=len(share),  # one batch
                         seed=cfg.train.seed + 7919 * (dist.rank() + 1), generation=cfg.generation)
    held = heldout_metrics(
        policy, tokenizer, [{"prompt": p} for p in share], sampler, gold=gold, reference=reference,
        scores={"eval/sentiment": SentimentReward()} if cfg.data.path is None else None,
        micro_batch_size=cfg.train.micro_batch_size, precision=cfg.train.precision)
    metrics = {k: held.metrics[k] for k in IN_RUN_KEYS if k in held.metrics}
    return metrics, online.sample_rows(share, held.samples.texts, gold=held.gold)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class DPORun:
    """What every stage of a run reads, set up once (`set_up`)."""
    cfg: DPOConfig
    objective: Objective
    tokenizer: object
    train_items: list  # PreferenceItem (paired) or unpaired KTO items
    eval_items: list
    heldout: list  # prompts sampled before / after (and every gold_every steps)
    groups: list[str]  # the items' group names, sorted ([""]: none)
    total_steps: int
    steps_per_epoch: int
    micro_steps: int  # micro-batches per rank per step
    policy: CausalLMLogps
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable  # (policy, batch, group_weights=) -> (summed loss, metric sums)
    collate: Callable  # items -> PreferenceBatch
    eval_batches: list[PreferenceBatch]  # this rank's equal share of the held-out items
    truncated: dict[str, int]  # data/truncated_* counts over every item
    ref_note: str  # where the reference log-probs came from
    t_ref: float  # seconds spent on them
    device: torch.device
    diag: online.Diagnostics | None = None  # once the run has started (`start`)

    @property
    def unpaired(self) -> bool:
        return not self.objective.row.paired

    @property
    def named_groups(self) -> bool:
        return self.groups != [""]

    def evaluate(self) -> tuple[float, float]:
        """(mean loss per pair, reward accuracy) on the held-out pairs."""
        return evaluate(self.policy, self.eval_batches, self.loss_fn, self.device,
                        self.cfg.train.precision, kto=self.unpaired)

    def generations(self, *, initial: bool) -> tuple[dict[str, float], list[dict]]:
        """Sampled held-out completions: their diagnostics and sample rows."""
        return heldout_generations(self.cfg, self.policy, self.tokenizer, self.heldout,
                                   initial=initial, gold=self.diag.gold)


def load_data(cfg: DPOConfig, tokenizer, unpaired: bool) -> tuple[list, list, str, list]:
    """(train items, eval items, data hash, held-out prompts): preference rows -> chosen/rejected
    pairs (KTO: unpaired examples), or the built-in sentiment pairs and held-out prompts."""
    tc, dc = cfg.train, cfg.dpo
    builtin = builtin_sentiment_rows() if cfg.data.path is None else None
    train_items, eval_items, data_hash = load_preference_data(
        cfg.data, tokenizer, unpaired=unpaired, rows=builtin, soft_label_key=dc.soft_label_key,
        source="built-in sentiment preference set" if builtin else None)
    n_gen = cfg.run.eval_generations if builtin or cfg.rewards.gold else 0  # held-out prompts
    heldout = [r["prompt"] for r in sentiment.heldout_prompts(n_gen)] if builtin else \
        online.item_prompts(eval_items, tokenizer)[:n_gen]
    if len(train_items) < tc.batch_size:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) exceeds the {len(train_items)} "
                          "training items; lower it or add data")
    return train_items, eval_items, data_hash, heldout


def load_policy(cfg: DPOConfig, device) -> CausalLMLogps:
    model = load_causal_lm(cfg.model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return CausalLMLogps(model, chunk_size=cfg.train.logprob_chunk_size).to(device)


def reference_stage(cfg: DPOConfig, objective: Objective, policy: CausalLMLogps, tokenizer,
                    items: list, n_train: int, data_hash: str, total_steps: int,
                    device) -> tuple[str, float]:
    """Score: each item's reference log-probs (`item.ref`), once, before any update (and before
    resume), for the items the run uses, cached on disk -> (a note, seconds)."""
    tc, unpaired = cfg.train, not objective.row.paired
    ref_note, t_ref = "reference-free loss: no reference model", time.perf_counter()
    if objective.row.reference:
        path = reference_cache_path(resolve_model_dir(reference_of(cfg, policy).source),
                                    data_hash, cfg.data.max_length,
                                    cfg.data.truncation, tokenizer.name_or_path, tc.precision,
                                    "unpaired" if unpaired else "paired",
                                    *([cfg.data.pad_to_multiple_of]
                                      if cfg.data.pad_to_multiple_of > 1 else []))
        needed = items_used(n_train, len(items) - n_train, total_steps, tc.batch_size, tc.seed)
        logps, ref_note = score_reference(cfg, policy, items, needed, path,
                                          pad_id=tokenizer.pad_token_id, device=device,
                                          precision=tc.precision)
        for item, row in zip(items, logps.tolist()):
            item.ref = (row[0], row[1])
    return ref_note, time.perf_counter() - t_ref


def set_up(cfg: DPOConfig) -> DPORun:
    """Data, the policy, the reference log-probs, the optimizer and its schedule."""
    tc = cfg.train
    device = init_process(tc)
    micro_steps = check_batch_sizes(cfg)
    objective = build_objective(cfg.dpo)
    unpaired = not objective.row.paired
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    tokenizer = load_tokenizer(cfg.model)
    train_items, eval_items, data_hash, heldout = load_data(cfg, tokenizer, unpaired)
    every_item = train_items + eval_items
    groups = sorted({it.group for it in every_item})
    steps_per_epoch = len(train_items) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)

    policy = load_policy(cfg, device)
    ref_note, t_ref = reference_stage(cfg, objective, policy, tokenizer, every_item,
                                      len(train_items), data_hash, total_steps, device)
    policy = dist.shard(policy)
    policy.train()
    optimizer = build_optimizer(policy, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    loss_fn = partial(preference_loss, objective=objective, n_groups=len(groups))
    collate = partial(collate_preference, pad_id=tokenizer.pad_token_id, groups=groups,
                      multiple=cfg.data.pad_to_multiple_of)
    eval_share = eval_items[:len(eval_items) - len(eval_items) % dist.world_size()][
        dist.rank()::dist.world_size()]  # equal shares: the same number of forwards per rank
    eval_batches = [collate(eval_share[i:i + tc.micro_batch_size])
                    for i in range(0, len(eval_share), tc.micro_batch_size)]
    truncated = truncation_counts([it.sequences[:1] if unpaired else it.sequences
                                   for it in every_item])  # KTO: an example's, not its KL one
    return DPORun(cfg, objective, tokenizer, train_items, eval_items, heldout, groups,
                  total_steps, steps_per_epoch, micro_steps, policy, optimizer, scheduler,
                  loss_fn, collate, eval_batches, truncated, ref_note, t_ref, device)


def start(r: DPORun) -> tuple[Run, torch.Tensor | None]:
    """The run: lock, resume (model, optimizer, scheduler, RNG, data position, group weights),
    logger, diagnostics, the first lines -> (the session, the group weights to start from)."""
    cfg, tc, dc = r.cfg, r.cfg.train, r.cfg.dpo
    group_weights = torch.full((len(r.groups),), 1.0 / len(r.groups)) if dc.group_robust \
        else None
    session = Run.start(cfg, f"dpo ({dc.loss})", r.total_steps, model=r.policy,
                        optimizer=r.optimizer, scheduler=r.scheduler)
    logger = session.logger
    if group_weights is not None and session.resumed:
        group_weights = torch.tensor(session.state["group_weights"], dtype=torch.float32)
    logger.print(r.ref_note)
    r.diag = online.Diagnostics(cfg.rewards, cfg.diagnostics, Path(cfg.run.output_dir),
                                start_step=session.step, proxy="rewards/margin")
    n_params = sum(p.numel() for p in r.policy.parameters() if p.requires_grad)
    logger.print(f"dpo ({r.objective.summary}): {len(r.train_items)} train / "
                 f"{len(r.eval_items)} eval items, "
                 f"groups {r.groups if r.named_groups else 'none'}, {r.total_steps} steps of "
                 f"{tc.batch_size}, {n_params / 1e6:.1f}M trainable parameters, {tc.precision} "
                 f"on {r.device}")
    n_items = len(r.train_items) + len(r.eval_items)
    if note := truncation_message(r.truncated, n_items, cfg.data.max_length):
        logger.print(note)
    return session, group_weights


# --- the stages of a step ----------------------------------------------------------------------


def collate_step(r: DPORun, step: int) -> list[PreferenceBatch]:
    """This rank's share of the step's items, as micro-batches on the device."""
    tc = r.cfg.train
    items = step_items(r.train_items, step, tc.batch_size, tc.seed)[
        dist.shard_indices(tc.batch_size)]
    return [r.collate(items[i * tc.micro_batch_size:(i + 1) * tc.micro_batch_size]).to(r.device)
            for i in range(r.micro_steps)]


def optimize(r: DPORun, step: int, micro_batches: list[PreferenceBatch],
             group_weights: torch.Tensor | None) -> tuple[dict, list[PreferenceBatch], float]:
    """One optimizer step over the micro-batches (KTO: one detached reference point for the
    whole step, all ranks) -> (`train_step` metrics, the batches, seconds)."""
    tc = r.cfg.train
    t0 = time.perf_counter()
    if r.unpaired:  # KTO: one detached reference point for the whole step (all ranks)
        kl = kto_kl(r.policy, micro_batches, r.device, tc.precision)
        micro_batches = [replace(b, kl=kl) for b in micro_batches]
    try:
        m = train_step(r.policy, micro_batches,
                       loss_fn=partial(r.loss_fn, group_weights=group_weights),
                       count_units=lambda b: b.num_pairs, optimizer=r.optimizer,
                       scheduler=r.scheduler, device=r.device, precision=tc.precision,
                       max_grad_norm=tc.max_grad_norm)
    except FloatingPointError as err:
        raise FloatingPointError(f"step {step + 1}: {err}") from None
    return m, micro_batches, time.perf_counter() - t0


def reweigh_groups(r: DPORun, m: dict, group_weights: torch.Tensor | None
                   ) -> torch.Tensor | None:
    """Group-robust weights (`dpo.group_robust`) from the mean loss of each group seen this
    step (0 if absent); None without."""
    if group_weights is None:
        return None
    group_pairs = torch.tensor([m[f"_pairs/{g}"] for g in range(len(r.groups))])
    group_loss = torch.tensor([m[f"_loss/{g}"] for g in range(len(r.groups))])
    group_weights, _ = group_robust_weights(group_loss / group_pairs.clamp(min=1),
                                            group_weights, step_size=r.cfg.dpo.group_step_size)
    return group_weights


def step_metrics(r: DPORun, step: int, m: dict, micro_batches: list[PreferenceBatch],
                 step_time: float, group_weights: torch.Tensor | None) -> dict[str, float]:
    """The step's metrics (docs/metrics.md): per-pair means, each named group's, the group
    weights, throughput."""
    dc, groups, named_groups, steps_per_epoch = r.cfg.dpo, r.groups, r.named_groups, \
        r.steps_per_epoch
    pairs = m["units"]
    tokens = dist.all_reduce_sum(sum(int(b.attention_mask.sum()) for b in micro_batches))
    metrics = {"loss/dpo": m["loss"]}
    metrics.update({k if "/" in k else f"{dc.loss}/{k}": v / pairs for k, v in m.items()
                    if k not in TRAIN_STEP_KEYS and not k.startswith("_")})
    group_pairs = torch.tensor([m[f"_pairs/{g}"] for g in range(len(groups))])
    group_loss = torch.tensor([m[f"_loss/{g}"] for g in range(len(groups))])
    for g, name in enumerate(groups if named_groups else []):  # pairs of each named group
        if group_pairs[g] > 0:
            pairs_g, name = group_pairs[g].item(), name or "none"
            metrics[f"rewards/accuracy/{name}"] = m[f"_correct/{g}"] / pairs_g
            metrics[f"loss/group/{name}"] = group_loss[g].item() / pairs_g
    if group_weights is not None:  # after this step's update (`reweigh_groups`)
        metrics.update({f"group_weights/{name or 'none'}": w
                        for name, w in zip(groups, group_weights.tolist())})
    metrics.update({"optim/lr": m["lr"], "optim/grad_norm": m["grad_norm"],
                    "pairs/step": pairs, "timing/update": step_time,
                    "tokens/per_second": tokens.item() / step_time,
                    "memory/peak_mb": peak_memory_mb(),
                    "epoch": (step + 1) / steps_per_epoch})
    return metrics


def log(r: DPORun, session: Run, step: int, metrics: dict[str, float]) -> None:
    """Held-out loss when due, gold and the sampled diagnostics when due, the metrics line
    when due, the progress line."""
    cfg = r.cfg
    if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
        metrics["eval/loss"], metrics["eval/rewards/accuracy"] = r.evaluate()
    if r.diag.gold_due(step + 1):  # gold and the sampled diagnostics on the held-out prompts
        metrics.update(r.generations(initial=False)[0])
    if (step + 1) % cfg.run.log_every == 0 or step + 1 == r.total_steps:
        r.diag.log(session.logger, step + 1, metrics)
    session.logger.advance(step + 1, f"loss {metrics['loss/dpo']:.4f} "
                                     f"acc {metrics['rewards/accuracy']:.2f}")


def summarise(r: DPORun, session: Run, eval_before, eval_after, gen_before, gen_after) -> None:
    """Held-out loss and reward accuracy, sentiment and KL before -> after."""
    logger = session.logger
    if r.eval_batches:
        logger.print(f"held-out loss per pair: {eval_before[0]:.4f} -> {eval_after[0]:.4f}; "
                     f"reward accuracy {eval_before[1]:.1%} -> {eval_after[1]:.1%}")
    if "eval/sentiment" in gen_after:
        logger.print(f"held-out sentiment ({len(r.heldout)} sampled completions, VADER "
                     f"compound): {gen_before['eval/sentiment']:+.3f} -> "
                     f"{gen_after['eval/sentiment']:+.3f}; KL(policy || reference) "
                     f"{gen_before['kl/k1']:.2f} -> {gen_after['kl/k1']:.2f} nats per "
                     "completion")


# --- the loop ----------------------------------------------------------------------------------


def run(cfg: DPOConfig) -> dict:
    r = set_up(cfg)
    session, group_weights = start(r)
    eval_before = r.evaluate()
    gen_before, samples = r.generations(initial=session.step == 0)
    r.diag.log(session.logger, session.step, {
        "eval/loss": eval_before[0], "eval/rewards/accuracy": eval_before[1], **gen_before,
        "timing/reference": r.t_ref, **r.truncated}, samples)

    history, margins = [], []
    for step in session.steps():  # Ctrl-C: save, stop
        micro_batches = collate_step(r, step)
        m, micro_batches, step_time = optimize(r, step, micro_batches, group_weights)
        group_weights = reweigh_groups(r, m, group_weights)
        metrics = step_metrics(r, step, m, micro_batches, step_time, group_weights)
        log(r, session, step, metrics)
        history.append(m["loss"])
        margins.append(metrics["rewards/margin"])
        session.save(step + 1, **({} if group_weights is None else  # when due
                                  {"group_weights": group_weights.tolist()}))
    session.logger.close()

    eval_after = r.evaluate()
    gen_after, samples = r.generations(initial=False)
    r.diag.log(session.logger, r.total_steps, {
        "eval/loss": eval_after[0], "eval/rewards/accuracy": eval_after[1], **gen_after}, samples)
    summarise(r, session, eval_before, eval_after, gen_before, gen_after)
    session.finish(write_report)
    every_item = r.train_items + r.eval_items
    return {"losses": history, "margins": margins, "eval_before": eval_before,
            "eval_after": eval_after, "generations_before": gen_before,
            "generations_after": gen_after, "group_weights": group_weights, "groups": r.groups,
            "ref_logps": None if not r.objective.row.reference else
            torch.tensor([it.ref for it in every_item]), "items": every_item,
            "policy": r.policy, "tokenizer": r.tokenizer, "run_dir": Path(cfg.run.output_dir)}
