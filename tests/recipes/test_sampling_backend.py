"""Every command that samples honours `generation.backend` (issue 32 part 5): prefs, cai's
sampler, DPO's held-out samples and compare's evaluations and best-of-n go through
`tether.engine.backends.make_backend`. With `backend: vllm` and the vLLM stand-in of
tests/engine/fake_vllm.py in place of vllm, each one's samples come from the stand-in."""

import pytest

from tests.engine.fake_vllm import FakeLLM
from tests.engine.test_vllm_backend import fake_vllm  # noqa: F401 - the stand-in fixture
from tests.recipes.test_prefs import tiny_params
from tether.config import CompareConfig, DPOConfig, GenerationConfig, PrefsConfig, load_config
from tether.engine.generate import SamplingParams, seeded
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm

VLLM = GenerationConfig(backend="vllm")


@pytest.fixture
def generate_calls(fake_vllm, monkeypatch):  # noqa: F811
    """The number of stand-in engine generate calls so far (a one-item list)."""
    calls, real = [0], FakeLLM.generate

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FakeLLM, "generate", counted)
    return calls


def test_prefs_samples_through_the_configured_backend(generate_calls, tiny_model_dir,
                                                      tmp_path):
    from tether.recipes import preference_set, prefs

    p = tiny_params(tiny_model_dir, tmp_path)
    out = prefs.run(PrefsConfig(prefs=p, precision="fp32", progress=False, generation=VLLM))
    assert generate_calls[0] >= 1 and len(FakeLLM.instances) == 1
    assert out["train"].is_file()
    # a set sampled by another engine has a cache key of its own; hf keeps the old key
    prompts = preference_set.load_prompts(p)
    assert out["train"].parent == preference_set.build_dir(p, prompts, tiny_model_dir, VLLM)
    assert preference_set.build_dir(p, prompts, tiny_model_dir, GenerationConfig()) == \
        preference_set.build_dir(p, prompts, tiny_model_dir)
    assert out["train"].parent != preference_set.build_dir(p, prompts, tiny_model_dir)


def test_cai_sampler_uses_the_configured_backend(generate_calls, tiny_model_dir):
    from tether.recipes.cai import Sampler

    sample = Sampler(str(tiny_model_dir), "fp32", VLLM)
    texts = sample([[{"role": "user", "content": "Say hi."}]] * 2,
                   SamplingParams(max_new_tokens=4, temperature=1.0), seeded(0, 0))
    assert len(texts) == 2 and generate_calls[0] == 1
    sample.close()
    assert sample.backend is None


def test_dpo_heldout_samples_through_the_configured_backend(generate_calls, tiny_model_dir,
                                                            default_tokenizer, monkeypatch):
    from tether.data.tasks import sentiment
    from tether.recipes import dpo

    monkeypatch.setattr(sentiment, "MAX_NEW_TOKENS", 4)
    cfg = load_config(DPOConfig, None, [f"--model.name_or_path={tiny_model_dir}",
                                        "--train.precision=fp32", "--generation.backend=vllm"])
    policy = CausalLMLogps(load_causal_lm(cfg.model))
    prompts = [p["prompt"] for p in sentiment.heldout_prompts(2)]
    metrics, _ = dpo.heldout_generations(cfg, policy, default_tokenizer, prompts, initial=True)
    assert generate_calls[0] == 1 and metrics["kl/k1"] == 0.0
    assert 1 <= metrics["completions/mean_length"] <= 4


def test_compare_passes_its_generation_section_on():
    """compare's evaluations and best-of-n sample with its `generation` (eval_config), and the
    runs it starts get the settings that differ from the default as overrides."""
    from tether.recipes import compare

    cfg = load_config(CompareConfig, None, ["--generation.backend=vllm",
                                            "--generation.vllm_enforce_eager=false",
                                            "--generation.vllm_kv_cache_gib=2"])
    assert compare.eval_config(cfg, "m", "rm", "out.json").generation == cfg.generation
    assert compare.generation_flags(cfg.generation) == [
        "--generation.backend=vllm", "--generation.vllm_kv_cache_gib=2.0",
        "--generation.vllm_enforce_eager=false"]
    assert compare.generation_flags(GenerationConfig()) == []
    for method in compare.plan(cfg, compare.Path("root"), "rm", ("a", "b")):
        assert "--generation.backend=vllm" in method.args, method.name
