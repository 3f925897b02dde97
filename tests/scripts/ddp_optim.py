"""Train a tiny model with ``lightning_slsam.optim`` in plain loops on 2 CPU processes (gloo, DDP-wrapped model).

    python ddp_optim.py OUT_DIR STEPS

Each of the two ranks first trains the base optimizer (``Base``) alone on whole batches of 16 (the reference,
before the process group exists), then, in the group, ``Base`` and ``SLSAM`` on a DDP-wrapped copy with half
of every batch. Each rank seeds its global RNG differently and SL-SAM gets no sampler seed, so the samplers
agree only because the seed is broadcast from rank 0; ``check_ranks=True`` checks the arms every step. Each
rank writes ``rank<r>.pt``. Run by tests/test_optim.py.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_slsam import optim

WORLD = 2


def run(method: str, rank: int, world: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16 * steps, 6, generator=generator)
    y = torch.randint(0, 3, (16 * steps,), generator=generator)
    torch.manual_seed(100 + rank)  # different global RNG per rank: the sampler seed must come from rank 0
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    kwargs = {"rho": 0.1, "sparsity": 0.4, "check_ranks": True} if method == "SLSAM" else {}
    opt = getattr(optim, method)(net, torch.optim.AdamW(model.parameters(), lr=1e-2), **kwargs)
    share = 16 // world
    for step in range(steps):
        batch = slice(16 * step + share * rank, 16 * step + share * (rank + 1))
        opt.step(lambda batch=batch: F.cross_entropy(net(x[batch]), y[batch]))
        opt.zero_grad()
    probs = opt.method.probabilities()
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "probs": None if probs is None else probs.clone(),
    }


def train(rank: int, out: str, steps: int) -> None:
    state = {"single": run("Base", 0, 1, steps)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    state["plain"] = run("Base", rank, WORLD, steps)
    state["slsam"] = run("SLSAM", rank, WORLD, steps)
    state["world_size"] = dist.get_world_size()
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 2000)
    mp.start_processes(train, args=(out, steps), nprocs=WORLD, join=True, start_method="fork")
