"""No run is silently destroyed (issue 15): faults, exact resume and bad inputs, each through a real run.

1. Non-finite gradients in any pass, with or without a GradScaler, for every method: the step is skipped,
   weights, optimizer state and method state bitwise as before the step; a warning, ``train/skipped_steps``,
   and an error after ``max_skipped_steps`` in a row.
2. Label counts checked against the model's before it is built.
3. Exact resume through ``slsam-train ckpt_path=...``: runs killed with SIGKILL mid-epoch and at an epoch
   boundary, resumed from ``last.ckpt``, end bitwise equal to an uninterrupted run.
4. ``result.json`` at every validation, covering the whole run after a resume.
5. Corrupt checkpoint and weights files, non-finite arguments, non-UTF-8 TSVs, ``max_epochs=-1``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TinyNet, make_dataset, quiet_trainer, snapshot
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_slsam import ARSAM, ASAM, RST, SAM, SLSAM, SSAMD, SSAMF, LayerwiseGNP, LookSAM, Plain
from lightning_slsam.callback import SharpnessAware
from lightning_slsam.skipped_steps import NonFiniteTrainingError

RHO = 0.1
BATCHES_PER_EPOCH = 3
FAULT_BATCH = 3  # the first batch of epoch 1: every method has state by then (SSAM-D drops and grows here)

# Each method set up so that the faulty batch is a two-pass step that also changes the method's state:
# LookSAM and ARSAM refresh at steps 0 and 3, RST's coin (seed 1) says SAM at step 3, SSAM-D's first
# drop-and-grow is the first step of epoch 1.
METHODS: dict[str, Callable[[], SharpnessAware]] = {
    "base": Plain,
    "sam": lambda: SAM(rho=RHO),
    "asam": lambda: ASAM(rho=0.5),
    "slsam": lambda: SLSAM(rho=RHO, sparsity=0.5, seed=0),
    "arsam": lambda: ARSAM(rho=RHO, threshold=math.inf, max_interval=3),
    "lagnp": lambda: LayerwiseGNP(rho=RHO, layer_fraction=0.5, arms="tensor"),
    "ssam_f": lambda: SSAMF(rho=RHO, num_samples=8, per_sample="loop"),
    "ssam_d": lambda: SSAMD(rho=RHO, seed=0),
    "rst": lambda: RST(rho=RHO, p=0.5, seed=1),
    "looksam": lambda: LookSAM(rho=RHO, k=3),
}


# --- helpers ------------------------------------------------------------------------------------------------------
class FaultyNet(TinyNet):
    """TinyNet whose loss is multiplied by ``value`` (NaN or inf) in pass ``at_pass`` of batch ``at_batch``.

    Records whether the fault was injected (a one-pass step has no pass 2 to poison).
    """

    def __init__(self, at_batch: int, at_pass: int, value: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at_batch, self.at_pass, self.value = at_batch, at_pass, value
        self.batches_seen = -1
        self.calls = 0
        self.injected = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.batches_seen += 1
        self.calls = 0

    def compute_loss(self, batch: Any) -> Tensor:
        loss = super().compute_loss(batch)
        self.calls += 1
        if self.batches_seen == self.at_batch and self.calls == self.at_pass:
            self.injected = True
            return loss * self.value
        return loss


def training_state(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """Copies of the weights, the optimizer's state and the method's state (its state_dict)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, SharpnessAware)), None)  # type: ignore[attr-defined]
    method = callback.method.state_dict() if callback is not None and callback.method is not None else {}
    return {
        "weights": snapshot(module),
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
        "method": copy.deepcopy(method),
    }


