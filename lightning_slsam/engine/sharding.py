"""Sharded parameters (torch FSDP2, ``fully_shard``): the step's arithmetic on each rank's local shard, and the
few decisions that need the whole tensor reduced over the shard group.

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 and, after a backward pass, its ``grad`` is the
``DTensor`` shard of the gradient already averaged over the data-parallel ranks (FSDP2's reduce-scatter). An arm
stays an original parameter. What the step needs on top:

- the per-arm gradient norms are global: each rank's squared local norms, summed over the shard group (one
  all-reduce of N floats), so every rank samples the same arms, computes the same ascent scale and teaches its
  bandit the same norms (:meth:`Sharding.arm_norms`);
- the ascent, the bitwise restore, the update scaling and the non-finite check act on the local shards
  (:func:`local`); the finite flag is then agreed over all ranks, so a step is skipped on all or on none;
- the step does not all-reduce gradients itself: FSDP2 reduced exactly those that were computed (parameters with
  ``requires_grad`` off in a pass get no gradient, and FSDP2 neither materialises nor reduces one for them).

Outside FSDP2 none of this applies: :func:`sharding_of` returns None and the step runs as on one device or DDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4 ships DTensor publicly; older builds have no FSDP2 either
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - the pinned torch has it
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter or its gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local shard of a ``DTensor`` (the same storage: in-place changes reach the parameter), or
    ``t`` itself when it is a plain tensor."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def locals_of(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor."""
    return [local(t) for t in tensors]


@dataclass(frozen=True)
class Sharding:
    """How the model's parameters are sharded: the process group their shards are spread over.

    Attributes:
        group: the shard group (FSDP2's data-parallel mesh dimension); a squared norm summed over it is the
            squared norm of the whole tensor.
        size: the number of ranks in ``group``.
    """

    group: dist.ProcessGroup
    size: int

    def arm_norms(self, local_squares: Tensor) -> Tensor:
        """Global per-arm norms from this rank's per-arm sums of squared local-shard norms (float32 ``(N,)``):
        ``sqrt(sum over the shard group)``, equal on every rank."""
        total = local_squares.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.sqrt_()

    def all_ranks(self, flag: Tensor) -> bool:
        """Whether ``flag`` (a 0-d bool tensor) holds on every rank of the default group (one host read)."""
        value = flag.to(torch.int32).reshape(1)
        if dist.get_backend() == "gloo" and value.device.type != "cpu":
            value = value.cpu()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())


def sharding_of(params: Sequence[Tensor], owner: str) -> Sharding | None:
    """The sharding of ``params``: None when none is a ``DTensor``; refuses layouts the step cannot reduce
    correctly (some parameters sharded and others not, several meshes, a mesh of more than one dimension, a
    placement other than ``Shard(0)``), naming the first offending parameter by its position."""
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        index = sharded.index(False)
        raise ValueError(
            f"{owner}: parameter {index} of the model is not sharded while others are; apply fully_shard to the "
            "root module too, so that FSDP2 owns and reduces every parameter"
        )
    meshes = {id(p.device_mesh) for p in params}  # type: ignore[attr-defined]
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    if len(meshes) != 1 or mesh.ndim != 1:
        raise ValueError(
            f"{owner}: the parameters are sharded over {len(meshes)} meshes of {mesh.ndim} dimensions; the step "
            "supports FSDP2 over one 1-D data-parallel mesh (HSDP and tensor parallelism are not supported)"
        )
    for index, p in enumerate(params):
        placements = tuple(p.placements)  # type: ignore[attr-defined]
        if placements != (Shard(0),):
            raise ValueError(
                f"{owner}: parameter {index} has placements {placements}; the step supports FSDP2's (Shard(0),)"
            )
    return Sharding(group=mesh.get_group(), size=mesh.size())


def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter of an Adam or AdamW optimizer the state its first step would create (step 0, zero
    moments), through the optimizer's own lazy initialisation; returns how many parameters got one.

    The following steps are bitwise those without it. Why: a sparse step leaves some parameters without
    optimizer state until they are first sampled, and torch's distributed checkpoint (what Lightning's and
    Fabric's ``ModelParallelStrategy`` save and load) loads into a template built by stepping a fresh optimizer
    on every parameter, so it refuses a checkpoint that lacks any parameter's state. Other optimizers are left
    as they are (0).
    """
    if not isinstance(optimizer, torch.optim.Adam) or not hasattr(optimizer, "_init_group"):
        return 0
    missing = {
        id(p)
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad and not optimizer.state.get(p)
    }
    if not missing:
        return 0
    grads = {p: p.grad for group in optimizer.param_groups for p in group["params"]}
    try:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p) if id(p) in missing else None
            for group in optimizer.param_groups:
                optimizer._init_group(group, [], [], [], [], [], [])
    finally:
        for p, grad in grads.items():
            p.grad = grad
    return len(missing)


def check_not_fsdp1(model: torch.nn.Module, owner: str) -> None:
    """Refuse a model wrapped in FSDP1 (``FullyShardedDataParallel``): its parameters are flattened into
    FlatParameters whose ``requires_grad`` is fixed at wrap time, so a step cannot leave arms out of a pass, and
    its original-parameter views do not show which rank holds what."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed support
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            f"{owner}: the model is wrapped in FSDP1 (FullyShardedDataParallel), which the step cannot run; shard "
            "it with FSDP2 instead (torch.distributed.fsdp.fully_shard, docs/guide/sharded.md)"
        )
