"""Reuse pass 1's outputs below the lowest active module in pass 2 (the unperturbed prefix of the network).

In a sparse step (SL-SAM), pass 2 changes only the active parameters. Every module call that finishes
before the first call of a module owning an active parameter sees the same batch and the same weights
in both passes, so it returns the same output: pass 2 can take it from pass 1 instead of computing it
again. With block arms and a deep lowest-active block that is most of the second forward pass.

How (:class:`PrefixReuse`): forward hooks on every module follow the calls of pass 1. The calls that end
before the *boundary* (the first call of a module that directly owns a parameter of an active arm) are
kept, outermost only (a kept call's sub-calls are dropped at once, so the prefix's inner activations are
freed as usual): a detached reference to the output and the version counters of its tensors. Before pass
2, an entry whose tensors were modified in place since (a later ``ReLU(inplace=True)``, ``x += ...``) is
dropped; the others are replayed: the module's ``forward`` is shadowed for that call by one returning the
kept output, so none of its work runs. Hooks still fire; the shadow is removed after pass 2.

Exact: pass 2 computes the same values as without reuse, bitwise, for deterministic modules. Departures,
by design: a dropout layer in the prefix reuses pass 1's mask (pass 2 measures the loss of the same
sub-network at the perturbed weights); random draws it would have made in pass 2 are not made. A
``BatchNorm`` that updates its running statistics in pass 2 (``bn_running_stats="both"``) is never
replayed (nor any call around it), so those updates happen as without reuse. A call whose output requires
a gradient also ends the prefix (a module that reads an active parameter it does not own, as
``nn.MultiheadAttention`` reads ``out_proj.weight``). Not detected: a module that reads another
module's active parameter and returns a value that does not depend on it differentiably (e.g. under
``torch.no_grad``); pass ``reuse_prefix=False`` for such models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.hooks import RemovableHandle

__all__ = ["PrefixReuse"]

_PLAIN_LEAVES = (type(None), bool, int, float, str)


@dataclass
class _Call:
    """One open module call during recording."""

    module: nn.Module
    index: int  # the module's call number in this pass (0 for its first call)
    kept: list[_Entry] = field(default_factory=list)  # the outermost finished sub-calls to keep
    inner: list[tuple[int, int]] = field(default_factory=list)  # (module id, index) of every sub-call
    refused: bool = False  # a sub-call must run in pass 2, so this call cannot be replayed as a whole


@dataclass
class _Entry:
    """A finished prefix call: its output (detached) and the version counters of the output's tensors."""

    module: nn.Module
    index: int
    output: Any
    versions: list[tuple[Tensor, int]]
    inner: list[tuple[int, int]]  # the sub-calls a replay skips: (module id, pass-1 index)

    def intact(self) -> bool:
        return all(t._version == v for t, v in self.versions)


