"""The shared two-pass step, run through a real ``Trainer.fit``, against plain references written here.

Each reference is a slow, obviously-right loop on a deepcopy of the model: ``torch.autograd.grad`` for the
gradients, its own python loop for the ascent and the restore, and ``torch.optim.AdamW`` for the update.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, assert_models_close, assert_models_equal, record_compute_loss, snapshot
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_slsam import (
    SAM,
    SLSAM,
    ArmSampler,
    Base,
    FixedSampler,
    SharpnessAware,
    SharpnessAwareMixin,
    SLSAMMethod,
)

LR = 1e-2  # TinyNet's defaults, which the references copy
WEIGHT_DECAY = 0.1
RHO = 0.2
STEPS = 4
PREFIX = "model."

# tensor arms of TinyNet without BatchNorm, in layout order
ARM_NAMES = [f"model.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")]
MASKS = {
    "mixed": ["model.0.weight", "model.2.bias", "model.4.weight"],  # gradients flow through inactive layers
    "middle-weight": ["model.2.weight"],
    "last-bias": ["model.4.bias"],
}


# --- helpers ------------------------------------------------------------------------------------------------
def take(loader: DataLoader, k: int) -> list[Any]:
    """The first ``k`` batches of ``loader`` (what a Trainer with ``max_steps=k`` sees in one epoch)."""
    batches = list(loader)[:k]
    assert len(batches) == k, "the loader must hold at least k batches"
    return batches


def model_names(names: Sequence[str]) -> list[str]:
    """LightningModule parameter names (``model.0.weight``) to names inside ``module.model`` (``0.weight``)."""
    return [name.removeprefix(PREFIX) for name in names]


def optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, Tensor] | None]:
    """AdamW's per-parameter state by parameter name (None where it holds none), cloned."""
    state = optimizer.state
    return {
        name: ({key: value.clone() for key, value in state[p].items()} if p in state else None)
        for name, p in module.named_parameters()
    }


def models_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


