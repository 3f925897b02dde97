"""Lightning features around the step, each through a real ``Trainer.fit`` on the CPU.

Mixed precision (loss scaling, overflow, bf16), gradient clipping on unscaled gradients, micro-batch
accumulation, BatchNorm counters, LR schedulers from ``configure_optimizers``, exact resume from a
checkpoint, strategy and optimizer refusals, and the callback's logging / history.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BATCH_SIZE,
    TinyNet,
    assert_models_close,
    assert_models_equal,
    gradient_after_ascent,
    make_dataset,
    quiet_trainer,
    record_compute_loss,
    snapshot,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_slsam import SAM, SLSAM, Base
from lightning_slsam.engine.distributed import check_strategy
from lightning_slsam.lightning_adapter.callback import SharpnessAware

LR = 1e-2  # TinyNet's defaults, which the references copy
WEIGHT_DECAY = 0.1
RHO = 0.2


# --- helpers ------------------------------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, Tensor] | None]:
    """The optimizer's per-parameter state by parameter name (None where it holds none), cloned."""
    return {
        name: ({k: v.clone() for k, v in optimizer.state[p].items()} if p in optimizer.state else None)
        for name, p in module.named_parameters()
    }


def loader(n: int = 96, batch_size: int = BATCH_SIZE, **kwargs: Any) -> DataLoader:
    return DataLoader(make_dataset(n), batch_size=batch_size, **kwargs)


def total_grad_norm(module: nn.Module) -> Tensor:
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def fp16_plugin(init_scale: float, growth_interval: int = 2000) -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    return MixedPrecision("16-mixed", "cpu", scaler)


