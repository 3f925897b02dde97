"""``slsam``: Sparse-Layer SAM (Cheng et al. 2026, arXiv 2602.09395).

Each step a sampler picks the active arms S; only S has gradients in pass 1 and pass 2, the ascent is
``rho g_S / ||g_S||`` on S, and the optimizer sees ``g_S(w + e)`` (every other arm has ``grad=None``, so
AdamW leaves it and its state alone). The bandit learns from the pass-1 norms ``||g_i||``, i in S. With
``dense_update`` the ascent stays on S but pass 2 and the optimizer step take every trainable arm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_number,
    check_rho,
    check_seed,
)
from lightning_slsam.engine.arm_groups import check_spec, select_arms
from lightning_slsam.engine.arms import ArmLayout, build_arms
from lightning_slsam.engine.distributed import broadcast_seed
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.samplers import (
    MIN_PROB,
    NORM_SCALES,
    ArmSampler,
    EligibleArmsSampler,
    Exp3Sampler,
    PinnedArmsSampler,
    TopArmsSampler,
    UniformSampler,
)
from lightning_slsam.engine.sharding import local

#: ``sampler`` values of SL-SAM
SAMPLERS: tuple[str, ...] = ("exp3", "uniform")

#: the fewest arms a step may expect to sample (``sparsity`` times the sampled arms): below it the sampler's
#: draw-until-non-empty loop would take thousands of draws a step
MIN_EXPECTED_ARMS = 0.05
#: the momentum of ``second_pass_gate``'s running mean and variance (AE-SAM's delta)
GATE_MOMENTUM = 0.9


def gate_step(state: tuple[float, float] | None, value: float, c: float) -> tuple[tuple[float, float], bool]:
    """AE-SAM's rule (Jiang et al. 2023) for one step: the running mean and variance of ``value`` (momentum
    :data:`GATE_MOMENTUM`; ``state`` None before the first step, which starts the mean at ``value``) updated with
    this step's ``value`` first, and whether ``value`` reaches ``mean + c * sqrt(variance)``."""
    if state is None:  # set, not blended: 0.9 v + 0.1 v can round above v and close the first step's gate
        return (value, 0.0), True
    mean, var = state
    mean = GATE_MOMENTUM * mean + (1 - GATE_MOMENTUM) * value
    var = GATE_MOMENTUM * var + (1 - GATE_MOMENTUM) * (value - mean) ** 2
    return (mean, var), value >= mean + c * math.sqrt(var)


