"""ARSAM (``lightning_slsam.methods.arsam``) through a real ``Trainer.fit``, against plain references written here.

The reference is a slow python loop on a deepcopy of the model: ``torch.autograd.grad`` for both passes, the
PSF ``g(w + e) - g(w)`` kept as a list of tensors, the refresh decision spelled out, ``torch.optim.AdamW``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_slsam import SAM, Base, PassOne, SharpnessAware, build_arms
from lightning_slsam.methods.arsam import ARSAMMethod, ARSAMOptions

LR = 1e-2  # TinyNet's defaults, which the reference copies
WEIGHT_DECAY = 0.1
RHO = 0.2


class _ARSAM(SharpnessAware):
    """The ARSAM callback the tests train with: every keyword goes to :class:`ARSAMMethod`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs

    def build_method(self, layout: Any) -> ARSAMMethod:
        return ARSAMMethod(**ARSAMOptions(**self.kwargs).as_dict())


class PassCounter(L.Callback):
    """Forward passes (``compute_loss`` calls) per training step: 2 on a refresh step, 1 on a reuse step."""

    def __init__(self) -> None:
        self.passes: list[int] = []
        self._calls = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        original = pl_module.compute_loss

        def counting(batch: Any) -> Tensor:
            self._calls += 1
            return original(batch)

        pl_module.compute_loss = counting

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.passes.append(self._calls)
        self._calls = 0


def batches_of(loader: DataLoader, steps: int) -> list[Any]:
    """The batches a Trainer with ``max_steps=steps`` sees (epochs repeat the unshuffled loader)."""
    epoch = list(loader)
    return [epoch[i % len(epoch)] for i in range(steps)]


def fit(module: L.LightningModule, loader: DataLoader, make_trainer, steps: int, **kwargs: Any):
    callback, counter = _ARSAM(**kwargs), PassCounter()
    make_trainer(callbacks=[callback, counter], max_steps=steps).fit(module, loader)
    return callback, counter


