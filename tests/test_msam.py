"""Momentum-SAM (``msam``) and its sparse one-pass variant (``sparse_msam``) against plain references.

Each reference is a slow, obviously-right loop written here on a copy of the model: its own ``torch.optim.AdamW``
(or SGD), the momentum read from that optimizer's state, a python loop for ``w <- w - rho m / ||m||`` and the
restore, ``torch.autograd.grad`` for the gradient at the moved point. N steps of the library (the plain optimizer
API and ``Trainer.fit``) must land where the reference does. A transcription of the authors' own AdamW-MSAM
(github.com/MarlonBecker/MSAM, ``optimizer/adamW_msam.py``: weights kept at the ascended point between steps)
checks the sign, the normalisation and the order of ascent, restore and update.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH_SIZE, TinyNet, make_dataset, quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_slsam import MSAM, Base, SparseMSAM, optim
from lightning_slsam.methods.msam import MSAMMethod
from lightning_slsam.methods.sparse_msam import SparseMSAMMethod

LR = 1e-2  # TinyNet's defaults, which the references copy
WEIGHT_DECAY = 0.1
RHO = 0.5
STEPS = 6
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
PREFIX = "model."


class Holder(nn.Module):
    """A plain module holding TinyNet's ``model`` (the same parameter names as under the Trainer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def batches(steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    loader = list(DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=False))
    return [loader[i % len(loader)] for i in range(steps)]


def loss_at(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def assert_close_models(actual: nn.Module, expected: nn.Module, **tolerance: float) -> None:
    got, want = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(
            got[name], want[name], msg=lambda m, name=name: f"{name}: {m}", **(tolerance or TOLERANCE)
        )


def far_apart(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return not all(torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in pairs)


# --- references -------------------------------------------------------------------------------------------------
def momentum_key(optimizer: torch.optim.Optimizer) -> str:
    return "exp_avg" if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) else "momentum_buffer"


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    rho: float,
    active: set[str] | None = None,
    factors: dict[str, float] | None = None,
) -> Tensor:
    """One MSAM step on the parameters named in ``active`` (all when None): e = -rho m / (||m|| + 1e-12) over those
    with a momentum, the gradient there for ``active`` only, w put back, the optimizer's step, then each
    update scaled by ``factors[name]`` (``w0 + f (w - w0)``). Returns the loss at the moved point."""
    named = dict(model.named_parameters())
    names = [n for n in named if active is None or n in active]
    key = momentum_key(optimizer)
    moving = [n for n in names if key in optimizer.state.get(named[n], {})]
    saved = {n: named[n].detach().clone() for n in moving}
    if moving:
        norm = math.sqrt(sum(float(optimizer.state[named[n]][key].double().square().sum()) for n in moving))
        with torch.no_grad():
            for n in moving:
                named[n].add_(optimizer.state[named[n]][key], alpha=-rho / (norm + 1e-12))
    loss = loss_at(model, batch)
    grads = torch.autograd.grad(loss, [named[n] for n in names])
    with torch.no_grad():
        for n in moving:
            named[n].copy_(saved[n])
    before = {n: named[n].detach().clone() for n in names}
    for n, g in zip(names, grads, strict=True):
        named[n].grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, f in (factors or {}).items():
            if n in before:
                named[n].copy_(before[n] + f * (named[n] - before[n]))
    return loss.detach()


def reference_run(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    steps: Sequence[Any],
    rho: float,
    active: Sequence[set[str]] | None = None,
    factors: Sequence[dict[str, float]] | None = None,
) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model)
    for t, batch in enumerate(steps):
        reference_step(model, optimizer, batch, rho, None if active is None else active[t], factors and factors[t])
    return optimizer


