"""Stepping the LR schedulers of ``configure_optimizers`` under manual optimization.

Lightning steps schedulers only in automatic optimization. The mixin steps them itself, at the
interval and frequency each scheduler config asks for. The number of steps owed is derived from the
trainer's counters (optimizer steps, epochs) and the scheduler's own ``last_epoch``, so nothing extra
needs checkpointing and a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any


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
            if config.reduce_on_plateau:
                metric = trainer.callback_metrics.get(config.monitor)
                if metric is None:
                    if config.strict:
                        available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                        raise KeyError(
                            f"ReduceLROnPlateau monitor {config.monitor!r} was not logged; available: {available}"
                        )
                    return
                scheduler.step(metric)
            else:
                scheduler.step()
