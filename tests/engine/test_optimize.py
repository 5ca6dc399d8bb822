"""Gradient accumulation is normalised globally; the lr schedule matches hand-worked values."""

import math

import pytest
import torch

from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import tiny_llama
from tether.engine.optimize import accumulate_gradients, lr_factor
from tether.losses import nll_loss


def _batch(lengths, vocab=64, seed=0):
    """Right-padded batch; completion = the last half of each sequence (uneven token counts)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    attn = torch.zeros(len(lengths), T, dtype=torch.bool)
    loss = torch.zeros_like(attn)
    for i, n in enumerate(lengths):
        attn[i, :n] = True
        loss[i, n // 2:n] = True
    ids[~attn] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _slice(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def _loss_fn(model, mb):
    return nll_loss(model(mb["input_ids"], mb["attention_mask"]), mb["loss_mask"])


def _grads(model, micro_batches, precision="fp32"):
    model.zero_grad(set_to_none=True)
    out = accumulate_gradients(model, micro_batches, loss_fn=_loss_fn,
                               count_units=lambda mb: int(mb["loss_mask"].sum()),
                               device=torch.device("cpu"), precision=precision)
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_four_micro_batches_give_the_gradient_of_one_big_batch():
    """Lengths 3..12 give 2..6 completion tokens per row: a per-micro-batch mean would weight
    short rows more; dividing each micro-batch's sum by the global token count does not."""
    model = CausalLMLogps(tiny_llama(vocab_size=64), chunk_size=16)
    batch = _batch([3, 12, 5, 9, 4, 11, 7, 6])
    full_out, full = _grads(model, [batch])
    parts = [_slice(batch, slice(i, i + 2)) for i in range(0, 8, 2)]
    acc_out, acc = _grads(model, parts)
    assert acc_out["units"] == full_out["units"] == sum(n - n // 2 for n in [3, 12, 5, 9, 4, 11, 7, 6])
    assert acc_out["loss"] == pytest.approx(full_out["loss"], abs=1e-6)
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=1e-6, rtol=1e-5)


def test_naive_per_micro_batch_mean_would_differ():
    """Guard that the test above can fail: averaging micro-batch means changes the gradient."""
    model = CausalLMLogps(tiny_llama(vocab_size=64), chunk_size=16)
    batch = _batch([3, 12, 5, 9, 4, 11, 7, 6])
    _, full = _grads(model, [batch])
    model.zero_grad(set_to_none=True)
    for i in range(0, 8, 2):
        mb = _slice(batch, slice(i, i + 2))
        loss_sum, _ = _loss_fn(model, mb)
        (loss_sum / mb["loss_mask"].sum() / 4).backward()
    diff = max((p.grad - full[n]).abs().max().item() for n, p in model.named_parameters())
    assert diff > 1e-4


