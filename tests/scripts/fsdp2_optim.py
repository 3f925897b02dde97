"""``lightning_slsam.optim`` on a model sharded with torch FSDP2 (``fully_shard``) over 2 CPU processes (gloo).

    python fsdp2_optim.py OUT_DIR STEPS

Each rank first trains every method in one process on whole batches of 8 (the reference, before the process
group exists), then, in the group, the same method on a ``fully_shard``-ed copy with its half of every batch.
Each rank seeds its global RNG differently and no method gets a sampler seed, so arms agree only because the
seed is broadcast and the norms are global. It also runs: a step made non-finite on rank 0 only, in a
parameter whose gradient lies on rank 1's shard; a save after 2 steps and a resume that must continue
bitwise; a method that cannot run sharded. Each rank writes ``rank<r>.pt``. Run by tests/test_sharded.py.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_slsam import optim

WORLD = 2
BATCH = 8
#: optim class and arguments; every method that runs on sharded parameters
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("Base", {}),
    "sam": ("SAM", {"rho": 0.05}),
    "slsam": ("SLSAM", {"rho": 0.05, "sparsity": 0.4, "check_ranks": True}),
    "slsam_noisy": ("SLSAMNoisy", {"rho": 0.05, "sparsity": 0.4, "check_ranks": True}),
    "rst": ("RST", {"rho": 0.05}),
    # the sparse ascent with a dense update: pass 2 and the optimizer on every arm
    "slsam_plus": ("SLSAMPlus", {"rho": 0.05, "sparsity": 0.4, "check_ranks": True}),
}


class Net(nn.Module):
    """Two blocks with a LayerNorm and a head of 5 outputs (rows split 3 + 2 over two ranks), and ``extra``: a
    vector that only a fault injection's loss term uses, its last entry on rank 1's shard."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh()), nn.Sequential(nn.Linear(12, 12), nn.Tanh())]
        )
        self.head = nn.Linear(12, 5)
        self.extra = nn.Parameter(torch.zeros(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        return self.head(x), self.extra * 1.0


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH * steps, 6, generator=generator), torch.randint(
        0, 5, (BATCH * steps,), generator=generator
    )


def build(world: int) -> Net:
    torch.manual_seed(0)
    model = Net()
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from the shards)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        out[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def loss_of(
    model: Net, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor | None, calls: list[int]
) -> torch.Tensor:
    """The closure's loss; ``poison`` (if any) enters on its second call (pass 2)."""
    calls[0] += 1
    logits, extra = model(x)
    loss = F.cross_entropy(logits, y) + 0.0 * extra.sum()
    return loss if poison is None or calls[0] != 2 else loss + (extra * poison).sum()


def train(
    method: str, rank: int, world: int, steps: int, fault_at: int | None = None, state: dict | None = None
) -> tuple[dict[str, Any], Any, Net]:
    model = build(world)
    x, y = data(steps)
    torch.manual_seed(100 + rank)  # different global RNG per rank: sampler seeds must come from rank 0
    cls, kwargs = METHODS[method]
    opt = getattr(optim, cls)(model, torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.01), **kwargs)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    with_grad: list[list[bool]] = []  # per step: which parameters reach the optimizer step with a gradient
    opt.base_optimizer.register_step_pre_hook(
        lambda *_: with_grad.append([p.grad is not None for p in model.parameters()])
    )
    share = BATCH // world
    arms, stepped, skipped, saved = [], [], [], None
    for step in range(steps):
        if state is None and step == 2:
            # written and read back as a per-rank checkpoint file would be (state_dict() shares live storage)
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=False)
        rows = slice(BATCH * step + share * rank, BATCH * step + share * (rank + 1))
        # pass 2 of the faulty step on rank 0: an inf gradient in the entry of ``extra`` that rank 1's shard holds
        poison = torch.tensor([0.0, 0.0, 0.0, 0.0, float("inf")]) if step == fault_at and rank == 0 else None
        opt.step(lambda rows=rows, poison=poison, calls=[0]: loss_of(model, x[rows], y[rows], poison, calls))
        opt.zero_grad()
        assert opt.last_step is not None
        arms.append(opt.last_step.active1.clone())
        # the arms whose gradient the optimizer stepped: pass 2's, or pass 1's on a one-pass step
        second = opt.last_step.active2
        stepped.append((opt.last_step.active1 if second is None else second).clone())
        skipped.append(opt.last_step.skipped)
    probs = opt.method.probabilities()
    record = {
        "params": full(model),
        "arms": torch.stack(arms),
        "stepped": torch.stack(stepped),
        "skipped": skipped,
        "with_grad": torch.tensor(with_grad),
        "param_arm": opt.layout.param_arm.clone(),
        "probs": None if probs is None else probs.clone(),
    }
    return record, saved, model


def run(rank: int, out: str, steps: int) -> None:
    result: dict[str, Any] = {"init": full(build(1)), "single": {m: train(m, 0, 1, steps)[0] for m in METHODS}}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result["sharded"] = {m: train(m, rank, WORLD, steps)[0] for m in METHODS}
    result["fault"] = train("slsam_noisy", rank, WORLD, 4, fault_at=1)[0]
    result["fault_single"] = train("slsam_noisy", rank, WORLD, 4, fault_at=None)[0]
    # save after 2 of 4 steps (the model's and the optimizer's sharded state), resume into fresh objects
    whole, saved, _ = train("slsam_noisy", rank, WORLD, 4)
    torch.manual_seed(999)
    x, y = data(4)
    resumed_model = build(WORLD)
    cls, kwargs = METHODS["slsam_noisy"]
    opt = getattr(optim, cls)(
        resumed_model, torch.optim.AdamW(resumed_model.parameters(), lr=2e-2, weight_decay=0.01), **kwargs
    )
    resumed_model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    share = BATCH // WORLD
    for step in range(2, 4):
        rows = slice(BATCH * step + share * rank, BATCH * step + share * (rank + 1))
        opt.step(lambda rows=rows: loss_of(resumed_model, x[rows], y[rows], None, [0]))
        opt.zero_grad()
    result["resume"] = {"whole": whole["params"], "resumed": full(resumed_model)}
    try:
        model = build(WORLD)
        optim.ASAM(model, torch.optim.AdamW(model.parameters()), rho=0.5)
        result["refused"] = None
    except ValueError as error:
        result["refused"] = str(error)
    result["world_size"] = dist.get_world_size()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    mp.start_processes(run, args=(out, steps), nprocs=WORLD, join=True, start_method="fork")