class GradProbe(L.Callback):
    """Put after the method callback: what the optimizer is about to see, and the lr of each step."""

    def __init__(self) -> None:
        self.norms: list[Tensor] = []
        self.grads: list[dict[str, Tensor | None]] = []
        self.lrs: list[tuple[int, int, float]] = []  # (global_step, epoch, lr) inside the optimizer step
        self.lrs_after: list[tuple[int, float]] = []  # (global_step, lr) after the step (and its schedulers)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.norms.append(total_grad_norm(pl_module))
        self.grads.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        )
        self.lrs.append((trainer.global_step, trainer.current_epoch, optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.lrs_after.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


class SGDNet(TinyNet):
    """TinyNet with plain SGD: unlike AdamW, its update is proportional to the gradient's scale."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def reference_sam_clipped(
    model: nn.Module, batches: Sequence[Any], *, rho: float, clip_norm: float
) -> torch.optim.AdamW:
    """SAM on ``model`` (in place), with ``clip_grad_norm_`` on g(w + e) before AdamW; returns its AdamW."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # pass 1 at w
        grads2 = gradient_after_ascent(model, x, y, params, grads, rho)  # pass 2 at w + e
        for p, g in zip(params, grads2, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


# --- 1. mixed precision -------------------------------------------------------------------------------------------
METHODS: dict[str, Callable[..., SharpnessAware]] = {
    "sam": lambda **kw: SAM(rho=RHO, **kw),
    "slsam": lambda **kw: SLSAM(rho=RHO, sparsity=0.5, seed=0, **kw),
}


@pytest.mark.parametrize("make_callback", list(METHODS.values()), ids=list(METHODS))
def test_fp16_overflow_skips_the_step(make_callback) -> None:
    """With an absurd loss scale pass 1 overflows: nothing changes but the scaler, which backs off."""
    module = TinyNet()
    before = snapshot(module)
    plugin = fp16_plugin(init_scale=2.0**40)
    callback = make_callback()
    trainer = quiet_trainer(callbacks=[callback], max_steps=1, plugins=[plugin])
    trainer.fit(module, loader())

    assert trainer.global_step in (0, 1)
    after = snapshot(module)
    for name in before:
        assert torch.equal(after[name], before[name]), f"{name} changed by an overflowed step"
    state = optimizer_state(trainer.optimizers[0], module)
    assert all(s is None for s in state.values()), "AdamW took a step (it holds state) after an overflow"
    assert plugin.scaler.get_scale() < 2.0**40, "the scaler did not back off"
    if isinstance(callback, SLSAM):
        initial = torch.full((len(callback.layout),), 0.5, dtype=torch.float64)
        assert torch.equal(callback.probabilities(), initial), "the bandit learnt from an overflowed step"


@pytest.mark.parametrize("make_callback", list(METHODS.values()), ids=list(METHODS))
def test_fp16_overflow_skips_ascent_and_pass2(make_callback) -> None:
    """A non-finite pass-1 norm gets neither an ascent nor a pass 2 (docs/implementation-notes.md)."""
    module = TinyNet()
    before = snapshot(module)
    calls = record_compute_loss(module)
    trainer = quiet_trainer(callbacks=[make_callback()], max_steps=1, plugins=[fp16_plugin(2.0**40)])
    trainer.fit(module, loader())

    assert len(calls) == 1, "pass 2 ran after an overflowed pass 1"
    (at_w,) = calls
    for name in before:
        assert torch.equal(at_w[name], before[name])


@pytest.mark.parametrize("bn_running_stats", ["pass1", "both"])
def test_fp16_overflow_keeps_batchnorm_stats_finite(bn_running_stats: str) -> None:
    """After an overflowed (skipped) step the BatchNorm running statistics are still finite.

    With ``bn_running_stats="both"`` pass 2 updates them too, so it must not run at non-finite weights.
    """
    module = TinyNet(batch_norm=True)
    callback = SAM(rho=RHO, bn_running_stats=bn_running_stats)
    trainer = quiet_trainer(callbacks=[callback], max_steps=1, plugins=[fp16_plugin(2.0**40)])
    trainer.fit(module, loader())
    bn = module.model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    for key in ("running_mean", "running_var"):
        assert torch.isfinite(getattr(bn, key)).all(), f"BatchNorm {key} is not finite: {getattr(bn, key)}"


def fit_fp16(make_callback: Callable[..., SharpnessAware], init_scale: float, steps: int = 4):
    module = SGDNet()
    callback = make_callback()
    plugin = fp16_plugin(init_scale, growth_interval=10**6)
    trainer = quiet_trainer(callbacks=[callback], max_steps=steps, plugins=[plugin])
    trainer.fit(module, loader())
    assert trainer.global_step == steps
    assert plugin.scaler.get_scale() == init_scale, "a step overflowed; the comparison would be meaningless"
    return module, callback


@pytest.mark.parametrize("make_callback", list(METHODS.values()), ids=list(METHODS))
def test_fp16_loss_scale_invariance(make_callback) -> None:
    """Loss scale 1 vs 1024: the optimizer (SGD, scale-sensitive) and the bandit see unscaled gradients."""
    small, small_cb = fit_fp16(make_callback, 1.0)
    large, large_cb = fit_fp16(make_callback, 1024.0)
    untouched = SGDNet()
    assert any(not torch.equal(p, q) for p, q in zip(small.parameters(), untouched.parameters(), strict=True))
    assert_models_close(large, small, rtol=1e-4, atol=1e-5)
    if isinstance(small_cb, SLSAM):
        assert torch.equal(small_cb.selection_counts, large_cb.selection_counts)
        p_small, p_large = small_cb.probabilities(), large_cb.probabilities()
        assert not torch.equal(p_small, torch.full_like(p_small, 0.5)), "the bandit did not move"
        torch.testing.assert_close(p_large, p_small, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("make_callback", list(METHODS.values()), ids=list(METHODS))
def test_bf16_mixed_trains(make_callback) -> None:
    module = TinyNet()
    before = snapshot(module)
    trainer = quiet_trainer(callbacks=[make_callback()], max_steps=3, precision="bf16-mixed")
    trainer.fit(module, loader())
    assert trainer.global_step == 3
    after = snapshot(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["train/loss_perturbed"]))


# --- 2. gradient clipping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "16-mixed"])
def test_clip_grad_norm_on_unscaled_gradients(precision: str) -> None:
    clip = 1e-3
    probe = GradProbe()
    plugins = [fp16_plugin(2.0**16)] if precision == "16-mixed" else []
    trainer = quiet_trainer(callbacks=[SAM(rho=RHO, clip_grad_norm=clip), probe], max_steps=3, plugins=plugins)
    trainer.fit(TinyNet(), loader())
    assert len(probe.norms) == 3
    for norm in probe.norms:  # on scaled gradients it would be clip / 65536
        torch.testing.assert_close(norm, torch.tensor(clip), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("make_callback", list(METHODS.values()), ids=list(METHODS))
@pytest.mark.parametrize("precision", ["fp32", "16-mixed"])
def test_clip_grad_value_on_unscaled_gradients(precision: str, make_callback) -> None:
    clip = 1e-4
    probe = GradProbe()
    plugins = [fp16_plugin(2.0**16)] if precision == "16-mixed" else []
    callbacks = [make_callback(clip_grad_value=clip), probe]
    trainer = quiet_trainer(callbacks=callbacks, max_steps=3, plugins=plugins)
    trainer.fit(TinyNet(), loader())
    assert len(probe.grads) == 3
    for grads in probe.grads:
        present = [g for g in grads.values() if g is not None]
        assert present
        assert all(bool((g.abs() <= clip).all()) for g in present)
        assert any(bool((g.abs() == clip).any()) for g in present), "nothing was clipped; the test is vacuous"


def test_sam_clip_grad_norm_matches_reference() -> None:
    clip, steps = 0.05, 3
    data = loader()
    module = TinyNet()
    ref = copy.deepcopy(module.model)
    probe = GradProbe()
    quiet_trainer(callbacks=[SAM(rho=RHO, clip_grad_norm=clip), probe], max_steps=steps).fit(module, data)
    assert all(float(n) <= clip * (1 + 1e-4) for n in probe.norms)
    reference_sam_clipped(ref, list(data)[:steps], rho=RHO, clip_norm=clip)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)
    unclipped = copy.deepcopy(TinyNet().model)  # and clipping changed the result, so the check means something
    reference_sam_clipped(unclipped, list(data)[:steps], rho=RHO, clip_norm=1e9)
    assert not all(torch.allclose(p, q) for p, q in zip(ref.parameters(), unclipped.parameters(), strict=True))


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        ({"gradient_clip_val": 1.0}, "clip_grad_norm"),
        ({"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"}, "clip_grad_norm"),
        ({"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, "clip_grad_value"),
        ({"accumulate_grad_batches": 4}, "accumulate=4"),
    ],
    ids=["clip", "clip-norm", "clip-value", "accumulate"],
)
def test_automatic_only_trainer_flags_are_refused(flags: dict[str, Any], pattern: str) -> None:
    module = TinyNet()
    before = snapshot(module)
    calls = record_compute_loss(module)
    trainer = quiet_trainer(callbacks=[SLSAM(seed=0)], **flags)
    with pytest.raises(ValueError, match=pattern):
        trainer.fit(module, loader())
    assert not calls, "the refusal came after a forward pass"
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


# --- 3. accumulation ----------------------------------------------------------------------------------------------
ACCUMULATING: dict[str, Callable[..., SharpnessAware]] = {
    "sam": lambda **kw: SAM(rho=RHO, **kw),
    "slsam": lambda **kw: SLSAM(rho=RHO, sparsity=0.5, seed=0, **kw),
    "plain": lambda **kw: Base(**kw),
}


@pytest.mark.parametrize("make_callback", list(ACCUMULATING.values()), ids=list(ACCUMULATING))
def test_accumulate_equals_large_batch(make_callback) -> None:
    steps = 3
    accumulated, large = TinyNet(), TinyNet()
    acc_probe, large_probe = GradProbe(), GradProbe()
    acc_cb, large_cb = make_callback(accumulate=2), make_callback()
    acc_trainer = quiet_trainer(callbacks=[acc_cb, acc_probe], max_steps=steps)
    acc_trainer.fit(accumulated, loader(batch_size=BATCH_SIZE // 2))
    large_trainer = quiet_trainer(callbacks=[large_cb, large_probe], max_steps=steps)
    large_trainer.fit(large, loader(batch_size=BATCH_SIZE))

    assert acc_trainer.global_step == steps and large_trainer.global_step == steps  # optimizer steps, not 6
    assert acc_cb.steps == steps and len(acc_probe.grads) == steps
    # the same arms took part in every step (the sampler advances once per optimizer step)
    assert [[n for n, g in s.items() if g is not None] for s in acc_probe.grads] == [
        [n for n, g in s.items() if g is not None] for s in large_probe.grads
    ]
    assert torch.equal(acc_cb.selection_counts, large_cb.selection_counts)
    assert_models_close(accumulated, large, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(large.parameters(), TinyNet().parameters(), strict=True))


@pytest.mark.parametrize("make_callback", list(ACCUMULATING.values()), ids=list(ACCUMULATING))
def test_accumulate_steps_at_the_last_batch_of_an_epoch(make_callback) -> None:
    """40 samples in batches of 8: 5 micro-batches per epoch, accumulate=2 -> groups (2, 2, 1), 3 steps.

    The same as batches of 16, which split 40 samples into 16, 16 and 8.
    """
    epochs = 2
    accumulated, large = TinyNet(), TinyNet()
    callback = make_callback(accumulate=2)
    trainer = quiet_trainer(callbacks=[callback], max_steps=-1, max_epochs=epochs)
    trainer.fit(accumulated, loader(n=40, batch_size=8))
    assert trainer.global_step == 3 * epochs
    assert callback.steps == 3 * epochs
    quiet_trainer(callbacks=[make_callback()], max_steps=-1, max_epochs=epochs).fit(large, loader(n=40, batch_size=16))
    assert_models_close(accumulated, large, rtol=1e-5, atol=1e-6)


# --- 4. BatchNorm -------------------------------------------------------------------------------------------------
def test_slsam_batchnorm_counts_optimizer_steps() -> None:
    steps = 5
    module = TinyNet(batch_norm=True)
    trainer = quiet_trainer(callbacks=[SLSAM(rho=RHO, seed=0, bn_running_stats="pass1")], max_steps=steps)
    trainer.fit(module, loader())
    bn = module.model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert int(bn.num_batches_tracked) == steps == trainer.global_step


# --- 5. LR schedulers ---------------------------------------------------------------------------------------------
class ScheduledNet(TinyNet):
    """TinyNet whose ``configure_optimizers`` adds the scheduler config built by ``make_config(optimizer)``."""

    def __init__(self, make_config: Callable[[torch.optim.Optimizer], dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make_config = make_config
        self.scheduler: Any = None

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        config = self.make_config(optimizer)
        self.scheduler = config["scheduler"]
        return {"optimizer": optimizer, "lr_scheduler": config}


class ValidatedNet(ScheduledNet):
    """Logs a constant ``val_loss`` in validation (a metric that never improves)."""

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        value = torch.tensor(1.0)
        self.log("val_loss", value)
        return value


SCHEDULED: dict[str, Callable[[], SharpnessAware | None]] = {
    "no-callback": lambda: None,
    "sam": lambda: SAM(rho=RHO),
    "slsam": lambda: SLSAM(rho=RHO, seed=0),
}


@pytest.mark.parametrize("make_callback", list(SCHEDULED.values()), ids=list(SCHEDULED))
def test_step_interval_scheduler_with_frequency(make_callback) -> None:
    steps = 7

    def config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"scheduler": scheduler, "interval": "step", "frequency": 2}

    module, probe = ScheduledNet(config), GradProbe()
    callback = make_callback()
    callbacks = [probe] if callback is None else [callback, probe]
    trainer = quiet_trainer(callbacks=callbacks, max_steps=steps)
    trainer.fit(module, loader())

    assert [g for g, _ in probe.lrs_after] == list(range(1, steps + 1))
    for global_step, lr in probe.lrs_after:
        assert lr == pytest.approx(LR * 0.5 ** (global_step // 2), rel=1e-12), global_step
    for global_step, _, lr in probe.lrs:  # the lr each step used
        assert lr == pytest.approx(LR * 0.5 ** (global_step // 2), rel=1e-12), global_step
    assert module.scheduler.last_epoch == steps // 2


class AutomaticNet(L.LightningModule):
    """Lightning's own automatic optimization with the same model, optimizer and scheduler config."""

    def __init__(self, make_config: Callable[[torch.optim.Optimizer], dict[str, Any]]) -> None:
        super().__init__()
        self.inner = TinyNet()
        self.make_config = make_config
        self.scheduler: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.inner.compute_loss(batch)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        config = self.make_config(optimizer)
        self.scheduler = config["scheduler"]
        return {"optimizer": optimizer, "lr_scheduler": config}


@pytest.mark.parametrize("make_callback", list(SCHEDULED.values()), ids=list(SCHEDULED))
def test_epoch_interval_scheduler(make_callback) -> None:
    epochs, gamma = 3, 0.5

    def config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma), "interval": "epoch"}

    module, probe = ScheduledNet(config), GradProbe()
    callback = make_callback()
    callbacks = [probe] if callback is None else [callback, probe]
    quiet_trainer(callbacks=callbacks, max_steps=-1, max_epochs=epochs, limit_train_batches=2).fit(module, loader())

    automatic, auto_probe = AutomaticNet(config), GradProbe()
    quiet_trainer(callbacks=[auto_probe], max_steps=-1, max_epochs=epochs, limit_train_batches=2).fit(
        automatic, loader()
    )

    assert len(probe.lrs) == 2 * epochs
    for _, epoch, lr in probe.lrs:
        assert lr == pytest.approx(LR * gamma**epoch, rel=1e-12), epoch
    assert [(e, lr) for _, e, lr in probe.lrs] == [(e, lr) for _, e, lr in auto_probe.lrs]
    assert automatic.scheduler.last_epoch == epochs  # Lightning's own behaviour
    assert module.scheduler.last_epoch == epochs


@pytest.mark.parametrize("make_callback", list(SCHEDULED.values()), ids=list(SCHEDULED))
def test_reduce_lr_on_plateau(make_callback) -> None:
    epochs, factor = 3, 0.5

    def config(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=factor)
        return {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"}

    module, probe = ValidatedNet(config), GradProbe()
    callback = make_callback()
    callbacks = [probe] if callback is None else [callback, probe]
    trainer = quiet_trainer(
        callbacks=callbacks, max_steps=-1, max_epochs=epochs, limit_train_batches=2, limit_val_batches=1
    )
    trainer.fit(module, loader(), loader(n=16))

    # reference: the same scheduler fed the constant metric once per epoch
    reference_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_opt, patience=0, factor=factor)
    expected = []
    for _ in range(epochs):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference.step(1.0)
    assert [lr for _, _, lr in probe.lrs][::2] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] < LR  # the metric never improved, so the lr went down
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"])


# --- 6. exact resume ----------------------------------------------------------------------------------------------
def resume_pair(tmp_path: Path, make_loader: Callable[[], DataLoader], same_loader: bool):
    """Run A: 2 epochs straight. Run B: 1 epoch, then resume from its epoch-0 checkpoint to 2 epochs."""
    L.seed_everything(0, verbose=False)
    straight, straight_cb = TinyNet(), SLSAM(rho=RHO, sparsity=0.5, seed=0)
    quiet_trainer(callbacks=[straight_cb], max_steps=-1, max_epochs=2).fit(straight, make_loader())

    L.seed_everything(0, verbose=False)
    data = make_loader()
    first = quiet_trainer(
        callbacks=[
            SLSAM(rho=RHO, sparsity=0.5, seed=0),
            ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1),
        ],
        max_steps=-1,
        max_epochs=1,
        enable_checkpointing=True,
    )
    first.fit(TinyNet(), data)
    checkpoints = sorted(tmp_path.glob("epoch=0*.ckpt"))
    assert len(checkpoints) == 1, list(tmp_path.iterdir())
    resumed, resumed_cb = TinyNet(seed=1), SLSAM(rho=RHO, sparsity=0.5, seed=123)  # both restored from the file
    second = quiet_trainer(callbacks=[resumed_cb], max_steps=-1, max_epochs=2)
    second.fit(resumed, data if same_loader else make_loader(), ckpt_path=checkpoints[0])
    return straight, straight_cb, resumed, resumed_cb


def assert_same_run(straight, straight_cb, resumed, resumed_cb) -> None:
    assert_models_equal(resumed, straight)
    assert torch.equal(resumed_cb.probabilities(), straight_cb.probabilities())
    assert torch.equal(
        resumed_cb.method.sampler.generator.get_state(), straight_cb.method.sampler.generator.get_state()
    )
    assert resumed_cb.steps == straight_cb.steps == 12
    assert torch.equal(resumed_cb.selection_counts, straight_cb.selection_counts)
    assert resumed_cb.active_ratio_sum == straight_cb.active_ratio_sum
    assert torch.equal(resumed_cb.probability_history(), straight_cb.probability_history())


@pytest.fixture
def restore_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``seed_everything`` sets ``PL_GLOBAL_SEED``; take it out again after the test."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


@pytest.mark.usefixtures("restore_global_seed")
def test_exact_resume_at_epoch_boundary(tmp_path: Path) -> None:
    """No shuffling, a fresh DataLoader for the resumed run (as in a new process): bitwise the same run."""
    run = resume_pair(tmp_path, lambda: loader(shuffle=False), same_loader=False)
    assert_same_run(*run)


@pytest.mark.usefixtures("restore_global_seed")
def test_exact_resume_with_shuffling(tmp_path: Path) -> None:
    """A shuffled DataLoader with a seeded generator: the resumed fit continues the same loader object.

    Lightning does not checkpoint a plain ``RandomSampler``'s generator, so a fresh loader in the resumed
    run would replay epoch 0's order (Lightning's behaviour, not the callback's); reusing the loader keeps
    the generator where epoch 0 left it, as in the straight run.
    """
    run = resume_pair(
        tmp_path, lambda: loader(shuffle=True, generator=torch.Generator().manual_seed(0)), same_loader=True
    )
    assert_same_run(*run)


def write_checkpoint(tmp_path: Path, callback: SharpnessAware) -> Path:
    trainer = quiet_trainer(
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)],
        max_steps=-1,
        max_epochs=1,
        limit_train_batches=2,
        enable_checkpointing=True,
    )
    trainer.fit(TinyNet(), loader())
    (path,) = tmp_path.glob("*.ckpt")
    return path


@pytest.mark.parametrize(
    ("written", "resumed", "pattern"),
    [
        (lambda: SLSAM(seed=0), lambda: SAM(), "method"),
        (lambda: SLSAM(seed=0, arms="tensor"), lambda: SLSAM(seed=0, arms="block"), "arms"),
    ],
    ids=["slsam-to-sam", "tensor-to-block-arms"],
)
def test_resume_with_another_method_or_arms_is_refused(tmp_path: Path, written, resumed, pattern: str) -> None:
    path = write_checkpoint(tmp_path, written())
    module = TinyNet()
    trainer = quiet_trainer(callbacks=[resumed()], max_steps=-1, max_epochs=3, limit_train_batches=2)
    with pytest.raises(ValueError, match=pattern):
        trainer.fit(module, loader(), ckpt_path=path)
    assert trainer.global_step <= 2  # nothing trained past the checkpoint


# --- 7. strategies ------------------------------------------------------------------------------------------------
class MyDeepSpeedStrategy(DDPStrategy):
    pass


class MyFSDPStrategy(SingleDeviceStrategy):
    pass


def test_check_strategy() -> None:
    with pytest.raises(ValueError, match=r"^SLSAM: strategy FSDPStrategy .*FSDP1 .*ModelParallelStrategy"):
        check_strategy(FSDPStrategy(), "SLSAM")
    with pytest.raises(ValueError, match=r"^SLSAM: strategy MyDeepSpeedStrategy .*'ddp'"):
        check_strategy(MyDeepSpeedStrategy(), "SLSAM")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: .*data parallelism only"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), "SLSAM")
    check_strategy(DDPStrategy(), "SLSAM")
    check_strategy(SingleDeviceStrategy(torch.device("cpu")), "SLSAM")
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "SLSAM")


def test_sharded_strategy_is_refused_in_fit() -> None:
    module = TinyNet()
    before = snapshot(module)
    trainer = quiet_trainer(callbacks=[SLSAM(seed=0)], strategy=MyFSDPStrategy(torch.device("cpu")))
    with pytest.raises(ValueError, match="FSDP1"):
        trainer.fit(module, loader())
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


# --- 8. one optimizer ---------------------------------------------------------------------------------------------
class TwoOptimizers(TinyNet):
    def configure_optimizers(self) -> Any:
        first, second = list(self.model[0].parameters()), list(self.model[2:].parameters())
        return [torch.optim.AdamW(first, lr=LR), torch.optim.SGD(second, lr=LR)]


@pytest.mark.parametrize("make_callback", [lambda: SLSAM(seed=0), SAM, Base], ids=["slsam", "sam", "plain"])
def test_two_optimizers_are_refused(make_callback) -> None:
    module = TwoOptimizers()
    before = snapshot(module)
    calls = record_compute_loss(module)
    trainer = quiet_trainer(callbacks=[make_callback()])
    with pytest.raises(ValueError, match="one optimizer"):
        trainer.fit(module, loader())
    assert trainer.global_step == 0 and not calls
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


# --- 9. logging and history ---------------------------------------------------------------------------------------
def test_probability_history_and_selection_counts() -> None:
    steps = 5
    callback, probe = SLSAM(rho=RHO, sparsity=0.5, bandit_lr=1.0, seed=0, history_every=1), GradProbe()
    module = TinyNet()
    trainer = quiet_trainer(callbacks=[callback, probe], max_steps=-1, max_epochs=1, limit_train_batches=steps)
    trainer.fit(module, loader())

    layout = callback.layout
    assert layout is not None and callback.steps == steps
    history = callback.probability_history()
    assert history is not None and history.dtype == torch.float32 and history.shape == (steps, len(layout))
    assert bool(((history > 0) & (history <= 1)).all())
    assert any(not torch.equal(history[k], history[0]) for k in range(1, steps)), "the bandit never moved"
    assert torch.equal(history[-1], callback.probabilities().to(torch.float32))
    torch.testing.assert_close(history.double().sum(dim=1), torch.full((steps,), 0.5 * len(layout), dtype=torch.double))

    # selection counts: per arm, the number of steps in which it reached the optimizer with a gradient
    names = [n for n, _ in module.named_parameters()]
    assert layout.names == names
    masks = torch.tensor([[grads[n] is not None for n in names] for grads in probe.grads])
    assert masks.shape == (steps, len(layout))
    assert callback.selection_counts.dtype == torch.int64
    assert torch.equal(callback.selection_counts, masks.sum(dim=0))
    assert int(callback.selection_counts.sum()) >= steps

    # the epoch's mean active ratio: logged and equal to the attribute
    numel = torch.tensor([p.numel() for p in module.parameters()], dtype=torch.float64)
    ratios = [float((m.double() * numel).sum() / numel.sum()) for m in masks]
    assert callback.mean_active_ratio == pytest.approx(sum(ratios) / steps, rel=1e-12)
    logged = trainer.callback_metrics["train/active_ratio_epoch"]
    assert float(logged) == pytest.approx(callback.mean_active_ratio, rel=1e-6)


def test_probability_history_every_k_steps() -> None:
    steps = 5
    callback = SLSAM(rho=RHO, seed=0, history_every=2)
    quiet_trainer(callbacks=[callback], max_steps=steps).fit(TinyNet(), loader())
    history = callback.probability_history()
    assert history is not None and history.shape == (3, len(callback.layout))  # after steps 1, 3 and 5


@pytest.mark.parametrize(
    "make_callback", [lambda: SLSAM(seed=0, history_every=0), SAM, Base], ids=["slsam-every-0", "sam", "plain"]
)
def test_no_probability_history(make_callback) -> None:
    callback = make_callback()
    quiet_trainer(callbacks=[callback], max_steps=3).fit(TinyNet(), loader())
    assert callback.probability_history() is None
    assert callback.steps == 3
    if isinstance(callback, SLSAM):
        assert int(callback.selection_counts.sum()) >= 3
    else:  # every arm in every step
        assert torch.equal(callback.selection_counts, torch.full((len(callback.layout),), 3, dtype=torch.long))


def test_callback_state_dict_round_trip() -> None:
    callback = SLSAM(rho=RHO, seed=0)
    quiet_trainer(callbacks=[callback], max_steps=3).fit(TinyNet(), loader())
    state = callback.state_dict()
    assert state["method"] == "slsam" and state["steps"] == 3
    fresh = SLSAM(rho=RHO, seed=7)
    fresh.load_state_dict(state)
    quiet_trainer(callbacks=[fresh], max_steps=0).fit(TinyNet(), loader())  # applies it at fit start
    assert fresh.steps == 3
    assert torch.equal(fresh.selection_counts, callback.selection_counts)
    assert torch.equal(fresh.probabilities(), callback.probabilities())
    assert torch.equal(fresh.method.sampler.generator.get_state(), callback.method.sampler.generator.get_state())
