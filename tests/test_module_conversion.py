"""Existing LightningModules converted by adding the mixin, in either base order.

A module keeps its ``training_step`` (returning the loss, calling ``self.log``) or gets a ``compute_loss``; with
the mixin first or last it trains with the method's step: the weights equal the documented ``compute_loss``
form (``TinyNet``, checked against plain references in test_step.py) bitwise, and SAM's equal a plain two-pass
loop written here. What cannot work is refused before the first step.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH_SIZE, TinyNet, assert_models_equal, gradient_after_ascent, make_dataset, snapshot
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_slsam import SAM, SLSAM, SSAMF, Base, SharpnessAwareMixin

STEPS = 4
RHO = 0.2
LR, WEIGHT_DECAY = 1e-2, 0.1  # TinyNet's defaults

METHODS: dict[str, Callable[[], Any]] = {
    "sam": lambda: SAM(rho=RHO),
    "slsam": lambda: SLSAM(rho=RHO, sparsity=0.5, seed=3),
    "base": Base,
}


# --- existing modules, written as plain Lightning users write them -------------------------------------------
class ModelOnly(L.LightningModule):
    """TinyNet's model (same seeded weights) and optimizer, no training step."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet().model
        self.seen: list[tuple[int, int]] = []  # (sam_pass, batch_idx) of every training_step call

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


class UserNet(ModelOnly):
    """A typical module: ``training_step`` computes the loss, logs it and an accuracy, returns the loss."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.seen.append((getattr(self, "sam_pass", 0), batch_idx))
        self.log("user/loss", loss)
        self.log("user/acc", (logits.argmax(dim=1) == y).float().mean())
        return loss


class DictNet(UserNet):
    """``training_step`` returns ``{"loss": ..., "logits": ...}``."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        loss = super().training_step(batch, batch_idx)
        return {"loss": loss, "extra": loss.detach() * 0}


