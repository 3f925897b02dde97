"""``ssam_f`` and ``ssam_d``: Sparse SAM (Mi et al. 2022, "Make Sharpness-Aware Minimization Stronger: A
Sparsified Perturbation Approach", NeurIPS 2022).

Both perturb only the elements of a binary mask ``m`` (over every element of every parameter of the layout):

    e = (rho g / ||g||) ⊙ m        ||g|| over the FULL pass-1 gradient, not the masked one

and the optimizer sees g(w + e) on every parameter. They differ in how ``m`` is chosen:

- ``ssam_f`` (:class:`SSAMFMethod`): the global top ``1 - unperturbed_fraction`` of elements by an empirical
  Fisher score (:mod:`lightning_slsam.methods.fisher_score`) over ``num_samples`` training samples,
  recomputed at the start of epoch 0 and every ``update_every_epochs`` epochs after;
- ``ssam_d`` (:class:`SSAMDMethod`): a random mask, then at the first step of every ``update_every_epochs``-th
  epoch after the first, drop the ``d_t`` fraction of live elements with the lowest score and grow as many
  dead ones (the live count never changes), ``d_t`` cosine-decayed over training.

``unperturbed_fraction`` is the fraction of elements NOT perturbed (0 perturbs everything: SAM). The paper and
the authors' code call it "sparsity"; this package does not, because SL-SAM's ``sparsity`` means the opposite
(the fraction of arms that ARE active). See ``docs/methods/ssam.md`` for the update rule, costs and where this
departs from the authors' code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_choice, check_fraction, check_int, check_rho, check_seed
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.distributed import all_reduce_mean, broadcast_seed
from lightning_slsam.engine.method import EpochStart, Method
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.perturbation import sam_perturbation
from lightning_slsam.methods.fisher_score import PER_SAMPLE, preserved_rng, scores_and_way

DROP_SCORES = ("gradient", "random")
GROW_SCORES = ("random", "gradient")
#: the paper's and the authors' name for ``unperturbed_fraction``, refused with a pointer to the new name
RENAMED = {"sparsity": "unperturbed_fraction"}


def live_count(unperturbed_fraction: float, total: int) -> int:
    """The number of perturbed ("live") elements: ``round((1 - unperturbed_fraction) * total)``."""
    return min(total, max(0, round((1.0 - unperturbed_fraction) * total)))


def cosine_drop_rate(drop_rate: float, epoch: int, total_epochs: int | None) -> float:
    """SSAM-D's drop-rate schedule ``d_t = drop_rate / 2 * (1 + cos(pi * epoch / total_epochs))``.

    ``epoch / total_epochs`` is clipped to [0, 1]; ``total_epochs=None`` (unbounded training) gives
    ``drop_rate`` unchanged.
    """
    if total_epochs is None or total_epochs <= 0:
        return drop_rate
    progress = min(max(epoch / total_epochs, 0.0), 1.0)
    return drop_rate / 2.0 * (1.0 + math.cos(math.pi * progress))


# --- the shared masked ascent ----------------------------------------------------------------------------------
class _MaskedSAM(Method):
    """SAM's ascent times an element mask; the mask is one flat bool tensor, seen per parameter as views."""

    def __init__(self, rho: float, unperturbed_fraction: float, update_every_epochs: int) -> None:
        super().__init__(rho)  # the arguments are checked by the options (SSAMFOptions, SSAMDOptions)
        self.unperturbed_fraction = float(unperturbed_fraction)
        self.update_every_epochs = int(update_every_epochs)
        self._flat: Tensor | None = None
        #: the mask of each parameter of the layout (bool, same shape and device), in layout order
        self.masks: list[Tensor] = []
        #: the epochs at which the mask was refreshed, in order
        self.refresh_epochs: list[int] = []
        self._index: dict[int, int] = {}
        self._numels: list[int] = []

    def setup(self, layout: ArmLayout) -> None:
        super().setup(layout)
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        self._numels = [p.numel() for p in layout.params]

    @property
    def total_numel(self) -> int:
        """Number of maskable elements (every element of every layout parameter)."""
        return sum(self._numels)

    @property
    def num_live(self) -> int:
        """Number of perturbed elements of the current mask (host read)."""
        if self._flat is None:
            raise RuntimeError(f"{self.name}: the mask has not been computed yet")
        return int(self._flat.sum())

    def _set_mask(self, flat: Tensor) -> None:
        assert self.layout is not None
        assert flat.dtype == torch.bool and flat.numel() == self.total_numel
        self._flat = flat
        self.masks = [
            view.view(p.shape).to(p.device)
            for view, p in zip(flat.split(self._numels), self.layout.params, strict=True)
        ]

    def perturbation(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor], grad_norm: Tensor) -> list[Tensor]:
        if self._flat is None:
            raise RuntimeError(
                f"{self.name}: no perturbation mask: the mask is computed in start_epoch; resuming in the "
                "middle of an epoch needs the callback's checkpoint state"
            )
        ascent = sam_perturbation(grads, self.rho, grad_norm, in_place=not self.keeps_first_gradient)
        if ascent:
            self._follow(params[0].device)
            torch._foreach_mul_(ascent, [self.masks[self._index[id(p)]] for p in params])
        return ascent

    def _follow(self, device: torch.device) -> None:
        """Move the mask to the parameters' device if the model moved after the mask was made."""
        if self._flat is not None and self._flat.device != device:
            self._set_mask(self._flat.to(device))

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": None if self._flat is None else [m.detach().cpu().clone() for m in self.masks],
            "refresh_epochs": list(self.refresh_epochs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.layout is not None, "load_state_dict needs setup(layout) first"
        self.refresh_epochs = [int(e) for e in state["refresh_epochs"]]
        masks = state["masks"]
        if masks is None:
            self._flat, self.masks = None, []
            return
        params = self.layout.params
        if len(masks) != len(params) or any(m.shape != p.shape for m, p in zip(masks, params, strict=True)):
            raise ValueError(f"{self.name}: the checkpoint's masks do not match the model's parameter shapes")
        device = params[0].device
        self._set_mask(torch.cat([m.to(device=device, dtype=torch.bool).reshape(-1) for m in masks]))


# --- SSAM-F ----------------------------------------------------------------------------------------------------
class SSAMFMethod(_MaskedSAM):
    """SSAM-F: the perturbation mask keeps the elements with the largest empirical Fisher information.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        unperturbed_fraction: the fraction of elements NOT perturbed, in [0, 1] (default 0.5); the mask keeps
            the global top ``round((1 - unperturbed_fraction) * numel)`` elements by score.
        num_samples: training samples whose squared per-sample gradients are summed into the score (>= 1;
            default 128, the authors').
        update_every_epochs: recompute the mask at the start of every this many epochs, starting at epoch 0
            (>= 1; default 1).
        per_sample: how per-sample gradients are taken: ``"vmap"`` (``torch.func``), ``"loop"`` (one backward
            per sample) or ``"auto"`` (default: vmap, falling back to the loop with a warning if vmap fails).

    Arguments are checked by :class:`SSAMFOptions`. At a refresh the method asks the epoch's
    :class:`EpochStart` for ``num_samples`` training samples (``draw_samples``: a fresh iteration of the
    Trainer's training loader, or the plain optimizer's ``fisher_data``; the global RNG is put back afterwards,
    so the training order is the one a run without it would see) and differentiates ``loss_of`` on
    single-sample batches with the module in **eval mode**
    (:func:`~lightning_slsam.methods.fisher_score.fisher_scores`).
    Under DDP each rank scores its own samples and the scores are averaged, so every rank keeps the same mask.
    """

    name = "ssam_f"

    def __init__(
        self,
        rho: float,
        unperturbed_fraction: float,
        num_samples: int,
        update_every_epochs: int,
        per_sample: Literal["auto", "vmap", "loop"],
    ) -> None:
        super().__init__(rho, unperturbed_fraction, update_every_epochs)
        self.num_samples = int(num_samples)
        self.per_sample = str(per_sample)
        #: how the last refresh took its per-sample gradients ("vmap" or "loop"), None before the first
        self.per_sample_used: str | None = None
        self._vmap_failed = False

    def start_epoch(self, start: EpochStart) -> None:
        epoch = start.epoch
        due = epoch % self.update_every_epochs == 0 and (not self.refresh_epochs or self.refresh_epochs[-1] != epoch)
        if self._flat is None or due:
            self.refresh(start)

    def refresh(self, start: EpochStart) -> None:
        """Recompute the mask from ``num_samples`` training samples (all ranks at once)."""
        assert self.layout is not None
        if start.draw_samples is None or start.module is None:
            raise RuntimeError(
                "ssam_f: its Fisher score needs training samples: under the Trainer they come from the training "
                "dataloader; with lightning_slsam.optim.SSAMF pass fisher_data= (and call start_epoch)"
            )
        params = list(self.layout.params)
        # only the trainable parameters are scored (frozen ones could not be differentiated, and are never
        # perturbed): the mask's live count is a fraction of their elements
        eligible = self.all_arms.tolist() if len(self.all_arms) == len(self.layout) else [True] * len(self.layout)
        arm_of = self.layout.param_arm.tolist()
        scored = [p for p, arm in zip(params, arm_of, strict=True) if p.requires_grad and eligible[arm]]
        with preserved_rng(params[0].device):
            batches = start.draw_samples(self.num_samples)
            mode = "loop" if self.per_sample == "auto" and self._vmap_failed else self.per_sample
            scores, self.per_sample_used = scores_and_way(start.module, batches, scored, mode, start.loss_of)
        if self.per_sample == "auto" and self.per_sample_used == "loop":
            self._vmap_failed = True
        by_param = {id(p): s for p, s in zip(scored, scores, strict=True)}
        flat = torch.cat(
            [
                by_param[id(p)].reshape(-1)
                if id(p) in by_param
                else torch.full((p.numel(),), -math.inf, device=params[0].device)
                for p in params
            ]
        )
        all_reduce_mean([flat])  # every rank keeps the same mask
        live = live_count(self.unperturbed_fraction, sum(p.numel() for p in scored))
        self._set_mask(top_k_mask(flat, live))
        self.refresh_epochs.append(start.epoch)


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest ``scores`` (flat); ties go to the lower index (deterministic)."""
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask


# --- SSAM-D ----------------------------------------------------------------------------------------------------
class SSAMDMethod(_MaskedSAM):
    """SSAM-D: a random perturbation mask updated by a drop-and-grow schedule (dynamic sparse training).

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        unperturbed_fraction: the fraction of elements NOT perturbed, in [0, 1] (default 0.5); the mask always
            has ``round((1 - unperturbed_fraction) * numel)`` live elements.
        drop_rate: the fraction of live elements replaced at a refresh at the start of training, in [0, 1]
            (default 0.5); cosine-decayed to 0 over ``max_epochs`` (see :func:`cosine_drop_rate`).
        update_every_epochs: refresh at the first step of epochs ``k * update_every_epochs``, k >= 1 (>= 1;
            default 1).
        drop: the score whose lowest live elements are dropped: ``"gradient"`` (``|g|`` of that step's pass-1
            gradient; default) or ``"random"``.
        grow: the score whose highest dead elements are grown: ``"random"`` (default) or ``"gradient"``.
        seed: seed of the mask's random generator; None draws it from the global torch RNG (so
            ``seed_everything`` fixes it), the same on every rank.

    At a refresh ``n = min(floor(d_t * live), dead)`` elements are dropped and ``n`` grown among the elements
    dead before the refresh (an element just dropped cannot grow back at once), and the step that refreshes
    already perturbs with the new mask. Under DDP the ``|g|`` scores are averaged over ranks first, so every
    rank keeps the same mask.
    """

    name = "ssam_d"

    def __init__(
        self,
        rho: float,
        unperturbed_fraction: float,
        drop_rate: float,
        update_every_epochs: int,
        drop: Literal["gradient", "random"],
        grow: Literal["random", "gradient"],
        seed: int | None,
    ) -> None:
        super().__init__(rho, unperturbed_fraction, update_every_epochs)
        self.drop_rate = float(drop_rate)
        self.drop = str(drop)
        self.grow = str(grow)
        self.seed = seed
        self.generator = torch.Generator()
        #: the epoch-count the drop rate decays over (from the Trainer), None when training is unbounded
        self.total_epochs: int | None = None
        self.epoch = 0
        self._pending = False
        self._before_step: tuple[Any, ...] | None = None

    def setup(self, layout: ArmLayout) -> None:
        super().setup(layout)
        self.generator.manual_seed(broadcast_seed(self.seed))  # every rank draws the same mask
        total = self.total_numel
        live = torch.randperm(total, generator=self.generator)[: live_count(self.unperturbed_fraction, total)]
        flat = torch.zeros(total, dtype=torch.bool)
        flat[live] = True
        self._set_mask(flat.to(layout.params[0].device))

    def start_epoch(self, start: EpochStart) -> None:
        self.epoch = start.epoch
        self.total_epochs = start.total_epochs
        already = bool(self.refresh_epochs) and self.refresh_epochs[-1] == self.epoch
        self._pending = self.epoch > 0 and self.epoch % self.update_every_epochs == 0 and not already

    def begin_step(self) -> None:
        # only a step that may drop and grow changes the mask (_set_mask replaces it, never edits it in place)
        self._before_step = (
            (self._flat, self.masks, list(self.refresh_epochs), self.generator.get_state()) if self._pending else None
        )

    def discard_step(self) -> None:
        if self._before_step is not None:
            self._flat, self.masks, self.refresh_epochs, generator = self._before_step
            self.generator.set_state(generator)
            self._pending = True  # drop and grow at the next step instead
            self._before_step = None

    def current_drop_rate(self) -> float:
        """``d_t`` of the current epoch."""
        return cosine_drop_rate(self.drop_rate, self.epoch, self.total_epochs)

    def perturbation(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor], grad_norm: Tensor) -> list[Tensor]:
        if self._pending:
            self._drop_and_grow(params, grads)
        return super().perturbation(params, grads, grad_norm)

    def _drop_and_grow(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
        assert self._flat is not None
        if params:
            self._follow(params[0].device)
        magnitude = None
        if "gradient" in (self.drop, self.grow):
            magnitude = self._gradient_magnitude(params, grads)
            all_reduce_mean([magnitude])  # the same mask on every rank
            if not bool(torch.isfinite(magnitude).all()):  # an overflowed step: try again at the next one
                return
        self._pending = False
        self.refresh_epochs.append(self.epoch)
        live = self._flat
        num_live = int(live.sum())
        n = min(math.floor(self.current_drop_rate() * num_live), live.numel() - num_live)
        if n <= 0:
            return
        drop_score = magnitude if self.drop == "gradient" else self._uniform(live)
        grow_score = magnitude if self.grow == "gradient" else self._uniform(live)
        assert drop_score is not None and grow_score is not None
        inf = torch.tensor(float("inf"), device=live.device)
        dropped = torch.argsort(torch.where(live, drop_score, inf), stable=True)[:n]
        grown = torch.argsort(torch.where(live, -inf, grow_score), descending=True, stable=True)[:n]
        updated = live.clone()
        updated[dropped] = False
        updated[grown] = True
        self._set_mask(updated)

    def _gradient_magnitude(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> Tensor:
        """``|g|`` over every layout element, float32 (0 for parameters without a gradient)."""
        assert self.layout is not None and self._flat is not None
        given = {id(p): g for p, g in zip(params, grads, strict=True)}
        parts = []
        for p in self.layout.params:
            g = given.get(id(p))
            parts.append(
                torch.zeros(p.numel(), dtype=torch.float32, device=self._flat.device)
                if g is None
                else g.detach().reshape(-1).abs().to(device=self._flat.device, dtype=torch.float32)
            )
        return torch.cat(parts)

    def _uniform(self, like: Tensor) -> Tensor:
        return torch.rand(like.numel(), generator=self.generator).to(like.device)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            generator=self.generator.get_state(),
            epoch=self.epoch,
            total_epochs=self.total_epochs,
            pending=self._pending,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.total_epochs = state["total_epochs"]
        self._pending = bool(state["pending"])


# --- the options (one definition per method, methods/options.py) ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class SSAMFOptions(MethodOptions):
    """SSAM-F (Mi et al. 2022): SAM's ascent masked to the elements with the largest empirical Fisher score.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        unperturbed_fraction: fraction of elements NOT perturbed, in [0, 1] (default 0.5; the paper's
            "sparsity", renamed because SL-SAM's ``sparsity`` is the fraction of arms that ARE active).
        num_samples: training samples whose per-sample gradients make the Fisher score (int >= 1; default 128).
        update_every_epochs: refresh the mask at the start of every this-many epochs (int >= 1; default 1).
        per_sample: ``"auto"`` (torch.func vmap, falling back to a loop), ``"vmap"`` or ``"loop"``.
    """

    name = "ssam_f"
    renamed: ClassVar[dict[str, str]] = RENAMED

    rho: float = 0.05
    unperturbed_fraction: float = 0.5
    num_samples: int = 128
    update_every_epochs: int = 1
    per_sample: str = "auto"

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        what = "the fraction of elements not perturbed"
        self._set(
            "unperturbed_fraction",
            check_fraction("unperturbed_fraction", self.unperturbed_fraction, low_open=False, what=what),
        )
        check_int("num_samples", self.num_samples, 1, what="the number of Fisher samples")
        check_int("update_every_epochs", self.update_every_epochs, 1, what="the mask refresh interval")
        check_choice("per_sample", self.per_sample, PER_SAMPLE)

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return SSAMFMethod(**self.as_dict())  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class SSAMDOptions(MethodOptions):
    """SSAM-D (Mi et al. 2022): SAM's ascent masked by a random mask evolved by drop-and-grow.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        unperturbed_fraction: fraction of elements NOT perturbed, in [0, 1] (default 0.5; the paper's
            "sparsity", renamed because SL-SAM's ``sparsity`` is the fraction of arms that ARE active).
        drop_rate: fraction of live elements replaced at a refresh, cosine-decayed over training (default 0.5).
        update_every_epochs: refresh at the first step of every this-many epochs after the first (default 1).
        drop: ``"gradient"`` (drop the smallest |g|, default) or ``"random"``.
        grow: ``"random"`` (default) or ``"gradient"`` (grow the largest |g|).
        seed: the mask generator's seed; None draws it from the global torch RNG (equal on every rank).
    """

    name = "ssam_d"
    renamed: ClassVar[dict[str, str]] = RENAMED

    rho: float = 0.05
    unperturbed_fraction: float = 0.5
    drop_rate: float = 0.5
    update_every_epochs: int = 1
    drop: str = "gradient"
    grow: str = "random"
    seed: int | None = None

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        what = "the fraction of elements not perturbed"
        self._set(
            "unperturbed_fraction",
            check_fraction("unperturbed_fraction", self.unperturbed_fraction, low_open=False, what=what),
        )
        what = "the fraction of live elements replaced"
        self._set("drop_rate", check_fraction("drop_rate", self.drop_rate, low_open=False, what=what))
        check_int("update_every_epochs", self.update_every_epochs, 1, what="the mask refresh interval")
        check_choice("drop", self.drop, DROP_SCORES)
        check_choice("grow", self.grow, GROW_SCORES)
        check_seed("seed", self.seed)

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return SSAMDMethod(**self.as_dict())  # type: ignore[arg-type]