class Probe(L.Callback):
    """Snapshots taken inside ``optimizer.step()`` (after pass 2 and restore, before the update) and after it."""

    def __init__(self) -> None:
        self.weights: list[dict[str, Tensor]] = []
        self.grads: list[dict[str, Tensor | None]] = []
        self.after: list[dict[str, Tensor]] = []
        self.state_after: list[dict[str, dict[str, Tensor] | None]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.weights.append(snapshot(pl_module))
        self.grads.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.after.append(snapshot(pl_module))
        self.state_after.append(optimizer_state(trainer.optimizers[0], pl_module))

    def active_names(self) -> list[list[str]]:
        """Per step, the parameters that reached the optimizer with a gradient."""
        return [[n for n, g in grads.items() if g is not None] for grads in self.grads]


class FixedSLSAM(SLSAM):
    """SL-SAM whose active arms are always the named parameters (tensor arms)."""

    def __init__(self, active_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.active_names = list(active_names)

    def build_method(self, layout: Any) -> SLSAMMethod:
        mask = torch.tensor([name in self.active_names for name in layout.names])
        assert int(mask.sum()) == len(self.active_names), (layout.names, self.active_names)
        return SLSAMMethod(
            self.options.rho, FixedSampler(len(layout), mask), max_update_scale=None, second_pass_gate=None
        )


class ScheduledSampler(ArmSampler):
    """Step t uses ``masks[t]`` (the last one from then on)."""

    def __init__(self, masks: Sequence[Tensor]) -> None:
        super().__init__(len(masks[0]))
        self.masks = list(masks)
        self.calls = 0

    def sample(self) -> Tensor:
        mask = self.masks[min(self.calls, len(self.masks) - 1)]
        self.calls += 1
        return mask.clone()


class ScheduledSLSAM(SLSAM):
    """SL-SAM with every arm active in step 0, then only ``active_names``."""

    def __init__(self, active_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.active_names = list(active_names)

    def build_method(self, layout: Any) -> SLSAMMethod:
        everything = torch.ones(len(layout), dtype=torch.bool)
        mask = torch.tensor([name in self.active_names for name in layout.names])
        return SLSAMMethod(
            self.options.rho, ScheduledSampler([everything, mask]), max_update_scale=None, second_pass_gate=None
        )


# --- references ---------------------------------------------------------------------------------------------
def reference_sam(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    rho: float,
    active: Sequence[Sequence[str]] | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    bn_pass2_updates: bool = False,
) -> torch.optim.AdamW:
    """SAM / ASAM / SL-SAM on ``model`` (changed in place), one python loop per step; returns its AdamW.

    ``active[t]`` names the parameters of ``model`` that take part in step t (all when None): only they get
    gradients in both passes, the ascent and its norm use only them, and only they reach AdamW (the others
    keep ``grad=None``, which AdamW skips). ASAM: ``e = rho T^2 g / ||T g||``, ``T = |w| + eta`` on weights
    and 1 on biases. Unless ``bn_pass2_updates``, buffers (BatchNorm running statistics) are put back after
    pass 2, so only pass 1 at w updates them.
    """
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step, (x, y) in enumerate(batches):
        names = list(named) if active is None else list(active[step])
        params = [named[n] for n in names]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # pass 1 at w
        if adaptive:
            scale = [
                torch.ones_like(p) if n.endswith("bias") else p.detach().abs() + eta
                for n, p in zip(names, params, strict=True)
            ]
        else:
            scale = [torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scale, grads, strict=True)))
        saved_weights = [p.detach().clone() for p in params]
        saved_buffers = [b.detach().clone() for b in model.buffers()]
        with torch.no_grad():
            for p, t, g in zip(params, scale, grads, strict=True):
                p.add_(rho * t**2 * g / (norm + 1e-12))  # w + e
        grads2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # pass 2 at w + e
        with torch.no_grad():
            for p, w in zip(params, saved_weights, strict=True):
                p.copy_(w)
            if not bn_pass2_updates:
                for b, saved in zip(model.buffers(), saved_buffers, strict=True):
                    b.copy_(saved)
        for p, g in zip(params, grads2, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def reference_adamw(model: nn.Module, batches: Sequence[Any], names: Sequence[str] | None = None) -> torch.optim.AdamW:
    """Plain AdamW on the named parameters of ``model`` only (all when None), one pass per step."""
    named = dict(model.named_parameters())
    params = [named[n] for n in (names or list(named))]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


# --- 1. SAM and ASAM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_matches_reference(make_module, make_trainer, tiny_loader, adaptive: bool) -> None:
    module = make_module()
    ref = copy.deepcopy(module.model)
    plain = copy.deepcopy(module.model)
    trainer = make_trainer(callbacks=[SAM(rho=RHO, adaptive=adaptive, eta=0.01)], max_steps=STEPS)
    trainer.fit(module, tiny_loader)

    reference_sam(ref, take(tiny_loader, STEPS), rho=RHO, adaptive=adaptive, eta=0.01)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)
    # the test can tell SAM from its base optimizer
    reference_adamw(plain, take(tiny_loader, STEPS))
    assert not all(
        torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(ref.parameters(), plain.parameters(), strict=True)
    )


def test_asam_differs_from_sam(make_module, make_trainer, tiny_loader) -> None:
    """The ASAM reference above is not secretly the SAM one: the two give different weights."""
    sam, asam = make_module().model, make_module().model
    reference_sam(sam, take(tiny_loader, STEPS), rho=RHO)
    reference_sam(asam, take(tiny_loader, STEPS), rho=RHO, adaptive=True)
    assert not models_equal(sam, asam)


# --- 2. SL-SAM with every arm active is SAM --------------------------------------------------------------------
def test_slsam_full_sparsity_equals_sam_bitwise(make_module, make_trainer, tiny_loader) -> None:
    sam_module, slsam_module = make_module(), make_module()
    make_trainer(callbacks=[SAM(rho=RHO)], max_steps=STEPS).fit(sam_module, tiny_loader)
    probe = Probe()
    slsam = SLSAM(rho=RHO, sparsity=1.0, seed=0)
    make_trainer(callbacks=[slsam, probe], max_steps=STEPS).fit(slsam_module, tiny_loader)

    assert all(len(names) == len(ARM_NAMES) for names in probe.active_names())
    torch.testing.assert_close(slsam.probabilities(), torch.ones(len(ARM_NAMES), dtype=torch.float64))
    assert_models_equal(slsam_module, sam_module)


# --- 3. SL-SAM on a fixed active set ---------------------------------------------------------------------------
@pytest.mark.parametrize("names", list(MASKS.values()), ids=list(MASKS))
def test_slsam_fixed_arms_matches_reference(make_module, make_trainer, tiny_loader, names: list[str]) -> None:
    module = make_module()
    ref = copy.deepcopy(module.model)
    trainer = make_trainer(callbacks=[FixedSLSAM(names, rho=RHO)], max_steps=STEPS)
    trainer.fit(module, tiny_loader)

    ref_optimizer = reference_sam(ref, take(tiny_loader, STEPS), rho=RHO, active=[model_names(names)] * STEPS)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)
    # AdamW's moments agree on the active parameters; neither side holds state for the inactive ones
    got = optimizer_state(trainer.optimizers[0], module.model)
    want = optimizer_state(ref_optimizer, ref)
    for name in got:
        if want[name] is None:
            assert got[name] is None, f"{name}: inactive but has AdamW state"
            continue
        assert got[name] is not None, f"{name}: active but has no AdamW state"
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[name][key], want[name][key], rtol=1e-6, atol=1e-8)
        assert float(got[name]["step"]) == float(want[name]["step"]) == STEPS


