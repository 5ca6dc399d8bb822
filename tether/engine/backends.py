"""The run's one generation backend, whichever engine samples; every recipe and evaluation that
samples builds it here:

    backend = make_backend(cfg.generation, policy, tokenizer, precision=tc.precision)
    rollout = backend.generate(prompt_ids, SamplingParams(...), generator=...)   # a `Rollout`
    ...optimizer step...
    backend.sync_weights()   # TorchBackend: a no-op; VLLMBackend: new weights into vLLM
    close_backend(backend)

`generation.backend: hf` is `TorchBackend` (tether/engine/generate.py: the policy samples
itself); that path imports nothing of vLLM. `generation.backend: vllm` is `VLLMBackend`
(tether/engine/vllm_backend.py, `generation.vllm_mode: colocate`) or `VLLMServerBackend`
(tether/engine/vllm_server.py, `vllm_mode: server`), both imported only then.
"""

from __future__ import annotations

from torch import nn

from tether.config import GenerationConfig
from tether.engine import dist
from tether.engine.generate import TorchBackend
from tether.errors import ConfigError

BACKENDS = ("hf", "vllm")
VLLM_MODES = ("colocate", "server")

_SHARED: dict = {}  # shared=True: one vLLM engine (a VLLMBackend) per model shape, per process


def check_generation(gen: GenerationConfig) -> None:
    """ConfigError naming the bad `generation` key."""
    if gen.backend not in BACKENDS:
        raise ConfigError(f"generation.backend must be one of {', '.join(BACKENDS)}, "
                          f"got '{gen.backend}'")
    if gen.vllm_mode not in VLLM_MODES:
        raise ConfigError(f"generation.vllm_mode must be one of {', '.join(VLLM_MODES)}, got "
                          f"'{gen.vllm_mode}' (docs/generation.md)")
    if gen.tis_cap <= 0:
        raise ConfigError(f"generation.tis_cap must be > 0, got {gen.tis_cap}")


def make_backend(gen: GenerationConfig, module: nn.Module, tokenizer, *, precision: str,
                 seed: int = 0, shared: bool = False):
    """The run's one generation backend: TorchBackend (hf), VLLMBackend (vllm, colocate) or
    VLLMServerBackend (vllm, server). The caller stops it with `close_backend` when done.

    shared=True (evaluations that load one checkpoint after another: `tether eval`, goodhart):
    a vLLM engine built earlier in this process for a model of the same config, dtype and
    settings is reused; it samples from `module`'s weights after the next push (no new engine,
    nothing read from disk). `close_shared()` stops those engines."""
    check_generation(gen)
    if gen.backend == "hf":
        return TorchBackend(module, tokenizer, precision=precision)
    from tether.engine.vllm_backend import VLLMBackend, engine_key, import_vllm

    import_vllm()
    if dist.world_size() > 1:
        raise ConfigError("generation.backend: vllm runs on one process so far (each rank would "
                          "need its own engine or a tensor-parallel group); use backend: hf "
                          "under torchrun")
    if gen.vllm_mode == "server":
        from tether.engine.vllm_server import VLLMServerBackend as cls
    else:
        cls = VLLMBackend
    if not shared:
        return cls(module, tokenizer, gen=gen, precision=precision, seed=seed)
    key = engine_key(module, tokenizer, gen, precision, seed)
    backend = _SHARED.get(key)
    if backend is None:
        backend = _SHARED[key] = cls(module, tokenizer, gen=gen, precision=precision, seed=seed)
    backend.sample_from(module, tokenizer)
    return backend


def close_backend(backend) -> None:
    """Stop what a backend holds (a vLLM engine, a server process); TorchBackend holds none."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def close_shared() -> None:
    """Stop the engines `make_backend(..., shared=True)` kept (the end of an evaluation)."""
    while _SHARED:
        _SHARED.popitem()[1].close()
