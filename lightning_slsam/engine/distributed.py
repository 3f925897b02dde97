"""Data-parallel support: rank-consistent sampling and one coalesced all-reduce of the active gradients (DDP).

Under DDP the callback turns DDP's own gradient synchronisation off (``require_backward_grad_sync``), so
neither backward pass waits on parameters that have no gradient this step: the default ``ddp`` strategy
works without ``find_unused_parameters``. Pass 1 stays local (each replica ascends along its own
gradient, as in the SAM papers). After pass 2 the gradients that reach the optimizer are averaged in one
flat all-reduce per dtype, so communication shrinks with the active ratio; the per-arm norms that feed
the bandit are averaged too (N floats), so every rank's sampler takes the same update.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")

#: why a strategy cannot run the step, by the name of its class (or of a base class)
_REFUSED = {
    "FSDPStrategy": (
        "FSDP1 flattens parameters into FlatParameters whose requires_grad is fixed when they are wrapped, so a "
        "step cannot leave arms out of a pass; use ModelParallelStrategy and call torch's fully_shard (FSDP2) in "
        "configure_model (docs/guide/sharded.md)"
    ),
    "DeepSpeedStrategy": (
        "DeepSpeed owns the backward pass and the optimizer step; use 'ddp', or ModelParallelStrategy with "
        "fully_shard (FSDP2)"
    ),
}


def check_strategy(strategy: Any, owner: str) -> None:
    """Refuse strategies that cannot run the sharpness-aware step, with the reason (FSDP1, DeepSpeed, ...).

    Runs: a single device, DDP (``ddp``, ``ddp_spawn``, ...) and ``ModelParallelStrategy`` with FSDP2's
    ``fully_shard`` (data parallel only: ``tensor_parallel_size=1``; the step checks the sharding itself).
    """
    kinds = [cls.__name__ for cls in type(strategy).__mro__]
    for kind in kinds:
        for refused, reason in _REFUSED.items():
            if refused.removesuffix("Strategy") in kind:  # the class or a subclass named after it
                raise ValueError(
                    f"{owner}: strategy {type(strategy).__name__} cannot run the sharpness-aware step: {reason}"
                )
    if not any(kind in _SUPPORTED_STRATEGIES for kind in kinds):
        raise ValueError(
            f"{owner}: strategy {type(strategy).__name__} cannot run the sharpness-aware step; use a single device, "
            "'ddp' / 'ddp_spawn', or ModelParallelStrategy with fully_shard (FSDP2) in configure_model"
        )
    if "ModelParallelStrategy" in kinds and getattr(strategy, "_tensor_parallel_size", 1) not in (1, "auto"):
        raise ValueError(
            f"{owner}: ModelParallelStrategy with tensor_parallel_size={strategy._tensor_parallel_size}: the step "
            "supports FSDP2 data parallelism only (tensor_parallel_size=1)"
        )


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def disable_ddp_sync(model: Any) -> None:
    """Turn off a ``DistributedDataParallel`` wrapper's own gradient sync (we sync the active grads)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = False


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` in place across ranks: one flat all-reduce per (device, dtype) group."""
    if not tensors or not is_distributed():
        return
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        torch._foreach_copy_(
            group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group, strict=True)]
        )


def broadcast_seed(seed: int | None) -> int:
    """A sampler seed equal on every rank: the given one, or rank 0's draw from the global torch RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if is_distributed():
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def assert_same_arms(active: Tensor) -> None:
    """Check that every rank picked the same arms (a cheap all-reduce of the mask); raise if not."""
    if not is_distributed():
        return
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mask = active.to(device=device, dtype=torch.int32)
    low, high = mask.clone(), mask.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"ranks sampled different arms (rank {dist.get_rank()}): samplers are out of sync")
