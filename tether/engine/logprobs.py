"""Per-token log-probs of the labels from hidden states, in chunks through the lm_head.

A 135M model over a 49k vocabulary spends most of its activation memory on logits: B x T x V
floats (8 x 512 x 49152 x 4 bytes = 805 MB in fp32, and autograd keeps a copy for backward).
`chunked_token_logps` never holds more than `chunk_size` rows by 4096 vocabulary columns of
logits: the forward keeps only each row's log-sum-exp (accumulated online over the vocabulary
blocks), and the backward recomputes each block's softmax.

For target y_t with logits z_t = W h_t (W: (V, H) lm_head weight):
    log p(y_t) = z_t[y_t] - logsumexp(z_t)
    d log p / d z_t = onehot(y_t) - softmax(z_t)
so  dL/dh_t = g_t (onehot - softmax) W  and  dL/dW = sum_t g_t (onehot - softmax)^T h_t.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from tether.data.collate import additive_mask
from tether.engine.dist import is_distributed


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype when autocast is on for x's
    device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# Vocabulary columns handled at once: the lm_head runs block by block over the vocabulary (a
# (4096, H) slice of the weight cast at a time, logits of at most chunk_size x 4096), with an
# online log-sum-exp in the forward. No buffer then has the vocabulary's size: the full (V, H)
# cast (57 MB for SmolLM2 in bf16), (n, V) logits or logit gradients and a (V, H) partial weight
# gradient left holes in the host heap that each step's other buffers could not fill.
_VOCAB_BLOCK = 4096


def _blocks(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _label_columns(labels: torch.Tensor, v0: int, v1: int):
    """For vocabulary block [v0, v1): which labels fall in it (bool (n,)) and each label's
    column in the block ((n,) long, clamped into the block for the labels outside it)."""
    return (labels >= v0) & (labels < v1), (labels - v0).clamp(0, v1 - v0 - 1)


class _ChunkedTokenLogps(torch.autograd.Function):
    # Vocabulary blocks outside, row chunks inside: each (v, H) block of the weight is cast
    # once per pass; every row still meets the blocks in vocabulary order.

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        # hidden: (N, H); weight: (V, H); labels: (N,) long -> logps (N,) fp32
        compute = compute_dtype(hidden)
        n = hidden.shape[0]
        top = torch.full((n,), -torch.inf, device=hidden.device)  # running max of the logits
        total = torch.zeros(n, device=hidden.device)  # running sum of exp(z - top)
        # z[label]; NaN stays for a label outside the vocabulary (the loss check names it)
        picked = torch.full((n,), torch.nan, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute)  # (N, H)
            for v0, v1 in _blocks(weight.shape[0], _VOCAB_BLOCK):
                w = weight[v0:v1].to(compute)  # (v, H)
                for r0, r1 in _blocks(n, chunk_size):
                    z = h[r0:r1] @ w.T  # (n, v) in the compute dtype
                    here, col = _label_columns(labels[r0:r1], v0, v1)
                    at = z.gather(1, col[:, None])[:, 0].float()
                    picked[r0:r1] = torch.where(here, at, picked[r0:r1])
                    new_top = torch.maximum(top[r0:r1], z.amax(dim=-1).float())
                    # rescale the running sum to the new max, add this block's exp(z - max),
                    # z - max in fp32 (one fp32 buffer, exponentiated in place)
                    total[r0:r1].mul_(torch.exp(top[r0:r1] - new_top)).add_(
                        torch.sub(z, new_top[:, None]).exp_().sum(dim=-1))
                    top[r0:r1] = new_top
        lse = total.log_().add_(top)  # (N,)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.compute = chunk_size, compute
        return picked - lse

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, labels, lse = ctx.saved_tensors
        compute, chunk_size = ctx.compute, ctx.chunk_size
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if needs_hidden else None
        grad_weight = torch.empty_like(weight) if needs_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            h_all = hidden.to(compute)  # (N, H)
            for v0, v1 in _blocks(weight.shape[0], _VOCAB_BLOCK):
                w = weight[v0:v1].to(compute)  # (v, H)
                for r0, r1 in _blocks(hidden.shape[0], chunk_size):
                    h, g = h_all[r0:r1], grad_logps[r0:r1, None]  # (n, H), (n, 1)
                    here, col = _label_columns(labels[r0:r1], v0, v1)
                    # d logp / d logits = onehot(label) - softmax, scaled by the incoming g
                    p = torch.sub(h @ w.T, lse[r0:r1, None]).exp_().mul_(-g)  # (n, v) fp32
                    p.scatter_add_(1, col[:, None], torch.where(here[:, None], g, 0.0))
                    grad_logits = p.to(compute)  # (n, v)
                    del p
                    if needs_hidden:
                        part = (grad_logits @ w).float()  # (n, H)
                        if v0 == 0:
                            grad_hidden[r0:r1] = part
                        else:
                            grad_hidden[r0:r1] += part
                    if needs_weight:
                        part = grad_logits.T @ h  # (v, H) in the compute dtype
                        if r0 == 0:
                            grad_weight[v0:v1] = part
                        else:
                            grad_weight[v0:v1] += part
        if needs_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        *, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[labels] without materialising all the logits.

    hidden: (..., H); weight: (V, H); labels: (...) long. Returns (...) fp32.
    Under autocast the matmuls run in the autocast dtype; log-sum-exp is always fp32.
    """
    shape = labels.shape
    flat = _ChunkedTokenLogps.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                    labels.reshape(-1), chunk_size)
    return flat.reshape(shape)


