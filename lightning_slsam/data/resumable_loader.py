"""A training loader whose position is part of the checkpoint, so that a resumed run sees the batches an
uninterrupted run would have seen, at an epoch boundary and in the middle of an epoch.

- :class:`ResumableSampler`: ``DistributedSampler``'s shuffle, a permutation that is a function of
  ``(seed, epoch)`` only (Lightning calls ``set_epoch`` before every epoch), split over the DDP ranks; it
  can start part-way through its epoch. Being a ``DistributedSampler``, Lightning keeps it under DDP
  instead of wrapping it.
- :class:`ResumableDataLoader`: a ``DataLoader`` over that sampler that counts the batches it has handed
  out in the current epoch and has ``state_dict`` / ``load_state_dict`` (``{"epoch", "batches", ...}``).
  Lightning's fit loop saves that state in checkpoints; resuming skips the batches already trained on.
  Its own generator, reseeded from ``(seed, epoch)`` at each epoch, seeds the workers, so creating an
  iterator draws nothing from the global RNG and worker seeds do not depend on where a run was resumed.
- :class:`ResumableDataModule`: a ``LightningDataModule`` base whose ``state_dict`` holds its training
  loader's state, restored before the loader is built. This second path also covers Lightning's case
  where the loader is built before the checkpoint's loop state is read (``configure_optimizers`` asking
  for ``trainer.estimated_stepping_batches``: Lightning issue 20550), which skips the loader's own restore.

The count is exact because Lightning does not prefetch from a loader with a length: when a checkpoint is
written after batch i, the loader has handed out exactly i + 1 batches of the epoch. Mid-epoch resume is
bitwise exact with ``num_workers=0``, or with workers whose dataset draws no random numbers (workers
restart from their epoch's seed); at an epoch boundary it is exact either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices of ``dataset``: a permutation of ``(seed, epoch)``, split over ranks.

    Args:
        dataset: a map-style dataset with a length.
        seed: the shuffle seed; epoch e uses ``randperm(len, seed + e)`` (``DistributedSampler``'s rule).
        shuffle: shuffle (default True) or keep the dataset's order.

    The rank and the number of ranks come from ``torch.distributed`` when it is initialised, else 1 rank.
    ``start`` (samples of this rank's share) skips the head of the next iteration only, then resets to 0.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=int(seed),
            drop_last=False,
        )
        #: samples of this rank's share to skip at the start of the next iteration (one-shot)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` over a :class:`ResumableSampler` that Lightning can checkpoint and resume.

    Args:
        dataset: a map-style dataset with a length.
        batch_size: samples per batch (>= 1).
        seed: the shuffle seed (the permutation of epoch e is a function of ``seed + e``).
        shuffle: shuffle (default True).
        sampler: leave None (Lightning passes one when it replaces the sampler, e.g. ``overfit_batches``;
            the loader then iterates that sampler and its position is not resumable).
        kwargs: any other ``DataLoader`` argument (``collate_fn``, ``num_workers``, ``pin_memory`` ...).

    ``state_dict()``: ``{"epoch", "batches", "batch_size", "num_samples", "seed"}``, the batches handed out in
    that epoch. ``load_state_dict(state)``: the next iteration, if it is of the same epoch, skips those
    batches (refused, naming what changed, if the batch size, the dataset's length or the seed differ).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        sampler: Sampler | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("generator", None)
        self.seed = int(seed)
        own_sampler = sampler is None
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, self.seed, shuffle) if own_sampler else sampler,
            generator=torch.Generator(),
            **kwargs,
        )
        self.resumable = own_sampler
        self._epoch = 0
        self._batches = 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: the position is read at the first batch, after Lightning's set_epoch and state restore.
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = int(self.sampler.epoch) if isinstance(self.sampler, ResumableSampler) else 0
        start = self._start_of(epoch)
        self._resume = None
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.start = start * int(self.batch_size or 1)
        self._epoch, self._batches = epoch, start
        # worker seeds are a function of (seed, epoch), not of how many iterators came before
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)  # type: ignore[union-attr]
        for batch in super().__iter__():
            self._batches += 1  # counted when handed out: a checkpoint after this batch says it was trained on
            yield batch

    def _start_of(self, epoch: int) -> int:
        """Batches of ``epoch`` to skip: those the loaded state says were trained on, if it is that epoch."""
        state = self._resume
        if state is None or not self.resumable or int(state["epoch"]) != epoch or int(state["batches"]) == 0:
            return 0
        here = {"batch_size": self.batch_size, "num_samples": len(self.sampler), "seed": self.seed}  # type: ignore[arg-type]
        changed = {key: (state[key], value) for key, value in here.items() if key in state and state[key] != value}
        if changed:
            what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            raise ValueError(
                f"train loader: the checkpoint stopped part-way through epoch {epoch}, but the data changed ({what}); "
                "resume with the same data settings, or from a checkpoint at an epoch boundary"
            )
        return int(state["batches"])

    def state_dict(self) -> dict[str, Any]:
        """The position: the epoch of the current (or last) iteration and the batches handed out in it."""
        if self._resume is not None:  # restored, not iterated yet: pass the restored position on
            return dict(self._resume)
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "batch_size": self.batch_size,
            "num_samples": len(self.sampler),  # type: ignore[arg-type]
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (what ``state_dict`` returned) at the next iteration."""
        if state:
            self._resume = dict(state)


class ResumableDataModule(pl.LightningDataModule):
    """A ``LightningDataModule`` whose checkpoint state is its training loader's position.

    Build the training loader with :meth:`resumable_train_loader`; ``state_dict`` / ``load_state_dict``
    (which Lightning calls with checkpoints) carry its position, restored into the next loader built.
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict[str, Any] | None = None

    def resumable_train_loader(self, dataset: Dataset, batch_size: int, seed: int, **kwargs: Any) -> DataLoader:
        """A shuffling :class:`ResumableDataLoader` that continues from a restored position, if any."""
        loader = ResumableDataLoader(dataset, batch_size=batch_size, seed=seed, shuffle=True, **kwargs)
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def train_batches_per_epoch(self) -> int:
        """The training loader's batches per epoch on this process (``setup`` first), counted on a loader built for
        the purpose: the loader training uses, and any position restored for it, are left as they were."""
        kept = (self._train_loader, self._train_loader_state)
        try:
            return len(self.train_dataloader())
        finally:
            self._train_loader, self._train_loader_state = kept

    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        return {"train_loader": self._train_loader_state} if self._train_loader_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader") or None
        if self._train_loader is not None and state is not None:  # a loader already built continues from it
            self._train_loader.load_state_dict(state)
        else:  # else the next loader built does
            self._train_loader_state = state
