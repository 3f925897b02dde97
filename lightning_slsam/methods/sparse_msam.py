"""``sparse_msam``: Momentum-SAM on SL-SAM's sampled arms, one pass per step that differentiates only those arms.

Each step the SL-SAM sampler (the Exp3 bandit of Cheng et al. 2026, with ``slsam_noisy``'s levers: the head and
every 1-D tensor always active, each sampled arm's update scaled by ``min(1 / p_i, 5)``) picks the arms S. The
parameters of S move along their momentum, ``e_S = -rho m_S / (||m_S|| + 1e-12)`` with the norm over S only
(Momentum-SAM's ascent, :mod:`lightning_slsam.methods.msam`, restricted to S); one forward and one backward pass
at ``w + e_S`` with ``requires_grad`` on S alone, so no weight gradient of another arm is computed and the
layers below the lowest sampled arm keep no activations; ``w`` is restored bitwise and the optimizer steps S with
``g_S(w + e_S)`` (every other arm has ``grad=None``: AdamW leaves it and its moments alone). The bandit learns
from the per-arm norms of that one pass.

The step is cheaper than the base optimizer's: the backward pass computes a fraction of the weight gradients,
the optimizer updates a fraction of the tensors, and the extra work is a copy of S's weights (the restore) and
one foreach norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_slsam.engine.method import PassOne
from lightning_slsam.methods.msam import momentum_ascent
from lightning_slsam.methods.slsam import SLSAMMethod, SLSAMNoisyOptions


@dataclasses.dataclass(frozen=True)
class SparseMSAMOptions(SLSAMNoisyOptions):
    """Momentum-SAM on SL-SAM's sampled arms, one pass that differentiates only them: ``sparse_msam``.

    The arguments are ``slsam_noisy``'s (:class:`~lightning_slsam.methods.slsam.SLSAMNoisyOptions`: ``sparsity``
    0.2, ``bandit_lr``, ``seed``, ``sampler``, ``norm_scale``, ``top_fraction``, ``always_active`` default
    ``["head", "vectors"]``, ``max_update_scale`` default 5.0), with Momentum-SAM's radius:

    Args:
        rho: perturbation radius along the sampled arms' momentum, in parameter-space L2 units (>= 0; default
            3.0, Momentum-SAM's: :class:`~lightning_slsam.methods.msam.MSAMOptions`). ``rho=0`` is the
            sparse one-pass step without any ascent (the control that separates the ascent from the sparsity).

    The base optimizer must keep a momentum: ``exp_avg`` (Adam, AdamW) or ``momentum_buffer`` (SGD with
    ``momentum > 0``).
    """

    name = "sparse_msam"

    rho: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.second_pass_gate is not None:
            raise ValueError(
                f"second_pass_gate: sparse_msam takes one pass per step, there is no second pass to gate; got "
                f"{self.second_pass_gate!r}, leave it None"
            )
        if self.dense_update:
            raise ValueError(
                "dense_update: sparse_msam takes one pass per step, which differentiates only the sampled arms; "
                "leave it False"
            )

    def method_class(self) -> type[SLSAMMethod]:
        return SparseMSAMMethod


class SparseMSAMMethod(SLSAMMethod):
    """Momentum-SAM on the sampled arms, one pass; arguments as :class:`~lightning_slsam.methods.slsam.SLSAMMethod`.

    Inherits the sampler, its lazy bandit update, ``max_update_scale``, skipped-step handling and checkpoint state
    from SL-SAM; only where pass 1 runs (``w + e_S``) and that there is no pass 2 differ.
    """

    name = "sparse_msam"
    ascends_before_pass_one = True
    #: no pass 2 replays pass 1's prefix, so pass 1 records nothing (recording would keep those activations alive)
    sparse_pass_one = False
    #: the momentum's norm over the sampled arms is a whole-tensor statistic of its own: not on FSDP2 shards
    shardable = False

    def pass_one_ascent(
        self, params: Sequence[nn.Parameter], optimizer: Any
    ) -> tuple[list[nn.Parameter], list[Tensor], Tensor] | None:
        return momentum_ascent(params, optimizer, self.rho)

    def pass2_arms(self, first: PassOne) -> None:
        return None  # SL-SAM's single_pass_gradient then scales g_S(w + e_S)'s update
