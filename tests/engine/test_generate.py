"""The rollout engine: KV-cache sampling equals full forwards, greedy equals transformers'
generate, filtering, EOS / stop / truncation masks, seeded reproducibility, shared prompt cache."""

import math

import pytest
import torch

from tether.engine.generate import (Rollout, SamplingParams, TorchBackend, encode_prompt,
                                    filter_logits, greedy_complete)
from tether.engine.models import tiny_llama

PROMPTS = ["What is 2 + 3?", "Hello there, how are you doing today my friend?", "Hi"]


@pytest.fixture(scope="module")
def model(default_tokenizer):
    m = tiny_llama(vocab_size=len(default_tokenizer), hidden_size=64, layers=2, tie=True,
                   pad_token_id=default_tokenizer.pad_token_id, seed=3)
    return m.eval()


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer):
    ids = [encode_prompt(default_tokenizer, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == 3  # different lengths: left padding is exercised
    return ids


def full_forward_logps(model, rollout: Rollout, temperature: float = 1.0):
    """(B, C) log-probs of the completion tokens and (B, C) entropies, from one fresh forward of
    prompt + completion."""
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids(),
                       attention_mask=rollout.attention_mask().long(),
                       position_ids=rollout.position_ids()).logits.float()
    P, C = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    pred = (logits[:, P - 1:P + C - 1] / temperature).log_softmax(-1)  # predicts completion j
    entropy = -(pred.exp() * pred).sum(-1)
    return pred.gather(-1, rollout.completion_ids[..., None]).squeeze(-1), entropy


def test_greedy_equals_transformers_generate(model, default_tokenizer, prompt_ids):
    tok = default_tokenizer
    backend = TorchBackend(model, tok)
    ours = backend.generate(prompt_ids, SamplingParams(max_new_tokens=12, temperature=0.0))
    ids = ours.prompt_ids
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=ours.prompt_mask.long(), do_sample=False,
                            max_new_tokens=12, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, temperature=None, top_p=None,
                            top_k=None)[:, ids.shape[1]:]
    assert torch.equal(ours.completion_ids, hf)
    # top_k=1 at temperature 1 is greedy too, whatever the generator
    topk1 = backend.generate(prompt_ids, SamplingParams(max_new_tokens=12, top_k=1),
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(topk1.completion_ids, hf)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logps_equal_full_forward(model, default_tokenizer, prompt_ids, temperature):
    """The cache path (prefill once, repeat per group, left padding, one token per step) gives
    the same distribution as one forward over prompt + completion with the rollout's masks."""
    backend = TorchBackend(model, default_tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, group_size=3)
    r = backend.generate(prompt_ids, params, generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape == (9, 10) and r.completion_mask.all()
    want, entropy = full_forward_logps(model, r, temperature)
    torch.testing.assert_close(r.logps, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.entropy, entropy, atol=1e-4, rtol=0)


def test_logps_equal_full_forward_when_rows_finish_early(model, default_tokenizer, prompt_ids):
    """Finished rows leave the cache's batch; the rows that go on still see their own cache."""
    params = SamplingParams(max_new_tokens=10, top_k=3, group_size=3)
    sample = lambda: TorchBackend(model, default_tokenizer).generate(  # noqa: E731
        prompt_ids, params, generator=torch.Generator().manual_seed(0))
    free = sample()
    eos = free.completion_ids[0, 1].item()
    model.generation_config.eos_token_id = [default_tokenizer.eos_token_id, eos]
    try:
        r = sample()
    finally:
        model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    lengths = r.completion_lengths()
    assert lengths.min() < 10 and lengths.max() == 10  # rows ended at different steps
    want, _ = full_forward_logps(model, r)
    m = r.completion_mask
    torch.testing.assert_close(r.logps[m], want[m], atol=1e-5, rtol=0)
    assert (r.logps[~m] == 0).all()


def test_top_k_one_is_deterministic(model, default_tokenizer, prompt_ids):
    backend = TorchBackend(model, default_tokenizer)
    params = SamplingParams(max_new_tokens=8, top_k=1, group_size=2)
    a = backend.generate(prompt_ids, params, generator=torch.Generator().manual_seed(1))
    b = backend.generate(prompt_ids, params, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0::2], a.completion_ids[1::2])  # a group agrees


def test_filter_logits_hand_worked():
    """probs (0.5, 0.3, 0.15, 0.05) in shuffled order, logits = log probs.

    top_p = 0.7: sorted probs 0.5, 0.3, 0.15, 0.05; probability before each: 0, 0.5, 0.8, 0.95;
    kept where before < 0.7 -> {0.5, 0.3} (0.8 >= 0.7 reached with two tokens).
    top_p = 0.4: before 0 < 0.4 keeps 0.5 only. top_p = 0.9: keeps 0.5, 0.3, 0.15 (before 0.8).
    top_k = 3: drops the 0.05 entry; then top_p = 0.7 over the renormalised (0.5, 0.3, 0.15) / 0.95
    = (0.526, 0.316, 0.158): before 0, 0.526, 0.842 -> keeps 0.5 and 0.3.
    """
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None]  # (1, 4)
    kept = lambda out: (out[0] > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.9)) == [True, True, False, True]
    assert kept(filter_logits(logits, top_k=3)) == [True, True, False, True]
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=1)) == [False, True, False, False]
    assert torch.equal(filter_logits(logits), logits)  # off
    # kept entries keep their value
    out = filter_logits(logits, top_p=0.7)
    assert out[0, 1] == logits[0, 1] and out[0, 3] == logits[0, 3]


