"""Any labelled TSV as a text classification task: pick the text (and pair) and label columns by name or index."""

from __future__ import annotations

from pathlib import Path

from lightning_slsam.data.tokenized_text import TextExamples, TokenizedTextDataModule
from lightning_slsam.data.tsv_file import TSVFile, read_tsv

Column = str | int


def sorted_label_values(values: set[str]) -> list[str]:
    """Label strings in class-index order: numerically when every label is an integer ("2" < "10"), else by text."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


class TextTSVDataModule(TokenizedTextDataModule):
    """Text classification from a training and a validation TSV file; batches as :class:`GLUEDataModule`'s.

    Labels are the sorted unique values of the training file's label column (numerically when all are integers),
    mapped to 0..num_labels-1; ``label_names`` keeps the original values in that order. The files are read
    (and the labels counted) when the module is built, so ``num_labels`` is known before training.

    Args:
        path: a folder holding the files (default names ``train.tsv`` and ``dev.tsv``), or None when
            ``train_file`` and ``val_file`` are given as full paths.
        text_column: the text column: a header name (needs ``header=True``) or a 0-based index.
        label_column: the label column, as ``text_column``.
        text_pair_column: the second text of a pair task (name or index), or None (default) for single texts.
        header: whether each file's first row names the columns (default True).
        tokenizer: a local tokenizer folder (loaded offline), a hub name, or None (default) for the bundled MiniLM.
        max_length: tokens per example after truncation (default 128).
        batch_size: examples per training batch (default 32).
        train_limit: keep this many training examples, drawn at random with ``seed`` (None = all).
        val_limit: keep this many validation examples, drawn at random (None = all).
        seed: the subset and shuffling seed (default 0).
        train_file: the training file, relative to ``path`` when ``path`` is given (default ``"train.tsv"``).
        val_file: the validation file, likewise (default ``"dev.tsv"``).
        quoted: fields may be wrapped in double quotes, as pandas/csv write them (default False: quotes are
            plain characters, as in GLUE's files).
        num_workers: DataLoader worker processes (default 0).
        label_noise: fraction of training labels replaced by a random other class, in [0, 1) (default 0).

    Attributes:
        num_labels: the number of distinct training labels.
        label_names: the original label values, index i holding class i's.

    Raises:
        FileNotFoundError: a missing folder or file, naming ``path``, ``train_file`` or ``val_file``.
        ValueError: a column that is not in the file, a validation label not seen in training, fewer than two
            classes, or a bad size/limit (each naming the argument).
    """

    def __init__(
        self,
        path: str | None = None,
        text_column: Column = "text",
        label_column: Column = "label",
        text_pair_column: Column | None = None,
        header: bool = True,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        train_file: str | None = None,
        val_file: str | None = None,
        quoted: bool = False,
        num_workers: int = 0,
        label_noise: float = 0.0,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, train_limit, val_limit, seed, num_workers, label_noise)
        self.path = path
        self.train_file = self._locate(path, train_file, "train_file", "train.tsv")
        self.val_file = self._locate(path, val_file, "val_file", "dev.tsv")
        self.text_column = text_column
        self.label_column = label_column
        self.text_pair_column = text_pair_column
        self.header = header
        self.quoted = quoted
        self._raw = {
            "train": self._read_columns(read_tsv(self.train_file, header, quoted)),
            "val": self._read_columns(read_tsv(self.val_file, header, quoted)),
        }
        self.label_names = sorted_label_values(set(self._raw["train"][1]))
        if len(self.label_names) < 2:
            raise ValueError(
                f"label_column: {self.train_file} has {len(self.label_names)} distinct label(s) "
                f"{self.label_names}; classification needs at least 2"
            )
        self.num_labels = len(self.label_names)
        unseen = sorted(set(self._raw["val"][1]) - set(self.label_names))
        if unseen:
            raise ValueError(
                f"label_column: {self.val_file} has labels not in {self.train_file}: {unseen[:10]} "
                f"(training labels: {self.label_names[:10]})"
            )

    @staticmethod
    def _locate(folder: str | None, file: str | None, argument: str, default: str) -> Path:
        if folder is None:
            if file is None:
                raise ValueError(f"{argument}: give path= a folder with {default}, or {argument}= the file itself")
            located = Path(file).expanduser()
        else:
            root = Path(folder).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"path: {folder!r} is not a folder")
            located = root / (file if file is not None else default)
        if not located.is_file():
            name = argument if file is not None or folder is None else "path"
            raise FileNotFoundError(f"{name}: no file {str(located)!r}")
        return located

    def _read_columns(self, table: TSVFile) -> tuple[list[str], list[str], list[str] | None]:
        """(texts, raw labels, pairs or None) of one file."""
        text = table.column_index(self.text_column, "text_column")
        label = table.column_index(self.label_column, "label_column")
        indices = [text, label]
        if self.text_pair_column is not None:
            indices.append(table.column_index(self.text_pair_column, "text_pair_column"))
        values, _ = table.columns(indices)
        if not values[0]:
            raise ValueError(f"path: {table.path} holds no examples")
        labels = [value.strip() for value in values[1]]
        return values[0], labels, values[2] if self.text_pair_column is not None else None

    def read_split(self, split: str) -> TextExamples:
        texts, labels, pairs = self._raw[split]
        index = {name: i for i, name in enumerate(self.label_names)}
        return TextExamples(texts, pairs, [index[label] for label in labels])