def authors_adamw_msam(model: nn.Module, steps: Sequence[Any], rho: float, lr: float) -> None:
    """The authors' AdamW_MSAM loop (weight decay 0), transcribed: the weights stay at ``w - rho m / ||m||``
    between steps; each step takes the gradient there, moves back by ``+ rho m / ||m||``, updates, recomputes the
    norm of the new ``m`` and moves down again; after the loop, ``move_back_from_momentumAscent``."""
    params = list(model.parameters())
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    norm_factor = 0.0
    for step, batch in enumerate(steps, start=1):
        grads = torch.autograd.grad(loss_at(model, batch), params)
        with torch.no_grad():
            for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
                p.add_(m, alpha=norm_factor)  # back to w
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
            norm = torch.norm(torch.stack([m.norm(p=2) for m in exp_avg]), p=2)
            norm_factor = float(1 / (norm + 1e-12) * rho)
            for p, m in zip(params, exp_avg, strict=True):
                p.sub_(m, alpha=norm_factor)  # ascent
    with torch.no_grad():
        for p, m in zip(params, exp_avg, strict=True):
            p.add_(m, alpha=norm_factor)


def adamw(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=weight_decay)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


# --- the library's two entry points -----------------------------------------------------------------------------
class Probe:
    """Per step, what the plain optimizer API saw: the parameters that required grad in the closure, their
    values there, and the parameters whose ``.grad`` was None when the base optimizer stepped."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer) -> None:
        self.active: list[set[str]] = []
        self.weights: list[dict[str, Tensor]] = []
        self.no_grad: list[set[str]] = []
        self.named = dict(model.named_parameters())
        base.register_step_pre_hook(self._record_missing_gradients)

    def _record_missing_gradients(self, *_: Any) -> None:
        self.no_grad.append({n for n, p in self.named.items() if p.grad is None})

    def closure(self, model: nn.Module, batch: Any) -> Callable[[], Tensor]:
        def run() -> Tensor:
            self.active.append({n for n, p in self.named.items() if p.requires_grad})
            self.weights.append({n: p.detach().clone() for n, p in self.named.items()})
            return loss_at(model, batch)

        return run


def run_plain(
    name: str,
    steps: Sequence[Any],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = adamw,
    **kwargs: Any,
) -> tuple[Holder, nn.Module, optim.SharpnessAwareOptimizer, Probe]:
    """``steps`` of ``optim.<name>`` on TinyNet's model; returns it, a copy of its start, the optimizer, the probe."""
    model = Holder(TinyNet().model)
    initial = copy.deepcopy(model)
    base = make_optimizer(model)
    probe = Probe(model, base)
    opt = getattr(optim, name)(model, base, **kwargs)
    for batch in steps:
        opt.step(probe.closure(model, batch))
        opt.zero_grad()
    return model, initial, opt, probe


def fit(callback: Any, steps: int = STEPS) -> tuple[TinyNet, list[set[str]]]:
    """``steps`` of ``Trainer.fit`` on TinyNet; returns it and, per step, the parameters that required grad."""
    module = TinyNet()
    active: list[set[str]] = []
    compute_loss = module.compute_loss

    def recording(batch: Any) -> Tensor:
        active.append({n for n, p in module.named_parameters() if p.requires_grad})
        return compute_loss(batch)

    module.compute_loss = recording  # type: ignore[method-assign]
    trainer = quiet_trainer(callbacks=[callback], max_steps=steps)
    trainer.fit(module, DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=False))
    assert trainer.global_step == steps
    return module, active


# --- 1. MSAM ----------------------------------------------------------------------------------------------------
def test_msam_plain_optimizer_matches_the_reference() -> None:
    model, initial, _, probe = run_plain("MSAM", batches(), rho=RHO)
    reference = copy.deepcopy(initial)
    reference_run(reference, adamw, batches(), RHO)
    assert_close_models(model, reference)
    # one pass per step over every parameter, and the ascent matters: without it the run ends elsewhere
    assert probe.active == [set(probe.named)] * STEPS
    plain = copy.deepcopy(initial)
    reference_run(plain, adamw, batches(), 0.0)
    assert far_apart(model, plain)


