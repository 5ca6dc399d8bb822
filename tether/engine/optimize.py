"""One optimizer step over micro-batches: the items it sees (`step_items`, seeded per epoch, so
a resumed run sees the same data), accumulation normalised globally, clipping, AdamW, warmup +
cosine schedule, bf16 autocast with fp32 master weights.

Normalisation: a loss function returns a *sum* over its loss units (tokens for SFT, pairs for
DPO) and the number of units is known up front. Each micro-batch's sum is divided by the global
number of units in the whole step (all micro-batches, all ranks) before backward, so the
accumulated gradient equals that of one big batch however the batch is split.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_step

from tether.config import TrainConfig
from tether.engine import dist
from tether.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it, bf16 matmuls
    are emulated: measured 5-15x *slower* than fp32 on an AVX2-only AMD EPYC."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA (when supported) and on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got '{precision}'")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast (matmuls in bf16, fp32 weights and reductions) or nothing for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    warmup (step < W):        (step + 1) / W
    then, with p = (step - W) / max(1, total - W) in [0, 1):
      cosine:   m + (1 - m) * 0.5 * (1 + cos(pi * p))
      linear:   m + (1 - m) * (1 - p)
      constant: 1
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got '{schedule}'")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def step_items(items: list, step: int, batch_size: int, seed: int) -> list:
    """The global batch of optimizer step `step`: a pure function of (step, seed), so a resumed
    run sees exactly the data an uninterrupted one would. Each epoch is a fresh permutation."""
    per_epoch = len(items) // batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [items[i] for i in order[index * batch_size:(index + 1) * batch_size].tolist()]


def check_batch_sizes(cfg) -> int:
    """Micro-batches per rank per step of a recipe config with a `train` section (sft, rm, prm,
    dpo); the global batch must split evenly."""
    world, tc = dist.world_size(), cfg.train
    if tc.batch_size % (tc.micro_batch_size * world):
        raise ConfigError(
            f"train.batch_size ({tc.batch_size}) must be a multiple of train.micro_batch_size "
            f"({tc.micro_batch_size}) x world size ({world})")
    return tc.batch_size // (tc.micro_batch_size * world)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on trainable parameters; no weight decay on biases and norms (1-D tensors).

    The fused kernel: measured 6x faster than the per-tensor loop for a 135M model on CPU.
    Its state is allocated here, before the first forward (`allocate_adam_state`).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, fused=True)
    allocate_adam_state(optimizer)
    return optimizer


def allocate_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state the fused AdamW of `build_optimizer` (no amsgrad) would create in its
    first step (step 0, zero moments), now.

    The same values, so the steps are bit-identical (tested). What changes is where the moments
    land in host memory: made lazily, inside the first step, they fill the holes that step's
    activations and gradients left and then the heap's top, and every later step's buffers fit
    around them worse. Made before any forward, they sit below everything a step allocates: the
    DPO benchmark's peak RSS fell by 32 MiB on average (8 paired 10-step probes: 2967-3101
    against 3053-3074 MiB; benchmarks/README.md). Out-of-memory also shows before the first step.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            # the fused kernel keeps `step` on the parameter's device, as an fp32 scalar
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.schedule,
        min_ratio=cfg.min_lr_ratio))


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Any], *, loss_fn: LossFn,
                         count_units: Callable[[Any], float], device: torch.device,
                         precision: str = "bf16") -> dict[str, float]:
    """Forward/backward every micro-batch; the gradients add up to those of the global mean.

    loss_fn(model, mb) -> (loss_sum, metrics): the loss summed over mb's units.
    count_units(mb) -> number of loss units in mb (known before any forward).
    Each micro-batch backpropagates loss_sum / U, U = units summed over all micro-batches and
    ranks, so sum over micro-batches and ranks of the gradients = grad of (total loss / U).
    Returns loss (the global mean per unit), units (U), and the loss function's metrics summed
    over micro-batches and ranks.

    A NaN/inf loss raises FloatingPointError naming its micro-batch before its backward; with
    several micro-batches in one process the gradients are checked after each backward too, so
    the message names the micro-batch whose backward made one NaN/inf (one norm over the
    gradients per micro-batch). The caller prefixes the step; nothing has stepped yet.
    """
    n = len(micro_batches)
    check_grads = n > 1 and not dist.is_distributed()  # else train_step's norm check names it
    global_units = dist.all_reduce_sum(sum(count_units(mb) for mb in micro_batches)).item()
    if global_units <= 0:
        raise ValueError("this step has no loss units (no completion tokens in the batch)")
    loss_total = 0.0
    summed: dict[str, float] = {}
    for i, mb in enumerate(micro_batches):
        dist.set_gradient_sync(model, i == len(micro_batches) - 1)
        with autocast(device, precision):
            loss_sum, metrics = loss_fn(model, mb)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"the loss of micro-batch {i} (of {n}) is "
                                     f"{loss_sum.item()}{STOPPED}")
        (loss_sum / global_units).backward()
        if check_grads and not math.isfinite(_grad_norm(model)):
            raise FloatingPointError(f"a gradient of micro-batch {i} (of {n}) is NaN/inf (its "
                                     f"loss, {loss_sum.item():.6g}, is finite){STOPPED}")
        loss_total += loss_sum.item()
        for k, v in metrics.items():
            summed[k] = summed.get(k, 0.0) + float(v)
    out = {"loss": dist.all_reduce_sum(loss_total).item() / global_units, "units": global_units}
    out.update({k: dist.all_reduce_sum(v).item() for k, v in summed.items()})
    return out


def train_step(model: nn.Module, micro_batches: Sequence[Any], *, loss_fn: LossFn,
               count_units: Callable[[Any], float], optimizer: torch.optim.Optimizer,
               scheduler, device: torch.device, precision: str = "bf16",
               max_grad_norm: float = 1.0) -> dict[str, float]:
    """One optimizer step: accumulate gradients, clip, step, advance the schedule, zero grads.
    Without clipping, one micro-batch and one process, each parameter steps in backward instead
    (`steps_in_backward`: the same step, fewer gradients alive at once).

    Returns `accumulate_gradients`' metrics plus grad_norm (before clipping), lr (used for this
    step) and seconds (its wall time).
    """
    t0 = time.perf_counter()
    out = {"lr": optimizer.param_groups[0]["lr"]}
    in_backward = steps_in_backward_apply(optimizer, micro_batches, max_grad_norm)
    n = len(micro_batches)
    where = "micro-batch 0 (of 1)" if n == 1 else f"micro-batches 0-{n - 1} (of {n})"
    with (steps_in_backward(optimizer, late=[
            m.weight for m in model.modules() if isinstance(m, nn.Embedding)], where=where)
          if in_backward else contextlib.nullcontext([])) as norms:
        out.update(accumulate_gradients(model, micro_batches, loss_fn=loss_fn,
                                        count_units=count_units, device=device,
                                        precision=precision))
    out["grad_norm"] = (math.sqrt(sum(n * n for n in norms)) if in_backward
                        else clip_grad_norm(model, max_grad_norm, where))
    optimizer.step()  # after steps in backward no gradient is left: a no-op, kept for the scheduler
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def steps_in_backward_apply(optimizer: torch.optim.Optimizer, micro_batches: Sequence[Any],
                            max_grad_norm: float) -> bool:
    """Whether `train_step` can step each parameter as soon as its gradient is complete: one
    micro-batch (nothing to accumulate), no clipping (which needs every gradient's norm first),
    one process, and the fused AdamW of `build_optimizer` with its state made."""
    return (len(micro_batches) == 1 and max_grad_norm <= 0 and not dist.is_distributed()
            and isinstance(optimizer, torch.optim.AdamW) and all(
                g.get("fused") and not g.get("amsgrad") for g in optimizer.param_groups)
            and all(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]))


@contextlib.contextmanager
def steps_in_backward(optimizer: torch.optim.Optimizer, late: Sequence[torch.Tensor] = (),
                      where: str = "the backward"):
    """While open, each parameter takes its AdamW step in backward, the moment autograd writes
    its gradient, which is then dropped; yields the list that collects each gradient's L2 norm.
    The parameters in `late` step when the block ends instead: an embedding matrix tied to the
    lm_head gets its lookup's rows added to `.grad` by `logprobs.embed_tokens`'s hook after
    autograd has written the lm_head's part.

    The same kernel and values as `optimizer.step()` after backward (the fused kernel updates
    each element alone, whatever the grouping), so the steps are bit-identical (tested); the
    scheduler still steps after. What it saves: gradients live one layer at a time instead of
    all together at the end of backward (540 MB in fp32 for SmolLM2-135M). Only without clipping
    (`steps_in_backward_apply`). A non-finite gradient raises before its parameter steps; the
    parameters stepped before it in this backward keep their step (the run stops either way).
    """
    norms: list[float] = []
    late_ids = {id(p) for p in late}
    handles = [p.register_post_accumulate_grad_hook(
        lambda p, group=group: _step_one(optimizer, group, p, norms, where))
        for group in optimizer.param_groups for p in group["params"] if id(p) not in late_ids]
    try:
        yield norms
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in late_ids and p.grad is not None:
                    _step_one(optimizer, group, p, norms, where)
    finally:
        for handle in handles:
            handle.remove()


def _step_one(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor,
              norms: list[float], where: str = "the backward") -> None:
    norms.append(_finite(float(torch.linalg.vector_norm(p.grad)), where))
    state = optimizer.state[p]
    beta1, beta2 = group["betas"]
    adamw_step([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
               fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
               weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    p.grad = None


def clip_grad_norm(model: nn.Module, max_norm: float, where: str = "the backward") -> float:
    """Global L2 norm of the gradients (over all ranks), clipped to `max_norm` if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return _finite(float(norm), where)


# the end of every NaN/inf message (the recipe puts "step N: " before it)
STOPPED = ": the run stops here and writes no checkpoint for this step"


def _grad_norm(model: nn.Module) -> float:
    """L2 norm of the gradients this process holds (inf or NaN if one of them is)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _finite(grad_norm: float, where: str = "the backward") -> float:
    """`grad_norm`, or FloatingPointError if it is NaN or inf (the run must stop)."""
    if not math.isfinite(grad_norm):
        raise FloatingPointError(f"the gradient norm after {where} is {grad_norm} (the losses "
                                 f"were finite){STOPPED}")
    return grad_norm
