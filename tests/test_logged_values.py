"""What reaches the loggers: the learning rate and a summary of the arm probabilities every
step (CSV), a histogram and a heatmap image on TensorBoard, and the composed config as hyperparameters."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import SHRINK, TinyNet, compose_config, make_dataset, quiet_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_slsam import SAM, SLSAM
from lightning_slsam.app.cli import train
from lightning_slsam.lightning_adapter.probability_logging import heatmap_image, summary

STEPS_PER_EPOCH = 6  # make_dataset(96) in batches of 16
GAMMA = 0.5


class ScheduledNet(TinyNet):
    """TinyNet with a per-step StepLR (the LR halves after every update), in one or two parameter groups."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups

    def configure_optimizers(self) -> Any:
        layers = list(self.model)
        if self.groups == 1:
            params: Any = self.parameters()
        else:  # the first layer at a tenth of the learning rate
            params = [
                {"params": layers[0].parameters(), "lr": self.lr / 10},
                {"params": [p for layer in layers[1:] for p in layer.parameters()]},
            ]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader() -> DataLoader:
    return DataLoader(make_dataset(), batch_size=16, shuffle=False)


def rows_of(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        return [row for row in csv.DictReader(file) if row.get("train/loss")]


def reference_summary(probs: list[float]) -> tuple[float, float, float]:
    """min, max and the entropy of probs / sum(probs) over log(N), one python loop."""
    total = sum(probs)
    entropy = -sum(p / total * math.log(p / total) for p in probs if p > 0)
    return min(probs), max(probs), entropy / math.log(len(probs))


@pytest.mark.parametrize("groups", [1, 2])
def test_csv_gets_every_step_the_lr_of_the_update_and_the_probability_summary(groups: int, tmp_path) -> None:
    callback = SLSAM(rho=0.05, sparsity=0.5, seed=0, history_every=1)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = quiet_trainer([callback], max_steps=STEPS_PER_EPOCH, logger=logger, log_every_n_steps=1)
    trainer.fit(ScheduledNet(groups), loader())
    rows = rows_of(logger)
    assert [int(row["step"]) for row in rows] == list(range(STEPS_PER_EPOCH))
    history = callback.probability_history()
    assert history is not None and len(history) == STEPS_PER_EPOCH
    for step, row in enumerate(rows):
        # the learning rate the update of this step used: before the scheduler's step that follows it
        if groups == 1:
            assert float(row["train/lr"]) == pytest.approx(1e-2 * GAMMA**step, rel=1e-6)
        else:
            assert "train/lr" not in row
            assert float(row["train/lr_pg0"]) == pytest.approx(1e-3 * GAMMA**step, rel=1e-6)
            assert float(row["train/lr_pg1"]) == pytest.approx(1e-2 * GAMMA**step, rel=1e-6)
        low, high, entropy = reference_summary(history[step].tolist())
        assert float(row["train/prob_min"]) == pytest.approx(low, rel=1e-5)
        assert float(row["train/prob_max"]) == pytest.approx(high, rel=1e-5)
        assert float(row["train/prob_entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert float(rows[-1]["train/prob_entropy"]) < 1.0  # the bandit has moved away from uniform


def test_methods_without_arm_sampling_log_no_probability_summary(tmp_path) -> None:
    logger = CSVLogger(str(tmp_path), name="run")
    quiet_trainer([SAM()], max_steps=2, logger=logger, log_every_n_steps=1).fit(TinyNet(), loader())
    rows = rows_of(logger)
    assert len(rows) == 2 and all(row["train/lr"] for row in rows)
    assert "train/prob_min" not in rows[0]


def test_summary_of_uniform_and_concentrated_probabilities() -> None:
    assert summary(torch.full((10,), 0.2))["train/prob_entropy"] == pytest.approx(1.0)
    probs = torch.tensor([0.9, 0.05, 0.05, 1e-6])
    low, high, entropy = reference_summary(probs.tolist())
    assert summary(probs) == pytest.approx(
        {"train/prob_min": low, "train/prob_max": high, "train/prob_entropy": entropy}, rel=1e-6
    )


def test_heatmap_image_rows_are_arms_columns_are_records() -> None:
    history = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])  # 2 records of 3 arms
    image = heatmap_image(history)
    assert image.shape[0] == 3 and image.shape[1] % 3 == 0 and image.shape[2] % 2 == 0
    cell_h, cell_w = image.shape[1] // 3, image.shape[2] // 2
    dark, bright = image[:, 0, 0], image[:, cell_h, 0]  # arm 0 at record 0 (p=0), arm 1 at record 0 (p=1)
    assert torch.equal(image[:, 0, cell_w], bright)  # arm 0 at record 1: p=1
    assert torch.equal(image[:, cell_h, cell_w], dark)  # arm 1 at record 1: p=0
    assert float(bright.sum()) > float(dark.sum()) + 1.0  # yellow against dark blue
    middle = image[:, 2 * cell_h, 0]
    assert torch.equal(middle, image[:, 2 * cell_h, cell_w])  # arm 2 at 0.5 in both records
    assert float(dark.sum()) < float(middle.sum()) < float(bright.sum())
    long = heatmap_image(torch.rand(2000, 4))
    assert long.shape[2] <= 512 and float(long.min()) >= 0.0 and float(long.max()) <= 1.0


def test_tensorboard_gets_histogram_heatmap_and_arm_names(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = SLSAM(rho=0.05, sparsity=0.5, seed=0)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer([callback], max_steps=-1, max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(TinyNet(), loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "train/arm_probabilities" in tags["histograms"]
    assert "train/arm_probabilities_heatmap" in tags["images"]
    assert any(tag.startswith("train/arm_names") for tag in tags["tensors"])
    assert {"train/lr", "train/prob_entropy", "train/loss"} <= set(tags["scalars"])
    images = events.Images("train/arm_probabilities_heatmap")
    assert [image.step for image in images] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # each epoch end
    arms = len(callback.layout)
    assert images[-1].height % arms == 0 and images[-1].width % (2 * STEPS_PER_EPOCH) == 0
    histogram = events.Histograms("train/arm_probabilities")[-1].histogram_value
    assert histogram.num == arms
    assert histogram.max == pytest.approx(float(callback.probabilities().max()), rel=1e-5)


# --- the Hydra app ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_default_run_logs_every_step_and_its_config_without_warnings(logger: str, tmp_path: Path) -> None:
    # the default experiment as it is (its log_every_n_steps included), on two short batches, untrained weights
    overrides = [o for o in SHRINK if not o.startswith(("logger=", "trainer.log_every_n_steps"))]
    cfg = compose_config([*overrides, f"logger={logger}", "model.weights=null", "data.train_limit=128"], str(tmp_path))
    assert cfg.trainer.log_every_n_steps == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert messages == []
    run = next(tmp_path.glob("*/version_0"))
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["method"]["_target_"] == "lightning_slsam.SLSAM"
    assert hparams["seed"] == 0 and hparams["trainer"]["log_every_n_steps"] == 1
    if logger == "csv":
        with open(run / "metrics.csv") as file:
            rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
        assert [int(row["step"]) for row in rows] == [0, 1]
        assert all(row["train/lr"] and row["train/prob_entropy"] for row in rows)