def test_top_p_sampling_only_draws_kept_tokens():
    """With top_p = 0.7 on (0.5, 0.3, 0.15, 0.05) only the two kept tokens are ever drawn, in
    ratio 0.5 : 0.3 (renormalised 0.625 : 0.375)."""
    from tether.engine.generate import sample_tokens

    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()[None].expand(4000, 4)
    tokens, logps, _ = sample_tokens(logits, SamplingParams(top_p=0.7),
                                  torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3}
    assert abs((tokens == 1).float().mean().item() - 0.625) < 0.03
    # log-probs are those of the unfiltered distribution
    assert torch.allclose(logps[tokens == 1], torch.tensor(math.log(0.5)))


def test_eos_ends_row_and_masks_the_rest(model, default_tokenizer, prompt_ids):
    backend = TorchBackend(model, default_tokenizer)
    params = SamplingParams(max_new_tokens=8, top_k=4)
    sample = lambda b: b.generate(prompt_ids, params,  # noqa: E731
                                  generator=torch.Generator().manual_seed(0))
    free = sample(backend)
    eos = free.completion_ids[0, 2].item()  # the token row 0 samples third becomes an EOS
    first = free.completion_ids[0].tolist().index(eos)
    model.generation_config.eos_token_id = [default_tokenizer.eos_token_id, eos]
    try:
        r = sample(TorchBackend(model, default_tokenizer))
    finally:
        model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    width = r.completion_ids.shape[1]
    assert r.completion_mask[0].tolist() == [True] * (first + 1) + [False] * (width - first - 1)
    assert r.completion_ids[0, :first + 1].equal(free.completion_ids[0, :first + 1])
    assert not r.truncated[0]
    assert (r.completion_ids[0, first + 1:] == default_tokenizer.pad_token_id).all()
    assert (r.logps[0, first + 1:] == 0).all()
    for row in range(3):  # every row: the mask ends at its first EOS, or it is truncated
        ids = r.completion_ids[row][r.completion_mask[row]].tolist()
        if eos in ids:
            assert ids.index(eos) == len(ids) - 1 and not r.truncated[row]
        else:
            assert len(ids) == 8 and r.truncated[row]


