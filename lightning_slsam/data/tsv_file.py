"""Reading tab-separated text files (GLUE's layout and any labelled TSV) without pandas.

GLUE's files are read with quoting off (``quoted=False``): SST-2 and others hold unbalanced ``"`` characters that a
CSV reader with quoting on would swallow across lines. Files written by pandas / ``csv`` with default quoting need
``quoted=True``. A UTF-8 byte-order mark (MRPC's original files start with one) is dropped.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TSVFile:
    """The rows of one TSV file.

    Attributes:
        path: the file.
        header: the first row's field names, or None for a file without a header row.
        rows: the data rows (blank lines skipped), each a list of fields.
        line_numbers: the 1-based line of each row in ``rows`` (for error messages).
    """

    path: Path
    header: list[str] | None
    rows: list[list[str]]
    line_numbers: list[int]

    def column_index(self, column: str | int, argument: str) -> int:
        """The 0-based index of ``column`` (a header name, or an index; negative counts from the end).

        Raises:
            ValueError: naming ``argument`` when the name is not in the header, the file has no header, or the
                index lies outside the first row.
        """
        width = len(self.header) if self.header is not None else (len(self.rows[0]) if self.rows else 0)
        if isinstance(column, bool) or not isinstance(column, (str, int)):
            raise TypeError(f"{argument}: expected a column name or index, got {type(column).__name__}")
        if isinstance(column, int):
            if not -width <= column < width:
                raise ValueError(f"{argument}: column index {column} is outside {self.path}'s {width} columns")
            return column % width
        if self.header is None:
            raise ValueError(
                f"{argument}: column {column!r} is a name, but {self.path} is read without a header; "
                "pass a 0-based column index, or header=True"
            )
        if column not in self.header:
            raise ValueError(f"{argument}: no column {column!r} in {self.path}; its header is {self.header}")
        return self.header.index(column)

    def columns(self, indices: Sequence[int], skip_short_rows: bool = False) -> tuple[list[list[str]], int]:
        """The fields at ``indices`` of every row, as one list per index, and the number of rows skipped.

        Args:
            indices: 0-based column indices.
            skip_short_rows: drop rows too short to hold every index (GLUE's QQP/QNLI have a few malformed lines)
                instead of raising a ValueError naming the file and line (default False).
        """
        needed = max(indices) + 1 if indices else 0
        out: list[list[str]] = [[] for _ in indices]
        skipped = 0
        for row, line in zip(self.rows, self.line_numbers, strict=True):
            if len(row) < needed:
                if skip_short_rows:
                    skipped += 1
                    continue
                raise ValueError(f"{self.path}:{line}: expected at least {needed} tab-separated fields, got {len(row)}")
            for values, index in zip(out, indices, strict=True):
                values.append(row[index])
        return out, skipped


def _not_utf8(path: Path) -> str:
    """``<file>:<line>: ...`` for the first line that is not UTF-8 (the decoder's offset counts from its buffer)."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            return (
                f"{path}:{number}: not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
            )
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def read_tsv(path: str | Path, header: bool, quoted: bool = False) -> TSVFile:
    """Read ``path`` as tab-separated fields (UTF-8).

    Args:
        path: the file.
        header: whether the first row names the columns.
        quoted: whether fields may be wrapped in double quotes (csv/pandas default); default False (GLUE).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not UTF-8 text, naming the file, the line and the column of the first bad byte.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TSV file at {str(path)!r}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
            start = 1
            for row in reader:
                if row and any(field.strip() for field in row):
                    rows.append(row)
                    line_numbers.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError:
        raise ValueError(_not_utf8(path)) from None
    names: list[str] | None = None
    if header:
        if not rows:
            raise ValueError(f"{path}: empty file; expected a header row")
        names = [name.strip() for name in rows.pop(0)]
        line_numbers.pop(0)
    return TSVFile(path=path, header=names, rows=rows, line_numbers=line_numbers)
