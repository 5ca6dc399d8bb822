"""Rollouts: batched sampling with a KV cache, behind a small backend interface.

    backend = TorchBackend(policy, tokenizer, precision="fp32")
    rollout = backend.generate(prompt_ids, SamplingParams(max_new_tokens=32, group_size=8),
                               generator=torch.Generator().manual_seed(step))

`prompt_ids` are the token ids of the *unique* prompts. Each prompt is prefilled once and its KV
cache repeated `group_size` times, so the G samples of a group share one prompt encoding. Then one
token per row per forward (the cache grows by one position): temperature, top-k and top-p
filtering, sampling with an optional seeded `torch.Generator`, EOS and stop strings end a row.
A finished row emits pad tokens with mask False until every row is finished (or
`max_new_tokens` is reached).

The loop calls the model's own forward with `past_key_values`, not transformers' `generate`, so
that it returns exactly what RL needs: the sampled tokens, their log-probs, masks, truncation
flags. Another engine plugs in by implementing `GenerationBackend`: vLLM does
(`tether.engine.vllm_backend`, `generation.backend: vllm`); see docs/generation.md.

`greedy_complete` (held-out accuracy in the recipes) is the same loop at temperature 0.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from torch import nn

from tether.data.prompts import encode_prompt
from tether.engine import dist
from tether.engine.optimize import autocast


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with probability >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    stop: tuple[str, ...] = ()  # stop strings: the completion ends with the token completing one
    group_size: int = 1  # G samples per prompt

    def check(self) -> None:
        """ValueError naming the bad parameter."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class Rollout:
    """B = n_prompts * G sampled completions; row i continues prompt i // G."""
    prompt_ids: torch.Tensor  # (B, P) long, left-padded with the pad id
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    completion_ids: torch.Tensor  # (B, C) long, right-padded with the pad id
    completion_mask: torch.Tensor  # (B, C) bool, True on generated tokens up to and incl. EOS/stop
    logps: torch.Tensor  # (B, C) fp32 log-prob of each sampled token under softmax(logits / T)
    #                      (before top-k/top-p filtering; T = 1 when greedy), 0 on pad
    truncated: torch.Tensor  # (B,) bool: reached max_new_tokens without EOS or a stop string
    texts: list[str]  # decoded completions (special tokens skipped, cut after a stop string)
    group_size: int
    entropy: torch.Tensor | None = None  # (B, C) fp32 entropy of softmax(logits / T) at each
    #                                      generated token (a backend may leave it None), 0 on pad

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0] // self.group_size

    def input_ids(self) -> torch.Tensor:
        """(B, P + C) prompt then completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """(B, P + C) bool: real prompt tokens and generated tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """(B, P + C) positions counting from each row's first real token (0 on left padding),
        the positions the tokens had during generation."""
        return (self.attention_mask().long().cumsum(dim=1) - 1).clamp(min=0)

    def loss_mask(self) -> torch.Tensor:
        """(B, P + C) bool: the completion tokens, aligned with `input_ids()`."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)

    def completion_lengths(self) -> torch.Tensor:
        """(B,) long: generated tokens per row (incl. EOS / the stop token)."""
        return self.completion_mask.sum(dim=1)

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        """The given rows (e.g. the rows of kept groups; keep groups whole so that
        `group_size` stays meaningful)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = {f.name: getattr(self, f.name)[index] for f in fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **picked, texts=[self.texts[i] for i in index.tolist()])

    def to(self, device) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


class GenerationBackend(Protocol):
    """What the RL recipes need from a generation engine (docs/generation.md)."""

    external_sampler: bool  # True: `Rollout.logps` come from another engine than the trainer's

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None = None) -> Rollout: ...

    def sync_weights(self) -> None:
        """Called after every optimizer step: the engine samples from the new weights next."""