@dataclasses.dataclass(frozen=True)
class SLSAMOptions(MethodOptions):
    """Sparse-Layer SAM (Cheng et al. 2026): each step a bandit picks the arms that take part in both passes.

    Args:
        rho: perturbation radius (>= 0; default 0.05; the paper fine-tunes with 0.01).
        sparsity: the expected fraction of arms active per step, in (0, 1] (default 0.2, the paper's).
        bandit_lr: Exp3 step size eta (>= 0; default 1e-3, the authors').
        seed: the sampler's seed; None draws it from the global torch RNG (``seed_everything`` fixes it).
        sampler: ``"exp3"`` (default, the paper's bandit) or ``"uniform"`` (random arms, fixed p = sparsity).
        norm_scale: ``"raw"`` (default, faithful) or ``"running_mean"`` (scale-free bandit, see
            :class:`~lightning_slsam.engine.samplers.Exp3Sampler`).
        top_fraction: sample only among the top ``ceil(top_fraction * N)`` of the N arms, in parameter
            order (default 1.0: all arms, the paper's); the arms below are never perturbed, and never train unless
            ``dense_update`` takes them into pass 2. With ``arms="block"``
            and ``sparsity`` then a fraction of the window, this is the low-cost setting: backward passes
            stop at the window and pass 2 replays the forward below it (see
            :class:`~lightning_slsam.engine.samplers.TopArmsSampler`).
        always_active: arms active on every step, outside the bandit (default none, the paper's): group
            names ``"head"``, ``"norms"``, ``"biases"``, ``"vectors"`` (every tensor of at most one
            dimension), ``"embeddings"``, or fnmatch patterns on parameter names (see
            :mod:`lightning_slsam.engine.arm_groups`); a string is one entry. The bandit then samples the other
            arms with budget ``sparsity`` times their count.
        max_update_scale: None (default, the paper's) or a cap c >= 1: each active arm's optimizer update
            is scaled by ``min(1 / p_i, c)``, p_i its sampling probability, so that rarely sampled arms
            move as far per step as every-step ones (:class:`SLSAMMethod`).
        second_pass_gate: None (default, the paper's: every step takes both passes) or AE-SAM's threshold c
            (Jiang et al. 2023, any finite number): a step ascends and takes pass 2 only when
            ``s = ||g_S||^2``, the squared pass-1 gradient norm over its active arms, is at least
            ``mu + c * sigma``, where ``mu`` and ``sigma^2`` are exponential moving averages (momentum 0.9) of
            ``s`` and of its squared deviation, updated with this step's ``s`` first. Every other step is one
            pass: the optimizer steps the active arms with their gradient at ``w`` (``max_update_scale`` still
            applies). Lower c takes pass 2 on more steps; AE-SAM schedules c over training, this is a constant.
        dense_update: False (default, the paper's): only the sampled arms S take pass 2 and the optimizer step.
            True: the ascent stays on S (``rho g_S / ||g_S||``, pass 1 as sparse as ever), but pass 2
            differentiates every trainable arm at ``w + e_S`` and the optimizer steps all of them, as AdamW and
            SAM do: the update is dense, the perturbation sparse. Pass 2 is then a full backward pass and the
            optimizer keeps state for every parameter (AdamW's memory, not SL-SAM's), and with ``rho=0`` the
            step is exactly AdamW's (on a second pass), so the control for the ascent is AdamW itself. Needs
            ``max_update_scale`` None (no arm skips a step, so there is no sampling rate to make up for) and no
            ``second_pass_gate``.

    The arms (the step option ``arms``) default to ``"tensor"``, the paper's.
    """

    name = "slsam"

    rho: float = 0.05
    sparsity: float = 0.2
    bandit_lr: float = 1e-3
    seed: int | None = None
    sampler: str = "exp3"
    norm_scale: str = "raw"
    top_fraction: float = 1.0
    always_active: list[str] = dataclasses.field(default_factory=list)
    max_update_scale: float | None = None
    second_pass_gate: float | None = None
    dense_update: bool = False

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        self._set(
            "sparsity",
            check_number(
                "sparsity", self.sparsity, minimum=MIN_PROB, maximum=1.0, what="the expected fraction of active arms"
            ),
        )
        # inf freezes the bandit, NaN poisons it
        self._set("bandit_lr", check_number("bandit_lr", self.bandit_lr, minimum=0.0, what="the bandit step size"))
        check_seed("seed", self.seed)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("norm_scale", self.norm_scale, NORM_SCALES)
        what = "the sampled fraction of arms"
        self._set("top_fraction", check_fraction("top_fraction", self.top_fraction, what=what))
        self._set("always_active", list(check_spec(self.always_active)))
        if self.max_update_scale is not None:
            scale = check_number("max_update_scale", self.max_update_scale, minimum=1.0)
            self._set("max_update_scale", scale)
        if self.second_pass_gate is not None:
            gate = check_number("second_pass_gate", self.second_pass_gate, what="the AE-SAM threshold c")
            self._set("second_pass_gate", gate)
        check_bool("dense_update", self.dense_update)
        if self.dense_update and self.max_update_scale not in (None, 1.0):
            raise ValueError(
                f"dense_update: every arm is updated on every step, so there is no sampling rate for "
                f"max_update_scale={self.max_update_scale!r} to make up for; set max_update_scale=None, or "
                "dense_update=False for the sparse, scaled update (slsam_noisy)"
            )
        if self.dense_update and self.second_pass_gate is not None:
            raise ValueError(
                f"dense_update: the gate's one-pass steps would update only the sampled arms; leave "
                f"second_pass_gate None (got {self.second_pass_gate!r})"
            )

    @property
    def label(self) -> str:
        """The method's name for results: ``slsam_uniform`` with the uniform sampler, else :attr:`name`; with
        ``dense_update`` other than the method's default the name ends in ``_dense`` (``_sparse`` for False)."""
        name = "slsam_uniform" if self.sampler == "uniform" and self.name == "slsam" else self.name
        default = type(self).__dataclass_fields__["dense_update"].default
        if self.dense_update == default:
            return name
        return name + ("_dense" if self.dense_update else "_sparse")

    def check_model(self, module: nn.Module, arms: str) -> None:
        layout = build_arms(module, arms, include_frozen=True)
        self._check_pins(module, layout)
        trainable = torch.tensor([any(p.requires_grad for p in arm.params) for arm in layout], dtype=torch.bool)
        if bool(trainable.any()):
            self._window(module, layout, trainable)

    def _check_pins(self, module: nn.Module, layout: ArmLayout) -> None:
        """Refuse an ``always_active`` that selects every arm of the model (nothing would ever be sampled)."""
        if self.always_active and bool(select_arms(module, layout, self.always_active).all()):
            raise ValueError(
                f"always_active: {list(self.always_active)} selects every arm of the model; nothing is left "
                "to sample (use SAM)"
            )

    def _window(self, module: nn.Module, layout: ArmLayout, eligible: Tensor) -> tuple[Tensor, int, int]:
        """The pinned arms among ``eligible``, the count of free eligible arms and the sampled window's size.

        Raises:
            ValueError: ``sparsity`` expects so few arms per step that the sampler's redraws (it draws until an
                arm is active) would stall the step.
        """
        pinned = select_arms(module, layout, self.always_active) & eligible if self.always_active else None
        free = int(eligible.sum()) if pinned is None else int((eligible & ~pinned).sum())
        window = min(free, math.ceil(self.top_fraction * free - 1e-9))
        if window and self.sparsity * window < MIN_EXPECTED_ARMS:
            raise ValueError(
                f"sparsity: {self.sparsity:g} of the {window} sampled arms is {self.sparsity * window:.2g} arms per "
                f"step on average, below {MIN_EXPECTED_ARMS} (the sampler draws until an arm is active, so the step "
                f"would stall); use sparsity >= {MIN_EXPECTED_ARMS / window:.2g}"
            )
        return (pinned if pinned is not None else torch.zeros(len(layout), dtype=torch.bool)), free, window

    def sampler_for(self, module: nn.Module, layout: ArmLayout, eligible: Tensor, seed: int) -> ArmSampler:
        """The sampler of these options over the ``eligible`` arms of ``layout`` (bool ``(N,)``): the bandit (or
        uniform draws) over the top window of the free arms, the pinned ones always active, the others never."""
        pinned, free, window = self._window(module, layout, eligible)
        sampler: ArmSampler | None = None
        if free:
            if self.sampler == "uniform":
                sampler = UniformSampler(window, self.sparsity, seed=seed)
            else:
                sampler = Exp3Sampler(
                    window,
                    self.sparsity,
                    lr=self.bandit_lr,
                    seed=seed,
                    norm_scale=self.norm_scale,  # type: ignore[arg-type]
                )
            if window < free:
                sampler = TopArmsSampler(sampler, free)
        everywhere = bool(eligible.all())
        if self.always_active or sampler is None:
            sampler = PinnedArmsSampler(sampler, pinned if everywhere else pinned[eligible])
        assert sampler is not None
        return sampler if everywhere else EligibleArmsSampler(sampler, eligible)

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        self._check_pins(module, layout)
        seed = broadcast_seed(self.seed)  # every rank samples the same arms
        eligible = torch.ones(len(layout), dtype=torch.bool)
        method = self.method_class()(
            self.rho,
            self.sampler_for(module, layout, eligible, seed),
            max_update_scale=self.max_update_scale,
            second_pass_gate=self.second_pass_gate,
            resample=lambda arms: self.sampler_for(module, layout, arms, seed),
        )
        method.name = self.label
        return method

    def method_class(self) -> type[SLSAMMethod]:
        """The method :meth:`build` makes on the sampler of these options (``sparse_msam`` runs its own)."""
        return SLSAMDenseUpdateMethod if self.dense_update else SLSAMMethod


