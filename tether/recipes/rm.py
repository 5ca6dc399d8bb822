"""Reward modelling: a sequence classifier with one score, trained with Bradley-Terry on pairs.

Stages: data -> model -> (resume) -> eval -> [collate -> optimize -> log -> checkpoint]* -> eval
-> save RUN_DIR/reward_model.

The model is `AutoModelForSequenceClassification` (num_labels=1) on any causal LM: the backbone
comes from the causal LM's weights, the `score` head (hidden -> 1) is new. transformers reads the
score at the rightmost token that is not the pad token, so the saved model scores exactly as in
training. Chosen and rejected go through one forward (2B rows); the loss is
    -log sigmoid(r_c - r_r - m) + rm.center_coef * (r_c + r_r)^2
summed over the pairs of a micro-batch and divided by the global number of pairs in the step
(`tether.engine.optimize`). Held-out metrics: accuracy P(r_c > r_r), mean margin r_c - r_r and the
expected calibration error of sigmoid(r_c - r_r) (docs/metrics.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from tether.config import DataConfig, RMConfig
from tether.data.collate import Example, pad_collate
from tether.data.formats import (Rows, check_not_null, read_rows, split_indices,
                                 truncation_counts, truncation_message, validate_row)
from tether.data.preference import drop_identical_pairs, tokenize_pair
from tether.engine import checkpoint, dist
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import freeze_trunk, load_reward_model, load_tokenizer, unwrap
from tether.engine.optimize import (autocast, build_optimizer, build_scheduler, check_batch_sizes,
                                   step_items, train_step)
from tether.engine.run import Run, init_process
from tether.errors import ConfigError, DataError
from tether.eval.report import write_report
from tether.losses import bradley_terry_loss
from tether.recipes.preference_set import build as build_prefs

ECE_BINS = 5

# ------------------------------------------------------------------------------ data


@dataclass
class RewardPair:
    chosen: Example  # prompt + chosen completion
    rejected: Example  # prompt + rejected completion
    margin: float = 0.0  # m in -log sigmoid(r_c - r_r - m); 0 without rm.margin_key
    gold: tuple[float, float] | None = None  # the row's score_chosen, score_rejected, if numbers


@dataclass
class PairBatch:
    """B pairs as 2B rows: rows [:B] chosen, rows [B:] rejected, right-padded to one length."""
    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) bool, True on real tokens
    margin: torch.Tensor | None  # (B,) fp32 per-pair margins; None without rm.margin_key
    gold: list[float | None] | None = None  # (2B,) gold score per row (held-out Spearman)

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device),
                         None if self.margin is None else self.margin.to(device), self.gold)


def tokenize_reward_rows(rows: Rows, tokenizer, cfg: DataConfig, source: str,
                         margin_key: str | None) -> list[RewardPair]:
    """Validate preference rows and tokenise prompt + chosen / prompt + rejected (prompt and
    completion tokenised separately and joined, as in SFT and DPO)."""
    pairs = []
    for number, row in rows:
        fmt = validate_row(row, source, number)
        if fmt != "preference":
            check_not_null(row, ("preference",), {"source": source, "row": number})
            raise DataError(f"is a {fmt.replace('_', ' ')} row; `tether rm` takes preference "
                            "rows ('chosen' + 'rejected', optional 'prompt')",
                            source=source, row=number)
        margin = 0.0
        if margin_key is not None:
            value = row.get(margin_key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise DataError(f"must be a finite number (rm.margin_key), got {value!r}",
                                source=source, row=number, field=margin_key)
            margin = float(value)
        pair = tokenize_pair(row, tokenizer, max_length=cfg.max_length,
                             truncation=cfg.truncation, source=source, row_index=number)
        pairs.append(RewardPair(pair.chosen, pair.rejected, margin, gold_scores(row)))
    return pairs


def gold_scores(row: dict) -> tuple[float, float] | None:
    """(score_chosen, score_rejected): the gold scores `tether prefs` writes beside each pair."""
    values = row.get("score_chosen"), row.get("score_rejected")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             for v in values)
    return (float(values[0]), float(values[1])) if ok else None


def load_reward_pairs(cfg: DataConfig, tokenizer, *, margin_key: str | None = None
                      ) -> tuple[list[RewardPair], list[RewardPair]]:
    """(train, eval) pairs from cfg.path; eval from cfg.eval_path or a seeded `eval_fraction`
    hold-out of whole rows. Every row is checked before training starts."""
    if cfg.path is None:
        raise DataError("no data: set data.path")
    numbered, source = read_rows(cfg.path, split=cfg.split), str(cfg.path)
    if not numbered:
        raise DataError("holds no rows", source=source)
    numbered = drop_identical_pairs(numbered, tokenizer, source)
    tok = partial(tokenize_reward_rows, tokenizer=tokenizer, cfg=cfg, margin_key=margin_key)
    if cfg.eval_path is not None:
        held = drop_identical_pairs(read_rows(cfg.eval_path, split=cfg.split), tokenizer,
                                    str(cfg.eval_path))
        return tok(numbered, source=source), tok(held, source=str(cfg.eval_path))
    train_idx, eval_idx = split_indices(len(numbered), cfg.eval_fraction)
    return (tok([numbered[i] for i in train_idx], source=source),
            tok([numbered[i] for i in eval_idx], source=source))


def collate_pairs(pairs: list[RewardPair], pad_id: int, with_margin: bool) -> PairBatch:
    padded = pad_collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32) if with_margin else None
    gold = [p.gold[0] if p.gold else None for p in pairs] + \
        [p.gold[1] if p.gold else None for p in pairs]
    return PairBatch(padded.input_ids, padded.attention_mask, margin, gold)


# ------------------------------------------------------------------------------ maths


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 rewards: the score head read at each row's last non-pad token."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, 0].float()


def rm_loss(model, batch: PairBatch, *, center_coef: float) -> tuple[torch.Tensor, dict]:
    """Summed Bradley-Terry loss of the batch's pairs (the optimizer divides by global pairs);
    metrics are sums over pairs too."""
    scores = sequence_scores(model, batch.input_ids, batch.attention_mask)  # (2B,)
    B = batch.num_pairs
    loss, m = bradley_terry_loss(scores[:B], scores[B:], margin=batch.margin,
                                 center_coef=center_coef)
    return loss.sum(), {"rm/accuracy": m["accuracy"] * B, "rm/margin": m["margin"] * B,
                        "rm/score_chosen": m["scores/chosen"] * B,
                        "rm/score_rejected": m["scores/rejected"] * B}


def calibration_table(diff: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """(bins, 3) rows [count, sum of confidence, sum of correct] of the predicted winner.

    p = sigmoid(r_c - r_r) is the model's probability that the chosen wins; the predicted winner
    is chosen when p > 0.5, with confidence c = max(p, 1 - p) in [0.5, 1]; it is correct when
    r_c > r_r. Bin b holds the pairs with c in [0.5 + b/(2 bins), 0.5 + (b+1)/(2 bins)).
    Tables from several batches or ranks add up.
    """
    p = torch.sigmoid(diff.double())
    conf = torch.maximum(p, 1 - p)
    correct = (diff > 0).double()
    index = ((conf - 0.5) * 2 * bins).floor().long().clamp(0, bins - 1)
    table = torch.zeros(bins, 3, dtype=torch.float64)
    table.index_add_(0, index, torch.stack([torch.ones_like(conf), conf, correct], dim=1))
    return table


def expected_calibration_error(table: torch.Tensor) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum correct_b - sum conf_b| / N."""
    n = table[:, 0].sum().item()
    return (table[:, 2] - table[:, 1]).abs().sum().item() / n if n else float("nan")