def test_slsam_sampled_arms_match_reference(make_module, make_trainer, tiny_loader) -> None:
    """With the real Exp3 sampler: replaying the arms it picked through the reference gives the same weights."""
    module = make_module()
    ref = copy.deepcopy(module.model)
    probe = Probe()
    make_trainer(callbacks=[SLSAM(rho=RHO, sparsity=0.5, seed=0), probe], max_steps=STEPS).fit(module, tiny_loader)

    active = [model_names(names) for names in probe.active_names()]
    assert len(active) == STEPS and all(active)
    assert len({tuple(a) for a in active}) > 1, "the sampler should vary the arms over these steps (seed 0)"
    reference_sam(ref, take(tiny_loader, STEPS), rho=RHO, active=active)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)


# --- 4. rho = 0 is the base optimizer --------------------------------------------------------------------------
def test_sam_rho_zero_equals_plain_training(make_module, make_trainer, tiny_loader) -> None:
    no_callback, plain, sam = make_module(), make_module(), make_module()
    make_trainer(max_steps=STEPS).fit(no_callback, tiny_loader)
    make_trainer(callbacks=[Base()], max_steps=STEPS).fit(plain, tiny_loader)
    make_trainer(callbacks=[SAM(rho=0.0)], max_steps=STEPS).fit(sam, tiny_loader)
    assert_models_equal(plain, no_callback)
    assert_models_equal(sam, no_callback)


@pytest.mark.parametrize("names", list(MASKS.values()), ids=list(MASKS))
def test_slsam_rho_zero_equals_adamw_on_active_arms(make_module, make_trainer, tiny_loader, names: list[str]) -> None:
    module = make_module()
    ref = copy.deepcopy(module.model)
    make_trainer(callbacks=[FixedSLSAM(names, rho=0.0)], max_steps=STEPS).fit(module, tiny_loader)
    reference_adamw(ref, take(tiny_loader, STEPS), model_names(names))
    assert_models_equal(module.model, ref)


