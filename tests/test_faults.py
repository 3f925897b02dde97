"""No run is silently destroyed: faults, exact resume and bad inputs, each through a real run.

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

from lightning_slsam import ARSAM, ASAM, RST, SAM, SLSAM, SSAMD, SSAMF, Base, LayerwiseGNP, LookSAM
from lightning_slsam.engine.skipped_steps import NonFiniteTrainingError
from lightning_slsam.lightning_adapter.callback import SharpnessAware

RHO = 0.1
BATCHES_PER_EPOCH = 3
FAULT_BATCH = 3  # the first batch of epoch 1: every method has state by then (SSAM-D drops and grows here)

# Each method set up so that the faulty batch is a two-pass step that also changes the method's state:
# LookSAM and ARSAM refresh at steps 0 and 3, RST's coin (seed 1) says SAM at step 3, SSAM-D's first
# drop-and-grow is the first step of epoch 1.
METHODS: dict[str, Callable[[], SharpnessAware]] = {
    "base": Base,
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
        if not torch.equal(actual, expected):
            difference = (actual.double() - expected.double()).abs().max() if actual.is_floating_point() else "-"
            raise AssertionError(f"{where} changed (max abs difference {difference})")
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


# --- 3. exact resume through slsam-train, killed with SIGKILL -------------------------------------------------------
# The real entry point (Hydra's main) runs in a forked child, which imports nothing anew; a patched
# compute_loss kills the child with SIGKILL in the middle of a step (pass 2), after a checkpoint was written.
STEPS_PER_EPOCH = 5
EPOCHS = 3
RUN = [
    "experiment=digits_resnet20",
    "method=slsam",
    "method.sparsity=0.5",
    "model.weights=null",
    "data.image_size=8",
    f"data.train_limit={8 * STEPS_PER_EPOCH}",
    "data.batch_size=8",
    "scheduler=cosine",  # its total_steps reads estimated_stepping_batches: Lightning issue 20550's path
    "scheduler.warmup_steps=1",  # slsam-train counts the run's steps before the model is built: the position holds
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_val_batches=1",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "checkpoint_every_n_steps=2",
]


def _slsam_train(argv: list[str], kill_at: tuple[int, int] | None) -> None:
    """In a forked child: ``slsam-train *argv``; SIGKILL in pass 2 of the step at (epoch, global step) ``kill_at``."""
    import os
    import signal
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from lightning_slsam.app import cli
    from lightning_slsam.models.classifier import Classifier

    torch.set_num_threads(1)
    if kill_at is not None:
        original = Classifier.compute_loss
        calls: dict[tuple[int, int], int] = {}

        def compute_loss(self: Classifier, batch: Any) -> Tensor:
            where = (self.trainer.current_epoch, self.trainer.global_step)
            calls[where] = calls.get(where, 0) + 1
            if where == kill_at and calls[where] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, batch)

        Classifier.compute_loss = compute_loss  # type: ignore[method-assign]
    GlobalHydra.instance().clear()
    sys.argv = ["slsam-train", *argv]
    cli.main()


def run_cli(run_dir: Any, kill_at: tuple[int, int] | None = None, ckpt_path: Any = None) -> int:
    """The child's exit code (``-SIGKILL`` when it was killed)."""
    import multiprocessing
    import signal

    argv = [*RUN, f"hydra.run.dir={run_dir}"] + ([f"ckpt_path={ckpt_path}"] if ckpt_path is not None else [])
    child = multiprocessing.get_context("fork").Process(target=_slsam_train, args=(argv, kill_at))
    child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("slsam-train did not finish within 300 s")
    assert child.exitcode in (0, -signal.SIGKILL), f"slsam-train failed with exit code {child.exitcode}"
    return int(child.exitcode)