def spearman_with_gold(scored: list[tuple[tuple[int, ...], float, float]]) -> float:
    """Spearman rank correlation of the reward-model score with the gold score over the distinct
    held-out sequences (a completion in several pairs counts once); nan with fewer than 3 or when
    either is constant. `scored`: (token ids, score, gold) per sequence."""
    from scipy.stats import spearmanr

    unique = {ids: (score, gold) for ids, score, gold in scored}
    if len(unique) < 3:
        return float("nan")
    scores, golds = zip(*unique.values())
    if len(set(scores)) < 2 or len(set(golds)) < 2:
        return float("nan")
    return float(spearmanr(scores, golds).statistic)


@torch.no_grad()
def evaluate(model, batches: list[PairBatch], device, precision: str) -> dict[str, float]:
    """eval/accuracy, eval/margin, eval/ece over the held-out pairs (nan when there are none),
    and eval/spearman when the pairs carry gold scores."""
    was_training = model.training
    model.eval()
    table, margin_sum, scored = torch.zeros(ECE_BINS, 3, dtype=torch.float64), 0.0, []
    for batch in batches:
        golds = batch.gold if batch.gold and any(g is not None for g in batch.gold) else []
        rows = [tuple(r[m].tolist()) for r, m in zip(batch.input_ids, batch.attention_mask)] \
            if golds else []
        batch = batch.to(device)
        with autocast(device, precision):
            scores = sequence_scores(model, batch.input_ids, batch.attention_mask)
        diff = (scores[:batch.num_pairs] - scores[batch.num_pairs:]).cpu()
        table += calibration_table(diff)
        margin_sum += diff.sum().item()
        scored += [(row, score, gold) for row, score, gold
                   in zip(rows, scores.tolist(), golds) if gold is not None]
    model.train(was_training)
    table = dist.all_reduce_sum(table).cpu()
    n, margin_sum = table[:, 0].sum().item(), dist.all_reduce_sum(margin_sum).item()
    if not n:
        return {"eval/accuracy": float("nan"), "eval/margin": float("nan"),
                "eval/ece": float("nan")}
    out = {"eval/accuracy": table[:, 2].sum().item() / n, "eval/margin": margin_sum / n,
           "eval/ece": expected_calibration_error(table)}
    scored = [item for share in dist.all_gather_objects(scored) for item in share]
    if scored:
        out["eval/spearman"] = spearman_with_gold(scored)
    return out


