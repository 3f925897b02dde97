"""scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes): real data that needs no network."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_slsam.data.label_noise import add_label_noise, check_label_noise
from lightning_slsam.data.resumable_loader import ResumableDataModule
from lightning_slsam.loading.optional_dependencies import import_optional


class DigitsDataModule(ResumableDataModule):
    """Digits split into train / validation with a fixed seed.

    Args:
        batch_size: images per training batch (default 64).
        val_fraction: share of the 1,797 images held out for validation, in (0, 1) (default 0.2).
        image_size: side in pixels the 8x8 images are resized to (bilinear; default 8 = unchanged).
        channels: 1 (grey, default) or 3 (repeated, for ImageNet/CIFAR-shaped models).
        train_limit: keep only this many training images (None = all), to make the task harder.
        label_noise: fraction of training labels replaced by a random other class, in [0, 1) (default 0).
        seed: the split / subset / noise seed, and the shuffle's (default 0).

    The training loader shuffles with a permutation of ``(seed, epoch)`` and its position is part of the
    checkpoint, so a resumed run continues the order of an uninterrupted one (``resumable_loader.py``).
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        image_size: int = 8,
        channels: int = 1,
        train_limit: int | None = None,
        label_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: must lie in (0, 1), got {val_fraction!r}")
        if image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels: must be 1 or 3, got {channels!r}")
        if train_limit is not None and train_limit < 1:
            raise ValueError(f"train_limit: must be >= 1 or None, got {train_limit!r}")
        check_label_noise(label_noise)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.channels = channels
        self.train_limit = train_limit
        self.label_noise = label_noise
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = import_optional("sklearn.datasets", "DigitsDataModule (scikit-learn's digits)").load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        images = (images - 0.5) / 0.5
        if self.image_size != 8:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.expand(-1, self.channels, -1, -1).contiguous()
        labels = torch.tensor(digits.target, dtype=torch.long)
        rng = np.random.default_rng(self.seed)
        order = torch.from_numpy(rng.permutation(len(labels)))
        num_val = round(len(labels) * self.val_fraction)
        val_idx, train_idx = order[:num_val], order[num_val:]
        if self.train_limit is not None:
            train_idx = train_idx[: self.train_limit]
        train_labels = add_label_noise(labels[train_idx], self.label_noise, self.num_classes, rng)
        self.train_set = TensorDataset(images[train_idx], train_labels)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self.resumable_train_loader(self.train_set, batch_size=self.batch_size, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=256)