def test_truncated_flag(model, default_tokenizer, prompt_ids):
    r = TorchBackend(model, default_tokenizer).generate(
        prompt_ids, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert r.completion_ids.shape == (3, 5)
    assert r.truncated.all() and r.completion_mask.all()  # a random model emits no EOS in 5 tokens
    assert r.completion_lengths().tolist() == [5, 5, 5]


def test_stop_string_cuts_completion(model, default_tokenizer, prompt_ids):
    tok = default_tokenizer
    backend = TorchBackend(model, tok)
    sample = lambda stop: backend.generate(  # noqa: E731
        prompt_ids[:1], SamplingParams(max_new_tokens=12, top_k=8, stop=stop),
        generator=torch.Generator().manual_seed(4))
    free = sample(())
    ids = free.completion_ids[0].tolist()
    # the first step k >= 3 whose token's text does not occur in the text before it
    k = next(k for k in range(3, 12) if tok.decode(ids[k:k + 1]).strip()
             and tok.decode(ids[k:k + 1]) not in tok.decode(ids[:k]))
    stop = tok.decode(ids[k:k + 1])
    r = sample((stop, "never-appears-xyz"))
    assert r.completion_mask[0].sum().item() == k + 1
    assert r.completion_ids.shape[1] == k + 1  # the only row ended: no further forwards
    assert r.completion_ids[0].tolist() == ids[:k + 1]
    assert not r.truncated[0]
    full_text = tok.decode(ids[:k + 1], skip_special_tokens=True)
    assert r.texts[0] == full_text[:full_text.index(stop) + len(stop)]
    assert r.texts[0].endswith(stop)


def test_seeded_generator_reproducible(model, default_tokenizer, prompt_ids):
    backend = TorchBackend(model, default_tokenizer)
    params = SamplingParams(max_new_tokens=6, group_size=2, top_p=0.95)
    run = lambda seed: backend.generate(prompt_ids, params,  # noqa: E731
                                        generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logps, b.logps)
    assert a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_group_rows_share_one_prefilled_prompt(model, default_tokenizer, prompt_ids):
    """Rows i*G .. i*G + G-1 continue prompt i; the prompts are encoded once (the first forward
    holds the 3 unique prompts), then every forward is one new token for each of the 12 rows."""
    shapes = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        r = TorchBackend(model, default_tokenizer).generate(
            prompt_ids, SamplingParams(max_new_tokens=4, group_size=4),
            generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    P = max(len(p) for p in prompt_ids)
    assert shapes == [(3, P), (12, 1), (12, 1), (12, 1)]
    assert r.num_prompts == 3 and r.group_size == 4
    for i, ids in enumerate(prompt_ids):
        for row in range(4 * i, 4 * i + 4):
            assert r.prompt_ids[row][r.prompt_mask[row]].tolist() == ids
    assert len({tuple(x) for x in r.completion_ids[:4].tolist()}) > 1  # samples differ


def test_rollout_helpers(model, default_tokenizer, prompt_ids):
    r = TorchBackend(model, default_tokenizer).generate(
        prompt_ids[:2], SamplingParams(max_new_tokens=3, group_size=2),
        generator=torch.Generator().manual_seed(0))
    P = r.prompt_ids.shape[1]
    pos = r.position_ids()
    n_real = len(prompt_ids[1])
    assert pos[2, P - n_real:].tolist() == list(range(n_real + 3))
    assert r.loss_mask()[:, P:].equal(r.completion_mask) and not r.loss_mask()[:, :P].any()
    kept = r.select([2, 3])
    assert kept.texts == r.texts[2:] and kept.completion_ids.equal(r.completion_ids[2:])
    assert kept.num_prompts == 1


def test_greedy_complete_cuts_at_eos(model, default_tokenizer):
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    texts = greedy_complete(model, default_tokenizer, messages, max_new_tokens=6, batch_size=2)
    ids = [encode_prompt(default_tokenizer, m) for m in messages]
    direct = TorchBackend(model, default_tokenizer).generate(
        ids, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert texts == direct.texts


def test_bad_params_are_errors(model, default_tokenizer, prompt_ids):
    backend = TorchBackend(model, default_tokenizer)
    for bad in (SamplingParams(max_new_tokens=0), SamplingParams(top_p=0.0),
                SamplingParams(temperature=-1.0), SamplingParams(stop=("",))):
        with pytest.raises(ValueError):
            backend.generate(prompt_ids, bad)