def assert_models_equal(actual: nn.Module, expected: nn.Module) -> None:
    for (name, p), q in zip(actual.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max abs difference {float((p - q).abs().max().detach())}"


# --- the reference ------------------------------------------------------------------------------------------
def reference_arsam(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    rho: float,
    threshold: float,
    max_interval: int,
    mix_decay: float,
    mix_steps: int | None,
    warmup_steps: int = 0,
) -> list[str]:
    """ARSAM on ``model`` (changed in place); returns each step's kind: refresh reason or ``"reuse"``.

    Refresh (two passes; the optimizer sees g(w + e), PSF <- g(w + e) - g(w), g_ref <- ||g(w)||) when no PSF
    is stored, during warm-up, when ``max_interval`` steps have passed since the last refresh, or when
    ``| g_ref / ||g(w)|| - 1 | > threshold``. Otherwise one pass and the optimizer sees
    ``g(w) + mix_decay^k PSF`` for the k-th reuse step (plain g(w) once k > mix_steps).
    """
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    psf: list[Tensor] | None = None
    g_ref = 0.0
    reuses_since = 0
    kinds: list[str] = []
    for step, (x, y) in enumerate(batches):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # pass 1 at w
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        if psf is None:
            kind = "first"
        elif step < warmup_steps:
            kind = "warmup"
        elif reuses_since + 1 >= max_interval:
            kind = "interval"
        elif abs(g_ref / norm - 1.0) > threshold:
            kind = "drift"
        else:
            kind = "reuse"
        if kind == "reuse":
            reuses_since += 1
            weight = 0.0 if mix_steps is not None and reuses_since > mix_steps else mix_decay**reuses_since
            final = [g + weight * p for g, p in zip(grads, psf, strict=True)]
        else:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(rho * g / (norm + 1e-12))  # w + e
            grads2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # pass 2 at w + e
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
            psf = [g2 - g for g2, g in zip(grads2, grads, strict=True)]
            g_ref, reuses_since = norm, 0
            final = list(grads2)
        for p, g in zip(params, final, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        kinds.append(kind)
    return kinds


# --- 1. refreshing every step is SAM ---------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [{"max_interval": 1}, {"threshold": 0.0, "max_interval": 100, "warmup_steps": 4}])
def test_refresh_every_step_equals_sam_bitwise(make_module, make_trainer, tiny_loader, setting) -> None:
    sam_module, arsam_module = make_module(), make_module()
    make_trainer(callbacks=[SAM(rho=RHO)], max_steps=4).fit(sam_module, tiny_loader)
    callback, counter = fit(arsam_module, tiny_loader, make_trainer, 4, rho=RHO, **setting)
    assert counter.passes == [2, 2, 2, 2]
    assert callback.method.refreshes == 4 and callback.method.reuses == 0
    assert_models_equal(arsam_module, sam_module)


# --- 2. the full rule against the reference --------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting",
    [
        {"threshold": 0.3, "max_interval": 3, "mix_decay": 0.7, "mix_steps": 6},
        {"threshold": 0.35, "max_interval": 3, "mix_decay": 0.5, "mix_steps": 1, "warmup_steps": 2},
    ],
    ids=["decayed-mix", "mix-cutoff-warmup"],
)
def test_full_rule_matches_reference(make_module, make_trainer, tiny_loader, setting) -> None:
    steps = 10
    module = make_module()
    ref = copy.deepcopy(module.model)
    callback, counter = fit(module, tiny_loader, make_trainer, steps, rho=RHO, **setting)

    kinds = reference_arsam(ref, batches_of(tiny_loader, steps), rho=RHO, **setting)
    assert counter.passes == [1 if kind == "reuse" else 2 for kind in kinds], kinds
    # the setting exercises every branch: reuse steps, drift refreshes and forced refreshes
    assert {"reuse", "drift", "interval"} <= set(kinds), kinds
    if setting.get("warmup_steps"):
        assert "warmup" in kinds, kinds
    if setting.get("mix_steps") == 1:  # some reuse step comes after the cutoff (plain g there)
        assert any(a == b == "reuse" for a, b in itertools.pairwise(kinds)), kinds
    torch.testing.assert_close(dict(module.model.named_parameters()), dict(ref.named_parameters()))
    method = callback.method
    assert method.refreshes == counter.passes.count(2) and method.reuses == counter.passes.count(1)
    assert method.mean_passes == pytest.approx(sum(counter.passes) / steps)


def test_reuse_is_not_sam(make_module, make_trainer, tiny_loader) -> None:
    """The reuse steps change the run: ARSAM with reuse differs from SAM (the comparison above is not vacuous)."""
    sam_module, arsam_module = make_module(), make_module()
    make_trainer(callbacks=[SAM(rho=RHO)], max_steps=6).fit(sam_module, tiny_loader)
    _, counter = fit(arsam_module, tiny_loader, make_trainer, 6, rho=RHO, threshold=math.inf, max_interval=3)
    assert counter.passes == [2, 1, 1, 2, 1, 1]
    assert not all(torch.equal(p, q) for p, q in zip(arsam_module.parameters(), sam_module.parameters(), strict=True))


def test_rho_zero_is_the_base_optimizer(make_module, make_trainer, tiny_loader) -> None:
    """rho = 0: w + e = w, so every PSF is exactly 0 and each step gives the optimizer g(w)."""
    plain, arsam = make_module(), make_module()
    make_trainer(callbacks=[Base()], max_steps=6).fit(plain, tiny_loader)
    _, counter = fit(arsam, tiny_loader, make_trainer, 6, rho=0.0, threshold=math.inf, max_interval=3)
    assert counter.passes == [2, 1, 1, 2, 1, 1]
    assert_models_equal(arsam, plain)


# --- 3. the maximum reuse interval ---------------------------------------------------------------------------
@pytest.mark.parametrize("max_interval", [2, 3, 5])
def test_max_interval_is_honoured(make_module, make_trainer, tiny_loader, max_interval: int) -> None:
    """Without the adaptive test, a refresh exactly every ``max_interval`` steps; with it, never longer."""
    _, counter = fit(make_module(), tiny_loader, make_trainer, 10, threshold=math.inf, max_interval=max_interval)
    assert counter.passes == [2 if step % max_interval == 0 else 1 for step in range(10)]

    _, counter = fit(make_module(), tiny_loader, make_trainer, 10, threshold=0.4, max_interval=max_interval)
    refreshes = [step for step, passes in enumerate(counter.passes) if passes == 2]
    assert refreshes[0] == 0
    assert all(b - a <= max_interval for a, b in itertools.pairwise(refreshes)), refreshes
    assert len(counter.passes) - refreshes[-1] <= max_interval, refreshes


def test_warmup_epochs_refresh_every_step(make_module, make_trainer, tiny_loader) -> None:
    """One warm-up epoch (6 batches) of SAM steps, then the reuse schedule starts."""
    _, counter = fit(make_module(), tiny_loader, make_trainer, 9, threshold=math.inf, max_interval=3, warmup_epochs=1)
    assert counter.passes == [2] * 6 + [1, 1, 2]


# --- 4. the AMP loss scale ----------------------------------------------------------------------------------
def _pass_one(layout: Any, scale: float) -> PassOne:
    params = list(layout.params)
    arm_of_param = layout.param_arm.clone()
    norms = torch.stack([p.grad.norm() / scale for p in params])  # tensor arms: one parameter per arm
    active = torch.ones(len(layout), dtype=torch.bool)
    finite = torch.isfinite(norms).all()
    return PassOne(active, params, arm_of_param, norms, torch.tensor(scale), finite, norms.clone())


def test_psf_is_stored_unscaled_and_reused_at_the_current_scale() -> None:
    """The hooks by hand: a refresh at loss scale 2, a reuse at loss scale 8 (as a GradScaler would move)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    layout = build_arms(model, "tensor")
    method = ARSAMMethod(
        **ARSAMOptions(rho=0.1, threshold=math.inf, max_interval=3, mix_decay=0.5, mix_steps=None).as_dict()
    )
    method.setup(layout)
    g1 = [torch.randn_like(p) for p in layout.params]  # unscaled g(w)
    g2 = [torch.randn_like(p) for p in layout.params]  # unscaled g(w + e)

    # refresh, scale 2: the optimizer sees 2 g(w + e) unchanged, the stored PSF is g(w + e) - g(w)
    for p, g in zip(layout.params, g1, strict=True):
        p.grad = 2 * g
    first = _pass_one(layout, 2.0)
    assert method.pass2_arms(first) is not None and method.keeps_first_gradient
    first_grads = [p.grad.clone() for p in layout.params]
    for p, g in zip(layout.params, g2, strict=True):
        p.grad = 2 * g
    method.combine(list(layout.params), first_grads, first)
    method.after_step(first)
    for p, a, b in zip(layout.params, g1, g2, strict=True):
        torch.testing.assert_close(p.grad, 2 * b)
        torch.testing.assert_close(method.psf[method._index[id(p)]], b - a)

    # reuse, scale 8: p.grad = 8 (g(w) + 0.5 PSF)
    g = [torch.randn_like(p) for p in layout.params]
    for p, t in zip(layout.params, g, strict=True):
        p.grad = 8 * t
    first = _pass_one(layout, 8.0)
    assert method.pass2_arms(first) is None and not method.keeps_first_gradient
    method.single_pass_gradient(first)
    method.after_step(first)
    for p, t, a, b in zip(layout.params, g, g1, g2, strict=True):
        torch.testing.assert_close(p.grad, 8 * (t + 0.5 * (b - a)))
    assert (method.refreshes, method.reuses, method.since_refresh) == (1, 1, 1)


def test_fp16_growing_loss_scale_matches_a_constant_one(make_module, make_trainer, tiny_loader) -> None:
    """Under a GradScaler whose scale doubles every step, every reuse step runs at another scale than the
    refresh that stored the PSF: the run must still match one at a constant scale (rounding apart)."""

    def run(init_scale: float, growth_interval: int) -> tuple[nn.Module, float]:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        plugin = MixedPrecision("16-mixed", "cpu", scaler)
        module, counter = make_module(), PassCounter()
        callbacks = [_ARSAM(rho=RHO, threshold=math.inf, max_interval=3), counter]
        make_trainer(callbacks=callbacks, max_steps=6, plugins=[plugin]).fit(module, tiny_loader)
        assert counter.passes == [2, 1, 1, 2, 1, 1]
        return module, scaler.get_scale()

    growing, final_scale = run(4.0, 1)
    constant, constant_scale = run(64.0, 10**6)
    assert final_scale == 4.0 * 2**6 and constant_scale == 64.0  # no step overflowed
    got, want = dict(growing.named_parameters()), dict(constant.named_parameters())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_overflowed_step_counts_nothing(make_module, make_trainer, tiny_loader) -> None:
    """An fp16 overflow in pass 1 (the step asks the method nothing) is neither a refresh nor a reuse."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    callback, counter = _ARSAM(rho=RHO), PassCounter()
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    make_trainer(callbacks=[callback, counter], max_steps=1, plugins=[plugin]).fit(make_module(), tiny_loader)
    assert counter.passes == [1] and scaler.get_scale() < 2.0**40
    method = callback.method
    assert (method.steps, method.refreshes, method.reuses, method.psf) == (0, 0, 0, {})


def test_non_finite_psf_keeps_the_previous_one() -> None:
    """An overflowing pass 2 must not store an inf PSF (it would poison every reuse step after it)."""
    model = nn.Linear(3, 2)
    layout = build_arms(model, "tensor")
    method = ARSAMMethod(**ARSAMOptions(threshold=math.inf, max_interval=3).as_dict())
    method.setup(layout)
    for step, second in enumerate([1.0, math.inf]):
        for p in layout.params:
            p.grad = torch.ones_like(p)
        first = _pass_one(layout, 1.0)
        assert method.pass2_arms(first) is not None
        first_grads = [p.grad.clone() for p in layout.params]
        for p in layout.params:
            p.grad = torch.full_like(p, 1.0 + second)
        method.combine(list(layout.params), first_grads, first)
        method.after_step(first)
        method.since_refresh = 2  # force the next step to refresh again
        assert all(torch.equal(t, torch.ones_like(t)) for t in method.psf.values()), step
    assert torch.isfinite(method.g_ref) and torch.isfinite(method.psf_ratio)


# --- 5. a short fit, bad arguments, state ---------------------------------------------------------------------
def test_short_fit_with_defaults_has_finite_loss(make_module, make_trainer, tiny_loader) -> None:
    callback = _ARSAM()
    trainer = make_trainer(callbacks=[callback], max_steps=6)
    trainer.fit(make_module(batch_norm=True), tiny_loader)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    method = callback.method
    assert method.steps == 6 and method.refreshes >= 2 and 1.0 <= method.mean_passes <= 2.0
    assert all(torch.isfinite(t).all() for t in method.psf.values()) and method.psf_ratio > 0


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("rho", -0.1),
        ("rho", math.inf),
        ("threshold", -1.0),
        ("threshold", "0.2"),
        ("threshold", math.nan),
        ("max_interval", 0),
        ("max_interval", 2.0),
        ("max_interval", True),
        ("mix_decay", -0.1),
        ("mix_decay", 1.5),
        ("mix_steps", -1),
        ("mix_steps", 1.5),
        ("warmup_steps", -1),
        ("warmup_epochs", -2),
        ("warmup_epochs", None),
        ("last_arms", 0),
        ("last_arms", 1.0),
    ],
)
def test_bad_arguments_raise_naming_the_argument(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{argument}:"):
        ARSAMOptions(**{argument: value})


def test_last_arms_measures_only_the_last_arms() -> None:
    layout = build_arms(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), "tensor")  # 4 tensor arms
    method = ARSAMMethod(**ARSAMOptions(last_arms=1).as_dict())
    method.setup(layout)
    assert method._ratio_arms.tolist() == [False, False, False, True]
    method = ARSAMMethod(**ARSAMOptions(last_arms=10).as_dict())  # more than the model has: all of them
    method.setup(layout)
    assert method._ratio_arms.all()