def resumable_state(path: Any) -> dict[str, Any]:
    """What must continue exactly: weights, optimizer, SL-SAM's callback state (sampler, counters, history),
    the training loader's position, the global RNG states, the global step and epoch."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    callbacks = checkpoint["callbacks"]
    return {
        "weights": checkpoint["state_dict"],
        "optimizer": checkpoint["optimizer_states"],
        "schedulers": checkpoint["lr_schedulers"],
        "slsam": callbacks["SharpnessAware[SLSAM]"],
        "rng": callbacks["RNGState"],
        "data": checkpoint["DigitsDataModule"],
        "step": checkpoint["global_step"],
        "epoch": checkpoint["epoch"],
    }


def test_killed_runs_resume_exactly(tmp_path: Any) -> None:
    """Killed mid-epoch (last checkpoint: step 6, one batch into epoch 1), resumed, killed again in the first
    step of epoch 2 (last checkpoint: the end of epoch 1), resumed again: the end state equals an uninterrupted
    run's bitwise, and each run's result.json holds its record so far (the last one: the whole run)."""
    import json
    import signal

    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    assert run_cli(uninterrupted) == 0
    assert run_cli(killed / "1", kill_at=(1, 7)) == -signal.SIGKILL
    first = killed / "1" / "checkpoints" / "last.ckpt"
    assert resumable_state(first)["step"] == 6 and resumable_state(first)["data"]["train_loader"]["batches"] == 1
    record = json.loads((killed / "1" / "result.json").read_text())  # written at the end of epoch 0
    assert record["steps"] == STEPS_PER_EPOCH

    assert run_cli(killed / "2", kill_at=(2, 10), ckpt_path=first) == -signal.SIGKILL
    second = killed / "2" / "checkpoints" / "last.ckpt"
    assert resumable_state(second)["step"] == 2 * STEPS_PER_EPOCH  # the end of epoch 1, after its validation
    assert run_cli(killed / "3", ckpt_path=second) == 0

    final = uninterrupted / "checkpoints" / "last.ckpt"
    assert_bitwise_same(resumable_state(killed / "3" / "checkpoints" / "last.ckpt"), resumable_state(final))
    whole = json.loads((uninterrupted / "result.json").read_text())
    resumed = json.loads((killed / "3" / "result.json").read_text())
    assert resumed["steps"] == whole["steps"] == EPOCHS * STEPS_PER_EPOCH
    for key in ("best_metric", "final_metric", "active_ratio", "active_ratio_pass2", "passes_per_step"):
        assert resumed[key] == whole[key], key


class DropoutNet(TinyNet):
    """TinyNet with dropout: its masks come from the global torch RNG, which a resume must continue."""

    def __init__(self) -> None:
        super().__init__()
        self.model.insert(2, torch.nn.Dropout(0.5))


class SimulatedCrash(RuntimeError):
    pass


class Crash(L.Callback):
    """Raises at the start of the batch that would take global step ``at`` + 1 (a crash after step ``at``)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise SimulatedCrash(f"after global step {self.at}")


