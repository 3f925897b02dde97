"""Per-arm sampling probabilities (SL-SAM) for the loggers.

Every step, through ``self.log`` (so every logger, CSV included, gets it): a compact summary,

- ``train/prob_min``, ``train/prob_max``: the smallest and largest per-arm probability;
- ``train/prob_entropy``: the entropy of the probabilities normalised to sum to 1, divided by ``log N``
  (N arms): 1 when every arm is equally likely, towards 0 as the sampling concentrates on few arms.

At each training epoch end, on a TensorBoard logger: a histogram of the per-arm probabilities
(``train/arm_probabilities``), a heatmap image of their history, arms top to bottom in layout order and steps
left to right (``train/arm_probabilities_heatmap``; dark blue 0, yellow 1), and a text with the arm names in
that order (``train/arm_names``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

SUMMARY_KEYS = ("train/prob_min", "train/prob_max", "train/prob_entropy")
HISTOGRAM_TAG = "train/arm_probabilities"
HEATMAP_TAG = "train/arm_probabilities_heatmap"
NAMES_TAG = "train/arm_names"
MAX_COLUMNS = 512  # longer histories are averaged into this many columns
MAX_CELL_PX = 8
TARGET_PX = 256  # the heatmap's cells grow to about this size, within MAX_CELL_PX
# five stops of matplotlib's viridis (RGB in [0, 1]), so the image needs no plotting library
_VIRIDIS = torch.tensor(
    [[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551], [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]]
)


def summary(probs: Tensor) -> dict[str, float]:
    """``train/prob_min``, ``train/prob_max`` and ``train/prob_entropy`` (normalised, in [0, 1]) of ``probs``."""
    p = probs.detach().to(torch.float64).flatten()
    share = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1.0 / max(1, p.numel()))
    entropy = float(-(share * share.clamp_min(1e-300).log()).sum())
    normalised = entropy / math.log(p.numel()) if p.numel() > 1 else 1.0
    return {SUMMARY_KEYS[0]: float(p.min()), SUMMARY_KEYS[1]: float(p.max()), SUMMARY_KEYS[2]: normalised}


def heatmap_image(history: Tensor) -> Tensor:
    """An RGB image ``(3, H, W)`` in [0, 1] of ``history`` ``(records, arms)``: arms as rows, records as columns."""
    grid = history.detach().to(torch.float32).t().clamp(0.0, 1.0)  # (arms, records)
    arms, records = grid.shape
    if records > MAX_COLUMNS:  # average neighbouring records into MAX_COLUMNS columns
        grid = torch.nn.functional.adaptive_avg_pool1d(grid.unsqueeze(0), MAX_COLUMNS).squeeze(0)
        records = MAX_COLUMNS
    height = min(MAX_CELL_PX, max(1, TARGET_PX // arms))
    width = min(MAX_CELL_PX, max(1, TARGET_PX // records))
    grid = grid.repeat_interleave(height, dim=0).repeat_interleave(width, dim=1)
    position = grid * (len(_VIRIDIS) - 1)
    low = position.floor().long().clamp(max=len(_VIRIDIS) - 2)
    weight = (position - low).unsqueeze(-1)
    rgb = _VIRIDIS[low] * (1 - weight) + _VIRIDIS[low + 1] * weight  # (H, W, 3)
    return rgb.permute(2, 0, 1).contiguous()


def log_epoch(
    loggers: Sequence[Any], probs: Tensor | None, history: Tensor | None, names: Sequence[str], step: int
) -> None:
    """At an epoch end: the histogram and the heatmap image to each TensorBoard logger (others get nothing)."""
    if probs is None:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        writer.add_histogram(HISTOGRAM_TAG, probs.detach().to(torch.float32), step)
        if history is not None and len(history):
            writer.add_image(HEATMAP_TAG, heatmap_image(history), step, dataformats="CHW")
        rows = "\n".join(f"| {i} | `{name}` |" for i, name in enumerate(names))
        writer.add_text(NAMES_TAG, f"| row | arm |\n|---|---|\n{rows}", step)
