"""``arsam``: ARSAM (Deng & Pang 2025, arXiv 2510.03763), reusing and mixing SAM's decomposed gradient.

SAM's gradient decomposes as ``g(w + e) = g(w) + PSF`` with ``PSF = g(w + e) - g(w)`` (the projection of the
second-order term onto the first-order gradient). A *refresh* step is a SAM step (two passes) that also
stores the PSF. Every other step is one pass at w and the optimizer sees ``g(w) + beta^k PSF``, k the
number of one-pass steps since the refresh (the mix is dropped after ``mix_steps`` of them). A step
refreshes when any of:

* no PSF is stored yet, or the run is still in its warm-up (``warmup_steps`` / ``warmup_epochs``);
* ``max_interval`` steps have passed since the last refresh;
* the ratio ``||PSF|| / ||g||`` of the stored PSF to the current gradient has drifted by more than
  ``threshold`` (relative) from its value at the refresh. The PSF norm cancels, so the test is
  ``| ||g_ref|| / ||g_t|| - 1 | > threshold``, ``g_ref`` the gradient of the refresh step: no second pass and
  no rank-local quantity is needed to decide, so every DDP rank decides alike.

See ``docs/methods/arsam.md`` for the equations, the defaults and what was inferred beyond the paper text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_fraction, check_int, check_number, check_rho
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import EpochStart, Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.perturbation import NORM_EPS, tensor_norms


@dataclasses.dataclass(frozen=True)
class ARSAMOptions(MethodOptions):
    """ARSAM (Deng & Pang 2025): SAM's gradient split as g(w) + PSF; the PSF is computed exactly on refresh
    steps (two passes) and reused, decaying, on one-pass steps in between (docs/methods/arsam.md).

    Args:
        rho: perturbation radius of the refresh steps (>= 0; default 0.05).
        threshold: refresh when the ratio ``||PSF|| / ||g||`` has changed by more than this fraction since the
            last refresh (>= 0; ``inf`` turns the adaptive test off; default 0.2). Deciding reads one
            boolean from the device on steps where the test runs (not on forced refreshes).
        max_interval: at most this many steps from one refresh to the next, i.e. at most
            ``max_interval - 1`` one-pass steps in a row (int >= 1; 1 is SAM; default 5).
        mix_decay: beta, the weight of the reused PSF on the k-th one-pass step after a refresh is
            ``beta^k`` (in [0, 1]; 1 reuses it unchanged; default 0.7, the authors').
        mix_steps: the PSF is mixed into at most this many one-pass steps after a refresh, plain ``g``
            afterwards (int >= 0, or None for no limit; default 6, the authors').
        warmup_steps: refresh on every one of the first this many steps (int >= 0; default 0).
        warmup_epochs: refresh on every step of the first this many epochs (int >= 0; default 0; the
            authors' code uses 3).
        last_arms: measure ``||g||`` for the ratio test over the last this many arms only (the authors
            measure the last layers); None (default) uses every arm. More than the model has means all.
    """

    name = "arsam"

    rho: float = 0.05
    threshold: float = 0.2
    max_interval: int = 5
    mix_decay: float = 0.7
    mix_steps: int | None = 6
    warmup_steps: int = 0
    warmup_epochs: int = 0
    last_arms: int | None = None

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        what = "the ratio-drift threshold"
        self._set("threshold", check_number("threshold", self.threshold, minimum=0.0, allow_inf=True, what=what))
        check_int("max_interval", self.max_interval, 1, what="the longest distance between refreshes")
        what = "the decay of the reused PSF"
        self._set("mix_decay", check_fraction("mix_decay", self.mix_decay, low_open=False, what=what))
        check_int("mix_steps", self.mix_steps, 0, optional=True, what="the number of one-pass steps that mix the PSF")
        check_int("warmup_steps", self.warmup_steps, 0, what="the number of warm-up steps")
        check_int("warmup_epochs", self.warmup_epochs, 0, what="the number of warm-up epochs")
        check_int("last_arms", self.last_arms, 1, optional=True, what="the number of arms measured")

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return ARSAMMethod(**self.as_dict())


class ARSAMMethod(Method):
    """ARSAM on the shared step: SAM on refresh steps, ``g + beta^k PSF`` on the one-pass steps between them.

    Arguments: :class:`ARSAMOptions`.
    """

    name = "arsam"

    def __init__(
        self,
        rho: float,
        threshold: float,
        max_interval: int,
        mix_decay: float,
        mix_steps: int | None,
        warmup_steps: int,
        warmup_epochs: int,
        last_arms: int | None,
    ) -> None:
        super().__init__(rho)
        self.threshold = float(threshold)
        self.max_interval = max_interval
        self.mix_decay = float(mix_decay)
        self.mix_steps = mix_steps
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.last_arms = last_arms
        # --- state (state_dict) ---
        #: steps taken, refresh (two-pass) steps and reuse (one-pass) steps among them
        self.steps = 0
        self.refreshes = 0
        self.reuses = 0
        #: one-pass steps since the last refresh
        self.since_refresh = 0
        #: the stored PSF, unscaled (divided by the AMP loss scale), by parameter index in the layout
        self.psf: dict[int, Tensor] = {}
        #: ``||g||`` (over the ratio arms, unscaled) at the last refresh; 0-d tensor on the device
        self.g_ref: Tensor | None = None
        #: diagnostics: ``||PSF|| / ||g||`` at the last refresh, and the last ratio drift that was tested
        self.psf_ratio: Tensor | None = None
        self.last_drift: Tensor | None = None
        # --- per run ---
        self._index: dict[int, int] = {}
        self._ratio_arms: Tensor = torch.ones(0, dtype=torch.bool)
        self._epoch = 0
        self._decision: bool | None = None  # this step's choice, between pass2_arms and after_step
        self._before_step: tuple[Any, ...] | None = None

    def setup(self, layout: ArmLayout) -> None:
        super().setup(layout)
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        mask = torch.ones(len(layout), dtype=torch.bool)
        if self.last_arms is not None and self.last_arms < len(layout):
            mask[: len(layout) - self.last_arms] = False
        self._ratio_arms = mask

    def start_epoch(self, start: EpochStart) -> None:
        self._epoch = start.epoch

    @property
    def mean_passes(self) -> float:
        """Forward-backward passes per step so far (2 for SAM, 1 for the base optimizer); 0 before any step."""
        return (2 * self.refreshes + self.reuses) / self.steps if self.steps else 0.0

    # --- decisions of one step -------------------------------------------------------------------------
    def must_refresh(self, first: PassOne) -> bool:
        """Whether this step refreshes the PSF (two passes); see the module docstring."""
        if not self.psf or self.g_ref is None:
            return True
        if self.steps < self.warmup_steps or self._epoch < self.warmup_epochs:
            return True
        if self.since_refresh + 1 >= self.max_interval:
            return True
        if math.isinf(self.threshold):
            return False
        g_now = first.norm_over(self._ratio_arms)
        self.last_drift = (self.g_ref / g_now - 1.0).abs()
        return bool(self.last_drift > self.threshold)  # the one host read of a step

    def pass2_arms(self, first: PassOne) -> Tensor | None:
        refresh = self.must_refresh(first)
        self._decision = refresh
        self.keeps_first_gradient = refresh  # combine needs g(w) to form the PSF
        return first.active if refresh else None

    def combine(self, params: Sequence[nn.Parameter], first_grads: Sequence[Tensor] | None, first: PassOne) -> None:
        """Refresh: the optimizer sees g(w + e) (SAM, untouched); store ``PSF = (g(w + e) - g(w)) / scale``."""
        assert first_grads is not None, "ARSAM sets keeps_first_gradient on refresh steps"
        if not params:
            return
        second = [p.grad for p in params]
        new = torch._foreach_sub(second, list(first_grads))
        torch._foreach_div_(new, first.grad_scale.to(new[0].dtype))
        psf_norm = tensor_norms(new).norm()
        # a non-finite PSF (fp16 overflow in pass 2) would poison every reuse: keep the previous one instead
        ok = torch.isfinite(psf_norm) & first.finite
        psf: dict[int, Tensor] = {}
        for p, t in zip(params, new, strict=True):
            index = self._index[id(p)]
            old = self.psf.get(index)
            psf[index] = torch.where(ok, t, old if old is not None and old.shape == t.shape else 0.0)
        self.psf = psf
        g_now = first.norm_over(self._ratio_arms)
        self.g_ref = g_now if self.g_ref is None else torch.where(ok, g_now, self.g_ref)
        ratio = psf_norm / (first.norm_over(first.active, local=True) + NORM_EPS)
        self.psf_ratio = ratio if self.psf_ratio is None else torch.where(ok, ratio, self.psf_ratio)

    def mix_weight(self, k: int) -> float:
        """The weight of the stored PSF on the k-th one-pass step after a refresh (k >= 1)."""
        if self.mix_steps is not None and k > self.mix_steps:
            return 0.0
        return self.mix_decay**k

    def single_pass_gradient(self, first: PassOne) -> None:
        """Reuse: ``p.grad = g(w) + beta^k scale * PSF`` (``p.grad`` carries the current loss scale)."""
        weight = self.mix_weight(self.since_refresh + 1)
        if weight == 0.0 or not self.psf:
            return
        grads, stored = [], []
        for p in first.params:
            t = self.psf.get(self._index[id(p)])
            if t is not None and p.grad is not None:
                grads.append(p.grad)
                stored.append(t)
        if grads:
            coefficient = (first.grad_scale * weight).to(grads[0].dtype)
            torch._foreach_add_(grads, torch._foreach_mul(stored, coefficient))

    def after_step(self, first: PassOne) -> None:
        decision, self._decision = self._decision, None
        if decision is None:  # the step decided nothing (pass 1 overflowed): nothing to count
            return
        self.steps += 1
        if decision:
            self.refreshes += 1
            self.since_refresh = 0
        else:
            self.reuses += 1
            self.since_refresh += 1

    def begin_step(self) -> None:
        # combine replaces the dict and the tensors, never edits them in place: references suffice
        self._before_step = (self.psf, self.g_ref, self.psf_ratio, self.last_drift)

    def discard_step(self) -> None:
        self._decision = None  # neither a refresh nor a reuse: the counters stay
        if self._before_step is not None:
            self.psf, self.g_ref, self.psf_ratio, self.last_drift = self._before_step
            self._before_step = None

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        return {
            "steps": self.steps,
            "refreshes": self.refreshes,
            "reuses": self.reuses,
            "since_refresh": self.since_refresh,
            "psf": {i: t.detach().clone() for i, t in self.psf.items()},
            "g_ref": copy(self.g_ref),
            "psf_ratio": copy(self.psf_ratio),
            "last_drift": copy(self.last_drift),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.layout is not None, "setup(layout) must run before load_state_dict"
        device = self.layout.params[0].device

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device).clone()

        self.steps = int(state["steps"])
        self.refreshes = int(state["refreshes"])
        self.reuses = int(state["reuses"])
        self.since_refresh = int(state["since_refresh"])
        self.psf = {int(i): t.to(self.layout.params[int(i)].device).clone() for i, t in state["psf"].items()}
        self.g_ref = move(state["g_ref"])
        self.psf_ratio = move(state["psf_ratio"])
        self.last_drift = move(state["last_drift"])
        self._decision = None
