"""Keep ``nn.MultiheadAttention`` on its fast matrix-multiply path when its weights are frozen for a pass.

A ``batch_first`` ``nn.MultiheadAttention`` transposes its ``(batch, seq, embed)`` inputs to ``(seq, batch,
embed)`` views and projects them with ``F.linear``. On such a non-contiguous 3-D input, ``torch.matmul``
folds the batch dimensions into one ``mm`` only when the weight requires a gradient; with a frozen weight
(an inactive arm of a sparse step) it falls back to a ``bmm`` over ``seq`` small matrices, a third slower
on the CPU for ViT-S shapes (and the same in the backward pass). Because SL-SAM freezes most weights in
every pass, torchvision's ``VisionTransformer`` (and any model built on ``nn.MultiheadAttention``) paid
that price on every step.

:func:`install` adds a forward pre-hook to every such module that hands it inputs whose ``(seq, batch)``
transpose is contiguous: one copy of the input (the same copy ``matmul``'s fold makes when the weight
trains), after which every projection is a single ``addmm``. The values are the same up to float
rounding of the matrix products; identical inputs stay identical objects (``query is key is value``
selects the packed in-projection). The hook does nothing under ``torch.no_grad`` (inference keeps
PyTorch's fused fast path) or for ``batch_first=False`` modules, whose inputs are already seq-major.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["install"]

_NAMES = ("query", "key", "value")


def install(model: nn.Module) -> list[RemovableHandle]:
    """Add the contiguous-input pre-hook to every ``batch_first`` ``nn.MultiheadAttention`` in ``model``.

    Returns the hook handles; call ``handle.remove()`` on each to undo.
    """
    return [
        module.register_forward_pre_hook(_seq_major_inputs, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention) and module.batch_first
    ]


def _seq_major(x: Any) -> Any:
    """``x`` (batch, seq, embed) re-laid out so that ``x.transpose(0, 1)`` is contiguous; other inputs as given."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.is_nested or x.transpose(0, 1).is_contiguous():
        return x
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def _seq_major_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not torch.is_grad_enabled():
        return None
    converted: dict[int, Any] = {}

    def convert(x: Any) -> Any:
        # the same tensor passed as query, key and value must stay one object (MHA tests `query is key`)
        if id(x) not in converted:
            converted[id(x)] = _seq_major(x)
        return converted[id(x)]

    new_args = tuple(convert(a) if i < len(_NAMES) else a for i, a in enumerate(args))
    new_kwargs = {k: convert(v) if k in _NAMES else v for k, v in kwargs.items()}
    return new_args, new_kwargs
