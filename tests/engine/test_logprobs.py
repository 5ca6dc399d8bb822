"""Chunked log-probs equal the naive full-logits computation, values and gradients."""

import pytest
import torch

from tether.engine import logprobs
from tether.engine.logprobs import (CausalLMLogps, chunked_token_logps, embed_tokens,
                                    naive_token_logps)
from tether.engine.models import tiny_llama


def _inputs(seed=0, n=37, h=16, v=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("vocab_block", [4096, 7])
@pytest.mark.parametrize("n, chunk_size, seed, weight_atol", [
    (37, 1, 1, 1e-5), (37, 5, 1, 1e-5), (37, 37, 1, 1e-5), (37, 1000, 1, 1e-5),
    (300, 200, 2, 1e-4), (300, 1000, 2, 1e-4)])
def test_chunked_equals_naive_values_and_grads_fp32(n, chunk_size, seed, weight_atol,
                                                    vocab_block, monkeypatch):
    """Values and both gradients equal the full-logits computation. Chunks of rows: chunk 200
    of 300 rows runs two row chunks (200 + 100) whose weight gradients add up. Blocks of the
    vocabulary: with blocks of 7 columns the 50-token vocabulary is 8 blocks (7 x 7 + 1), so the
    online log-sum-exp rescales its running sum 7 times, labels fall in every block, and the
    hidden-state gradient is a sum over blocks; with 4096 it is one block."""
    monkeypatch.setattr(logprobs, "_VOCAB_BLOCK", vocab_block)
    hidden, weight, labels = _inputs(n=n)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    got = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    want = naive_token_logps(hidden, weight, labels)
    wh, ww = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, wh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ww, atol=weight_atol, rtol=0)


def test_hand_worked_two_token_vocab():
    """hidden h = [1], W = [[0], [ln 3]]: logits (0, ln 3), softmax (1/4, 3/4).

    label 1: log p = log 3/4 = -0.287682; d logp / dh = (onehot - softmax) . W = (0 - 1/4)*0 +
    (1 - 3/4)*ln 3 = 0.274653; d logp / dW = (onehot - softmax)^T h = [[-1/4], [1/4]].
    """
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [torch.log(torch.tensor(3.0)).item()]], requires_grad=True)
    logp = chunked_token_logps(hidden, weight, torch.tensor([1]), chunk_size=1)
    logp.sum().backward()
    assert logp.item() == pytest.approx(-0.287682, abs=1e-6)
    assert hidden.grad.item() == pytest.approx(0.274653, abs=1e-6)
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.25], [0.25]]))


def test_batched_shape_and_bf16_autocast_close_to_fp32():
    hidden, weight, labels = _inputs(n=24)
    h3, l3 = hidden.reshape(4, 6, 16), labels.reshape(4, 6)
    full = chunked_token_logps(h3, weight, l3, chunk_size=7)
    assert full.shape == (4, 6) and full.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = chunked_token_logps(h3, weight, l3, chunk_size=7)
        low.sum().backward()
    assert low.dtype == torch.float32
    assert weight.grad.dtype == torch.float32  # master weights keep fp32 grads
    torch.testing.assert_close(low, full.detach(), atol=0.15, rtol=0.02)


def test_model_wrapper_matches_hf_logits():
    """CausalLMLogps(out)[:, t] = log_softmax(HF logits[:, t-1])[input_ids[:, t]]; out[:, 0] = 0."""
    model = tiny_llama(vocab_size=64, tie=True)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    wrapped = CausalLMLogps(model, chunk_size=4)
    got = wrapped(ids, mask)
    logits = model(input_ids=ids, attention_mask=mask.long()).logits
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.all(got[:, 0] == 0)
    torch.testing.assert_close(got[:, 1:][mask[:, 1:]], want[mask[:, 1:]], atol=1e-5, rtol=0)


def test_packed_bool_mask_is_honoured_by_eager_attention():
    """Two sequences packed in one row with a block-causal bool mask: the second one's log-probs
    must equal those it gets alone. Eager attention *adds* a 4-D mask to the scores, so a bool mask
    passed as is would let the second sequence attend to the first (different log-probs);
    CausalLMLogps converts it to the additive form for eager models."""
    from tether.data.collate import block_causal_mask

    torch.manual_seed(0)
    model = tiny_llama(vocab_size=64).eval()
    model.config._attn_implementation = "eager"
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 4))
    packed = torch.cat([a, b], dim=1)  # (1, 9)
    segments = torch.tensor([[1] * 5 + [2] * 4])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    wrapper = CausalLMLogps(model)
    with torch.no_grad():
        got = wrapper(packed, block_causal_mask(segments), positions)[0, 6:]  # b's targets
        alone = wrapper(b, torch.ones_like(b, dtype=torch.bool))[0, 1:]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_tied_embedding_gradient_added_in_place_equals_autograd():
    """embed_tokens adds the lookup's gradient into the tied weight's .grad by hand. Against
    autograd's own lookup (HF forward with input_ids) over two backward passes (accumulation):
    equal gradients for every parameter, and the padding_idx row (id 3, present in the input)
    receives only the lm_head's gradient (nn.Embedding gives padding_idx none)."""
    model = tiny_llama(vocab_size=20, hidden_size=16, tie=True, pad_token_id=3, seed=2)
    assert model.get_input_embeddings().padding_idx == 3
    ids = torch.tensor([[5, 3, 7, 7, 1, 3], [2, 9, 3, 4, 4, 8]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    policy = CausalLMLogps(model, chunk_size=4)

    def grads(use_hook: bool):
        model.zero_grad(set_to_none=True)
        for scale in (1.0, -0.5):  # two micro-batches accumulate into the same .grad
            if use_hook:
                out = policy(ids, mask)  # (2, 6)
            else:
                logits = model(input_ids=ids).logits
                out = torch.log_softmax(logits[:, :-1].float(), -1).gather(
                    -1, ids[:, 1:, None]).squeeze(-1)
            (scale * out.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    hooked, plain = grads(True), grads(False)
    assert hooked.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(hooked[name], plain[name], atol=1e-5, rtol=1e-4)
    x = embed_tokens(model, ids)  # the hooked path: a leaf, no (V, H) gradient in the graph
    assert x.shape == (2, 6, 16) and x.requires_grad and x.grad_fn is None
