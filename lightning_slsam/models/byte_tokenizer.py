"""A byte-level tokenizer built in code, for the tiny random-init causal LM (offline, nothing to download).

Ids 0-255 are the UTF-8 bytes of the text; the Llama-3 chat markers that the instruction templates use
(``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``) are
one id each after them, so the tiny model sees prompts shaped as Llama-3.2-Instruct sees them. It has the part
of a Hugging Face tokenizer's interface that :mod:`lightning_slsam.data.instruction` uses: ``encode`` (without
added special tokens), ``decode``, ``len()``, the ``bos`` / ``eos`` / ``pad`` tokens and their ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: the special tokens, in id order after the 256 bytes
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")


class ByteTokenizer:
    """UTF-8 bytes plus the Llama-3 chat markers: 261 ids, no merges, no unknown token.

    As in the authors' Llama-3.2-Instruct run, the end-of-sequence and padding token is ``<|eot_id|>`` (padding is
    told apart by the attention mask, and the data module gives padded positions the label -100).
    """

    bos_token = "<|begin_of_text|>"
    eos_token = "<|eot_id|>"
    pad_token = "<|eot_id|>"
    name_or_path = "byte-level (lightning_slsam.models.byte_tokenizer)"

    def __init__(self) -> None:
        self._special_ids = {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = self._special_ids[self.bos_token]
        self.eos_token_id = self._special_ids[self.eos_token]
        self.pad_token_id = self._special_ids[self.pad_token]

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + 5 special tokens = 261."""
        return 256 + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of ``text``: a special-token string is its one id, everything else its UTF-8 bytes.

        ``add_special_tokens=True`` puts ``<|begin_of_text|>`` first (as a Llama-3 tokenizer does); default False.
        """
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in _SPECIAL_PATTERN.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (invalid UTF-8 byte runs are replaced by U+FFFD)."""
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"ids: {i} is not an id of the byte tokenizer (0..{self.vocab_size - 1})")
            out.append(SPECIAL_TOKENS[i - 256])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)
