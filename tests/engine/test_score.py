"""No-grad scoring of a rollout: log-probs and entropy against a brute-force full-vocabulary
forward, CausalLMLogps(start=P) equals the full forward's tail, value alignment, rewards."""

import pytest
import torch
from torch.testing import assert_close

from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import tiny_llama
from tether.engine.score import (TokenValues, completion_logps, completion_values,
                                 policy_logps_and_entropy, sequence_rewards)


@pytest.fixture(scope="module")
def rollout_and_policy(default_tokenizer):
    tok = default_tokenizer
    model = tiny_llama(vocab_size=len(tok), hidden_size=32, tie=True,
                       pad_token_id=tok.pad_token_id, seed=4)
    policy = CausalLMLogps(model, chunk_size=7)  # chunks that do not divide the rows
    prompts = [encode_prompt(tok, p) for p in ("What is 2 + 3?", "Hi", "Tell me a story")]
    rollout = TorchBackend(policy, tok).generate(
        prompts, SamplingParams(max_new_tokens=6, group_size=2),
        generator=torch.Generator().manual_seed(0))
    return rollout, policy


def test_logps_and_entropy_equal_brute_force(rollout_and_policy):
    rollout, policy = rollout_and_policy
    logps, entropy = policy_logps_and_entropy(policy, rollout, micro_batch_size=4)
    with torch.no_grad():
        logits = policy.model(input_ids=rollout.input_ids(),
                              attention_mask=rollout.attention_mask().long(),
                              position_ids=rollout.position_ids()).logits.float()
    P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    logp_all = logits[:, P - 1:P + C - 1].log_softmax(-1)  # (B, C, V): predicts completion j
    mask = rollout.completion_mask
    want = logp_all.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros(())
    assert_close(logps, torch.where(mask, want, zero), atol=1e-5, rtol=1e-5)
    assert_close(entropy, torch.where(mask, want_entropy, zero), atol=1e-4, rtol=1e-5)
    assert (entropy[~mask] == 0).all() and (logps[~mask] == 0).all()
    # the sampler's own log-probs (temperature 1) are those of the same distribution
    assert_close(logps, rollout.logps, atol=1e-5, rtol=1e-5)
    # the reference path (CausalLMLogps with start=P) gives the same numbers exactly
    assert torch.equal(completion_logps(policy, rollout, micro_batch_size=4), logps)


def test_start_equals_tail_of_full_forward(rollout_and_policy):
    rollout, policy = rollout_and_policy
    ids, mask, pos = rollout.input_ids(), rollout.attention_mask(), rollout.position_ids()
    with torch.no_grad():
        full = policy(ids, mask, pos)
        for start in (1, 5, ids.shape[1] - 1):
            # equal up to rounding: the lm_head chunks hold different rows
            assert_close(policy(ids, mask, pos, start=start), full[:, start:], atol=1e-6, rtol=0)


def test_values_are_aligned_with_the_state_before_each_token(rollout_and_policy, default_tokenizer):
    """completion_values column t = the critic's head at the token before completion token t."""
    from transformers import LlamaConfig, LlamaForTokenClassification

    rollout, _ = rollout_and_policy
    config = LlamaConfig(vocab_size=len(default_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, classifier_dropout=0.0)
    torch.manual_seed(0)
    critic = TokenValues(LlamaForTokenClassification(config))
    values = completion_values(critic, rollout, micro_batch_size=3)
    with torch.no_grad():
        heads = critic.model(input_ids=rollout.input_ids(),
                             attention_mask=rollout.attention_mask().long(),
                             position_ids=rollout.position_ids()).logits[..., 0]
    P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    want = torch.where(rollout.completion_mask, heads[:, P - 1:P + C - 1], torch.zeros(()))
    assert_close(values, want, atol=1e-5, rtol=1e-5)


def test_sequence_rewards_keep_components():
    from tether.rewards import WeightedSum

    fn = WeightedSum([("len", lambda p, c, **k: [len(x) for x in c], 0.5),
                      ("one", lambda p, c, **k: [1.0] * len(c), 2.0)])
    total, parts = sequence_rewards(fn, ["a", "b"], ["xx", "xxxx"], {})
    assert total.tolist() == [3.0, 4.0]  # 0.5 * 2 + 2, 0.5 * 4 + 2
    assert parts == {"len": [2.0, 4.0], "one": [1.0, 1.0]}
    total, parts = sequence_rewards(lambda p, c, **k: [7] * len(c), ["a"], ["b"], {})
    assert total.tolist() == [7.0] and parts == {"reward": [7.0]}
