"""The callbacks a user adds to the Trainer: each owns one method, its arms, logging and checkpoint state."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_int
from lightning_slsam.engine.arms import ArmLayout, build_arms
from lightning_slsam.engine.distributed import assert_same_arms, check_strategy, disable_ddp_sync
from lightning_slsam.engine.method import EpochStart, Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.prefix_reuse import PrefixReuse
from lightning_slsam.engine.run import Run
from lightning_slsam.engine.sharding import complete_optimizer_state
from lightning_slsam.engine.skipped_steps import SkippedSteps
from lightning_slsam.engine.step_options import StepOptions, install_typed_init, split_arguments
from lightning_slsam.lightning_adapter import module_conversion, pass_context, probability_logging
from lightning_slsam.lightning_adapter.fisher_samples import draw_training_samples
from lightning_slsam.lightning_adapter.lr_schedules import step_schedulers
from lightning_slsam.lightning_adapter.step_record import StepRecord, log_step
from lightning_slsam.methods.arsam import ARSAMOptions
from lightning_slsam.methods.base import BaseOptions
from lightning_slsam.methods.lagnp import LayerwiseGNPOptions
from lightning_slsam.methods.looksam import LookSAMOptions
from lightning_slsam.methods.msam import MSAMOptions
from lightning_slsam.methods.registry import METHOD_OPTIONS, class_for, class_name
from lightning_slsam.methods.rst import RSTOptions
from lightning_slsam.methods.sam import ASAMOptions, SAMOptions
from lightning_slsam.methods.slsam import SLSAMNoisyOptions, SLSAMOptions, SLSAMPlusOptions
from lightning_slsam.methods.sparse_msam import SparseMSAMOptions
from lightning_slsam.methods.ssam import SSAMDOptions, SSAMFOptions

STATE_KEY_PREFIX = "SharpnessAware["


def total_epochs(trainer: pl.Trainer) -> int | None:
    """The epochs training runs for: ``max_epochs``, else estimated from ``max_steps``; None if unbounded."""
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs > 0:
        return int(max_epochs)
    max_steps = getattr(trainer, "max_steps", -1)
    per_epoch = getattr(trainer, "num_training_batches", float("inf"))
    if max_steps is not None and max_steps > 0 and 0 < per_epoch < float("inf"):
        return max(1, math.ceil(max_steps / per_epoch))
    return None


def find_sharpness_callback(trainer: pl.Trainer) -> SharpnessAware | None:
    """The Trainer's sharpness-aware callback, or None."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, SharpnessAware):
            return callback
    return None