@dataclasses.dataclass(frozen=True)
class SLSAMNoisyOptions(SLSAMOptions):
    """SL-SAM for noisy labels: the head and 1-D tensors always active, each sampled update scaled by min(1/p, 5),
    the update sparse: ``slsam_noisy``.

    Plain SL-SAM updates each tensor on about a ``sparsity`` fraction of the steps, which on fine-tuning
    lengths leaves it behind SAM (docs/results.md). ``slsam_noisy`` keeps the sparse two-pass step and the paper's
    bandit, and changes two defaults: the new head and every tensor of at most one dimension (norms, biases) take
    part in every step (``always_active=["head", "vectors"]``; the bandit samples the other arms with budget
    ``sparsity`` times their count), and each sampled arm's optimizer update is scaled by ``min(1 / p_i, 5)``
    (``max_update_scale=5``). It is the most accurate SL-SAM setting of docs/results.md on noisy digits (+3.6 points
    over AdamW), at 0.70-0.77x SAM's step time and, on MiniLM, 0.61x AdamW's memory; on clean labels it trails
    AdamW and loses accuracy fast above its best learning rate, where ``slsam_plus`` does not.

    Every other argument is as in :class:`SLSAMOptions`.

    Args:
        always_active: default ``["head", "vectors"]``; ``[]`` samples every arm (the paper's).
        max_update_scale: default 5.0; ``None`` leaves the updates unscaled (the paper's).
    """

    name = "slsam_noisy"

    always_active: list[str] = dataclasses.field(default_factory=lambda: ["head", "vectors"])
    max_update_scale: float | None = 5.0


