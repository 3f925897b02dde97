"""The callbacks a user adds to the Trainer: each owns one method, its arms, logging and checkpoint state."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_slsam import attention_inputs, module_conversion, pass_context, probability_logging
from lightning_slsam.arm_groups import check_spec, select_arms
from lightning_slsam.arms import ARM_MODES, ArmLayout, build_arms
from lightning_slsam.distributed import assert_same_arms, broadcast_seed, check_strategy, disable_ddp_sync
from lightning_slsam.lr_schedules import step_schedulers
from lightning_slsam.methods.arsam import ARSAMMethod
from lightning_slsam.methods.interface import Method, PassOne, check_rho
from lightning_slsam.methods.lagnp import LayerwiseGNPMethod
from lightning_slsam.methods.looksam import LookSAMMethod
from lightning_slsam.methods.plain import PlainMethod
from lightning_slsam.methods.rst import RSTMethod
from lightning_slsam.methods.sam import SAMMethod
from lightning_slsam.methods.slsam import SLSAMMethod
from lightning_slsam.methods.ssam import SSAMDMethod, SSAMFMethod
from lightning_slsam.prefix_reuse import PrefixReuse
from lightning_slsam.samplers import (
    ArmSampler,
    Exp3Sampler,
    PinnedArmsSampler,
    TopArmsSampler,
    UniformSampler,
    _check_sparsity,
)
from lightning_slsam.skipped_steps import DEFAULT_MAX_SKIPPED_STEPS, SkippedSteps, check_max_skipped_steps
from lightning_slsam.step_engine import batch_norms, frozen_running_stats

BN_RUNNING_STATS = ("pass1", "both")
STATE_KEY_PREFIX = "SharpnessAware["
SAMPLERS = ("exp3", "uniform")


def find_sharpness_callback(trainer: pl.Trainer) -> SharpnessAware | None:
    """The Trainer's sharpness-aware callback, or None."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, SharpnessAware):
            return callback
    return None