class SharpnessAware(pl.Callback):
    """Base class of the method callbacks: each subclass names its method's options (``options_class``).

    Arguments (keywords only): the method's own (its options class, ``options_class``, e.g.
    :class:`~lightning_slsam.methods.slsam.SLSAMOptions`), the shared step's
    (:class:`~lightning_slsam.engine.step_options.StepOptions`: ``arms``, ``bn_running_stats``, ``clip_grad_norm``,
    ``clip_grad_value``, ``check_ranks``, ``reuse_prefix``, ``max_skipped_steps``) and the callback's own
    (:class:`LightningOptions`: ``accumulate``, ``history_every``). Each is checked when the callback is built,
    and an unknown name is a TypeError that lists the accepted ones.

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

    #: the method's one definition (its arguments, defaults, checks and builder); set by each subclass
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    #: the ``__init__`` that takes the arguments as ``**`` (a typed one is generated per subclass), whether this
    #: class's ``__init__`` is generated, and the module whose ``__init__`` definitions are the package's
    _explicit_init: ClassVar[Any]
    _typed: ClassVar[bool] = True
    _typed_module: ClassVar[str] = __name__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a real, typed __init__ (IDEs, inspect, LightningCLI's init_args): the method's arguments, the
        # callback's and the step's, each with its default
        install_typed_init(cls, (cls.options_class, LightningOptions, StepOptions))

    def __init__(self, **arguments: Any) -> None:
        name = type(self).__name__
        method_args, lightning_args, step_args = split_arguments(
            name, arguments, self.options_class, LightningOptions, StepOptions
        )
        #: the method's arguments, checked (``methods/<method>.py``)
        self.options: MethodOptions = self.options_class(**method_args)
        #: the shared step's options, checked (``step_options.py``)
        self.step_options = StepOptions(**step_args)
        lightning = LightningOptions(**lightning_args)
        self.arms: str = self.step_options.arms or self.options_class.default_arms
        self.bn_running_stats = self.step_options.bn_running_stats
        self.clip_grad_norm = self.step_options.clip_grad_norm
        self.clip_grad_value = self.step_options.clip_grad_value
        self.check_ranks = self.step_options.check_ranks
        self.reuse_prefix = self.step_options.reuse_prefix
        self.accumulate = lightning.accumulate
        self.history_every = lightning.history_every
        self.history_size = lightning.history_size
        #: the counters and probability history of the steps run so far; checkpoint state
        self.record = StepRecord(self.history_every, self.history_size)
        #: steps skipped for non-finite gradients; part of the checkpoint
        self.skipped = SkippedSteps(self.step_options.max_skipped_steps, owner=name)
        #: the model attached to the method's step (arms, method, trainable set, hooks), from fit start
        self.run: Run | None = None
        self.method: Method | None = None
        self.layout: ArmLayout | None = None
        self._loaded: dict[str, Any] | None = None
        self._micro_batches: list[Any] = []
        self._update_lrs: list[float] | None = None  # per parameter group, read at this step's optimizer.step()

    def __getattr__(self, name: str) -> Any:
        """The method's arguments read as attributes (``SLSAM(sparsity=0.5).sparsity == 0.5``); read-only, since
        the options are frozen and checked once."""
        options = self.__dict__.get("options")
        if options is not None and name in options.field_names():
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def build_method(self, layout: ArmLayout) -> Method:
        """The method this callback runs for the model's arms: by default the options' (``options.build``).

        Override it to run a method of your own on the shared step (the module is ``self._module``).
        """
        return self.options.build(self._module, layout)

    def method_for(self, module: nn.Module, layout: ArmLayout) -> Method:
        """The method of this callback's arguments for ``module`` and its arms, set up (``Method.setup``)."""
        self._module = module
        method = self.build_method(layout)
        method.setup(layout)
        return method

    def check_model(self, module: nn.Module) -> None:
        """Raise a ValueError naming the argument if this callback's arguments do not fit ``module``.

        Called by ``slsam-train`` once the model is built, before any training (SL-SAM's ``always_active``).
        """
        self.options.check_model(module, self.arms)

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
        self._remove_hooks()
        # every parameter is an arm; which ones train is read at each step (trainable.py)
        self.layout = build_arms(pl_module, self.arms, include_frozen=True)
        self.method = self.method_for(pl_module, self.layout)
        self.run = Run(
            pl_module, self.layout, self.method, self.step_options, trainer.optimizers[0], type(self).__name__
        )
        if self.run.sharding is not None:  # a distributed checkpoint needs every parameter's optimizer state
            complete_optimizer_state(trainer.optimizers[0])
        self._micro_batches = []
        self.record.start(len(self.layout))
        if self._loaded is not None:
            self._apply_loaded()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception; an interrupted step's weights go back to w first
        self._remove_hooks()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a checkpoint written during a step (a signal handler: SLURM's requeue) holds w, never w + e
        if self.run is not None and "state_dict" in checkpoint:
            self.run.patch_state_dict(checkpoint["state_dict"])

    def _remove_hooks(self) -> None:
        if self.run is not None:
            self.run.close()

    @property
    def prefix_reuse(self) -> PrefixReuse | None:
        """The pass-2 replay of pass 1's prefix calls (None when the method cannot use it, or before fit)."""
        return None if self.run is None else self.run.prefix_reuse

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        # DDP: the step averages the active gradients itself (distributed.py); buffers still sync from rank 0
        disable_ddp_sync(trainer.strategy.model)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # kept for record_step: a self.log from this nested hook would make Lightning drop, on the first batch,
        # what training_step logged before it (its results are reset when the hook name changes)
        self._update_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        # Lightning calls this after the precision plugin unscaled the gradients: clipping sees unscaled ones
        if self.run is not None:
            self.run.clip(optimizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.method is not None
        self.method.start_epoch(
            EpochStart(
                epoch=int(trainer.current_epoch),
                total_epochs=total_epochs(trainer),
                module=pl_module,
                draw_samples=functools.partial(draw_training_samples, trainer, pl_module),
            )  # loss_of None: the module's compute_loss
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step_schedulers(trainer, "epoch", epoch_end=True)
        if self.record.steps:
            # equal on every rank (the ranks sample the same arms); sync_dist only keeps Lightning from warning
            pl_module.log("train/active_ratio_epoch", self.mean_active_ratio, sync_dist=True)
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
        assert self.run is not None
        with self.run.second_pass_context():
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
        assert self.run is not None
        ratio = self.run.active_ratio(active1)
        ratio2 = 0.0 if active2 is None else self.run.active_ratio(active2)
        probs = self.probabilities()
        self.record.add(ratio, ratio2, 1 if loss2 is None else 2, active1, probs)
        grad_norm = self.method is not None and self.method.measures_norms
        update_lrs, self._update_lrs = self._update_lrs, None
        log_step(module, loss, loss2, first, active1, active2, ratio, ratio2, grad_norm, update_lrs, probs)

    def record_skip(
        self, module: pl.LightningModule, skipped: bool, global_step: int, where: str, scaler: bool
    ) -> None:
        """Count a skipped step (warns; raises after ``max_skipped_steps`` in a row) and log the running count."""
        self.skipped.record(skipped, global_step, where, scaler)
        pass_context.log_unless_user_logged(module, "train/skipped_steps", float(self.skipped.total))

    @property
    def steps(self) -> int:
        """Optimizer steps run so far (skipped ones aside)."""
        return self.record.steps

    @property
    def selection_counts(self) -> Tensor:
        """How often each arm was active in pass 1 (int64, one per arm)."""
        return self.record.selection_counts

    @property
    def active_ratio_sum(self) -> float:
        return self.record.active_ratio_sum

    @property
    def passes_sum(self) -> int:
        return self.record.passes_sum

    @property
    def mean_active_ratio(self) -> float:
        """Mean active-parameter ratio (pass 1) over all steps so far; 0 before the first step."""
        return self.record.mean(self.record.active_ratio_sum)

    @property
    def mean_active_ratio_pass2(self) -> float:
        """Mean active-parameter ratio of pass 2 over all steps so far (0 counted for one-pass steps)."""
        return self.record.mean(self.record.active_ratio2_sum)

    @property
    def mean_passes(self) -> float:
        """Mean forward+backward passes per optimizer step so far (1 to 2)."""
        return self.record.mean(self.record.passes_sum)

    def probabilities(self) -> Tensor | None:
        """Current per-arm sampling probabilities (float64, CPU), or None for methods that do not sample."""
        probs = None if self.method is None else self.method.probabilities()
        return None if probs is None else probs.detach().cpu()

    def probability_history(self) -> Tensor | None:
        """Per-arm probabilities recorded every :attr:`history_interval` steps from the first: float32
        ``(records, N)`` with at most ``history_size`` records, or None."""
        return self.record.probability_history()

    @property
    def history_interval(self) -> int:
        """Steps between two records of :meth:`probability_history`: ``history_every``, doubled each time the
        history reached ``history_size`` records (it then keeps every other one)."""
        return self.record.interval

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.run is None:
            return dict(self._loaded) if self._loaded is not None else {}
        return {**self.run.state_dict(), **self.record.state_dict(), "skipped_steps": self.skipped.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.method is not None:
            self._apply_loaded()

    def _apply_loaded(self) -> None:
        state, self._loaded = self._loaded, None
        if not state:
            return
        assert self.run is not None
        self.run.load_state_dict(state)
        self.record.load_state_dict(state)
        self.skipped.load_state_dict(state.get("skipped_steps", {}))  # absent in older checkpoints


SharpnessAware._explicit_init = SharpnessAware.__init__


@dataclasses.dataclass(frozen=True)
class LightningOptions:
    """The callbacks' options that the plain-PyTorch optimizers do not have.

    Args:
        accumulate: micro-batches per optimizer step (int >= 1, default 1): pass 1 over all of them, one ascent,
            pass 2 over the same ones, one step.
        history_every: record the sampling probabilities every this many steps (int >= 0, default 1; 0 = never).
        history_size: the most records the probability history keeps (int >= 2, default 512): when it is full,
            every other record is dropped and the interval doubles, so the history covers the whole run at a fixed
            size (a checkpoint holds at most ``history_size`` x arms float32 values).
    """

    accumulate: int = 1
    history_every: int = 1
    history_size: int = 512

    def __post_init__(self) -> None:
        check_int("accumulate", self.accumulate, 1, what="the number of micro-batches per step")
        check_int("history_every", self.history_every, 0, what="the probability-history interval (0 keeps none)")
        check_int("history_size", self.history_size, 2, what="the most probability records kept")


class Base(SharpnessAware):
    """The base optimizer (one pass per step) with the same logging as the other methods: method ``base``.

    Arguments: the step options (:class:`~lightning_slsam.engine.step_options.StepOptions`) and ``accumulate``,
    ``history_every``.
    """

    options_class = BaseOptions


class SAM(SharpnessAware):
    """SAM on every parameter (Foret et al. 2021). Arguments: :class:`~lightning_slsam.methods.sam.SAMOptions`,
    the step options (:class:`~lightning_slsam.engine.step_options.StepOptions`), ``accumulate``, ``history_every``."""

    options_class = SAMOptions


class ASAM(SharpnessAware):
    """Adaptive SAM (Kwon et al. 2021). Arguments: :class:`~lightning_slsam.methods.sam.ASAMOptions` and the
    step options."""

    options_class = ASAMOptions


class SSAMF(SharpnessAware):
    """SSAM-F (Mi et al. 2022). Arguments: :class:`~lightning_slsam.methods.ssam.SSAMFOptions` and the step
    options."""

    options_class = SSAMFOptions


class SSAMD(SharpnessAware):
    """SSAM-D (Mi et al. 2022). Arguments: :class:`~lightning_slsam.methods.ssam.SSAMDOptions` and the step
    options."""

    options_class = SSAMDOptions


class LayerwiseGNP(SharpnessAware):
    """Layer-wise gradient-norm penalising (Lee 2025). Arguments:
    :class:`~lightning_slsam.methods.lagnp.LayerwiseGNPOptions` and the step options (``arms`` defaults to
    ``"block"``)."""

    options_class = LayerwiseGNPOptions


class ARSAM(SharpnessAware):
    """ARSAM (Deng & Pang 2025). Arguments: :class:`~lightning_slsam.methods.arsam.ARSAMOptions` and the step
    options."""

    options_class = ARSAMOptions


class LookSAM(SharpnessAware):
    """LookSAM (Liu et al. 2022). Arguments: :class:`~lightning_slsam.methods.looksam.LookSAMOptions` and the
    step options."""

    options_class = LookSAMOptions


class RST(SharpnessAware):
    """Randomized SAM (the SL-SAM authors' baseline). Arguments: :class:`~lightning_slsam.methods.rst.RSTOptions`
    and the step options."""

    options_class = RSTOptions


class SLSAM(SharpnessAware):
    """Sparse-Layer SAM (Cheng et al. 2026). Arguments: :class:`~lightning_slsam.methods.slsam.SLSAMOptions`
    and the step options (``arms``: ``"tensor"``, the paper's, by default)."""

    options_class = SLSAMOptions


class SLSAMPlus(SharpnessAware):
    """SL-SAM's sparse ascent in the top third of the tensors (and the head) with a dense update: pass 2 and the
    optimizer step on every trainable tensor (``dense_update=True``): method ``slsam_plus``.
    Arguments: :class:`~lightning_slsam.methods.slsam.SLSAMPlusOptions` and the step options."""

    options_class = SLSAMPlusOptions


class SLSAMNoisy(SharpnessAware):
    """SL-SAM for noisy labels: the head and 1-D tensors always active, the sampled updates scaled by
    ``min(1/p, 5)``, the update sparse: method ``slsam_noisy``.
    Arguments: :class:`~lightning_slsam.methods.slsam.SLSAMNoisyOptions` and the step options."""

    options_class = SLSAMNoisyOptions


class MSAM(SharpnessAware):
    """Momentum-SAM (Becker et al. 2024): one pass at ``w - rho m / ||m||``, m the optimizer's momentum.
    Arguments: :class:`~lightning_slsam.methods.msam.MSAMOptions` and the step options."""

    options_class = MSAMOptions


class SparseMSAM(SharpnessAware):
    """Momentum-SAM on SL-SAM's sampled arms, one pass that differentiates only them: method ``sparse_msam``.
    Arguments: :class:`~lightning_slsam.methods.sparse_msam.SparseMSAMOptions` and the step options."""

    options_class = SparseMSAMOptions


#: the callbacks users import by name; every other registered method gets one derived by :func:`callback_class`
NAMED_CALLBACKS: tuple[type[SharpnessAware], ...] = (
    Base,
    SAM,
    ASAM,
    SSAMF,
    SSAMD,
    LayerwiseGNP,
    ARSAM,
    LookSAM,
    RST,
    SLSAM,
    SLSAMPlus,
    SLSAMNoisy,
    MSAM,
    SparseMSAM,
)


def callback_class(name: str) -> type[SharpnessAware]:
    """The callback of the registered method ``name``: its named class, or one derived from its options class,
    the same class at every call (:func:`~lightning_slsam.methods.registry.class_for`).

    Raises:
        ValueError: no method of that name is registered (the message lists them).
    """
    return class_for(name, SharpnessAware, NAMED_CALLBACKS)


class _CallbacksByName(Mapping[str, type[SharpnessAware]]):
    """Every registered method's callback class by the method's name, read from the registry at each use."""

    def __getitem__(self, name: str) -> type[SharpnessAware]:
        if name not in METHOD_OPTIONS:
            raise KeyError(name)
        return callback_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(METHOD_OPTIONS))

    def __len__(self) -> int:
        return len(METHOD_OPTIONS)


#: each registered method's callback class by the method's name
CALLBACKS: Mapping[str, type[SharpnessAware]] = _CallbacksByName()


def __getattr__(name: str) -> type[SharpnessAware]:
    """A derived callback by its class name (``lightning_slsam.lightning_adapter.callback.<Name>``), as Hydra's
    ``_target_`` locates it."""
    for method, options in METHOD_OPTIONS.items():
        if class_name(options) == name:
            return callback_class(method)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