def test_mid_epoch_resume_with_dropout_and_a_plain_trainer(tmp_path: Any) -> None:
    """Without the CLI: a ResumableDataLoader handed to Trainer.fit, RNGState and a step checkpoint resume a
    dropout model mid-epoch bitwise (Lightning's own loader-state path; the CLI test covers the data module's)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_slsam.data import ResumableDataLoader
    from lightning_slsam.lightning_adapter.rng_state import RNGState

    def fit(directory: Any, crash_at: int | None = None, ckpt_path: Any = None) -> DropoutNet:
        L.seed_everything(0, verbose=False)
        module = DropoutNet()
        callbacks = [SLSAM(rho=RHO, sparsity=0.5, seed=0), RNGState()]
        callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=2, save_top_k=0, save_last=True))
        if crash_at is not None:
            callbacks.append(Crash(crash_at))
        trainer = quiet_trainer(callbacks=callbacks, max_steps=-1, max_epochs=2, enable_checkpointing=True)
        trainer.fit(module, ResumableDataLoader(make_dataset(), batch_size=16, seed=0), ckpt_path=ckpt_path)
        return module

    whole = fit(tmp_path / "whole")
    with pytest.raises(SimulatedCrash):
        fit(tmp_path / "crashed", crash_at=3)
    assert torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = fit(tmp_path / "resumed", ckpt_path=tmp_path / "crashed" / "last.ckpt")
    assert_bitwise_same(snapshot(resumed), snapshot(whole))


# --- 2 and 5. bad inputs, refused before training with the key named ------------------------------------------
def _build_nothing(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a model was built although the configuration is invalid")


def _one_line_config_error(overrides: list[str], tmp_path: Any, match: str) -> str:
    from conftest import SHRINK, compose_config

    from lightning_slsam.app.cli import ConfigError, train

    cfg = compose_config([*overrides, *SHRINK], str(tmp_path))
    with pytest.raises(ConfigError, match=match) as error:
        train(cfg)
    assert "\n" not in str(error.value), "the error should be one line"
    return str(error.value)


def _write_tsv(folder: Any, labels: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"text number {i}\t{label}\n" for i, label in enumerate(labels))
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("text\tlabel\n" + rows)


def test_text_label_count_is_checked_before_the_model_is_built(tmp_path: Any, monkeypatch: Any) -> None:
    """text_tsv with labels 0, 1, 2 and the default model.num_labels=2 was an IndexError mid-training."""
    from lightning_slsam.models.text_classifier import TextClassifier

    monkeypatch.setattr(TextClassifier, "__init__", _build_nothing)
    _write_tsv(tmp_path / "tsv", ["0", "1", "2", "1", "0", "2"])
    overrides = ["experiment=sst2_minilm", "data=text_tsv", f"data.path={tmp_path / 'tsv'}"]
    message = _one_line_config_error(overrides, tmp_path, r"^model\.num_labels=2 ")
    assert "3 classes" in message and "data.label_column='label'" in message and "model.num_labels=3" in message


def test_null_label_count_is_taken_from_the_data(tmp_path: Any) -> None:
    from conftest import compose_config

    from lightning_slsam.app.cli import _match_label_count, instantiate_group

    _write_tsv(tmp_path / "tsv", ["a", "b", "c", "a"])
    overrides = ["experiment=sst2_minilm", "data=text_tsv", f"data.path={tmp_path / 'tsv'}", "model.num_labels=null"]
    cfg = compose_config(overrides, str(tmp_path))
    _match_label_count(cfg, instantiate_group("data", cfg.data))
    assert cfg.model.num_labels == 3


def test_image_class_count_is_checked(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    message = _one_line_config_error(["model.num_classes=5"], tmp_path, r"^model\.num_classes=5 ")
    assert "10 classes" in message


def _torch_file(path: Any, content: Any) -> Any:
    torch.save(content, path)
    return path


def _damaged_files(tmp_path: Any) -> dict[str, tuple[Any, str]]:
    """File -> what the error must say about it."""
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    whole = _torch_file(tmp_path / "whole.ckpt", {"state_dict": {"w": torch.ones(1000)}, "loops": {}})
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    random_bytes = tmp_path / "random.ckpt"
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    random_bytes.write_bytes(b"no checkpoint" + noise.numpy().tobytes())
    return {
        "empty": (empty, "is empty"),
        "truncated": (truncated, "is truncated or corrupt"),
        "random": (random_bytes, "not a PyTorch file"),
    }


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "not-lightning"])
def test_damaged_checkpoint_is_refused_before_training(damage: str, tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    files = _damaged_files(tmp_path)
    files["not-lightning"] = (_torch_file(tmp_path / "weights.pt", {"w": torch.ones(2)}), "not a Lightning checkpoint")
    path, says = files[damage]
    message = _one_line_config_error([f"ckpt_path={path}"], tmp_path, r"^ckpt_path: ")
    assert str(path) in message and says in message


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_weights_file_is_refused_before_training(damage: str, tmp_path: Any) -> None:
    path, says = _damaged_files(tmp_path)[damage]
    message = _one_line_config_error([f"model.weights={path}"], tmp_path, r"^model\.weights: ")
    assert str(path) in message and says in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.bandit_lr=inf", "method.bandit_lr"),
        ("method.bandit_lr=nan", "method.bandit_lr"),
        ("method.clip_grad_norm=inf", "method.clip_grad_norm"),
        ("method.clip_grad_value=nan", "method.clip_grad_value"),
        ("method.max_skipped_steps=0", "method.max_skipped_steps"),
        ("checkpoint_every_n_steps=0", "checkpoint_every_n_steps"),
    ],
)
def test_non_finite_arguments_are_refused(override: str, key: str, tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    _one_line_config_error([override], tmp_path, rf"^{key}: ")


def test_non_utf8_tsv_names_file_and_line(tmp_path: Any) -> None:
    from lightning_slsam.data.text_tsv import TextTSVDataModule

    _write_tsv(tmp_path, ["0", "1", "0", "1"])
    (tmp_path / "train.tsv").write_bytes(b"text\tlabel\nfine\t0\ncaf\xe9 au lait\t1\nok\t0\n")  # latin-1 e-acute
    with pytest.raises(ValueError, match=r"train\.tsv:3: not UTF-8 text \(byte 0xe9 at column 4\)"):
        TextTSVDataModule(path=str(tmp_path))


def test_endless_run_warns(tmp_path: Any, monkeypatch: Any) -> None:
    from conftest import SHRINK, compose_config

    from lightning_slsam.app.cli import ConfigError, train

    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    cfg = compose_config([*SHRINK, "trainer.max_epochs=-1"], str(tmp_path))
    with (
        pytest.warns(UserWarning, match=r"trainer\.max_epochs=-1: Lightning trains until"),
        pytest.raises(ConfigError, match="model: a model was built"),
    ):
        train(cfg)


def _flat(batch: Any) -> list[Tensor]:
    if isinstance(batch, dict):
        return [batch[key] for key in sorted(batch)]
    return list(batch)


def _make_data(kind: str, tmp_path: Any) -> Any:
    from test_data import fake_cifar10

    from lightning_slsam.data import CIFARDataModule, DigitsDataModule, GLUEDataModule, TextTSVDataModule

    if kind == "digits":
        return DigitsDataModule(batch_size=16, train_limit=80, seed=3)
    if kind == "cifar":
        if not (tmp_path / "cifar-10-batches-py").is_dir():
            fake_cifar10(tmp_path)
        return CIFARDataModule(root=str(tmp_path), batch_size=3, augment=False, seed=3)
    labels = ["0", "1"] * 10
    _write_tsv(tmp_path / "tsv", labels)
    if kind == "text_tsv":
        return TextTSVDataModule(path=str(tmp_path / "tsv"), batch_size=3, max_length=16, seed=3)
    (tmp_path / "tsv" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"s {i}\t{i % 2}\n" for i in range(20)))
    (tmp_path / "tsv" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"d {i}\t{i % 2}\n" for i in range(4)))
    return GLUEDataModule("sst2", path=str(tmp_path / "tsv"), batch_size=3, max_length=16, seed=3)


@pytest.mark.parametrize("kind", ["digits", "cifar", "text_tsv", "glue"])
def test_every_data_module_continues_its_order(kind: str, tmp_path: Any) -> None:
    """Each data module's training loader: a new order each epoch, and a new module restored from the state
    saved after k batches of epoch 1 serves exactly the remaining batches of that epoch."""
    reference = _make_data(kind, tmp_path)
    reference.setup("fit")
    loader = reference.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([_flat(batch) for batch in loader])
    differs = [not torch.equal(x, y) for a, b in zip(*epochs, strict=True) for x, y in zip(a, b, strict=True)]
    assert any(differs), "epoch 1 repeats epoch 0's order"

    cut = 2
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    for _ in range(cut):
        next(iterator)
    state = reference.state_dict()
    assert state["train_loader"]["epoch"] == 1 and state["train_loader"]["batches"] == cut

    resumed = _make_data(kind, tmp_path)
    resumed.load_state_dict(state)  # Lightning restores the data module before it asks for loaders
    resumed.setup("fit")
    again = resumed.train_dataloader()
    again.sampler.set_epoch(1)
    assert_bitwise_same([_flat(batch) for batch in again], epochs[1][cut:])
    assert_bitwise_same([_flat(batch) for batch in again], epochs[1])  # the epoch after that one starts afresh


def test_mid_epoch_position_refuses_changed_data() -> None:
    from lightning_slsam.data import ResumableDataLoader

    loader = ResumableDataLoader(make_dataset(), batch_size=16, seed=0)
    loader.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 32, "num_samples": 96, "seed": 0})
    with pytest.raises(ValueError, match=r"^train loader: .*epoch 0.*batch_size 32 -> 16"):
        next(iter(loader))
