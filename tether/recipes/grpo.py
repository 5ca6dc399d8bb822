"""Group-relative policy optimisation and its family: grpo, dr_grpo, dapo, gspo, rloo.

Stages per step, each a function the loop calls: generate (G samples for each of the step's
prompts, one prefill per prompt) -> score (reward functions) -> advantages (relative to the
group, per the loss type) -> rows_to_forward (rows whose loss can be non-zero, micro-batched) ->
score_logprobs (reference log-probs if beta > 0; old log-probs if num_iterations > 1) -> update
(num_iterations optimizer steps over the rollout, normalised over the whole step) -> log ->
checkpoint. What the stages share (policy, reference, sampler, optimizer, ...) is one `GRPORun`.
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
from tether.config import GenerationConfig, GRPOConfig, GRPOParams, choice_error
from tether.data.tasks.rl import load_task_prompts
from tether.engine import dist
from tether.engine.backends import close_backend, make_backend
from tether.engine.dist import global_mean, same_count_on_ranks
from tether.data.prompts import PromptExample
from tether.engine.generate import GenerationBackend, Rollout, SamplingParams
from tether.engine.logprobs import CausalLMLogps
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import load_causal_lm, load_tokenizer
from tether.engine.optimize import (build_optimizer, build_scheduler, step_items,
                                   train_step)
from tether.engine.reference import Reference, load_reference
from tether.engine.rollout_batches import GRPOBatch, micro_batches
from tether.engine.run import Run, init_process
from tether.engine.score import score_logps
from tether.errors import ConfigError
from tether.eval import online
from tether.eval.report import write_report
from tether.judge.reward import JudgeReward, judge_cost, judge_metrics
from tether.losses import GRPO_VARIANTS, GRPOVariant, aggregate_sum, grpo_loss, masked_sum
from tether.recipes.grpo_groups import UserGroups
from tether.rewards import RewardScores, WeightedSum, load_rewards


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


# --- the run: what the stages share -------------------------------------------------------------


@dataclass
class GRPORun:
    """What every stage of a run reads, set up once (`set_up`)."""
    cfg: GRPOConfig
    obj: Objective
    rewards: WeightedSum  # each row scored by its user group's functions
    groups: UserGroups
    tokenizer: object
    train_prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    total_steps: int
    policy: CausalLMLogps
    reference: Reference  # the initial policy: a frozen copy, the adapter disabled, or none
    backend: GenerationBackend
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    sampling: SamplingParams
    diag: online.Diagnostics | None = None  # once the run has started (`start`)

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Greedy completions of the held-out prompts: eval/* metrics and the sample rows."""
        return online.heldout_greedy(self.backend, self.rewards, self.eval_prompts,
                                     max_new_tokens=self.cfg.grpo.max_new_tokens,
                                     gold=self.diag.gold)


@dataclass
class StepScores:
    """The score stage's results for one step's B = n_prompts x G rows."""
    asked: list  # (B,) the prompt of each row
    columns: dict[str, list]  # (B,) per column: the rows' reward columns
    scores: RewardScores  # the total and each component's scores
    reward: torch.Tensor  # (B,) fp32 weighted reward
    judged: dict[str, float]  # {} or judge/calls, judge/seconds
    equal: torch.Tensor  # (n_prompts,) bool: groups whose rewards are all equal
    keep: torch.Tensor  # (n_prompts,) bool: groups in the update (dynamic sampling drops some)
    row_groups: torch.Tensor  # (B,) long: the user group of each row


