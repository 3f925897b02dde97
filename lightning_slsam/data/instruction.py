"""Instruction tuning data (Alpaca, Open-Platypus) for causal-LM fine-tuning, with the prompt left out of the loss.

A file holds records with the fields ``instruction``, ``input`` (optional, may be empty) and ``output``: a JSON
array (Alpaca's ``alpaca_data.json``) or JSON Lines, one object a line (what ``datasets``' ``to_json`` writes,
e.g. for ``garage-bAInd/Open-Platypus``). Other fields (Open-Platypus' ``data_source``) are ignored.

Each record becomes a prompt and a response by a template (:data:`TEMPLATES`); both are tokenized separately,
without the tokenizer's own special tokens, and concatenated, so the label mask falls exactly on the prompt's
tokens whatever the tokenizer merges at the seam. A batch is a dict of int64 tensors ``input_ids``,
``attention_mask``, ``labels``: labels are the input ids, with -100 on the prompt tokens (``mask_prompt=True``)
and on padding, so a loss that ignores -100 is the next-token cross-entropy of the responses only.

Departures from the authors' ``llama/src/finetuning2.py`` (documented in docs/guide/llm.md): sequences are padded
to the batch's longest instead of to ``max_length`` (the same loss, masked padding costs nothing); the template's
``<|begin_of_text|>`` and ``<|eot_id|>`` appear once (their tokenizer adds a second BOS and their
``end_of_conversation_token`` a second ``<|eot_id|>``); a non-empty ``input`` is kept after the instruction (their
Open-Platypus template drops it); their ``--prefix_instruction True`` is never read by their code, so their loss
includes the prompt tokens: ``mask_prompt=False`` gives that.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_slsam.data.resumable_loader import ResumableDataModule
from lightning_slsam.loading.optional_dependencies import import_optional
from lightning_slsam.models.byte_tokenizer import ByteTokenizer

#: the label of a position that is not a target (PyTorch's and Hugging Face's ``ignore_index``)
IGNORE_INDEX = -100

#: prompt and response formats by name; ``{user}`` is the instruction, then the non-empty input after a blank line
#: (``llama3``) or a space (``inst``); ``{bos}`` / ``{eos}`` are the tokenizer's tokens (empty if it has none)
TEMPLATES: dict[str, tuple[str, str]] = {
    # the authors' Open-Platypus template: Llama-3 chat format, one user turn and the assistant's answer
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "{output}<|eot_id|>",
    ),
    # the authors' Alpaca template
    "inst": ("{bos}[INST] {user} [/INST]  ", "{output}{eos}"),
}


@dataclass(frozen=True)
class InstructionRecord:
    """One instruction example: the task, its optional input (empty string if none) and the wanted answer."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and their labels (the same ids, or -100 where the position is not a target), equal lengths."""

    input_ids: list[int]
    labels: list[int]


