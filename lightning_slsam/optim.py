"""The methods as plain-PyTorch optimizers, for your own loop or Lightning Fabric (docs/guide/plain-pytorch.md).

Each class carries the name of its callback (``lightning_slsam.optim.SLSAM`` runs what the ``lightning_slsam.SLSAM``
callback runs) and wraps a base optimizer the way the SAM implementations people know do::

    opt = lightning_slsam.optim.SLSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, seed=0)
    for x, y in loader:
        loss = opt.step(lambda: F.cross_entropy(model(x), y))  # the closure returns the loss, no backward
        opt.zero_grad()

The step is the same :func:`lightning_slsam.engine.step.run_step` the Lightning mixin runs, so a plain loop and
``Trainer.fit`` with the callback on the same data end with bitwise-equal weights (tests/test_optim.py). Both
take their arguments from the method's one definition, its options class (``methods/<method>.py``), and build the
method with it: the two APIs cannot drift apart. This module imports no Lightning.

SSAM-F's Fisher score needs training samples, which a closure does not give: :class:`SSAMF` takes them as
``fisher_data`` (the training loader), where the callback reads the Trainer's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_slsam.engine.arms import ArmLayout, build_arms
from lightning_slsam.engine.distributed import all_reduce_mean, assert_same_arms, disable_ddp_sync
from lightning_slsam.engine.method import EpochStart, Method
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.prefix_reuse import PrefixReuse
from lightning_slsam.engine.run import Run
from lightning_slsam.engine.sharding import complete_optimizer_state
from lightning_slsam.engine.skipped_steps import SkippedSteps
from lightning_slsam.engine.step import StepResult
from lightning_slsam.engine.step_options import StepOptions, install_typed_init, split_arguments
from lightning_slsam.methods.arsam import ARSAMOptions
from lightning_slsam.methods.base import BaseOptions
from lightning_slsam.methods.fisher_score import compute_loss_of, first_samples
from lightning_slsam.methods.lagnp import LayerwiseGNPOptions
from lightning_slsam.methods.looksam import LookSAMOptions
from lightning_slsam.methods.msam import MSAMOptions
from lightning_slsam.methods.registry import class_for
from lightning_slsam.methods.rst import RSTOptions
from lightning_slsam.methods.sam import ASAMOptions, SAMOptions
from lightning_slsam.methods.slsam import SLSAMNoisyOptions, SLSAMOptions, SLSAMPlusOptions
from lightning_slsam.methods.sparse_msam import SparseMSAMOptions
from lightning_slsam.methods.ssam import SSAMDOptions, SSAMFOptions

__all__ = [
    "ARSAM",
    "ASAM",
    "MSAM",
    "RST",
    "SAM",
    "SLSAM",
    "SSAMD",
    "SSAMF",
    "Base",
    "LayerwiseGNP",
    "LookSAM",
    "SLSAMNoisy",
    "SLSAMPlus",
    "SharpnessAwareOptimizer",
    "SparseMSAM",
]

#: callback arguments that have no meaning for a closure-driven step, and what to do instead
_NOT_APPLICABLE = {
    "accumulate": "the closure computes the step's whole loss; accumulate micro-batches inside it",
    "history_every": "no probability history is kept; read opt.method.probabilities() when you need it",
}


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """A sharpness-aware step around a base optimizer; subclasses name the method (``options_class``).

    Args:
        model: the ``nn.Module`` being trained (a Fabric- or DDP-wrapped module is unwrapped for its arms; a
            ``DistributedDataParallel`` wrapper's own gradient sync is turned off, the step averages the
            gradients that reach the optimizer and the per-arm norms over ranks itself).
        base_optimizer: the optimizer over the model's parameters that takes the update (SGD, AdamW, ...; a
            Fabric-wrapped one works).
        backward: called with the loss of each pass to differentiate it (default ``loss.backward()``; pass
            ``fabric.backward`` under Lightning Fabric).
        scaler: a ``torch.amp.GradScaler``: each loss is scaled before ``backward``, the per-arm norms the
            method sees are unscaled, and the update goes through ``scaler.step`` and ``scaler.update``
            (default None).
        method_args: the method's arguments (its options class, e.g.
            :class:`~lightning_slsam.methods.slsam.SLSAMOptions`: ``rho``, ``sparsity``, ``seed``, ...) and the
            step's (:class:`~lightning_slsam.engine.step_options.StepOptions`: ``arms``, ``bn_running_stats``,
            ``clip_grad_norm``, ``clip_grad_value``, ``reuse_prefix``, ``max_skipped_steps``), the callback's
            own defaults and checks; ``accumulate`` and ``history_every`` do not apply.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """

    #: the method's one definition (arguments, defaults, checks, builder); set by each subclass
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    #: the ``__init__`` that takes the arguments as ``**`` (a typed one is generated per subclass), whether this
    #: class's ``__init__`` is generated, and the module whose ``__init__`` definitions are the package's
    _explicit_init: ClassVar[Any]
    _typed: ClassVar[bool] = True
    _typed_module: ClassVar[str] = __name__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a real, typed __init__ (IDEs, inspect, jsonargparse): the explicit arguments (model, base_optimizer,
        # ...), then the method's and the step's, each with its default
        install_typed_init(cls, (cls.options_class, StepOptions))

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        backward: Callable[[Tensor], Any] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        **method_args: Any,
    ) -> None:
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: {name} needs the nn.Module being trained, got {type(model).__name__}")
        if not (hasattr(base_optimizer, "param_groups") and callable(getattr(base_optimizer, "step", None))):
            raise ValueError(
                f"base_optimizer: {name} needs an optimizer over the model's parameters (e.g. "
                f"torch.optim.SGD(model.parameters(), lr=0.1)), got {type(base_optimizer).__name__}"
            )
        if backward is not None and not callable(backward):
            raise ValueError(f"backward: must be a function of the loss (e.g. fabric.backward), got {backward!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"scaler: must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        for key, instead in _NOT_APPLICABLE.items():
            if key in method_args:
                raise ValueError(f"{key}: does not apply to {name} (a plain-PyTorch optimizer): {instead}")
        own, step = split_arguments(name, method_args, self.options_class, StepOptions)
        #: the method's arguments, checked
        self.options: MethodOptions = self.options_class(**own)
        #: the shared step's options, checked
        self.step_options = StepOptions(**step)
        arms = self.step_options.arms or self.options_class.default_arms
        #: the wrappers around the model (Fabric, DistributedDataParallel), outermost first
        self._wrappers = _wrappers(model)
        self.model = self._wrappers.pop() if self._wrappers else model
        self.base_optimizer = base_optimizer
        self.backward = backward
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        #: the model's arms (``arms`` argument): every parameter; which ones train is read at each step from
        #: their ``requires_grad`` and the base optimizer's parameter groups (``trainable.py``)
        self.layout: ArmLayout = build_arms(self.model, arms, include_frozen=True)
        #: the method (``lightning_slsam.methods``), built from the options exactly as under the Trainer
        self.method: Method = self.options.method_for(self.model, self.layout)
        #: the model attached to the method's step (trainable set, hooks, perturbation guard)
        self.run = Run(self.model, self.layout, self.method, self.step_options, base_optimizer, name, "base_optimizer")
        if self.run.sharding is not None:  # a distributed checkpoint needs every parameter's optimizer state
            complete_optimizer_state(base_optimizer)
        #: steps skipped for non-finite gradients (the ``max_skipped_steps`` limit applies)
        self.skipped = SkippedSteps(self.step_options.max_skipped_steps, owner=name)
        #: ``step`` calls so far (taken or skipped)
        self.steps = 0
        #: what the last step did (losses, arms of both passes, passes, skipped), None before the first
        self.last_step: StepResult | None = None
        # a torch.optim.Optimizer (LR schedulers, hooks, the step profiler) with no groups or state of its own:
        # param_groups, state and defaults are the base optimizer's, the same objects
        self._constructing = True
        torch.optim.Optimizer.__init__(self, [{"params": []}], {})
        self._constructing = False

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's parameter groups, the same list (an LR scheduler on either sees the same rates)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self._constructing:
            raise AttributeError("param_groups: they are the base optimizer's; change them there")

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The base optimizer's per-parameter state (AdamW's moments, ...), the same mapping."""
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if not self._constructing:
            raise AttributeError("state: it is the base optimizer's; change it there")

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's defaults (what ``add_param_group`` fills in)."""
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if not self._constructing:
            raise AttributeError("defaults: they are the base optimizer's; change them there")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; the next step trains it (with one gradient per step)."""
        if not self._constructing:
            self.base_optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """Run one sharpness-aware step; returns the loss at the unperturbed weights (detached).

        Args:
            closure: computes the model's scalar loss on this step's batch and returns it, without calling
                backward; it runs once per pass (twice on a two-pass step), at the weights of that pass.
        """
        if not callable(closure):
            raise ValueError(
                f"closure: {type(self).__name__}.step needs a function that returns the loss (without calling "
                f"backward), got {closure!r}"
            )
        for wrapper in self._wrappers:  # DDP: the step averages the gradients itself, as under the Trainer
            disable_ddp_sync(wrapper)
        check_ranks = assert_same_arms if self.step_options.check_ranks else None
        try:
            result = self.run.step(
                functools.partial(self._forward_backward, closure),
                self.base_optimizer,
                self._step_optimizer,
                scaler=self.scaler,
                all_reduce=all_reduce_mean,
                check_arms=check_ranks,
            )
        except BaseException:
            self.run.recover()  # w and the user's flags, whatever interrupted the step (also inside its cleanup)
            raise
        self.last_step = result
        step = self.steps
        self.steps += 1
        self.skipped.record(result.skipped, step, result.where, self.scaler is not None)
        return result.loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the base optimizer's parameters and of every arm."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.layout.params:
            p.grad = None

    def start_epoch(self, epoch: int, total_epochs: int | None = None) -> None:
        """Tell the method a new epoch begins (0-based ``epoch``; ``total_epochs`` the run's length, if known).

        Call it at the start of every epoch for methods with epoch schedules: SSAM-D refreshes its mask and
        decays its drop rate over ``total_epochs``; ARSAM counts ``warmup_epochs``. Others ignore it.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: must be an int >= 0, got {epoch!r}")
        if total_epochs is not None and (
            isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1
        ):
            raise ValueError(f"total_epochs: must be an int >= 1 or None, got {total_epochs!r}")
        draw_samples, loss_of = self._training_samples()
        self.method.start_epoch(
            EpochStart(
                epoch=epoch, total_epochs=total_epochs, module=self.model, draw_samples=draw_samples, loss_of=loss_of
            )
        )

    def _training_samples(self) -> tuple[Callable[[int], list[Any]] | None, Callable[[Any], Tensor] | None]:
        """What a method that scores training samples draws them with, and their loss (none by default)."""
        return None, None

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the method's (sampler, stored gradients, masks, coins), to resume exactly."""
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "method": self.method.name,
            "arms": self.layout.fingerprint(),
            "method_state": self.method.state_dict(),
            "skipped_steps": self.skipped.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; refuses another method's or another model's state."""
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict:
            keys = sorted(state_dict)[:4] if isinstance(state_dict, dict) else type(state_dict).__name__
            hint = (
                " (a base optimizer's own state_dict?)"
                if isinstance(state_dict, dict) and "param_groups" in state_dict
                else ""
            )
            raise ValueError(
                f"state_dict: {type(self).__name__}.load_state_dict takes what its state_dict() returned (keys "
                f"base_optimizer, method, arms, method_state, ...), got {keys}{hint}"
            )
        self.run.load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.skipped.load_state_dict(state_dict.get("skipped_steps", {}))
        self.steps = int(state_dict.get("steps", 0))

    def close(self) -> None:
        """Remove the hooks this optimizer put on the model (prefix replay, attention inputs)."""
        self.run.close()

    @property
    def prefix_reuse(self) -> PrefixReuse | None:
        """The pass-2 replay of pass 1's prefix calls (None when the method cannot use it)."""
        return self.run.prefix_reuse

    # --- what the engine calls -------------------------------------------------------------------------
    def _forward_backward(self, closure: Callable[[], Tensor], sam_pass: int) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"closure: must return the scalar loss tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            )
        if loss.requires_grad:  # False when no active parameter took part in the forward pass
            scaled = self.scaler.scale(loss) if self.scaler is not None else loss
            try:
                if self.backward is not None:
                    self.backward(scaled)
                else:
                    scaled.backward()
            except RuntimeError as error:
                if "backward through the graph a second time" not in str(error):
                    raise
                raise RuntimeError(
                    f"closure: it called backward itself; {type(self).__name__}.step differentiates the loss (once per "
                    "pass): return the loss without calling backward"
                ) from None
        return loss.detach()

    def _step_optimizer(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.base_optimizer)  # clipping sees unscaled gradients
        self.run.clip(self.base_optimizer)
        if self.scaler is not None:
            self.scaler.step(self.base_optimizer)  # skips the update itself when it found an inf
            self.scaler.update()
        else:
            self.base_optimizer.step()


SharpnessAwareOptimizer._explicit_init = SharpnessAwareOptimizer.__init__


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """``model``, the modules inside its ``DistributedDataParallel`` / Lightning Fabric wrappers, and the bare
    module last (whose parameters they share); an empty list when ``model`` is not wrapped."""
    chain = [model]
    while isinstance(chain[-1], nn.parallel.DistributedDataParallel) or hasattr(chain[-1], "_forward_module"):
        wrapper = chain[-1]
        # Fabric keeps the DDP wrapper as _forward_module and the bare module as .module
        inner = getattr(wrapper, "_forward_module", None)
        chain.append(inner if inner is not None and inner is not wrapper else wrapper.module)
    return chain if len(chain) > 1 else []


class Base(SharpnessAwareOptimizer):
    """The base optimizer, one pass per step (method ``base``); arguments as :class:`lightning_slsam.Base`."""

    options_class = BaseOptions


class SAM(SharpnessAwareOptimizer):
    """SAM on every parameter: arguments :class:`~lightning_slsam.methods.sam.SAMOptions` and the step options."""

    options_class = SAMOptions


class ASAM(SharpnessAwareOptimizer):
    """Adaptive SAM: arguments :class:`~lightning_slsam.methods.sam.ASAMOptions` and the step options."""

    options_class = ASAMOptions


class SSAMD(SharpnessAwareOptimizer):
    """SSAM-D: arguments :class:`~lightning_slsam.methods.ssam.SSAMDOptions` and the step options.

    Call :meth:`start_epoch` at the start of every epoch: the mask is refreshed there.
    """

    options_class = SSAMDOptions


class SSAMF(SharpnessAwareOptimizer):
    """SSAM-F: arguments :class:`~lightning_slsam.methods.ssam.SSAMFOptions`, the step options, and:

    Args:
        fisher_data: the training batches the Fisher score draws its ``num_samples`` samples from: a
            re-iterable of batches (a ``DataLoader``), iterated afresh at each refresh and taken from its start
            (the global RNG is put back afterwards, so a shuffling loader's training order is not disturbed);
            the batches are moved to the model's device.
        fisher_loss: the scalar loss of one batch (a single-sample batch at scoring time), reading the weights
            through ``model``; default ``model.compute_loss`` (``SharpnessAwareMixin``), as under the Trainer.

    Call :meth:`start_epoch` at the start of every epoch: the mask is computed there (at epoch 0, then every
    ``update_every_epochs``).
    """

    options_class = SSAMFOptions

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        fisher_data: Iterable[Any],
        fisher_loss: Callable[[Any], Tensor] | None = None,
        backward: Callable[[Tensor], Any] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        **method_args: Any,
    ) -> None:
        # an Iterator is used up by one refresh; checked without iter(), which would start a loader's workers
        if not isinstance(fisher_data, Iterable) or isinstance(fisher_data, Iterator):
            raise ValueError(
                "fisher_data: SSAMF needs a re-iterable of training batches (a DataLoader; not an iterator, which "
                f"one refresh would use up), got {type(fisher_data).__name__}"
            )
        if fisher_loss is None:
            fisher_loss = compute_loss_of(model, "fisher_loss")
        elif not callable(fisher_loss):
            raise ValueError(f"fisher_loss: must be a function of a batch that returns the loss, got {fisher_loss!r}")
        super().__init__(model, base_optimizer, backward=backward, scaler=scaler, **method_args)
        self.fisher_data = fisher_data
        self.fisher_loss = fisher_loss

    def _training_samples(self) -> tuple[Callable[[int], list[Any]] | None, Callable[[Any], Tensor] | None]:
        device = self.layout.params[0].device

        def to_device(batch: Any) -> Any:
            return apply_to_collection(batch, Tensor, lambda t: t.to(device))

        return functools.partial(first_samples, self.fisher_data, prepare=to_device), self.fisher_loss


