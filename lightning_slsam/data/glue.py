"""GLUE classification tasks from local TSV files (GLUE's own layouts) or from Hugging Face ``datasets``.

A local folder holds ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` / ``dev_mismatched.tsv``). The
columns are found by name in the header row; each task accepts GLUE's original names, the names of Hugging
Face's ``glue`` dataset, and ``text`` / ``label`` (e.g. ``../shared/data/sst2``, header ``text<TAB>label``):

- ``cola``: sentence | text, label (original files: no header; label in column 1, sentence in column 3); mcc.
- ``sst2``: sentence | text, label; acc.
- ``mrpc``: sentence1 | #1 String, sentence2 | #2 String, label | Quality; f1.
- ``qqp``: question1, question2, is_duplicate | label; acc.
- ``qnli``: question, sentence, label; acc.
- ``rte``, ``wnli``: sentence1, sentence2, label; acc.
- ``mnli``: sentence1 | premise, sentence2 | hypothesis, gold_label | label; acc.

(``mnli_mismatched`` is MNLI validated on the mismatched dev set.) CoLA's original files have no header (source,
label, marker, sentence). String labels map to Hugging Face's indices: QNLI/RTE entailment 0, not_entailment 1;
MNLI entailment 0, neutral 1, contradiction 2. MNLI rows without a gold label (``-``) and rows with too few
fields (a few in GLUE's QQP/QNLI files) are skipped, the latter with a warning. STS-B (regression) is not offered.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_slsam.data.tokenized_text import TextExamples, TokenizedTextDataModule
from lightning_slsam.data.tsv_file import read_tsv
from lightning_slsam.loading.network_access import hf_endpoint, hugging_face_hub

NO_GOLD_LABEL = "-"


@dataclass(frozen=True)
class GLUETask:
    """What a GLUE task's files look like and how it is scored.

    Attributes:
        num_labels: classes.
        metric: validation metric name for :class:`~lightning_slsam.models.TextClassifier` (acc, mcc, f1).
        text_columns: accepted header names of the (first) text, in order of preference.
        pair_columns: accepted header names of the second text; empty for single-sentence tasks.
        label_columns: accepted header names of the label.
        label_names: string labels in class-index order; empty when labels are written as integers.
        headerless_columns: (text, label) column indices of the original header-less layout, if the task has one.
        val_files: the validation file names tried in order.
        hf_config: the ``datasets.load_dataset("glue", hf_config)`` configuration.
        hf_val_split: its validation split.
        hf_text_columns: the text (and pair) column names of the Hugging Face dataset.
    """

    num_labels: int
    metric: str
    text_columns: tuple[str, ...]
    pair_columns: tuple[str, ...]
    label_columns: tuple[str, ...]
    hf_config: str
    hf_text_columns: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    headerless_columns: tuple[int, int] | None = None
    val_files: tuple[str, ...] = ("dev.tsv",)
    hf_val_split: str = "validation"


_ENTAILMENT2 = ("entailment", "not_entailment")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_MNLI = {
    "num_labels": 3,
    "metric": "acc",
    "text_columns": ("sentence1", "premise"),
    "pair_columns": ("sentence2", "hypothesis"),
    "label_columns": ("gold_label", "label"),
    "hf_config": "mnli",
    "hf_text_columns": ("premise", "hypothesis"),
    "label_names": _MNLI_LABELS,
}

#: the supported GLUE tasks by name
GLUE_TASKS: dict[str, GLUETask] = {
    "cola": GLUETask(2, "mcc", ("sentence", "text"), (), ("label",), "cola", ("sentence",), headerless_columns=(3, 1)),
    "sst2": GLUETask(2, "acc", ("sentence", "text"), (), ("label",), "sst2", ("sentence",)),
    "mrpc": GLUETask(
        2,
        "f1",
        ("sentence1", "#1 String", "text"),
        ("sentence2", "#2 String", "text_pair"),
        ("label", "Quality"),
        "mrpc",
        ("sentence1", "sentence2"),
    ),
    "qqp": GLUETask(
        2, "acc", ("question1",), ("question2",), ("is_duplicate", "label"), "qqp", ("question1", "question2")
    ),
    "qnli": GLUETask(
        2, "acc", ("question",), ("sentence",), ("label",), "qnli", ("question", "sentence"), _ENTAILMENT2
    ),
    "rte": GLUETask(
        2, "acc", ("sentence1",), ("sentence2",), ("label",), "rte", ("sentence1", "sentence2"), _ENTAILMENT2
    ),
    "wnli": GLUETask(2, "acc", ("sentence1",), ("sentence2",), ("label",), "wnli", ("sentence1", "sentence2")),
    "mnli": GLUETask(**_MNLI, val_files=("dev_matched.tsv", "dev.tsv"), hf_val_split="validation_matched"),
    "mnli_mismatched": GLUETask(**_MNLI, val_files=("dev_mismatched.tsv",), hf_val_split="validation_mismatched"),
}


class GLUEDataModule(TokenizedTextDataModule):
    """A GLUE classification task, tokenized; batches are dicts with ``input_ids``, ``attention_mask``, ``labels``.

    Args:
        task: ``"sst2"`` (default), ``"cola"``, ``"mrpc"``, ``"qqp"``, ``"qnli"``, ``"rte"``, ``"wnli"``, ``"mnli"``
            or ``"mnli_mismatched"``.
        tokenizer: a local tokenizer folder (loaded offline), a hub name, or None (default) for the bundled MiniLM.
        path: a folder with ``train.tsv`` and ``dev.tsv`` in GLUE's format (see the module docstring), or None
            (default) to load ``datasets.load_dataset("glue", task)`` (needs ``pip install datasets`` and a
            network or a warm cache).
        max_length: tokens per example after truncation (default 128).
        batch_size: examples per training batch (default 32).
        train_limit: keep this many training examples, drawn at random with ``seed`` (None = all).
        val_limit: keep this many validation examples, drawn at random (None = all).
        seed: the subset and shuffling seed (default 0).
        num_workers: DataLoader worker processes (default 0).
        label_noise: fraction of training labels replaced by a random other class, in [0, 1) (default 0).

    Attributes:
        num_labels: the task's classes (CoLA, SST-2, MRPC, QQP, QNLI, RTE, WNLI 2; MNLI 3).
        metric: the task's metric name: ``"mcc"`` (CoLA), ``"f1"`` (MRPC), else ``"acc"``.

    Raises:
        ValueError: an unknown ``task`` or a bad size/limit (naming the argument).
        FileNotFoundError: ``path`` is not a folder, or lacks the train or validation file (naming ``path``).
    """

    def __init__(
        self,
        task: str = "sst2",
        tokenizer: str | None = None,
        path: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        label_noise: float = 0.0,
    ) -> None:
        if task not in GLUE_TASKS:
            hint = " (STS-B is a regression task and is not offered)" if task == "stsb" else ""
            raise ValueError(f"task: expected one of {', '.join(GLUE_TASKS)}, got {task!r}{hint}")
        super().__init__(tokenizer, max_length, batch_size, train_limit, val_limit, seed, num_workers, label_noise)
        self.task = task
        self.task_info = GLUE_TASKS[task]
        self.num_labels = self.task_info.num_labels
        self.metric = self.task_info.metric
        self.path = path
        self.split_files: dict[str, Path] = {}
        if path is not None:
            self.split_files = find_glue_files(path, task, self.task_info)

    def read_split(self, split: str) -> TextExamples:
        if self.path is None:
            return self._read_hf_split(split)
        return read_glue_tsv(self.split_files[split], self.task, self.task_info)

    def _read_hf_split(self, split: str) -> TextExamples:
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                "path: GLUEDataModule(path=None) loads GLUE with the Hugging Face `datasets` package, which is not "
                "installed; pip install datasets (or lightning-slsam[glue]), or pass path= a folder with "
                "train.tsv and dev.tsv"
            ) from error
        info = self.task_info
        with hugging_face_hub(
            "path",
            f"GLUE {self.task} with Hugging Face datasets (path=None) from {hf_endpoint()}",
            "set data.path to a folder with the task's train.tsv and dev.tsv (GLUE's files)",
        ):  # offline: one line at once, not a minute of retries
            dataset: Any = datasets.load_dataset("glue", info.hf_config)
        part = dataset["train" if split == "train" else info.hf_val_split]
        texts = [str(text) for text in part[info.hf_text_columns[0]]]
        pairs = [str(text) for text in part[info.hf_text_columns[1]]] if len(info.hf_text_columns) > 1 else None
        labels = [int(label) for label in part["label"]]
        return TextExamples(texts, pairs, labels)


def find_glue_files(path: str, task: str, info: GLUETask) -> dict[str, Path]:
    """``{"train": train.tsv, "val": the first of info.val_files}`` in ``path``; FileNotFoundError naming ``path``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {path!r} is not a folder; expected one with GLUE {task}'s train.tsv/dev.tsv")
    train = folder / "train.tsv"
    if not train.is_file():
        raise FileNotFoundError(f"path: no train.tsv in {path!r} (GLUE {task})")
    for name in info.val_files:
        if (folder / name).is_file():
            return {"train": train, "val": folder / name}
    raise FileNotFoundError(f"path: no dev file in {path!r} (GLUE {task}: expected one of {list(info.val_files)})")


