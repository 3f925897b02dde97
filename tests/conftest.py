"""Small shared fixtures: a tiny classification dataset, a tiny mixin module and a quiet CPU Trainer factory."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_slsam import SharpnessAwareMixin


@contextlib.contextmanager
def experiment_script(path: Path, name: str | None = None) -> Iterator[ModuleType]:
    """The script at ``path`` (one of ``experiments/``) imported as the module ``name`` (default: its stem), which
    stays in ``sys.modules`` while in use: the dataclasses of a script look their module up there."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


IN_FEATURES = 8
NUM_CLASSES = 3
BATCH_SIZE = 16


def make_dataset(n: int = 96, seed: int = 0) -> TensorDataset:
    """``n`` points in R^8 with labels from a fixed random linear teacher (learnable, deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=generator)
    teacher = torch.randn(IN_FEATURES, NUM_CLASSES, generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


class TinyNet(SharpnessAwareMixin, L.LightningModule):
    """``Linear -> [BatchNorm1d] -> Tanh -> Linear -> Tanh -> Linear`` in ``self.model``.

    ``compute_loss`` is ``F.cross_entropy(self.model(x), y)``; ``configure_optimizers`` is
    ``torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)``. Parameter names are
    ``model.<index>.weight`` / ``model.<index>.bias`` (indices 0, 2, 4 without BatchNorm; with it 0 (weight
    only: no bias before BatchNorm), 1, 3, 5).
    The weights are drawn from their own seeded RNG, leaving the global one alone.
    """

    def __init__(
        self, hidden: int = 16, batch_norm: bool = False, lr: float = 1e-2, weight_decay: float = 0.1, seed: int = 0
    ) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # no bias before BatchNorm: its gradient is ~0 (rounding noise) and AdamW's update of it is noise-driven
            layers: list[nn.Module] = [nn.Linear(IN_FEATURES, hidden, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers += [nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES)]
            self.model = nn.Sequential(*layers)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@pytest.fixture
def tiny_dataset() -> TensorDataset:
    """96 labelled points: six batches of 16."""
    return make_dataset()


@pytest.fixture
def tiny_loader(tiny_dataset: TensorDataset) -> DataLoader:
    """Batches of 16 in a fixed order (no shuffle), so a reference loop sees the Trainer's batches."""
    return DataLoader(tiny_dataset, batch_size=BATCH_SIZE, shuffle=False)


@pytest.fixture
def make_module() -> Callable[..., TinyNet]:
    """Factory of :class:`TinyNet` (keyword arguments as its constructor)."""
    return TinyNet


@pytest.fixture
def make_trainer() -> Callable[..., L.Trainer]:
    """Factory of a quiet, deterministic CPU Trainer: ``make_trainer(callbacks=(...), max_steps=3, **overrides)``."""
    return quiet_trainer


# --- comparisons and probes shared by the step tests -----------------------------------------------------
def gradient_after_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ascended: Sequence[nn.Parameter],
    grads: Sequence[Tensor],
    rho: float,
    differentiated: Sequence[Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """The reference loops' SAM pass 2, written out: the gradient of ``F.cross_entropy(model(x), y)`` with respect to
    ``differentiated`` (default: ``ascended``) at ``w + rho g / ||g||`` on ``ascended`` (``g``: their ``grads``), the
    weights put back afterwards."""
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    before = [p.detach().clone() for p in ascended]
    with torch.no_grad():
        for p, g in zip(ascended, grads, strict=True):
            p.add_(rho * g / (norm + 1e-12))
    wrt = list(ascended if differentiated is None else differentiated)
    result = torch.autograd.grad(F.cross_entropy(model(x), y), wrt)
    with torch.no_grad():
        for p, w in zip(ascended, before, strict=True):
            p.copy_(w)
    return result


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_models_close(actual: nn.Module, expected: nn.Module, **tolerance: float) -> None:
    """``assert_close`` on every parameter, naming the first that differs."""
    got, want = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def assert_models_equal(actual: nn.Module, expected: nn.Module) -> None:
    """Bitwise equality of every parameter, reporting the largest difference of those that differ."""
    got, want = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert got.keys() == want.keys()
    differing = {n: float((got[n] - want[n]).detach().abs().max()) for n in got if not torch.equal(got[n], want[n])}
    assert not differing, f"not bitwise equal (max abs difference per tensor): {differing}"


def record_compute_loss(module: nn.Module) -> list[dict[str, Tensor]]:
    """Wrap ``module.compute_loss`` so that every call records the parameter values it ran at."""
    calls: list[dict[str, Tensor]] = []
    original = module.compute_loss

    def recording(batch: Any) -> Tensor:
        calls.append(snapshot(module))
        return original(batch)

    module.compute_loss = recording
    return calls


def quiet_trainer(callbacks: Sequence[L.Callback] = (), max_steps: int = 3, **overrides: Any) -> L.Trainer:
    """A quiet, deterministic CPU Trainer."""
    options: dict[str, Any] = {
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "deterministic": True,
    }
    options.update(overrides)
    return L.Trainer(callbacks=list(callbacks), **options)


# --- Hydra: compose the real config, then shrink it for CPU (lightning-hydra-template style) -------------
SHRINK = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "save_checkpoints=false",
]


def compose_config(overrides: list[str], output_dir: str | None = None):
    """The real ``slsam-train`` config with ``overrides``, with HydraConfig set so that ``${hydra:...}`` resolves."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import lightning_slsam.app.cli  # noqa: F401 - registers the schemas and resolvers

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_slsam.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)
    return cfg
