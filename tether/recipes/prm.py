"""Process reward modelling (Lightman et al. 2023): a score for every step of a solution.

Stages: data -> model -> (resume) -> eval -> [collate -> optimize -> log -> checkpoint]* -> eval
-> save RUN_DIR/process_reward_model.

Rows are TRL's stepwise supervision (`prompt`, `completions`: the steps, `labels`: one bool per
step). Each step is followed by `prm.step_separator`; the step's label sits on the separator's
last token (tether.data.stepwise). The model is `AutoModelForTokenClassification` with one output
(a token-classification head, hidden -> 1, on any causal LM; TRL's PRMTrainer uses the same
kind of head with two classes): its logit x at a step's separator gives p = sigmoid(x) = P(step
correct). The loss is the binary cross-entropy of each step's logit against its label, averaged
over the example's steps (`tether.losses.process_reward_loss`), summed over a micro-batch and
divided by the global number of examples in the step (`tether.engine.optimize`). Held-out
metrics: step accuracy, solution accuracy of the aggregate (min or prod over steps) and how often
the first step scored below 1/2 is the first wrong step (docs/metrics.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import PRMConfig
from tether.data.stepwise import StepExample, builtin_stepwise_rows, load_stepwise_data
from tether.engine import checkpoint, dist
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import load_tokenizer, load_value_model, unwrap
from tether.engine.optimize import (autocast, build_optimizer, build_scheduler, check_batch_sizes,
                                   step_items, train_step)
from tether.engine.run import Run, init_process
from tether.errors import ConfigError
from tether.eval.report import write_report
from tether.losses import process_reward_loss
from tether.rewards.process import AGGREGATES, aggregate_steps, step_logits_at

# ------------------------------------------------------------------------------ data


@dataclass
class StepBatch:
    """B solutions right-padded to T tokens, their steps padded to S."""
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    step_positions: torch.Tensor  # (B, S) long: token index of each step's score; 0 on padding
    step_labels: torch.Tensor  # (B, S) bool, True = the step is correct
    step_mask: torch.Tensor  # (B, S) bool, True on real steps

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "StepBatch":
        return StepBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                   self.step_positions, self.step_labels,
                                                   self.step_mask)))


def collate_steps(examples: list[StepExample], pad_id: int) -> StepBatch:
    B = len(examples)
    T = max(len(e.input_ids) for e in examples)
    S = max(len(e.step_positions) for e in examples)
    batch = StepBatch(torch.full((B, T), pad_id, dtype=torch.long),
                      torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, S, dtype=torch.long),
                      torch.zeros(B, S, dtype=torch.bool), torch.zeros(B, S, dtype=torch.bool))
    for i, e in enumerate(examples):
        n, s = len(e.input_ids), len(e.step_positions)
        batch.input_ids[i, :n] = torch.tensor(e.input_ids)
        batch.attention_mask[i, :n] = True
        batch.step_positions[i, :s] = torch.tensor(e.step_positions)
        batch.step_labels[i, :s] = torch.tensor(e.step_labels)
        batch.step_mask[i, :s] = True
    return batch


# ------------------------------------------------------------------------------ maths


def step_logits(model, batch: StepBatch) -> torch.Tensor:
    """(B, S) fp32 logits of the steps: the head's output at each step's score token."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return step_logits_at(out.logits[..., 0].float(), batch.step_positions)


def prm_loss(model, batch: StepBatch) -> tuple[torch.Tensor, dict]:
    """Summed per-example loss (the optimizer divides by global examples); the metrics are sums
    (correct steps, steps) so that they add up over micro-batches and ranks."""
    loss, m = process_reward_loss(step_logits(model, batch), batch.step_labels, batch.step_mask)
    return loss.sum(), {"correct_steps": m["step_accuracy"] * m["steps"], "steps": m["steps"]}


