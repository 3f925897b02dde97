"""The empirical Fisher score of SSAM-F (Mi et al. 2022): ``sum_i (d loss(sample_i) / d w)^2`` per element.

Everything here works on batches already drawn and on the device; where the batches come from is the
adapter's business (the Trainer's training loader in :mod:`lightning_slsam.lightning_adapter.fisher_samples`, the user's
``fisher_data`` in :class:`lightning_slsam.optim.SSAMF`). No Lightning import (docs/design.md#layers).

A batch is any nest of lists, tuples and dicts holding tensors (what a ``DataLoader`` collates); its *samples*
are the rows of every tensor whose first dimension is the batch size (other tensors are kept whole).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_choice

#: how per-sample gradients are taken: torch.func's vmap, one backward per sample, or vmap with the loop as fallback
PER_SAMPLE = ("auto", "vmap", "loop")
#: per-sample gradient elements one vmap chunk may hold (2**25 float32 = 128 MiB)
VMAP_CHUNK_ELEMENTS = 2**25
_PLAIN_LEAVES = (int, float, bool, str, bytes, type(None))

LossOf = Callable[[Any], Tensor]


# --- batches and their samples -----------------------------------------------------------------------------------
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


def first_samples(batches: Iterable[Any], num_samples: int, prepare: Callable[[Any], Any] = lambda b: b) -> list[Any]:
    """The batches holding the first ``num_samples`` samples of ``batches``, each passed through ``prepare``
    (to the device) and the last one cut, so that exactly ``num_samples`` samples are returned (fewer, with a
    warning, when ``batches`` holds fewer). Raises a RuntimeError when it holds none."""
    taken: list[Any] = []
    seen = 0
    for batch in batches:
        batch = prepare(batch)
        size = batch_size(batch)
        if seen + size > num_samples:
            batch = slice_batch(batch, 0, num_samples - seen, size)
            size = num_samples - seen
        taken.append(batch)
        seen += size
        if seen >= num_samples:
            break
    if seen == 0:
        raise RuntimeError("ssam_f: the training data yielded no samples for the Fisher score")
    if seen < num_samples:
        warnings.warn(
            f"ssam_f: num_samples={num_samples} but the training data holds {seen} samples; the Fisher score "
            f"uses those {seen}",
            stacklevel=3,
        )
    return taken


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Put the global RNG (CPU and ``device``) back afterwards, so that drawing and scoring samples leaves
    training's randomness (the loader's shuffle, dropout) as a run without them would see it."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


# --- the score -----------------------------------------------------------------------------------------------
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


def compute_loss_of(module: nn.Module, argument: str = "loss_of") -> LossOf:
    """``module.compute_loss``, the default loss of a batch; a ValueError naming ``argument`` (the caller's name
    for the loss) when the module has none."""
    compute_loss = getattr(module, "compute_loss", None)
    if not callable(compute_loss):
        raise ValueError(
            f"{argument}: ssam_f needs the loss of one batch: give {argument}, or a module with compute_loss(batch) "
            f"(SharpnessAwareMixin); {type(module).__name__} has none"
        )
    return compute_loss


def fisher_scores(
    module: nn.Module,
    batches: Sequence[Any],
    params: Sequence[nn.Parameter],
    per_sample: str = "auto",
    loss_of: LossOf | None = None,
) -> list[Tensor]:
    """Empirical Fisher score of every element of ``params``: ``sum_i (d loss_of(sample_i) / d w)^2``.

    Args:
        module: the model ``params`` belong to; it runs in eval mode (BatchNorm on running statistics, no
            dropout: a training-mode BatchNorm cannot normalise one sample), and each submodule's mode is put
            back afterwards.
        batches: batches on the device, each split into single-sample batches with :func:`slice_batch`.
        params: the parameters to score.
        per_sample: ``"vmap"`` (``torch.func``), ``"loop"`` (one backward per sample) or ``"auto"`` (default:
            vmap, the loop with a warning if vmap raises).
        loss_of: the scalar loss of a batch (default ``module.compute_loss``); it must read the weights through
            ``module`` (vmap swaps them in with ``torch.func.functional_call``).

    Returns float32 tensors shaped like ``params``.
    """
    check_choice("per_sample", per_sample, PER_SAMPLE)
    return scores_and_way(module, batches, params, per_sample, loss_of)[0]


def scores_and_way(
    module: nn.Module,
    batches: Sequence[Any],
    params: Sequence[nn.Parameter],
    per_sample: str,
    loss_of: LossOf | None = None,
) -> tuple[list[Tensor], str]:
    """:func:`fisher_scores` and the way it took the per-sample gradients (``"vmap"`` or ``"loop"``)."""
    loss_of = loss_of if loss_of is not None else compute_loss_of(module)
    with _eval_mode(module), torch.enable_grad():
        if per_sample in ("auto", "vmap"):
            try:
                return _vmap_scores(module, loss_of, batches, params), "vmap"
            except Exception as error:
                if per_sample == "vmap":
                    raise
                warnings.warn(
                    f"ssam_f: per-sample gradients with torch.func.vmap failed ({type(error).__name__}: {error}); "
                    "using one backward pass per sample instead (slower, same result)",
                    stacklevel=3,
                )
        return _loop_scores(loss_of, batches, params), "loop"


def _zeros(params: Sequence[nn.Parameter]) -> list[Tensor]:
    return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]


def _loop_scores(loss_of: LossOf, batches: Sequence[Any], params: Sequence[nn.Parameter]) -> list[Tensor]:
    scores = _zeros(params)
    for batch in batches:
        size = batch_size(batch)
        for i in range(size):
            loss = loss_of(slice_batch(batch, i, i + 1, size))
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for score, g in zip(scores, grads, strict=True):
                if g is not None:
                    score.add_(g.detach().to(torch.float32).square())
    return scores


class _LossOf(nn.Module):
    """``forward(batch) = loss_of(batch)`` with ``inner`` as a submodule, so that ``functional_call`` can swap
    ``inner``'s weights while ``loss_of`` runs."""

    def __init__(self, inner: nn.Module, loss_of: LossOf) -> None:
        super().__init__()
        self.inner = inner
        self.loss_of = loss_of

    def forward(self, batch: Any) -> Tensor:
        return self.loss_of(batch)


def _vmap_scores(
    module: nn.Module, loss_of: LossOf, batches: Sequence[Any], params: Sequence[nn.Parameter]
) -> list[Tensor]:
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_flatten, tree_unflatten

    name_of = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    keys = [f"inner.{name_of[id(p)]}" for p in params]
    wrapper = _LossOf(module, loss_of)
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

        def loss(values: list[Tensor], samples: list[Tensor], leaves=leaves, sliced=sliced, spec=spec) -> Tensor:
            rows = iter(samples)
            rebuilt = [next(rows).unsqueeze(0) if s else leaf for leaf, s in zip(leaves, sliced, strict=True)]
            value = functional_call(wrapper, dict(zip(keys, values, strict=True)), (tree_unflatten(rebuilt, spec),))
            if not isinstance(value, Tensor) or value.ndim != 0:
                raise TypeError("the loss of a batch must be a scalar tensor")
            return value

        per_sample_grads = vmap(grad(loss), in_dims=(None, 0))
        chunk = max(1, min(size, VMAP_CHUNK_ELEMENTS // numel))
        for start in range(0, size, chunk):
            rows = [leaf[start : start + chunk] for leaf, s in zip(leaves, sliced, strict=True) if s]
            for score, g in zip(scores, per_sample_grads(values, rows), strict=True):
                score.add_(g.to(torch.float32).square().sum(0))
    return scores