@dataclasses.dataclass(frozen=True)
class SLSAMPlusOptions(SLSAMOptions):
    """SL-SAM's sparse ascent in the top third of the tensors, with a dense update: ``slsam_plus``.

    The bandit samples a ``sparsity`` fraction of the top ``ceil(0.34 N)`` tensors each step (``top_fraction=0.34``,
    in parameter order); the ascent ``rho g_S / ||g_S||`` perturbs only those and the head
    (``always_active=["head"]``), so pass 1's backward pass stops at the window. Pass 2 and the optimizer step take
    every trainable tensor (``dense_update=True``): no tensor waits for its update, AdamW's moments stay AdamW's,
    and with ``rho=0`` the step is AdamW's, so AdamW is its control. On the five tasks of docs/results.md it is
    within 0.5 point of AdamW at the best epoch (−0.5 to +0.4, each at its own best learning rate), no run of it
    collapsed at the rates tried up to 2x (3.3x where 2x was not run) its best, and its step costs 0.73-0.77x SAM's
    at AdamW's memory. ``always_active=["head", "vectors"]`` with ``top_fraction=1.0`` perturbs tensors at every
    depth: more accurate on the digits tasks, 1.4 points under AdamW on noisy SST-2, 0.84-0.89x SAM's step.
    ``slsam_noisy`` (sparse, scaled update) is the most accurate SL-SAM setting on noisy digits; the paper's rule is
    ``slsam``.

    Every other argument is as in :class:`SLSAMOptions`.

    Args:
        top_fraction: default 0.34: the ascent samples among the top third of the tensors; 1.0 samples all.
        always_active: default ``["head"]``; ``["head", "vectors"]`` also perturbs every 1-D tensor on every step
            (the first norm layer then takes pass 1's backward pass down to the input).
        dense_update: default True; False updates only the perturbed arms (the paper's, and ``slsam_noisy``'s).
    """

    name = "slsam_plus"

    top_fraction: float = 0.34
    always_active: list[str] = dataclasses.field(default_factory=lambda: ["head"])
    dense_update: bool = True


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
        second_pass_gate: None (default) takes pass 2 on every step; a number c takes it only when the squared
            pass-1 norm over the active arms reaches ``mu + c * sigma`` of its running statistics
            (:class:`SLSAMOptions`), a one-pass step otherwise. Costs one host read of that norm per step.

    The bandit update of step t is applied lazily, just before step t+1 samples: the same order as the
    paper, but the per-arm norms travel to the sampler's device without stalling the accelerator.
    """

    name = "slsam"
    sparse_pass_one = True
    shardable = True
    #: whether pass 2 and the optimizer step take every trainable arm (recorded in the checkpoint state)
    dense_update: bool = False

    def __init__(
        self,
        rho: float,
        sampler: ArmSampler,
        max_update_scale: float | None,
        second_pass_gate: float | None,
        resample: Callable[[Tensor], ArmSampler] | None = None,
    ) -> None:
        super().__init__(rho)
        self.sampler = sampler
        #: builds the sampler over other eligible arms (``set_trainable``); None keeps ``sampler`` (whose draws
        #: the step then intersects with the trainable arms)
        self.resample = resample
        self._eligible: Tensor | None = None
        self.max_update_scale = None if max_update_scale is None else float(max_update_scale)
        self._pending: tuple[Tensor, Tensor, Any] | None = None
        #: with max_update_scale: the scaled parameters, their values before this step's update, their factors
        self._before: tuple[list[nn.Parameter], list[Tensor], list[float]] | None = None
        self._arm_of: dict[int, int] = {}
        self._before_step: dict[str, Any] | None = None
        self.second_pass_gate = None if second_pass_gate is None else float(second_pass_gate)
        #: the gate's running mean and variance of the squared pass-1 norm; None before its first step
        self._gate: tuple[float, float] | None = None
        self._gate_before: tuple[float, float] | None = None

    def setup(self, layout) -> None:
        super().setup(layout)
        if self.sampler.num_arms != len(layout):
            raise ValueError(
                f"sampler: it has {self.sampler.num_arms} arms but the model has {len(layout)} ({layout.mode} arms)"
            )
        self._arm_of = {id(p): int(i) for p, i in zip(layout.params, layout.param_arm.tolist(), strict=True)}

    def set_trainable(self, arms: Tensor) -> None:
        """Sample among the ``arms`` that have a trainable parameter: when they change (a layer unfrozen, a
        parameter group added), the sampler is rebuilt over the new set. An arm kept keeps its probability,
        a new arm starts at ``sparsity``, the bandit's budget becomes ``sparsity`` times the new count (the
        probabilities are projected onto it), and the draws continue the same random stream."""
        super().set_trainable(arms)
        if self._eligible is None:
            self._eligible = torch.ones(len(arms), dtype=torch.bool)
        if torch.equal(arms, self._eligible) or self.resample is None:
            return
        self._flush()  # the pending update belongs to the old sampler
        old, keep = self.sampler, self._eligible & arms
        generator = old.generator_of()
        state = None if generator is None else generator.get_state()
        self.sampler = self.resample(arms)
        self.sampler.carry_over(old.probs, keep)
        new_generator = self.sampler.generator_of()
        if state is not None and new_generator is not None:
            new_generator.set_state(state)
        self._eligible = arms.clone()

    def pass1_arms(self) -> Tensor:
        self._flush()
        self._before = None
        return self.sampler.sample().cpu()

    def pass2_arms(self, first: PassOne) -> Tensor | None:
        if self.second_pass_gate is None:
            return first.active
        # AE-SAM's rule on what pass 1 measured
        self._gate, take = gate_step(self._gate, float(first.norm_over(first.active).square()), self.second_pass_gate)
        return first.active if take else None

    def single_pass_gradient(self, first: PassOne) -> None:
        # the gradient is g_S as the one pass left it; note w of the arms whose update is scaled
        self.combine(first.params, None, first)

    def combine(self, params: Sequence[nn.Parameter], first_grads: Sequence[Tensor] | None, first: PassOne) -> None:
        if self.max_update_scale is None or self.max_update_scale == 1.0:
            return
        # the probabilities this step was sampled with: the bandit's update is applied before the next sample
        scale = self.sampler.probs.reciprocal().clamp(max=self.max_update_scale).tolist()
        scaled = [(p, scale[self._arm_of[id(p)]]) for p in params if scale[self._arm_of[id(p)]] != 1.0]
        if scaled:  # keep w before the optimizer step of the arms whose update is scaled (not the pinned ones)
            before = [local(p).detach().clone() for p, _ in scaled]  # the local shard under FSDP2
            self._before = ([p for p, _ in scaled], before, [f for _, f in scaled])

    def _scale_updates(self) -> None:
        """``w <- w0 + min(1 / p_i, c) (w - w0)`` on the arms of this step whose factor is not 1."""
        assert self._before is not None
        params, before, factors = self._before
        self._before = None
        with torch.no_grad():
            weights = [local(p).detach() for p in params]
            # computed aside and copied in one kernel: an interrupt leaves the weights before or after it
            scaled = torch._foreach_sub(weights, before)
            torch._foreach_mul_(scaled, factors)
            torch._foreach_add_(scaled, before)
            torch._foreach_copy_(weights, scaled)

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
        self._gate_before = self._gate

    def discard_step(self) -> None:
        self._pending = None
        self._before = None  # the optimizer did not step (or its scaler skipped): nothing to scale
        self._gate = self._gate_before
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
        state: dict[str, Any] = {"sampler": self.sampler.state_dict(), "dense_update": self.dense_update}
        if self._eligible is not None and not bool(self._eligible.all()):
            state["eligible"] = self._eligible.clone()
        if self._gate is not None:
            state["gate"] = list(self._gate)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" not in state:
            raise ValueError("state: SL-SAM's state has no 'sampler' entry; pass what state_dict() returned")
        if "dense_update" not in state and self.name == "slsam_plus":
            # states without the flag predate the rename, when a state named slsam_plus was the sparse update
            raise ValueError(
                "state: this slsam_plus checkpoint was written before slsam_plus became the dense update; its run "
                "took the sparse, scaled update, now method slsam_noisy (SLSAMNoisy). Load only its weights and "
                "continue with slsam_noisy, or with slsam_plus for the dense update"
            )
        self._pending = None
        eligible = state.get("eligible")
        if eligible is not None and self.resample is not None:  # the sampler of the saved trainable arms
            self.sampler = self.resample(eligible)
            self._eligible = eligible.clone()
            self.all_arms = eligible.clone()
        self.sampler.load_state_dict(state["sampler"])
        gate = state.get("gate")  # absent: a run without the gate, or saved before its first step
        self._gate = None if gate is None else (float(gate[0]), float(gate[1]))


class SLSAMDenseUpdateMethod(SLSAMMethod):
    """SL-SAM's sparse ascent with a dense update (``dense_update=True``): pass 1 and the ascent on the sampled
    arms S, pass 2 and the optimizer step on every trainable arm; arguments as :class:`SLSAMMethod`
    (``max_update_scale`` and ``second_pass_gate`` None: :class:`SLSAMOptions` checks them).

    The engine perturbs only the arms that had a pass-1 gradient (S) and differentiates the pass-2 arms, so the
    optimizer sees ``g(w + e_S)`` on every trainable tensor and AdamW updates all of them on every step. The
    bandit learns from the pass-1 norms of S, as in :class:`SLSAMMethod`.
    """

    #: pass 2 adds arms, so it never replays pass 1's prefix: pass 1 records nothing (keeping those activations
    #: alive would only cost memory)
    sparse_pass_one = False
    dense_update = True

    def pass2_arms(self, first: PassOne) -> Tensor | None:
        return self.all_arms
