"""Score a rollout without gradients: the policy's own log-probs and entropy, the reference's
log-probs, the critic's values, the reward (`score_rollout` does all of them: the score stage of
RLHF-PPO); `score_logps`, the same log-probs for the micro-batches of the group-relative
recipes.

Every per-token tensor is aligned with the completion tokens of the `Rollout`: column t belongs
to completion token t (`rollout.completion_mask` selects the real ones). The models see the
whole sequence (prompt then completion, `rollout.input_ids()`), in micro-batches of rows.

Alignment of values: `TokenValues` returns out[:, t] = V(x_<t), the critic's head read at the
hidden state of the token *before* position t, i.e. the value of the state in which token t is
generated (as CausalLMLogps returns log p(x_t | x_<t) at position t). So log-probs, values and
rewards of completion token t all sit in the same column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tether.engine.logprobs import chunked_token_logps
from tether.engine.optimize import autocast

if TYPE_CHECKING:
    from tether.engine.reference import Reference
    from tether.engine.rollout_batches import GRPOBatch


class TokenValues(nn.Module):
    """Wraps the critic (an `AutoModelForTokenClassification` with one label, see
    `tether.engine.models.load_value_model`): forward -> (B, T) fp32 values aligned with the
    input positions, out[:, t] = head(hidden_{t-1}) = V(x_<t), out[:, 0] = 0.

    Going through this module's forward matters under FSDP2 (as for CausalLMLogps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a PreTrainedModel or a peft wrapper around one

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: (B, T) long; attention_mask: (B, T) bool
        out = self.model(input_ids=input_ids, attention_mask=attention_mask.long(),
                         position_ids=position_ids, use_cache=False)
        values = out.logits[..., 0].float()  # (B, T): V of the state after token t
        return nn.functional.pad(values[:, :-1], (1, 0))  # (B, T): V(x_<t)


@dataclass
class Scored:
    """No-grad scores of a rollout, all (B, C) on the completion tokens unless noted."""
    logps: torch.Tensor  # (B, C) fp32 policy log-probs (the 'old' policy of the PPO update)
    entropy: torch.Tensor  # (B, C) fp32 entropy of the policy's next-token distribution
    ref_logps: torch.Tensor | None  # (B, C) fp32 reference log-probs; None without a reference
    values: torch.Tensor | None  # (B, C) fp32 critic values V(x_<t); None without a critic
    rewards: torch.Tensor  # (B,) fp32 sequence rewards (weighted sum of the components)
    components: dict[str, list[float]]  # each reward component's unweighted scores


def _row_chunks(n: int, size: int):
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + max(1, size)))


def _entropy_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Entropy of softmax(hidden @ weight.T) per row, `chunk_size` rows of logits at a time.
    H = logsumexp(z) - sum_v softmax(z)_v z_v. hidden: (N, H); weight: (V, H). Returns (N,)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    w = weight.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start:start + chunk_size] @ w.T).float()  # (n, V)
        lse = torch.logsumexp(logits, dim=-1)
        out[start:start + chunk_size] = lse - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    return out


