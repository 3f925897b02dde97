"""How a LightningModule becomes a sharpness-aware one: where each pass's loss comes from, in any base order.

A module with :class:`~lightning_slsam.SharpnessAwareMixin` among its bases gives the loss of a batch in one of
two ways:

- its own ``training_step(batch, batch_idx)``, kept as it was: it returns the loss (a scalar tensor, or a dict
  with a ``"loss"`` entry) and may call ``self.log``; the step runs it once per pass;
- ``compute_loss(batch)``, the scalar loss, when the module has no ``training_step`` of its own.

``training_step`` is the name Lightning calls, so the mixin owns it on every class: :func:`install` (from the
mixin's ``__init_subclass__``) replaces a ``training_step`` that a class defines (or, mixin last, inherits from
a plain ``LightningModule``) by an entry that runs the sharpness-aware step when Lightning calls it, and the
user's function when the step calls it inside a pass (``module.sam_pass != 0``). With the mixin last among
the bases, Lightning's own ``automatic_optimization`` and ``configure_callbacks`` would shadow the mixin's:
:func:`install` puts the mixin's on the class. :func:`check_module` refuses, before the first step, what
cannot train with the two-pass step, with the change to make.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_slsam.lightning_adapter import pass_context

_ORIGINAL = "_sam_original"  # on every step entry: the user's training_step it stands for (None: none)
_MANUAL_NAME = "manual_backward"  # a training_step that optimizes by itself calls it
_LIBRARIES = ("lightning", "lightning_slsam", "torch")  # code the scan of the user's step does not follow


def step_entry(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark the mixin's own ``training_step`` as a step entry standing for no user function."""
    setattr(function, _ORIGINAL, None)
    return function


def install(cls: type, mixin: type) -> None:
    """Make ``mixin`` own ``training_step``, ``automatic_optimization`` and ``configure_callbacks`` on ``cls``.

    Called from ``mixin.__init_subclass__`` for every class with the mixin among its bases.
    """
    owner = _owner(cls, "training_step")
    if owner is cls:  # the class defines training_step itself: keep it as the loss of each pass
        cls.training_step = _entry(cls, mixin, cls.__dict__["training_step"])
    elif not issubclass(owner, mixin):  # mixin last: the step would be a plain LightningModule's
        cls.training_step = _entry(cls, mixin, None)
    automatic = inspect.getattr_static(cls, "automatic_optimization")
    if automatic is inspect.getattr_static(pl.LightningModule, "automatic_optimization"):
        cls.automatic_optimization = mixin.__dict__["automatic_optimization"]  # type: ignore[attr-defined]
    if not issubclass(_owner(cls, "configure_callbacks"), mixin):
        cls.configure_callbacks = _configure_callbacks_after(cls)


def _owner(cls: type, name: str) -> type:
    """The first class in ``cls``'s MRO that defines ``name``."""
    return next(klass for klass in cls.__mro__ if name in klass.__dict__)


def _entry(cls: type, mixin: type, original: Callable[..., Any] | None) -> Callable[..., Any]:
    mixin_step = mixin.__dict__["training_step"]

    def training_step(self: Any, batch: Any, batch_idx: int = 0) -> Any:
        if pass_context.current(self) == pass_context.OUTSIDE:  # Lightning's call: the sharpness-aware step
            return mixin_step(self, batch, batch_idx)
        if original is not None:  # inside a pass: the user's training_step is the loss
            return call_step(original, self, batch, batch_idx)
        return run_after(cls, self, batch, batch_idx)

    training_step.__name__ = "training_step"
    training_step.__qualname__ = f"{cls.__qualname__}.training_step"
    training_step.__doc__ = (original or mixin_step).__doc__
    setattr(training_step, _ORIGINAL, original)
    return training_step


def run_after(owner: type, module: Any, batch: Any, batch_idx: int) -> Any:
    """Inside a pass: the ``training_step`` that follows ``owner`` in the module's MRO, else ``compute_loss``.

    ``LightningModule``'s placeholder ``training_step`` counts as none: then the loss is ``compute_loss``.
    """
    mro = type(module).__mro__
    for klass in mro[mro.index(owner) + 1 :]:
        if klass is pl.LightningModule:
            break
        function = klass.__dict__.get("training_step")
        if function is not None:
            return call_step(function, module, batch, batch_idx)
    return module.compute_loss(batch)


def call_step(function: Callable[..., Any], module: Any, batch: Any, batch_idx: int) -> Any:
    """``function(module, batch, batch_idx)``, or without ``batch_idx`` if it takes none (as Lightning does)."""
    if is_param_in_hook_signature(function, "batch_idx", min_args=2):
        return function(module, batch, batch_idx)
    return function(module, batch)


def user_training_step(cls: type) -> tuple[type, Callable[..., Any]] | None:
    """The class and function of the module's own ``training_step``, or None (the loss is ``compute_loss``)."""
    steps = _user_training_steps(cls)
    return steps[0] if steps else None


def pass_loss(module: Any, batch: Any, batch_idx: int) -> Tensor:
    """The loss of one micro-batch in the current pass: the module's ``training_step`` or ``compute_loss``."""
    output = module.training_step(batch, batch_idx)
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        got = type(output).__name__
        if isinstance(output, dict):
            got = f"a dict with keys {sorted(map(str, output))}" if loss is None else f"a dict with 'loss' {got}"
        if isinstance(loss, Tensor):
            got = f"Tensor{tuple(loss.shape)}"
        has_step = user_training_step(type(module)) is not None
        shape = "a scalar tensor (or a dict with a scalar 'loss')" if has_step else "a scalar tensor"
        raise TypeError(f"{loss_source_name(type(module))} must return {shape}, got {got}")
    return loss