# ------------------------------------------------------------------------------ the loop


def load_data(cfg: RMConfig, tokenizer) -> tuple[list[RewardPair], list[RewardPair], Callable,
                                                list[PairBatch]]:
    """(train pairs, eval pairs, collate, this rank's held-out batches): preference rows ->
    (chosen, rejected) token sequences; without data.path the built set (sampled, ordered by
    gold, cached: `tether prefs`)."""
    tc = cfg.train
    if cfg.data.path is None:
        train_path, held_path = build_prefs(cfg.prefs, precision=tc.precision,
                                            progress=cfg.run.progress, say=print)
        cfg.data = replace(cfg.data, path=str(train_path), eval_path=str(held_path))
    train_pairs, eval_pairs = load_reward_pairs(cfg.data, tokenizer, margin_key=cfg.rm.margin_key)
    if len(train_pairs) < tc.batch_size:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) exceeds the {len(train_pairs)} "
                          "training pairs; lower it or add data")
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id,
                      with_margin=cfg.rm.margin_key is not None)
    eval_share = eval_pairs[dist.rank()::dist.world_size()]
    eval_batches = [collate(eval_share[i:i + tc.micro_batch_size])
                    for i in range(0, len(eval_share), tc.micro_batch_size)]
    return train_pairs, eval_pairs, collate, eval_batches


def load_model(cfg: RMConfig, pad_id: int, device):
    """Causal LM backbone + new score head, fp32 master weights (rm.train_layers: the top
    layers only); in train mode."""
    model = load_reward_model(cfg.model, pad_id)
    if cfg.rm.train_layers is not None:
        freeze_trunk(model, cfg.rm.train_layers)
    if cfg.train.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable()
    model = dist.shard(model.to(device))
    return model.train()


def save(model, tokenizer, out_dir: Path):
    """A plain HF directory that AutoModelForSequenceClassification loads (LoRA: the adapter
    folded in, the score head kept) -> the model saved."""
    if dist.world_size() == 1 and dist.is_main():  # under FSDP2: `tether export` from checkpoints
        if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapter in, keep the score head
            model = model.merge_and_unload()
        checkpoint.export(model.eval(), tokenizer, out_dir, force=True)  # its own output
    dist.barrier()
    return model


