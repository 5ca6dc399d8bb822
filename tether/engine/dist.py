"""Distribution, applied from outside: recipes and losses never branch on world size.

Under `torchrun --nproc_per_node N` each process joins a process group (gloo on CPU, nccl on
GPU) and the model is wrapped with FSDP2 `fully_shard`, one unit per decoder layer plus the root.
A plain `python` run is world size 1 of the same code: every helper here is then a no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# glibc mallopt parameters (malloc.h) and the values keep_freed_host_memory sets (mallopt takes
# an int: the trim threshold is the largest one)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HOST_MMAP_THRESHOLD, HOST_TRIM_THRESHOLD = 1 << 30, 2**31 - 1


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed host memory for the next allocation instead of returning it.

    By default glibc serves every allocation above a threshold (at most 32 MB) with a fresh mmap
    and unmaps it on free, and trims the heap whenever its top is free. A training step on a
    CPU allocates and frees the same large buffers every step (lm_head weight casts and
    gradients, activations), so each step page-faults them in again: ~20 ms per 100 MB on the
    project machine. Raising both thresholds lets a step reuse the previous step's pages: a DPO
    step of the default model (4 pairs, bf16) went from 3.6 to 2.9 s at about the same peak RSS
    (benchmarks/README.md; TRL gains as much from the same setting, made through glibc's
    MALLOC_*_ environment variables). Returns False (nothing changed) where libc is not glibc
    or the environment sets TETHER_KEEP_FREED_MEMORY=0.
    """
    if not sys.platform.startswith("linux") or os.environ.get("TETHER_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD))


def init() -> None:
    """Set up this process for training: host memory kept for reuse (`keep_freed_host_memory`),
    and the process group joined when launched by torchrun (WORLD_SIZE set)."""
    keep_freed_host_memory()
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: float | torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a float64 tensor, on the communication device)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device()).clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; [obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a transformers model (peft-wrapped or not)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError("could not find the decoder layers (a `layers` ModuleList) to shard")


def shard(module: nn.Module) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, norm, lm_head).

    `module` should be the object whose forward the recipe calls (e.g. `CausalLMLogps`), so that
    the root's hooks gather the shared parameters for it. Gradients are summed, not averaged,
    across ranks: the optimizer step already divides by the global count of loss units.
    """
    if world_size() == 1:
        return module
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module):
        fully_shard(layer)
    fully_shard(module)
    for m in module.modules():
        if hasattr(m, "set_gradient_divide_factor") and hasattr(m, "unshard"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return module


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of an accumulation step."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(enabled)


def shard_indices(n: int) -> slice:
    """This rank's contiguous share of `n` global items (n must divide by world size)."""
    ws = world_size()
    if n % ws:
        raise ValueError(f"global batch of {n} does not divide over {ws} ranks")
    per = n // ws
    return slice(rank() * per, (rank() + 1) * per)


def global_mean(total: float, count: float) -> float:
    """sum(total) / sum(count) over ranks (count at least 1), as a Python float."""
    return all_reduce_sum(total).item() / max(1.0, all_reduce_sum(count).item())


def same_count_on_ranks(rows: torch.Tensor) -> torch.Tensor:
    """`rows` padded (with row 0) to the largest count on any rank: under FSDP2 every rank must
    run the same number of forwards. The caller masks the filler rows out. 1 process: `rows`."""
    n = torch.tensor(len(rows), device=device())
    if is_distributed():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return torch.cat([rows, rows.new_zeros(int(n) - len(rows))])