def parse_glue_label(value: str, info: GLUETask, where: str) -> int:
    """A label field as a class index: a name in ``info.label_names`` or an integer in ``range(num_labels)``."""
    value = value.strip()
    if value in info.label_names:
        return info.label_names.index(value)
    try:
        index = int(value)
    except ValueError:
        index = -1
    if 0 <= index < info.num_labels:
        return index
    expected = list(info.label_names) or list(range(info.num_labels))
    raise ValueError(f"{where}: label {value!r} is not one of {expected}")


def _first_present(candidates: tuple[str, ...], header: list[str]) -> int | None:
    for name in candidates:
        if name in header:
            return header.index(name)
    return None


def read_glue_tsv(file: Path, task: str, info: GLUETask) -> TextExamples:
    """The examples of one GLUE TSV file, in GLUE's original layout or with Hugging Face / ``text`` column names."""
    table = read_tsv(file, header=False)
    first = [field.strip() for field in table.rows[0]] if table.rows else []
    names = set(info.text_columns) | set(info.pair_columns) | set(info.label_columns)
    if names & set(first):
        text_index = _first_present(info.text_columns, first)
        pair_index = _first_present(info.pair_columns, first) if info.pair_columns else None
        label_index = _first_present(info.label_columns, first)
        needed = [("text", text_index, info.text_columns), ("label", label_index, info.label_columns)]
        if info.pair_columns:
            needed.append(("text pair", pair_index, info.pair_columns))
        for role, index, candidates in needed:
            if index is None:
                raise ValueError(f"path: {file} has columns {first}; GLUE {task} needs a {role} column {candidates}")
        rows, lines = table.rows[1:], table.line_numbers[1:]
    elif info.headerless_columns is not None:
        text_index, label_index = info.headerless_columns
        pair_index = None
        rows, lines = table.rows, table.line_numbers
    else:
        raise ValueError(
            f"path: {file} has no header row naming GLUE {task}'s columns (text {list(info.text_columns)}, "
            f"label {list(info.label_columns)})"
        )
    assert text_index is not None and label_index is not None
    indices = [text_index, label_index] + ([pair_index] if pair_index is not None else [])
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    short = 0
    for row, line in zip(rows, lines, strict=True):
        if len(row) <= max(indices):
            short += 1
            continue
        if row[label_index].strip() == NO_GOLD_LABEL:
            continue
        labels.append(parse_glue_label(row[label_index], info, f"{file}:{line}"))
        texts.append(row[text_index].strip())
        if pair_index is not None:
            pairs.append(row[pair_index].strip())
    if short:
        warnings.warn(f"{file}: skipped {short} rows with too few tab-separated fields", stacklevel=2)
    if not labels:
        raise ValueError(f"path: {file} holds no labelled examples")
    return TextExamples(texts, pairs if pair_index is not None else None, labels)
