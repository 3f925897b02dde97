"""``RNGState``: the global random-number generators' states in the checkpoint, restored when training resumes.

Dropout and random augmentation in the main process draw from the global generators (torch's CPU and CUDA
generators, NumPy's, Python's ``random``). Lightning does not checkpoint them, so a resumed run would draw
other numbers than the uninterrupted one. This callback saves them with every checkpoint and puts them back
at ``on_train_start`` of the resumed fit, after Lightning's sanity check (which draws numbers of its own)
and before the first batch. Pair it with a loader that draws nothing from the global generators when an
iterator is created (:class:`~lightning_slsam.data.resumable_loader.ResumableDataLoader`).

Single process: under DDP the checkpoint holds rank 0's states only.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


def capture_rng_states() -> dict[str, Any]:
    """The states of torch's CPU (and, when initialised, CUDA) generators, NumPy's and Python's.

    Only tensors, ints and lists, so that ``torch.load(weights_only=True)`` reads them back.
    """
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()  # type: ignore[misc]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss)],
        "numpy_gaussian": float(cached_gaussian),
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, key, pos, has_gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, states["numpy_gaussian"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RNGState(pl.Callback):
    """Saves the global RNG states with every checkpoint; a resumed fit continues their streams exactly."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            restore_rng_states(self._loaded)
            self._loaded = None