@torch.no_grad()
def policy_logps_and_entropy(wrapper: nn.Module, rollout, *, micro_batch_size: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's log-probs of the sampled completion tokens and the entropy of its
    next-token distribution there, from one forward per micro-batch.

    `wrapper` is a `CausalLMLogps` (possibly FSDP2-sharded: its root parameters are gathered for
    the duration). The log-probs go through the same backbone forward and `chunked_token_logps`
    as `CausalLMLogps.forward`, so they equal what the training forward computes.
    Returns (logps (B, C), entropy (B, C)), 0 on padding.
    """
    lm = wrapper.causal_lm()
    device = next(wrapper.parameters()).device
    was_training = wrapper.training
    wrapper.eval()
    if hasattr(wrapper, "unshard"):
        wrapper.unshard()
    ids, mask, pos = rollout.input_ids(), rollout.attention_mask(), rollout.position_ids()
    P = rollout.prompt_ids.shape[1]
    logps, entropy = [], []
    try:
        for rows in _row_chunks(ids.shape[0], micro_batch_size):
            hidden = lm.model(input_ids=ids[rows].to(device),
                              attention_mask=mask[rows].long().to(device),
                              position_ids=pos[rows].to(device),
                              use_cache=False).last_hidden_state  # (b, P + C, H)
            h = hidden[:, P - 1:-1]  # (b, C, H): the states that predict completion tokens
            weight = lm.get_output_embeddings().weight  # (V, H)
            logps.append(chunked_token_logps(h, weight, ids[rows, P:].to(device),
                                             chunk_size=wrapper.chunk_size).cpu())
            ent = _entropy_chunks(h.reshape(-1, h.shape[-1]), weight, wrapper.chunk_size)
            entropy.append(ent.view(h.shape[:2]).cpu())
    finally:
        if hasattr(wrapper, "reshard"):
            wrapper.reshard()
        wrapper.train(was_training)
    keep = rollout.completion_mask
    zero = torch.zeros(keep.shape, dtype=torch.float32)
    return torch.where(keep, torch.cat(logps), zero), torch.where(keep, torch.cat(entropy), zero)


@torch.no_grad()
def completion_logps(wrapper: nn.Module, rollout, *, micro_batch_size: int) -> torch.Tensor:
    """Log-probs (B, C) of the completion tokens under `wrapper` (a CausalLMLogps: the
    reference model, or the policy with its LoRA adapter disabled), 0 on padding."""
    device = next(wrapper.parameters()).device
    was_training = wrapper.training
    wrapper.eval()
    ids, mask, pos = rollout.input_ids(), rollout.attention_mask(), rollout.position_ids()
    P = rollout.prompt_ids.shape[1]
    out = [wrapper(ids[rows].to(device), mask[rows].to(device), pos[rows].to(device),
                   start=P).cpu() for rows in _row_chunks(ids.shape[0], micro_batch_size)]
    wrapper.train(was_training)
    return torch.where(rollout.completion_mask, torch.cat(out), torch.zeros(()))


@torch.no_grad()
def completion_values(critic: TokenValues, rollout, *, micro_batch_size: int) -> torch.Tensor:
    """Critic values (B, C), column t = V(prompt + completion[:t]), 0 on padding."""
    device = next(critic.parameters()).device
    was_training = critic.training
    critic.eval()
    ids, mask, pos = rollout.input_ids(), rollout.attention_mask(), rollout.position_ids()
    P = rollout.prompt_ids.shape[1]
    out = [critic(ids[rows].to(device), mask[rows].to(device), pos[rows].to(device))[:, P:].cpu()
           for rows in _row_chunks(ids.shape[0], micro_batch_size)]
    critic.train(was_training)
    return torch.where(rollout.completion_mask, torch.cat(out), torch.zeros(()))


@torch.no_grad()
def score_logps(model: nn.Module, batches: list[GRPOBatch], field: str, temperature: float,
                precision: str) -> None:
    """Fill each batch's `field` (old_logps / ref_logps, (b, C)) with `model`'s log-probs of
    the completion tokens at the sampling temperature, without gradients. `model` is a
    CausalLMLogps; rows of one `prompt_index` share one prompt forward."""
    was_training = model.training
    model.eval()
    for b in batches:
        with autocast(b.input_ids.device, precision):
            logps = model(b.input_ids, b.attention_mask, b.position_ids, start=b.start,
                          shared_prefix=b.prompt_index, temperature=temperature)
        setattr(b, field, logps.float())
    model.train(was_training)


def sequence_rewards(reward_fn, prompts: list, completions: list[str],
                     columns: dict[str, list[Any]]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """(rewards (B,) fp32, unweighted scores per component) from a `tether.rewards.WeightedSum`
    (or any RewardFn, logged as one component named 'reward')."""
    from tether.rewards import call_reward

    if hasattr(reward_fn, "score"):
        scored = reward_fn.score(prompts, completions, **columns)
        return torch.tensor(scored.total, dtype=torch.float32), scored.components
    total = call_reward("reward", reward_fn, prompts, completions, **columns)
    return torch.tensor(total, dtype=torch.float32), {"reward": total}


def score_rollout(rollout, prompts: list, columns: dict[str, list[Any]], *, policy: nn.Module,
                  reference: Reference, critic: TokenValues, reward_fn,
                  micro_batch_size: int) -> Scored:
    """The score stage of RLHF-PPO: the policy's log-probs through its training forward (the
    'old' policy of the update), the sampler's entropy (computed here when the backend does not
    report it), the reference's log-probs (`reference.use`: a frozen copy or the policy with
    its LoRA adapter disabled), the critic's values and the rewards of the completions of `prompts`
    (one per rollout row; `columns` likewise)."""
    mbs = micro_batch_size
    logps = completion_logps(policy, rollout, micro_batch_size=mbs)
    entropy = rollout.entropy
    if entropy is None:
        logps, entropy = policy_logps_and_entropy(policy, rollout, micro_batch_size=mbs)
    with reference.use() as ref:
        ref_logps = completion_logps(ref, rollout, micro_batch_size=mbs)
    values = completion_values(critic, rollout, micro_batch_size=mbs)
    rewards, components = sequence_rewards(reward_fn, prompts, rollout.texts, columns)
    return Scored(logps, entropy, ref_logps, values, rewards, components)
