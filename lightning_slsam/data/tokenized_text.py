"""Tokenized text classification data shared by the GLUE and TSV data modules: examples, dataset, padding collate.

Each split is tokenized once in ``setup`` (truncated to ``max_length``, not padded); batches are padded to their
longest example by :class:`PaddingCollate`. A batch is a dict of int64 tensors: ``input_ids``,
``attention_mask``, ``token_type_ids`` when the tokenizer makes them, and ``labels`` (class indices), ready for
``model(**batch)`` of a Hugging Face sequence classifier (:class:`~lightning_slsam.models.TextClassifier`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_slsam.data.label_noise import add_label_noise, check_label_noise
from lightning_slsam.data.resumable_loader import ResumableDataModule
from lightning_slsam.loading.optional_dependencies import import_optional
from lightning_slsam.models.hf_pretrained import PretrainedSource, hub_fetch, resolve_pretrained

#: the fields padded with 0 (every other tokenizer field is padded with the tokenizer's pad token id)
ZERO_PADDED_FIELDS: tuple[str, ...] = ("attention_mask", "token_type_ids", "special_tokens_mask")


@dataclass
class TextExamples:
    """One split before tokenization: texts, optional second texts (pairs), and labels as class indices."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels) or (self.pairs is not None and len(self.pairs) != len(self.texts)):
            raise ValueError("TextExamples: texts, pairs and labels must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> TextExamples:
        """The examples at ``indices``, in that order."""
        return TextExamples(
            texts=[self.texts[i] for i in indices],
            pairs=None if self.pairs is None else [self.pairs[i] for i in indices],
            labels=[self.labels[i] for i in indices],
        )


def choose_subset(size: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices of ``range(size)`` drawn without replacement with ``seed``, sorted (all if None)."""
    if limit is None or limit >= size:
        return list(range(size))
    chosen = np.random.default_rng(seed).choice(size, size=limit, replace=False)
    return sorted(int(i) for i in chosen)


class TokenizedTextDataset(Dataset):
    """Tokenizer output (a dict of per-example id lists) and labels; items are dicts of id lists plus ``labels``."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[int]) -> None:
        self.encodings = encodings
        self.labels = list(labels)
        for key, values in encodings.items():
            if len(values) != len(self.labels):
                raise ValueError(f"encodings: field {key!r} has {len(values)} rows for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        return item


class PaddingCollate:
    """Pads a list of :class:`TokenizedTextDataset` items (right side) into a dict of int64 tensors.

    Args:
        pad_token_id: the id padding ``input_ids`` (the tokenizer's ``pad_token_id``); masks and token types get 0.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for key in items[0]:
            if key == "labels":
                batch[key] = torch.tensor([item[key] for item in items], dtype=torch.long)
                continue
            rows = [item[key] for item in items]
            padded = torch.full(
                (len(rows), max(len(row) for row in rows)),
                0 if key in ZERO_PADDED_FIELDS else self.pad_token_id,
                dtype=torch.long,
            )
            for i, row in enumerate(rows):
                padded[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            batch[key] = padded
        return batch


def check_limit(value: int | None, argument: str) -> None:
    """Raise a ValueError naming ``argument`` unless ``value`` is None or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{argument}: must be an int >= 1 or None, got {value!r}")


class TokenizedTextDataModule(ResumableDataModule):
    """Base of the text classification data modules: subsets, tokenizes and serves the train / validation splits.

    Subclasses set ``num_labels`` and implement :meth:`read_split`.

    Args:
        tokenizer: a local tokenizer folder (loaded offline), a hub name, or None (default) for the bundled MiniLM.
        max_length: tokens per example after truncation (default 128; pairs are truncated longest-first).
        batch_size: examples per training batch (default 32); validation uses twice as many.
        train_limit: keep this many training examples, drawn at random with ``seed`` (None = all).
        val_limit: keep this many validation examples, drawn at random with ``seed`` (None = all).
        seed: the subset and shuffling seed (default 0).
        num_workers: DataLoader worker processes (default 0).
        label_noise: fraction of training labels replaced by a random other class, in [0, 1) (default 0; drawn
            with ``seed``, after the subset); the validation labels stay true.

    The training loader shuffles with a permutation of ``(seed, epoch)`` and its position is part of the
    checkpoint, so a resumed run continues the order of an uninterrupted one (``resumable_loader.py``).
    """

    num_labels: int

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        label_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.label_noise = check_label_noise(label_noise)
        if not (isinstance(max_length, int) and max_length >= 2):
            raise ValueError(f"max_length: must be an int >= 2 (room for the special tokens), got {max_length!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
        check_limit(train_limit, "train_limit")
        check_limit(val_limit, "val_limit")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers: must be an int >= 0, got {num_workers!r}")
        self.tokenizer_source: PretrainedSource = resolve_pretrained(tokenizer, "tokenizer")
        self.max_length = max_length
        self.batch_size = batch_size
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TokenizedTextDataset | None = None
        self.val_set: TokenizedTextDataset | None = None
        self.collate: PaddingCollate | None = None

    def read_split(self, split: str) -> TextExamples:
        """The examples of ``split`` (``"train"`` or ``"val"``), labels already mapped to 0..num_labels-1."""
        raise NotImplementedError

    def load_tokenizer(self) -> Any:
        """``AutoTokenizer.from_pretrained`` of the ``tokenizer`` argument (offline for a local folder; a hub name
        without a network or a cached copy raises a one-line ``NetworkUnavailableError`` at once)."""
        transformers = import_optional("transformers", f"{type(self).__name__} (its tokenizer)")
        source = self.tokenizer_source
        if source.local:
            return transformers.AutoTokenizer.from_pretrained(source.name_or_path, **source.from_pretrained_kwargs())
        with hub_fetch("tokenizer", source.name_or_path):  # offline: one line at once, not 45 s of retries
            return transformers.AutoTokenizer.from_pretrained(source.name_or_path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokenizer = self.load_tokenizer()
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer: {self.tokenizer_source.name_or_path!r} has no pad token")
        train = self.read_split("train")
        val = self.read_split("val")
        train = train.subset(choose_subset(len(train), self.train_limit, self.seed))
        if self.label_noise > 0:
            noisy = add_label_noise(
                torch.tensor(train.labels, dtype=torch.long),
                self.label_noise,
                self.num_labels,
                np.random.default_rng(self.seed + 2),  # its own stream: the subset does not move with the noise
            )
            train = TextExamples(train.texts, train.pairs, noisy.tolist())
        val = val.subset(choose_subset(len(val), self.val_limit, self.seed + 1))
        self.train_set = self.tokenize(tokenizer, train)
        self.val_set = self.tokenize(tokenizer, val)
        self.collate = PaddingCollate(int(tokenizer.pad_token_id))

    def tokenize(self, tokenizer: Any, examples: TextExamples) -> TokenizedTextDataset:
        """Tokenize (truncate to ``max_length``, no padding) into a dataset."""
        encodings = tokenizer(
            examples.texts,
            examples.pairs,
            truncation=True,
            max_length=self.max_length,
            padding=False,
        )
        return TokenizedTextDataset({key: list(values) for key, values in encodings.items()}, examples.labels)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None and self.collate is not None, "call setup() first"
        return self.resumable_train_loader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None and self.collate is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=2 * self.batch_size, collate_fn=self.collate, num_workers=self.num_workers
        )