class SharpnessAware(pl.Callback):
    """Base class of the method callbacks. Subclasses build their :class:`Method` in ``build_method``.

    Args:
        arms: how parameters are grouped into arms: ``"tensor"`` (default), ``"module"`` or ``"block"``.
        bn_running_stats: ``"pass1"`` (default) updates BatchNorm running statistics in pass 1 only;
            ``"both"`` lets pass 2 (at the perturbed weights) update them too.
        accumulate: micro-batches per optimizer step (default 1): pass 1 over all of them, one ascent,
            pass 2 over the same ones, one step.
        clip_grad_norm: clip the total L2 norm of the gradients the optimizer sees to this (default None),
            on unscaled gradients (in ``on_before_optimizer_step``).
        clip_grad_value: clip every gradient element to ``[-value, value]`` (default None).
        check_ranks: under DDP, verify every step that all ranks sampled the same arms (default False).
        history_every: record the sampling probabilities every this many steps (default 1; 0 = never).
        reuse_prefix: in pass 2 of a method whose pass 1 leaves arms out (SL-SAM), take the outputs of the
            module calls below the lowest active module from pass 1 instead of computing them again (default
            True; exact, see ``prefix_reuse.py``; False for a model whose modules read other modules'
            parameters without owning them).
        max_skipped_steps: a step whose gradients are not finite (NaN or inf, in any pass) is skipped with a
            warning, weights, optimizer and method state unchanged; this many skipped steps in a row stop
            training with :class:`~lightning_slsam.skipped_steps.NonFiniteTrainingError` (int >= 1, default 50;
            None never stops).

    Logged every step (``self.log`` of the module, so any Lightning logger gets them):
    ``train/loss`` (at w), ``train/loss_perturbed`` (at w + e), ``train/sharpness`` (their difference),
    ``train/grad_norm`` (``||g||`` over the pass-1 arms, unscaled), ``train/active_ratio`` (fraction of
    trainable elements with a gradient in pass 1), ``train/active_ratio_pass2`` (the same for pass 2; 0 on
    a one-pass step), ``train/passes`` (1 or 2 forward-backward passes this step), ``train/skipped_steps``
    (steps skipped for non-finite gradients since training began) and ``train/lr`` (the
    learning rate of the update; ``train/lr_pg<i>`` per parameter group when there are several); for methods
    that sample arms, ``train/prob_min``, ``train/prob_max`` and ``train/prob_entropy``
    (``probability_logging.py``).
    At each epoch end: ``train/active_ratio_epoch``, the mean active ratio since training began, and on a
    TensorBoard logger a histogram and a heatmap image of the per-arm probabilities.
    """

    def __init__(
        self,
        arms: str = "tensor",
        bn_running_stats: str = "pass1",
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        check_ranks: bool = False,
        history_every: int = 1,
        reuse_prefix: bool = True,
        max_skipped_steps: int | None = DEFAULT_MAX_SKIPPED_STEPS,
    ) -> None:
        if arms not in ARM_MODES:
            raise ValueError(f"arms: unknown arms mode {arms!r}; expected one of {', '.join(ARM_MODES)}")
        if bn_running_stats not in BN_RUNNING_STATS:
            raise ValueError(
                f"bn_running_stats: expected one of {', '.join(BN_RUNNING_STATS)}, got {bn_running_stats!r}"
            )
        if not (isinstance(accumulate, int) and accumulate >= 1):
            raise ValueError(
                f"accumulate: the number of micro-batches per step must be an int >= 1, got {accumulate!r}"
            )
        for key, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
            ):
                raise ValueError(f"{key}: must be a finite number > 0 or None, got {value!r}")
        if not (isinstance(history_every, int) and history_every >= 0):
            raise ValueError(f"history_every: must be an int >= 0 (0 keeps no history), got {history_every!r}")
        self.arms = arms
        self.bn_running_stats = bn_running_stats
        self.accumulate = accumulate
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.check_ranks = check_ranks
        self.history_every = history_every
        if not isinstance(reuse_prefix, bool):
            raise ValueError(f"reuse_prefix: must be True or False, got {reuse_prefix!r}")
        self.reuse_prefix = reuse_prefix
        #: steps skipped for non-finite gradients (issue 15); part of the checkpoint
        self.skipped = SkippedSteps(check_max_skipped_steps(max_skipped_steps), owner=type(self).__name__)
        #: the pass-2 replay of pass 1's prefix calls, set up at fit start when the method can use it
        self.prefix_reuse: PrefixReuse | None = None
        self.method: Method | None = None
        self.layout: ArmLayout | None = None
        self._batch_norms: list[nn.modules.batchnorm._BatchNorm] = []
        self._loaded: dict[str, Any] | None = None
        self._micro_batches: list[Any] = []
        self.steps = 0
        self.active_ratio_sum = 0.0
        self.active_ratio2_sum = 0.0
        self.passes_sum = 0
        #: how often each arm was active in pass 1 (int64, one per arm)
        self.selection_counts = torch.zeros(0, dtype=torch.long)
        self._history: list[Tensor] = []
        self._attention_hooks: list[Any] = []
        self._update_lrs: list[float] | None = None  # per parameter group, read at this step's optimizer.step()

    def build_method(self, layout: ArmLayout) -> Method:
        """The method this callback runs, for the model's arms."""
        raise NotImplementedError

    def method_for(self, module: nn.Module, layout: ArmLayout) -> Method:
        """The method of this callback's arguments for ``module`` and its arms, set up (``Method.setup``).

        Shared by the Lightning hooks (``on_fit_start``) and the plain-PyTorch optimizers of
        :mod:`lightning_slsam.optim`, so that both build the same method from the same validated arguments.
        """
        self._module = module  # build_method may read the module's structure (SLSAM's always_active)
        method = self.build_method(layout)
        method.setup(layout)
        return method

    def check_model(self, module: nn.Module) -> None:
        """Raise a ValueError naming the argument if this callback's arguments do not fit ``module``.

        Called by ``slsam-train`` once the model is built, before any training; the default checks nothing.
        """

    @property
    def state_key(self) -> str:
        """``SharpnessAware[<class>]``: the prefix lets ``on_load_checkpoint`` spot another method's state."""
        return f"{STATE_KEY_PREFIX}{type(self).__name__}]"

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning hands each callback only the state under its own key; without this check a run resumed
        # with another method would silently start that method afresh.
        others = [
            key for key in checkpoint.get("callbacks", {}) if key.startswith(STATE_KEY_PREFIX) and key != self.state_key
        ]
        if others and self.state_key not in checkpoint.get("callbacks", {}):
            written = others[0][len(STATE_KEY_PREFIX) : -1]
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was written with the {written} callback (method state "
                f"{others[0]!r}); resume with the same method, or load only the weights"
            )

    # --- Lightning hooks -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        # the mixin marks itself (mixin.py imports this module, so this module does not import the mixin)
        mixin = next((c for c in type(pl_module).__mro__ if c.__dict__.get("_sharpness_aware_mixin")), None)
        if mixin is None:
            raise TypeError(
                f"{name}: the LightningModule {type(pl_module).__name__} must inherit SharpnessAwareMixin, "
                f"e.g. class {type(pl_module).__name__}(SharpnessAwareMixin, L.LightningModule)"
            )
        others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, SharpnessAware) and c is not self]  # type: ignore[attr-defined]
        if others:
            raise ValueError(
                f"{name}: a Trainer takes one sharpness-aware callback, got {name} and {', '.join(others)}"
            )
        # the loss comes from the module's training_step or compute_loss; refuse what would not train two-pass
        module_conversion.check_module(pl_module, mixin, name)
        check_strategy(trainer.strategy, name)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__}: configure_optimizers must return exactly one optimizer (the base "
                f"optimizer), got {len(trainer.optimizers)}"
            )
        self.layout = build_arms(pl_module, self.arms)
        self.method = self.method_for(pl_module, self.layout)
        self._batch_norms = batch_norms(pl_module)
        self._remove_hooks()
        self._attention_hooks = attention_inputs.install(pl_module)
        if self.reuse_prefix and self.method.sparse_pass_one:
            self.prefix_reuse = PrefixReuse(pl_module, replayable=self._replayable)
        self._micro_batches = []
        self.selection_counts = torch.zeros(len(self.layout), dtype=torch.long)
        self._history = []
        if self._loaded is not None:
            self._apply_loaded()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()  # Lightning calls no teardown after an exception

    def _remove_hooks(self) -> None:
        for handle in self._attention_hooks:
            handle.remove()
        self._attention_hooks = []
        if self.prefix_reuse is not None:
            self.prefix_reuse.remove()
            self.prefix_reuse = None

    def _replayable(self, module: nn.Module) -> bool:
        """Pass 2 may skip ``module``'s call unless it is a BatchNorm that updates running stats in pass 2."""
        bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
        return not (bn and self.bn_running_stats == "both")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        # DDP: the step averages the active gradients itself (distributed.py); buffers still sync from rank 0
        disable_ddp_sync(trainer.strategy.model)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # kept for record_step: a self.log from this nested hook would make Lightning drop, on the first batch,
        # what training_step logged before it (its results are reset when the hook name changes)
        self._update_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        # Lightning calls this after the precision plugin unscaled the gradients (not before, issue 18089)
        if self.clip_grad_norm is None and self.clip_grad_value is None:
            return
        grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(grads, self.clip_grad_value)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(grads, self.clip_grad_norm)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.method is not None
        self.method.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step_schedulers(trainer, "epoch", epoch_end=True)
        if self.steps:
            pl_module.log("train/active_ratio_epoch", self.active_ratio_sum / self.steps)
        if self.layout is not None:  # SL-SAM: histogram and heatmap of the arm probabilities on TensorBoard
            probability_logging.log_epoch(
                trainer.loggers,
                self.probabilities(),
                self.probability_history(),
                self.layout.names,
                trainer.global_step,
            )

    # --- used by the mixin's step ----------------------------------------------------------------------
    def collect(self, batch: Any, last: bool) -> list[Any] | None:
        """Add a micro-batch; the group once ``accumulate`` are in (or the epoch's last batch came), else None."""
        self._micro_batches.append(batch)
        if len(self._micro_batches) < self.accumulate and not last:
            return None
        group, self._micro_batches = self._micro_batches, []
        return group

    def check_arms(self, active: Tensor) -> None:
        """With ``check_ranks``, verify that every rank sampled the same arms (one tiny all-reduce)."""
        if self.check_ranks:
            assert_same_arms(active)

    @contextmanager
    def second_pass_context(self) -> Iterator[None]:
        """During pass 2: BatchNorm layers normalise with batch statistics but do not update running ones."""
        with frozen_running_stats(self._batch_norms if self.bn_running_stats == "pass1" else []):
            yield

    def record_step(
        self,
        module: pl.LightningModule,
        loss: Tensor,
        loss2: Tensor | None,
        first: PassOne,
        active1: Tensor,
        active2: Tensor | None,
    ) -> None:
        """Log one finished step and update the running counters."""
        assert self.layout is not None
        ratio = self.layout.active_ratio(active1)
        ratio2 = 0.0 if active2 is None else self.layout.active_ratio(active2)
        self.steps += 1
        self.active_ratio_sum += ratio
        self.active_ratio2_sum += ratio2
        self.passes_sum += 1 if loss2 is None else 2
        self.selection_counts += active1.to(torch.long)
        if self.history_every and (self.steps - 1) % self.history_every == 0:
            probs = self.probabilities()
            if probs is not None:
                self._history.append(probs.to(torch.float32))
        # a key the user's training_step logged this step keeps the user's value
        log = functools.partial(pass_context.log_unless_user_logged, module)
        log("train/loss", loss.detach(), prog_bar=True)
        log("train/active_ratio", ratio)
        log("train/passes", 1.0 if loss2 is None else 2.0)
        if self.method is not None and self.method.measures_norms:
            log("train/grad_norm", first.norm_over(active1))
        if loss2 is not None and active2 is not None:
            log("train/loss_perturbed", loss2.detach())
            log("train/sharpness", (loss2 - loss).detach())
        # 0 on one-pass steps, so that its mean over steps is the average cost of the second backward pass
        log("train/active_ratio_pass2", ratio2)
        if self._update_lrs is not None:  # the learning rates of this step's update (none when it was skipped)
            for index, lr in enumerate(self._update_lrs):
                log("train/lr" if len(self._update_lrs) == 1 else f"train/lr_pg{index}", lr)
            self._update_lrs = None
        probs = self.probabilities()
        if probs is not None:  # methods that sample arms: a summary of the per-arm probabilities, any logger
            for key, value in probability_logging.summary(probs).items():
                log(key, value)

    def record_skip(
        self, module: pl.LightningModule, skipped: bool, global_step: int, where: str, scaler: bool
    ) -> None:
        """Count a skipped step (warns; raises after ``max_skipped_steps`` in a row) and log the running count."""
        self.skipped.record(skipped, global_step, where, scaler)
        pass_context.log_unless_user_logged(module, "train/skipped_steps", float(self.skipped.total))

    @property
    def mean_active_ratio(self) -> float:
        """Mean active-parameter ratio (pass 1) over all steps so far; 0 before the first step."""
        return self.active_ratio_sum / self.steps if self.steps else 0.0

    @property
    def mean_active_ratio_pass2(self) -> float:
        """Mean active-parameter ratio of pass 2 over all steps so far (0 counted for one-pass steps)."""
        return self.active_ratio2_sum / self.steps if self.steps else 0.0

    @property
    def mean_passes(self) -> float:
        """Mean forward+backward passes per optimizer step so far (1 to 2)."""
        return self.passes_sum / self.steps if self.steps else 0.0

    def probabilities(self) -> Tensor | None:
        """Current per-arm sampling probabilities (float64, CPU), or None for methods that do not sample."""
        probs = None if self.method is None else self.method.probabilities()
        return None if probs is None else probs.detach().cpu()

    def probability_history(self) -> Tensor | None:
        """Per-arm probabilities recorded every ``history_every`` steps: float32 ``(records, N)``, or None."""
        return torch.stack(self._history) if self._history else None

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.method is None or self.layout is None:
            return dict(self._loaded) if self._loaded is not None else {}
        return {
            "method": self.method.name,
            "arms": self.layout.fingerprint(),
            "method_state": self.method.state_dict(),
            "steps": self.steps,
            "active_ratio_sum": self.active_ratio_sum,
            "active_ratio2_sum": self.active_ratio2_sum,
            "passes_sum": self.passes_sum,
            "selection_counts": self.selection_counts.clone(),
            "skipped_steps": self.skipped.state_dict(),
            "history": list(self._history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.method is not None:
            self._apply_loaded()

    def _apply_loaded(self) -> None:
        state, self._loaded = self._loaded, None
        if not state:
            return
        assert self.method is not None and self.layout is not None
        name = type(self).__name__
        if state.get("method") != self.method.name:
            raise ValueError(
                f"{name}: the checkpoint was written by method {state.get('method')!r}, this run uses "
                f"{self.method.name!r}; resume with the same method or load only the weights"
            )
        if state.get("arms") != self.layout.fingerprint():
            saved = state.get("arms") or {}
            raise ValueError(
                f"{name}: the checkpoint's arms ({saved.get('mode')!r}, {len(saved.get('names', []))} arms) do not "
                f"match this run's ({self.layout.mode!r}, {len(self.layout)} arms); use the same arms= and model"
            )
        self.method.load_state_dict(state["method_state"])
        self.steps = int(state["steps"])
        self.active_ratio_sum = float(state["active_ratio_sum"])
        self.active_ratio2_sum = float(state["active_ratio2_sum"])
        self.passes_sum = int(state["passes_sum"])
        self.selection_counts = state["selection_counts"].clone()
        self._history = list(state["history"])
        self.skipped.load_state_dict(state.get("skipped_steps", {}))  # absent in checkpoints before issue 15


class Plain(SharpnessAware):
    """The base optimizer (one pass per step) with the same logging as the other methods: method ``base``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    def build_method(self, layout: ArmLayout) -> Method:
        return PlainMethod()


class SAM(SharpnessAware):
    """Sharpness-aware minimization on every parameter (Foret et al. 2021): two passes per step.

    Args:
        rho: perturbation radius, in parameter-space L2 units (>= 0; default 0.05).
        adaptive: ASAM's scale-invariant ascent ``rho T^2 g / ||T g||`` with ``T = |w| + eta`` on weights
            and 1 on biases (Kwon et al. 2021); default False.
        eta: ASAM's offset (>= 0; default 0.01), used when ``adaptive``.
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, **options: Any) -> None:
        super().__init__(**options)
        self._method = SAMMethod(rho, adaptive, eta)  # validates the arguments now, before training

    def build_method(self, layout: ArmLayout) -> Method:
        return self._method


class ASAM(SharpnessAware):
    """Adaptive SAM (Kwon et al. 2021): ``e = rho T^2 g / ||T g||``, ``T = |w| + eta`` on weights, 1 on biases.

    Args:
        rho: perturbation radius in the T-scaled space (>= 0; default 0.5, the paper's).
        eta: offset in T (>= 0; default 0.01).
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(self, rho: float = 0.5, eta: float = 0.01, **options: Any) -> None:
        super().__init__(**options)
        self._method = SAMMethod(rho, adaptive=True, eta=eta)

    def build_method(self, layout: ArmLayout) -> Method:
        return self._method


class SSAMF(SharpnessAware):
    """SSAM-F (Mi et al. 2022): SAM's ascent masked to the elements with the largest empirical Fisher score.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        sparsity: fraction of elements NOT perturbed, in [0, 1) (default 0.5).
        num_samples: training samples whose per-sample gradients make the Fisher score (default 128).
        update_every_epochs: refresh the mask at the start of every this-many epochs (default 1).
        per_sample: ``"auto"`` (torch.func vmap, falling back to a loop), ``"vmap"`` or ``"loop"``.
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(
        self,
        rho: float = 0.05,
        sparsity: float = 0.5,
        num_samples: int = 128,
        update_every_epochs: int = 1,
        per_sample: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._args = {
            "rho": rho,
            "sparsity": sparsity,
            "num_samples": num_samples,
            "update_every_epochs": update_every_epochs,
            "per_sample": per_sample,
        }
        SSAMFMethod(**self._args)  # validate now, before training

    def build_method(self, layout: ArmLayout) -> Method:
        return SSAMFMethod(**self._args)


class SSAMD(SharpnessAware):
    """SSAM-D (Mi et al. 2022): SAM's ascent masked by a random mask evolved by drop-and-grow.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        sparsity: fraction of elements NOT perturbed, in [0, 1) (default 0.5).
        drop_rate: fraction of live elements replaced at a refresh, cosine-decayed over training (default 0.5).
        update_every_epochs: refresh at the first step of every this-many epochs after the first (default 1).
        drop: ``"gradient"`` (drop the smallest |g|, default) or ``"random"``.
        grow: ``"random"`` (default) or ``"gradient"`` (grow the largest |g|).
        seed: the mask generator's seed; None draws it from the global torch RNG (equal on every rank).
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(
        self,
        rho: float = 0.05,
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        update_every_epochs: int = 1,
        drop: str = "gradient",
        grow: str = "random",
        seed: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._args = {
            "rho": rho,
            "sparsity": sparsity,
            "drop_rate": drop_rate,
            "update_every_epochs": update_every_epochs,
            "drop": drop,
            "grow": grow,
        }
        self.seed = seed
        SSAMDMethod(**self._args, seed=0)  # type: ignore[arg-type]  # validate now, before training

    def build_method(self, layout: ArmLayout) -> Method:
        return SSAMDMethod(**self._args, seed=broadcast_seed(self.seed))  # type: ignore[arg-type]


class LayerwiseGNP(SharpnessAware):
    """Layer-wise gradient-norm penalising (Lee 2025): perturb only the arms with the largest gradients.

    Pass 1 on every arm; the ``layer_fraction`` of arms with the largest gradient norms are perturbed and
    are the only arms in pass 2; they get ``(1 - alpha) g(w) + alpha g(w + e)``, the rest ``g(w)``.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        alpha: weight of g(w + e), in [0, 1] (default 0.8).
        layer_fraction: share of arms perturbed, in (0, 1], at least one arm (default 0.1).
        reselect_every: choose the arms every this many steps (default 1).
        arms: ``"block"`` (default), ``"module"`` or ``"tensor"``.
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(
        self,
        rho: float = 0.05,
        alpha: float = 0.8,
        layer_fraction: float = 0.1,
        reselect_every: int = 1,
        arms: str = "block",
        **options: Any,
    ) -> None:
        super().__init__(arms=arms, **options)
        self._args = (rho, alpha, layer_fraction, reselect_every)
        LayerwiseGNPMethod(*self._args)  # validate now, before training

    def build_method(self, layout: ArmLayout) -> Method:
        return LayerwiseGNPMethod(*self._args)


class ARSAM(SharpnessAware):
    """ARSAM (Deng & Pang 2025): SAM's gradient split as g(w) + PSF; the PSF is computed exactly on refresh
    steps (two passes) and reused, decaying, on one-pass steps in between (docs/methods/arsam.md).

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        threshold: refresh when ||g|| has drifted by more than this fraction since the last refresh
            (default 0.2; ``inf`` refreshes only every ``max_interval`` steps).
        max_interval: refresh at least every this many steps (default 5).
        mix_decay: the reused PSF is weighted ``mix_decay ** j`` on the j-th step after a refresh (default 0.7).
        mix_steps: drop the PSF after this many reuse steps (default 6; None keeps it).
        warmup_steps: refresh (plain SAM) on every step before this step (default 0).
        warmup_epochs: refresh (plain SAM) on every step before this epoch (default 0).
        last_arms: measure the drift on the last this-many arms only (default None: all).
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(
        self,
        rho: float = 0.05,
        threshold: float = 0.2,
        max_interval: int = 5,
        mix_decay: float = 0.7,
        mix_steps: int | None = 6,
        warmup_steps: int = 0,
        warmup_epochs: int = 0,
        last_arms: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._args = {
            "rho": rho,
            "threshold": threshold,
            "max_interval": max_interval,
            "mix_decay": mix_decay,
            "mix_steps": mix_steps,
            "warmup_steps": warmup_steps,
            "warmup_epochs": warmup_epochs,
            "last_arms": last_arms,
        }
        ARSAMMethod(**self._args)  # validate now, before training

    def build_method(self, layout: ArmLayout) -> Method:
        return ARSAMMethod(**self._args)


class LookSAM(SharpnessAware):
    """LookSAM (Liu et al. 2022): a SAM step every ``k`` steps, reusing its orthogonal gradient in between.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        k: SAM-step interval (int >= 1; default 5); ``k=1`` is SAM.
        alpha: weight of the reused component (>= 0; default 0.7).
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(self, rho: float = 0.05, k: int = 5, alpha: float = 0.7, **options: Any) -> None:
        super().__init__(**options)
        self._args = (rho, k, alpha)
        LookSAMMethod(*self._args)

    def build_method(self, layout: ArmLayout) -> Method:
        return LookSAMMethod(*self._args)


class RST(SharpnessAware):
    """Randomized SAM (the SL-SAM authors' baseline): a SAM step with probability ``p``, else a base step.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        p: probability of a SAM step, in [0, 1] (default 0.5).
        seed: the coin's seed; None draws it from the global torch RNG (equal on every rank).
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(self, rho: float = 0.05, p: float = 0.5, seed: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._args = (rho, p)
        self.seed = seed
        RSTMethod(rho, p)

    def build_method(self, layout: ArmLayout) -> Method:
        return RSTMethod(*self._args, seed=broadcast_seed(self.seed))


class SLSAM(SharpnessAware):
    """Sparse-Layer SAM (Cheng et al. 2026): each step a bandit picks the arms that take part in both passes.

    Args:
        rho: perturbation radius (>= 0; default 0.05; the paper fine-tunes with 0.01).
        sparsity: the expected fraction of arms active per step, in (0, 1] (default 0.2, the paper's).
        bandit_lr: Exp3 step size eta (>= 0; default 1e-3, the authors').
        arms: ``"tensor"`` (default, the paper's), ``"module"`` or ``"block"``.
        seed: the sampler's seed; None draws it from the global torch RNG (``seed_everything`` fixes it).
        sampler: ``"exp3"`` (default, the paper's bandit) or ``"uniform"`` (random arms, fixed p = sparsity).
        norm_scale: ``"raw"`` (default, faithful) or ``"running_mean"`` (scale-free bandit, see
            :class:`~lightning_slsam.samplers.Exp3Sampler`).
        top_fraction: sample only among the top ``ceil(top_fraction * N)`` of the N arms, in parameter
            order (default 1.0: all arms, the paper's); the arms below never train. With ``arms="block"``
            and ``sparsity`` then a fraction of the window, this is the low-cost setting: backward passes
            stop at the window and pass 2 replays the forward below it (see
            :class:`~lightning_slsam.samplers.TopArmsSampler`).
        always_active: arms active on every step, outside the bandit (default none, the paper's): group
            names ``"head"``, ``"norms"``, ``"biases"``, ``"vectors"`` (every tensor of at most one
            dimension), ``"embeddings"``, or fnmatch patterns on parameter names (see
            :mod:`lightning_slsam.arm_groups`). The bandit then samples the other arms with budget
            ``sparsity`` times their count.
        max_update_scale: None (default, the paper's) or a cap c >= 1: each active arm's optimizer update
            is scaled by ``min(1 / p_i, c)``, p_i its sampling probability, so that rarely sampled arms
            move as far per step as every-step ones (:class:`~lightning_slsam.methods.slsam.SLSAMMethod`).
        options: ``bn_running_stats``, ``accumulate``, ``clip_grad_norm``, ... of :class:`SharpnessAware`.
    """

    def __init__(
        self,
        rho: float = 0.05,
        sparsity: float = 0.2,
        bandit_lr: float = 1e-3,
        arms: str = "tensor",
        seed: int | None = None,
        sampler: str = "exp3",
        norm_scale: str = "raw",
        top_fraction: float = 1.0,
        always_active: Sequence[str] | str | None = None,
        max_update_scale: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(arms=arms, **options)
        self.rho = check_rho(rho)
        self.always_active = check_spec(always_active)
        if max_update_scale is not None and not (
            isinstance(max_update_scale, (int, float)) and 1.0 <= max_update_scale < float("inf")
        ):
            raise ValueError(f"max_update_scale: must be a finite number >= 1 or None, got {max_update_scale!r}")
        self.max_update_scale = max_update_scale
        _check_sparsity(sparsity)
        is_number = isinstance(bandit_lr, (int, float)) and not isinstance(bandit_lr, bool)
        if not (is_number and math.isfinite(bandit_lr) and bandit_lr >= 0.0):  # inf freezes the bandit, NaN poisons it
            raise ValueError(f"bandit_lr: the bandit step size must be a finite number >= 0, got {bandit_lr!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if norm_scale not in ("raw", "running_mean"):
            raise ValueError(f"norm_scale: expected 'raw' or 'running_mean', got {norm_scale!r}")
        self.sparsity = float(sparsity)
        self.bandit_lr = float(bandit_lr)
        self.seed = seed
        self.sampler = sampler
        if not (isinstance(top_fraction, (int, float)) and 0.0 < top_fraction <= 1.0):
            raise ValueError(f"top_fraction: the sampled fraction of arms must lie in (0, 1], got {top_fraction!r}")
        self.norm_scale = norm_scale
        self.top_fraction = float(top_fraction)

    def check_model(self, module: nn.Module) -> None:
        if self.always_active:
            self._pinned(module, build_arms(module, self.arms))

    def _pinned(self, module: nn.Module, layout: ArmLayout) -> Tensor:
        """The ``always_active`` arms of ``layout``; refused when they are every arm (nothing left to sample)."""
        pinned = select_arms(module, layout, self.always_active)
        if bool(pinned.all()):
            raise ValueError(
                f"always_active: {list(self.always_active)} selects every arm of the model; nothing is left "
                "to sample (use SAM)"
            )
        return pinned

    def build_method(self, layout: ArmLayout) -> Method:
        seed = broadcast_seed(self.seed)  # every rank samples the same arms
        pinned = self._pinned(self._module, layout) if self.always_active else None
        free = len(layout) if pinned is None else int((~pinned).sum())
        window = min(free, math.ceil(self.top_fraction * free - 1e-9))
        if self.sampler == "uniform":
            sampler: ArmSampler = UniformSampler(window, self.sparsity, seed=seed)
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
        if pinned is not None:
            sampler = PinnedArmsSampler(sampler, pinned)
        method = SLSAMMethod(self.rho, sampler, max_update_scale=self.max_update_scale)
        if self.sampler == "uniform":
            method.name = "slsam_uniform"
        return method


class SLSAMPlus(SLSAM):
    """SL-SAM with its update scaled for the sampling rate by default: method ``slsam_plus``.

    Plain SL-SAM updates each tensor on about a ``sparsity`` fraction of the steps, which on fine-tuning
    lengths leaves it behind SAM (docs/results.md). ``slsam_plus`` keeps the sparse two-pass step, the paper's
    bandit and its cost, and scales each sampled arm's optimizer update by ``min(1 / p_i, 5)``
    (``max_update_scale=5``). Of the levers measured on the noisy-digits task (always-active head and 1-D tensors,
    a scale-free bandit, the update scaling, and all three together) the update scaling alone was the best and the
    steadiest over seeds; the others are still arguments. Every argument of :class:`SLSAM` can be set.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        sparsity: expected fraction of arms active per step (default 0.2, the paper's).
        max_update_scale: default 5.0.
        options: every other argument of :class:`SLSAM` (``always_active``, ``norm_scale``, ...).
    """

    def __init__(
        self, rho: float = 0.05, sparsity: float = 0.2, max_update_scale: float | None = 5.0, **options: Any
    ) -> None:
        super().__init__(rho=rho, sparsity=sparsity, max_update_scale=max_update_scale, **options)

    def build_method(self, layout: ArmLayout) -> Method:
        method = super().build_method(layout)
        method.name = "slsam_plus"
        return method