# --- 5. inactive parameters and their optimizer state are untouched ----------------------------------------
@pytest.mark.parametrize("names", list(MASKS.values()), ids=list(MASKS))
def test_inactive_params_and_adamw_state_bitwise_unchanged(make_module, make_trainer, tiny_loader, names) -> None:
    module = make_module()
    probe = Probe()
    make_trainer(callbacks=[ScheduledSLSAM(names, rho=RHO), probe], max_steps=STEPS).fit(module, tiny_loader)

    assert len(probe.after) == STEPS
    first_weights, first_state = probe.after[0], probe.state_after[0]  # after the one full-model step
    assert all(state is not None for state in first_state.values())
    last_weights, last_state = probe.after[-1], probe.state_after[-1]
    for name in ARM_NAMES:
        if name in names:
            assert not torch.equal(last_weights[name], first_weights[name]), f"{name}: active but unchanged"
            assert float(last_state[name]["step"]) == STEPS
            continue
        assert torch.equal(last_weights[name], first_weights[name]), f"{name}: inactive but changed"
        assert last_state[name].keys() == first_state[name].keys()
        for key, value in first_state[name].items():
            assert torch.equal(last_state[name][key], value), f"{name}: AdamW {key} changed while inactive"
    # inside the optimizer step, inactive parameters have no gradient at all (not a zero tensor)
    for step, grads in enumerate(probe.grads):
        for name, grad in grads.items():
            if step == 0 or name in names:
                assert grad is not None, f"step {step}: {name} is active but has no gradient"
            else:
                assert grad is None, f"step {step}: {name} is inactive but has grad {grad!r}"


def test_never_active_params_never_get_state(make_module, make_trainer, tiny_loader) -> None:
    names = MASKS["mixed"]
    module = make_module()
    initial = snapshot(module)
    probe = Probe()
    trainer = make_trainer(callbacks=[FixedSLSAM(names, rho=RHO), probe], max_steps=STEPS)
    trainer.fit(module, tiny_loader)

    state = optimizer_state(trainer.optimizers[0], module)
    final = snapshot(module)
    for name in ARM_NAMES:
        if name in names:
            assert state[name] is not None and not torch.equal(final[name], initial[name])
        else:
            assert state[name] is None, f"{name}: never active but AdamW holds state for it"
            assert torch.equal(final[name], initial[name])
            assert all(grads[name] is None for grads in probe.grads), f"{name}: got a gradient tensor"


# --- 6. the restore is bitwise ---------------------------------------------------------------------------------
CALLBACKS: dict[str, Callable[[], SharpnessAware]] = {
    "sam": lambda: SAM(rho=RHO),
    "asam": lambda: SAM(rho=RHO, adaptive=True),
    "slsam-fixed": lambda: FixedSLSAM(MASKS["mixed"], rho=RHO),
    "slsam-exp3": lambda: SLSAM(rho=RHO, sparsity=0.5, seed=0),
}


@pytest.mark.parametrize("make_callback", list(CALLBACKS.values()), ids=list(CALLBACKS))
def test_restore_is_bitwise(make_module, make_trainer, tiny_loader, make_callback) -> None:
    module = make_module()
    calls = record_compute_loss(module)
    probe = Probe()
    make_trainer(callbacks=[make_callback(), probe], max_steps=STEPS).fit(module, tiny_loader)

    assert len(calls) == 2 * STEPS and len(probe.weights) == STEPS
    for step in range(STEPS):
        at_w, at_w_plus_e, before_update = calls[2 * step], calls[2 * step + 1], probe.weights[step]
        for name in at_w:
            assert torch.equal(before_update[name], at_w[name]), f"step {step}: {name} not restored bitwise"
        perturbed = [name for name in at_w if not torch.equal(at_w_plus_e[name], at_w[name])]
        active = [name for name, grad in probe.grads[step].items() if grad is not None]
        assert perturbed and set(perturbed) <= set(active), (step, perturbed, active)


# --- 7. plain training and Lightning's step counter ------------------------------------------------------------
def test_plain_training_equals_adamw_reference(make_module, make_trainer, tiny_loader) -> None:
    module = make_module()
    ref = copy.deepcopy(module.model)
    calls = record_compute_loss(module)
    trainer = make_trainer(max_steps=STEPS)
    trainer.fit(module, tiny_loader)
    reference_adamw(ref, take(tiny_loader, STEPS))

    assert len(calls) == STEPS  # one pass per step
    assert trainer.global_step == STEPS
    assert_models_equal(module.model, ref)