class LayerwiseGNP(SharpnessAwareOptimizer):
    """Layer-wise GNP: arguments :class:`~lightning_slsam.methods.lagnp.LayerwiseGNPOptions` and the step options."""

    options_class = LayerwiseGNPOptions


class ARSAM(SharpnessAwareOptimizer):
    """ARSAM: arguments :class:`~lightning_slsam.methods.arsam.ARSAMOptions` and the step options."""

    options_class = ARSAMOptions


class LookSAM(SharpnessAwareOptimizer):
    """LookSAM: arguments :class:`~lightning_slsam.methods.looksam.LookSAMOptions` and the step options."""

    options_class = LookSAMOptions


class RST(SharpnessAwareOptimizer):
    """Randomized SAM: arguments :class:`~lightning_slsam.methods.rst.RSTOptions` and the step options."""

    options_class = RSTOptions


class SLSAM(SharpnessAwareOptimizer):
    """Sparse-Layer SAM: arguments :class:`~lightning_slsam.methods.slsam.SLSAMOptions` and the step options."""

    options_class = SLSAMOptions


class SLSAMPlus(SharpnessAwareOptimizer):
    """SL-SAM's sparse ascent in the top third of the tensors with a dense update (every trainable tensor steps
    every step): arguments :class:`~lightning_slsam.methods.slsam.SLSAMPlusOptions` and the step options."""

    options_class = SLSAMPlusOptions


