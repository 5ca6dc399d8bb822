"""Llama decoder layers that keep fewer tensors for backward: the same forward, lean autograd.

Under bf16 autocast a transformers Llama layer saves, per token (H hidden, I intermediate):
- in each RMSNorm, fp32 copies of its input and of the normalised input (2 x 4H bytes);
- the norm's output cast to bf16 once per projection that reads it (3 x 2H for q, k, v and
  2 x 2H for gate, up), since autocast casts a tensor again for every matmul;
- the bf16 cast of every weight matrix (autocast keeps them for the backward: 203 MB for
  SmolLM2-135M, whatever the batch);
- gate, silu(gate), up and silu(gate) * up (4 x 2I bytes) in the MLP.
For 4 DPO pairs of 115 tokens on SmolLM2-135M that is 937 MiB (counted over the autograd graph).

The three functions here save less and recompute the cheap rest in backward:
- `rms_norm` keeps its input and the per-row 1/rms (4H + 4 bytes);
- `linear` keeps its input's bf16 cast, made once for q, k and v, which read the same norm
  output (2H), and the fp32 weight it already holds, and casts the weight again in backward
  instead of keeping a cast for the whole step;
- `swiglu_mlp` keeps its input's bf16 cast and [gate | up] (2H + 2 x 2I bytes), in bf16 computed
  in one matmul against the two weights stacked (the same dot products, bit-identical outputs),
  and recomputes silu(gate) * up;
- `attention` runs SDPA's CPU flash kernel forward (keeping what it keeps) and its own backward:
  in bf16 the kernel's backward, tiled for long sequences, was 80% of attention time on the short
  rows of post-training batches (in fp32 the kernel's backward is kept).
Every matmul casts its weight into one buffer per weight shape, reused by every call, instead of
a fresh one (about 0.9 GB of short-lived buffers per DPO step of SmolLM2-135M, 4 pairs).
Each forward runs the same operations as transformers' code, so outputs are bit-identical; the
gradients are the same formulas, equal to rounding. Under bf16 autocast the matmuls run in bf16
and every element-wise gradient in the same dtype as autograd's own, with inputs' gradients
returned in the inputs' dtype (fp32 accumulation where transformers has it).

`use_lean_layers(model)` swaps these in for the norms, projections and MLPs inside the decoder
layers of Llama-architecture models (SmolLM2, Llama); other models are left alone. They only take
over when autograd records (training); no-grad passes run transformers' own code. Attention is
registered with transformers as the attention implementation `tether_lean_sdpa` (SDPA's mask
function, SDPA itself whenever the lean path does not apply).
"""

from __future__ import annotations

import os
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tether.engine.dist import is_distributed
from tether.engine.logprobs import compute_dtype


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # (..., D) -> (N, D)


_last_cast: tuple = (None, None, -1)  # (weakref to a tensor, weakref to its cast, its version)


def _cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; the same tensor again while x is unchanged, so q, k and v, which read one
    norm output, keep one cast of it for backward instead of three (autocast's values)."""
    global _last_cast
    if x.dtype == dtype:
        return x
    source, cast, version = _last_cast
    if source is not None and source() is x and x._version == version:
        xc = cast()
        if xc is not None and xc.dtype == dtype:
            return xc
    xc = x.to(dtype)
    _last_cast = (weakref.ref(x), weakref.ref(xc), x._version)
    return xc


_weight_casts: dict = {}  # (shapes, dtype, device) -> the one buffer every call reuses


def _cast_weights(dtype: torch.dtype, *weights: torch.Tensor) -> torch.Tensor:
    """torch.cat(weights) in `dtype` ((n1 + n2 + ..., ...)), written into the buffer kept for
    these shapes; one weight already in `dtype` is returned itself. The result is only valid
    until the next call for the same shapes: each use here is one matmul, made before anything
    else casts a weight."""
    if len(weights) == 1 and weights[0].dtype == dtype:
        return weights[0]
    first = weights[0]
    key = (tuple(tuple(w.shape) for w in weights), dtype, first.device)
    buf = _weight_casts.get(key)
    if buf is None:
        rows = sum(w.shape[0] for w in weights)
        buf = _weight_casts[key] = torch.empty((rows, *first.shape[1:]), dtype=dtype,
                                               device=first.device)
    row = 0
    for w in weights:
        buf[row:row + w.shape[0]].copy_(w)
        row += w.shape[0]
    return buf


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)), rms(x) = sqrt(mean(x^2) + eps), computed in fp32 as transformers does.

    With xhat = x * r, r = (mean(x^2) + eps)^(-1/2) and gxhat = gy * w:
        dL/dw = sum over rows of gy * xhat
        dL/dx = r * (gxhat - xhat * mean(gxhat * xhat))
    (d r / d x_j = -r^3 x_j / H, so the second term is sum_i gxhat_i x_i (-r^3 x_j / H).)
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        # x: (..., H); weight: (H,). The same ops as LlamaRMSNorm.forward.
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd  # (..., H) fp32
        gy = grad_y.to(torch.float32)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (_rows(gy) * _rows(xhat)).sum(0).to(weight.dtype)  # (H,)
        gxhat = gy * weight.to(torch.float32)
        dot = (gxhat * xhat).mean(-1, keepdim=True)  # (..., 1)
        grad_x = gxhat.sub_(xhat.mul_(dot)).mul_(rstd)  # (gxhat - xhat * dot) * r, in place
        return grad_x.to(x.dtype), grad_weight, None


