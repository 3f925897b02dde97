"""Train a tiny model with a sharpness-aware callback on 2 CPU processes (gloo); each rank dumps its state.

    python ddp_train.py OUT_DIR STRATEGY METHOD STEPS SHUFFLE BATCH_SIZE

STRATEGY is ddp or ddp_spawn (2 processes) or single (1 process, for reference runs); METHOD slsam, sam or
plain; SHUFFLE 0 or 1.

Run by tests/test_distributed.py. Every rank seeds its global RNG differently, so the sampler seeds agree
only because the callback broadcasts rank 0's; the callback checks every step that all ranks picked the
same arms (check_ranks=True).
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_slsam import SAM, SLSAM, Base, SharpnessAwareMixin


class Net(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def compute_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class Dump(pl.Callback):
    def __init__(self, out: str, method_callback) -> None:
        self.out = out
        self.method_callback = method_callback

    def on_train_end(self, trainer, pl_module) -> None:
        probs = self.method_callback.probabilities()
        state = {
            "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "probs": probs,
            "counts": self.method_callback.selection_counts.clone(),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
        }
        torch.save(state, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main() -> None:
    out, strategy, method, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    shuffle, batch_size = sys.argv[5] == "1", int(sys.argv[6])
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(512, 6), torch.randint(0, 3, (512,)))
    model = Net()
    torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))  # ranks disagree from here on
    callback = {
        "slsam": lambda: SLSAM(rho=0.05, sparsity=0.4, check_ranks=True),
        "sam": lambda: SAM(rho=0.05, check_ranks=True),
        "plain": lambda: Base(check_ranks=True),
    }[method]()
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    own_sampler = strategy == "ddp" and not shuffle  # Lightning's DistributedSampler always shuffles training data
    if own_sampler:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        loader = DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, 2, rank, shuffle=False))
    trainer = pl.Trainer(
        use_distributed_sampler=not own_sampler,
        accelerator="cpu",
        devices=1 if strategy == "single" else 2,
        strategy="auto" if strategy == "single" else strategy,
        max_steps=steps,
        callbacks=[callback, Dump(out, callback)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