def set_up(cfg: GRPOConfig, cleanup: ExitStack) -> GRPORun:
    """Objective, rewards, prompts and user groups, the policy, its reference, the sampler
    (stopped by `cleanup`), the optimizer and its schedule."""
    tc, gc_ = cfg.train, cfg.grpo
    device = init_process(tc)
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
    if len(train_prompts) < gc_.prompts_per_step:
        raise ConfigError(f"grpo.prompts_per_step ({gc_.prompts_per_step}) exceeds the "
                          f"{len(train_prompts)} training prompts")
    steps_per_epoch = len(train_prompts) // gc_.prompts_per_step
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)

    # --- models: the policy; the reference for the KL term when beta > 0 -----------------------
    model = load_causal_lm(cfg.model)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    policy = dist.shard(CausalLMLogps(model, chunk_size=tc.logprob_chunk_size).to(device))
    policy.train()
    reference = load_reference(cfg.model, policy, needed=obj.beta > 0,
                               chunk_size=tc.logprob_chunk_size)
    backend = make_backend(cfg.generation, policy, tokenizer, precision=tc.precision, seed=tc.seed)
    cleanup.callback(close_backend, backend)
    optimizer = build_optimizer(policy, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps * gc_.num_iterations)
    sampling = SamplingParams(max_new_tokens=gc_.max_new_tokens, temperature=gc_.temperature,
                              top_p=gc_.top_p, top_k=gc_.top_k, stop=tuple(gc_.stop),
                              group_size=gc_.group_size)
    return GRPORun(cfg, obj, groups.rewards, groups, tokenizer, train_prompts, eval_prompts,
                   total_steps, policy, reference, backend, optimizer, scheduler, device, sampling)


def start(r: GRPORun) -> Run:
    """The run: lock, resume (model, optimizer, scheduler, RNG, the fairness weights; data and
    samples are functions of the step), logger, diagnostics, the first line."""
    cfg, obj, gc_, tc = r.cfg, r.obj, r.cfg.grpo, r.cfg.train
    session = Run.start(cfg, f"grpo ({gc_.loss_type})", r.total_steps, model=r.policy,
                        optimizer=r.optimizer, scheduler=r.scheduler)
    if session.resumed:
        r.groups.load_state(session.state)  # the fairness weights
    r.diag = online.Diagnostics(cfg.rewards, cfg.diagnostics, Path(cfg.run.output_dir),
                                start_step=session.step)
    n_params = sum(p.numel() for p in r.policy.parameters() if p.requires_grad)
    session.logger.print(
        f"grpo ({obj.summary}): {len(r.train_prompts)} train prompts, {r.total_steps} "
        f"steps of {gc_.prompts_per_step} prompts x {gc_.group_size} samples, rewards "
        f"{', '.join(n for n, _, _ in r.rewards.components)}, "
        f"{'groups ' + ', '.join(r.groups.names) + ', ' if r.groups.names else ''}"
        f"{'reference (k3, beta=%g)' % obj.beta if obj.beta > 0 else 'no reference'}, "
        f"{n_params / 1e6:.1f}M trainable parameters, {tc.precision} on {r.device}")
    return session


# --- the stages of a step ----------------------------------------------------------------------


def generate(r: GRPORun, step: int) -> tuple[list[PromptExample], Rollout]:
    """This rank's share of the step's prompts and G samples of each (one prefill per prompt)."""
    tc, gc_ = r.cfg.train, r.cfg.grpo
    prompts = step_items(r.train_prompts, step, gc_.prompts_per_step, tc.seed)[
        dist.shard_indices(gc_.prompts_per_step)]
    rollout = r.backend.generate([p.ids for p in prompts], r.sampling,
                                 generator=torch.Generator().manual_seed(  # (seed, step, rank)
                                     (tc.seed * 1_000_003 + step) * 7919 + dist.rank()))
    return prompts, rollout


