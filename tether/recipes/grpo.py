"""Group-relative policy optimisation and its family: grpo, dr_grpo, dapo, gspo, rloo.

Stages per step: generate (G samples for each of the step's prompts, one prefill per prompt) ->
score (reward functions; reference log-probs if beta > 0; old log-probs if num_iterations > 1) ->
advantages (relative to the group, per the loss type) -> update (num_iterations optimizer steps
over the rollout, micro-batched, normalised over the whole step) -> log -> checkpoint.
Held-out accuracy (greedy) before and after training; KL, diversity, the gold reward and the
warnings of docs/diagnostics.md through `tether.eval.online`. Prompts may carry a user `group`
(segment): each group can have its own rewards, is logged on its own, and with
`grpo.group_fairness: dro` lagging groups weigh more (`tether.recipes.grpo_groups`).

The loss variants differ only in the row of `tether.losses.GRPO_VARIANTS` they pick: the
surrogate, how advantages are computed, how per-token losses are reduced, whether the importance
ratio is per token or per sequence, the clip range, and whether groups whose rewards are all
equal are dropped (docs/grpo.md); the loss itself is the pure `tether.losses.grpo_loss`.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from tether.advantages import GROUP_ADVANTAGES
from tether.config import GenerationConfig, GRPOConfig, GRPOParams, ModelConfig, choice_error
from tether.data.tasks.rl import load_task_prompts
from tether.engine import dist
from tether.engine.backends import close_backend, make_backend
from tether.engine.dist import global_mean, same_count_on_ranks
from tether.engine.generate import SamplingParams
from tether.engine.logprobs import CausalLMLogps
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import load_causal_lm, load_tokenizer
from tether.engine.optimize import (build_optimizer, build_scheduler, resolve_precision, step_items,
                                   train_step)
from tether.engine.rollout_batches import GRPOBatch, micro_batches
from tether.engine.run import Run
from tether.engine.score import score_logps
from tether.errors import ConfigError
from tether.eval import online
from tether.eval.report import write_report
from tether.judge.reward import JudgeReward, judge_cost, judge_metrics
from tether.losses import GRPO_VARIANTS, GRPOVariant, aggregate_sum, grpo_loss, masked_sum
from tether.recipes.grpo_groups import UserGroups
from tether.rewards import WeightedSum, load_rewards


@dataclass
class Objective:
    """The variant (a row of `GRPO_VARIANTS`) with this run's clip range, dynamic-sampling
    choice and advantage estimator resolved."""
    name: str
    kind: GRPOVariant
    advantages: Callable[[torch.Tensor, int], torch.Tensor]  # rewards (B,), G -> (B,)
    eps_low: float
    eps_high: float
    dynamic_sampling: bool
    beta: float
    normalizer: float  # constant_normalizer: max_new_tokens
    temperature: float  # log-probs of softmax(logits / T), the distribution samples come from
    tis_cap: float | None = None  # truncated importance sampling vs the sampler; None = off

    @property
    def summary(self) -> str:
        """The resolved choices, for the run's first line."""
        return (f"{self.name}, clip {self.eps_low:g} / {self.eps_high:g}"
                f"{', dynamic sampling' if self.dynamic_sampling else ''}")


def build_objective(gc_: GRPOParams, gen: GenerationConfig | None = None) -> Objective:
    if gc_.loss_type not in GRPO_VARIANTS:
        raise choice_error("grpo.loss_type", gc_.loss_type, list(GRPO_VARIANTS))
    if gc_.group_size < 2:
        raise ConfigError(f"grpo.group_size must be >= 2 (advantages compare samples of a "
                          f"group), got {gc_.group_size}")
    if gc_.num_iterations < 1:
        raise ConfigError(f"grpo.num_iterations must be >= 1, got {gc_.num_iterations}")
    if gc_.temperature <= 0:
        raise ConfigError(f"grpo.temperature must be > 0 (RL samples), got {gc_.temperature}")
    if gc_.beta < 0:
        raise ConfigError(f"grpo.beta must be >= 0, got {gc_.beta}")
    kind = GRPO_VARIANTS[gc_.loss_type]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return Objective(gc_.loss_type, kind, GROUP_ADVANTAGES[kind.advantages],
                     pick(gc_.eps_low, kind.eps_low), pick(gc_.eps_high, kind.eps_high),
                     pick(gc_.dynamic_sampling, kind.dynamic_sampling), gc_.beta,
                     float(gc_.max_new_tokens), gc_.temperature,
                     gen.tis_cap if gen is not None and gen.tis else None)


