"""RLHF-PPO with four models: policy, critic (value head), frozen reference, reward.

Stages of every step (verl's order), each a function the loop calls, sharing one `PPORun`:
generate -> score -> advantages -> update -> kl control -> log -> checkpoint.
  generate    the policy samples completions for a batch of prompts (`engine.generate`)
  score       no-grad: the policy's log-probs and entropy, the reference's log-probs, the
              critic's values, the sequence reward (reward model or reward functions)
  advantages  r_t = -kl_coef * k1_t, plus the reward at the last completion token (Ziegler et al.
              2019); GAE over r_t and the values; advantages whitened over the batch
  update      `ppo.update_epochs` passes over the rollout batch in `ppo.mini_batches` optimizer
              steps each (micro-batched): clipped surrogate + vf_coef * clipped value loss, both
              token means over the mini-batch; policy and critic share one AdamW and one clip
  kl control  fixed kl_coef, or the adaptive controller updated from the batch's mean KL
  log         metrics, the gold reward and warnings (`tether.eval.online`, docs/diagnostics.md)
The reference is the initial policy: with LoRA the base model with the adapter switched off,
otherwise a frozen copy (or `ppo.ref_model`). docs/ppo.md has the maths and every knob.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tether.advantages import explained_variance, gae, kl_shaped_rewards, whiten
from tether.config import ModelConfig, PPOConfig, PPOParams
from tether.data.prompts import (PromptExample, builtin_prompt_rows, load_prompt_examples,
                                 tokenize_prompt_rows)
from tether.data.tasks import builtin_sft_rows
from tether.engine import checkpoint, dist
from tether.engine.backends import close_backend, make_backend
from tether.engine.dist import global_mean
from tether.engine.generate import GenerationBackend, Rollout, SamplingParams, seeded
from tether.engine.logprobs import CausalLMLogps
from tether.engine.metrics import peak_memory_mb
from tether.engine.models import load_causal_lm, load_tokenizer, load_value_model
from tether.engine.optimize import build_scheduler, step_items, train_step
from tether.engine.reference import Reference, load_reference
from tether.engine.rollout_batches import PPOBatch
from tether.engine.run import Run, init_process
from tether.engine.score import Scored, TokenValues, score_rollout
from tether.errors import ConfigError
from tether.eval import online
from tether.eval.report import write_report
from tether.judge.reward import JudgeReward, judge_cost, judge_metrics
from tether.losses import (adaptive_kl_coef, aggregate_sum, clipped_surrogate, kl_penalty,
                           truncated_is_weight, value_loss)
from tether.rewards import RewardModelScorer, WeightedSum, load_rewards

# ------------------------------------------------------------------------------ data


def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out) prompts: data.path rows (TRL prompt-only; other fields are reward
    columns), or built-in arithmetic prompts (seed 1: not the problems of the built-in SFT set)
    with held-out problems that appear in neither."""
    n_eval = cfg.run.eval_generations
    if cfg.data.path is not None:
        train, held = load_prompt_examples(cfg.data, tokenizer)
        return train, held[:n_eval]
    rows = builtin_prompt_rows(200, seed=1)
    seen = {repr(r["prompt"]) for r in rows + builtin_sft_rows()}
    held = [r for r in builtin_prompt_rows(2 * n_eval + 10, seed=10_000)
            if repr(r["prompt"]) not in seen][:n_eval]
    return (tokenize_prompt_rows(list(enumerate(rows, 1)), tokenizer, cfg.data,
                                 "built-in arithmetic prompts"),
            tokenize_prompt_rows(list(enumerate(held, 1)), tokenizer, cfg.data,
                                 "built-in held-out arithmetic prompts"))


# ------------------------------------------------------------------------------ models


def build_reward(pc: PPOParams, device) -> WeightedSum:
    """A WeightedSum of the reward model (component 'reward_model') and reward functions
    (`tether.rewards.load_reward`: arithmetic, format, judge (`ppo.judge`) or module:function),
    each logged alone."""
    names = pc.rewards if pc.rewards is not None else ([] if pc.reward_model else ["arithmetic"])
    components = load_rewards(names, pc.reward_weights, section="ppo",
                              judge=partial(JudgeReward, pc.judge, device=device))
    if pc.reward_model:
        components.insert(0, ("reward_model", RewardModelScorer(
            pc.reward_model, batch_size=pc.reward_batch_size, device=device), 1.0))
    if not components:
        raise ConfigError("no reward: set ppo.reward_model and/or ppo.rewards")
    return WeightedSum(components)


