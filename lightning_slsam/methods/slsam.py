"""``slsam``: Sparse-Layer SAM (Cheng et al. 2026, arXiv 2602.09395).

Each step a sampler picks the active arms S; only S has gradients in pass 1 and pass 2, the ascent is
``rho g_S / ||g_S||`` on S, and the optimizer sees ``g_S(w + e)`` (every other arm has ``grad=None``, so
AdamW leaves it and its state alone). The bandit learns from the pass-1 norms ``||g_i||``, i in S.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_slsam.methods.interface import Method, PassOne
from lightning_slsam.samplers import ArmSampler


class SLSAMMethod(Method):
    """SL-SAM on any sampler.

    Args:
        rho: perturbation radius (>= 0).
        sampler: the arm sampler (``Exp3Sampler`` for the paper, ``UniformSampler`` for random layers);
            its ``num_arms`` must equal the model's arm count.

    The bandit update of step t is applied lazily, just before step t+1 samples: the same order as the
    paper, but the per-arm norms travel to the sampler's device without stalling the accelerator.
    """

    name = "slsam"
    sparse_pass_one = True

    def __init__(self, rho: float, sampler: ArmSampler) -> None:
        super().__init__(rho)
        self.sampler = sampler
        self._pending: tuple[Tensor, Tensor, Any] | None = None
        self._before_step: dict[str, Any] | None = None

    def setup(self, layout) -> None:
        super().setup(layout)
        if self.sampler.num_arms != len(layout):
            raise ValueError(
                f"sampler: it has {self.sampler.num_arms} arms but the model has {len(layout)} ({layout.mode} arms)"
            )

    def pass1_arms(self) -> Tensor:
        self._flush()
        return self.sampler.sample().cpu()

    def after_step(self, first: PassOne) -> None:
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