class SLSAMNoisy(SharpnessAwareOptimizer):
    """SL-SAM for noisy labels (sparse update, scaled by min(1/p, 5), head and 1-D tensors always active):
    arguments :class:`~lightning_slsam.methods.slsam.SLSAMNoisyOptions` and the step options."""

    options_class = SLSAMNoisyOptions


class MSAM(SharpnessAwareOptimizer):
    """Momentum-SAM: arguments :class:`~lightning_slsam.methods.msam.MSAMOptions` and the step options; the
    base optimizer must keep a momentum (AdamW, Adam, SGD with momentum)."""

    options_class = MSAMOptions


class SparseMSAM(SharpnessAwareOptimizer):
    """Momentum-SAM on SL-SAM's sampled arms, one pass: arguments
    :class:`~lightning_slsam.methods.sparse_msam.SparseMSAMOptions` and the step options."""

    options_class = SparseMSAMOptions


#: the optimizers users import by name; every other registered method gets one derived by :func:`optimizer_class`
NAMED_OPTIMIZERS: tuple[type[SharpnessAwareOptimizer], ...] = (
    Base,
    SAM,
    ASAM,
    SSAMD,
    SSAMF,
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


def optimizer_class(name: str) -> type[SharpnessAwareOptimizer]:
    """The plain-PyTorch optimizer of the registered method ``name``: its named class, or one derived from its
    options class, the same class at every call (:func:`~lightning_slsam.methods.registry.class_for`).

    Raises:
        ValueError: no method of that name is registered (the message lists them).
    """
    return class_for(name, SharpnessAwareOptimizer, NAMED_OPTIMIZERS)
