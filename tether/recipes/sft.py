"""Supervised fine-tuning: maximise log p(completion | prompt) on demonstrations.

Stages: data -> model -> (resume) -> eval -> [collate -> optimize -> log -> checkpoint]* -> eval.
The loss is the mean negative log-likelihood over completion tokens, normalised by the global
number of completion tokens in each optimizer step (see `tether.engine.optimize`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tether.config import SFTConfig
from tether.data.collate import (Batch, Example, block_causal_mask, pack_examples, packed_collate,
                                 pad_collate)
from tether.data.formats import load_sft_examples, truncation_counts, truncation_message
from tether.data.tasks import builtin_sft_rows, heldout_problems, task_accuracy
from tether.engine import dist
from tether.engine.generate import greedy_complete
from tether.engine.logprobs import CausalLMLogps
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import load_causal_lm, load_tokenizer
from tether.engine.optimize import (autocast, build_optimizer, build_scheduler, check_batch_sizes,
                                   step_items, train_step)
from tether.engine.run import Run, init_process
from tether.errors import ConfigError
from tether.eval.report import write_report
from tether.losses import nll_loss


def sft_loss(policy: CausalLMLogps, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Summed NLL of the batch's target tokens (the optimizer divides by the global count)."""
    mask = block_causal_mask(batch.segment_ids) if batch.segment_ids is not None \
        else batch.attention_mask
    token_logps = policy(batch.input_ids, mask, batch.position_ids)  # (B, T)
    return nll_loss(token_logps, batch.loss_mask)


@torch.no_grad()
def evaluate(policy: CausalLMLogps, batches: list[Batch], device, precision: str) -> float:
    """Mean NLL per completion token over the held-out batches (nan if there are none)."""
    was_training = policy.training
    policy.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        with autocast(device, precision):
            loss_sum, _ = sft_loss(policy, batch.to(device))
        total, tokens = total + loss_sum.item(), tokens + batch.num_loss_tokens
    policy.train(was_training)
    total, tokens = dist.all_reduce_sum(total).item(), dist.all_reduce_sum(tokens).item()
    return total / tokens if tokens else float("nan")


def task_eval(policy: CausalLMLogps, tokenizer, problems: list[dict]) -> dict[str, float]:
    """Greedy answers to held-out built-in problems -> {"eval/accuracy": fraction correct}."""
    if not problems:
        return {}
    problems = problems[:len(problems) - len(problems) % dist.world_size()]  # equal shares
    share = problems[dist.rank()::dist.world_size()]
    texts = greedy_complete(policy, tokenizer, [p["prompt"] for p in share], max_new_tokens=24)
    correct = dist.all_reduce_sum(task_accuracy(texts, share) * len(share)).item()
    return {"eval/accuracy": correct / len(problems)}


@dataclass
class SFTData:
    train_examples: list[Example]
    eval_examples: list[Example]
    train_items: list  # the examples, or rows packed from them (data.packing)
    collate: Callable  # items -> Batch
    eval_batches: list[Batch]  # this rank's share of the held-out examples
    problems: list[dict]  # held-out built-in problems, answered greedily before and after


def load_data(cfg: SFTConfig, tokenizer) -> SFTData:
    """Rows -> validated, tokenised examples (or packed rows); the held-out batches."""
    tc = cfg.train
    builtin_rows = builtin_sft_rows() if cfg.data.path is None else None
    train_examples, eval_examples = load_sft_examples(
        cfg.data, tokenizer, rows=builtin_rows,
        source="built-in arithmetic SFT set" if builtin_rows else None)
    problems = heldout_problems(cfg.run.eval_generations, builtin_rows) if builtin_rows else []
    pad_id = tokenizer.pad_token_id
    if cfg.data.packing:
        train_items = pack_examples(train_examples, cfg.data.max_length)
        collate = lambda items: packed_collate(items, pad_id)  # noqa: E731
    else:
        train_items = train_examples
        collate = lambda items: pad_collate(items, pad_id)  # noqa: E731
    if len(train_items) < tc.batch_size:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) exceeds the {len(train_items)} "
                          "training examples; lower it or add data")
    eval_share = eval_examples[dist.rank()::dist.world_size()]
    eval_batches = [pad_collate(eval_share[i:i + tc.micro_batch_size], pad_id)
                    for i in range(0, len(eval_share), tc.micro_batch_size)]
    return SFTData(train_examples, eval_examples, train_items, collate, eval_batches, problems)


