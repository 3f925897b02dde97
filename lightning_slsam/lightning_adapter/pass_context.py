"""Which pass of the sharpness-aware step a module is in, and what its ``self.log`` does there.

A two-pass step runs the module's loss (its ``training_step`` or ``compute_loss``) more than once per
optimizer step: pass 1 at the weights ``w``, pass 2 at the perturbed ``w + e``, and some methods add passes of
their own (SSAM-F's Fisher score, on single samples). ``module.sam_pass`` says which one is running, so that
user code can keep state updates (torchmetrics, counters) to pass 1:

======================  ==========================================================================
``sam_pass``            when
======================  ==========================================================================
``0`` (``OUTSIDE``)     outside the step: validation, test, predict, hooks, your own calls
``1`` (``AT_W``)        pass 1, at the weights ``w`` (the only pass of a one-pass step)
``2`` (``PERTURBED``)   pass 2, at ``w + e``
``3`` (``EXTRA``)       another forward pass a method makes, e.g. SSAM-F's Fisher score
======================  ==========================================================================

``self.log`` is recorded in pass 1 only: in every other pass it does nothing, so a metric the user logs
from ``training_step`` appears once per step, with its value at ``w``. The names the user logged in pass 1
are kept until the next step, so that the callback does not log the same key a second time
(:func:`log_unless_user_logged`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

OUTSIDE = 0
AT_W = 1
PERTURBED = 2
EXTRA = 3

#: the attribute of the module that holds the pass number
ATTRIBUTE = "sam_pass"
_USER_LOGGED = "_sam_user_logged"  # names the user logged in this step's pass 1
_LAST_BATCH_IDX = "_sam_last_batch_idx"  # batch_idx of the micro-batch that completed this step's group


def current(module: Any) -> int:
    """The pass ``module`` is in: 0 outside the step, 1, 2, or 3 (see the table above)."""
    return int(getattr(module, ATTRIBUTE, OUTSIDE) or OUTSIDE)


def start_step(module: Any, batch_idx: int) -> None:
    """At the start of ``training_step``: remember ``batch_idx`` (the last micro-batch of the step's group)."""
    module.__dict__[_LAST_BATCH_IDX] = int(batch_idx)


def batch_indices(module: Any, count: int) -> list[int]:
    """The ``batch_idx`` of each of the ``count`` micro-batches of this step's group, in order.

    A group is ``count`` consecutive batches of one epoch ending at the one ``start_step`` saw; outside a
    step (no ``start_step`` yet) the indices count from 0.
    """
    last = module.__dict__.get(_LAST_BATCH_IDX)
    if last is None:
        return list(range(count))
    return list(range(last - count + 1, last + 1))


@contextmanager
def running(module: Any, number: int) -> Iterator[None]:
    """Mark ``module.sam_pass = number`` for the block; ``self.log`` records (pass 1) or does nothing (others).

    Nested blocks (a method's extra pass inside a step) restore what was there before.
    """
    state = module.__dict__
    previous_pass = state.get(ATTRIBUTE, OUTSIDE)
    had_log, previous_log = "log" in state, state.get("log")
    if number == AT_W:
        logged: set[str] = set()
        state[_USER_LOGGED] = logged
        log = previous_log if had_log else type(module).log.__get__(module)
        state["log"] = _recording(log, logged)
    else:
        state["log"] = _muted
    state[ATTRIBUTE] = number
    try:
        yield
    finally:
        state[ATTRIBUTE] = previous_pass
        if had_log:
            state["log"] = previous_log
        else:
            state.pop("log", None)


def log_unless_user_logged(module: Any, name: str, value: Any, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)``, unless the user's ``training_step`` logged ``name`` in this step's
    pass 1: then the user's value stands (Lightning refuses one key logged twice with different arguments)."""
    if name in module.__dict__.get(_USER_LOGGED, ()):
        return
    module.log(name, value, **kwargs)


def _recording(log: Callable[..., Any], logged: set[str]) -> Callable[..., Any]:
    def log_in_pass_one(name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        logged.add(name)
        return log(name, value, *args, **kwargs)

    return log_in_pass_one


def _muted(*args: Any, **kwargs: Any) -> None:
    """``self.log`` outside pass 1: the value at the perturbed weights is not the user's metric."""
    return None
