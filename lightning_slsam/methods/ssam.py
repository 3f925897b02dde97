"""``ssam_f`` and ``ssam_d``: Sparse SAM (Mi et al. 2022, "Make Sharpness-Aware Minimization Stronger: A
Sparsified Perturbation Approach", NeurIPS 2022).

Both perturb only the elements of a binary mask ``m`` (over every element of every parameter of the layout):

    e = (rho g / ||g||) ⊙ m        ||g|| over the FULL pass-1 gradient, not the masked one

and the optimizer sees g(w + e) on every parameter. They differ in how ``m`` is chosen:

- ``ssam_f`` (:class:`SSAMFMethod`): the global top ``1 - sparsity`` fraction of elements by an empirical
  Fisher score ``sum_i (d loss_i / d w)^2`` over ``num_samples`` training samples, recomputed at the start
  of epoch 0 and every ``update_every_epochs`` epochs after.
- ``ssam_d`` (:class:`SSAMDMethod`): a random mask, then at the first step of every ``update_every_epochs``-th
  epoch after the first, drop the ``d_t`` fraction of live elements with the lowest score and grow as many
  dead ones (the live count never changes), ``d_t`` cosine-decayed over training.

``sparsity`` is the fraction of elements NOT perturbed (0 perturbs everything: SAM).
See ``docs/methods/ssam.md`` for the update rule, costs and where this departs from the authors' code.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_slsam.argument_checks import check_choice, check_fraction, check_int, check_rho, check_seed
from lightning_slsam.arms import ArmLayout
from lightning_slsam.distributed import all_reduce_mean, broadcast_seed
from lightning_slsam.methods.interface import Method
from lightning_slsam.methods.options import MethodOptions
from lightning_slsam.perturbation import sam_perturbation

PER_SAMPLE = ("auto", "vmap", "loop")
DROP_SCORES = ("gradient", "random")
GROW_SCORES = ("random", "gradient")
#: per-sample gradient elements one vmap chunk may hold (2**25 float32 = 128 MiB)
VMAP_CHUNK_ELEMENTS = 2**25
_PLAIN_LEAVES = (int, float, bool, str, bytes, type(None))


# --- argument checks -------------------------------------------------------------------------------------------
def _check_fraction(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {what} must be an int >= 1, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def live_count(sparsity: float, total: int) -> int:
    """The number of perturbed ("live") elements: ``round((1 - sparsity) * total)``."""
    return min(total, max(0, round((1.0 - sparsity) * total)))


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

    def __init__(self, rho: float, sparsity: float, update_every_epochs: int) -> None:
        super().__init__(rho)
        self.sparsity = _check_fraction("sparsity", sparsity, "the fraction of elements not perturbed")
        self.update_every_epochs = _check_positive_int(
            "update_every_epochs", update_every_epochs, "the number of epochs between mask refreshes"
        )
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
                f"{self.name}: no perturbation mask: the mask is computed in on_train_epoch_start; resuming in the "
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
        sparsity: the fraction of elements NOT perturbed, in [0, 1] (default 0.5); the mask keeps the global
            top ``round((1 - sparsity) * numel)`` elements by score.
        num_samples: training samples whose squared per-sample gradients are summed into the score (>= 1;
            default 128, the authors').
        update_every_epochs: recompute the mask at the start of every this many epochs, starting at epoch 0
            (>= 1; default 1).
        per_sample: how per-sample gradients are taken: ``"vmap"`` (``torch.func``), ``"loop"`` (one backward
            per sample) or ``"auto"`` (default: vmap, falling back to the loop with a warning if vmap fails).

    The Fisher pass draws batches from a fresh iteration of ``trainer.train_dataloader`` (the sampler's current
    epoch; the global and the loaders' RNG states are put back afterwards, so the training order is the one
    a run without it would see), moves them to the device as Lightning does, and differentiates
    ``module.compute_loss`` on single-sample batches (every tensor whose first dimension is the batch size
    sliced ``[i:i+1]``) with the module in **eval mode** (BatchNorm uses running statistics: a training-mode
    BatchNorm cannot normalise one sample; train mode is restored afterwards). Under DDP each rank scores its
    own samples and the scores are averaged, so every rank keeps the same mask.
    """

    name = "ssam_f"

    def __init__(
        self,
        rho: float = 0.05,
        sparsity: float = 0.5,
        num_samples: int = 128,
        update_every_epochs: int = 1,
        per_sample: Literal["auto", "vmap", "loop"] = "auto",
    ) -> None:
        super().__init__(rho, sparsity, update_every_epochs)
        self.num_samples = _check_positive_int("num_samples", num_samples, "the number of Fisher samples")
        self.per_sample = _check_choice("per_sample", per_sample, PER_SAMPLE)
        #: how the last refresh took its per-sample gradients ("vmap" or "loop"), None before the first
        self.per_sample_used: str | None = None
        self._vmap_failed = False

    def on_train_epoch_start(self, trainer: Any, module: nn.Module) -> None:
        epoch = int(trainer.current_epoch)
        due = epoch % self.update_every_epochs == 0 and (not self.refresh_epochs or self.refresh_epochs[-1] != epoch)
        if self._flat is None or due:
            self.refresh(trainer, module)

    def refresh(self, trainer: Any, module: nn.Module) -> None:
        """Recompute the mask from ``num_samples`` samples of the training loader (all ranks at once)."""
        assert self.layout is not None
        params = list(self.layout.params)
        with _preserved_rng(params[0].device):
            batches = draw_training_samples(trainer, module, self.num_samples)
            mode = "loop" if self.per_sample == "auto" and self._vmap_failed else self.per_sample
            scores, self.per_sample_used = _fisher_scores(module, batches, params, mode)
        if self.per_sample == "auto" and self.per_sample_used == "loop":
            self._vmap_failed = True
        flat = torch.cat([s.reshape(-1) for s in scores])
        all_reduce_mean([flat])  # every rank keeps the same mask
        self._set_mask(top_k_mask(flat, live_count(self.sparsity, flat.numel())))
        self.refresh_epochs.append(int(trainer.current_epoch))


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
        sparsity: the fraction of elements NOT perturbed, in [0, 1] (default 0.5); the mask always has
            ``round((1 - sparsity) * numel)`` live elements.
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
        rho: float = 0.05,
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        update_every_epochs: int = 1,
        drop: Literal["gradient", "random"] = "gradient",
        grow: Literal["random", "gradient"] = "random",
        seed: int | None = None,
    ) -> None:
        super().__init__(rho, sparsity, update_every_epochs)
        self.drop_rate = _check_fraction("drop_rate", drop_rate, "the fraction of live elements replaced")
        self.drop = _check_choice("drop", drop, DROP_SCORES)
        self.grow = _check_choice("grow", grow, GROW_SCORES)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: must be an int or None, got {seed!r}")
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
        live = torch.randperm(total, generator=self.generator)[: live_count(self.sparsity, total)]
        flat = torch.zeros(total, dtype=torch.bool)
        flat[live] = True
        self._set_mask(flat.to(layout.params[0].device))

    def on_train_epoch_start(self, trainer: Any, module: nn.Module) -> None:
        self.epoch = int(trainer.current_epoch)
        self.total_epochs = _total_epochs(trainer)
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