def build_rewards(gc_: GRPOParams, device=None) -> WeightedSum:
    """A WeightedSum of the named reward functions, each logged as reward/<name> ("judge" is
    the AI judge of `grpo.judge`, loaded once, on `device`)."""
    if not gc_.rewards:
        raise ConfigError("grpo.rewards is empty: name at least one reward function")
    return WeightedSum(load_rewards(gc_.rewards, gc_.reward_weights, section="grpo",
                                    judge=partial(JudgeReward, gc_.judge, device=device)))


# --- update: one micro-batch of rollout rows -> summed loss ------------------------------------


def units_of(obj: Objective, completion_mask: torch.Tensor) -> float:
    """The aggregation's denominator over these rows (tokens, sequences or rows x constant);
    rows without a completion token (fillers) count nothing."""
    mask = completion_mask[completion_mask.any(dim=1)]
    return aggregate_sum(torch.zeros(mask.shape), mask, mode=obj.kind.aggregation,
                         normalizer=obj.normalizer)[1].item()


def count_units(obj: Objective, b: GRPOBatch) -> float:
    """The micro-batch's share of the denominator (known before any forward)."""
    return units_of(obj, b.completion_mask) + b.extra_units


def micro_batch_loss(policy: CausalLMLogps, b: GRPOBatch, *,
                     obj: Objective) -> tuple[torch.Tensor, dict]:
    """One policy forward over the rows, then the pure `grpo_loss` on its log-probs: the
    numerator of the aggregated loss and metrics summed over tokens."""
    logps = policy(b.input_ids, b.attention_mask, b.position_ids, start=b.start,
                   shared_prefix=b.prompt_index, temperature=obj.temperature)  # (b, C)
    return grpo_loss(logps, b.old_logps, b.advantages, b.completion_mask, variant=obj.name,
                     eps_low=obj.eps_low, eps_high=obj.eps_high, beta=obj.beta,
                     normalizer=obj.normalizer, ref_logps=b.ref_logps,
                     sampler_logps=b.sampler_logps, tis_cap=obj.tis_cap)


def load_reference(cfg: GRPOConfig, device) -> CausalLMLogps:
    """A frozen copy of the initial policy (no adapter), for the KL term."""
    m = cfg.model
    model = load_causal_lm(ModelConfig(name_or_path=m.name_or_path, gguf_file=m.gguf_file,
                                       trust_remote_code=m.trust_remote_code,
                                       attn_implementation=m.attn_implementation))
    reference = CausalLMLogps(model, chunk_size=cfg.train.logprob_chunk_size).to(device)
    return dist.shard(reference.requires_grad_(False)).eval()


def run(cfg: GRPOConfig) -> dict:
    with ExitStack() as cleanup:  # stops the generation backend's engine / server process
        return _run(cfg, cleanup)