class StateProbe(L.Callback):
    """The training state at the start and at the end of the ``at``-th batch (0-based, over epochs)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = -1
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.global_steps: tuple[int, int] | None = None
        self._start_step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.before = training_state(trainer, pl_module)
            self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.seen == self.at:
            self.after = training_state(trainer, pl_module)
            self.global_steps = (self._start_step, trainer.global_step)


def assert_bitwise_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts / lists / tensors / numbers equal, tensors bitwise (same dtype, shape and bits)."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{where}: dtype or shape changed"
        assert torch.equal(actual, expected), f"{where} changed (max abs difference {(actual - expected).abs().max()})"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: keys changed"
        for key in expected:
            assert_bitwise_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: length changed"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def fp16_plugin(init_scale: float = 2.0**8) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000))


def fit_with_fault(
    name: str, at_pass: int, value: float, plugins: list[Any] | None = None
) -> tuple[FaultyNet, L.Trainer, StateProbe, list[warnings.WarningMessage], SharpnessAware]:
    module = FaultyNet(FAULT_BATCH, at_pass, value)
    callback = METHODS[name]()
    probe = StateProbe(FAULT_BATCH)
    trainer = quiet_trainer(
        callbacks=[callback, probe],
        max_steps=-1,
        max_epochs=2,
        limit_train_batches=BATCHES_PER_EPOCH,
        limit_val_batches=0,
        plugins=plugins or [],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(make_dataset(), batch_size=16))
    return module, trainer, probe, caught, callback


def skip_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "non-finite gradients" in str(w.message)]


# --- 1. non-finite gradients --------------------------------------------------------------------------------------
FAULTS = [(name, 1, math.inf) for name in METHODS] + [(name, 2, math.nan) for name in METHODS if name != "base"]


@pytest.mark.parametrize(("name", "at_pass", "value"), FAULTS, ids=[f"{n}-pass{p}-{v}" for n, p, v in FAULTS])
def test_non_finite_step_is_skipped_and_changes_nothing(name: str, at_pass: int, value: float) -> None:
    """fp32, no scaler: a NaN/inf in pass 1 or only in pass 2 skips the step; the state is bitwise as before."""
    module, trainer, probe, caught, callback = fit_with_fault(name, at_pass, value)

    assert module.injected, "the fault was not injected: the faulty batch had no such pass"
    assert probe.before is not None and probe.after is not None and probe.global_steps is not None
    assert_bitwise_same(probe.after, probe.before)
    assert probe.global_steps[1] == probe.global_steps[0] == FAULT_BATCH, "the optimizer was stepped"
    messages = skip_warnings(caught)
    assert len(messages) == 1 and f"global step {FAULT_BATCH}" in messages[0], messages
    assert ("pass 2" if at_pass == 2 else "pass 1") in messages[0]
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert callback.skipped.total == 1 and callback.skipped.consecutive == 0  # later steps were taken
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH - 1
    assert all(torch.isfinite(p).all() for p in module.parameters()), "a weight became non-finite"


SCALED = ["base", "sam", "slsam", "arsam", "looksam", "ssam_d"]


@pytest.mark.parametrize("name", SCALED)
def test_non_finite_step_with_grad_scaler(name: str) -> None:
    """fp16 with a GradScaler: the scaler still sees the inf (it backs off) and the skip is counted."""
    plugin = fp16_plugin()
    scale = plugin.scaler.get_scale()
    at_pass = 1 if name == "base" else 2
    module, trainer, probe, caught, callback = fit_with_fault(name, at_pass, math.nan, plugins=[plugin])

    assert module.injected
    assert probe.before is not None and probe.after is not None
    assert_bitwise_same(probe.after, probe.before)
    assert plugin.scaler.get_scale() == scale / 2, "the scaler did not back off (exactly once)"
    assert len(skip_warnings(caught)) == 1 and callback.skipped.total == 1
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH  # the scaler's step counts, as in plain Lightning AMP


class NoCallbackNet(FaultyNet):
    """Overrides configure_callbacks without calling the mixin's: the mixin's fallback plain step runs."""

    def configure_callbacks(self) -> list[Any]:
        return []


@pytest.mark.parametrize("module_class", [FaultyNet, NoCallbackNet], ids=["implicit-plain", "fallback-step"])
def test_inf_loss_without_a_callback_is_skipped(module_class: type[FaultyNet]) -> None:
    """No sharpness-aware callback on the Trainer: an inf loss skips the step instead of making weights NaN."""
    module = module_class(FAULT_BATCH, 1, math.inf)
    probe = StateProbe(FAULT_BATCH)
    trainer = quiet_trainer(
        callbacks=[probe], max_steps=-1, max_epochs=2, limit_train_batches=BATCHES_PER_EPOCH, limit_val_batches=0
    )
    with pytest.warns(RuntimeWarning, match=f"skipped global step {FAULT_BATCH}: non-finite"):
        trainer.fit(module, DataLoader(make_dataset(), batch_size=16))
    assert probe.before is not None and probe.after is not None
    assert_bitwise_same(probe.after, probe.before)
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert all(torch.isfinite(p).all() for p in module.parameters())


class AlwaysNaN(TinyNet):
    def compute_loss(self, batch: Any) -> Tensor:
        return super().compute_loss(batch) * math.nan


@pytest.mark.parametrize("name", ["base", "slsam"])
def test_many_skipped_steps_in_a_row_stop_training(name: str) -> None:
    callback = METHODS[name]()
    callback.skipped.max_consecutive = 3
    trainer = quiet_trainer(callbacks=[callback], max_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row .*max_skipped_steps=3"):
            trainer.fit(AlwaysNaN(), DataLoader(make_dataset(), batch_size=16))
    assert trainer.global_step == 0


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_max_skipped_steps_is_validated(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^max_skipped_steps"):
        SAM(max_skipped_steps=value)
    assert SAM(max_skipped_steps=None).skipped.max_consecutive is None