def _total_epochs(trainer: Any) -> int | None:
    """The epochs training runs for: ``max_epochs``, else estimated from ``max_steps``; None if unbounded."""
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs > 0:
        return int(max_epochs)
    max_steps = getattr(trainer, "max_steps", -1)
    per_epoch = getattr(trainer, "num_training_batches", float("inf"))
    if max_steps is not None and max_steps > 0 and 0 < per_epoch < float("inf"):
        return max(1, math.ceil(max_steps / per_epoch))
    return None


# --- the Fisher pass -------------------------------------------------------------------------------------------
@contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Put the global RNG (CPU and ``device``) back afterwards, so a refresh leaves training's randomness alone."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


def draw_training_samples(trainer: Any, module: nn.Module, num_samples: int) -> list[Any]:
    """The first ``num_samples`` samples of a fresh iteration of the Trainer's training data, on the device.

    Returns batches as the training step would receive them (same collation, ``convert_input``, batch
    transfer hooks and device), the last one cut so that exactly ``num_samples`` samples are returned (fewer,
    with a warning, when the loader holds fewer). The loaders' own generators are put back afterwards.
    """
    iterables = getattr(trainer, "train_dataloader", None)
    if iterables is None:
        raise RuntimeError("ssam_f: the Trainer has no training dataloader to draw the Fisher samples from")
    mode = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "_mode", "max_size_cycle")
    combined = CombinedLoader(iterables, mode=mode if mode != "sequential" else "max_size_cycle")
    loaders = [_independent_loader(dl) for dl in combined.flattened]
    combined.flattened = loaders
    generators = [g for dl in loaders for g in _generators_of(dl)]
    states = [g.get_state() for g in generators]
    batches: list[Any] = []
    seen = 0
    try:
        for batch, _, _ in combined:
            batch = _to_device(trainer, module, batch)
            size = batch_size(batch)
            if seen + size > num_samples:
                batch = slice_batch(batch, 0, num_samples - seen, size)
                size = num_samples - seen
            batches.append(batch)
            seen += size
            if seen >= num_samples:
                break
    finally:
        for g, s in zip(generators, states, strict=True):
            g.set_state(s)
    if seen == 0:
        raise RuntimeError("ssam_f: the training dataloader yielded no samples for the Fisher pass")
    if seen < num_samples:
        warnings.warn(
            f"ssam_f: num_samples={num_samples} but the training dataloader holds {seen} samples; the Fisher "
            f"score uses those {seen}",
            stacklevel=2,
        )
    return batches