@pytest.mark.parametrize("make_callback", list(CALLBACKS.values()), ids=list(CALLBACKS))
def test_global_step_counts_optimizer_steps(make_module, make_trainer, tiny_loader, make_callback) -> None:
    probe = Probe()
    trainer = make_trainer(callbacks=[make_callback(), probe], max_steps=STEPS)
    trainer.fit(make_module(), tiny_loader)
    assert trainer.global_step == STEPS
    assert len(probe.weights) == STEPS  # optimizer.step() went through Lightning once per step


# --- 8. BatchNorm running statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("bn_running_stats", ["pass1", "both"])
def test_batchnorm_running_stats(make_module, make_trainer, tiny_loader, bn_running_stats: str) -> None:
    module = make_module(batch_norm=True)
    ref = copy.deepcopy(module.model)
    other = copy.deepcopy(module.model)
    callback = SAM(rho=RHO) if bn_running_stats == "pass1" else SAM(rho=RHO, bn_running_stats="both")
    make_trainer(callbacks=[callback], max_steps=STEPS).fit(module, tiny_loader)

    both = bn_running_stats == "both"
    reference_sam(ref, take(tiny_loader, STEPS), rho=RHO, bn_pass2_updates=both)
    reference_sam(other, take(tiny_loader, STEPS), rho=RHO, bn_pass2_updates=not both)
    bn, ref_bn, other_bn = module.model[1], ref[1], other[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert int(bn.num_batches_tracked) == (2 if both else 1) * STEPS
    assert torch.equal(bn.num_batches_tracked, ref_bn.num_batches_tracked)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, key), getattr(ref_bn, key), rtol=1e-6, atol=1e-6)
        # and the other choice is visibly different, so the comparison means something
        assert not torch.allclose(getattr(bn, key), getattr(other_bn, key), rtol=1e-4, atol=1e-5)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)


# --- 9. errors before training ---------------------------------------------------------------------------------
class NotMixin(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())


class NoComputeLoss(SharpnessAwareMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 3)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())


def test_two_sharpness_callbacks_are_refused(make_module, make_trainer, tiny_loader) -> None:
    module = make_module()
    before = snapshot(module)
    trainer = make_trainer(callbacks=[SAM(), SLSAM()])
    with pytest.raises(ValueError, match="one sharpness-aware callback"):
        trainer.fit(module, tiny_loader)
    assert trainer.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_module_without_mixin_is_refused(make_trainer, tiny_loader) -> None:
    with pytest.raises(TypeError, match="SharpnessAwareMixin"):
        make_trainer(callbacks=[SLSAM()]).fit(NotMixin(), tiny_loader)


@pytest.mark.parametrize("make_callback", [SAM, SLSAM, Base, None], ids=["sam", "slsam", "plain", "no-callback"])
def test_module_without_compute_loss_is_refused(make_trainer, tiny_loader, make_callback) -> None:
    callbacks = [] if make_callback is None else [make_callback()]
    module = NoComputeLoss()
    before = module.layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="compute_loss"):
        make_trainer(callbacks=callbacks).fit(module, tiny_loader)
    assert torch.equal(module.layer.weight, before)