def critic_source(cfg: PPOConfig) -> ModelConfig:
    """The model directory the critic starts from, with the policy's LoRA settings."""
    pc = cfg.ppo
    if pc.critic_init == "policy":
        path = cfg.model.name_or_path
    elif pc.critic_init == "reward_model":
        if not pc.reward_model:
            raise ConfigError("ppo.critic_init=reward_model needs ppo.reward_model")
        path = pc.reward_model
    else:
        path = pc.critic_init
    same = path == cfg.model.name_or_path
    return replace(cfg.model, name_or_path=path, gguf_file=cfg.model.gguf_file if same else None)


class ActorCritic(nn.Module):
    """Policy and critic side by side, so that one optimizer, one gradient clip and one atomic
    checkpoint cover both (TRL's PolicyAndValueWrapper). Each is sharded on its own."""

    def __init__(self, policy: CausalLMLogps, critic: TokenValues):
        super().__init__()
        self.policy, self.critic = policy, critic


def build_optimizer(models: ActorCritic, cfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW: the policy at train.lr, the critic at ppo.critic_lr; no decay on 1-D tensors."""
    tc = cfg.train
    groups = []
    for module, lr in ((models.policy, tc.lr), (models.critic, cfg.ppo.critic_lr or tc.lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "lr": lr,
                    "weight_decay": tc.weight_decay},
                   {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                             eps=tc.adam_eps, fused=True)


# ------------------------------------------------------------------------------ the update


def ppo_loss(models: ActorCritic, b: PPOBatch, *, pc: PPOParams) -> tuple[torch.Tensor, dict]:
    """Summed clipped surrogate + vf_coef * clipped value loss over the completion tokens (the
    optimizer divides by the mini-batch's token count: token means). Metrics are token sums."""
    P, mask = b.prompt_len, b.completion_mask
    logps = models.policy(b.input_ids, b.attention_mask, b.position_ids, start=P)  # (b, C)
    values = models.critic(b.input_ids, b.attention_mask, b.position_ids)[:, P:]  # (b, C)
    pg, pm = clipped_surrogate(logps, b.old_logps, b.advantages, mask,
                               eps_low=pc.clip_eps, eps_high=pc.clip_eps)
    vl, vm = value_loss(values, b.old_values, b.returns, mask, clip=pc.value_clip)
    pg_sum, _ = aggregate_sum(pg * b.tis_weight, mask, mode="token_mean")  # weight 1 unless TIS
    vl_sum, _ = aggregate_sum(vl, mask, mode="token_mean")
    n = float(b.num_tokens)
    return pg_sum + pc.vf_coef * vl_sum, {
        "loss/policy": pg_sum.item(), "value/loss": vl_sum.item(),
        "policy/clipfrac": (pm["clipfrac_low"] + pm["clipfrac_high"]) * n,
        "policy/approx_kl": pm["approx_kl"] * n, "value/clipfrac": vm["vf_clipfrac"] * n}


def check_batch_sizes(cfg: PPOConfig) -> tuple[int, int]:
    """(rollout rows per rank, rows per mini-batch); every split must be even."""
    tc, pc, world = cfg.train, cfg.ppo, dist.world_size()
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must divide by the world size "
                          f"({world})")
    rows = tc.batch_size // world * pc.samples_per_prompt
    if pc.mini_batches < 1 or rows % pc.mini_batches:
        raise ConfigError(f"the {rows} rollout rows per rank (train.batch_size x "
                          f"ppo.samples_per_prompt / world size) must split into ppo.mini_batches "
                          f"({pc.mini_batches}) equal mini-batches")
    mini = rows // pc.mini_batches
    if mini % tc.micro_batch_size:
        raise ConfigError(f"a mini-batch of {mini} rows must split into micro-batches of "
                          f"train.micro_batch_size ({tc.micro_batch_size})")
    if pc.update_epochs < 1:
        raise ConfigError(f"ppo.update_epochs must be >= 1, got {pc.update_epochs}")
    return rows, mini


# ------------------------------------------------------------------------------ the run


@dataclass
class PPORun:
    """What every stage of a run reads, set up once (`set_up`)."""
    cfg: PPOConfig
    tokenizer: object
    prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    total_steps: int
    steps_per_epoch: int
    rows_per_rank: int  # rollout rows per rank (prompts x samples_per_prompt)
    mini_rows: int  # rows per mini-batch
    models: ActorCritic
    reference: Reference  # the initial policy: a frozen copy (or ppo.ref_model), the adapter off
    reward_fn: WeightedSum
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    backend: GenerationBackend
    sampling: SamplingParams
    device: torch.device
    diag: online.Diagnostics | None = None  # once the run has started (`start`)

    @property
    def updates_per_step(self) -> int:
        return self.cfg.ppo.update_epochs * self.cfg.ppo.mini_batches

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Greedy completions of the held-out prompts: eval/* metrics and the sample rows."""
        return online.heldout_greedy(self.backend, self.reward_fn, self.eval_prompts,
                                     max_new_tokens=self.cfg.ppo.max_new_tokens,
                                     gold=self.diag.gold)


@dataclass
class StepScores:
    """The score stage's results for one step's B rows."""
    asked: list  # (B,) the prompt of each row
    columns: dict[str, list]  # (B,) per column: the rows' reward columns
    scored: Scored  # old and reference log-probs, entropy, values, rewards
    judged: dict[str, float]  # {} or judge/calls, judge/seconds


@dataclass
class Shaped:
    """The advantages stage's results: the update's batch and what the metrics read."""
    batch: PPOBatch  # (B, T) rows with old log-probs, values, advantages, returns, TIS weights
    kl: torch.Tensor  # (B, C) fp32 k1 to the reference on completion tokens, 0 elsewhere
    mismatch: dict[str, float]  # generation/logp_diff when another engine sampled


def load_models(cfg: PPOConfig, tokenizer, device) -> ActorCritic:
    """Policy and critic (`ppo.critic_init`), gradient checkpointing, each sharded."""
    tc = cfg.train
    policy = CausalLMLogps(load_causal_lm(cfg.model), chunk_size=tc.logprob_chunk_size)
    critic = TokenValues(load_value_model(critic_source(cfg), tokenizer.pad_token_id))
    if tc.gradient_checkpointing:
        for m in (policy.causal_lm(), critic.model):
            (m.get_base_model() if hasattr(m, "get_base_model") else m) \
                .gradient_checkpointing_enable()
    return ActorCritic(dist.shard(policy.to(device)), dist.shard(critic.to(device))).train()


def set_up(cfg: PPOConfig, cleanup: ExitStack) -> PPORun:
    """Batch sizes checked, prompts, the four models, the optimizer and its schedule, the
    sampler (stopped by `cleanup`)."""
    tc, pc = cfg.train, cfg.ppo
    device = init_process(tc)
    rows_per_rank, mini_rows = check_batch_sizes(cfg)
    if pc.temperature != 1.0:
        raise ConfigError("ppo.temperature must be 1.0: the PPO ratio compares log-probs of the "
                          "untempered policy, so a tempered sampler would make rollouts "
                          "off-policy (use top_p / top_k to shape sampling instead)")
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)

    # --- data: prompt rows (+ columns for the reward functions) --------------------------------
    tokenizer = load_tokenizer(cfg.model)
    prompts, eval_prompts = load_prompts(cfg, tokenizer)
    if len(prompts) < tc.batch_size:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) exceeds the {len(prompts)} "
                          "prompts; lower it or add data")
    steps_per_epoch = len(prompts) // tc.batch_size
    total_steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * steps_per_epoch)

    # --- models: policy, critic, reference, reward ----------------------------------------------
    models = load_models(cfg, tokenizer, device)
    reference = load_reference(cfg.model, models.policy, needed=True, ref_model=pc.ref_model,
                               chunk_size=tc.logprob_chunk_size)
    reward_fn = build_reward(pc, device)
    optimizer = build_optimizer(models, cfg)
    scheduler = build_scheduler(optimizer, tc, total_steps * pc.update_epochs * pc.mini_batches)
    backend = make_backend(cfg.generation, models.policy, tokenizer, precision=tc.precision,
                           seed=tc.seed)
    cleanup.callback(close_backend, backend)
    sampling = SamplingParams(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature,
                              top_p=pc.top_p, top_k=pc.top_k, stop=tuple(pc.stop),
                              group_size=pc.samples_per_prompt)
    return PPORun(cfg, tokenizer, prompts, eval_prompts, total_steps, steps_per_epoch,
                  rows_per_rank, mini_rows, models, reference, reward_fn, optimizer, scheduler,
                  backend, sampling, device)


def start(r: PPORun) -> tuple[Run, float]:
    """The run: lock, resume (both models, optimizer, scheduler, KL coefficient), logger,
    diagnostics, the first line -> (the session, the KL coefficient to start from)."""
    cfg, tc, pc = r.cfg, r.cfg.train, r.cfg.ppo
    session = Run.start(cfg, "ppo", r.total_steps, model=r.models, optimizer=r.optimizer,
                        scheduler=r.scheduler)
    kl_coef = session.state["kl_coef"] if session.resumed else pc.kl_coef
    r.diag = online.Diagnostics(cfg.rewards, cfg.diagnostics, Path(cfg.run.output_dir),
                                start_step=session.step)
    n_params = sum(p.numel() for p in r.models.parameters() if p.requires_grad)
    session.logger.print(
        f"ppo: {len(r.prompts)} train / {len(r.eval_prompts)} held-out prompts, "
        f"{r.total_steps} steps of {tc.batch_size} prompts x {pc.samples_per_prompt} samples, "
        f"{r.updates_per_step} updates per step, {n_params / 1e6:.1f}M "
        f"trainable parameters (policy + critic), reward "
        f"{'+'.join(n for n, _, _ in r.reward_fn.components)}, reference "
        f"{r.reference.description}, {tc.precision} on {r.device}, "
        f"world size {dist.world_size()}")
    return session, kl_coef


# ------------------------------------------------------------------------------ the stages


def generate(r: PPORun, step: int) -> tuple[list[PromptExample], Rollout]:
    """This rank's share of the step's prompts and `samples_per_prompt` samples of each."""
    tc = r.cfg.train
    rows = step_items(r.prompts, step, tc.batch_size, tc.seed)[dist.shard_indices(tc.batch_size)]
    rollout = r.backend.generate([p.ids for p in rows], r.sampling,
                                 generator=seeded(tc.seed, step, dist.rank(), device=r.device))
    return rows, rollout.to("cpu")


def score(r: PPORun, rows: list[PromptExample], rollout: Rollout) -> StepScores:
    """No-grad: old log-probs + entropy, reference log-probs, values, rewards."""
    G = r.cfg.ppo.samples_per_prompt
    columns = {k: [p.columns.get(k) for p in rows for _ in range(G)] for k in rows[0].columns}
    asked = [p.prompt for p in rows for _ in range(G)]  # (B,) the prompt of each row
    judged = judge_cost(r.reward_fn)  # None without the judge reward
    sc = score_rollout(rollout, asked, columns, policy=r.models.policy, reference=r.reference,
                       critic=r.models.critic, reward_fn=r.reward_fn,
                       micro_batch_size=r.cfg.train.micro_batch_size)
    judged = judge_metrics(judged, judge_cost(r.reward_fn))  # {} or judge/calls, judge/seconds
    return StepScores(asked, columns, sc, judged)


def advantages(r: PPORun, rollout: Rollout, sc: Scored, kl_coef: float) -> Shaped:
    """KL-shaped per-token rewards, GAE, whitening; TIS weights when another engine sampled."""
    pc, gen = r.cfg.ppo, r.cfg.generation
    mask = rollout.completion_mask  # (B, C)
    kl = torch.where(mask, kl_penalty(sc.logps, sc.ref_logps, kind="k1"), torch.zeros(()))
    token_rewards = kl_shaped_rewards(sc.rewards, kl, mask, kl_coef=kl_coef)  # (B, C)
    adv, returns = gae(token_rewards, sc.values, mask, gamma=pc.gamma, lam=pc.lam)  # (B, C)
    if pc.whiten_advantages:
        adv = whiten(adv, mask)
    mismatch, tis = {}, torch.ones_like(sc.logps)  # another engine sampled: logp_diff, TIS
    if r.backend.external_sampler:
        w, tm = truncated_is_weight(sc.logps, rollout.logps, mask, cap=gen.tis_cap)
        tis = w if gen.tis else tis
        mismatch = {"generation/logp_diff": global_mean(tm["logp_diff"] * mask.sum().item(),
                                                        mask.sum().item())}
    batch = PPOBatch(rollout.input_ids(), rollout.attention_mask(), rollout.position_ids(),
                     mask, sc.logps, sc.values, adv, returns, tis)
    return Shaped(batch, kl, mismatch)


def update(r: PPORun, step: int, batch: PPOBatch) -> tuple[dict[str, float], float]:
    """update_epochs x mini_batches optimizer steps, micro-batched -> (losses, clip fractions
    and grad norm averaged over the updates, the last learning rate); then the sampler's
    weights follow."""
    tc, pc, mini_rows = r.cfg.train, r.cfg.ppo, r.mini_rows
    mbs, updates = tc.micro_batch_size, r.updates_per_step
    sums: dict[str, float] = {}
    for epoch in range(pc.update_epochs):
        order = torch.randperm(r.rows_per_rank, generator=seeded(tc.seed, step, epoch, 7))
        for k in range(pc.mini_batches):
            mini = order[k * mini_rows:(k + 1) * mini_rows]
            micro = [batch.select(mini[i:i + mbs]).to(r.device)
                     for i in range(0, mini_rows, mbs)]
            try:
                m = train_step(r.models, micro, loss_fn=lambda mo, b: ppo_loss(mo, b, pc=pc),
                               count_units=lambda b: b.num_tokens, optimizer=r.optimizer,
                               scheduler=r.scheduler, device=r.device, precision=tc.precision,
                               max_grad_norm=tc.max_grad_norm)
            except FloatingPointError as err:
                raise FloatingPointError(f"step {step + 1}: {err}") from None
            for key in ("loss/policy", "value/loss", "policy/clipfrac", "policy/approx_kl",
                        "value/clipfrac"):
                sums[key] = sums.get(key, 0.0) + m[key] / m["units"] / updates
            sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + m["grad_norm"] / updates
            lr = m["lr"]
    r.backend.sync_weights()  # vLLM samples the next step from the new weights (hf: no-op)
    return sums, lr


def step_metrics(r: PPORun, step: int, rollout: Rollout, ss: StepScores, sh: Shaped,
                 sums: dict[str, float], lr: float, kl_coef: float,
                 times: tuple[float, float, float]) -> dict[str, float]:
    """The step's metrics (docs/metrics.md); times: generate, score, update seconds."""
    sc, mask, kl, returns, mismatch = ss.scored, rollout.completion_mask, sh.kl, \
        sh.batch.returns, sh.mismatch
    asked, columns, judged, diag = ss.asked, ss.columns, ss.judged, r.diag
    t_generate, t_score, t_update = times
    B = rollout.completion_mask.shape[0]
    lengths = mask.sum(dim=1).float()  # (B,)
    seq_kl = kl.sum(dim=1)  # (B,) k1 summed over each completion
    mean_kl = global_mean(seq_kl.sum().item(), B)
    reward_mean = global_mean(sc.rewards.sum().item(), B)
    reward_sq = global_mean(sc.rewards.square().sum().item(), B)
    metrics = {
        "reward/mean": reward_mean,
        "reward/std": math.sqrt(max(0.0, reward_sq - reward_mean ** 2)),
        **{f"reward/{name}/mean": global_mean(sum(s), len(s))
           for name, s in sc.components.items()},
        "kl/k1": mean_kl, "kl/k3": online.sequence_kl(sc.logps, sc.ref_logps, mask, "k3"),
        "kl/coef": kl_coef,
        "policy/entropy": global_mean(sc.entropy[mask].sum().item(), mask.sum().item()),
        **sums,
        "value/explained_variance": explained_variance(sc.values, returns, mask).item(),
        "completions/mean_length": global_mean(lengths.sum().item(), B),
        "completions/truncated_frac": global_mean(rollout.truncated.sum().item(), B),
        **diag.rollout_metrics(step + 1, asked, rollout.texts, columns), **mismatch,
        "optim/lr": lr, "timing/generate": t_generate, "timing/score": t_score,
        "timing/update": t_update, "memory/peak_mb": peak_memory_mb(),
        **{k: dist.all_reduce_sum(v).item() for k, v in judged.items()},
        "epoch": (step + 1) / r.steps_per_epoch}
    return metrics


def kl_control(r: PPORun, kl_coef: float, mean_kl: float, rows: int) -> float:
    """The next step's KL coefficient: fixed, or the adaptive controller's (`ppo.kl_target`)."""
    pc = r.cfg.ppo
    if pc.kl_target is None:
        return kl_coef
    return adaptive_kl_coef(kl_coef, mean_kl, target=pc.kl_target, horizon=pc.kl_horizon,
                            n_steps=int(dist.all_reduce_sum(rows).item()))


def log(r: PPORun, session: Run, step: int, metrics: dict[str, float]) -> None:
    """Held-out evaluation when due, the metrics line when due, the progress line."""
    cfg = r.cfg
    if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
        metrics.update(r.evaluate()[0])
    if (step + 1) % cfg.run.log_every == 0 or step + 1 == r.total_steps:
        r.diag.log(session.logger, step + 1, metrics)
    session.logger.advance(step + 1, f"reward {metrics['reward/mean']:.3f} "
                                     f"kl {metrics['kl/k1']:.3f}")


def finish(r: PPORun, session: Run, before: dict, after: dict) -> Path:
    """Held-out reward / accuracy before -> after; the policy saved as a plain HF directory
    (LoRA merged) -> its path."""
    logger = session.logger
    if "eval/reward" in before:
        logger.print(f"held-out reward ({len(r.eval_prompts)} prompts, greedy): "
                     f"{before['eval/reward']:.3f} -> {after['eval/reward']:.3f}")
    if "eval/accuracy" in before:
        logger.print(f"held-out accuracy (greedy): {before['eval/accuracy']:.1%} -> "
                     f"{after['eval/accuracy']:.1%}")
    out_dir = Path(r.cfg.run.output_dir) / "policy"
    if dist.world_size() == 1 and dist.is_main():  # under FSDP2: `tether export` from checkpoints
        checkpoint.export(r.models.policy.model, r.tokenizer, out_dir, force=True)  # its own
    dist.barrier()
    logger.print(f"policy: {out_dir} (AutoModelForCausalLM.from_pretrained)")
    session.finish(write_report)
    return out_dir


# ------------------------------------------------------------------------------ the loop


def run(cfg: PPOConfig) -> dict:
    with ExitStack() as cleanup:  # stops the generation backend's engine / server process
        return _run(cfg, cleanup)


def _run(cfg: PPOConfig, cleanup: ExitStack) -> dict:
    r = set_up(cfg, cleanup)
    session, kl_coef = start(r)
    eval_before, samples = r.evaluate()
    r.diag.log(session.logger, session.step, eval_before, samples)

    history = []
    for step in session.steps():  # Ctrl-C: save, stop
        t0 = time.perf_counter()
        rows, rollout = generate(r, step)
        t1 = time.perf_counter()
        ss = score(r, rows, rollout)
        t2 = time.perf_counter()
        sh = advantages(r, rollout, ss.scored, kl_coef)
        t3 = time.perf_counter()
        sums, lr = update(r, step, sh.batch)
        t4 = time.perf_counter()
        metrics = step_metrics(r, step, rollout, ss, sh, sums, lr, kl_coef,
                               (t1 - t0, t2 - t1, t4 - t3))
        kl_coef = kl_control(r, kl_coef, metrics["kl/k1"], rollout.completion_mask.shape[0])
        log(r, session, step, metrics)
        history.append(metrics)
        session.save(step + 1, kl_coef=kl_coef)  # when due: the schedule, the clock, Ctrl-C
    session.logger.close()

    eval_after, samples = r.evaluate()
    r.diag.log(session.logger, r.total_steps, eval_after, samples)
    out_dir = finish(r, session, eval_before, eval_after)
    return {"history": history, "eval_before": eval_before, "eval_after": eval_after,
            "accuracy_before": eval_before.get("eval/accuracy"),
            "accuracy_after": eval_after.get("eval/accuracy"), "models": r.models,
            "tokenizer": r.tokenizer, "run_dir": Path(cfg.run.output_dir), "policy_dir": out_dir}
