"""``slsam``: Sparse-Layer SAM (Cheng et al. 2026, arXiv 2602.09395).

Each step a sampler picks the active arms S; only S has gradients in pass 1 and pass 2, the ascent is
``rho g_S / ||g_S||`` on S, and the optimizer sees ``g_S(w + e)`` (every other arm has ``grad=None``, so
AdamW leaves it and its state alone). The bandit learns from the pass-1 norms ``||g_i||``, i in S.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.methods.interface import Method, PassOne
from lightning_slsam.samplers import ArmSampler


class SLSAMMethod(Method):
    """SL-SAM on any sampler.

    Args:
        rho: perturbation radius (>= 0).
        sampler: the arm sampler (``Exp3Sampler`` for the paper, ``UniformSampler`` for random layers);
            its ``num_arms`` must equal the model's arm count.
        max_update_scale: ``None`` (default, the paper's) leaves the optimizer's update alone. A number
            c >= 1 scales the update of each active arm i by ``min(1 / p_i, c)``, with ``p_i`` the
            probability it was sampled with: an arm trained on a fraction p_i of the steps then moves, in
            expectation, as far per step as one trained on every step (``w <- w0 + s_i (w - w0)`` after the
            optimizer step, so it applies to any optimizer, weight decay included). Costs one copy of the
            active parameters per step.

    The bandit update of step t is applied lazily, just before step t+1 samples: the same order as the
    paper, but the per-arm norms travel to the sampler's device without stalling the accelerator.
    """

    name = "slsam"
    sparse_pass_one = True

    def __init__(self, rho: float, sampler: ArmSampler, max_update_scale: float | None = None) -> None:
        super().__init__(rho)
        if max_update_scale is not None and not (
            isinstance(max_update_scale, (int, float)) and 1.0 <= max_update_scale < float("inf")
        ):
            raise ValueError(f"max_update_scale: must be a finite number >= 1 or None, got {max_update_scale!r}")
        self.sampler = sampler
        self.max_update_scale = None if max_update_scale is None else float(max_update_scale)
        self._pending: tuple[Tensor, Tensor, Any] | None = None
        #: with max_update_scale: the scaled parameters, their values before this step's update, their factors
        self._before: tuple[list[nn.Parameter], list[Tensor], list[float]] | None = None
        self._arm_of: dict[int, int] = {}
        self._before_step: dict[str, Any] | None = None

    def setup(self, layout) -> None:
        super().setup(layout)
        if self.sampler.num_arms != len(layout):
            raise ValueError(
                f"sampler: it has {self.sampler.num_arms} arms but the model has {len(layout)} ({layout.mode} arms)"
            )
        self._arm_of = {id(p): int(i) for p, i in zip(layout.params, layout.param_arm.tolist(), strict=True)}

    def pass1_arms(self) -> Tensor:
        self._flush()
        self._before = None
        return self.sampler.sample().cpu()

    def combine(self, params: Sequence[nn.Parameter], first_grads: Sequence[Tensor] | None, first: PassOne) -> None:
        if self.max_update_scale is None or self.max_update_scale == 1.0:
            return
        # the probabilities this step was sampled with: the bandit's update is applied before the next sample
        scale = self.sampler.probs.reciprocal().clamp(max=self.max_update_scale).tolist()
        scaled = [(p, scale[self._arm_of[id(p)]]) for p in params if scale[self._arm_of[id(p)]] != 1.0]
        if scaled:  # keep w before the optimizer step of the arms whose update is scaled (not the pinned ones)
            self._before = ([p for p, _ in scaled], [p.detach().clone() for p, _ in scaled], [f for _, f in scaled])

    def _scale_updates(self) -> None:
        """``w <- w0 + min(1 / p_i, c) (w - w0)`` on the arms of this step whose factor is not 1."""
        assert self._before is not None
        params, before, factors = self._before
        self._before = None
        with torch.no_grad():
            weights = [p.detach() for p in params]
            torch._foreach_sub_(weights, before)
            torch._foreach_mul_(weights, factors)
            torch._foreach_add_(weights, before)

    def after_step(self, first: PassOne) -> None:
        if self._before is not None:
            self._scale_updates()
        # a non-finite step reaches the sampler as NaN norms, which its update ignores
        norms = torch.where(first.finite, first.arm_norms.detach(), float("nan"))
        event = None
        if norms.device.type == "cuda" and self.sampler.device.type == "cpu":
            host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
            host.copy_(norms, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            norms = host
        self._pending = (first.active, norms, event)

    def begin_step(self) -> None:
        # the previous step's update first, then a copy of the sampler (probabilities, generator: N floats and
        # a CPU generator state), so that a skipped step neither teaches the bandit nor moves its generator
        self._flush()
        self._before_step = self.sampler.state_dict()

    def discard_step(self) -> None:
        self._pending = None
        self._before = None  # the optimizer did not step (or its scaler skipped): nothing to scale
        if self._before_step is not None:
            self.sampler.load_state_dict(self._before_step)
            self._before_step = None

    def _flush(self) -> None:
        if self._pending is None:
            return
        active, norms, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self.sampler.update(active, norms.to(self.sampler.device))

    def probabilities(self) -> Tensor:
        self._flush()
        return self.sampler.probs

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        self.sampler.load_state_dict(state["sampler"])