def score(r: GRPORun, prompts: list[PromptExample], rollout: Rollout) -> StepScores:
    """The rows' rewards, the groups whose rewards are all equal, and those the update keeps."""
    G, B = r.cfg.grpo.group_size, len(rollout.texts)
    columns = {k: [prompts[i // G].columns.get(k) for i in range(B)]
               for k in prompts[0].columns}
    asked = [prompts[i // G].prompt for i in range(B)]  # (B,) the prompt of each row
    judged = judge_cost(r.rewards)  # None without the judge reward
    scores = r.rewards.score(asked, rollout.texts, **columns)
    judged = judge_metrics(judged, judge_cost(r.rewards))  # {} or judge/calls, judge/seconds
    reward = torch.tensor(scores.total, dtype=torch.float32)  # (B,)
    equal = reward.view(-1, G).std(dim=1) == 0  # (n_prompts,) groups with one reward value
    keep = ~equal if r.obj.dynamic_sampling else torch.ones_like(equal)  # (n_prompts,)
    return StepScores(asked, columns, scores, reward, judged, equal, keep,
                      r.groups.ids(prompts, G))  # (B,) user group of each row


def advantages(r: GRPORun, sc: StepScores) -> torch.Tensor:
    """(B,) advantages relative to each group (before any group is dropped), times the user
    groups' fairness weights."""
    return r.obj.advantages(sc.reward, r.cfg.grpo.group_size) \
        * r.groups.update(sc.reward, sc.row_groups)  # (B,)


def rows_to_forward(r: GRPORun, rollout: Rollout, sc: StepScores,
                    adv: torch.Tensor) -> tuple[list[GRPOBatch], torch.Tensor]:
    """(micro-batches of the rows the update runs, their indices in the rollout (n,)).

    A row with advantage 0 and no KL term has loss 0 and gradient 0 whatever the policy: it
    needs no forward, only its share of the denominator. One row always runs, so that the
    optimizer step (and Adam's moments) happen exactly as without the shortcut."""
    obj, G = r.obj, r.cfg.grpo.group_size
    counted = sc.keep.repeat_interleave(G)  # (B,) rows in the update's normalisation
    forward = counted & ((adv != 0) | (obj.beta > 0))  # (B,)
    if counted.any() and not forward.any():
        forward[counted.nonzero()[0]] = True
    real = forward.nonzero().flatten()
    skipped_units = units_of(obj, rollout.completion_mask[counted & ~forward])
    rows = same_count_on_ranks(real)
    chosen = rollout.select(rows)
    chosen.completion_mask[len(real):] = False  # filler rows: no loss, no units
    share = rows // G  # one prompt forward per group
    batches = [b.to(r.device) for b in micro_batches(
        chosen, adv[rows], r.cfg.train.micro_batch_size, share,
        r.backend.external_sampler)]  # another engine sampled: keep its log-probs (TIS)
    if batches:
        batches[0].extra_units = skipped_units
    return batches, real


def score_logprobs(r: GRPORun, step: int, rollout: Rollout, batches: list[GRPOBatch],
                   real: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Reference log-probs (beta > 0, for k3 in the loss) and old log-probs (num_iterations > 1,
    for the importance ratios) of the rows the update runs -> (per-row KL (B,) or None, kl/*
    of the LoRA diagnostics: with beta = 0, every `diagnostics.kl_every` steps, the KL of all
    rows to the adapter-disabled policy, one more forward)."""
    cfg, obj, policy, G = r.cfg, r.obj, r.policy, r.cfg.grpo.group_size
    temperature, precision = cfg.grpo.temperature, cfg.train.precision
    if obj.beta > 0:
        with r.reference.use() as ref:
            score_logps(ref, batches, "ref_logps", temperature, precision)
    kl_rows = r.groups.row_kl(rollout, batches, real) if obj.beta > 0 else None  # (B,)
    if cfg.grpo.num_iterations > 1:  # the sampling policy, for the importance ratios
        score_logps(policy, batches, "old_logps", temperature, precision)
    kl_seen = {}
    if obj.beta == 0 and r.reference.kind == "adapter" and cfg.diagnostics.kl_every > 0 \
            and (step + 1) % cfg.diagnostics.kl_every == 0:
        B = len(rollout.texts)
        all_rows = [b.to(r.device) for b in micro_batches(
            rollout, torch.zeros(B), cfg.train.micro_batch_size, torch.arange(B) // G)]
        with r.reference.use() as ref:
            score_logps(ref, all_rows, "ref_logps", temperature, precision)
        kl_seen = online.rollout_kl(rollout, all_rows)
        kl_rows = r.groups.row_kl(rollout, all_rows, torch.arange(B))
    return kl_rows, kl_seen


def update(r: GRPORun, step: int, batches: list[GRPOBatch]) -> tuple[dict, dict[str, float]]:
    """num_iterations optimizer steps over the rows, normalised over the whole step ->
    (the last `train_step` metrics, token sums over the iterations); then the sampler's
    weights follow."""
    obj, tc = r.obj, r.cfg.train
    units = dist.all_reduce_sum(sum(count_units(obj, b) for b in batches)).item()
    sums: dict[str, float] = {}
    m = {"loss": float("nan"), "grad_norm": float("nan"), "lr": r.scheduler.get_last_lr()[0]}
    for _ in range(r.cfg.grpo.num_iterations):
        if units > 0:
            try:
                m = train_step(r.policy, batches, loss_fn=partial(micro_batch_loss, obj=obj),
                               count_units=partial(count_units, obj), optimizer=r.optimizer,
                               scheduler=r.scheduler, device=r.device, precision=tc.precision,
                               max_grad_norm=tc.max_grad_norm)
            except FloatingPointError as err:
                raise FloatingPointError(f"step {step + 1}: {err}") from None
            for k in ("_tokens", "_seqs", "clipfrac_low", "clipfrac_high", "approx_kl", "kl",
                      "kl_k1", "logp_diff"):
                sums[k] = sums.get(k, 0.0) + m.get(k, 0.0)
        else:  # every group was dropped: no update, the schedule still advances
            r.scheduler.step()
    r.backend.sync_weights()  # vLLM samples the next step from the new weights (hf: no-op)
    return m, sums


def step_metrics(r: GRPORun, step: int, rollout: Rollout, sc: StepScores, m: dict,
                 sums: dict[str, float], kl_rows: torch.Tensor | None, kl_seen: dict,
                 t: tuple[float, float, float, float]) -> dict[str, float]:
    """The step's metrics (docs/metrics.md); t: the clock before generate, score, update, after."""
    obj, groups, diag, backend = r.obj, r.groups, r.diag, r.backend
    reward, scores, asked, columns, row_groups = sc.reward, sc.scores, sc.asked, sc.columns, \
        sc.row_groups
    equal, keep, judged = sc.equal, sc.keep, sc.judged
    t0, t1, t2, t3 = t
    B = len(rollout.texts)
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
    return metrics


def log(r: GRPORun, session: Run, step: int, metrics: dict[str, float]) -> None:
    """Held-out evaluation when due, the metrics line when due, the progress line."""
    cfg = r.cfg
    if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
        metrics.update(r.evaluate()[0])
    if (step + 1) % cfg.run.log_every == 0 or step + 1 == r.total_steps:
        r.diag.log(session.logger, step + 1, metrics)
    session.logger.advance(step + 1, f"reward {metrics['reward/mean']:.3f} "
                                     f"len {metrics['completions/mean_length']:.1f}")


def summarise(r: GRPORun, session: Run, before: dict, after: dict) -> None:
    """Held-out accuracy / reward before -> after, and each user group's."""
    logger = session.logger
    if "eval/accuracy" in before:
        logger.print(f"held-out accuracy ({len(r.eval_prompts)} problems, greedy): "
                     f"{before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}")
    if "eval/reward" in before:
        logger.print(f"held-out reward (greedy): {before['eval/reward']:.3f} -> "
                     f"{after['eval/reward']:.3f}")
    for line in r.groups.summary(before, after):
        logger.print(line)


# --- the loop ----------------------------------------------------------------------------------


def run(cfg: GRPOConfig) -> dict:
    with ExitStack() as cleanup:  # stops the generation backend's engine / server process
        return _run(cfg, cleanup)


def _run(cfg: GRPOConfig, cleanup: ExitStack) -> dict:
    r = set_up(cfg, cleanup)
    session = start(r)
    before, samples = r.evaluate()
    r.diag.log(session.logger, session.step, before, samples)

    history = []
    for step in session.steps():  # Ctrl-C: save, stop
        t0 = time.perf_counter()
        prompts, rollout = generate(r, step)
        t1 = time.perf_counter()
        sc = score(r, prompts, rollout)
        adv = advantages(r, sc)  # (B,)
        batches, real = rows_to_forward(r, rollout, sc, adv)
        kl_rows, kl_seen = score_logprobs(r, step, rollout, batches, real)
        t2 = time.perf_counter()
        m, sums = update(r, step, batches)
        t3 = time.perf_counter()
        metrics = step_metrics(r, step, rollout, sc, m, sums, kl_rows, kl_seen, (t0, t1, t2, t3))
        log(r, session, step, metrics)
        history.append(metrics)
        session.save(step + 1, **r.groups.state())  # when due: the schedule, the clock, Ctrl-C
    session.logger.close()

    after, samples = r.evaluate()
    r.diag.log(session.logger, r.total_steps, after, samples)
    summarise(r, session, before, after)
    session.finish(write_report)
    return {"history": history, "eval_before": before, "eval_after": after, "policy": r.policy,
            "reference": r.reference.model, "tokenizer": r.tokenizer,
            "run_dir": Path(cfg.run.output_dir)}
