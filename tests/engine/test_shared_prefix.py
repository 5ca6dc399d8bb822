"""CausalLMLogps with a shared prefix (one prompt forward per group, its KV cache gathered for
the group's rows) gives the log-probs and gradients of the plain forward."""

import torch

from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import tiny_llama


def _tiny_batch(default_tokenizer):
    """7 rows in prefix groups of 3, 1 and 3 (a padded completion position), their prompt
    length P, and fixed per-token weights for a scalar to backpropagate."""
    model = tiny_llama(vocab_size=len(default_tokenizer), hidden_size=64, tie=True,
                       pad_token_id=default_tokenizer.pad_token_id, seed=1)
    policy = CausalLMLogps(model, chunk_size=7)
    prompts = [encode_prompt(default_tokenizer, p) for p in ("What is 2 + 3?", "Hi", "Say a b c")]
    r = TorchBackend(policy, default_tokenizer).generate(
        prompts, SamplingParams(max_new_tokens=5, group_size=3),
        generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1, 2, 4, 6, 7, 8])  # groups of 3, 1 and 3 rows (some rows left out)
    ids, mask, pos = r.input_ids()[rows], r.attention_mask()[rows], r.position_ids()[rows]
    mask[:, -1] = False  # a padded completion position
    P = r.prompt_ids.shape[1]
    weights = torch.randn(len(rows), ids.shape[1] - P, generator=torch.Generator().manual_seed(1))
    return policy, (ids, mask, pos), P, rows // 3, weights * mask[:, P:]


def test_shared_prefix_equals_plain_forward(default_tokenizer):
    policy, (ids, mask, pos), P, groups, weights = _tiny_batch(default_tokenizer)

    def run(**kw):
        policy.zero_grad()
        out = policy(ids, mask, pos, start=P, **kw)  # (7, C)
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in policy.parameters()]

    plain, plain_grads = run()
    shared, shared_grads = run(shared_prefix=groups)
    keep = mask[:, P:]
    torch.testing.assert_close(shared[keep], plain[keep], atol=1e-5, rtol=0)
    for g, h in zip(plain_grads, shared_grads):
        torch.testing.assert_close(h, g, atol=1e-5, rtol=1e-4)


def test_interleaved_layers_equal_the_two_calls(default_tokenizer, monkeypatch):
    """The layer-by-layer shared-prefix forward runs the same operations on the same tensors as
    the prefix call followed by the rest's call: log-probs equal bit for bit, gradients up to
    the order in which backward sums the two uses of each weight."""
    from tether.engine import logprobs

    policy, (ids, mask, pos), P, groups, weights = _tiny_batch(default_tokenizer)

    def run():
        policy.zero_grad()
        out = policy(ids, mask, pos, start=P, shared_prefix=groups)  # (7, C)
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in policy.parameters()]

    assert logprobs._interleavable(policy.causal_lm().model)
    interleaved, interleaved_grads = run()
    monkeypatch.setattr(logprobs, "_interleavable", lambda base: False)
    two_calls, two_call_grads = run()
    assert torch.equal(interleaved, two_calls)
    for g, h in zip(two_call_grads, interleaved_grads):
        torch.testing.assert_close(h, g, atol=1e-6, rtol=1e-5)


def test_interleaved_layers_complete_the_last_layers_gradient_first(default_tokenizer,
                                                                     monkeypatch):
    """What interleaving is for: the last layer's weight gradient reaches `.grad` before the
    rest's first layer goes back (a step in backward can then free it early). With the prefix in
    a call of its own, it waits for the rest's backward through every layer."""
    from tether.engine import logprobs

    policy, (ids, mask, pos), P, groups, weights = _tiny_batch(default_tokenizer)
    layers = policy.causal_lm().model.layers
    events = []
    layers[-1].mlp.down_proj.weight.register_post_accumulate_grad_hook(
        lambda p: events.append("last layer's gradient"))

    def on_layer0_output(module, args, out):
        out.register_hook(lambda grad: events.append("layer 0 backward"))

    layers[0].register_forward_hook(on_layer0_output)

    def first_event():
        events.clear()
        policy.zero_grad()
        (policy(ids, mask, pos, start=P, shared_prefix=groups) * weights).sum().backward()
        assert sorted(events) == ["last layer's gradient", "layer 0 backward", "layer 0 backward"]
        return events[0]

    assert first_event() == "last layer's gradient"
    monkeypatch.setattr(logprobs, "_interleavable", lambda base: False)
    assert first_event() == "layer 0 backward"
