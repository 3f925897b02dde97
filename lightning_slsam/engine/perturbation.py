"""Ascent math on a set of parameters: norms, SAM and ASAM perturbations, save and restore.

All functions work on lists of tensors with ``torch._foreach_*`` kernels (a handful of launches per step,
whatever the number of tensors) and never move a value to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: added to a gradient norm before dividing by it (the SAM papers' value)
NORM_EPS = 1e-12


def tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of each tensor, as one float32 vector (computed in float32 for half inputs, in float64 for
    float64 inputs: torch refuses to narrow a norm's input dtype)."""
    if not tensors:
        return torch.zeros(0)
    tensors = list(tensors)
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.stack(
            [
                torch.linalg.vector_norm(
                    t, 2, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32
                ).float()
                for t in tensors
            ]
        )
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def arm_norms(norms: Tensor, arm_index: Tensor, num_arms: int) -> Tensor:
    """Per-arm L2 norms from per-tensor norms: ``sqrt(sum of squares)`` over each arm's tensors.

    Args:
        norms: per-tensor norms (float32).
        arm_index: the arm of each tensor (int64, same length, same device as ``norms``).
        num_arms: N; arms with no tensor get 0.
    """
    squares = torch.zeros(num_arms, dtype=norms.dtype, device=norms.device)
    return squares.index_add_(0, arm_index, norms.square()).sqrt_()


def sam_perturbation(grads: Sequence[Tensor], rho: float, grad_norm: Tensor, in_place: bool) -> list[Tensor]:
    """SAM's ascent ``e = rho * g / (||g|| + 1e-12)`` (Foret et al. 2021).

    Args:
        grads: the gradients of the perturbed parameters.
        rho: radius (>= 0).
        grad_norm: ``||g||`` over the perturbed set (0-d float32 tensor); a non-finite value gives e = 0
            where ``g`` is finite (an inf in ``g`` itself still gives NaN there; such a step is skipped).
        in_place: scale ``grads`` themselves (saves memory when the caller no longer needs g).
    """
    scale = _finite_scale(rho, grad_norm)
    if in_place:
        torch._foreach_mul_(list(grads), scale)
        return list(grads)
    return list(torch._foreach_mul(list(grads), scale))


def adaptive_perturbation(
    params: Sequence[Tensor], grads: Sequence[Tensor], is_bias: Sequence[bool], rho: float, eta: float
) -> list[Tensor]:
    """ASAM's ascent ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` on weights, 1 on biases (Kwon 2021).

    Args:
        params: the perturbed parameters (their values at w).
        grads: their gradients.
        is_bias: True where a parameter is a bias (``T = 1`` there).
        rho: radius (>= 0).
        eta: the scale offset in ``T`` (>= 0).
    """
    scaled = []  # T g, then T^2 g
    for p, g, bias in zip(params, grads, is_bias, strict=True):
        scaled.append(g.clone() if bias else g * (p.detach().abs() + eta))
    norm = tensor_norms(scaled).norm()
    weights = [i for i, bias in enumerate(is_bias) if not bias]
    if weights:
        torch._foreach_mul_([scaled[i] for i in weights], [params[i].detach().abs().add_(eta) for i in weights])
    if scaled:
        torch._foreach_mul_(scaled, _finite_scale(rho, norm))
    return scaled


def _finite_scale(rho: float, grad_norm: Tensor) -> Tensor:
    """``rho / (||g|| + eps)``, or 0 where the norm is not finite (no host synchronisation)."""
    scale = rho / (grad_norm + NORM_EPS)
    return torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))


def save(params: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``params``' values, for a bitwise restore."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def apply(params: Sequence[Tensor], perturbation: Sequence[Tensor]) -> None:
    """``w <- w + e`` in place."""
    if params:
        torch._foreach_add_(list(params), list(perturbation))


@torch.no_grad()
def restore(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """``w <- saved``, bitwise (never ``w - e``, which drifts)."""
    if params:
        torch._foreach_copy_(list(params), list(saved))


class PerturbationGuard:
    """The weights a step has perturbed, and their values at ``w``, for as long as they are perturbed.

    The step records the saved copies (:meth:`hold`) before it adds the ascent and drops them only after the
    bitwise restore (:meth:`restore`). While a record is held the parameters' true values are the saved ones:
    an exception or a signal at any point of the step (Ctrl-C, a SLURM requeue that saves a checkpoint from its
    signal handler) can put them back (:meth:`restore`, idempotent) or write them into a checkpoint instead of
    ``w + e`` (:meth:`true_values`).
    """

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._saved: list[Tensor] = []

    @property
    def perturbed(self) -> bool:
        """Whether a perturbation is live (weights possibly at ``w + e``)."""
        return bool(self._params)

    def hold(self, params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
        """Record ``saved`` as the true values of ``params`` (call before the ascent is applied)."""
        self._params, self._saved = list(params), list(saved)

    def restore(self) -> None:
        """Put the held parameters back to their saved values, bitwise, and drop the record (no-op when none)."""
        if self._params:
            restore(self._params, self._saved)
        self._params, self._saved = [], []

    def true_values(self) -> dict[int, Tensor]:
        """The saved value of each perturbed parameter, by the ``data_ptr`` of its storage (empty when none)."""
        return {p.data_ptr(): s for p, s in zip(self._params, self._saved, strict=True) if p.numel()}

    def patch_state_dict(self, state_dict: dict[str, Any]) -> int:
        """Replace, in a model ``state_dict`` taken during a step, the perturbed weights by their values at ``w``.

        Entries are matched by storage (``state_dict()`` tensors share it with the parameters), so prefixes and
        tied names are covered. Returns how many entries were replaced.
        """
        true = self.true_values()
        if not true:
            return 0
        replaced = 0
        for key, value in state_dict.items():
            if isinstance(value, Tensor) and value.data_ptr() in true and true[value.data_ptr()].shape == value.shape:
                state_dict[key] = true[value.data_ptr()].clone()
                replaced += 1
        return replaced
