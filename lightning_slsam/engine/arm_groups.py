"""Named groups of arms, for SL-SAM's always-active arms (``always_active=["head", "vectors"]``).

A spec is a list of group names or glob patterns; an arm belongs to the selection when every one of its
parameters matches one of them:

- ``"head"``: the parameters of the last module (in ``named_modules`` order) that owns parameters directly: the
  classifier of a ResNet, ViT or Hugging Face sequence classifier, usually new and untrained. A head tied to the
  input embeddings (most causal language models) selects the embedding arm, which holds the shared tensor.
- ``"norms"``: the parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm,
  RMSNorm, and any module whose class name ends in ``Norm``).
- ``"biases"``: parameters whose name ends in ``bias``.
- ``"vectors"``: every parameter with at most one dimension (norms' scales and shifts, biases, scalars).
- ``"embeddings"``: the parameters of ``nn.Embedding`` modules (and class names ending in ``Embeddings``).
- anything else: an ``fnmatch`` pattern on the parameter's dotted name, e.g. ``"model.classifier.*"``.

With ``arms="tensor"`` (the paper's) every parameter is its own arm, so the groups select exactly those
tensors; with ``"module"`` or ``"block"`` an arm is selected only when all of its parameters are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from lightning_slsam.engine.arms import ArmLayout

ARM_GROUPS: tuple[str, ...] = ("head", "norms", "biases", "vectors", "embeddings")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def check_spec(spec: Sequence[str] | str | None, key: str = "always_active") -> tuple[str, ...]:
    """Normalise an arm-group spec to a tuple of non-empty strings; errors name ``key``."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        spec = [spec]
    items = tuple(spec)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(
                f"{key}: expected arm groups ({', '.join(ARM_GROUPS)}) or name patterns, got {item!r} in {spec!r}"
            )
    return items


def _names_by_group(module: nn.Module) -> dict[str, set[str]]:
    """The dotted names of the parameters in each named group.

    A parameter shared by several modules (a language model's head tied to its embeddings) goes by its first name
    in ``named_parameters`` order, the name its arm has: the head group then selects the tied tensor's arm.
    """
    groups: dict[str, set[str]] = {group: set() for group in ARM_GROUPS}
    canonical = {id(p): name for name, p in module.named_parameters()}
    last_owner: list[str] = []
    for _path, child in module.named_modules():
        own = [canonical[id(p)] for _, p in child.named_parameters(recurse=False)]
        if not own:
            continue
        last_owner = own
        kind = type(child).__name__
        if isinstance(child, _NORM_TYPES) or kind.endswith("Norm"):
            groups["norms"].update(own)
        if isinstance(child, nn.Embedding) or kind.endswith("Embeddings"):
            groups["embeddings"].update(own)
    groups["head"].update(last_owner)
    for name, p in module.named_parameters():
        if name.rsplit(".", 1)[-1].endswith("bias"):
            groups["biases"].add(name)
        if p.ndim <= 1:
            groups["vectors"].add(name)
    return groups


def select_arms(module: nn.Module, layout: ArmLayout, spec: Sequence[str]) -> torch.Tensor:
    """Bool ``(N,)`` on the CPU: the arms of ``layout`` all of whose parameters match ``spec``.

    Raises:
        ValueError: a pattern that matches no arm (a typo would otherwise silently select nothing).
    """
    groups = _names_by_group(module) if spec else {}
    selected = torch.zeros(len(layout), dtype=torch.bool)
    for item in spec:
        named = groups.get(item)

        def matches(name: str, item: str = item, named: set[str] | None = named) -> bool:
            return name in named if named is not None else fnmatch.fnmatchcase(name, item)

        hits = torch.tensor([all(matches(name) for name in arm.param_names) for arm in layout], dtype=torch.bool)
        if not bool(hits.any()):
            raise ValueError(
                f"always_active: {item!r} selects no arm of this model ({layout.mode} arms; groups: "
                f"{', '.join(ARM_GROUPS)}; other entries are fnmatch patterns on parameter names)"
            )
        selected |= hits
    return selected
