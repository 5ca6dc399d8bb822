"""`generation.backend: vllm` against the real vLLM (skipped where vLLM is not installed: it is
the optional extra `tether[vllm]`, never part of `make test`; `make vllm` installs the CPU build in
its own venv and runs this file). A tiny random Llama with the default tokenizer; the engine is
built weightless and receives the policy's weights, then the updated weights after a change."""

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm")

from tether.config import GenerationConfig, GRPOConfig, load_config  # noqa: E402
from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt  # noqa: E402
from tether.engine.logprobs import CausalLMLogps  # noqa: E402
from tether.engine.models import tiny_llama  # noqa: E402
from tether.engine.score import completion_logps  # noqa: E402
from tether.engine.backends import make_backend  # noqa: E402

# on CPU vLLM counts this whole process (pytest, the policy) against its memory share: an
# explicit KV cache size instead
GEN = GenerationConfig(backend="vllm", vllm_gpu_memory_utilization=0.15, vllm_max_model_len=512,
                       vllm_kv_cache_gib=0.25)


def tiny(tokenizer):
    """head_dim 64: vLLM's CPU attention has no kernel for the smaller heads of the other tests'
    tiny models (head_dim 16: 'Unsupported CPU attention configuration'). Tied embeddings scaled
    up 30x: a peaked next-token distribution (a random init is nearly uniform, where greedy
    picks depend on rounding)."""
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=128, layers=2, heads=2, kv_heads=1,
                       intermediate=256, tie=True, pad_token_id=tokenizer.pad_token_id, seed=3)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def model(default_tokenizer):
    return tiny(default_tokenizer).eval()


@pytest.fixture(params=["colocate", "server"])
def backend(request, model, default_tokenizer):
    """The engine in this process, or in a child process that tether starts and stops."""
    gen = replace(GEN, vllm_mode=request.param)
    backend = make_backend(gen, model, default_tokenizer, precision="fp32", seed=0)
    yield backend
    backend.close()


def test_vllm_samples_the_policy_then_its_update(backend, model, default_tokenizer):
    """fp32 engine: greedy tokens equal the policy's own greedy tokens and vLLM's log-probs equal
    a teacher-forced forward of the policy to 1e-4. Then the final norm's weight is zeroed (every
    logit 0: greedy picks id 0 with log-prob -ln V = -ln 49152 = -10.8027). The engine still
    samples the old weights until `sync_weights`, and exactly that after it."""
    ids = [encode_prompt(default_tokenizer, p) for p in ("What is 2 + 3?", "Hi")]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    first = backend.generate(ids, greedy)
    own = TorchBackend(model, default_tokenizer).generate(ids, greedy)
    assert first.completion_ids.tolist() == own.completion_ids.tolist()
    teacher = completion_logps(CausalLMLogps(model), first, micro_batch_size=4)
    mask = first.completion_mask
    assert (first.logps - teacher)[mask].abs().max() < 1e-4

    saved = model.model.norm.weight.detach().clone()
    try:
        with torch.no_grad():
            model.model.norm.weight.zero_()
        stale = backend.generate(ids, greedy)
        assert stale.completion_ids.tolist() == first.completion_ids.tolist()
        backend.sync_weights()
        after = backend.generate(ids, greedy)
        assert after.completion_ids.tolist() == [[0] * 6, [0] * 6]
        torch.testing.assert_close(after.logps, torch.full((2, 6), -math.log(49152)))
    finally:
        with torch.no_grad():
            model.model.norm.weight.copy_(saved)
        backend.sync_weights()


def test_vllm_groups_and_seeds(backend, default_tokenizer):
    ids = [encode_prompt(default_tokenizer, p) for p in ("What is 2 + 3?", "Hi")]
    params = SamplingParams(max_new_tokens=8, group_size=3)
    a = backend.generate(ids, params, generator=torch.Generator().manual_seed(1))
    b = backend.generate(ids, params, generator=torch.Generator().manual_seed(1))
    assert a.completion_ids.tolist() == b.completion_ids.tolist()
    assert a.prompt_ids.shape[0] == 6 and len(a.texts) == 6
    assert (a.logps[a.completion_mask] <= 0).all() and (a.logps[~a.completion_mask] == 0).all()
    assert not (a.truncated & (a.completion_lengths() != 8)).any()  # truncated: all 8 tokens


def test_grpo_through_vllm(default_tokenizer, tmp_path):
    """Two GRPO steps (LoRA, TIS on) sample through the engine and log generation/logp_diff."""
    from tether.recipes import grpo

    tiny(default_tokenizer).save_pretrained(tmp_path / "model")
    default_tokenizer.save_pretrained(tmp_path / "model")
    cfg = load_config(GRPOConfig, None, [
        f"--model.name_or_path={tmp_path / 'model'}", f"--run.output_dir={tmp_path / 'run'}",
        "--model.lora.r=4", "--train.max_steps=2", "--train.precision=fp32",
        "--grpo.group_size=4", "--grpo.prompts_per_step=2", "--grpo.max_new_tokens=6",
        "--grpo.task_size=16", "--run.eval_generations=2", "--grpo.rewards=[format]",
        "--run.progress=false", "--run.tensorboard=false", "--run.report=false",
        "--generation.backend=vllm", "--generation.tis=true",
        "--generation.vllm_gpu_memory_utilization=0.08", "--generation.vllm_max_model_len=512"])
    out = grpo.run(cfg)
    assert all(0 <= h["generation/logp_diff"] < 1e-3 for h in out["history"])