def compute_loss(self: Any, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(self.model(x), y)


def convert(base: type, order: str, **namespace: Any) -> type:
    """``class Converted(SharpnessAwareMixin, base)`` (order "first") or ``(base, SharpnessAwareMixin)``."""
    bases = (SharpnessAwareMixin, base) if order == "first" else (base, SharpnessAwareMixin)
    return type(f"{base.__name__}_{order}", bases, dict(namespace))


def loader(n: int = STEPS * BATCH_SIZE) -> DataLoader:
    return DataLoader(make_dataset(n), batch_size=BATCH_SIZE, shuffle=False)


def trainer(callbacks: Sequence[L.Callback], tmp_path: Path | None = None, **overrides: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "max_steps": STEPS,
        "logger": CSVLogger(str(tmp_path), name="run") if tmp_path is not None else False,
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "deterministic": True,
    }
    options.update(overrides)
    return L.Trainer(callbacks=list(callbacks), **options)


def csv_rows(fitted: L.Trainer) -> list[dict[str, str]]:
    with open(Path(fitted.logger.log_dir) / "metrics.csv") as file:  # type: ignore[union-attr]
        return list(csv.DictReader(file))


def reference_sam(model: nn.Module, batches: Sequence[Any], rho: float | None) -> list[float]:
    """Two-pass SAM (``rho``) or AdamW alone (``rho=None``) on ``model``, in place; the pass-1 losses."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        if rho is not None:
            grads = gradient_after_ascent(model, x, y, params, grads, rho)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


# --- the conversions train with the method's step ---------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("form", ["training_step", "compute_loss"])
@pytest.mark.parametrize("order", ["first", "last"])
def test_converted_module_trains_like_the_compute_loss_form(order: str, form: str, method: str, tmp_path) -> None:
    cls = convert(UserNet, order) if form == "training_step" else convert(ModelOnly, order, compute_loss=compute_loss)
    module = cls()
    documented = TinyNet()
    assert_models_equal(module, documented)  # same start
    callback = METHODS[method]()
    fitted = trainer([callback], tmp_path)
    fitted.fit(module, loader())
    trainer([METHODS[method]()]).fit(documented, loader())

    assert fitted.global_step == STEPS
    passes = 1 if method == "base" else 2
    assert callback.passes_sum == passes * STEPS  # the two-pass step ran, not plain AdamW
    assert_models_equal(module, documented)
    assert module.sam_pass == 0  # outside the step
    if method != "slsam":  # against a plain loop written above
        reference = TinyNet().model
        pass_one = reference_sam(reference, list(loader())[:STEPS], None if method == "base" else RHO)
        for got, want in zip(module.model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    rows = [row for row in csv_rows(fitted) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == list(range(STEPS))  # one row per step
    if form == "training_step":
        # the user's training_step ran once per pass, with sam_pass 1 then 2, at the Trainer's batch_idx
        assert module.seen == [(k, i) for i in range(STEPS) for k in range(1, passes + 1)]
        # its metrics were recorded once per step, with the value at w (pass 1), not the perturbed one
        for row in rows:
            assert float(row["user/loss"]) == pytest.approx(float(row["train/loss"]), rel=1e-6)
            if passes == 2:
                assert float(row["user/loss"]) != pytest.approx(float(row["train/loss_perturbed"]), rel=1e-6)
            assert 0.0 <= float(row["user/acc"]) <= 1.0
        if method != "slsam":
            assert [float(row["user/loss"]) for row in rows] == pytest.approx(pass_one, rel=1e-5)


@pytest.mark.parametrize("order", ["first", "last"])
def test_dict_output_and_accumulation_give_each_pass_its_batch_idx(order: str) -> None:
    module = convert(DictNet, order)()
    documented = TinyNet()
    trainer([SAM(rho=RHO, accumulate=2)]).fit(module, loader())
    trainer([SAM(rho=RHO, accumulate=2)]).fit(documented, loader())
    assert_models_equal(module, documented)
    # two optimizer steps of two micro-batches: pass 1 over both, then pass 2 over both
    assert module.seen[:8] == [(1, 0), (1, 1), (2, 0), (2, 1), (1, 2), (1, 3), (2, 2), (2, 3)]


def test_training_step_without_batch_idx() -> None:
    class NoIndex(ModelOnly):
        def training_step(self, batch: Any) -> Tensor:  # Lightning accepts this signature
            return compute_loss(self, batch)

    module = convert(NoIndex, "last")()
    documented = TinyNet()
    trainer([SAM(rho=RHO)]).fit(module, loader())
    trainer([SAM(rho=RHO)]).fit(documented, loader())
    assert_models_equal(module, documented)


def test_subclass_that_extends_the_training_step_with_super() -> None:
    converted = convert(UserNet, "first")

    class Extended(converted):  # type: ignore[misc, valid-type]
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("user/extended", loss * 2)
            return loss

    module = Extended()
    documented = TinyNet()
    callback = SAM(rho=RHO)
    trainer([callback]).fit(module, loader())
    trainer([SAM(rho=RHO)]).fit(documented, loader())
    assert callback.passes_sum == 2 * STEPS
    assert module.seen == [(k, i) for i in range(STEPS) for k in (1, 2)]
    assert_models_equal(module, documented)


def test_user_key_that_the_callback_also_logs_keeps_the_users_value(tmp_path) -> None:
    class LogsTrainLoss(ModelOnly):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = compute_loss(self, batch)
            self.log("train/loss", loss * 10)  # other arguments than the callback's (no prog_bar)
            return loss

    fitted = trainer([SAM(rho=RHO)], tmp_path)
    fitted.fit(convert(LogsTrainLoss, "first")(), loader())
    rows = [row for row in csv_rows(fitted) if row.get("train/loss")]
    assert len(rows) == STEPS
    for row in rows:  # the user's value (10x the loss at w), so clearly above the perturbed loss
        assert float(row["train/loss"]) > 5 * float(row["train/loss_perturbed"])


def test_training_step_module_under_ssam_f_mutes_the_fisher_pass() -> None:
    module = convert(UserNet, "last")()
    documented = TinyNet()
    trainer([SSAMF(rho=RHO, num_samples=8, per_sample="loop")]).fit(module, loader())
    trainer([SSAMF(rho=RHO, num_samples=8, per_sample="loop")]).fit(documented, loader())
    assert_models_equal(module, documented)
    fisher = [seen for seen in module.seen if seen[0] == 3]
    assert len(fisher) == 8  # one call per single-sample batch, as the extra pass
    assert [seen for seen in module.seen if seen[0] != 3] == [(k, i) for i in range(STEPS) for k in (1, 2)]


# --- refused before the first step ---------------------------------------------------------------------------
class ManualNet(ModelOnly):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        self.manual_backward(compute_loss(self, batch))
        optimizer.step()
        optimizer.zero_grad()


class Quiet:
    """A base whose ``__init_subclass__`` swallows the mixin's (which then cannot take over the step)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        pass


REFUSED: dict[str, tuple[Callable[[], type], type[BaseException], str]] = {
    "no-loss-first": (lambda: convert(ModelOnly, "first"), NotImplementedError, "compute_loss"),
    "no-loss-last": (lambda: convert(ModelOnly, "last"), NotImplementedError, "training_step"),
    "both-first": (
        lambda: convert(UserNet, "first", compute_loss=compute_loss),
        TypeError,
        "does not call compute_loss",
    ),
    "both-last": (lambda: convert(UserNet, "last", compute_loss=compute_loss), TypeError, "Remove compute_loss"),
    "manual-first": (lambda: convert(ManualNet, "first"), TypeError, "manual_backward"),
    "manual-last": (lambda: convert(ManualNet, "last"), TypeError, "manual_backward"),
    "shadowed": (
        lambda: type("Shadowed", (UserNet, Quiet, SharpnessAwareMixin), {}),
        TypeError,
        r"put SharpnessAwareMixin first",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("method", ["sam", "slsam"])
def test_what_cannot_work_is_refused_before_the_first_step(case: str, method: str) -> None:
    make_class, error, message = REFUSED[case]
    module = make_class()()
    before = snapshot(module)
    fitted = trainer([METHODS[method]()])
    with pytest.raises(error, match=message):
        fitted.fit(module, loader())
    assert fitted.global_step == 0
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())
    assert module.seen == []


def test_helper_that_calls_compute_loss_is_accepted() -> None:
    class Shared(ModelOnly):
        def _shared_step(self, batch: Any) -> Tensor:
            return self.compute_loss(batch)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = self._shared_step(batch)
            self.log("user/loss", loss)
            return loss

    module = convert(Shared, "first", compute_loss=compute_loss)()
    documented = TinyNet()
    trainer([SAM(rho=RHO)]).fit(module, loader())
    trainer([SAM(rho=RHO)]).fit(documented, loader())
    assert_models_equal(module, documented)


def test_wrong_loss_type_names_the_training_step() -> None:
    class ReturnsVector(ModelOnly):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x), y, reduction="none")

    with pytest.raises(TypeError, match=r"ReturnsVector.training_step must return a scalar tensor .*Tensor\(16,\)"):
        trainer([SAM()]).fit(convert(ReturnsVector, "first")(), loader())


