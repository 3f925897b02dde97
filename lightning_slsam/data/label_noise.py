"""Label noise for the training split: a fraction of the labels replaced by a random *other* class.

The classic setting in which SAM's gain over the base optimizer shows (Foret et al. 2021, noisy CIFAR labels):
trained long enough, the base optimizer fits the wrong labels and its validation accuracy falls; the validation
split always keeps its true labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def check_label_noise(fraction: float) -> float:
    """Validate a noise fraction; errors name ``label_noise``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"label_noise: must lie in [0, 1), got {fraction!r}")
    return float(fraction)


def add_label_noise(labels: Tensor, fraction: float, num_classes: int, rng: np.random.Generator) -> Tensor:
    """A copy of ``labels`` (int64) where each entry, with probability ``fraction``, becomes another class.

    Draws ``rng.random(n)`` (which entries change) and then ``rng.integers(1, num_classes, n)`` (the shift to
    another class, modulo ``num_classes``), in that order, so a given generator state gives the same noise.
    """
    noisy = labels.clone()
    if fraction <= 0 or num_classes < 2:
        return noisy
    flip = torch.from_numpy(rng.random(len(labels)) < fraction)
    shift = torch.from_numpy(rng.integers(1, num_classes, len(labels)))
    noisy[flip] = (noisy[flip] + shift[flip]) % num_classes
    return noisy