# ---------------------------------------------------------------------------------------------
# Pure sampling maths


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering: removed entries become -inf.

    top_k > 0: keep entries >= the k-th largest (ties with it are kept).
    top_p < 1: over the softmax of what top-k kept, sorted descending, keep token j when the
               probability of the tokens before it is < top_p, i.e. the smallest prefix whose
               probability reaches top_p (the most likely token is always kept).
    logits: (..., V). Returns (..., V), same dtype.
    """
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None):
    """One token per row, its log-prob and the entropy, under softmax(logits / T) (unfiltered).

    logits: (B, V) fp32. temperature 0 = argmax, log-prob and entropy under softmax(logits).
    Top-k / top-p restrict which tokens can be drawn, not the distribution the log-prob is read
    from. Returns (tokens (B,) long, logps (B,) fp32, entropy (B,) fp32).
    """
    scaled = logits / params.temperature if params.temperature > 0 else logits
    log_probs = scaled.log_softmax(dim=-1)  # (B, V)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # (B,)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1), entropy


def seeded(seed: int, *parts: int, device="cpu") -> torch.Generator:
    """A generator that depends only on (seed, parts), so that a resumed run draws exactly the
    numbers the uninterrupted one drew."""
    value = seed
    for p in parts:
        value = value * 1_000_003 + p
    return torch.Generator(device=device).manual_seed(value % 2**63)


# ---------------------------------------------------------------------------------------------
# The PyTorch backend


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, P) long, mask (N, P) bool), left-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


class TorchBackend:
    """Sampling with the policy itself: transformers forward + DynamicCache, one token per step.

    `wrapper_or_model`: a `CausalLMLogps` (possibly FSDP2-sharded; its root parameters are
    gathered for the duration, decoder layers gather their own), a peft model, or a plain
    transformers causal LM. Under FSDP2 every rank runs the same number of forwards: the loop
    stops when no row on any rank is still generating.
    """

    external_sampler = False  # the policy samples itself: its log-probs are the trainer's

    def __init__(self, wrapper_or_model: nn.Module, tokenizer, *, precision: str = "fp32"):
        self.module = wrapper_or_model
        self.tokenizer = tokenizer
        self.precision = precision
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        lm = self._lm()
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = torch.tensor(sorted(e for e in eos if e is not None), dtype=torch.long)

    def sync_weights(self) -> None:
        """Nothing to do: the backend samples with the training model itself."""

    def _lm(self) -> nn.Module:
        m = self.module
        if hasattr(m, "causal_lm"):
            return m.causal_lm()
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None = None) -> Rollout:
        params.check()
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, each of at least one token")
        was_training = self.module.training
        self.module.eval()
        if hasattr(self.module, "unshard"):
            self.module.unshard()
        try:
            return self._sample(prompt_ids, params, generator)
        finally:
            if hasattr(self.module, "reshard"):
                self.module.reshard()
            self.module.train(was_training)

    def _forward(self, lm, ids, mask, positions, cache):
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before)
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters \
            else "past_key_values"
        with autocast(ids.device, self.precision):
            out = lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                     use_cache=True, logits_to_keep=1, **{name: cache})
        return out.logits[:, -1].float(), getattr(out, name)  # (N, V), the grown cache

    def _sample(self, prompt_ids, params: SamplingParams, generator) -> Rollout:
        lm = self._lm()
        device = next(self.module.parameters()).device
        G, T = params.group_size, params.max_new_tokens
        unique_ids, unique_mask = left_pad(prompt_ids, self.pad_id)  # (N, P)
        positions = (unique_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (N, P)

        # prefill each unique prompt once, then repeat its cache for the G rows of its group
        logits, cache = self._forward(lm, unique_ids.to(device), unique_mask.to(device),
                                      positions.to(device), None)
        if G > 1:
            cache.batch_repeat_interleave(G)
            logits = logits.repeat_interleave(G, dim=0)  # (B, V)
        prompt_ids_b = unique_ids.repeat_interleave(G, dim=0)  # (B, P)
        prompt_mask_b = unique_mask.repeat_interleave(G, dim=0)  # (B, P)
        B, P = prompt_ids_b.shape
        next_position = prompt_mask_b.sum(dim=1).to(device)  # (B,) position of completion token 0
        full_mask = torch.cat([prompt_mask_b, torch.ones(B, T, dtype=torch.bool)], 1).to(device)

        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T)
        logps = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
        entropy = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
        generated = torch.zeros((B, T), dtype=torch.bool)  # (B, T) True on generated tokens
        active = torch.ones(B, dtype=torch.bool)  # (B,) still generating
        live = torch.arange(B)  # the rows in the cache's batch, in order (finished rows leave it)
        stopped: list = [None] * B  # the stop strings that ended each row
        steps = 0
        for t in range(T):
            tok, lp, ent = (x.cpu() for x in sample_tokens(logits, params, generator))
            rows = live[active[live]]  # live rows that still generate (all but FSDP fillers)
            keep = active[live]
            tokens[rows, t], logps[rows, t], entropy[rows, t] = tok[keep], lp[keep], ent[keep]
            generated[rows, t] = True
            active[rows] &= ~torch.isin(tok[keep], self.eos_ids)
            if params.stop:
                for row in rows[active[rows]].tolist():
                    text = self.tokenizer.decode(tokens[row, :t + 1], skip_special_tokens=True)
                    hit = [s for s in params.stop if s in text]
                    if hit:
                        active[row], stopped[row] = False, hit
            steps = t + 1
            if t == T - 1 or not self._any_active(active):
                break
            keep = active[live]
            if not keep.all():  # drop finished rows from the batch (keep one row for FSDP)
                keep = keep if keep.any() else torch.arange(len(live)) == 0
                index = keep.nonzero().flatten()
                cache.batch_select_indices(index.to(device))
                live, tok = live[index], tok[index]
            feed = torch.where(active[live], tok, torch.full_like(tok, self.pad_id))
            logits, cache = self._forward(lm, feed[:, None].to(device),
                                          full_mask[live.to(device), :P + t + 1],
                                          (next_position[live.to(device)] + t)[:, None], cache)

        completion_ids, completion_mask = tokens[:, :steps], generated[:, :steps]
        texts = []
        for row in range(B):
            text = self.tokenizer.decode(completion_ids[row][completion_mask[row]],
                                         skip_special_tokens=True)
            if stopped[row]:
                end = min(text.index(s) + len(s) for s in stopped[row] if s in text)
                text = text[:end]
            texts.append(text)
        return Rollout(prompt_ids=prompt_ids_b, prompt_mask=prompt_mask_b,
                       completion_ids=completion_ids, completion_mask=completion_mask,
                       logps=logps[:, :steps], truncated=active.clone(), texts=texts,
                       group_size=G, entropy=entropy[:, :steps])

    @staticmethod
    def _any_active(active: torch.Tensor) -> bool:
        """Whether any row on any rank still generates (ranks must agree on the forwards)."""
        if dist.is_distributed():
            return dist.all_reduce_sum(int(active.any())).item() > 0
        return bool(active.any())


@torch.no_grad()
def greedy_complete(wrapper: nn.Module, tokenizer, prompts: list, *, max_new_tokens: int = 32,
                    batch_size: int = 16, precision: str = "fp32") -> list[str]:
    """Chat prompts (lists of messages) or plain strings -> greedy completion texts, cut at the
    first EOS (the held-out accuracy of the recipes)."""
    backend = TorchBackend(wrapper, tokenizer, precision=precision)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        texts += backend.generate(ids, params).texts
    return texts
