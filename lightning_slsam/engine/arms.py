"""Arms: how a model's trainable parameters are grouped into the units a sampler turns on and off.

Three modes (docs/design.md#arms):

- ``"tensor"``: one arm per parameter tensor (weight and bias are separate arms); the paper's default.
- ``"module"``: one arm per module that directly owns parameters (a ``Linear``'s weight and bias together).
- ``"block"``: repeated blocks found automatically; each child of a run of two or more same-typed,
  parameter-holding children of an ``nn.ModuleList`` / ``nn.Sequential`` (transformer layers, ResNet
  blocks) is one arm; every parameter outside such a block is grouped by the module that owns it, so
  embeddings, norms and the head are arms of their own.

By default, parameters frozen when the layout is built (``requires_grad=False``) are not arms. The step's
adapters build the layout with ``include_frozen=True``: every parameter of the model is in an arm, and which
of them the step may train is read again at every step (:mod:`lightning_slsam.engine.trainable`), so that a layer frozen
or unfrozen during training, or a parameter group added to the optimizer, is followed. A parameter shared
by several modules (tied weights) belongs to the first arm that reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ArmMode = Literal["tensor", "module", "block"]
ARM_MODES: tuple[str, ...] = ("tensor", "module", "block")
ROOT_NAME = "(root)"


@dataclass(frozen=True, eq=False)
class Arm:
    """One group of parameters that is active or inactive as a whole.

    Attributes:
        name: the parameter name (``tensor`` mode) or the owning module's dotted path.
        param_names: the dotted names of its parameters, in ``named_parameters`` order.
        params: the parameters themselves (the module's own ``nn.Parameter`` objects).
    """

    name: str
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        """Number of scalar elements in the arm."""
        return sum(p.numel() for p in self.params)


class ArmLayout:
    """The ordered arms of one model, with the index tensors the vectorised step needs.

    Args:
        arms: the arms, in the order samplers index them.
        mode: the mode that built them (kept for checkpoints and display).
    """

    def __init__(self, arms: Sequence[Arm], mode: str) -> None:
        if not arms:
            raise ValueError("arms: the model has no trainable parameters to group into arms")
        self.arms: tuple[Arm, ...] = tuple(arms)
        self.mode = mode
        self.params: tuple[nn.Parameter, ...] = tuple(p for arm in self.arms for p in arm.params)
        #: for each parameter in ``params``, the index of its arm
        self.param_arm: torch.Tensor = torch.tensor(
            [i for i, arm in enumerate(self.arms) for _ in arm.params], dtype=torch.long
        )
        #: element count of each arm (int64)
        self.numels: torch.Tensor = torch.tensor([arm.numel for arm in self.arms], dtype=torch.long)
        self.total_numel: int = int(self.numels.sum())

    def __len__(self) -> int:
        return len(self.arms)

    def __iter__(self) -> Iterator[Arm]:
        return iter(self.arms)

    def __getitem__(self, index: int) -> Arm:
        return self.arms[index]

    @property
    def names(self) -> list[str]:
        """Arm names, in sampler order."""
        return [arm.name for arm in self.arms]

    def params_of(self, active: torch.Tensor | None) -> list[nn.Parameter]:
        """The parameters of the arms where ``active`` (bool, one per arm, on the CPU) is True; all if None."""
        if active is None:
            return list(self.params)
        flags = active.tolist()
        return [p for arm, on in zip(self.arms, flags, strict=True) if on for p in arm.params]

    def active_ratio(self, active: torch.Tensor) -> float:
        """Fraction of trainable elements in the active arms (the paper's active-parameter ratio)."""
        return float(self.numels[active.cpu()].sum()) / self.total_numel

    def fingerprint(self) -> dict[str, object]:
        """What a checkpoint must match to be loaded into this layout: mode, arm names and sizes."""
        return {"mode": self.mode, "names": self.names, "numels": self.numels.tolist()}

    def table(self, probs: torch.Tensor | None = None) -> str:
        """A plain-text table of the arms: index, name, elements and (optionally) probability."""
        rows = [f"{'#':>4}  {'arm':<48} {'elements':>12}" + ("  prob" if probs is not None else "")]
        for i, arm in enumerate(self.arms):
            row = f"{i:>4}  {arm.name:<48} {arm.numel:>12,}"
            if probs is not None:
                row += f"  {float(probs[i]):.4f}"
            rows.append(row)
        rows.append(f"{len(self.arms)} arms ({self.mode}), {self.total_numel:,} trainable elements")
        return "\n".join(rows)


def build_arms(module: nn.Module, mode: str = "tensor", *, include_frozen: bool = False) -> ArmLayout:
    """Split ``module``'s trainable parameters (every parameter with ``include_frozen``) into arms.

    Args:
        module: the model (usually the LightningModule itself).
        mode: ``"tensor"`` (default), ``"module"`` or ``"block"``; see the module docstring.
        include_frozen: also group the parameters with ``requires_grad=False`` (default False).

    Raises:
        ValueError: unknown ``mode``, or no trainable parameters.
    """
    if mode not in ARM_MODES:
        raise ValueError(f"arms: unknown arms mode {mode!r}; expected one of {', '.join(ARM_MODES)}")
    if mode == "tensor":
        arms = [Arm(name, (name,), (p,)) for name, p in module.named_parameters() if p.requires_grad or include_frozen]
    else:
        arms = _grouped_arms(module, blocks=mode == "block", include_frozen=include_frozen)
    return ArmLayout(arms, mode)


def _trainable(
    module: nn.Module, prefix: str, seen: set[int], recurse: bool, include_frozen: bool
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters (all with ``include_frozen``) of ``module`` not yet in an arm, marking them assigned."""
    found = []
    for name, p in module.named_parameters(recurse=recurse):
        if (p.requires_grad or include_frozen) and id(p) not in seen:
            seen.add(id(p))
            found.append((f"{prefix}.{name}" if prefix else name, p))
    return found


def _has_trainable(module: nn.Module, include_frozen: bool) -> bool:
    return any(p.requires_grad or include_frozen for p in module.parameters())


def _block_children(container: nn.Module, include_frozen: bool) -> set[str]:
    """Names of the children of ``container`` that sit in a run of >= 2 same-typed parameter holders."""
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return set()
    holders = [(name, child) for name, child in container.named_children() if _has_trainable(child, include_frozen)]
    blocks: set[str] = set()
    start = 0
    for end in range(1, len(holders) + 1):
        if end == len(holders) or type(holders[end][1]) is not type(holders[start][1]):
            if end - start >= 2:
                blocks.update(name for name, _ in holders[start:end])
            start = end
    return blocks


def _grouped_arms(root: nn.Module, blocks: bool, include_frozen: bool) -> list[Arm]:
    arms: list[Arm] = []
    seen: set[int] = set()

    def add(name: str, named: list[tuple[str, nn.Parameter]]) -> None:
        if named:
            arms.append(Arm(name or ROOT_NAME, tuple(n for n, _ in named), tuple(p for _, p in named)))

    def visit(module: nn.Module, prefix: str) -> None:
        add(prefix, _trainable(module, prefix, seen, recurse=False, include_frozen=include_frozen))
        block_names = _block_children(module, include_frozen) if blocks else set()
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if name in block_names:
                add(path, _trainable(child, path, seen, recurse=True, include_frozen=include_frozen))
            else:
                visit(child, path)

    visit(root, "")
    return arms
