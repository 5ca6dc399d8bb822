"""Lean decoder layers: the same forward as transformers' Llama, the same gradients."""

import copy
import math

import pytest
import torch

from tether.config import LoraConfig
from tether.engine.lean import _cast_weights, attention, rms_norm, swiglu_mlp, use_lean_layers
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import apply_lora, tiny_llama


def test_rms_norm_hand_worked():
    """x = (3, 4), w = (1, 2), eps = 0: mean(x^2) = 12.5, xhat = x / sqrt(12.5) = (0.8485, 1.1314),
    y = w * xhat = (0.8485, 2.2627). For L = y_0 = sqrt(2) x_0 / |x| (|x| = 5):
    dL/dx_0 = sqrt(2) (|x|^2 - x_0^2) / |x|^3 = sqrt(2) 16 / 125,
    dL/dx_1 = -sqrt(2) x_0 x_1 / |x|^3 = -sqrt(2) 12 / 125,
    dL/dw = (xhat_0, 0) = (3 / sqrt(12.5), 0)."""
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = rms_norm(x, w, 0.0)
    torch.testing.assert_close(y, torch.tensor([[3.0, 8.0]]) / math.sqrt(12.5))
    y[0, 0].backward()
    torch.testing.assert_close(x.grad, math.sqrt(2) * torch.tensor([[16.0, -12.0]]) / 125)
    torch.testing.assert_close(w.grad, torch.tensor([3 / math.sqrt(12.5), 0.0]))


def test_swiglu_hand_worked():
    """H = I = 1, x = 1, W_gate = 2, W_up = 3, W_down = 0.5: a = 2, u = 3,
    silu(2) = 2 s with s = sigmoid(2) = 0.880797, h = 3 silu(2) = 5.284782, out = h / 2.
    dout/dW_down = h; gh = 0.5; du = gh silu(a); da = gh u silu'(a), silu'(a) = s (1 + a (1 - s));
    dout/dx = 2 da + 3 du; dout/dW_gate = da x; dout/dW_up = du x."""
    x, wg, wu, wd = (torch.tensor([[v]], requires_grad=True) for v in (1.0, 2.0, 3.0, 0.5))
    out = swiglu_mlp(x, wg, wu, wd)
    s = 1 / (1 + math.exp(-2))
    silu, dsilu = 2 * s, s * (1 + 2 * (1 - s))
    torch.testing.assert_close(out, torch.tensor([[3 * silu * 0.5]]))
    out.sum().backward()
    du, da = 0.5 * silu, 0.5 * 3 * dsilu
    for got, want in ((wd.grad, 3 * silu), (x.grad, 2 * da + 3 * du), (wg.grad, da),
                      (wu.grad, du)):
        torch.testing.assert_close(got, torch.tensor([[want]]))


def test_weight_casts_reuse_one_buffer_per_shape():
    """Two (2, 3) weights cast to bf16 land in the same buffer, the second overwriting the first
    (each cast feeds one matmul before the next is made); a (3, 2) weight gets its own. Values are
    those of .to(); a weight already in the dtype is returned itself; the stacked cast of a (2, 3)
    and a (1, 3) weight is their (3, 3) concatenation, again in one reused buffer."""
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 2)
    first = _cast_weights(torch.bfloat16, a)
    assert torch.equal(first, a.to(torch.bfloat16))
    second = _cast_weights(torch.bfloat16, b)
    assert second.data_ptr() == first.data_ptr() and torch.equal(first, b.to(torch.bfloat16))
    assert _cast_weights(torch.bfloat16, c).data_ptr() != first.data_ptr()
    assert _cast_weights(torch.float32, a) is a
    d = torch.randn(1, 3)
    stacked = _cast_weights(torch.bfloat16, a, d)
    assert torch.equal(stacked, torch.cat([a, d]).to(torch.bfloat16))
    assert _cast_weights(torch.bfloat16, b, d).data_ptr() == stacked.data_ptr()


def test_attention_hand_worked():
    """One query q = 1 over keys k = (0, ln 3, 5) with the third masked, values v = (2, 6, 100),
    scale 1, d = 1: S = (0, ln 3), P = (1/4, 3/4), O = 2/4 + 18/4 = 5. For L = O:
    dv = P = (1/4, 3/4, 0); dP = v = (2, 6); dS = P * (dP - O) = (-3/4, 3/4);
    dq = dS . k = (3/4) ln 3; dk = dS q = (-3/4, 3/4, 0)."""
    q = torch.tensor([1.0]).view(1, 1, 1, 1).requires_grad_()
    k = torch.tensor([0.0, math.log(3), 5.0]).view(1, 1, 3, 1).requires_grad_()
    v = torch.tensor([2.0, 6.0, 100.0]).view(1, 1, 3, 1).requires_grad_()
    mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    out = attention(q, k, v, mask, 1.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([5.0]))
    out.sum().backward()
    torch.testing.assert_close(v.grad.flatten(), torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(q.grad.flatten(), torch.tensor([0.75 * math.log(3)]))
    torch.testing.assert_close(k.grad.flatten(), torch.tensor([-0.75, 0.75, 0.0]))


@pytest.mark.parametrize("bf16", [False, True])
def test_attention_matches_sdpa_with_grouped_heads(bf16):
    """6 query heads over 2 key/value heads (q head h reads kv head h // 3), a mask shared by
    the batch with a query row that sees no key and a padded key: the forward is SDPA's,
    bit for bit; the gradients are autograd's through SDPA to 1e-5 in fp32, and in bf16 within
    the flash kernel's own error against fp32 (plus 10%)."""
    torch.manual_seed(0)
    B, T, S, d = 2, 5, 7, 8
    q32, k32, v32 = torch.randn(B, 6, T, d), torch.randn(B, 2, S, d), torch.randn(B, 2, S, d)
    mask = torch.ones(1, 1, T, S, dtype=torch.bool).tril(S - T)
    mask[..., 0, :] = False  # a query that sees nothing: output and gradients 0
    mask[..., 3] = False
    grad_out = torch.randn(B, 6, T, d)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return out, [t.grad.float() for t in leaves]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                enable_gqa=True, scale=0.3)

    def lean(q, k, v):
        return attention(q, k, v, mask, 0.3)

    dtype = torch.bfloat16 if bf16 else torch.float32
    want_out, want = run(sdpa, dtype)
    got_out, got = run(lean, dtype)
    assert torch.equal(got_out, want_out)
    assert not any(g.isnan().any() for g in got)
    exact = run(sdpa, torch.float32)[1]
    for g, w, e in zip(got, want, exact):
        if bf16:
            assert (g - e).norm() <= 1.1 * (w - e).norm() + 1e-6
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _batch(vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 13), generator=g)
    mask = torch.ones(4, 13, dtype=torch.bool)
    mask[1, :4] = False  # left padding in one row
    return ids, mask