def test_msam_gradient_is_taken_at_w_minus_rho_m_over_norm_m() -> None:
    """The closure runs at the point the momentum leads to: step 0 at w (no momentum yet), step t at
    ``w_t - rho m_t / ||m_t||``, a move of length exactly rho."""
    model, initial, _, probe = run_plain("MSAM", batches(3), rho=RHO)
    reference = copy.deepcopy(initial)
    optimizer = adamw(reference)
    for t, batch in enumerate(batches(3)):
        named = dict(reference.named_parameters())
        if t == 0:
            expected = {n: p.detach() for n, p in named.items()}
        else:
            m = {n: optimizer.state[p]["exp_avg"] for n, p in named.items()}
            norm = torch.sqrt(sum(v.square().sum() for v in m.values()))
            expected = {n: p.detach() - RHO * m[n] / norm for n, p in named.items()}
            moved = torch.sqrt(sum((probe.weights[t][n] - named[n]).square().sum() for n in named))
            torch.testing.assert_close(moved, torch.tensor(RHO), rtol=1e-5, atol=0)
        for n in named:
            torch.testing.assert_close(probe.weights[t][n], expected[n], **TOLERANCE)
        reference_step(reference, optimizer, batch, RHO)
    assert_close_models(model, reference)


def test_msam_matches_the_authors_adamw_msam() -> None:
    """The authors' loop keeps the weights at the ascended point between steps and subtracts/adds ``rho m/||m||``;
    ours moves at the start of the step and copies w back. With weight decay 0 (their AdamW decays after the
    update, torch's before) both are the same algorithm, equal to rounding."""
    model, initial, *_ = run_plain("MSAM", batches(), lambda m: adamw(m, weight_decay=0.0), rho=RHO)
    authors = copy.deepcopy(initial)
    authors_adamw_msam(authors, batches(), RHO, LR)
    assert_close_models(model, authors, rtol=1e-4, atol=1e-6)
    flipped = copy.deepcopy(initial)
    authors_adamw_msam(flipped, batches(), -RHO, LR)  # the other sign is another algorithm
    assert far_apart(model, flipped)


def test_msam_with_sgd_momentum_matches_the_reference() -> None:
    model, initial, *_ = run_plain("MSAM", batches(), sgd, rho=RHO)
    reference = copy.deepcopy(initial)
    reference_run(reference, sgd, batches(), RHO)
    assert_close_models(model, reference)


def test_msam_first_step_and_rho_zero_are_the_base_optimizer_bitwise() -> None:
    one, *_ = run_plain("MSAM", batches(1), rho=RHO)
    base_one, *_ = run_plain("Base", batches(1))
    zero, *_ = run_plain("MSAM", batches(), rho=0.0)
    base, *_ = run_plain("Base", batches())
    for a, b in ((one, base_one), (zero, base)):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)


def test_msam_trainer_matches_the_reference_with_one_pass_per_step() -> None:
    callback = MSAM(rho=RHO)
    module, active = fit(callback)
    assert isinstance(callback.method, MSAMMethod)
    everything = {n for n, _ in module.named_parameters()}
    assert active == [everything] * STEPS  # one compute_loss per step, every parameter differentiated
    reference = copy.deepcopy(TinyNet().model)
    reference_run(reference, adamw, batches(), RHO)
    assert_close_models(module.model, reference)
    assert callback.steps == STEPS


def test_msam_leaves_frozen_and_optimizer_less_parameters_alone() -> None:
    """Only the parameters the optimizer trains move; a frozen layer keeps its weights and gets no gradient."""
    model = Holder(TinyNet().model)
    model.model[0].weight.requires_grad_(False)
    initial = copy.deepcopy(model)
    held = [p for n, p in model.named_parameters() if n != "model.4.bias"]
    opt = optim.MSAM(model, torch.optim.AdamW(held, lr=LR, weight_decay=WEIGHT_DECAY), rho=RHO)
    probe = Probe(model, opt.base_optimizer)
    for batch in batches():
        opt.step(probe.closure(model, batch))
        opt.zero_grad()
    for t in range(1, STEPS):  # the untrained parameters are never moved for the pass
        for n in ("model.0.weight", "model.4.bias"):
            assert torch.equal(probe.weights[t][n], dict(initial.named_parameters())[n]), (t, n)
    assert not model.model[0].weight.requires_grad  # the user's flag back

    reference = copy.deepcopy(initial)
    reference.model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for n, p in reference.named_parameters() if n != "model.4.bias"], lr=LR, weight_decay=WEIGHT_DECAY
    )
    trained = {n for n, p in reference.named_parameters() if p.requires_grad and n != "model.4.bias"}
    for batch in batches():
        reference_step(reference, optimizer, batch, RHO, active=trained)
    assert_close_models(model, reference)