def first_below_half(step_probs: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's first step with p < 1/2 among the steps step_mask selects;
    S (one past the end) when there is none."""
    below = (step_probs < 0.5) & step_mask  # (B, S)
    S = step_probs.shape[1]
    index = torch.arange(S).expand_as(below)
    return torch.where(below, index, S).amin(dim=-1)


@torch.no_grad()
def evaluate(model, batches: list[StepBatch], device, precision: str,
             aggregate: str) -> dict[str, float]:
    """eval/loss, eval/step_accuracy, eval/solution_accuracy, eval/first_error_accuracy over the
    held-out solutions (nan where there is nothing to measure)."""
    was_training = model.training
    model.eval()
    # sums: loss, examples, correct steps, steps, correct solutions, solutions with an error,
    # of which the first step with p < 1/2 is the first wrong step
    sums = torch.zeros(7, dtype=torch.float64)
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            logits = step_logits(model, batch)  # (B, S)
        logits, labels, mask = logits.float().cpu(), batch.step_labels.cpu(), batch.step_mask.cpu()
        loss, m = process_reward_loss(logits, labels, mask)
        probs = torch.sigmoid(logits)
        solution_ok = (labels | ~mask).all(dim=-1)  # (B,) every real step correct
        predicted_ok = aggregate_steps(probs, mask, aggregate) > 0.5  # (B,)
        S = labels.shape[1]
        first_wrong = torch.where(~labels & mask, torch.arange(S).expand_as(mask), S).amin(-1)
        has_error = ~solution_ok
        sums += torch.tensor([loss.sum().item(), len(loss), m["step_accuracy"] * m["steps"],
                              m["steps"], (predicted_ok == solution_ok).sum().item(),
                              has_error.sum().item(),
                              (first_below_half(probs, mask) == first_wrong)[has_error]
                              .sum().item()], dtype=torch.float64)
    model.train(was_training)
    s = dist.all_reduce_sum(sums).cpu().tolist()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"eval/loss": ratio(s[0], s[1]), "eval/step_accuracy": ratio(s[2], s[3]),
            "eval/solution_accuracy": ratio(s[4], s[1]),
            "eval/first_error_accuracy": ratio(s[6], s[5])}


# ------------------------------------------------------------------------------ the loop


def load_data(cfg: PRMConfig, tokenizer) -> tuple[list[StepExample], list[StepExample],
                                                 list[StepBatch]]:
    """(train solutions, eval solutions, this rank's held-out batches): stepwise rows -> token
    ids with one labelled score position per step; without data.path the built-in set."""
    tc, pc = cfg.train, cfg.prm
    builtin = builtin_stepwise_rows() if cfg.data.path is None else None
    train_examples, eval_examples = load_stepwise_data(
        cfg.data, tokenizer, separator=pc.step_separator, rows=builtin,
        source="built-in running-sum stepwise set" if builtin else None)
    if len(train_examples) < tc.batch_size:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) exceeds the "
                          f"{len(train_examples)} training solutions; lower it or add data")
    eval_share = eval_examples[dist.rank()::dist.world_size()]
    eval_batches = [collate_steps(eval_share[i:i + tc.micro_batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(eval_share), tc.micro_batch_size)]
    return train_examples, eval_examples, eval_batches


def load_model(cfg: PRMConfig, pad_id: int, device):
    """Causal LM backbone + new token-classification head (hidden -> 1); in train mode."""
    model = load_value_model(cfg.model, pad_id)
    if cfg.train.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable()
    model = dist.shard(model.to(device))
    return model.train()


def save(model, tokenizer, out_dir: Path, pc):
    """A plain HF directory that AutoModelForTokenClassification loads (LoRA: the adapter folded
    in, the head kept), with the separator and aggregate -> the model saved."""
    if dist.world_size() == 1 and dist.is_main():  # under FSDP2: `tether export` from checkpoints
        if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapter in, keep the head
            model = model.merge_and_unload()
        # the separator and aggregate travel with the weights (ProcessRewardScorer reads them)
        model.config.tether_prm = {"step_separator": pc.step_separator,
                                   "aggregate": pc.aggregate}
        checkpoint.export(model.eval(), tokenizer, out_dir, force=True)  # its own output
    dist.barrier()
    return model


def summarise(logger, pc, n_eval: int, eval_before: dict, eval_after: dict, out_dir: Path):
    """Held-out step / solution / first-error accuracy before -> after; where the model is."""
    fmt = lambda key: f"{eval_before[key]:.1%} -> {eval_after[key]:.1%}"  # noqa: E731
    logger.print(f"held-out solutions ({n_eval}): step accuracy "
                 f"{fmt('eval/step_accuracy')}, solution accuracy ({pc.aggregate}) "
                 f"{fmt('eval/solution_accuracy')}, first error found "
                 f"{fmt('eval/first_error_accuracy')}")
    logger.print(f"process reward model: {out_dir} (tether.rewards.ProcessRewardScorer, or "
                 "AutoModelForTokenClassification.from_pretrained)")


def run(cfg: PRMConfig) -> dict:
    tc, pc, run_dir = cfg.train, cfg.prm, Path(cfg.run.output_dir)
    device = init_process(tc)
    if pc.aggregate not in AGGREGATES:
        raise ConfigError(f"prm.aggregate must be one of {', '.join(AGGREGATES)}, got "
                          f"{pc.aggregate!r}")
    micro_steps = check_batch_sizes(cfg)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # --- data and model -------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    collate = lambda examples: collate_steps(examples, pad_id)  # noqa: E731
    train_examples, eval_examples, eval_batches = load_data(cfg, tokenizer)
    steps_per_epoch = len(train_examples) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)
    model = load_model(cfg, pad_id, device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)

    # --- the run: lock, resume (model, optimizer, scheduler, RNG, data position), logger -----
    session = Run.start(cfg, "prm", total_steps, model=model, optimizer=optimizer,
                        scheduler=scheduler)
    start_step, logger = session.step, session.logger
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_steps = sum(len(e.step_labels) for e in train_examples)
    logger.print(f"prm: {len(train_examples)} train / {len(eval_examples)} eval solutions "
                 f"({n_steps} labelled train steps), {total_steps} steps of {tc.batch_size}, "
                 f"{n_params / 1e6:.1f}M trainable parameters, {tc.precision} on {device}, "
                 f"world size {dist.world_size()}")
    evaluate_now = lambda: evaluate(model, eval_batches, device, tc.precision,  # noqa: E731
                                    pc.aggregate)
    eval_before = evaluate_now()
    logger.log(start_step, eval_before)

    # --- train --------------------------------------------------------------------------------
    history = []
    for step in session.steps():  # Ctrl-C: save, stop
        examples = step_items(train_examples, step, tc.batch_size, tc.seed)[
            dist.shard_indices(tc.batch_size)]
        micro_batches = [collate(examples[i * tc.micro_batch_size:(i + 1) * tc.micro_batch_size])
                         .to(device) for i in range(micro_steps)]
        try:
            m = train_step(model, micro_batches, loss_fn=prm_loss,
                           count_units=lambda b: b.num_examples, optimizer=optimizer,
                           scheduler=scheduler, device=device, precision=tc.precision,
                           max_grad_norm=tc.max_grad_norm)
        except FloatingPointError as err:
            raise FloatingPointError(f"step {step + 1}: {err}") from None
        metrics = {"loss/prm": m["loss"], "prm/step_accuracy": m["correct_steps"] / m["steps"],
                   "prm/steps": m["steps"], "optim/lr": m["lr"],
                   "optim/grad_norm": m["grad_norm"], "timing/update": m["seconds"],
                   "memory/peak_mb": peak_memory_mb(), "epoch": (step + 1) / steps_per_epoch}
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            metrics.update(evaluate_now())
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == total_steps:
            logger.log(step + 1, metrics)
        history.append(m["loss"])
        logger.advance(step + 1, f"loss {m['loss']:.4f} step acc "
                                 f"{metrics['prm/step_accuracy']:.2f}")
        session.save(step + 1)  # when due: the schedule, the clock, Ctrl-C
    logger.close()

    eval_after = evaluate_now()
    logger.log(total_steps, eval_after)

    out_dir = run_dir / "process_reward_model"
    model = save(model, tokenizer, out_dir, pc)
    summarise(logger, pc, len(eval_examples), eval_before, eval_after, out_dir)
    session.finish(write_report)
    return {"losses": history, "eval_before": eval_before, "eval_after": eval_after,
            "model": model, "tokenizer": tokenizer, "run_dir": run_dir,
            "process_reward_model": out_dir, "eval_examples": eval_examples,
            "trainable": trainable}