def test_no_callback_trains_the_converted_module_as_the_base_optimizer() -> None:
    module = convert(UserNet, "last")()
    reference = TinyNet().model
    trainer([]).fit(module, loader())
    reference_sam(reference, list(loader())[:STEPS], None)
    for got, want in zip(module.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert module.seen == [(1, i) for i in range(STEPS)]


# --- what else an existing module brings: its callbacks and its plateau scheduler ------------------------------
class Recorder(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1


class WithCallbacksAndPlateau(UserNet):
    def configure_callbacks(self) -> L.Callback:
        self.recorder = Recorder()
        return self.recorder

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.plateau, "monitor": "user/loss"}}


@pytest.mark.parametrize("with_callback", [True, False], ids=["sam", "no-callback"])
@pytest.mark.parametrize("order", ["first", "last"])
def test_inherited_callbacks_and_plateau_monitor_are_kept(order: str, with_callback: bool) -> None:
    module = convert(WithCallbacksAndPlateau, order)()
    callbacks = [SAM(rho=RHO)] if with_callback else []
    fitted = trainer(callbacks, max_steps=-1, max_epochs=2)
    fitted.fit(module, loader())
    assert module.recorder.batches == 2 * STEPS  # the module's own callback ran
    sharpness = [c for c in fitted.callbacks if isinstance(c, (SAM, Base))]
    assert len(sharpness) == 1 and sharpness[0].passes_sum == (2 if with_callback else 1) * 2 * STEPS
    assert module.plateau.last_epoch == 2  # stepped once per epoch on the monitored user/loss