def test_msam_refuses_an_optimizer_without_momentum() -> None:
    with pytest.raises(ValueError, match=r"^base optimizer: SGD keeps no momentum"):
        run_plain("MSAM", batches(2), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), rho=RHO)
    with pytest.raises(ValueError, match=r"^base optimizer: Adagrad keeps no momentum"):
        run_plain("MSAM", batches(2), lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1), rho=RHO)


def test_msam_skipped_step_changes_nothing_and_training_goes_on() -> None:
    """An inf loss without a scaler skips the step (weights, momentum untouched); the next one moves from there."""
    model, _, opt, _ = run_plain("MSAM", batches(2), rho=RHO)
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [opt.base_optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        opt.step(lambda: loss_at(model, batches(1)[0]) * float("inf"))
    opt.zero_grad()
    assert opt.skipped.total == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(
        torch.equal(opt.base_optimizer.state[p]["exp_avg"], m) for p, m in zip(model.parameters(), moments, strict=True)
    )
    opt.step(lambda: loss_at(model, batches(1)[0]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- 2. sparse_msam ---------------------------------------------------------------------------------------------
#: sparse_msam arguments of the reference tests: a uniform sampler keeps each free arm's probability at
#: ``sparsity``, so the update factor of a sampled free arm is min(1 / sparsity, max_update_scale)
SPARSE_CASES: list[dict[str, Any]] = [
    {"rho": RHO, "sparsity": 0.5, "seed": 0, "sampler": "uniform", "always_active": [], "max_update_scale": None},
    {"rho": RHO, "sparsity": 0.5, "seed": 1, "sampler": "uniform"},  # slsam_noisy's levers: pins and scaling
    {"rho": RHO, "sparsity": 0.4, "seed": 2},  # the Exp3 bandit, every default lever
]
PINNED = {"model.0.bias", "model.2.bias", "model.4.weight", "model.4.bias"}  # TinyNet's head and vectors


def factors_of(active: Sequence[set[str]], kwargs: dict[str, Any], probs: Sequence[dict[str, float]]) -> list[dict]:
    scale = kwargs.get("max_update_scale", 5.0)
    if scale is None:
        return [{} for _ in active]
    return [{n: min(1 / probs[t][n], scale) for n in a if probs[t][n] < 1} for t, a in enumerate(active)]


def uniform_probs(kwargs: dict[str, Any], names: Sequence[str]) -> dict[str, float]:
    pinned = PINNED if kwargs.get("always_active", ["head", "vectors"]) else set()
    return {n: 1.0 if n in pinned else kwargs["sparsity"] for n in names}


@pytest.mark.parametrize("kwargs", SPARSE_CASES[:2], ids=["no-levers", "pins-and-scaling"])
def test_sparse_msam_plain_optimizer_matches_the_reference(kwargs: dict[str, Any]) -> None:
    model, initial, opt, probe = run_plain("SparseMSAM", batches(), **kwargs)
    assert isinstance(opt.method, SparseMSAMMethod)
    names = list(probe.named)
    probs = [uniform_probs(kwargs, names)] * STEPS
    reference = copy.deepcopy(initial)
    reference_run(reference, adamw, batches(), RHO, probe.active, factors_of(probe.active, kwargs, probs))
    assert_close_models(model, reference)

    # the sampled arms vary, the pinned ones are always in, and nothing else gets a gradient
    assert len({frozenset(a) for a in probe.active}) > 1
    for t, active in enumerate(probe.active):
        if kwargs.get("always_active", ["head", "vectors"]):
            assert active >= PINNED
        assert probe.no_grad[t] == set(names) - active, t
    # the ascent matters: the same arms without it end elsewhere
    plain = copy.deepcopy(initial)
    reference_run(plain, adamw, batches(), 0.0, probe.active, factors_of(probe.active, kwargs, probs))
    assert far_apart(model, plain)


def test_sparse_msam_with_the_bandit_matches_the_reference_on_its_arms_and_probabilities() -> None:
    kwargs = SPARSE_CASES[2]
    model = Holder(TinyNet().model)
    initial = copy.deepcopy(model)
    base = adamw(model)
    probe = Probe(model, base)
    opt = optim.SparseMSAM(model, base, **kwargs)
    names = list(probe.named)
    probs: list[dict[str, float]] = []
    for batch in batches():
        sampler_probs = opt.method.probabilities().tolist()  # the probabilities this step samples with
        arm_of = {n: i for i, arm in enumerate(opt.layout) for n in arm.param_names}
        probs.append({n: sampler_probs[arm_of[n]] for n in names})
        opt.step(probe.closure(model, batch))
        opt.zero_grad()
    reference = copy.deepcopy(initial)
    reference_run(reference, adamw, batches(), RHO, probe.active, factors_of(probe.active, kwargs, probs))
    assert_close_models(model, reference)
    assert any(p != probs[0] for p in probs[1:])  # the bandit learned from the pass's norms
    assert all(probe.no_grad[t] == set(names) - a for t, a in enumerate(probe.active))


def test_sparse_msam_trainer_matches_the_plain_optimizer_and_the_reference() -> None:
    kwargs = SPARSE_CASES[1]
    callback = SparseMSAM(**kwargs)
    module, active = fit(callback)
    assert isinstance(callback.method, SparseMSAMMethod) and callback.method.name == "sparse_msam"
    assert len(active) == STEPS  # one compute_loss per step
    plain, *_ = run_plain("SparseMSAM", batches(), **kwargs)
    for p, q in zip(module.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)
    names = [n for n, _ in module.named_parameters()]
    probs = [uniform_probs(kwargs, names)] * STEPS
    reference = copy.deepcopy(Holder(TinyNet().model))
    reference_run(reference, adamw, batches(), RHO, active, factors_of(active, kwargs, probs))
    assert_close_models(module, reference)


def test_sparse_msam_rho_zero_is_the_sparse_step_without_ascent_and_sparsity_one_is_msam() -> None:
    """``rho=0`` runs the same arms with no move at all; with every arm sampled it is MSAM's step."""
    kwargs = {"sparsity": 0.5, "seed": 0, "sampler": "uniform", "always_active": [], "max_update_scale": None}
    model, initial, _, probe = run_plain("SparseMSAM", batches(), **kwargs, rho=0.0)
    for t in range(STEPS):
        assert all(torch.equal(probe.weights[t][n], p) for n, p in probe.weights[t].items())
    reference = copy.deepcopy(initial)
    reference_run(reference, adamw, batches(), 0.0, probe.active)
    assert_close_models(model, reference)

    everything = {"sparsity": 1.0, "seed": 0, "always_active": [], "max_update_scale": None, "rho": RHO}
    sparse, *_ = run_plain("SparseMSAM", batches(), **everything)
    dense, *_ = run_plain("MSAM", batches(), rho=RHO)
    assert_close_models(sparse, dense, rtol=1e-6, atol=1e-7)


def test_sparse_msam_records_no_prefix_and_resumes_from_its_state() -> None:
    """No pass 2 replays pass 1's prefix, so nothing is recorded; the sampler state round-trips."""
    kwargs = SPARSE_CASES[2]
    straight, _, straight_opt, _ = run_plain("SparseMSAM", batches(2 * 3), **kwargs)
    assert straight_opt.run.prefix_reuse is None

    first, _, first_opt, _ = run_plain("SparseMSAM", batches(3), **kwargs)
    state = copy.deepcopy(first_opt.state_dict())
    model = Holder(TinyNet(seed=1).model)
    model.load_state_dict(first.state_dict())
    resumed = optim.SparseMSAM(model, adamw(model), **{**kwargs, "seed": 99})
    resumed.load_state_dict(state)
    for batch in batches(2 * 3)[3:]:
        resumed.step(lambda batch=batch: loss_at(model, batch))
        resumed.zero_grad()
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


def test_base_is_unchanged_by_the_ascending_pass_hook() -> None:
    """Methods that do not ascend before pass 1 never reach the momentum: Base still equals plain AdamW bitwise."""
    module, _ = fit(Base(), steps=3)
    reference = copy.deepcopy(TinyNet().model)
    optimizer = adamw(reference)
    for batch in batches(3):
        grads = torch.autograd.grad(loss_at(reference, batch), list(reference.parameters()))
        for p, g in zip(reference.parameters(), grads, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p, q in zip(module.model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


# --- 3. the engine's guarantees around the ascending pass -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["MSAM", "SparseMSAM"])
def test_an_interrupt_at_every_line_of_a_step_leaves_w_or_the_step_result(name: str) -> None:
    """A KeyboardInterrupt at each line the package runs during a step that ascends before its pass (the second
    step: the momentum exists): the weights are the step's start or its end, never ``w + e``, and the user's
    ``requires_grad`` flags are back."""
    from test_finetuning import _traced_lines

    kwargs = {"rho": RHO} if name == "MSAM" else {"rho": RHO, "seed": 0, "always_active": [], "max_update_scale": None}
    first, second = batches(2)

    def fresh() -> tuple[Holder, optim.SharpnessAwareOptimizer]:
        model = Holder(TinyNet().model)
        model.model[0].bias.requires_grad_(False)  # a frozen parameter the step must hand back frozen
        base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        opt = getattr(optim, name)(model, base, **kwargs)
        opt.step(lambda: loss_at(model, first))
        opt.zero_grad()
        return model, opt

    model, opt = fresh()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lines = _traced_lines(lambda: opt.step(lambda: loss_at(model, second)), None)
    end = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert lines > 50
    seen = set()
    for k in range(lines):
        model, opt = fresh()
        with contextlib.suppress(KeyboardInterrupt):
            _traced_lines(lambda model=model, opt=opt: opt.step(lambda: loss_at(model, second)), k)
        weights = dict(model.named_parameters())
        found = [what for what, o in (("start", start), ("end", end)) if all(torch.equal(weights[n], o[n]) for n in o)]
        assert found, f"interrupted at line {k}: the weights are neither the step's start nor its end"
        seen.update(found)
        assert model.model[0].bias.requires_grad is False, f"line {k}: a frozen parameter was left trainable"
    assert seen == {"start", "end"}


def test_a_float64_model_trains_with_sgd_momentum() -> None:
    """float64 weights and momentum train (torch refuses to narrow a float64 norm's input); the norm itself is
    float32, as every method's ascent norm is, hence the tolerance."""
    torch.manual_seed(0)
    model = Holder(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(48, 4, dtype=torch.float64), torch.randint(0, 3, (48,))
    steps = list(zip(x.split(16), y.split(16), strict=True))
    opt = optim.MSAM(model, sgd(model), rho=RHO)
    for batch in steps:
        opt.step(lambda batch=batch: loss_at(model, batch))
        opt.zero_grad()
    reference_run(reference, sgd, steps, RHO)
    assert opt.skipped.total == 0 and all(p.dtype == torch.float64 for p in model.parameters())
    assert_close_models(model, reference, rtol=1e-6, atol=1e-9)


def test_lightning_names_the_base_optimizer_without_momentum() -> None:
    class NoMomentum(TinyNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(callbacks=[MSAM(rho=RHO)], max_steps=2)
    with pytest.raises(ValueError, match=r"^base optimizer: SGD keeps no momentum"):
        trainer.fit(NoMomentum(), DataLoader(make_dataset(), batch_size=BATCH_SIZE))
