"""Quick start: fine-tune a small CNN on scikit-learn's digits with base AdamW, SAM and SL-SAM.

Offline, CPU, about a minute on 2 cores. Prints, per method, the best validation accuracy (mean over
seeds), the median training-step time as a ratio to base, and the mean active-parameter ratio.

    python experiments/digits_quickstart.py [--epochs 6] [--seeds 0 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_slsam import SAM, SLSAM, Base, SharpnessAware
from lightning_slsam.data import DigitsDataModule
from lightning_slsam.models import Classifier, SmallCNN

METHODS = {
    "base": lambda seed: Base(),
    "sam": lambda seed: SAM(rho=0.05),
    "slsam": lambda seed: SLSAM(rho=0.05, sparsity=0.5, seed=seed),
}


class StepTimer(pl.Callback):
    """Wall time of each training batch (seconds), excluding the first (warm-up) one."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > 1:
            self.times.append(time.perf_counter() - self._start)


class BestMetric(pl.Callback):
    """The best value of a logged validation metric over epochs (sanity-check runs excluded)."""

    def __init__(self, key: str = "val/acc") -> None:
        self.key = key
        self.best = float("-inf")

    def on_validation_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking and self.key in trainer.callback_metrics:
            self.best = max(self.best, float(trainer.callback_metrics[self.key]))


def run(method: str, seed: int, epochs: int) -> dict[str, float]:
    pl.seed_everything(seed, workers=True, verbose=False)
    data = DigitsDataModule(batch_size=32, train_limit=400, label_noise=0.1, seed=seed)
    model = Classifier(SmallCNN(), num_classes=10, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
    timer = StepTimer()
    callback: SharpnessAware = METHODS[method](seed)
    best = BestMetric()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[callback, timer, best],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, data)
    return {
        "best_val_acc": best.best,
        "median_step_s": statistics.median(timer.times),
        "active_ratio": callback.mean_active_ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", help="also write the per-run records to this file")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    records = []
    for seed in args.seeds:  # methods interleaved within a seed, so machine noise hits them alike
        for method in args.methods:
            result = run(method, seed, args.epochs)
            records.append({"method": method, "seed": seed, **result})
            print(f"{method:>6} seed {seed}: val acc {result['best_val_acc']:.4f}", flush=True)

    base_time = statistics.median(r["median_step_s"] for r in records if r["method"] == "base")
    print("\n| method | best val acc (mean) | step time / base | active-parameter ratio |")
    print("|---|---|---|---|")
    for method in args.methods:
        rows = [r for r in records if r["method"] == method]
        acc = statistics.mean(r["best_val_acc"] for r in rows)
        ratio = statistics.median(r["median_step_s"] for r in rows) / base_time
        active = statistics.mean(r["active_ratio"] for r in rows)
        print(f"| {method} | {acc:.4f} | {ratio:.2f}x | {active:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