def run(cfg: RMConfig) -> dict:
    tc, run_dir = cfg.train, Path(cfg.run.output_dir)
    device = init_process(tc)
    micro_steps = check_batch_sizes(cfg)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # --- data and model -------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs, collate, eval_batches = load_data(cfg, tokenizer)
    steps_per_epoch = len(train_pairs) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)
    model = load_model(cfg, tokenizer.pad_token_id, device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    loss_fn = partial(rm_loss, center_coef=cfg.rm.center_coef)

    # --- the run: lock, resume (model, optimizer, scheduler, RNG, data position), logger -----
    session = Run.start(cfg, "rm", total_steps, model=model, optimizer=optimizer,
                        scheduler=scheduler)
    start_step, logger = session.step, session.logger
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.print(f"rm: {len(train_pairs)} train / {len(eval_pairs)} eval pairs, {total_steps} "
                 f"steps of {tc.batch_size}, {n_params / 1e6:.1f}M trainable parameters, "
                 f"{tc.precision} on {device}, world size {dist.world_size()}")
    truncated = truncation_counts([(p.chosen, p.rejected) for p in train_pairs + eval_pairs])
    if note := truncation_message(truncated, len(train_pairs + eval_pairs), cfg.data.max_length):
        logger.print(note)
    eval_before = evaluate(model, eval_batches, device, tc.precision)
    logger.log(start_step, {**eval_before, **truncated})

    # --- train --------------------------------------------------------------------------------
    history = []
    for step in session.steps():  # Ctrl-C: save, stop
        pairs = step_items(train_pairs, step, tc.batch_size, tc.seed)[
            dist.shard_indices(tc.batch_size)]
        micro_batches = [collate(pairs[i * tc.micro_batch_size:(i + 1) * tc.micro_batch_size])
                         .to(device) for i in range(micro_steps)]
        try:
            m = train_step(model, micro_batches, loss_fn=loss_fn,
                           count_units=lambda b: b.num_pairs, optimizer=optimizer,
                           scheduler=scheduler, device=device, precision=tc.precision,
                           max_grad_norm=tc.max_grad_norm)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {step + 1}: {err}") from None
        n = m["units"]
        metrics = {"loss/rm": m["loss"], **{k: m[k] / n for k in m if k.startswith("rm/")},
                   "optim/lr": m["lr"], "optim/grad_norm": m["grad_norm"], "pairs/step": n,
                   "timing/update": m["seconds"], "memory/peak_mb": peak_memory_mb(),
                   "epoch": (step + 1) / steps_per_epoch}
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            metrics.update(evaluate(model, eval_batches, device, tc.precision))
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == total_steps:
            logger.log(step + 1, metrics)
        history.append(m["loss"])
        logger.advance(step + 1, f"loss {m['loss']:.4f} acc {metrics['rm/accuracy']:.2f}")
        session.save(step + 1)  # when due: the schedule, the clock, Ctrl-C
    logger.close()

    eval_after = evaluate(model, eval_batches, device, tc.precision)
    logger.log(total_steps, eval_after)

    out_dir = run_dir / "reward_model"
    model = save(model, tokenizer, out_dir)
    logger.print(f"held-out pairs ({len(eval_pairs)}): accuracy {eval_before['eval/accuracy']:.1%}"
                 f" -> {eval_after['eval/accuracy']:.1%}, margin {eval_before['eval/margin']:.3f}"
                 f" -> {eval_after['eval/margin']:.3f}, ECE {eval_before['eval/ece']:.3f} -> "
                 f"{eval_after['eval/ece']:.3f}" + (f", Spearman with gold "
                 f"{eval_before['eval/spearman']:.3f} -> {eval_after['eval/spearman']:.3f}"
                 if "eval/spearman" in eval_after else ""))
    logger.print(f"reward model: {out_dir} (AutoModelForSequenceClassification.from_pretrained)")
    session.finish(write_report)
    return {"losses": history, "eval_before": eval_before, "eval_after": eval_after,
            "model": model, "tokenizer": tokenizer, "run_dir": run_dir, "reward_model": out_dir,
            "eval_pairs": eval_pairs, "train_pairs": len(train_pairs), "trainable": trainable}