@pytest.mark.parametrize(
    ("make_callback", "argument"),
    [
        (lambda: SAM(rho=-1), "rho"),
        (lambda: SAM(rho=float("nan")), "rho"),
        (lambda: SAM(eta=-1), "eta"),
        (lambda: SAM(bn_running_stats="never"), "bn_running_stats"),
        (lambda: SLSAM(rho=-0.1), "rho"),
        (lambda: SLSAM(sparsity=0), "sparsity"),
        (lambda: SLSAM(sparsity=1.5), "sparsity"),
        (lambda: SLSAM(arms="layers"), "arms"),
        (lambda: SLSAM(sampler="x"), "sampler"),
        (lambda: SLSAM(bandit_lr=-1), "bandit_lr"),
    ],
    ids=[
        "sam-rho",
        "sam-rho-nan",
        "sam-eta",
        "sam-bn",
        "slsam-rho",
        "sparsity-0",
        "sparsity-1.5",
        "arms",
        "sampler",
        "bandit_lr",
    ],
)
def test_bad_callback_arguments_name_the_argument(make_callback, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        make_callback()


# --- 10. logging ------------------------------------------------------------------------------------------------
LOGGED = ("train/loss", "train/loss_perturbed", "train/sharpness", "train/active_ratio", "train/grad_norm")


def test_logging_with_sampled_arms(make_module, make_trainer, tiny_loader) -> None:
    trainer = make_trainer(callbacks=[SLSAM(rho=RHO, seed=0)], max_steps=STEPS)
    trainer.fit(make_module(), tiny_loader)
    metrics = trainer.callback_metrics
    for key in LOGGED:
        assert key in metrics, f"{key} not logged; got {sorted(metrics)}"
        assert math.isfinite(float(metrics[key])), key
    assert 0.0 < float(metrics["train/active_ratio"]) <= 1.0
    assert float(metrics["train/grad_norm"]) > 0.0


def test_logging_with_fixed_arms(make_module, make_trainer, tiny_loader) -> None:
    names = MASKS["mixed"]
    module = make_module()
    callback = FixedSLSAM(names, rho=RHO)
    trainer = make_trainer(callbacks=[callback], max_steps=STEPS)
    trainer.fit(module, tiny_loader)
    metrics = trainer.callback_metrics
    assert all(key in metrics for key in LOGGED), sorted(metrics)

    numel = {name: p.numel() for name, p in module.named_parameters()}
    expected = sum(numel[n] for n in names) / sum(numel.values())
    assert float(metrics["train/active_ratio"]) == pytest.approx(expected, rel=1e-6)
    assert callback.mean_active_ratio == pytest.approx(expected, rel=1e-12)
    assert callback.layout is not None
    active_params = callback.layout.params_of(callback.method.sampler.active)
    assert [id(p) for p in active_params] == [id(p) for n, p in module.named_parameters() if n in names]
    loss, perturbed = float(metrics["train/loss"]), float(metrics["train/loss_perturbed"])
    assert float(metrics["train/sharpness"]) == pytest.approx(perturbed - loss, rel=1e-5, abs=1e-7)


# --- 11. every callback trains ------------------------------------------------------------------------------------
SMOKE: dict[str, Callable[[], SharpnessAware]] = {
    "plain": Base,
    "sam": SAM,
    "asam": lambda: SAM(adaptive=True),
    "slsam": lambda: SLSAM(seed=0),
    "slsam-uniform": lambda: SLSAM(sampler="uniform", seed=0),
    "slsam:arms=block": lambda: SLSAM(arms="block", seed=0),
    "slsam-module": lambda: SLSAM(arms="module", seed=0),
}


@pytest.mark.parametrize("make_callback", list(SMOKE.values()), ids=list(SMOKE))
def test_short_fit_trains(make_module, make_trainer, tiny_loader, make_callback) -> None:
    module = make_module()
    before = snapshot(module)
    callback = make_callback()
    trainer = make_trainer(callbacks=[callback], max_steps=-1, max_epochs=1, limit_train_batches=3)
    trainer.fit(module, tiny_loader)

    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    after = snapshot(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before), "no weight changed"
    assert callback.layout is not None and callback.method is not None
    probs = callback.probabilities()
    if isinstance(callback, SLSAM):
        assert probs is not None and probs.shape == (len(callback.layout),)
        assert bool(((probs > 0) & (probs <= 1)).all())
    else:
        assert probs is None


def test_parameters_outside_the_optimizer_carry_no_stale_gradient(tiny_loader, make_trainer) -> None:
    """A trainable parameter the optimizer does not own gets a fresh gradient each step, never an accumulated one."""
    seen: list[Tensor] = []

    class HeadOnly(TinyNet):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model[-1].parameters(), lr=1e-2)

        def compute_loss(self, batch):
            first = self.model[0].weight
            if first.grad is not None:
                seen.append(first.grad.clone())
            return super().compute_loss(batch)

    make_trainer(callbacks=[SAM(rho=0.05)], max_steps=3).fit(HeadOnly(), tiny_loader)
    assert not seen, "the first layer entered a step with a gradient left from an earlier step"
