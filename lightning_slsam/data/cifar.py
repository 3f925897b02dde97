"""CIFAR-10 / CIFAR-100 from the official "python version" files (torchvision's on-disk layout).

The pickled batches are read directly (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``;
``cifar-100-python/train``, ``test``), so a copy made elsewhere, or a small stand-in with the same layout, loads
without torchvision's md5 check; ``verify=True`` runs that check. ``download=True`` fetches the archive with
torchvision in ``prepare_data`` (needs a network).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_slsam.data.resumable_loader import ResumableDataModule
from lightning_slsam.loading.network_access import NetworkUnavailableError

CIFAR_SIZE = 32


@dataclass(frozen=True)
class CIFARLayout:
    """Where one CIFAR variant's files lie and how its labels are keyed."""

    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str


CIFAR_LAYOUTS: dict[str, CIFARLayout] = {
    "cifar10": CIFARLayout(
        10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels"
    ),
    "cifar100": CIFARLayout(100, "cifar-100-python", ("train",), ("test",), "fine_labels"),
}

#: input normalisations (mean, std per RGB channel)
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # what akamaster's pretrained ResNet-20 (resnet20_cifar(weights="packaged")) and torchvision expect
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # CIFAR-10's training-set statistics
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # timm's augreg ViT weights
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _field(batch: dict[Any, Any], key: str) -> Any:
    """A field of an unpickled batch, whose keys are ``str`` or ``bytes`` depending on how it was written."""
    if key in batch:
        return batch[key]
    return batch[key.encode()]