class PrefixReuse:
    """Forward hooks that record a pass's prefix calls and replay them in the next pass.

    Args:
        root: the module whose sub-modules are followed (the ``LightningModule``).
        replayable: a predicate; a module for which it returns False is never replayed (its sub-calls may be).

    Use: :meth:`record` around pass 1 with the modules that own an active parameter, then :meth:`replay`
    around pass 2; :meth:`remove` takes the hooks off. Between steps the hooks do nothing.
    """

    def __init__(self, root: nn.Module, replayable: Callable[[nn.Module], bool] = lambda m: True) -> None:
        self._replayable = replayable
        self._modules = list(root.modules())
        self._owners: dict[int, list[int]] = {}  # parameter id -> ids of the modules that own it directly
        for module in self._modules:
            for p in module._parameters.values():
                if p is not None:
                    self._owners.setdefault(id(p), []).append(id(module))
        self._handles: list[RemovableHandle] = []
        for module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))
        self._recording = False
        self._boundary: set[int] = set()
        self._crossed = False
        self._stack: list[_Call] = []
        self._kept: list[_Entry] = []
        self._calls: dict[int, int] = {}
        self._replaying = False
        self._order: dict[int, list[int]] = {}  # replay: pass-1 index of each pass-2 call, where they differ
        self._current: dict[int, int] = {}  # replay: pass-1 index of each module's running call
        self.replayed_calls = 0  #: calls replayed in the last pass 2 (for tests and benchmarks)

    # --- owners ----------------------------------------------------------------------------------------
    def owners_of(self, params: Iterable[nn.Parameter]) -> set[int]:
        """``id`` of every module that directly owns one of ``params`` (a tied parameter has several)."""
        return {owner for p in params for owner in self._owners.get(id(p), ())}

    # --- pass 1 -----------------------------------------------------------------------------------------
    def record(self, boundary: set[int]) -> _Recording:
        """Context manager for pass 1: keep the calls that end before any call of a module in ``boundary``."""
        return _Recording(self, boundary)

    def _enter(self, module: nn.Module, args: Any) -> None:
        if not (self._recording or self._replaying) or _in_backward():
            return
        index = self._calls.get(id(module), 0)
        self._calls[id(module)] = index + 1
        if self._replaying:
            # calls inside a replayed call do not happen in pass 2: map the count back to pass 1's numbering
            order = self._order.get(id(module))
            self._current[id(module)] = index if order is None else order[index] if index < len(order) else -1
            return
        if id(module) in self._boundary:
            self._crossed = True
        self._stack.append(_Call(module, index))

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._recording or _in_backward() or not self._stack or self._stack[-1].module is not module:
            return
        call = self._stack.pop()
        if not self._crossed and _needs_grad(output):
            # it depends on an active parameter (read without calling its owner, as nn.MultiheadAttention reads
            # out_proj.weight): the prefix ends here
            self._crossed = True
        refused = call.refused or not self._replayable(module)
        entry = None if self._crossed or refused else _entry(call, output)
        finished = [entry] if entry is not None else call.kept  # a kept call covers (and frees) its sub-calls
        if self._stack:
            parent = self._stack[-1]
            parent.kept.extend(finished)
            if not self._crossed:  # only a call that ends before the boundary becomes an entry and reads this
                parent.inner.extend([*call.inner, (id(module), call.index)])
            parent.refused = parent.refused or refused or entry is None
        else:
            self._kept.extend(finished)

    # --- pass 2 -----------------------------------------------------------------------------------------
    def replay(self) -> _Replay:
        """Context manager for pass 2: the kept calls return their pass-1 outputs; the record is then cleared."""
        return _Replay(self)

    def clear(self) -> None:
        self._kept, self._stack, self._calls, self._order, self._current = [], [], {}, {}, {}
        self._recording, self._replaying, self._crossed, self._boundary = False, False, False, set()

    def remove(self) -> None:
        """Take every hook off and drop what was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


class _Recording:
    def __init__(self, reuse: PrefixReuse, boundary: set[int]) -> None:
        self.reuse, self.boundary = reuse, boundary

    def __enter__(self) -> None:
        reuse = self.reuse
        reuse.clear()
        reuse._boundary, reuse._recording = self.boundary, True

    def __exit__(self, *exc: Any) -> None:
        reuse = self.reuse
        kept, calls = (reuse._kept, reuse._calls) if exc[0] is None else ([], {})
        reuse.clear()
        reuse._kept, reuse._calls = kept, calls  # the calls of pass 1, per module, for replay's numbering


class _Replay:
    def __init__(self, reuse: PrefixReuse) -> None:
        self.reuse = reuse
        self.shadowed: list[tuple[nn.Module, Any]] = []

    def __enter__(self) -> None:
        reuse = self.reuse
        reuse.replayed_calls = 0
        by_module: dict[int, tuple[nn.Module, dict[int, Any]]] = {}
        skipped: dict[int, set[int]] = {}
        for entry in reuse._kept:
            if entry.intact():
                by_module.setdefault(id(entry.module), (entry.module, {}))[1][entry.index] = entry.output
                for module_id, index in entry.inner:
                    skipped.setdefault(module_id, set()).add(index)
        total = reuse._calls
        reuse._kept, reuse._calls = [], {}
        reuse._order = {
            module_id: [i for i in range(total.get(module_id, 0)) if i not in indices]
            for module_id, indices in skipped.items()
        }
        for module, outputs in by_module.values():
            self.shadowed.append((module, module.__dict__.get("forward")))
            module.forward = _replaying_forward(reuse, module, outputs)  # type: ignore[method-assign]
        reuse._replaying = bool(by_module)

    def __exit__(self, *exc: Any) -> None:
        for module, previous in self.shadowed:
            del module.forward
            if previous is not None:
                module.forward = previous  # type: ignore[method-assign]
        self.shadowed = []
        self.reuse.clear()


def _replaying_forward(reuse: PrefixReuse, module: nn.Module, outputs: dict[int, Any]) -> Callable[..., Any]:
    original = module.forward  # the class's (or a previously shadowing) forward, bound

    def forward(*args: Any, **kwargs: Any) -> Any:
        index = reuse._current.get(id(module), -1)
        if index in outputs:
            reuse.replayed_calls += 1
            return outputs.pop(index)
        return original(*args, **kwargs)

    return forward


def _entry(call: _Call, output: Any) -> _Entry | None:
    leaves, _ = tree_flatten(output)
    if not all(isinstance(leaf, (Tensor, *_PLAIN_LEAVES)) for leaf in leaves):
        return None  # an output container we cannot look into: do not replay this call
    detached = tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, output)
    versions = [(t, t._version) for t in tree_flatten(detached)[0] if isinstance(t, Tensor)]
    return _Entry(call.module, call.index, detached, versions, call.inner)


def _needs_grad(output: Any) -> bool:
    return any(isinstance(leaf, Tensor) and leaf.requires_grad for leaf in tree_flatten(output)[0])


def _in_backward() -> bool:
    """True inside an autograd backward pass (activation checkpointing re-runs forwards there)."""
    return torch._C._current_graph_task_id() != -1
