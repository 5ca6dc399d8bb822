"""Examples -> padded or packed batches of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[t]: token t is a training target (predicted from tokens < t)
    truncated: int = 0  # tokens cut from the end to fit data.max_length (0: kept whole)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    loss_mask: torch.Tensor  # (B, T) bool, True on target tokens
    position_ids: torch.Tensor | None = None  # (B, T) long; packed rows restart at 0 per example
    segment_ids: torch.Tensor | None = None  # (B, T) long; packed rows: 1..k per example, 0 = pad

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.loss_mask),
                     move(self.position_ids), move(self.segment_ids))

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def pad_collate(examples: list[Example], pad_id: int,
                offsets: list[int] | None = None) -> Batch:
    """Right-pad to the longest example; `offsets[i]` columns of left padding before example i
    (default none)."""
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    offsets = offsets or [0] * len(examples)
    T = max(o + len(e.input_ids) for o, e in zip(offsets, examples))
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), T, dtype=torch.bool)
    loss = torch.zeros(len(examples), T, dtype=torch.bool)
    for i, (o, e) in enumerate(zip(offsets, examples)):
        cols = slice(o, o + len(e.input_ids))
        ids[i, cols] = torch.tensor(e.input_ids)
        attn[i, cols] = True
        loss[i, cols] = torch.tensor(e.loss_mask)
    return Batch(ids, attn, loss)


def pack_examples(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Greedy first-fit in the given order: each example goes into the first row with room for
    it, else a new row. Deterministic; an example is never split, and a row holds at most
    max_length tokens. O(examples x rows), fine for the data sets tether packs up front."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in examples:
        n = len(e.input_ids)
        if n > max_length:
            raise ValueError(f"an example of {n} tokens does not fit in a packed row of "
                             f"{max_length}; truncate examples to max_length before packing")
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(e)
                room[i] -= n
                break
        else:
            rows.append([e])
            room.append(max_length - n)
    return rows


def packed_collate(rows: list[list[Example]], pad_id: int) -> Batch:
    """Concatenate each row's examples; positions restart and attention stays inside each one."""
    flat = [Example([t for e in r for t in e.input_ids], [m for e in r for m in e.loss_mask])
            for r in rows]
    batch = pad_collate(flat, pad_id)
    seg = torch.zeros_like(batch.input_ids)
    pos = torch.zeros_like(batch.input_ids)
    for i, row in enumerate(rows):
        start = 0
        for k, e in enumerate(row, start=1):
            n = len(e.input_ids)
            seg[i, start:start + n] = k
            pos[i, start:start + n] = torch.arange(n)
            start += n
    batch.segment_ids, batch.position_ids = seg, pos
    return batch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: query i sees key j iff same segment > 0 and j <= i.

    The diagonal is always True so that no query row is ever fully masked (padding queries
    attend to themselves): depending on the kernel, a fully masked row gives NaN (softmax over
    all -inf; older SDPA kernels), which then leaks into gradients. torch 2.13's CPU SDPA and
    transformers 5's eager path happen to return finite values; this mask does not rely on it.
    """
    T = segment_ids.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=segment_ids.device))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal) | eye)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, T, T) bool mask -> the same mask as an additive bias of `dtype`: 0 where attention
    is allowed, the dtype's most negative finite value where it is not.

    transformers passes a 4-D mask to the attention function as given. SDPA reads a bool mask
    correctly, but the eager implementation *adds* the mask to the scores, so a bool mask there
    silently attends everywhere (measured: hidden states off by ~1.0). Use this form with
    attn_implementation="eager"; either form works with "sdpa"."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)
