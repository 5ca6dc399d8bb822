"""Scores from a trained reward model directory (`tether rm` writes RUN_DIR/reward_model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tether.errors import ConfigError


class RewardModelScorer:
    """r(prompt, completion) from an AutoModelForSequenceClassification directory, batched,
    without gradients. Prompt and completion are tokenised separately and joined exactly as in
    `tether rm` training (standard rows: prompt + completion + EOS; conversational prompts: the
    completion becomes the assistant reply under the chat template)."""

    def __init__(self, path: str | Path, *, batch_size: int = 16, max_length: int = 1024,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"reward model: {path} is not a model directory (no config.json); "
                              "give the reward_model directory a `tether rm` run wrote")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True)
        if self.model.config.num_labels != 1:
            raise ConfigError(f"reward model: {path} has {self.model.config.num_labels} labels; "
                              "a reward model has one")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.pad_id = self.tokenizer.pad_token_id

    def encode(self, prompt, completion: str):
        from tether.data.preference import join, preference_texts
        from tether.data.formats import text_ids

        where = {"source": "reward model input"}
        if isinstance(prompt, list):
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}]}
        else:
            row = {"prompt": prompt, "completion": completion}
        prompt_text, texts = preference_texts(row, self.tokenizer, where)
        prompt_ids = text_ids(self.tokenizer, prompt_text) if prompt_text else []
        return join(prompt_ids, text_ids(self.tokenizer, texts["completion"]),
                    max_length=self.max_length, truncation=True, where=where, field="completion")

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        from tether.data.collate import pad_collate

        examples = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for i in range(0, len(examples), self.batch_size):
            batch = pad_collate(examples[i:i + self.batch_size], self.pad_id)
            out = self.model(input_ids=batch.input_ids.to(self.device),
                             attention_mask=batch.attention_mask.to(self.device), use_cache=False)
            scores += out.logits[:, 0].float().cpu().tolist()
        return scores
