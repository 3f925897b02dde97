"""Reading checkpoint and weights files with one-line errors that name the file and what is wrong with it.

``torch.load`` of an empty, truncated or foreign file raises whatever its unpickler hits first
(``EOFError``, ``RuntimeError: PytorchStreamReader failed ...``, ``IndexError``, ``UnpicklingError``). These
functions say instead: empty, truncated (a zip archive cut short, as a run killed while saving leaves it),
not a PyTorch file, or not a Lightning checkpoint, before any training starts.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

#: the first bytes of a zip archive, the format ``torch.save`` writes
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointFileError(ValueError):
    """A checkpoint or weights file cannot be read; the message starts with the argument that named it."""


def read_torch_file(path: str | Path, argument: str, weights_only: bool, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu")``, with an error naming ``argument`` and the file if it fails.

    Args:
        path: the file.
        argument: the argument or config key that named it (e.g. ``ckpt_path``, ``weights``).
        weights_only: ``torch.load``'s ``weights_only`` (True for plain weight files).
        mmap: map the tensors' storage instead of reading it (zip files only): a cheap check of a large file.

    Raises:
        FileNotFoundError: no file at ``path`` (naming ``argument``).
        CheckpointFileError: empty, truncated, or not a PyTorch file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{argument}: no file at {str(path)!r}")
    size = file.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{argument}: {str(path)!r} is empty (0 bytes); was its writer killed while saving?")
    with file.open("rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    is_zip = zipfile.is_zipfile(file)
    if head == _ZIP_MAGIC and not is_zip:
        raise CheckpointFileError(
            f"{argument}: {str(path)!r} is truncated or corrupt ({size} bytes, a zip archive without its end "
            "record); was its writer killed while saving? Use an earlier checkpoint"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=mmap and is_zip)
    except Exception as error:  # any unpickling failure means the same thing here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        pickled = head.startswith(b"\x80")  # torch's legacy format: a pickle (protocol 2 or later)
        what = "a corrupt PyTorch file"
        if weights_only and (is_zip or pickled) and "weights only load failed" in reason.lower():
            what = "a PyTorch file that torch.load(weights_only=True) refuses (it holds arbitrary objects)"
        if not (is_zip or pickled):  # the unpickler's complaint about a foreign file says nothing useful
            raise CheckpointFileError(
                f"{argument}: {str(path)!r} is not a PyTorch file ({size} bytes, starting with {head.hex()})"
            ) from None
        raise CheckpointFileError(
            f"{argument}: {str(path)!r} is {what} ({size} bytes; {type(error).__name__}: {reason[:200]})"
        ) from error


def check_lightning_checkpoint(path: str | Path, argument: str = "ckpt_path") -> None:
    """Refuse a file Lightning could not resume from, with a one-line error (reads only its index: mmap).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointFileError: empty, truncated, not a PyTorch file, or a PyTorch file without the
            ``state_dict`` and ``loops`` a Lightning checkpoint holds.
    """
    # weights_only=True, as Lightning's own load (torch's default): nothing in the file is executed
    checkpoint = read_torch_file(path, argument, weights_only=True, mmap=True)
    missing = [key for key in ("state_dict", "loops") if not (isinstance(checkpoint, dict) and key in checkpoint)]
    if missing:
        raise CheckpointFileError(
            f"{argument}: {str(path)!r} is a PyTorch file but not a Lightning checkpoint to resume from (no "
            f"{' or '.join(repr(k) for k in missing)} entry); load plain weights with model.weights instead"
        )