def test_state_dict_round_trip(make_module, make_trainer, tiny_loader) -> None:
    callback, _ = fit(make_module(), tiny_loader, make_trainer, 5, threshold=math.inf, max_interval=3)
    state = callback.method.state_dict()
    assert (state["steps"], state["refreshes"], state["reuses"], state["since_refresh"]) == (5, 2, 3, 1)
    fresh = ARSAMMethod(**ARSAMOptions(threshold=math.inf, max_interval=3).as_dict())
    fresh.setup(build_arms(make_module(), "tensor"))
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    for key in ("steps", "refreshes", "reuses", "since_refresh"):
        assert again[key] == state[key], key
    for key in ("g_ref", "psf_ratio"):
        assert torch.equal(again[key], state[key]), key
    assert again["psf"].keys() == state["psf"].keys()
    assert all(torch.equal(again["psf"][i], state["psf"][i]) for i in state["psf"])
    assert all(again["psf"][i] is not state["psf"][i] for i in state["psf"])  # copies, not aliases


def test_exact_resume_mid_reuse(tmp_path: Path, make_module, make_trainer, tiny_loader) -> None:
    """Two epochs straight == one epoch, then a resume from its checkpoint (which falls between refreshes)."""
    setting = {"rho": RHO, "threshold": 0.3, "max_interval": 4}
    straight, straight_cb = make_module(), _ARSAM(**setting)
    # epochs, not max_steps: Lightning resumes an epoch-end checkpoint differently under max_steps
    make_trainer(callbacks=[straight_cb], max_steps=-1, max_epochs=2).fit(straight, tiny_loader)

    first = make_trainer(
        callbacks=[_ARSAM(**setting), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)],
        max_steps=-1,
        max_epochs=1,
        enable_checkpointing=True,
    )
    first.fit(make_module(), tiny_loader)
    (path,) = tmp_path.glob("*.ckpt")
    resumed, resumed_cb = make_module(seed=1), _ARSAM(**setting)
    make_trainer(callbacks=[resumed_cb], max_steps=-1, max_epochs=2).fit(resumed, tiny_loader, ckpt_path=path)

    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "SharpnessAware" in k or "ARSAM" in k]
    assert state["method_state"]["since_refresh"] > 0, "the checkpoint should fall between two refreshes"
    assert_models_equal(resumed, straight)
    a, b = resumed_cb.method.state_dict(), straight_cb.method.state_dict()
    assert (a["steps"], a["refreshes"], a["reuses"]) == (b["steps"], b["refreshes"], b["reuses"])
    assert a["steps"] == 12 and a["refreshes"] > 2 and a["reuses"] > 0
    assert all(torch.equal(a["psf"][i], b["psf"][i]) for i in b["psf"])