class _Linear(torch.autograd.Function):
    """y = x W^T + b in the compute dtype; keeps x's cast and the weight uncast."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # x: (..., in); weight: (out, in); bias: (out,) or None -> (..., out) in the compute dtype
        compute = compute_dtype(x)
        xc = _cast_once(x, compute)  # (..., in)
        with torch.autocast(x.device.type, enabled=False):
            bias_c = None if bias is None else bias.to(compute)
            y = F.linear(xc, _cast_weights(compute, weight), bias_c)
        ctx.save_for_backward(xc, weight)
        ctx.compute, ctx.x_dtype, ctx.has_bias = compute, x.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, weight = ctx.saved_tensors
        grad_y = grad_y.to(ctx.compute)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ _cast_weights(ctx.compute, weight)).to(ctx.x_dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_weight = (_rows(grad_y).T @ _rows(xc)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = _rows(grad_y).sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias


class _SwiGLUMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), the Llama MLP without biases; silu(gate) * up is recomputed.

    With h = silu(a) * u, a = x Wg^T, u = x Wu^T, out = h Wd^T and gh = g Wd:
        dWd = g^T h,  du = gh * silu(a),  da = silu'(a) * (gh * u),
        dWg = da^T x, dWu = du^T x,       dx = da Wg + du Wu = [da | du] [Wg ; Wu].
    Under autocast, a and u come from one matmul against [Wg ; Wu] (2I, H), cast into one
    buffer, and [da | du] goes back through it in one matmul too: dx then sums both halves in
    the matmul's fp32 accumulation, rounded to bf16 once (autograd through two matmuls rounds
    each before adding them). In fp32, where no cast is made, gate and up stay two matmuls
    (stacking would copy both weights at every call: ~9% slower in paired fp32 runs).
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        # x: (..., H); w_gate, w_up: (I, H); w_down: (H, I) -> (..., H) in the compute dtype
        compute = compute_dtype(x)
        xc = _cast_once(x, compute)  # (..., H)
        ctx.stacked = compute != w_gate.dtype  # the weights are cast: into one stacked buffer
        with torch.autocast(x.device.type, enabled=False):
            if ctx.stacked:
                I = w_gate.shape[0]
                gate_up = F.linear(xc, _cast_weights(compute, w_gate, w_up))  # (..., 2I)
                gate, up = gate_up[..., :I], gate_up[..., I:]
                ctx.save_for_backward(xc, gate_up, w_gate, w_up, w_down)
            else:
                gate, up = F.linear(xc, w_gate), F.linear(xc, w_up)  # (..., I) each
                ctx.save_for_backward(xc, gate, up, w_gate, w_up, w_down)
            out = F.linear(F.silu(gate) * up, _cast_weights(compute, w_down))
        ctx.compute, ctx.x_dtype = compute, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        compute = ctx.compute
        if ctx.stacked:
            xc, gate_up, w_gate, w_up, w_down = ctx.saved_tensors
            I = w_gate.shape[0]
            gate, up = gate_up[..., :I], gate_up[..., I:]
        else:
            xc, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        g = grad_out.to(compute)  # (..., H)
        silu = F.silu(gate)  # (..., I)
        grad_w_down = None
        if ctx.needs_input_grad[3]:
            grad_w_down = (_rows(g).T @ _rows(silu * up)).to(w_down.dtype)  # (H, I)
        grad_h = g @ _cast_weights(compute, w_down)  # (..., I)
        if ctx.stacked:  # [da | du] in one tensor, for one matmul back through [Wg ; Wu]
            grad_gate_up = torch.empty_like(gate_up)  # (..., 2I)
            grad_gate, grad_up = grad_gate_up[..., :I], grad_gate_up[..., I:]
            torch.mul(grad_h, silu, out=grad_up)
            grad_gate.copy_(torch.ops.aten.silu_backward(grad_h * up, gate))
        else:
            grad_up = grad_h * silu
            grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
        del grad_h, silu
        grad_x = grad_w_gate = grad_w_up = None
        if ctx.needs_input_grad[0]:
            if ctx.stacked:
                grad_x = (grad_gate_up @ _cast_weights(compute, w_gate, w_up)).to(ctx.x_dtype)
            else:  # each matmul's result in x's dtype before the sum, as autograd adds the
                # gradients of autocast's two casts of x
                grad_x = (grad_gate @ w_gate).to(ctx.x_dtype)
                grad_x += (grad_up @ w_up).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w_gate = (_rows(grad_gate).T @ _rows(xc)).to(w_gate.dtype)  # (I, H)
        if ctx.needs_input_grad[2]:
            grad_w_up = (_rows(grad_up).T @ _rows(xc)).to(w_up.dtype)  # (I, H)
        return grad_x, grad_w_gate, grad_w_up, grad_w_down


class _Attention(torch.autograd.Function):
    """softmax(scale * q k^T + mask) v with grouped-query heads: the forward is the CPU flash
    kernel that SDPA runs, the backward five batched matmuls over whole rows.

    With P = softmax(S), S = scale * q k^T + mask, O = P v and dO the output's gradient, the
    flash-attention backward (Dao et al. 2022, appendix B.2):
        dv = P^T dO,  dP = dO v^T,  dS = P * (dP - rowsum(dO * O)),
        dq = scale * dS k,  dk = scale * dS^T q,
    with P = exp(S - lse) rebuilt from the forward's log-sum-exp. The query heads that share a
    key/value head (q head h reads kv head h // G) are stacked into one (G * T)-row block, so dk
    and dv sum over them in the matmul. S and dP are formed in fp32 from the bf16 inputs (the
    kernel's own accumulation), P and dS are cast to the compute dtype for the other three
    matmuls, as the kernel does. The kernel's backward tiles for long sequences; for the short
    rows of post-training batches it took 14 ms of a 17 ms forward + backward per layer here,
    this 4-10 ms (benchmarks/README.md).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        # q: (B, Hq, T, d); k, v: (B, Hkv, S, d); mask: (B or 1, 1, T, S) bool (True = attend)
        compute = compute_dtype(q)
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        additive = torch.zeros(mask.shape, dtype=compute).masked_fill_(~mask, float("-inf"))
        with torch.autocast(q.device.type, enabled=False):
            # out (B, Hq, T, d), lse (B, Hq, T)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qc, kc, vc, 0.0, False, attn_mask=additive, scale=scale)[:2]
        ctx.save_for_backward(qc, kc, vc, out, lse, mask)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qc, kc, vc, out, lse, mask = ctx.saved_tensors
        B, Hq, T, d = qc.shape
        Hkv, S = kc.shape[1], kc.shape[2]
        G = Hq // Hkv

        def stacked(x):  # (B, Hq, T, e) -> (B, Hkv, G * T, e)
            return x.reshape(B, Hkv, G * T, x.shape[-1])

        qg, og, gog = stacked(qc), stacked(out), stacked(grad_out.to(qc.dtype))
        s = torch.matmul(qg.float(), kc.float().transpose(-1, -2))  # (B, Hkv, GT, S)
        s.mul_(ctx.scale)
        s.view(B, Hkv, G, T, S).masked_fill_(~mask.unsqueeze(2), float("-inf"))
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # a row that sees no key: P = 0
        p = s.sub_(stacked(lse.unsqueeze(-1))).exp_()  # (B, Hkv, GT, S) fp32
        grad_v = torch.matmul(p.to(vc.dtype).transpose(-1, -2), gog)  # (B, Hkv, S, d)
        dp = torch.matmul(gog.float(), vc.float().transpose(-1, -2))  # (B, Hkv, GT, S)
        rowsum = (gog.float() * og.float()).sum(-1, keepdim=True)  # (B, Hkv, GT, 1)
        ds = p.mul_(dp.sub_(rowsum)).mul_(ctx.scale).to(qc.dtype)
        del p, dp, s
        grad_q = torch.matmul(ds, kc).reshape(B, Hq, T, d)
        grad_k = torch.matmul(ds.transpose(-1, -2), qg)  # (B, Hkv, S, d)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    return _Attention.apply(q, k, v, mask, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return _Linear.apply(x, weight, bias)


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    return _SwiGLUMLP.apply(x, w_gate, w_up, w_down)


# --- swapping them into a transformers model -------------------------------------------------

def _norm_forward(self, hidden_states):
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _linear_forward(self, x):
    if not torch.is_grad_enabled():
        return nn.Linear.forward(self, x)
    return linear(x, self.weight, self.bias)


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _mlp_forward(self, x):
    # checked per call: peft may have wrapped the projections after the swap
    if not (torch.is_grad_enabled() and _plain_linear(self.gate_proj)
            and _plain_linear(self.up_proj) and _plain_linear(self.down_proj)):
        return type(self).forward(self, x)
    return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


LEAN_ATTENTION = "tether_lean_sdpa"


def _lean_attention_applies(query, key, mask, dropout, kwargs) -> bool:
    """Training on CPU in bf16 (or fp16), no dropout, a boolean (B or 1, 1, T, S) mask (what
    SDPA's mask function builds) and none of the options `attention` lacks. In fp32 the
    kernel's own backward is the faster (8.5 against 10.8 ms per completion layer of the DPO
    benchmark)."""
    if not (torch.is_grad_enabled() and query.device.type == "cpu" and dropout == 0.0
            and compute_dtype(query) != torch.float32):
        return False
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    B, Hq, T = query.shape[:3]
    Hkv, S = key.shape[1:3]
    return (mask.shape[0] in (1, B) and tuple(mask.shape[2:]) == (T, S) and Hq % Hkv == 0
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions"))


def _lean_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                            scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: `attention` where `_lean_attention_applies`,
    transformers' SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _lean_attention_applies(query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = attention_mask.expand(query.shape[0], -1, -1, -1)
    out = attention(query, key, value, mask, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, T, Hq, d), as SDPA's interface returns


def _register_lean_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(LEAN_ATTENTION, _lean_attention_forward)
    AttentionMaskInterface.register(LEAN_ATTENTION, sdpa_mask)


def use_lean_layers(model: nn.Module) -> int:
    """Swap the lean functions into every Llama decoder layer of `model`, in place.

    Returns the number of decoder layers changed (0 for other architectures, or under
    torch.distributed, where FSDP2 frees and re-gathers the weights these functions keep).
    On CPU it also lets transformers hand grouped-query attention to SDPA unexpanded
    (TRANSFORMERS_SDPA_FORCE_GQA): its CPU flash kernel supports that with a mask, so the keys
    and values are not repeated per query head (nor kept repeated for backward)."""
    from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaMLP,
                                                          LlamaRMSNorm)

    if is_distributed():
        return 0
    changed = 0
    for layer in model.modules():
        if type(layer) is not LlamaDecoderLayer:
            continue
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is LlamaRMSNorm:
                norm.forward = types.MethodType(_norm_forward, norm)
        for proj in layer.self_attn.children():
            if type(proj) is nn.Linear:
                proj.forward = types.MethodType(_linear_forward, proj)
        mlp = layer.mlp
        if type(mlp) is LlamaMLP and mlp.config.hidden_act == "silu":
            mlp.forward = types.MethodType(_mlp_forward, mlp)
        changed += 1
    if changed and not torch.cuda.is_available():
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        if model.config._attn_implementation == "sdpa":
            _register_lean_attention()
            model.config._attn_implementation = LEAN_ATTENTION
    return changed
