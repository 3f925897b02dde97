"""SSAM-F's Fisher samples drawn from a Lightning Trainer's training data (the callback's side of
:mod:`lightning_slsam.methods.fisher_score`, which scores them without Lightning)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_slsam.methods.fisher_score import first_samples


def draw_training_samples(trainer: pl.Trainer, module: nn.Module, num_samples: int) -> list[Any]:
    """The first ``num_samples`` samples of a fresh iteration of the Trainer's training data, on the device.

    Returns batches as the training step would receive them (same collation, ``convert_input``, batch transfer
    hooks and device), the last one cut so that exactly ``num_samples`` samples are returned (fewer, with a
    warning, when the loader holds fewer). Combined loaders are iterated in the fit loop's mode; a loader with
    persistent workers is copied without workers, so that the fit loop's workers are left alone; the loaders'
    own generators are put back afterwards (the global RNG is the caller's, see ``preserved_rng``).
    """
    iterables = getattr(trainer, "train_dataloader", None)
    if iterables is None:
        raise RuntimeError("ssam_f: the Trainer has no training dataloader to draw the Fisher samples from")
    mode = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "_mode", "max_size_cycle")
    combined = CombinedLoader(iterables, mode=mode if mode != "sequential" else "max_size_cycle")
    loaders = [_independent_loader(dl) for dl in combined.flattened]
    combined.flattened = loaders
    generators = [g for dl in loaders for g in _generators_of(dl)]
    states = [g.get_state() for g in generators]
    try:
        return first_samples(
            (batch for batch, _, _ in combined), num_samples, lambda batch: _to_device(trainer, module, batch)
        )
    finally:
        for g, s in zip(generators, states, strict=True):
            g.set_state(s)


def _independent_loader(loader: Any) -> Any:
    """``loader``, or a single-process copy when its persistent workers would be shared with the fit loop."""
    if not (isinstance(loader, DataLoader) and loader.num_workers > 0 and loader.persistent_workers):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn
        )
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)


def _generators_of(loader: Any) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _to_device(trainer: pl.Trainer, module: nn.Module, batch: Any) -> Any:
    """What Lightning's training loop does to a batch before ``training_step``."""
    precision = getattr(trainer, "precision_plugin", None)
    if precision is not None:
        batch = precision.convert_input(batch)
    if hasattr(module, "_on_before_batch_transfer"):
        batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and hasattr(strategy, "batch_to_device"):
        return strategy.batch_to_device(batch, dataloader_idx=0)
    return move_data_to_device(batch, next(module.parameters()).device)
