"""Greedy completions for evaluation (held-out task accuracy).

This is the evaluation path only: transformers' `generate` with a KV cache, left padding and a
fixed number of new tokens (so that every rank runs the same number of forwards under FSDP2).
The batched sampling engine for RL rollouts (groups sharing a prompt cache, sampling log-probs)
is a separate piece that the RL recipes add here.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_complete(wrapper: nn.Module, tokenizer, prompts: list[list[dict]], *,
                    max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Chat prompts (lists of messages) -> greedy completion texts, cut at the first EOS.

    `wrapper` is the recipe's model wrapper (`CausalLMLogps`, possibly FSDP2-sharded): its root
    parameters are gathered for the duration, decoder layers gather their own.
    """
    lm = wrapper.causal_lm()
    device = next(wrapper.parameters()).device
    was_training = wrapper.training
    wrapper.eval()
    if hasattr(wrapper, "unshard"):
        wrapper.unshard()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = lm.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              temperature=None, top_p=None, top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, max_new_tokens)
            for row in new.tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if hasattr(wrapper, "reshard"):
            wrapper.reshard()
        wrapper.train(was_training)
    return texts