def load_policy(cfg: SFTConfig, device) -> CausalLMLogps:
    """fp32 master weights, chunked log-prob head, FSDP2 when distributed; in train mode."""
    model = load_causal_lm(cfg.model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    policy = dist.shard(CausalLMLogps(model, chunk_size=cfg.train.logprob_chunk_size).to(device))
    return policy.train()


def run(cfg: SFTConfig) -> dict:
    tc, run_dir = cfg.train, Path(cfg.run.output_dir)
    device = init_process(tc)
    micro_steps = check_batch_sizes(cfg)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # --- data and model -------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg, tokenizer)
    train_items, eval_batches, problems = data.train_items, data.eval_batches, data.problems
    steps_per_epoch = len(train_items) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)
    policy = load_policy(cfg, device)
    optimizer = build_optimizer(policy, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)

    # --- the run: lock, resume (model, optimizer, scheduler, RNG, data position), logger -----
    session = Run.start(cfg, "sft", total_steps, model=policy, optimizer=optimizer,
                        scheduler=scheduler)
    start_step, logger = session.step, session.logger
    n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    logger.print(f"sft: {len(data.train_examples)} train / {len(data.eval_examples)} eval "
                 f"examples, {total_steps} steps of {tc.batch_size}, {n_params / 1e6:.1f}M "
                 f"trainable parameters, {tc.precision} on {device}, world size "
                 f"{dist.world_size()}")
    examples = data.train_examples + data.eval_examples
    truncated = truncation_counts([(e,) for e in examples])
    if note := truncation_message(truncated, len(examples), cfg.data.max_length):
        logger.print(note)
    eval_before = evaluate(policy, eval_batches, device, tc.precision)
    acc_before = task_eval(policy, tokenizer, problems)
    logger.log(start_step, {"eval/loss": eval_before, **acc_before, **truncated})

    # --- train --------------------------------------------------------------------------------
    history = []
    for step in session.steps():  # Ctrl-C: save, stop
        items = step_items(train_items, step, tc.batch_size, tc.seed)[
            dist.shard_indices(tc.batch_size)]
        micro_batches = [data.collate(items[i * tc.micro_batch_size:(i + 1) * tc.micro_batch_size])
                         .to(device) for i in range(micro_steps)]
        try:
            m = train_step(policy, micro_batches, loss_fn=sft_loss,
                           count_units=lambda b: b.num_loss_tokens, optimizer=optimizer,
                           scheduler=scheduler, device=device, precision=tc.precision,
                           max_grad_norm=tc.max_grad_norm)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {step + 1}: {err}") from None
        tokens = dist.all_reduce_sum(sum(int(b.attention_mask.sum()) for b in micro_batches))
        metrics = {"loss/sft": m["loss"], "optim/lr": m["lr"], "optim/grad_norm": m["grad_norm"],
                   "tokens/loss": m["units"], "tokens/per_second": tokens.item() / m["seconds"],
                   "timing/update": m["seconds"], "memory/peak_mb": peak_memory_mb(),
                   "epoch": (step + 1) / steps_per_epoch}
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            metrics["eval/loss"] = evaluate(policy, eval_batches, device, tc.precision)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == total_steps:
            logger.log(step + 1, metrics)
        history.append(m["loss"])
        logger.advance(step + 1, f"loss {m['loss']:.4f}")
        session.save(step + 1)  # when due: the schedule, the clock, Ctrl-C
    logger.close()

    eval_after = evaluate(policy, eval_batches, device, tc.precision)
    acc_after = task_eval(policy, tokenizer, problems)
    logger.log(total_steps, {"eval/loss": eval_after, **acc_after})
    logger.print(f"held-out loss per completion token: {eval_before:.4f} -> {eval_after:.4f}")
    if problems:
        logger.print(f"held-out arithmetic accuracy ({len(problems)} problems, greedy): "
                     f"{acc_before['eval/accuracy']:.1%} -> {acc_after['eval/accuracy']:.1%}")
    session.finish(write_report)
    return {"losses": history, "eval_before": eval_before, "eval_after": eval_after,
            "accuracy_before": acc_before.get("eval/accuracy"),
            "accuracy_after": acc_after.get("eval/accuracy"),
            "policy": policy, "tokenizer": tokenizer, "run_dir": run_dir}
