"""A sharpness-aware callback under Lightning's ``ModelParallelStrategy`` (FSDP2 via ``configure_model``) on 2 CPU
processes (gloo), or on one process for the reference; each rank dumps the whole weights and the sampler.

    python fsdp2_lightning.py OUT_DIR STRATEGY METHOD STEPS [SAVE_AT | RESUME_FROM]

STRATEGY is fsdp2 (2 processes; Lightning's launcher re-executes this script for rank 1) or single. METHOD is a
registered method name (slsam, slsam_noisy, sam, ...). Epochs have 3 steps; the run lasts STEPS // 3 epochs. With
an int SAVE_AT, ModelCheckpoint saves at the end of each epoch (``OUT_DIR/at<step>.ckpt``: a distributed
checkpoint folder under fsdp2); with a path the run resumes from that checkpoint. Every rank seeds its global RNG
differently: the arms agree only through the broadcast seed and the global norms (``check_ranks=True`` checks
them every step). Run by tests/test_sharded.py.
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_slsam import SharpnessAwareMixin
from lightning_slsam.lightning_adapter.callback import callback_class

BATCH = 8


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh()), nn.Sequential(nn.Linear(12, 12), nn.Tanh())]
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Net(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Body()

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process: nothing to shard
            return
        # FSDP2 gathers a module's parameters when its forward is called: shard the model compute_loss calls
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-2, weight_decay=0.01)


class Dump(pl.Callback):
    def __init__(self, out: str, method_callback: pl.Callback) -> None:
        self.out, self.method_callback = out, method_callback

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {}
        for name, p in pl_module.named_parameters():
            value = p.detach()
            params[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
        probs = self.method_callback.probabilities()
        state = {
            "params": params,
            "probs": None if probs is None else probs.clone(),
            "counts": self.method_callback.selection_counts.clone(),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "sharded": type(next(pl_module.parameters())).__name__,
        }
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main() -> None:
    out, strategy, method, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    extra = sys.argv[5] if len(sys.argv) > 5 else None
    save_at = int(extra) if extra is not None and extra.isdigit() else None
    resume = extra if extra is not None and not extra.isdigit() else None
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    # epochs of 3 steps: a checkpoint at an epoch's end resumes at the next epoch's first batch
    data = TensorDataset(torch.randn(BATCH * 3, 6), torch.randint(0, 5, (BATCH * 3,)))
    model = Net()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(100 + rank)  # ranks disagree from here on
    kwargs = {"rho": 0.05, "check_ranks": True}
    if method.startswith("slsam"):
        kwargs["sparsity"] = 0.4
    callback = callback_class(method)(**kwargs)
    world = 1 if strategy == "single" else 2
    # rank r takes rows r, r + 2, ... of each global batch of 8: the union of a step's two halves is the batch a
    # single process takes
    sampler = DistributedSampler(data, world, rank if world > 1 else 0, shuffle=False)
    loader = DataLoader(data, batch_size=BATCH // world, sampler=sampler)
    checkpoints = (
        [ModelCheckpoint(out, "at{step}", auto_insert_metric_name=False, save_top_k=-1, every_n_epochs=1)]
        if save_at is not None
        else []
    )
    trainer = pl.Trainer(
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=world,
        strategy=(
            "auto"
            if world == 1
            else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
        ),
        max_steps=-1,
        max_epochs=steps // 3,
        callbacks=[callback, Dump(out, callback), *checkpoints],
        logger=False,
        enable_checkpointing=save_at is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader, ckpt_path=resume)


if __name__ == "__main__":
    main()