def compute_loss_from_training_step(module: Any, batch: Any) -> Tensor:
    """The mixin's ``compute_loss`` of a module that has its own ``training_step``: that step's loss, run as an
    extra pass (``sam_pass == 3``, ``self.log`` muted, ``batch_idx`` 0). Methods that differentiate the loss of
    other batches (SSAM-F's Fisher score) call it."""
    name = type(module).__name__
    if user_training_step(type(module)) is None or pass_context.current(module) != pass_context.OUTSIDE:
        raise NotImplementedError(
            f"{name}.compute_loss: implement compute_loss(self, batch) and return the scalar training loss, or "
            f"keep a training_step(self, batch, batch_idx) that returns it"
        )
    with pass_context.running(module, pass_context.EXTRA):
        return pass_loss(module, batch, 0)


def loss_source_name(cls: type) -> str:
    """``Net.training_step`` or ``Net.compute_loss``: what gives the loss of a pass, for messages."""
    source = user_training_step(cls)
    return f"{source[0].__name__}.training_step" if source else f"{cls.__name__}.compute_loss"


def check_module(module: Any, mixin: type, callback_name: str) -> None:
    """Refuse, before the first step, a module that would not train with the two-pass step; say what to change."""
    cls = type(module)
    name = cls.__name__
    entry = inspect.getattr_static(cls, "training_step")
    if (
        not hasattr(entry, _ORIGINAL)
        or inspect.getattr_static(cls, "automatic_optimization") is not (mixin.__dict__["automatic_optimization"])
    ):
        owner = _owner(cls, "training_step")
        raise TypeError(
            f"{callback_name}: {name}.training_step comes from {owner.__name__}, not from SharpnessAwareMixin, so "
            f"the module would train without the sharpness-aware step; put SharpnessAwareMixin first among the "
            f"bases: class {name}(SharpnessAwareMixin, ...)"
        )
    source = user_training_step(cls)
    has_compute_loss = cls.compute_loss is not mixin.__dict__["compute_loss"]
    if source is None:
        if not has_compute_loss:
            raise NotImplementedError(
                f"{name}.compute_loss: implement compute_loss(self, batch) -> scalar loss, or keep a "
                f"training_step(self, batch, batch_idx) that returns the loss"
            )
        return
    owner, step = source
    if "dataloader_iter" in inspect.signature(step).parameters:
        raise TypeError(
            f"{callback_name}: {owner.__name__}.training_step takes a dataloader_iter; the sharpness-aware step "
            f"needs each batch twice: take (self, batch, batch_idx), or write compute_loss(self, batch)"
        )
    names = set().union(*(_names_reached(cls, function) for _, function in _user_training_steps(cls)))
    if _MANUAL_NAME in names:
        raise TypeError(
            f"{callback_name}: {owner.__name__}.training_step optimizes by itself (it calls {_MANUAL_NAME}); the "
            f"sharpness-aware step runs the backward passes and optimizer.step() around it. Make it return the "
            f"loss without stepping (or write compute_loss(self, batch)), and set no automatic_optimization"
        )
    if has_compute_loss and "compute_loss" not in names and "training_step" not in names:
        raise TypeError(
            f"{callback_name}: {name} has both {owner.__name__}.training_step and "
            f"{_owner(cls, 'compute_loss').__name__}.compute_loss, and training_step does not call compute_loss; "
            f"the step runs training_step (it keeps your self.log calls), so compute_loss would never be used. "
            f"Remove compute_loss, or call self.compute_loss(batch) from training_step"
        )


def _user_training_steps(cls: type) -> list[tuple[type, Callable[..., Any]]]:
    """Every user ``training_step`` in ``cls``'s MRO with its class (a ``super()`` chain), most derived first;
    the mixin's entries stand for none, and ``LightningModule``'s placeholder ends the search."""
    steps = []
    for klass in cls.__mro__:
        if klass is pl.LightningModule:
            break
        function = klass.__dict__.get("training_step")
        original = getattr(function, _ORIGINAL, function)
        if original is not None:
            steps.append((klass, original))
    return steps


def _names_reached(cls: type, function: Callable[..., Any], depth: int = 3) -> set[str]:
    """The attribute and global names ``function`` uses (its nested functions included) and, to ``depth``
    levels, those of the methods of ``cls`` it names (``self._shared_step(batch)``: what that one uses)."""
    names: set[str] = set()
    visited: set[int] = set()
    todo: list[tuple[Any, int]] = [(getattr(function, "__code__", None), 0)]
    while todo:
        code, level = todo.pop()
        if code is None or id(code) in visited:
            continue
        visited.add(id(code))
        names |= set(code.co_names)
        todo += [(const, level) for const in code.co_consts if inspect.iscode(const)]
        if level < depth:
            for name in code.co_names:
                method = inspect.getattr_static(cls, name, None)
                method = getattr(method, "__func__", method)  # staticmethod / classmethod
                if inspect.isfunction(method) and method.__module__.split(".")[0] not in _LIBRARIES:
                    todo.append((method.__code__, level + 1))
    return names


def inherited_callbacks(module: Any, owner: type) -> list[Any]:
    """What the ``configure_callbacks`` after ``owner`` in the module's MRO returns, as a list."""
    mro = type(module).__mro__
    for klass in mro[mro.index(owner) + 1 :]:
        function = klass.__dict__.get("configure_callbacks")
        if function is not None:
            callbacks = function(module)
            if callbacks is None:
                return []
            return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    return []


def _configure_callbacks_after(cls: type) -> Callable[..., Any]:
    def configure_callbacks(self: Any) -> list[Any]:
        return self._with_plain_fallback(inherited_callbacks(self, cls))

    configure_callbacks.__qualname__ = f"{cls.__qualname__}.configure_callbacks"
    return configure_callbacks