def naive_token_logps(hidden: torch.Tensor, weight: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Reference implementation (full logits); for tests only."""
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def embed_tokens(lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, H) input embeddings of a causal LM, its gradient taken without a (V, H) buffer.

    When the lm_head shares the trained embedding matrix (tied weights, as in SmolLM2),
    autograd would build a dense (V, H) gradient for the lookup (113 MB fp32 for a 49k x 576
    vocabulary, zero-filled every step) and add it to the lm_head's. Instead the lookup reads a
    detached weight, and a hook adds its rows' gradients into `weight.grad` in place when the
    gradient reaches the embeddings, which is after the lm_head's (it is computed first; the
    addition is order-free anyway). Same rule as nn.Embedding: no gradient for `padding_idx`.
    Elsewhere (untied, frozen, max_norm, under torch.distributed) it is the plain lookup."""
    emb = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    weight = emb.weight
    if not (torch.is_grad_enabled() and weight.requires_grad and type(emb) is nn.Embedding
            and head is not None and head.weight is weight and emb.max_norm is None
            and not is_distributed()):
        return emb(input_ids)
    ids = input_ids.reshape(-1)  # (B*T,)
    keep = None if emb.padding_idx is None else ids != emb.padding_idx
    index = ids if keep is None else ids[keep]  # (n,) rows of the weight that get a gradient

    def add_rows(grad: torch.Tensor) -> None:  # grad: (B, T, H)
        rows = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        rows = rows if keep is None else rows[keep]  # (n, H)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, index, rows)

    embeds = nn.functional.embedding(input_ids, weight.detach(), emb.padding_idx)
    embeds.requires_grad_(True)
    embeds.register_hook(add_rows)
    return embeds


class CausalLMLogps(nn.Module):
    """Wraps a transformers causal LM so that forward returns per-token label log-probs.

    `forward(input_ids, attention_mask)` -> (B, T) fp32 where out[:, t] = log p(input_ids[:, t] |
    input_ids[:, :t]) for t >= 1 and out[:, 0] = 0 (nothing predicts the first token). Aligning the
    output with the input positions lets one bool mask over input tokens select the targets.

    Going through this module's own forward (not the HF model's) matters under FSDP2: the root
    module's hooks gather the embeddings and lm_head before the chunked log-prob pass uses them.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024):
        super().__init__()
        self.model = model  # a PreTrainedModel or a peft wrapper around one
        self.chunk_size = chunk_size

    def causal_lm(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, *, start: int = 0,
                shared_prefix: torch.Tensor | None = None,
                temperature: float = 1.0) -> torch.Tensor:
        # input_ids: (B, T) long; attention_mask: (B, T) bool, or (B, 1, T, T) bool for packed rows
        # start >= 1: score only positions >= start (e.g. an RL completion after a P-token
        # prompt); the lm_head then runs on those alone and the result is (B, T - start),
        # out[:, j] = log p(x_{start+j} | x_<start+j), forward(...)[:, start:] up to rounding.
        # shared_prefix: (B,) long, with start >= 1 and a (B, T) mask: rows with equal values have
        # identical first `start` columns (ids, mask, positions: one prompt sampled G times).
        # Each distinct prefix then runs once and its KV cache is gathered for its rows (with
        # gradients), instead of recomputing the prompt for every sample.
        # temperature: log-probs of softmax(logits / temperature) (the distribution a sampler at
        # that temperature drew from); the hidden states are divided, the same thing.
        if shared_prefix is not None and not self._checkpointing():
            return self._forward_shared_prefix(input_ids, attention_mask, position_ids, start,
                                               shared_prefix, temperature)
        lm = self.causal_lm()
        mask = attention_mask if attention_mask.dim() == 4 else attention_mask.long()
        if mask.dim() == 4 and mask.dtype == torch.bool \
                and getattr(lm.config, "_attn_implementation", "sdpa") == "eager":
            mask = additive_mask(mask)  # eager attention adds a 4-D mask to the scores
        hidden = lm.model(inputs_embeds=embed_tokens(lm, input_ids), attention_mask=mask,
                          position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
        if temperature != 1.0:
            hidden = hidden / temperature
        weight = lm.get_output_embeddings().weight  # (V, H)
        if start >= 1:
            return chunked_token_logps(hidden[:, start - 1:-1], weight, input_ids[:, start:],
                                       chunk_size=self.chunk_size)  # (B, T - start)
        logps = chunked_token_logps(hidden[:, :-1], weight, input_ids[:, 1:],
                                    chunk_size=self.chunk_size)  # (B, T-1)
        return torch.nn.functional.pad(logps, (1, 0))  # (B, T)

    def _checkpointing(self) -> bool:
        """True when transformers will recompute the layers in backward: it then drops the KV
        cache that prefix sharing needs, so each row runs its own prefix (the same maths)."""
        lm = self.causal_lm()
        if not (lm.training and torch.is_grad_enabled()):
            return False
        active = getattr(lm, "is_activation_checkpointing", None)
        if active is None:  # transformers before 5
            active = getattr(lm, "is_gradient_checkpointing", False)
        return bool(active)

    def _forward_shared_prefix(self, input_ids, attention_mask, position_ids, start: int,
                               shared_prefix: torch.Tensor, temperature: float) -> torch.Tensor:
        """forward(..., start=start) with each distinct prefix computed once. (B, T - start)"""
        if start < 1 or attention_mask.dim() != 2:
            raise ValueError("shared_prefix needs start >= 1 and a (B, T) attention mask")
        lm = self.causal_lm()
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        _, rows_of = torch.unique(shared_prefix, return_inverse=True)  # (B,) prefix of each row
        first = torch.zeros(int(rows_of.max()) + 1, dtype=torch.long, device=input_ids.device)
        first.scatter_(0, rows_of.flip(0), torch.arange(len(rows_of) - 1, -1, -1,
                                                         device=input_ids.device))  # (N,)
        # one embedding lookup for both passes: one (V, H) embedding gradient in backward, not two
        embeds = embed_tokens(lm, input_ids)  # (B, T, H)
        prefix_forward = (_interleaved_prefix_forward if _interleavable(lm.model)
                          else _two_call_prefix_forward)
        hidden = prefix_forward(lm.model, embeds, attention_mask, position_ids, start, first,
                                rows_of)  # (B, T - start, H)
        if temperature != 1.0:
            hidden = hidden / temperature
        weight = lm.get_output_embeddings().weight  # (V, H)
        return chunked_token_logps(hidden, weight, input_ids[:, start:],
                                   chunk_size=self.chunk_size)  # (B, T - start)


def _cache_arg(forward) -> str:
    """The name transformers gives the KV cache argument ("past_key_values" before 5.x)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _two_call_prefix_forward(base: nn.Module, embeds: torch.Tensor,
                             attention_mask: torch.Tensor, position_ids: torch.Tensor,
                             start: int, first: torch.Tensor,
                             rows_of: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, T - start, H) that predict tokens start..T-1, from two calls of the
    decoder stack `base`: the N distinct prefixes, then the B rows' rest on their prefix's KV
    cache. Arguments as `_interleaved_prefix_forward`'s; any model with a KV cache."""
    cache_arg = _cache_arg(base.forward)
    prefix = base(inputs_embeds=embeds[first, :start],
                  attention_mask=attention_mask[first, :start].long(),
                  position_ids=position_ids[first, :start], use_cache=True)  # N rows
    cache = getattr(prefix, cache_arg)
    cache.batch_select_indices(rows_of)  # each row gets its prefix's keys and values
    rest = base(inputs_embeds=embeds[:, start:], attention_mask=attention_mask.long(),
                position_ids=position_ids[:, start:], use_cache=True,
                **{cache_arg: cache}).last_hidden_state  # (B, T - start, H)
    return torch.cat([prefix.last_hidden_state[rows_of, -1:], rest[:, :-1]], dim=1)


def _interleavable(base: nn.Module) -> bool:
    """True for a Llama decoder stack, whose forward `_interleaved_prefix_forward` repeats."""
    return getattr(base.config, "model_type", None) == "llama" and all(
        hasattr(base, a) for a in ("layers", "norm", "rotary_emb"))


def _interleaved_prefix_forward(base: nn.Module, embeds: torch.Tensor,
                                attention_mask: torch.Tensor, position_ids: torch.Tensor,
                                start: int, first: torch.Tensor,
                                rows_of: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, T - start, H) that predict tokens start..T-1: what
    `_two_call_prefix_forward` gives, with the same operations, but layer by
    layer: prefix layer l (N distinct prefixes), its keys and values gathered for the B rows,
    then the rest's layer l (B rows, attending to them).

    Why: autograd's backward runs the most recently recorded nodes first. With the prefix run
    in a call of its own before the rest, every layer's prefix backward waits until the rest's
    backward has gone through all layers, and each weight's gradient waits with it (the
    gradients of the two uses add up before they reach `.grad`). Interleaved, layer l's weight
    gradients are complete as soon as both of its halves have gone back, so a step taken in
    backward (`engine/optimize.steps_in_backward`) frees them one layer at a time.

    embeds: (B, T, H); attention_mask: (B, T); position_ids: (B, T); first: (N,) one row of
    each prefix; rows_of: (B,) the prefix of each row.
    """
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    config = base.config
    prefix_cache, rest_cache = DynamicCache(config=config), DynamicCache(config=config)
    prefix_h = embeds[first, :start]  # (N, start, H)
    rest_h = embeds[:, start:]  # (B, T - start, H)
    prefix_pos, rest_pos = position_ids[first, :start], position_ids[:, start:]
    prefix_mask = create_causal_mask(config=config, inputs_embeds=prefix_h,
                                     attention_mask=attention_mask[first, :start].long(),
                                     position_ids=prefix_pos,
                                     **{_cache_arg(create_causal_mask): prefix_cache})
    prefix_rope = base.rotary_emb(prefix_h, position_ids=prefix_pos)
    rest_rope = base.rotary_emb(rest_h, position_ids=rest_pos)
    rest_mask = None
    layers = base.layers[: config.num_hidden_layers]
    cache_arg = _cache_arg(layers[0].forward)
    for index, layer in enumerate(layers):
        prefix_h = layer(prefix_h, attention_mask=prefix_mask, position_embeddings=prefix_rope,
                         position_ids=prefix_pos, use_cache=True, **{cache_arg: prefix_cache})
        cached = prefix_cache.layers[index]
        rest_cache.update(cached.keys[rows_of], cached.values[rows_of], index)  # (B, Hkv, start, e)
        if index == 0:  # sized against the cache, which now holds the prefix
            rest_mask = create_causal_mask(config=config, inputs_embeds=rest_h,
                                           attention_mask=attention_mask.long(),
                                           position_ids=rest_pos,
                                           **{_cache_arg(create_causal_mask): rest_cache})
        rest_h = layer(rest_h, attention_mask=rest_mask, position_embeddings=rest_rope,
                       position_ids=rest_pos, use_cache=True, **{cache_arg: rest_cache})
    last_prefix = base.norm(prefix_h[:, -1:])[rows_of]  # (B, 1, H)
    return torch.cat([last_prefix, base.norm(rest_h[:, :-1])], dim=1)  # (B, T - start, H)
