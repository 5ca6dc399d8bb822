"""`load_reference`: the one choice of reference model that DPO, GRPO and PPO share."""

from dataclasses import replace

import pytest
import torch

from tether.config import LoraConfig, ModelConfig
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm
from tether.engine.reference import load_reference


def _logps(model, ids):
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, mask, pos)


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def test_choices(tiny_model_dir):
    """The table: (LoRA, needed, ref_model) -> kind, and whether a copy is held."""
    full = ModelConfig(name_or_path=str(tiny_model_dir))
    lora = replace(full, lora=LoraConfig(r=4))
    policy = CausalLMLogps(load_causal_lm(full))
    cases = [  # (model config, needed, ref_model, resident) -> (kind, copy held, initial)
        ((full, False, None, True), ("none", False, False)),
        ((full, True, None, True), ("copy", True, True)),
        ((full, True, None, False), ("copy", False, True)),
        ((full, True, str(tiny_model_dir), True), ("copy", True, False)),
        ((lora, False, None, True), ("adapter", False, False)),  # free: always available
        ((lora, True, None, True), ("adapter", False, False)),
        ((lora, True, str(tiny_model_dir), True), ("copy", True, False)),
    ]
    for (cfg, needed, ref_model, resident), (kind, held, initial) in cases:
        ref = load_reference(cfg, policy, needed=needed, ref_model=ref_model, resident=resident,
                             chunk_size=64)
        assert (ref.kind, ref.model is not None, ref.initial) == (kind, held, initial), cfg
        if held:
            assert not any(p.requires_grad for p in ref.model.parameters())
            assert ref.model.chunk_size == 64 and not ref.model.training
        if kind != "none":
            assert ref.source.lora.r == 0  # the reference never carries an adapter


def test_use(tiny_model_dir, ids):
    """Every kind scores with the initial weights: the policy itself while unchanged, a copy
    loaded (then freed) once it has trained, the LoRA policy with its adapter disabled; none
    refuses."""
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    policy = CausalLMLogps(load_causal_lm(cfg))
    want = _logps(policy, ids)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)  # the policy trains
    ref = load_reference(cfg, policy, needed=True, resident=False, chunk_size=64)
    with ref.use(policy_unchanged=True) as model:
        assert model is policy
    with ref.use() as model:
        assert model is not policy
        torch.testing.assert_close(_logps(model, ids), want, rtol=0, atol=0)
    assert ref.apply(lambda m: _logps(m, ids)).equal(want)

    lora = CausalLMLogps(load_causal_lm(replace(cfg, lora=LoraConfig(r=4))))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)  # a trained adapter
    assert not _logps(lora, ids).allclose(want)
    adapter = load_reference(replace(cfg, lora=LoraConfig(r=4)), lora, needed=True,
                             chunk_size=64)
    with adapter.use() as model:
        assert model is lora
        torch.testing.assert_close(_logps(model, ids), want)
    assert not _logps(lora, ids).allclose(want)  # enabled again after the block

    with pytest.raises(RuntimeError, match="no reference"):
        with load_reference(cfg, policy, needed=False, chunk_size=64).use():
            pass