def _independent_loader(loader: Any) -> Any:
    """``loader``, or a single-process copy when its persistent workers would be shared with the fit loop."""
    if not (isinstance(loader, DataLoader) and loader.num_workers > 0 and loader.persistent_workers):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn
        )
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)


def _generators_of(loader: Any) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _to_device(trainer: Any, module: nn.Module, batch: Any) -> Any:
    """What Lightning's training loop does to a batch before ``training_step``."""
    precision = getattr(trainer, "precision_plugin", None)
    if precision is not None:
        batch = precision.convert_input(batch)
    if hasattr(module, "_on_before_batch_transfer"):
        batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and hasattr(strategy, "batch_to_device"):
        return strategy.batch_to_device(batch, dataloader_idx=0)
    return move_data_to_device(batch, next(module.parameters()).device)


def _tensor_sizes(batch: Any) -> list[int]:
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.ndim >= 1 else None)
    return sizes


def batch_size(batch: Any) -> int:
    """The batch size: the first dimension of the first tensor (of at least one dimension) in ``batch``."""
    sizes = _tensor_sizes(batch)
    if not sizes:
        raise TypeError(f"ssam_f: cannot find the batch size of a {type(batch).__name__} batch (no tensor in it)")
    return sizes[0]


def _is_per_sample(t: Any, size: int) -> bool:
    return isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] == size


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """``batch`` with every tensor whose first dimension is ``size`` sliced ``[start:stop]`` (others kept)."""
    return apply_to_collection(batch, Tensor, lambda t: t[start:stop] if _is_per_sample(t, size) else t)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode; each one's own flag put back afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def fisher_scores(
    module: nn.Module, batches: Sequence[Any], params: Sequence[nn.Parameter], per_sample: str = "auto"
) -> list[Tensor]:
    """Empirical Fisher score of every element of ``params``: ``sum_i (d compute_loss(sample_i) / d w)^2``.

    ``batches`` are training batches on the device; each is split into single-sample batches with
    :func:`slice_batch`. The module runs in eval mode. ``per_sample``: ``"vmap"``, ``"loop"`` or ``"auto"``
    (vmap, and the loop if vmap raises). Returns float32 tensors shaped like ``params``.
    """
    _check_choice("per_sample", per_sample, PER_SAMPLE)
    return _fisher_scores(module, batches, params, per_sample)[0]


def _fisher_scores(
    module: nn.Module, batches: Sequence[Any], params: Sequence[nn.Parameter], per_sample: str
) -> tuple[list[Tensor], str]:
    with _eval_mode(module), torch.enable_grad():
        if per_sample in ("auto", "vmap"):
            try:
                return _vmap_scores(module, batches, params), "vmap"
            except Exception as error:
                if per_sample == "vmap":
                    raise
                warnings.warn(
                    f"ssam_f: per-sample gradients with torch.func.vmap failed ({type(error).__name__}: {error}); "
                    "using one backward pass per sample instead (slower, same result)",
                    stacklevel=3,
                )
        return _loop_scores(module, batches, params), "loop"


def _zeros(params: Sequence[nn.Parameter]) -> list[Tensor]:
    return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]


def _loop_scores(module: nn.Module, batches: Sequence[Any], params: Sequence[nn.Parameter]) -> list[Tensor]:
    scores = _zeros(params)
    for batch in batches:
        size = batch_size(batch)
        for i in range(size):
            loss = module.compute_loss(slice_batch(batch, i, i + 1, size))  # type: ignore[operator]
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for score, g in zip(scores, grads, strict=True):
                if g is not None:
                    score.add_(g.detach().to(torch.float32).square())
    return scores


