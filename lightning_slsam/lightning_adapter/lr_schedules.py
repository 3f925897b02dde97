"""Stepping the LR schedulers of ``configure_optimizers`` under manual optimization.

Lightning steps schedulers only in automatic optimization. The mixin steps them itself, at the
interval and frequency each scheduler config asks for. The number of steps owed is derived from the
trainer's counters (optimizer steps, epochs) and the scheduler's own ``last_epoch``, so nothing extra
needs checkpointing and a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau


def step_schedulers(trainer: Any, interval: str, epoch_end: bool = False) -> None:
    """Bring every scheduler with this ``interval`` ("step" or "epoch") up to date.

    ``"step"``: after each optimizer step, a scheduler of frequency f has stepped ``global_step // f`` times.
    ``"epoch"``: once epoch e (0-based) has ended (``epoch_end=True``, called after its validation, so
    ``ReduceLROnPlateau`` sees that validation's metric), ``(e + 1) // f`` times; at the first step of
    epoch e, ``e // f`` times (which catches up if the end-of-epoch call did not happen).
    """
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval:
            continue
        count = trainer.global_step if interval == "step" else trainer.current_epoch + int(epoch_end)
        target = count // config.frequency
        scheduler = config.scheduler
        while scheduler.last_epoch < target:
            if isinstance(scheduler, ReduceLROnPlateau):
                monitor, strict = _monitor_of(trainer, scheduler)
                metric = trainer.callback_metrics.get(monitor)
                if metric is None:
                    if strict:
                        available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                        raise KeyError(f"ReduceLROnPlateau: monitor {monitor!r} was not logged; logged: {available}")
                    break
                scheduler.step(metric)
            else:
                scheduler.step()


def _monitor_of(trainer: Any, scheduler: ReduceLROnPlateau) -> tuple[str, bool]:
    monitors = getattr(trainer.lightning_module, "_scheduler_monitors", {})
    if id(scheduler) not in monitors:
        raise ValueError(
            "monitor: a ReduceLROnPlateau scheduler needs the metric to watch, e.g. configure_optimizers returning "
            '{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}'
        )
    return monitors[id(scheduler)]


def split_monitors(conf: Any) -> tuple[Any, dict[int, tuple[str, bool]]]:
    """Take ``monitor``/``strict``/``reduce_on_plateau`` out of a ``configure_optimizers`` return value.

    Returns the value Lightning should see and ``{id(scheduler): (monitor, strict)}``. Handles every form
    Lightning accepts: an optimizer, lists, ``([optimizers], [schedulers])``, and optimizer dicts.
    """
    monitors: dict[int, tuple[str, bool]] = {}

    def scheduler_entry(entry: Any, monitor: str | None) -> Any:
        if isinstance(entry, dict):
            entry = dict(entry)
            monitor = entry.pop("monitor", monitor)
            strict = bool(entry.pop("strict", True))
            entry.pop("reduce_on_plateau", None)
            if monitor is not None:
                monitors[id(entry["scheduler"])] = (monitor, strict)
            return entry
        if monitor is not None:
            monitors[id(entry)] = (monitor, True)
        return entry

    def optimizer_dict(entry: Any) -> Any:
        if not isinstance(entry, dict):
            return entry
        entry = dict(entry)
        monitor = entry.pop("monitor", None)
        if "lr_scheduler" in entry:
            entry["lr_scheduler"] = scheduler_entry(entry["lr_scheduler"], monitor)
        return entry

    if isinstance(conf, dict):
        return optimizer_dict(conf), monitors
    if isinstance(conf, (list, tuple)):
        if len(conf) == 2 and isinstance(conf[0], (list, tuple)) and isinstance(conf[1], (list, tuple)):
            return type(conf)([conf[0], [scheduler_entry(e, None) for e in conf[1]]]), monitors
        return type(conf)(optimizer_dict(e) for e in conf), monitors
    return conf, monitors
