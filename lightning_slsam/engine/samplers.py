"""The sampler service: which arms are active at each step.

Every sampler has the same small interface: ``probs`` (float64, one entry per arm), ``sample()`` (a
bool mask on the sampler's device), ``update(active, grad_norms)`` and ``state_dict()`` /
``load_state_dict()``. ``Exp3Sampler`` is SL-SAM's bandit, exactly as docs/design.md#bandit transcribes
the authors' code, but vectorised in torch: no Python loop over arms.

The samplers live on the CPU by default: the active mask must reach the host anyway (it decides which
parameters get ``requires_grad``), the arrays hold a few hundred floats, and the only transfer per step
is the N pass-1 gradient norms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lightning_slsam.engine.argument_checks import check_choice, check_fraction, check_number

NormScale = Literal["raw", "running_mean"]
#: the bandit's probability floor (``Exp3Sampler(min_prob=...)``'s default)
MIN_PROB = 1e-8
#: ``norm_scale`` values of :class:`Exp3Sampler`
NORM_SCALES: tuple[str, ...] = ("raw", "running_mean")


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with ``seed``, or from the global torch RNG (so ``seed_everything`` fixes it)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class ArmSampler(ABC):
    """Interface of every sampler.

    Args:
        num_arms: number of arms N (>= 1).
        device: where ``probs``, the generator and the returned masks live (default CPU).
    """

    def __init__(self, num_arms: int, device: torch.device | str = "cpu") -> None:
        if int(num_arms) < 1:
            raise ValueError(f"num_arms: need at least one arm, got {num_arms!r}")
        self.num_arms = int(num_arms)
        self.device = torch.device(device)
        self.probs = torch.ones(self.num_arms, dtype=torch.float64, device=self.device)

    @abstractmethod
    def sample(self) -> torch.Tensor:
        """The active arms of the next step: a non-empty bool tensor of shape ``(num_arms,)``."""

    def update(self, active: torch.Tensor, grad_norms: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Learn from one step: ``grad_norms[i]`` is the pass-1 L2 gradient norm of arm i (unscaled).

        Entries outside ``active`` are ignored. The default does nothing.
        """

    def carry_over(self, probs: torch.Tensor, keep: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Start from another sampler's probabilities over the same N arms where ``keep`` (bool ``(N,)``) holds,
        when the arms that may be sampled change during training. The default keeps its own."""

    def generator_of(self) -> torch.Generator | None:
        """The generator the draws come from (the innermost sampler's), or None."""
        return getattr(self, "generator", None)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: probabilities and generator state."""
        return {"probs": self.probs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the arm count must match."""
        probs = state["probs"]
        if probs.shape != self.probs.shape:
            raise ValueError(f"sampler state: checkpoint has {probs.shape[0]} arms, this model has {self.num_arms}")
        self.probs = probs.to(dtype=torch.float64, device=self.device).clone()


class _BernoulliSampler(ArmSampler):
    """Each arm independently active with probability ``probs[i]``; drawn again if nothing was picked."""

    def __init__(self, num_arms: int, seed: int | None, device: torch.device | str) -> None:
        super().__init__(num_arms, device)
        self.generator = _make_generator(seed, self.device)

    def sample(self) -> torch.Tensor:
        if not bool((self.probs > 0).any()):
            raise RuntimeError("sampler: every arm has probability 0, nothing can be sampled")
        while True:
            draw = torch.rand(self.num_arms, generator=self.generator, dtype=torch.float64, device=self.device)
            active = draw < self.probs
            if bool(active.any()):
                return active

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


class UniformSampler(_BernoulliSampler):
    """Random arms with a fixed probability ``sparsity`` each (the "random layers" baseline).

    Args:
        num_arms: number of arms.
        sparsity: probability of each arm, in (0, 1]; the expected fraction of active arms.
        seed: generator seed; None draws one from the global torch RNG.
        device: where the state lives (default CPU).
    """

    def __init__(
        self, num_arms: int, sparsity: float, seed: int | None = None, device: torch.device | str = "cpu"
    ) -> None:
        check_fraction("sparsity", sparsity)
        super().__init__(num_arms, seed, device)
        self.sparsity = float(sparsity)
        self.probs.fill_(self.sparsity)


class FixedSampler(ArmSampler):
    """Always the same arms.

    Args:
        num_arms: number of arms.
        active: the arm indices, or a bool mask of length ``num_arms``; must pick at least one arm.
        device: where the state lives (default CPU).
    """

    def __init__(self, num_arms: int, active: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> None:
        super().__init__(num_arms, device)
        mask = torch.as_tensor(active, device=self.device)
        if mask.dtype != torch.bool:
            indices = mask.long()
            if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_arms):
                raise ValueError(f"active: arm indices must lie in [0, {self.num_arms}), got {active!r}")
            mask = torch.zeros(self.num_arms, dtype=torch.bool, device=self.device)
            mask[indices] = True
        elif mask.shape != (self.num_arms,):
            raise ValueError(f"active: a mask needs {self.num_arms} entries, got shape {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError("active: pick at least one arm")
        self.active = mask
        self.probs = mask.to(torch.float64)

    def sample(self) -> torch.Tensor:
        return self.active.clone()


class TopArmsSampler(ArmSampler):
    """A sampler over the top arms only: ``inner`` picks among the last ``inner.num_arms`` of ``num_arms``.

    Arms are numbered in the model's parameter order (``named_parameters``), which for the usual networks is
    the forward order, so the last arms are the top of the network. The arms below the window are never
    active: they do not train. In exchange every backward pass stops at the window, and pass 2 replays
    the forward below it (``prefix_reuse.py``): the depth-aware, low-cost setting of SL-SAM.

    Args:
        inner: the sampler of the window (any :class:`ArmSampler`, e.g. the Exp3 bandit over the window).
        num_arms: all arms N (>= ``inner.num_arms``).
    """

    def __init__(self, inner: ArmSampler, num_arms: int) -> None:
        if not 1 <= inner.num_arms <= int(num_arms):
            raise ValueError(f"num_arms: the window has {inner.num_arms} arms, more than the {num_arms} in all")
        self.inner = inner
        self.num_arms = int(num_arms)
        self.device = inner.device
        #: index of the lowest arm of the window
        self.offset = self.num_arms - inner.num_arms

    @property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        """All N probabilities: 0 below the window, the inner sampler's in it."""
        full = torch.zeros(self.num_arms, dtype=torch.float64, device=self.device)
        full[self.offset :] = self.inner.probs
        return full

    def sample(self) -> torch.Tensor:
        active = torch.zeros(self.num_arms, dtype=torch.bool, device=self.device)
        active[self.offset :] = self.inner.sample()
        return active

    def update(self, active: torch.Tensor, grad_norms: torch.Tensor) -> None:
        self.inner.update(active[self.offset :], grad_norms[self.offset :])

    def carry_over(self, probs: torch.Tensor, keep: torch.Tensor) -> None:
        self.inner.carry_over(probs[self.offset :], keep[self.offset :])

    def generator_of(self) -> torch.Generator | None:
        return self.inner.generator_of()

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.inner.num_arms, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("window") != self.inner.num_arms:
            raise ValueError(
                f"sampler state: checkpoint samples the top {state.get('window', 'all')} arms, this run the top "
                f"{self.inner.num_arms} (top_fraction differs)"
            )
        self.inner.load_state_dict(state["inner"])


class PinnedArmsSampler(ArmSampler):
    """Some arms always active, ``inner`` sampling the others (SL-SAM's ``always_active``).

    The inner sampler (any :class:`ArmSampler`) sees only the unpinned arms, in layout order, so its budget
    ``K = s * N_unpinned`` and its bandit statistics concern them alone; the pinned arms have probability 1.
    LISA (Pan et al. 2024) keeps embedding and head always active for the same reason: the layers that
    must move most would otherwise train on a fraction of the steps.

    Args:
        inner: the sampler of the unpinned arms (``inner.num_arms`` must equal their count), or None when every
            arm is pinned (then every arm is active at every step: while a model's only trainable arms are
            pinned ones, e.g. a new head over a frozen backbone, SL-SAM is SAM on them).
        pinned: bool ``(N,)``, the always-active arms.
    """

    def __init__(self, inner: ArmSampler | None, pinned: torch.Tensor) -> None:
        device = inner.device if inner is not None else torch.device("cpu")
        pinned = pinned.to(dtype=torch.bool, device=device)
        free = int((~pinned).sum())
        if (inner is None) != (free == 0) or (inner is not None and inner.num_arms != free):
            have = 0 if inner is None else inner.num_arms
            raise ValueError(f"num_arms: the inner sampler has {have} arms, {free} are unpinned")
        self.inner = inner
        self.pinned = pinned
        self.num_arms = int(pinned.numel())
        self.device = device
        self._free_index = torch.nonzero(~pinned).flatten()

    @property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        """All N probabilities: 1 for the pinned arms, the inner sampler's for the others."""
        full = torch.ones(self.num_arms, dtype=torch.float64, device=self.device)
        if self.inner is not None:
            full[self._free_index] = self.inner.probs
        return full

    def sample(self) -> torch.Tensor:
        active = self.pinned.clone()
        if self.inner is not None:
            active[self._free_index] = self.inner.sample()
        return active

    def update(self, active: torch.Tensor, grad_norms: torch.Tensor) -> None:
        if self.inner is not None:
            index = self._free_index.to(active.device)
            self.inner.update(active[index], grad_norms[index.to(grad_norms.device)])

    def carry_over(self, probs: torch.Tensor, keep: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.carry_over(probs[self._free_index], keep[self._free_index])

    def generator_of(self) -> torch.Generator | None:
        return None if self.inner is None else self.inner.generator_of()

    def state_dict(self) -> dict[str, Any]:
        return {"pinned": self.pinned.clone(), "inner": None if self.inner is None else self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not torch.equal(state.get("pinned", torch.zeros(0)).to(self.pinned.device), self.pinned):
            raise ValueError("sampler state: the checkpoint pins other arms (always_active differs)")
        if self.inner is not None:
            self.inner.load_state_dict(state["inner"])


class EligibleArmsSampler(ArmSampler):
    """A sampler over the eligible arms only (those with a trainable parameter, ``trainable.py``): ``inner``
    samples them, in layout order, with budget and statistics of its own; the other arms have probability 0.

    Args:
        inner: the sampler of the eligible arms (``inner.num_arms`` must equal their count).
        eligible: bool ``(N,)``, at least one True.
    """

    def __init__(self, inner: ArmSampler, eligible: torch.Tensor) -> None:
        eligible = eligible.to(dtype=torch.bool, device=inner.device)
        if inner.num_arms != int(eligible.sum()):
            raise ValueError(
                f"num_arms: the inner sampler has {inner.num_arms} arms, {int(eligible.sum())} are eligible"
            )
        self.inner = inner
        self.eligible = eligible
        self.num_arms = int(eligible.numel())
        self.device = inner.device
        self._index = torch.nonzero(eligible).flatten()

    @property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        """All N probabilities: the inner sampler's for the eligible arms, 0 for the others."""
        full = torch.zeros(self.num_arms, dtype=torch.float64, device=self.device)
        full[self._index] = self.inner.probs
        return full

    def sample(self) -> torch.Tensor:
        active = torch.zeros(self.num_arms, dtype=torch.bool, device=self.device)
        active[self._index] = self.inner.sample()
        return active

    def update(self, active: torch.Tensor, grad_norms: torch.Tensor) -> None:
        index = self._index.to(active.device)
        self.inner.update(active[index], grad_norms[index.to(grad_norms.device)])

    def carry_over(self, probs: torch.Tensor, keep: torch.Tensor) -> None:
        self.inner.carry_over(probs[self._index], keep[self._index])

    def generator_of(self) -> torch.Generator | None:
        return self.inner.generator_of()

    def state_dict(self) -> dict[str, Any]:
        return {"eligible": self.eligible.clone(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not torch.equal(state.get("eligible", torch.zeros(0)).to(self.eligible.device), self.eligible):
            raise ValueError("sampler state: the checkpoint samples other trainable arms")
        self.inner.load_state_dict(state["inner"])


#: the floor on the tail sum of the capped-simplex projection, as in the authors' code
#: (``temp_sum = max(sum(w_sort[j:]), 1e-5)``): when nearly every weight has underflowed, the probabilities
#: sum to less than the budget, so fewer arms are active (docs/methods/slsam.md, "the bandit, exactly")
TAIL_FLOOR = 1e-5


def project_capped_simplex(weights: torch.Tensor, budget: float, tail_floor: float = TAIL_FLOOR) -> torch.Tensor:
    """Scale ``weights`` (>= 0) to sum to ``budget`` with no entry above 1, capping the largest at 1.

    Walks the weights in descending order: with ``T_j = max(sum_{k>=j} w_(k), tail_floor)``, while
    ``w_(j) * K' > T_j`` the j-th largest is set to 1 and ``K'`` drops by one; the rest become
    ``K' * w_(k) / T_j``. Vectorised: at the j-th position ``K' = budget - j`` whenever all earlier ones
    were capped, so the capped set is the leading run of positions where the condition holds.

    ``tail_floor`` (default 1e-5, the authors') keeps the division finite when the uncapped weights have
    underflowed; the result then sums to less than ``budget``, exactly as the reference code does.
    """
    if not tail_floor > 0.0:
        raise ValueError(f"tail_floor: must be > 0, got {tail_floor!r}")
    ordered, order = torch.sort(weights, descending=True)
    suffix = ordered.flip(0).cumsum(0).flip(0).clamp(min=tail_floor)  # T_j = max(sum_{k>=j} w_(k), floor)
    positions = torch.arange(weights.numel(), device=weights.device, dtype=weights.dtype)
    capped = (ordered * (budget - positions) > suffix).cumprod(0).bool()
    num_capped = capped.sum()
    rest_sum = torch.cat([suffix, suffix.new_ones(1)])[num_capped]
    left = budget - num_capped.to(weights.dtype)  # float64 like the weights, not int64 -> float32
    rest = left * ordered / rest_sum
    projected = torch.where(capped, torch.ones_like(ordered), rest)
    return torch.empty_like(projected).scatter_(0, order, projected)


class Exp3Sampler(_BernoulliSampler):
    """SL-SAM's bandit (Exp3 with a capped-simplex projection), docs/design.md#bandit.

    Args:
        num_arms: number of arms N.
        sparsity: s in (0, 1], the expected fraction of active arms; start ``p_i = s``, budget ``K = s N``.
        lr: the bandit step size eta (default 1e-3, the authors' value).
        min_prob: probabilities are clipped to ``[min_prob, 1]`` after each update (default 1e-8).
        seed: generator seed; None draws one from the global torch RNG.
        norm_scale: ``"raw"`` (default, faithful) feeds the norms as given; ``"running_mean"`` divides
            them by a running mean of the active norms first, which makes the rule scale-free (the raw
            rule freezes into a fixed subset when norms are large, docs/design.md#bandit).
        norm_momentum: the running mean's momentum for ``"running_mean"`` (default 0.99).
        device: where the state lives (default CPU).
    """

    def __init__(
        self,
        num_arms: int,
        sparsity: float,
        lr: float = 1e-3,
        min_prob: float = MIN_PROB,
        seed: int | None = None,
        norm_scale: NormScale = "raw",
        norm_momentum: float = 0.99,
        device: torch.device | str = "cpu",
    ) -> None:
        check_fraction("sparsity", sparsity)
        # inf would freeze the bandit at once, NaN would poison it
        check_number("lr", lr, minimum=0.0, what="the bandit step size")
        if not 0.0 < min_prob <= sparsity:
            raise ValueError(f"min_prob: must lie in (0, sparsity], got {min_prob!r}")
        check_choice("norm_scale", norm_scale, NORM_SCALES)
        if not 0.0 <= norm_momentum < 1.0:
            raise ValueError(f"norm_momentum: must lie in [0, 1), got {norm_momentum!r}")
        super().__init__(num_arms, seed, device)
        self.sparsity = float(sparsity)
        self.lr = float(lr)
        self.min_prob = float(min_prob)
        self.norm_scale = norm_scale
        self.norm_momentum = float(norm_momentum)
        self.budget = self.sparsity * self.num_arms
        self.probs.fill_(self.sparsity)
        self.norm_mean = torch.zeros((), dtype=torch.float64, device=self.device)

    def update(self, active: torch.Tensor, grad_norms: torch.Tensor) -> None:
        active = active.to(self.device)
        norms = grad_norms.to(device=self.device, dtype=torch.float64)
        finite = torch.isfinite(torch.where(active, norms, 0.0)).all()
        norms = torch.where(active & finite, norms, 0.0)
        if self.norm_scale == "running_mean":
            norms = self._rescale(active, norms, finite)
        p = self.probs
        ratio = norms / p
        # ratios are >= 0 and inactive ones are 0, so the max over all arms is the max over the active ones
        loss = torch.where(active, ratio.max().square() - ratio.square(), 0.0)
        weights = torch.where(active, p * torch.exp(-self.lr * loss / p), p)
        new = project_capped_simplex(weights, self.budget).clamp_(self.min_prob, 1.0)
        self.probs = torch.where(finite, new, p)  # a non-finite step (fp16 overflow) teaches nothing

    def carry_over(self, probs: torch.Tensor, keep: torch.Tensor) -> None:
        """Kept arms start from ``probs``, new ones from ``sparsity``; then projected onto this budget (sum
        ``sparsity * num_arms``, none above 1), as after an update."""
        start = torch.where(keep.to(self.device), probs.to(self.device, torch.float64), self.sparsity)
        self.probs = project_capped_simplex(start, self.budget).clamp_(self.min_prob, 1.0)

    def _rescale(self, active: torch.Tensor, norms: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        step_mean = norms.sum() / active.sum().clamp(min=1)
        first = self.norm_mean == 0
        updated = torch.where(
            first, step_mean, self.norm_momentum * self.norm_mean + (1 - self.norm_momentum) * step_mean
        )
        self.norm_mean = torch.where(finite, updated, self.norm_mean)
        return norms / self.norm_mean.clamp(min=torch.finfo(torch.float64).tiny)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "norm_mean": self.norm_mean.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.norm_mean = state["norm_mean"].to(dtype=torch.float64, device=self.device).clone()