def read_instruction_file(path: str | Path) -> list[InstructionRecord]:
    """The records of a JSON array or JSON Lines file, checked field by field.

    Raises:
        FileNotFoundError: ``path`` is not a file (the message names it).
        ValueError: invalid JSON, a record that is not an object, a missing or non-string ``instruction`` /
            ``output``, a non-string ``input``, or no records at all; the message starts with ``path:`` and
            names the file and the line (JSON Lines) or record index (JSON array).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"path: {str(path)!r} is not a file; expected an Alpaca / Open-Platypus JSON or JSON Lines file with "
            "the fields instruction, input, output"
        )
    text = file.read_text(encoding="utf-8")
    entries: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"path: {file} is not valid JSON (line {error.lineno}: {error.msg})") from None
        entries = [(f"{file}: record {i}", record) for i, record in enumerate(data)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{file}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"path: {file}:{number} is not a JSON object ({error.msg})") from None
    records = [_record(where, value) for where, value in entries]
    if not records:
        raise ValueError(f"path: {file} holds no records")
    return records


def _record(where: str, value: Any) -> InstructionRecord:
    if not isinstance(value, dict):
        raise ValueError(f"path: {where} is a {type(value).__name__}, expected an object with instruction, output")
    fields: dict[str, str] = {}
    for name in ("instruction", "input", "output"):
        field = value.get(name, "" if name == "input" else None)
        if field is None and name == "input":
            field = ""
        if field is None:
            raise ValueError(f"path: {where} has no {name!r} field (its fields: {sorted(value)})")
        if not isinstance(field, str):
            raise ValueError(f"path: {where}: field {name!r} is a {type(field).__name__}, expected a string")
        fields[name] = field
    return InstructionRecord(**fields)


def format_record(record: InstructionRecord, template: str, bos: str = "", eos: str = "") -> tuple[str, str]:
    """``(prompt, response)`` of ``record`` in ``template`` (a name in :data:`TEMPLATES`)."""
    if template not in TEMPLATES:
        raise ValueError(f"template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
    prompt_format, response_format = TEMPLATES[template]
    separator = "\n\n" if template == "llama3" else " "
    user = record.instruction + (separator + record.input if record.input else "")
    values = {"user": user, "output": record.output, "bos": bos, "eos": eos}
    return prompt_format.format(**values), response_format.format(**values)


def tokenize_record(
    tokenizer: Any, prompt: str, response: str, max_length: int, mask_prompt: bool = True
) -> TokenizedExample | None:
    """Prompt ids then response ids, truncated to ``max_length`` tokens; labels -100 on the prompt if ``mask_prompt``.

    Returns None when no response token is left to predict after truncation (with ``mask_prompt``), since such an
    example contributes nothing to the loss. The first position is never a target of next-token prediction.
    """
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    response_ids = list(tokenizer.encode(response, add_special_tokens=False))
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if mask_prompt else prompt_ids) + response_ids
    labels = labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return TokenizedExample(input_ids, labels)


def split_indices(size: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The authors' train / validation split of ``range(size)``: NumPy ``RandomState(seed)`` shuffles the indices,
    the first ``size - round(val_fraction * size)`` are training, the rest validation (their 9:1 for 0.1)."""
    order = np.arange(size, dtype=np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64)
    np.random.RandomState(seed=seed).shuffle(order)
    train_count = size - round(val_fraction * size)
    return [int(i) for i in order[:train_count]], [int(i) for i in order[train_count:]]


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Concatenate ``examples`` in order and cut the stream into pieces of ``max_length`` tokens (the last shorter).

    Each label stays with its token, so the prompt mask is unchanged; attention crosses example boundaries within a
    piece (as the llama-recipes packing does). Pieces with no target left are dropped.
    """
    ids = [i for example in examples for i in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    pieces = [
        TokenizedExample(ids[start : start + max_length], labels[start : start + max_length])
        for start in range(0, len(ids), max_length)
    ]
    return [piece for piece in pieces if any(label != IGNORE_INDEX for label in piece.labels[1:])]


class TokenizedExamples(Dataset):
    """A list of :class:`TokenizedExample` as a map-style dataset."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class InstructionCollate:
    """Right-pads examples to the batch's longest: ``input_ids`` with ``pad_token_id``, ``attention_mask`` 0 and
    ``labels`` -100 on the padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, Tensor]:
        length = max(len(example.input_ids) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.as_tensor(example.input_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(example.labels, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_tokenizer(tokenizer: str | None) -> Any:
    """The byte-level tokenizer for None, else ``AutoTokenizer`` of a local folder (``local_files_only=True``).

    A tokenizer without a pad token pads with its end-of-sequence token (the authors' choice; padding is masked).
    """
    if tokenizer is None:
        return ByteTokenizer()
    folder = Path(str(tokenizer)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer: {str(tokenizer)!r} is not a folder with a Hugging Face tokenizer; pass the model's local "
            "folder (slsam-train: data.tokenizer follows model.model_name_or_path), or null for the built-in "
            "byte-level tokenizer of the tiny model (model.tiny=true)"
        )
    transformers = import_optional("transformers", "InstructionDataModule (its tokenizer)")
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if loaded.pad_token_id is None:
        if loaded.eos_token_id is None:
            raise ValueError(f"tokenizer: {str(tokenizer)!r} has neither a pad nor an end-of-sequence token")
        loaded.pad_token = loaded.eos_token
    return loaded


def _check_int(value: Any, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument}: must be an int >= {minimum}, got {value!r}")
    return value


class InstructionDataModule(ResumableDataModule):
    """Alpaca / Open-Platypus records for causal-LM fine-tuning; batches as the module docstring says.

    The file is read and checked, and the tokenizer loaded, at construction, so a bad file or field fails before a
    model is built; tokenization happens in ``setup``.

    Args:
        path: a JSON array or JSON Lines file of records with ``instruction``, ``input``, ``output``.
        tokenizer: the model's local folder (a Hugging Face tokenizer, loaded offline), or None (default) for the
            built-in byte-level tokenizer that goes with the tiny model (``model.tiny=true``).
        template: ``"llama3"`` (default; the authors' Open-Platypus template, Llama-3 chat format) or ``"inst"``
            (their Alpaca template, ``[INST] ... [/INST]``); see :data:`TEMPLATES`.
        max_length: tokens per example, prompt and response together, after truncation (default 2048, the
            authors' ``context_length``).
        batch_size: examples per batch, training and validation (default 2, the authors' ``batch_size_training``).
        val_fraction: share of the records held out for validation, in [0, 1) (default 0.1: the authors' 9:1).
        seed: seed of the split (NumPy ``RandomState``, the authors' rule) and of the training shuffle (default 1234,
            the authors' seed).
        mask_prompt: labels -100 on the prompt tokens, so only the response is learned (default True).
        packing: concatenate the training examples and cut them into ``max_length`` pieces (default False: one
            example per row, padded to the batch's longest). Validation is never packed.
        train_limit: keep the first this many training records of the split (None, default: all).
        val_limit: keep the first this many validation records (None, default: all).
        num_workers: DataLoader worker processes (default 0).

    Attributes:
        vocab_size: the number of ids the tokenizer can produce (the model's embedding needs as many rows).
        tokenizer_source: the tokenizer folder, or None for the byte-level tokenizer.
        dropped: examples dropped in ``setup`` because truncation left no response token, by split.

    Raises:
        FileNotFoundError: ``path`` is not a file, ``tokenizer`` not a folder (naming the argument).
        ValueError: a bad argument or record (naming it).
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        template: str = "llama3",
        max_length: int = 2048,
        batch_size: int = 2,
        val_fraction: float = 0.1,
        seed: int = 1234,
        mask_prompt: bool = True,
        packing: bool = False,
        train_limit: int | None = None,
        val_limit: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if path is None:
            raise ValueError("path: no file given; pass an Alpaca / Open-Platypus JSON or JSON Lines file")
        if template not in TEMPLATES:
            raise ValueError(f"template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
        self.max_length = _check_int(max_length, "max_length", 2)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.num_workers = _check_int(num_workers, "num_workers", 0)
        for name, limit in (("train_limit", train_limit), ("val_limit", val_limit)):
            if limit is not None:
                _check_int(limit, name, 1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise ValueError(f"val_fraction: must be a number in [0, 1), got {val_fraction!r}")
        if not (math.isfinite(val_fraction) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction: must lie in [0, 1), got {val_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: must be an int, got {seed!r}")
        for name, flag in (("mask_prompt", mask_prompt), ("packing", packing)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}: must be true or false, got {flag!r}")
        self.path = str(path)
        self.template = template
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.mask_prompt = mask_prompt
        self.packing = packing
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.records = read_instruction_file(path)
        train, val = split_indices(len(self.records), self.val_fraction, seed)
        if not train:
            raise ValueError(f"val_fraction: {val_fraction} leaves no training record of {len(self.records)}")
        self.train_indices = train[:train_limit] if train_limit is not None else train
        self.val_indices = val[:val_limit] if val_limit is not None else val
        self.tokenizer_source = None if tokenizer is None else str(tokenizer)
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.dropped: dict[str, int] = {}
        self.train_set: TokenizedExamples | None = None
        self.val_set: TokenizedExamples | None = None
        self.collate = InstructionCollate(int(self.tokenizer.pad_token_id))

    def tokenize(self, indices: Sequence[int], split: str) -> list[TokenizedExample]:
        """The records at ``indices`` formatted and tokenized; those with no response token left are dropped."""
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        eos = getattr(self.tokenizer, "eos_token", None) or ""
        examples = []
        for index in indices:
            prompt, response = format_record(self.records[index], self.template, bos, eos)
            example = tokenize_record(self.tokenizer, prompt, response, self.max_length, self.mask_prompt)
            if example is not None:
                examples.append(example)
        self.dropped[split] = len(indices) - len(examples)
        if self.dropped[split]:
            warnings.warn(
                f"{self.path}: {self.dropped[split]} of {len(indices)} {split} records have no response token left "
                f"within max_length={self.max_length} and are left out",
                UserWarning,
                stacklevel=2,
            )
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self.tokenize(self.train_indices, "train")
        if not train:
            raise ValueError(f"max_length: {self.max_length} leaves no response token in any training record")
        if self.packing:
            train = pack_examples(train, self.max_length)
        self.train_set = TokenizedExamples(train)
        self.val_set = TokenizedExamples(self.tokenize(self.val_indices, "val"))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self.resumable_train_loader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        assert self.val_set is not None, "call setup() first"
        if len(self.val_set) == 0:  # val_fraction=0 (the authors' command evaluates nothing): no validation
            return []
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=self.collate, num_workers=self.num_workers
        )
