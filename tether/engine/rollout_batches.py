"""Rows of a rollout as trainable micro-batches: `GRPOBatch` (and `micro_batches`, which cuts a
`Rollout` into them) for the group-relative family, `PPOBatch` for RLHF-PPO.

Sequences are the prompt (left-padded) then the completion (right-padded); per-token tensors
are aligned with the completion tokens, column t = completion token t (see `engine.score`).
Each micro-batch is trimmed to the columns that hold a real token in one of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tether.engine.generate import Rollout


@dataclass
class GRPOBatch:
    input_ids: torch.Tensor  # (b, T) long: prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # (b, T) bool
    position_ids: torch.Tensor  # (b, T) long
    start: int  # the first completion column (prompt width)
    completion_mask: torch.Tensor  # (b, C) bool, C = T - start: generated tokens
    advantages: torch.Tensor  # (b,) fp32
    old_logps: torch.Tensor | None  # (b, C) fp32; None = the policy itself (num_iterations 1)
    ref_logps: torch.Tensor | None  # (b, C) fp32; None when beta = 0
    prompt_index: torch.Tensor | None  # (b,) long: rows with one value share their prompt
    extra_units: float = 0.0  # denominator share of rows left out because their loss is 0
    sampler_logps: torch.Tensor | None = None  # (b, C) fp32 log-probs from another sampling
    #                                            engine (vLLM); None = the trainer sampled itself

    def to(self, device) -> "GRPOBatch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return GRPOBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def micro_batches(r: Rollout, advantages: torch.Tensor, size: int,
                  prompt_index: torch.Tensor | None = None,
                  sampler_logps: bool = False) -> list[GRPOBatch]:
    """`size` rows per micro-batch in rollout order (a group's rows together, so that they share
    one prompt forward when `prompt_index` is given), each trimmed to its own longest prompt and
    completion. The global normalisation makes the split irrelevant to the result.
    sampler_logps: carry the rollout's own log-probs (another engine sampled it: vLLM)."""
    ids, mask, pos = r.input_ids(), r.attention_mask(), r.position_ids()
    P, lengths = r.prompt_ids.shape[1], r.completion_lengths()
    out = []
    for chunk in torch.arange(len(r.texts)).split(size) if r.texts else ():
        left = P - int(r.prompt_mask[chunk].sum(1).max())
        right = P + max(1, int(lengths[chunk].max()))
        out.append(GRPOBatch(ids[chunk, left:right], mask[chunk, left:right],
                             pos[chunk, left:right], P - left, r.completion_mask[chunk, :right - P],
                             advantages[chunk], None, None,
                             None if prompt_index is None else prompt_index[chunk],
                             sampler_logps=r.logps[chunk, :right - P] if sampler_logps else None))
    return out


@dataclass
class PPOBatch:
    """Rows of a scored rollout: sequences (b, P + C), completion tensors (b, C)."""
    input_ids: torch.Tensor  # (b, P + C) long: left-padded prompt, right-padded completion
    attention_mask: torch.Tensor  # (b, P + C) bool, True on real tokens
    position_ids: torch.Tensor  # (b, P + C) long
    completion_mask: torch.Tensor  # (b, C) bool, True on generated tokens
    old_logps: torch.Tensor  # (b, C) fp32 policy log-probs before the update
    old_values: torch.Tensor  # (b, C) fp32 critic values before the update
    advantages: torch.Tensor  # (b, C) fp32 (whitened)
    returns: torch.Tensor  # (b, C) fp32 value targets
    tis_weight: torch.Tensor  # (b, C) fp32 truncated importance weight of each token's policy
    #                           loss vs the sampler (vLLM); all 1 when off (tether.losses)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def select(self, rows: torch.Tensor) -> "PPOBatch":
        """These rows, without the columns that are padding in all of them."""
        P = self.prompt_len
        real = self.attention_mask[rows]
        first = int(real[:, :P].any(dim=0).long().argmax())  # first column with a prompt token
        width = int(self.completion_mask[rows].any(dim=0).nonzero().max()) + 1
        seq, comp = slice(first, P + width), slice(0, width)
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)[rows]
            out[f.name] = t[:, seq] if t.shape[1] == self.input_ids.shape[1] else t[:, comp]
        return PPOBatch(**out)

    def to(self, device) -> "PPOBatch":
        return PPOBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