class _LossOf(nn.Module):
    """``forward(batch) = inner.compute_loss(batch)``, so that ``torch.func.functional_call`` can run it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any) -> Tensor:
        return self.inner.compute_loss(batch)  # type: ignore[operator]


def _vmap_scores(module: nn.Module, batches: Sequence[Any], params: Sequence[nn.Parameter]) -> list[Tensor]:
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_flatten, tree_unflatten

    name_of = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    keys = [f"inner.{name_of[id(p)]}" for p in params]
    wrapper = _LossOf(module)
    values = [p.detach() for p in params]
    scores = _zeros(params)
    numel = max(1, sum(p.numel() for p in params))
    for batch in batches:
        size = batch_size(batch)
        leaves, spec = tree_flatten(batch)
        for leaf in leaves:
            if not isinstance(leaf, (Tensor, *_PLAIN_LEAVES)):
                raise TypeError(f"a {type(leaf).__name__} in the batch is not a container torch.func can split")
        sliced = [_is_per_sample(leaf, size) for leaf in leaves]

        def loss_of(values: list[Tensor], samples: list[Tensor], leaves=leaves, sliced=sliced, spec=spec) -> Tensor:
            rows = iter(samples)
            rebuilt = [next(rows).unsqueeze(0) if s else leaf for leaf, s in zip(leaves, sliced, strict=True)]
            loss = functional_call(wrapper, dict(zip(keys, values, strict=True)), (tree_unflatten(rebuilt, spec),))
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise TypeError("compute_loss must return a scalar tensor")
            return loss

        per_sample_grads = vmap(grad(loss_of), in_dims=(None, 0))
        chunk = max(1, min(size, VMAP_CHUNK_ELEMENTS // numel))
        for start in range(0, size, chunk):
            rows = [leaf[start : start + chunk] for leaf, s in zip(leaves, sliced, strict=True) if s]
            for score, g in zip(scores, per_sample_grads(values, rows), strict=True):
                score.add_(g.to(torch.float32).square().sum(0))
    return scores


# --- the options (one definition per method, methods/options.py) ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class SSAMFOptions(MethodOptions):
    """SSAM-F (Mi et al. 2022): SAM's ascent masked to the elements with the largest empirical Fisher score.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        sparsity: fraction of elements NOT perturbed, in [0, 1] (default 0.5).
        num_samples: training samples whose per-sample gradients make the Fisher score (int >= 1; default 128).
        update_every_epochs: refresh the mask at the start of every this-many epochs (int >= 1; default 1).
        per_sample: ``"auto"`` (torch.func vmap, falling back to a loop), ``"vmap"`` or ``"loop"``.
    """

    name = "ssam_f"

    rho: float = 0.05
    sparsity: float = 0.5
    num_samples: int = 128
    update_every_epochs: int = 1
    per_sample: str = "auto"

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        what = "the fraction of elements not perturbed"
        self._set("sparsity", check_fraction("sparsity", self.sparsity, low_open=False, what=what))
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
        sparsity: fraction of elements NOT perturbed, in [0, 1] (default 0.5).
        drop_rate: fraction of live elements replaced at a refresh, cosine-decayed over training (default 0.5).
        update_every_epochs: refresh at the first step of every this-many epochs after the first (default 1).
        drop: ``"gradient"`` (drop the smallest |g|, default) or ``"random"``.
        grow: ``"random"`` (default) or ``"gradient"`` (grow the largest |g|).
        seed: the mask generator's seed; None draws it from the global torch RNG (equal on every rank).
    """

    name = "ssam_d"

    rho: float = 0.05
    sparsity: float = 0.5
    drop_rate: float = 0.5
    update_every_epochs: int = 1
    drop: str = "gradient"
    grow: str = "random"
    seed: int | None = None

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        what = "the fraction of elements not perturbed"
        self._set("sparsity", check_fraction("sparsity", self.sparsity, low_open=False, what=what))
        what = "the fraction of live elements replaced"
        self._set("drop_rate", check_fraction("drop_rate", self.drop_rate, low_open=False, what=what))
        check_int("update_every_epochs", self.update_every_epochs, 1, what="the mask refresh interval")
        check_choice("drop", self.drop, DROP_SCORES)
        check_choice("grow", self.grow, GROW_SCORES)
        check_seed("seed", self.seed)

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return SSAMDMethod(**self.as_dict())  # type: ignore[arg-type]
