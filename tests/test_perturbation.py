"""The ascent math of ``lightning_slsam/engine/perturbation.py`` against plain per-tensor references written here.

``tensor_norms`` and ``arm_norms`` against Python sums of squares (in double), ``sam_perturbation`` (SAM: ``rho g /
(||g|| + 1e-12)``, 0 for a non-finite norm, in place or not) and ``adaptive_perturbation`` (ASAM: ``rho T^2 g /
||T g||`` with ``T = |w| + eta`` on weights and 1 on biases) against one loop over the tensors, and ``save``,
``apply`` and ``restore`` against clones and ``w + e``, bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from lightning_slsam.engine.perturbation import (
    NORM_EPS,
    adaptive_perturbation,
    apply,
    arm_norms,
    restore,
    sam_perturbation,
    save,
    tensor_norms,
)

SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (7, 1)]


def random_tensors(shapes: Sequence[tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def python_norm(tensors: Sequence[Tensor]) -> float:
    """``sqrt(sum of x^2)`` over every element of ``tensors``, in Python floats."""
    return math.sqrt(sum(float(v) ** 2 for t in tensors for v in t.flatten().tolist()))


# --- norms ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tensor_norms_are_each_tensors_l2_norm_in_float32(dtype: torch.dtype) -> None:
    tensors = random_tensors(SHAPES, seed=0, dtype=dtype)
    norms = tensor_norms(tensors)
    assert norms.dtype == torch.float32 and norms.shape == (len(tensors),)
    expected = torch.tensor([python_norm([t]) for t in tensors], dtype=torch.float32)
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0.0)


def test_tensor_norms_of_half_tensors_do_not_overflow() -> None:
    """300^2 * 3 overflows float16 (max 65504); the norm is computed in float32."""
    tensors = [torch.full((3,), 300.0, dtype=torch.float16), torch.full((2, 2), -60000.0, dtype=torch.float16)]
    norms = tensor_norms(tensors)
    torch.testing.assert_close(norms, torch.tensor([300.0 * math.sqrt(3), 120000.0]), rtol=1e-6, atol=0.0)


def test_tensor_norms_of_nothing_and_of_zeros() -> None:
    empty = tensor_norms([])
    assert empty.shape == (0,) and empty.dtype == torch.float32
    assert torch.equal(tensor_norms([torch.zeros(3), torch.zeros(0)]), torch.zeros(2))


def test_tensor_norms_show_a_nan_or_inf() -> None:
    norms = tensor_norms([torch.tensor([1.0, math.nan]), torch.tensor([math.inf, 0.0]), torch.ones(4)])
    assert math.isnan(norms[0]) and norms[1] == math.inf and norms[2] == 2.0


@pytest.mark.parametrize(
    ("arm_index", "num_arms"),
    [([0, 1, 2, 3, 4], 5), ([0, 0, 1, 1, 1], 2), ([2, 0, 2, 0, 2], 4), ([0, 0, 0, 0, 0], 1), ([3, 3, 1, 1, 0], 6)],
)
def test_arm_norms_are_the_norm_of_each_arms_tensors(arm_index: list[int], num_arms: int) -> None:
    tensors = random_tensors(SHAPES, seed=1)
    per_tensor = tensor_norms(tensors)
    got = arm_norms(per_tensor, torch.tensor(arm_index), num_arms)
    expected = [
        python_norm([t for t, a in zip(tensors, arm_index, strict=True) if a == arm]) for arm in range(num_arms)
    ]
    assert got.shape == (num_arms,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0.0)
    for arm in range(num_arms):  # an arm with no tensor: exactly 0
        if arm not in arm_index:
            assert got[arm] == 0.0


def test_arm_norms_leave_the_per_tensor_norms_alone() -> None:
    norms = torch.tensor([3.0, 4.0, 12.0])
    arms = arm_norms(norms, torch.tensor([1, 1, 0]), 2)
    assert torch.equal(norms, torch.tensor([3.0, 4.0, 12.0]))
    assert torch.equal(arms, torch.tensor([12.0, 5.0]))


# --- SAM -----------------------------------------------------------------------------------------------------------
def reference_sam(grads: Sequence[Tensor], rho: float, norm: float) -> list[Tensor]:
    """``rho * g / (norm + 1e-12)`` tensor by tensor, or zeros when the norm is not finite."""
    if not math.isfinite(norm):
        return [torch.zeros_like(g) for g in grads]
    return [g * (rho / (norm + 1e-12)) for g in grads]


@pytest.mark.parametrize("rho", [0.0, 0.05, 2.0])
@pytest.mark.parametrize("in_place", [False, True])
def test_sam_perturbation_is_rho_g_over_the_norm(rho: float, in_place: bool) -> None:
    grads = random_tensors(SHAPES, seed=2)
    originals = [g.clone() for g in grads]
    norm = python_norm(grads)
    e = sam_perturbation(grads, rho, torch.tensor(norm, dtype=torch.float32), in_place=in_place)
    for got, want, g in zip(e, reference_sam(originals, rho, norm), grads, strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
        assert (got is g) == in_place  # in place: the gradient tensors themselves
    if not in_place:
        assert all(torch.equal(g, o) for g, o in zip(grads, originals, strict=True))
    else:
        assert all(torch.equal(g, x) for g, x in zip(grads, e, strict=True))
    if rho > 0:  # the ascent has length rho
        assert python_norm(e) == pytest.approx(rho, rel=1e-6)


@pytest.mark.parametrize("norm", [math.inf, math.nan, -math.inf])
@pytest.mark.parametrize("in_place", [False, True])
def test_sam_perturbation_is_zero_for_a_non_finite_norm(norm: float, in_place: bool) -> None:
    grads = random_tensors(SHAPES, seed=3)
    e = sam_perturbation(grads, 0.1, torch.tensor(norm), in_place=in_place)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in e)


def test_sam_perturbation_at_a_zero_gradient_is_zero() -> None:
    grads = [torch.zeros(3), torch.zeros(2, 2)]
    e = sam_perturbation(grads, 0.5, tensor_norms(grads).norm(), in_place=False)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in e)


def test_sam_perturbation_uses_the_norm_it_is_given() -> None:
    """The norm over the perturbed set is the caller's (SL-SAM's active arms): not recomputed from ``grads``."""
    grads = random_tensors(SHAPES[:2], seed=4)
    e = sam_perturbation(grads, 1.0, torch.tensor(10.0), in_place=False)
    for got, want in zip(e, reference_sam(grads, 1.0, 10.0), strict=True):
        torch.testing.assert_close(got, want)


def test_sam_perturbation_keeps_half_gradients_half() -> None:
    grads = random_tensors(SHAPES, seed=5, dtype=torch.float16)
    norm = python_norm(grads)
    e = sam_perturbation(grads, 0.05, torch.tensor(norm, dtype=torch.float32), in_place=False)
    for got, g in zip(e, grads, strict=True):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), g.float() * (0.05 / norm), rtol=2e-3, atol=1e-6)


# --- ASAM ----------------------------------------------------------------------------------------------------------
def reference_asam(
    params: Sequence[Tensor], grads: Sequence[Tensor], is_bias: Sequence[bool], rho: float, eta: float
) -> list[Tensor]:
    """``T = |w| + eta`` (1 for a bias), ``e = rho * T^2 g / (||T g|| + 1e-12)`` with the norm over every tensor."""
    scales = [torch.ones_like(p) if bias else p.abs() + eta for p, bias in zip(params, is_bias, strict=True)]
    norm = python_norm([t * g for t, g in zip(scales, grads, strict=True)])
    if not math.isfinite(norm):
        return [torch.zeros_like(g) for g in grads]
    return [rho * t * t * g / (norm + 1e-12) for t, g in zip(scales, grads, strict=True)]


@pytest.mark.parametrize("rho", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("eta", [0.0, 0.01, 1.0])
@pytest.mark.parametrize(
    "is_bias",
    [[False] * 5, [False, True, False, True, False], [True] * 5, [True, False, False, False, False]],
)
def test_adaptive_perturbation_is_rho_t_squared_g_over_the_norm_of_t_g(
    rho: float, eta: float, is_bias: list[bool]
) -> None:
    params = random_tensors(SHAPES, seed=6)
    grads = random_tensors(SHAPES, seed=7)
    kept_params, kept_grads = [p.clone() for p in params], [g.clone() for g in grads]
    e = adaptive_perturbation(params, grads, is_bias, rho, eta)
    want = reference_asam(params, grads, is_bias, rho, eta)
    assert len(e) == len(want)
    for got, w in zip(e, want, strict=True):
        assert got.shape == w.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-9)
    # neither the weights nor the gradients were touched, and no result aliases them
    assert all(torch.equal(a, b) for a, b in zip(params, kept_params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, kept_grads, strict=True))
    assert not any(x is g or x is p for x in e for g, p in zip(grads, params, strict=True))
    if rho > 0:  # ||T^-1 e|| = rho: the ascent has length rho in the rescaled coordinates
        scales = [torch.ones_like(p) if b else p.abs() + eta for p, b in zip(params, is_bias, strict=True)]
        assert python_norm([x / t for x, t in zip(e, scales, strict=True)]) == pytest.approx(rho, rel=1e-5)


def test_adaptive_perturbation_with_trainable_parameters_records_no_graph() -> None:
    params = [p.requires_grad_() for p in random_tensors(SHAPES[:3], seed=8)]
    grads = random_tensors(SHAPES[:3], seed=9)
    e = adaptive_perturbation(params, grads, [False, True, False], 0.1, 0.01)
    assert not any(x.requires_grad for x in e)
    for got, w in zip(
        e, reference_asam([p.detach() for p in params], grads, [False, True, False], 0.1, 0.01), strict=True
    ):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-9)


def test_adaptive_perturbation_of_nothing_and_at_a_zero_gradient() -> None:
    assert adaptive_perturbation([], [], [], 0.1, 0.01) == []
    params = random_tensors(SHAPES[:2], seed=10)
    e = adaptive_perturbation(params, [torch.zeros_like(p) for p in params], [False, True], 0.1, 0.01)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in e)


def test_adaptive_perturbation_zips_strictly() -> None:
    params = random_tensors(SHAPES[:2], seed=11)
    with pytest.raises(ValueError):
        adaptive_perturbation(params, params[:1], [False, False], 0.1, 0.0)


# --- save, apply, restore ------------------------------------------------------------------------------------------
def parameters(seed: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(t) for t in random_tensors(SHAPES, seed)]


def test_save_copies_the_values_detached() -> None:
    params = parameters(12)
    saved = save(params)
    for p, s in zip(params, saved, strict=True):
        assert torch.equal(s, p) and s.dtype == p.dtype and not s.requires_grad
        assert s.data_ptr() != p.data_ptr()
    with torch.no_grad():
        params[0].add_(1.0)
    assert not torch.equal(saved[0], params[0])  # a copy, not a view


def test_apply_adds_the_perturbation_in_place() -> None:
    params = parameters(13)
    e = random_tensors(SHAPES, seed=14)
    expected = [p.detach().clone() + x for p, x in zip(params, e, strict=True)]
    storage = [p.data_ptr() for p in params]
    apply(params, e)
    for p, want, ptr in zip(params, expected, storage, strict=True):
        assert torch.equal(p.detach(), want) and p.data_ptr() == ptr
        assert p.requires_grad and p.grad_fn is None  # still a leaf: applied under no_grad


def test_restore_puts_back_the_saved_values_bitwise() -> None:
    params = parameters(15)
    saved = save(params)
    storage = [p.data_ptr() for p in params]
    for step in range(3):  # w + e - e drifts; a restore does not
        apply(params, [x * 1e-3 * (step + 1) for x in random_tensors(SHAPES, seed=16 + step)])
        restore(params, saved)
    for p, s, ptr in zip(params, saved, storage, strict=True):
        assert torch.equal(p.detach(), s) and p.data_ptr() == ptr and p.grad_fn is None


def test_apply_and_restore_of_nothing() -> None:
    apply([], [])
    restore([], [])
    assert save([]) == []


def test_the_norm_epsilon_is_the_papers() -> None:
    assert NORM_EPS == 1e-12
