"""Process reward models (Lightman et al. 2023): a score for every step of a solution.

A `tether prm` model is `AutoModelForTokenClassification` with one output on a causal LM: the
logit x at each step's score token (the last token of the step separator after the step) gives
p = sigmoid(x), the probability that the step is correct. A solution's score aggregates its steps:
`min` (the weakest step) or `prod` (the probability that every step is correct, treating steps as
independent); Lightman et al. rank solutions by the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tether.errors import ConfigError

AGGREGATES = ("min", "prod")


def aggregate_steps(step_probs: torch.Tensor, step_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B,) solution scores from (B, S) step probabilities over the steps step_mask selects:
    min_k p_k or prod_k p_k. A row with no step scores 0 (nothing correct to reward)."""
    if how == "min":
        agg = step_probs.masked_fill(~step_mask, float("inf")).amin(dim=-1)  # (B,)
    elif how == "prod":
        agg = step_probs.masked_fill(~step_mask, 1.0).prod(dim=-1)  # (B,)
    else:
        raise ConfigError(f"prm.aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")
    return torch.where(step_mask.any(dim=-1), agg, torch.zeros_like(agg))


def step_logits_at(token_logits: torch.Tensor, step_positions: torch.Tensor) -> torch.Tensor:
    """(B, S) logits of the steps: token_logits (B, T) read at step_positions (B, S) long."""
    return token_logits.gather(1, step_positions)


@dataclass
class ProcessScores:
    total: list[float]  # aggregate over each completion's steps (min or prod of p), in [0, 1]
    steps: list[list[float]]  # p = sigmoid(logit) of every step of each completion


class ProcessRewardScorer:
    """A `tether prm` model directory as a reward function: batched, without gradients.

    `scorer(prompts, completions)` returns one score per completion (the aggregate, so it plugs
    in wherever a RewardFn does, e.g. a WeightedSum); `scorer.score(...)` also returns every
    step's probability. A completion is a list of steps, or a string that is split at the step
    separator (empty pieces dropped). Each step is tokenised alone and followed by the separator,
    exactly as in training. The separator and aggregate default to those the run saved in the
    model's config.json (`tether_prm`); a completion with no step scores 0."""

    def __init__(self, path: str | Path, *, aggregate: str | None = None,
                 step_separator: str | None = None, batch_size: int = 16,
                 max_length: int = 1024, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from tether.data.stepwise import separator_token_ids

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"process reward model: {path} is not a model directory (no "
                              "config.json); give the process_reward_model directory a "
                              "`tether prm` run wrote")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForTokenClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True)
        if self.model.config.num_labels != 1:
            raise ConfigError(f"process reward model: {path} has "
                              f"{self.model.config.num_labels} labels; a `tether prm` model has one")
        saved = getattr(self.model.config, "tether_prm", None) or {}
        self.separator = step_separator if step_separator is not None \
            else saved.get("step_separator", "\n")
        self.aggregate = aggregate if aggregate is not None else saved.get("aggregate", "min")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATES)}, got "
                              f"{self.aggregate!r}")
        self.separator_ids = separator_token_ids(self.tokenizer, self.separator)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.pad_id = self.tokenizer.pad_token_id

    def steps_of(self, completion: str | list[str]) -> list[str]:
        if isinstance(completion, list):
            return [s for s in completion if s.strip()]
        return [s for s in completion.split(self.separator) if s.strip()]

    def encode(self, prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """(ids, step score positions) as in training; steps that do not fit in max_length are
        dropped from the end (they get no score)."""
        from tether.data.formats import text_ids
        from tether.data.stepwise import join_steps, prompt_ids

        ids, positions = join_steps(prompt_ids(prompt, self.tokenizer, {"source": "PRM input"}),
                                    [text_ids(self.tokenizer, s) for s in steps],
                                    self.separator_ids)
        keep = sum(p < self.max_length for p in positions)
        return (ids[:positions[keep - 1] + 1] if keep else ids[:self.max_length],
                positions[:keep])

    @torch.no_grad()
    def score(self, prompts: list, completions: list, **columns: Any) -> ProcessScores:
        encoded = [self.encode(p, self.steps_of(c))
                   for p, c in zip(prompts, completions, strict=True)]
        totals: list[float] = []
        steps: list[list[float]] = []
        for i in range(0, len(encoded), self.batch_size):
            chunk = encoded[i:i + self.batch_size]
            T = max(max(len(ids) for ids, _ in chunk), 1)
            S = max(max(len(pos) for _, pos in chunk), 1)
            input_ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros(len(chunk), T, dtype=torch.bool)  # (B, T) real tokens
            positions = torch.zeros(len(chunk), S, dtype=torch.long)  # (B, S)
            step_mask = torch.zeros(len(chunk), S, dtype=torch.bool)  # (B, S) real steps
            for b, (ids, pos) in enumerate(chunk):
                input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[b, :len(ids)] = True
                positions[b, :len(pos)] = torch.tensor(pos, dtype=torch.long)
                step_mask[b, :len(pos)] = True
            if not attention_mask.any():  # every completion of the chunk is empty
                totals += [0.0] * len(chunk)
                steps += [[] for _ in chunk]
                continue
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device),
                                use_cache=False).logits[..., 0].float().cpu()  # (B, T)
            probs = torch.sigmoid(step_logits_at(logits, positions))  # (B, S)
            totals += aggregate_steps(probs, step_mask, self.aggregate).tolist()
            steps += [probs[b, :len(pos)].tolist() for b, (_, pos) in enumerate(chunk)]
        return ProcessScores(totals, steps)

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        return self.score(prompts, completions, **columns).total