def load_cifar_split(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[Tensor, Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from pickled CIFAR batches."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for name in files:
        with (folder / name).open("rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(_field(batch, "data"), dtype=np.uint8).reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE))
        labels.append(np.asarray(_field(batch, label_key), dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class CIFARImages(Dataset):
    """uint8 images with labels; items are ``(transform(image), label)``."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Transform) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class CIFARDataModule(ResumableDataModule):
    """CIFAR-10 or CIFAR-100 images as normalised float tensors ``(batch, 3, image_size, image_size)``.

    Args:
        root: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or that folder itself).
        name: ``"cifar10"`` (default) or ``"cifar100"``.
        download: fetch the files into ``root`` with torchvision when missing (network; default False).
        batch_size: images per training batch (default 128); validation and test use twice as many.
        num_workers: DataLoader worker processes (default 0).
        image_size: side in pixels; images are resized (bilinear, antialiased) when not 32 (default 32; e.g. 224
            for an ImageNet-sized ViT).
        augment: random crop (32 px, 4 px zero padding) and horizontal flip of training images (default True).
        val_fraction: share of the training images (50,000 in the official files) held out, unaugmented, for
            validation, in [0, 1) (default 0.1: 5,000 images, so that the best epoch is chosen without looking at
            the test split). 0 validates on the 10,000 test images, as many CIFAR papers do; the test split then
            chooses the best epoch.
        normalize: ``"imagenet"`` (default; the mean/std the bundled ResNet-20 weights were trained with),
            ``"cifar"`` (CIFAR-10's statistics) or ``"half"`` (0.5 / 0.5, timm's ViT weights).
        train_limit: keep only this many of the training images left after the held-out split, drawn at random
            with ``seed`` (None = all, the default); the validation split does not shrink.
        seed: the seed of the ``train_limit`` subset and of the shuffling (default 0).
        split_seed: the seed of the held-out split (default 0). Apart from ``seed``, so that runs with different
            seeds are validated on the same images.
        verify: check the files' md5 against the official release (default False; stand-in files then fail).

    The training loader shuffles with a permutation of ``(seed, epoch)`` and its position is part of the
    checkpoint (``resumable_loader.py``). Workers are started afresh each epoch (not persistent), seeded from
    ``(seed, epoch)``, so the random augmentation of a resumed run continues exactly from an epoch boundary;
    from the middle of an epoch only with ``num_workers=0`` (the main process's RNG state is checkpointed).

    Raises:
        FileNotFoundError: the files are not under ``root`` and ``download`` is False.
        ValueError: a bad argument (naming it).
    """

    def __init__(
        self,
        root: str,
        name: str = "cifar10",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        image_size: int = 32,
        augment: bool = True,
        val_fraction: float = 0.1,
        normalize: str = "imagenet",
        train_limit: int | None = None,
        seed: int = 0,
        verify: bool = False,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if name not in CIFAR_LAYOUTS:
            raise ValueError(f"name: expected one of {', '.join(CIFAR_LAYOUTS)}, got {name!r}")
        if not isinstance(root, (str, Path)) or not str(root):
            raise ValueError(f"root: expected a folder path, got {root!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers: must be an int >= 0, got {num_workers!r}")
        if not (isinstance(image_size, int) and image_size >= 1):
            raise ValueError(f"image_size: must be an int >= 1, got {image_size!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction: must lie in [0, 1), got {val_fraction!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        bad_limit = isinstance(train_limit, bool) or not isinstance(train_limit, int) or train_limit < 1
        if train_limit is not None and bad_limit:
            raise ValueError(f"train_limit: must be an int >= 1 or None, got {train_limit!r}")
        for key, value in (("seed", seed), ("split_seed", split_seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key}: must be an int, got {value!r}")
        self.name = name
        self.layout = CIFAR_LAYOUTS[name]
        self.num_classes = self.layout.num_classes
        self.root = str(root)
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.augment = augment
        self.val_fraction = val_fraction
        self.normalize = normalize
        self.train_limit = train_limit
        self.seed = seed
        self.split_seed = split_seed
        self.verify = verify
        self.train_set: CIFARImages | None = None
        self.val_set: CIFARImages | None = None
        self.test_set: CIFARImages | None = None
        if not download:
            self.data_folder()  # raises FileNotFoundError now, before any training

    def data_folder(self) -> Path:
        """The folder with the pickled batches: ``root/<folder>``, or ``root`` itself when it is that folder."""
        root = Path(self.root).expanduser()
        files = self.layout.train_files + self.layout.test_files
        for candidate in (root / self.layout.folder, root):
            if all((candidate / file).is_file() for file in files):
                return candidate
        raise FileNotFoundError(
            f"root: no {self.name} files under {self.root!r} (expected {self.layout.folder}/ with "
            f"{', '.join(files)}); pass data.download=true (download=True) to fetch them (needs a network), "
            f"or point data.root at a folder holding {self.layout.folder}"
        )

    def prepare_data(self) -> None:
        if not self.download:
            return
        from torchvision import datasets

        dataset_class = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        try:
            for train in (True, False):
                dataset_class(self.root, train=train, download=True)
        except OSError as error:  # URLError, a refused connection, a DNS failure: the machine is offline
            reason = str(getattr(error, "reason", error)).splitlines()[0] if str(error) else type(error).__name__
            raise NetworkUnavailableError(
                f"download: fetching {self.name} into {str(self.root)!r} failed ({reason}); offline, copy the "
                f"extracted {self.layout.folder}/ under data.root and set data.download=false"
            ) from error

    def _check_md5(self, folder: Path) -> None:
        from torchvision import datasets
        from torchvision.datasets.utils import check_integrity

        dataset_class = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        for file, md5 in dataset_class.train_list + dataset_class.test_list:
            if not check_integrity(str(folder / file), md5):
                raise ValueError(f"root: {folder / file} does not match the official {self.name} release (md5)")

    def transform(self, train: bool) -> v2.Transform:
        """uint8 image -> normalised float image: (augmentation,) resize, scale to [0, 1], normalise."""
        steps: list[v2.Transform] = []
        if train and self.augment:
            steps += [v2.RandomCrop(CIFAR_SIZE, padding=4), v2.RandomHorizontalFlip()]
        if self.image_size != CIFAR_SIZE:
            steps.append(v2.Resize(self.image_size, antialias=True))
        mean, std = NORMALIZATIONS[self.normalize]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        return v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = self.data_folder()
        if self.verify:
            self._check_md5(folder)
        images, labels = load_cifar_split(folder, self.layout.train_files, self.layout.label_key)
        test_images, test_labels = load_cifar_split(folder, self.layout.test_files, self.layout.label_key)
        # the held-out images depend on split_seed and val_fraction only: the same for every seed and train_limit
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        num_val = round(len(labels) * self.val_fraction)
        if self.val_fraction > 0 and not 0 < num_val < len(labels):
            raise ValueError(
                f"val_fraction: {self.val_fraction} of {len(labels)} training images leaves "
                f"{'no validation' if num_val == 0 else 'no training'} image"
            )
        val_idx, train_idx = order[:num_val], order[num_val:]
        if self.train_limit is not None:
            subset = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.seed))
            train_idx = train_idx[subset[: self.train_limit]]
        train_idx, val_idx = train_idx.sort().values, val_idx.sort().values  # file order; the loader shuffles
        self.train_set = CIFARImages(images[train_idx], labels[train_idx], self.transform(train=True))
        self.test_set = CIFARImages(test_images, test_labels, self.transform(train=False))
        if num_val:
            self.val_set = CIFARImages(images[val_idx], labels[val_idx], self.transform(train=False))
        else:
            self.val_set = self.test_set

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self.resumable_train_loader(
            self.train_set, batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=2 * self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "call setup() first"
        return DataLoader(self.test_set, batch_size=2 * self.batch_size, num_workers=self.num_workers)
