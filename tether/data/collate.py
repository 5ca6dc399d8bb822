"""Examples -> padded or packed batches of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[bool]  # loss_mask[t]: token t is a training target (predicted from tokens < t)


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


def pad_collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), T, dtype=torch.bool)
    loss = torch.zeros(len(examples), T, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = True
        loss[i, :n] = torch.tensor(e.loss_mask)
    return Batch(ids, attn, loss)


def pack_examples(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Greedy first-fit in the given order: each row holds whole examples, <= max_length tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in examples:
        n = len(e.input_ids)
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

    The diagonal is always True so that padding queries attend to themselves: a fully masked row
    would make scaled-dot-product attention return NaN, which then leaks into gradients.
    """
    T = segment_ids.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=segment_ids.device))
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal) | eye)[:, None]