def test_lr_schedule_hand_values():
    """total 10, warmup 2: steps 0,1 -> 1/2, 2/2. Cosine after: p = (s - 2) / 8.
    s=2: p=0 -> 1; s=6: p=0.5 -> 0.5; s=9: p=7/8 -> 0.5 (1 + cos(7 pi/8)) = 0.0380602.
    With min_ratio 0.1 at s=6: 0.1 + 0.9 * 0.5 = 0.55. Linear at s=6: 1 - 0.5 = 0.5."""
    f = lambda s, **kw: lr_factor(s, total_steps=10, warmup_steps=2, **kw)  # noqa: E731
    assert f(0, schedule="cosine") == 0.5
    assert f(1, schedule="cosine") == 1.0
    assert f(2, schedule="cosine") == 1.0
    assert f(6, schedule="cosine") == pytest.approx(0.5)
    assert f(9, schedule="cosine") == pytest.approx(0.0380602, abs=1e-7)
    assert f(6, schedule="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert f(6, schedule="linear") == pytest.approx(0.5)
    assert f(9, schedule="constant") == 1.0
    assert math.isclose(f(9, schedule="linear"), 1 / 8)


def test_adam_state_allocated_up_front_steps_like_the_lazy_one():
    """build_optimizer creates AdamW's state before any step (zero moments, step 0), which
    torch would otherwise create inside the first step. Three steps with the same gradients
    must then leave bit-identical parameters and state: only where the buffers live differs."""
    from tether.config import TrainConfig
    from tether.engine.optimize import build_optimizer

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    eager_model, lazy_model = tiny_llama(32, seed=0), tiny_llama(32, seed=0)
    eager = build_optimizer(eager_model, cfg)
    lazy = build_optimizer(lazy_model, cfg)
    assert len(lazy.state) == sum(1 for p in lazy_model.parameters() if p.requires_grad)
    lazy.state.clear()  # torch's own start: the state is made inside the first step
    first = next(iter(eager.state.values()))
    assert float(first["step"]) == 0 and not first["exp_avg"].any()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for pe, pl in zip(eager_model.parameters(), lazy_model.parameters()):
            grad = torch.randn(pe.shape, generator=g)
            pe.grad, pl.grad = grad.clone(), grad.clone()
        eager.step()
        lazy.step()
    for pe, pl in zip(eager_model.parameters(), lazy_model.parameters()):
        assert torch.equal(pe, pl)
        se, sl = eager.state[pe], lazy.state[pl]
        assert se.keys() == sl.keys()
        for k in se:
            assert torch.equal(se[k], sl[k]), k


def test_steps_in_backward_equal_a_step_after_backward(monkeypatch):
    """Without clipping and with one micro-batch, train_step steps each parameter in its
    gradient's hook. Three steps (warmup: the lr changes, weight decay on) must leave parameters
    and AdamW state bit-identical to optimizer.step() after backward, the same losses, the same
    gradient norm up to summation order, and no gradient behind."""
    from tether.config import TrainConfig
    from tether.engine import optimize

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_ratio=0.5, max_grad_norm=0.0)
    models = [CausalLMLogps(tiny_llama(32, seed=0, tie=True)) for _ in range(2)]
    opts = [optimize.build_optimizer(m, cfg) for m in models]
    scheds = [optimize.build_scheduler(o, cfg, total_steps=4) for o in opts]
    batches = [_batch([9, 6, 7], vocab=32, seed=s) for s in range(3)]
    assert optimize.steps_in_backward_apply(opts[0], batches[:1], 0.0)
    assert not optimize.steps_in_backward_apply(opts[0], batches[:1], 1.0)
    assert not optimize.steps_in_backward_apply(opts[0], batches[:2], 0.0)

    def steps(i):
        return [optimize.train_step(models[i], [b], loss_fn=_loss_fn,
                                    count_units=lambda mb: int(mb["loss_mask"].sum()),
                                    optimizer=opts[i], scheduler=scheds[i],
                                    device=torch.device("cpu"), precision="fp32",
                                    max_grad_norm=0.0) for b in batches]

    in_backward = steps(0)
    monkeypatch.setattr(optimize, "steps_in_backward_apply", lambda *a: False)
    after_backward = steps(1)
    for a, b in zip(in_backward, after_backward):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(pa, pb) and pa.grad is None
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        for k in sb:
            assert torch.equal(sa[k], sb[k]), k
    assert float(next(iter(opts[0].state.values()))["step"]) == 3


def test_steps_in_backward_refuse_a_non_finite_gradient():
    """A NaN gradient raises before its parameter steps (the one that holds it stays put)."""
    from tether.config import TrainConfig
    from tether.engine.optimize import build_optimizer, steps_in_backward

    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, TrainConfig(lr=1.0, max_grad_norm=0.0))
    before = model.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="nan"):
        with steps_in_backward(opt):
            (model(torch.tensor([[float("nan"), 1.0, 1.0]])).sum()).backward()
    assert torch.equal(model.weight.detach(), before)


def _poisoned(bad_index, kind):
    """A loss fn whose micro-batch `bad_index` has a NaN loss ("loss") or a finite loss with a
    NaN gradient ("grad": 0 * sqrt(0 * w) is 0, its gradient 0 * inf * 0 = NaN)."""
    def loss_fn(model, mb):
        loss, metrics = _loss_fn(model, mb)
        if mb["index"] == bad_index:
            w = next(model.parameters())
            loss = loss * float("nan") if kind == "loss" else \
                loss + 0.0 * torch.sqrt(0.0 * w.abs().sum())
        return loss, metrics
    return loss_fn


@pytest.mark.parametrize("kind, n, bad, message", [
    ("loss", 3, 1, r"^the loss of micro-batch 1 \(of 3\) is nan: the run stops here and writes "
                   r"no checkpoint for this step$"),
    ("grad", 3, 2, r"^a gradient of micro-batch 2 \(of 3\) is NaN/inf \(its loss, [\d.]+, is "
                   r"finite\): the run stops here"),
    ("grad", 1, 0, r"^the gradient norm after micro-batch 0 \(of 1\) is nan \(the losses were "
                   r"finite\): the run stops here"),
], ids=["loss", "grad_of_one_of_three", "grad_of_the_only_one"])
def test_a_nan_names_its_micro_batch_and_nothing_steps(kind, n, bad, message):
    from tether.config import TrainConfig
    from tether.engine.optimize import build_optimizer, build_scheduler, train_step

    model = CausalLMLogps(tiny_llama(vocab_size=64), chunk_size=16)
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    sched = build_scheduler(opt, TrainConfig(lr=1e-2), total_steps=4)
    batch = _batch([5, 6, 7])
    micro = [dict(_slice(batch, slice(i, i + 1)), index=i) for i in range(3)][:n]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=message):
        train_step(model, micro, loss_fn=_poisoned(bad, kind),
                   count_units=lambda mb: int(mb["loss_mask"].sum()), optimizer=opt,
                   scheduler=sched, device=torch.device("cpu"), precision="fp32",
                   max_grad_norm=1.0)
    for k, v in model.state_dict().items():  # clipping on: no parameter has stepped
        assert torch.equal(v, before[k]), k