def _grads_and_logps(model, ids, mask, *, bf16, shared_prefix=None):
    policy = CausalLMLogps(model, chunk_size=16)
    policy.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if shared_prefix is None:
            logps = policy(ids, mask)
        else:
            logps = policy(ids, mask, start=5, shared_prefix=shared_prefix)
    weights = torch.linspace(-1, 1, logps.numel()).reshape(logps.shape)
    (logps * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_lean_model_matches_transformers(bf16, shared):
    """A 2-layer Llama with grouped-query attention and a padded row: the lean layers give
    bit-identical log-probs and gradients equal to rounding (fp32: 1e-5 relative; bf16, where
    both round every matmul to 8 bits of mantissa: 2%), with and without a shared prompt."""
    plain = tiny_llama(61, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                       tie=True, seed=3)
    lean = copy.deepcopy(plain)
    assert use_lean_layers(lean) == 2
    ids, mask = _batch()
    prefix = torch.tensor([0, 1, 0, 1]) if shared else None
    if shared:
        ids[2, :5], ids[3, :5], mask[3, :5] = ids[0, :5], ids[1, :5], mask[1, :5]
    want, want_grads = _grads_and_logps(plain, ids, mask, bf16=bf16, shared_prefix=prefix)
    got, got_grads = _grads_and_logps(lean, ids, mask, bf16=bf16, shared_prefix=prefix)
    assert torch.equal(got, want)
    assert got_grads.keys() == want_grads.keys()
    tol = 2e-2 if bf16 else 1e-5
    for name, g in want_grads.items():
        err = (got_grads[name] - g).norm() / g.norm()
        assert err < tol, (name, err.item())


def test_no_grad_runs_transformers_code_and_lora_keeps_its_adapters():
    """Without autograd the layers are transformers' own; with LoRA on the MLP projections the
    MLP falls back to transformers' forward (the adapters must run), and the LoRA gradients
    equal those of the same model without lean layers."""
    plain = tiny_llama(61, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate=48, seed=4)
    lean = copy.deepcopy(plain)
    use_lean_layers(lean)
    ids, mask = _batch(seed=1)
    with torch.no_grad():
        assert torch.equal(lean(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0,
                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    plain, lean = apply_lora(plain, lora), apply_lora(lean, lora)
    with torch.no_grad():  # non-zero B, so that the A matrices get gradients too
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    lean.load_state_dict(plain.state_dict())  # the same adapters in both
    _, want = _grads_and_logps(plain, ids, mask, bf16=False)
    _, got = _grads_and_logps(lean, ids, mask, bf16=False)
    assert want.keys() == got.keys() and any("lora_B" in n for n in want)
    for name, g in want.items():
        assert (got[name] - g).norm() <= 1e-5 * g.norm(), name


def test_other_architectures_are_left_alone():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    assert use_lean_layers(Qwen2ForCausalLM(config)) == 0


def test_a_layer_keeps_one_cast_of_each_norm_output():
    """Under bf16 autocast, of the (B, T, H) tensors a lean layer keeps for backward, two are the
    fp32 inputs of its norms (the residual stream) and three are bf16: one cast of the attention
    norm's output, read by q, k and v (autocast would keep three), the attention output read by
    o_proj, and one cast of the MLP norm's output (read by gate and up)."""
    model = tiny_llama(61, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48, seed=5)
    use_lean_layers(model)
    ids, mask = _batch(seed=2)
    saved, recording = {}, [False]

    def pack(t):
        if recording[0] and t.shape == (*ids.shape, 32):
            saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.dtype
        return t

    layer = model.model.layers[0]
    layer.register_forward_pre_hook(lambda *_: recording.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: recording.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        CausalLMLogps(model)(ids, mask)
    dtypes = list(saved.values())
    assert dtypes.count(torch.float32) == 2 and dtypes.count(torch.bfloat16) == 3, dtypes


def _graph_names(t: torch.Tensor) -> set:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_training_attention_is_lean_in_bf16_only():
    """The model's attention goes through `attention` when training under bf16 autocast; in
    fp32 (where SDPA's own backward is the faster) and without grad it stays transformers'."""
    model = tiny_llama(61, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48, seed=6)
    use_lean_layers(model)
    assert model.config._attn_implementation == "tether_lean_sdpa"
    ids, mask = _batch(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(input_ids=ids, attention_mask=mask).logits
    fp32 = model(input_ids=ids, attention_mask=mask).logits
    assert "_AttentionBackward" in _graph_names(bf16)
    assert "_AttentionBackward" not in _graph_names(fp32)
    assert any("Attention" in n or "Sdpa" in n or "Flash" in n for n in _graph_names(fp32))