def _run(cfg: GRPOConfig, cleanup: ExitStack) -> dict:
    dist.init()
    device = dist.device()
    tc, gc_, run_dir = cfg.train, cfg.grpo, Path(cfg.run.output_dir)
    tc.precision = resolve_precision(tc.precision, device)
    obj = build_objective(gc_, cfg.generation)
    rewards = build_rewards(gc_, device)
    if gc_.prompts_per_step % dist.world_size():
        raise ConfigError(f"grpo.prompts_per_step ({gc_.prompts_per_step}) must divide by the "
                          f"world size ({dist.world_size()})")
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # --- data: prompt rows (TRL prompt-only format) or a built-in task; user groups ------------
    tokenizer = load_tokenizer(cfg.model)
    task, train_prompts, eval_prompts = load_task_prompts(cfg.data, gc_, tokenizer,
                                                          n_eval=cfg.run.eval_generations)
    groups = UserGroups(gc_, train_prompts + eval_prompts, rewards, task=task)
    rewards = groups.rewards  # each row scored by its user group's functions
    if len(train_prompts) < gc_.prompts_per_step:
        raise ConfigError(f"grpo.prompts_per_step ({gc_.prompts_per_step}) exceeds the "
                          f"{len(train_prompts)} training prompts")
    steps_per_epoch = len(train_prompts) // gc_.prompts_per_step
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)

    # --- models: the policy; the reference only when beta > 0 (LoRA: the adapter disabled) ----
    model = load_causal_lm(cfg.model)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    policy = dist.shard(CausalLMLogps(model, chunk_size=tc.logprob_chunk_size).to(device))
    policy.train()
    reference = load_reference(cfg, device) if obj.beta > 0 and cfg.model.lora.r == 0 else None
    backend = make_backend(cfg.generation, policy, tokenizer, precision=tc.precision, seed=tc.seed)
    cleanup.callback(close_backend, backend)
    optimizer = build_optimizer(policy, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps * gc_.num_iterations)

    # --- the run: lock, resume (model, optimizer, scheduler, RNG; data and samples are
    # functions of the step), logger -----------------------------------------------------------
    session = Run.start(cfg, f"grpo ({gc_.loss_type})", total_steps, model=policy,
                        optimizer=optimizer, scheduler=scheduler)
    start_step, logger = session.step, session.logger
    if session.resumed:
        groups.load_state(session.state)  # the fairness weights
    diag = online.Diagnostics(cfg.rewards, cfg.diagnostics, run_dir, start_step=start_step)
    n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    logger.print(f"grpo ({obj.summary}): {len(train_prompts)} train prompts, {total_steps} "
                 f"steps of {gc_.prompts_per_step} prompts x {gc_.group_size} samples, rewards "
                 f"{', '.join(n for n, _, _ in rewards.components)}, "
                 f"{'groups ' + ', '.join(groups.names) + ', ' if groups.names else ''}"
                 f"{'reference (k3, beta=%g)' % obj.beta if obj.beta > 0 else 'no reference'}, "
                 f"{n_params / 1e6:.1f}M trainable parameters, {tc.precision} on {device}")
    evaluate = lambda: online.heldout_greedy(backend, rewards, eval_prompts,  # noqa: E731
                                             max_new_tokens=gc_.max_new_tokens, gold=diag.gold)
    before, samples = evaluate()
    diag.log(logger, start_step, before, samples)

    params = SamplingParams(max_new_tokens=gc_.max_new_tokens, temperature=gc_.temperature,
                            top_p=gc_.top_p, top_k=gc_.top_k, stop=tuple(gc_.stop),
                            group_size=gc_.group_size)
    history = []
    for step in session.steps():  # Ctrl-C: save, stop
        # --- generate ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        prompts = step_items(train_prompts, step, gc_.prompts_per_step, tc.seed)[
            dist.shard_indices(gc_.prompts_per_step)]
        rollout = backend.generate([p.ids for p in prompts], params,
                                   generator=torch.Generator().manual_seed(  # (seed, step, rank) alone
                                       (tc.seed * 1_000_003 + step) * 7919 + dist.rank()))
        G, B = gc_.group_size, len(rollout.texts)
        t1 = time.perf_counter()

        # --- score: rewards; reference and old log-probs of the rows the update runs -------
        columns = {k: [prompts[i // G].columns.get(k) for i in range(B)]
                   for k in prompts[0].columns}
        asked = [prompts[i // G].prompt for i in range(B)]  # (B,) the prompt of each row
        judged = judge_cost(rewards)  # None without the judge reward
        scores = rewards.score(asked, rollout.texts, **columns)
        judged = judge_metrics(judged, judge_cost(rewards))  # {} or judge/calls, judge/seconds
        reward = torch.tensor(scores.total, dtype=torch.float32)  # (B,)
        equal = reward.view(-1, G).std(dim=1) == 0  # (n_prompts,) groups with one reward value
        keep = ~equal if obj.dynamic_sampling else torch.ones_like(equal)  # (n_prompts,)

        # --- advantages (per group, before any group is dropped); fairness weights ------------
        row_groups = groups.ids(prompts, G)  # (B,) user group of each row
        advantages = obj.advantages(reward, G) * groups.update(reward, row_groups)  # (B,)
        counted = keep.repeat_interleave(G)  # (B,) rows in the update's normalisation
        # A row with advantage 0 and no KL term has loss 0 and gradient 0 whatever the policy:
        # it needs no forward, only its share of the denominator. One row always runs, so that
        # the optimizer step (and Adam's moments) happen exactly as without the shortcut.
        forward = counted & ((advantages != 0) | (obj.beta > 0))  # (B,)
        if counted.any() and not forward.any():
            forward[counted.nonzero()[0]] = True
        real = forward.nonzero().flatten()
        skipped_units = units_of(obj, rollout.completion_mask[counted & ~forward])
        rows = same_count_on_ranks(real)
        chosen = rollout.select(rows)
        chosen.completion_mask[len(real):] = False  # filler rows: no loss, no units
        share = rows // G  # one prompt forward per group
        batches = [b.to(device) for b in micro_batches(
            chosen, advantages[rows], tc.micro_batch_size, share,
            backend.external_sampler)]  # another engine sampled: keep its log-probs (TIS)
        if batches:
            batches[0].extra_units = skipped_units
        if reference is not None:  # frozen reference: `ref_logps`, for k3 in the loss
            score_logps(reference, batches, "ref_logps", gc_.temperature, tc.precision)
        elif obj.beta > 0:  # LoRA: the reference is the policy with its adapter disabled
            with policy.model.disable_adapter():
                score_logps(policy, batches, "ref_logps", gc_.temperature, tc.precision)
        kl_rows = groups.row_kl(rollout, batches, real) if obj.beta > 0 else None  # (B,)
        if gc_.num_iterations > 1:  # the sampling policy, for the importance ratios
            score_logps(policy, batches, "old_logps", gc_.temperature, tc.precision)
        kl_seen = {}  # beta = 0 with LoRA: KL to the adapter-disabled policy (one more forward)
        if obj.beta == 0 and cfg.model.lora.r > 0 and cfg.diagnostics.kl_every > 0 \
                and (step + 1) % cfg.diagnostics.kl_every == 0:
            all_rows = [b.to(device) for b in micro_batches(
                rollout, torch.zeros(B), tc.micro_batch_size, torch.arange(B) // G)]
            with policy.model.disable_adapter():
                score_logps(policy, all_rows, "ref_logps", gc_.temperature, tc.precision)
            kl_seen = online.rollout_kl(rollout, all_rows)
            kl_rows = groups.row_kl(rollout, all_rows, torch.arange(B))
        t2 = time.perf_counter()

        # --- update: num_iterations optimizer steps over the rows ------------------------------
        units = dist.all_reduce_sum(sum(count_units(obj, b) for b in batches)).item()
        sums: dict[str, float] = {}
        m = {"loss": float("nan"), "grad_norm": float("nan"), "lr": scheduler.get_last_lr()[0]}
        for _ in range(gc_.num_iterations):
            if units > 0:
                try:
                    m = train_step(policy, batches, loss_fn=partial(micro_batch_loss, obj=obj),
                                   count_units=partial(count_units, obj), optimizer=optimizer,
                                   scheduler=scheduler, device=device, precision=tc.precision,
                                   max_grad_norm=tc.max_grad_norm)
                except FloatingPointError as err:
                    raise FloatingPointError(f"step {step + 1}: {err}") from None
                for k in ("_tokens", "_seqs", "clipfrac_low", "clipfrac_high", "approx_kl", "kl",
                          "kl_k1", "logp_diff"):
                    sums[k] = sums.get(k, 0.0) + m.get(k, 0.0)
            else:  # every group was dropped: no update, the schedule still advances
                scheduler.step()
        backend.sync_weights()  # vLLM samples the next step from the new weights (hf: no-op)
        t3 = time.perf_counter()

        # --- log ------------------------------------------------------------------------------
        mask = rollout.completion_mask
        tokens = max(1.0, sums.get("_tokens", 0.0))
        metrics = {
            "loss/policy": m["loss"],
            "reward/mean": global_mean(reward.sum().item(), B),
            "reward/std": math.sqrt(max(0.0, global_mean(reward.square().sum().item(), B)
                                        - global_mean(reward.sum().item(), B) ** 2)),
            **{f"reward/{k}/mean": global_mean(sum(v), B) for k, v in scores.components.items()},
            "policy/entropy": global_mean(masked_sum(rollout.entropy, mask).item(),
                                          mask.sum().item()) if rollout.entropy is not None
            else float("nan"),
            "policy/clipfrac_low": sums.get("clipfrac_low", 0.0) / tokens,
            "policy/clipfrac_high": sums.get("clipfrac_high", 0.0) / tokens,
            "policy/clipfrac": (sums.get("clipfrac_low", 0.0) + sums.get("clipfrac_high", 0.0))
            / tokens,
            "policy/approx_kl": sums.get("approx_kl", 0.0) / tokens,
            "completions/mean_length": global_mean(mask.sum().item(), B),
            "completions/truncated_frac": global_mean(rollout.truncated.sum().item(), B),
            **diag.rollout_metrics(step + 1, asked, rollout.texts, columns,
                                   partial(groups.means, row_groups, "gold")), **kl_seen,
            **groups.metrics(row_groups, mask.sum(dim=1), kl_rows),
            "groups/zero_std_frac": global_mean(equal.sum().item(), len(equal)),
            "groups/kept": dist.all_reduce_sum(keep.sum().item()).item(),
            "optim/lr": m["lr"], "optim/grad_norm": m["grad_norm"],
            "timing/generate": t1 - t0, "timing/score": t2 - t1, "timing/update": t3 - t2,
            **{k: dist.all_reduce_sum(v).item() for k, v in judged.items()},
            "memory/peak_mb": peak_memory_mb(),
        }
        if backend.external_sampler:
            metrics["generation/logp_diff"] = sums.get("logp_diff", 0.0) / tokens
        if obj.beta > 0:  # per sequence: summed over each completion, mean over the rows
            seqs = max(1.0, sums.get("_seqs", 0.0))
            metrics["kl/k1"] = sums.get("kl_k1", 0.0) / seqs
            metrics["kl/k3"] = sums.get("kl", 0.0) / seqs
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
            metrics.update(evaluate()[0])
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == total_steps:
            diag.log(logger, step + 1, metrics)
        history.append(metrics)
        logger.advance(step + 1, f"reward {metrics['reward/mean']:.3f} "
                                 f"len {metrics['completions/mean_length']:.1f}")

        # --- checkpoint -------------------------------------------------------------------------
        session.save(step + 1, **groups.state())  # when due: the schedule, the clock, Ctrl-C
    logger.close()

    after, samples = evaluate()
    diag.log(logger, total_steps, after, samples)
    if "eval/accuracy" in before:
        logger.print(f"held-out accuracy ({len(eval_prompts)} problems, greedy): "
                     f"{before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}")
    if "eval/reward" in before:
        logger.print(f"held-out reward (greedy): {before['eval/reward']:.3f} -> "
                     f"{after['eval/reward']:.3f}")
    for line in groups.summary(before, after):
        logger.print(line)
    session.finish(write_report)
    return {"history": history, "eval_before": before, "eval_after": after, "policy": policy,
            "reference": reference, "tokenizer": tokenizer, "run_dir": run_dir}
