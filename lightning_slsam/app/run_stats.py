"""Measurements of one training run for its results record: step time, peak memory, best metric."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch

#: fits started in this process (a Hydra multirun runs its jobs one after another in one process)
_fits_started = 0


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class RunStats(pl.Callback):
    """Wall time of each optimizer step, peak memory and the best value of a validation metric.

    Args:
        metric: the logged validation metric to track, higher is better (default ``val/acc``).
        warmup_steps: optimizer steps left out of the timing at the start of each fit (default 2: first-call
            overheads, which a resumed process pays again).

    Step time covers ``on_train_batch_start`` to ``on_train_batch_end`` of batches that ended with an
    optimizer step (with accumulation, the buffered micro-batches' time is added to their step), with a
    CUDA synchronisation at both ends on a GPU. Peak memory is CUDA's max allocated (MiB) on a GPU, whose
    counter is reset at each fit's start, else the growth of the process's peak RSS during fit (MiB), measured at
    every validation and at the end. The peak RSS cannot be reset: in a process that already ran a fit (the later
    jobs of a Hydra multirun) it is already at the earlier fit's peak and the growth says nothing about this run,
    so :attr:`peak_memory_shared_process` is then True and reports leave the value out.

    Everything measured is part of the checkpoint (``state_dict``), so after a resume the numbers cover the
    whole run: the step times of both parts, the best metric over all validations, the larger peak.
    """

    def __init__(self, metric: str = "val/acc", warmup_steps: int = 2) -> None:
        self.metric = metric
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.best = float("-inf")
        self.last = float("nan")
        self._pending = 0.0
        self._start = 0.0
        self._rss_start = 0.0
        self._fit_start_step = 0
        self.peak_memory_mb = 0.0
        #: the CPU peak memory was measured in a process that had already run a fit: not this run's footprint
        self.peak_memory_shared_process = False

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        global _fits_started
        _fits_started += 1
        self._rss_start = _peak_rss_mb()
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        else:  # once True (a part of the run shared its process), a resumed run keeps it
            self.peak_memory_shared_process = self.peak_memory_shared_process or _fits_started > 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start_step = trainer.global_step  # after a checkpoint was restored

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._start = time.perf_counter()
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._pending += time.perf_counter() - self._start
        if trainer.global_step > self._step_before:  # this batch ended an optimizer step
            if trainer.global_step - self._fit_start_step > self.warmup_steps:
                self.step_times.append(self._pending)
            self._pending = 0.0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.measure_peak_memory(trainer)
        if self.metric not in trainer.callback_metrics:
            return
        self.last = float(trainer.callback_metrics[self.metric])
        self.best = max(self.best, self.last)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measure_peak_memory(trainer)

    def measure_peak_memory(self, trainer: pl.Trainer) -> None:
        """Raise ``peak_memory_mb`` to the peak so far of this process (a resumed run keeps the larger)."""
        if trainer.strategy.root_device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20
        else:
            peak = max(0.0, _peak_rss_mb() - self._rss_start)
        self.peak_memory_mb = max(self.peak_memory_mb, peak)

    # --- checkpoints: a resumed run's record covers the whole run ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step_times": list(self.step_times),
            "best": self.best,
            "last": self.last,
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_shared_process": self.peak_memory_shared_process,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_times = [float(t) for t in state_dict.get("step_times", [])]
        self.best = float(state_dict.get("best", float("-inf")))
        self.last = float(state_dict.get("last", float("nan")))
        self.peak_memory_mb = float(state_dict.get("peak_memory_mb", 0.0))
        shared = bool(state_dict.get("peak_memory_shared_process", False))
        self.peak_memory_shared_process = self.peak_memory_shared_process or shared

    @property
    def median_step_time_s(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")

    @property
    def mean_step_time_s(self) -> float:
        return statistics.fmean(self.step_times) if self.step_times else float("nan")
