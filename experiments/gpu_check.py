"""One command that checks the CUDA path: correctness under fp32 / bf16-mixed / 16-mixed, then the step cost.

Run it once, as soon as a GPU is available (about 15 minutes of device time in all), then collect its files::

    python experiments/gpu_check.py                  # on a CUDA machine: writes into $OUT, else --out
    python experiments/gpu_check.py --dry-run        # the whole script on the CPU, tiny shapes (CI runs this)

Output: ``gpu_check_<device>.json`` and ``gpu_check_<device>.md`` in ``--out`` if given, else in ``$OUT`` if that
is set, else in ``experiments/results/gpu/``; the step benchmark's own records go to ``bench/`` beside them.
The exit status is 1 if any correctness check failed or raised, else 0 (a section cut by its time budget or a
check skipped with its reason does not fail the run).

**1. Correctness** (the library's real path: a ``SharpnessAwareMixin`` module, the ``SAM`` / ``SLSAM`` callbacks,
a ``lightning.Trainer`` on the device). A small network (conv + BatchNorm stem, one pre-norm transformer encoder
layer with ``nn.MultiheadAttention``, linear head) trains a few steps with SGD (momentum 0.9; SGD because its
update is proportional to the gradient, where Adam's first steps are ``lr * sign(g)`` and flip on rounding noise)
from the same seed on the same batches. Each case is compared with the fp32 reference run on the CPU:

- ``max_abs_weight_diff``: max over every parameter element of ``|w_case - w_ref|`` after the last step;
- ``rel_weight_diff``: ``||w_case - w_ref|| / ||w_ref||`` over all parameters together;
- ``update_rel_error``: ``||dw_case - dw_ref|| / ||dw_ref||`` over all parameters, ``dw`` = final minus initial
  weights: the error relative to what training changed, the measure that means something under mixed precision.

Tolerances (pass when every stated bound holds; see ``TOLERANCES``): fp32 on CUDA with TF32 off, max abs weight
difference <= 1e-4 and update error <= 1e-3 (only the order of floating-point sums differs); bf16-mixed, update
error <= 0.25 (bfloat16 keeps 8 mantissa bits, unit roundoff 3.9e-3); 16-mixed under a GradScaler (initial scale
2^12, no growth), update error <= 0.05 (float16, unit roundoff 4.9e-4). Calibrated on the CPU (dry run, 6 steps):
bf16 0.09, fp16 0.005; the worst tensor is the final LayerNorm's bias, whose gradient is a sum over the batch
that nearly cancels. For scale the report also gives the update error of SAM without its ascent (rho = 0)
against the reference (0.09 on the CPU): the fp32 and fp16 bounds sit below it, the bf16 bound does not. A
missing unscale, different arms or a broken restore give errors of order 1 or a factor of the loss scale.

- **Overflow step** (16-mixed, SAM and SL-SAM): the loss of one step (the second) is multiplied by ``inf``.
  That step must leave every parameter and the optimizer state bitwise unchanged, run no pass 2, halve the loss
  scale, teach the bandit nothing; the step after it must train again (finite, changed weights).
- **Bandit under 16-mixed** (SL-SAM): the per-arm pass-1 norms handed to the Exp3 sampler (``sampler.update``)
  under 16-mixed must equal the fp32 reference's within a relative 0.1 on every step whose arms agree (a bandit
  fed scaled norms would be off by the factor 4096), and its probabilities after the last step must match within
  10 % of how far the reference's moved from the start. The bandit step size is raised to 1.0 here (the default
  1e-3 barely moves the probabilities in a few steps, which would make the comparison vacuous); the weight checks
  keep 1e-3, so that every precision samples the same arms as the reference (a check fails if it does not).

**2. Cost**: ``experiments/bench_step.py`` (interleaved step by step, one fit per method) on the ``vit_small``
(224 px, batch 64) and ``bert_base`` (sequence 128, batch 32) presets, random weights, for ``base sam looksam
lagnp slsam`` (the paper's setting) and ``slsam_plus`` where the library has it; bf16-mixed by default
(``--cost-precision``). Median step time, ratios to base and SAM, ``torch.cuda.max_memory_allocated``. The
timed window holds whole LookSAM periods (``--cost-steps`` a multiple of its k = 5), so its SAM steps are in it.

**3. Sharded causal LM**: ``experiments/bench_sharded.py --preset gpu --ranks 1``: a Llama-shaped model (16
layers, width 2048, sequences of 1024 tokens, batch 4) sharded with FSDP2 (one unit per decoder layer) on the
GPU, AdamW / SAM / SL-SAM / slsam_plus at the authors' LLM recipe (rho 0.01, sparsity 0.2): step time, CUDA peak
memory and the gradient bytes at the optimizer step (``--skip-sharded`` leaves it out).

**Time**: ``--budget-s`` (default 420 s) bounds the whole run; the correctness section gets at most
``--correctness-budget-s`` (default 150 s) of it, the cost presets share the rest but ``SHARDED_RESERVE_S`` (each
bench run is a subprocess with a timeout), section 3 takes what is left; a section cut by its budget says so in
the report.

``--dry-run`` runs every case on the CPU (bf16-mixed and 16-mixed through CPU autocast and a CPU GradScaler),
3 steps, and the cost section on ``resnet20_cifar`` with batch 4 instead of the GPU presets; the CUDA-only parts
(TF32 off, CUDA memory, the GPU presets) are reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # check this checkout's library, whatever else is installed

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lightning_slsam import SAM, SLSAM, SharpnessAware  # noqa: E402
from lightning_slsam.models import Classifier  # noqa: E402

BENCH_SCRIPT = REPO / "experiments" / "bench_step.py"
DEFAULT_OUT = REPO / "experiments" / "results" / "gpu"
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
CHECK_METHODS = ("sam", "slsam")
COST_METHODS = ("base", "sam", "looksam", "lagnp", "slsam")
OPTIONAL_COST_METHOD = "slsam_plus"
LOOKSAM_K = 5  # bench_step's LookSAM interval: the timed window must hold whole periods of it
GPU_PRESETS = ("vit_small", "bert_base")
DRY_RUN_PRESET = "resnet20_cifar"
MIN_PRESET_TIMEOUT_S = 20.0  # a bench run with less time left than this is not started
SHARDED_MIN_S = 30.0  # section 3 (bench_sharded) is not started with less time left than this
SHARDED_RESERVE_S = 120.0  # kept from the cost section for section 3


# --- what the correctness section runs, and its bounds -------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Bounds of one precision against the fp32 CPU reference (None: not a criterion, still reported)."""

    max_abs_weight_diff: float | None
    update_rel_error: float
    why: str


TOLERANCES: dict[str, Tolerance] = {
    "32-true": Tolerance(1e-4, 1e-3, "fp32, TF32 off: only the order of floating-point sums differs"),
    "bf16-mixed": Tolerance(None, 0.25, "autocast in bfloat16: 8 mantissa bits, unit roundoff 3.9e-3"),
    "16-mixed": Tolerance(None, 0.05, "autocast in float16 under a GradScaler: unit roundoff 4.9e-4"),
}
# 16-mixed vs fp32 per-arm pass-1 norms; a bandit fed scaled norms would be off by the loss scale (4096)
BANDIT_NORM_RTOL = 0.1
BANDIT_PROB_RTOL = 0.1  # |p_16 - p_32| <= this x max |p_32 - p_start|
BANDIT_MIN_MOVEMENT = 1e-3  # below this the probability comparison would be vacuous


@dataclass(frozen=True)
class CheckSetup:
    """The small network, data and optimizer of the correctness section (the same in the dry run)."""

    steps: int = 6
    batch_size: int = 16
    image_size: int = 8
    width: int = 32
    heads: int = 2
    num_classes: int = 10
    distinct_batches: int = 4
    lr: float = 0.05
    momentum: float = 0.9
    rho: float = 0.05
    sparsity: float = 0.5
    bandit_lr: float = 1e-3  # the authors' step size: the probabilities barely move, so every run samples alike
    bandit_check_lr: float = 1.0  # the bandit check's step size: the probabilities move measurably in a few steps
    loss_scale: float = 2.0**12
    overflow_step: int = 1  # the 0-based step whose loss is multiplied by inf


class CheckNet(nn.Module):
    """Conv 3x3 + BatchNorm + GELU stem, pixels as tokens, one pre-norm transformer encoder layer, mean-pooled head."""

    def __init__(self, width: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.GELU())
        self.encoder = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.stem(images).flatten(2).transpose(1, 2)  # (batch, pixels, width)
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


class CheckModule(Classifier):
    """The library's ``Classifier`` (a ``SharpnessAwareMixin`` module) whose loss can be poisoned for one step."""

    def __init__(self, setup: CheckSetup) -> None:
        torch.manual_seed(0)
        net = CheckNet(setup.width, setup.heads, setup.num_classes)
        optimizer = _sgd_factory(setup.lr, setup.momentum)
        super().__init__(net, num_classes=setup.num_classes, optimizer=optimizer)
        self.loss_multiplier = 1.0  # inf during the injected overflow step; x 1.0 is exact
        self.loss_calls = 0

    def compute_loss(self, batch: Any) -> Tensor:
        self.loss_calls += 1
        return super().compute_loss(batch) * self.loss_multiplier


def _sgd_factory(lr: float, momentum: float) -> Callable[[Any], torch.optim.Optimizer]:
    def make(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum)

    return make


def make_batches(setup: CheckSetup) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (setup.batch_size, 3, setup.image_size, setup.image_size)
    return [
        (
            torch.randn(shape, generator=generator),
            torch.randint(0, setup.num_classes, (setup.batch_size,), generator=generator),
        )
        for _ in range(setup.distinct_batches)
    ]


def make_method(method: str, setup: CheckSetup) -> SharpnessAware:
    """``sam``, ``slsam`` (the authors' bandit step size) or ``slsam_fast_bandit`` (the bandit check's)."""
    if method == "sam":
        return SAM(rho=setup.rho)
    if method in ("slsam", "slsam_fast_bandit"):
        bandit_lr = setup.bandit_check_lr if method == "slsam_fast_bandit" else setup.bandit_lr
        return SLSAM(rho=setup.rho, sparsity=setup.sparsity, bandit_lr=bandit_lr, seed=0)
    raise ValueError(f"method: unknown correctness method {method!r}; expected sam, slsam or slsam_fast_bandit")


# --- one recorded fit ----------------------------------------------------------------------------------------------
def parameters_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in module.named_parameters()}


def optimizer_state_of(optimizer: torch.optim.Optimizer) -> list[dict[str, Tensor]]:
    return [
        {k: v.detach().to("cpu", copy=True) for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
        for group in optimizer.param_groups
        for p in group["params"]
    ]


def _states_equal(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def _loss_scale(trainer: pl.Trainer) -> float | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else None


class SamplerTap(pl.Callback):
    """Records what reaches the SL-SAM sampler: ``(active, norms)`` of every ``sampler.update`` call, in order."""

    def __init__(self, method_callback: SharpnessAware) -> None:
        self.method_callback = method_callback
        self.updates: list[tuple[Tensor, Tensor]] = []
        self.initial_probabilities: Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = getattr(self.method_callback.method, "sampler", None)
        if sampler is None:
            return
        self.initial_probabilities = sampler.probs.detach().cpu().clone()
        update = sampler.update

        def recording_update(active: Tensor, grad_norms: Tensor) -> None:
            self.updates.append((active.detach().cpu().clone(), grad_norms.detach().to("cpu", torch.float64)))
            update(active, grad_norms)

        sampler.update = recording_update  # an instance attribute: this fit's sampler only


class OverflowInjector(pl.Callback):
    """Multiplies the loss of step ``at`` by inf and records what that step changed."""

    def __init__(self, method_callback: SharpnessAware, at: int) -> None:
        self.method_callback = method_callback
        self.at = at
        self.before: dict[str, Any] = {}
        self.seen: dict[str, Any] = {}
        self.after_weights: dict[str, Tensor] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx != self.at:
            return
        self.before = {
            "weights": parameters_of(pl_module),
            "optimizer": optimizer_state_of(trainer.optimizers[0]),
            "scale": _loss_scale(trainer),
            "probabilities": self.method_callback.probabilities(),
            "loss_calls": pl_module.loss_calls,
        }
        pl_module.loss_multiplier = math.inf

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if idx != self.at:
            return
        pl_module.loss_multiplier = 1.0
        weights = parameters_of(pl_module)
        probabilities = self.method_callback.probabilities()
        before = self.before
        self.seen = {
            "weights_unchanged": all(torch.equal(weights[n], before["weights"][n]) for n in weights),
            "optimizer_state_unchanged": _states_equal(optimizer_state_of(trainer.optimizers[0]), before["optimizer"]),
            "scale_before": before["scale"],
            "scale_after": _loss_scale(trainer),
            "forward_passes": pl_module.loss_calls - before["loss_calls"],
            "bandit_unchanged": None
            if probabilities is None
            else bool(torch.equal(probabilities, before["probabilities"])),
        }
        self.after_weights = weights


@dataclass
class FitOutcome:
    """What one correctness fit produced (weights on the CPU in float32)."""

    method: str
    precision: str
    device: str
    initial: dict[str, Tensor]
    final: dict[str, Tensor]
    steps: int
    loss_scale: float | None
    updates: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    initial_probabilities: Tensor | None = None
    probabilities: Tensor | None = None
    overflow: dict[str, Any] | None = None
    wall_s: float = 0.0


def run_fit(
    method: str,
    precision: str,
    device: str,
    setup: CheckSetup,
    batches: list[tuple[Tensor, Tensor]],
    inject_overflow: bool = False,
) -> FitOutcome:
    """``setup.steps`` optimizer steps of ``method`` through a real Trainer; the weights and what the sampler saw."""
    started = time.perf_counter()
    module = CheckModule(setup)
    initial = parameters_of(module)
    callback = make_method(method, setup)
    tap = SamplerTap(callback)
    callbacks: list[pl.Callback] = [callback, tap]
    injector = OverflowInjector(callback, setup.overflow_step) if inject_overflow else None
    if injector is not None:
        callbacks.append(injector)
    precision_args: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed":  # a known scale and no growth, so that the comparison runs see no overflow
        scaler = torch.amp.GradScaler(device, init_scale=setup.loss_scale, growth_interval=10**6)
        precision_args = {"plugins": [MixedPrecision("16-mixed", device, scaler)]}
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=setup.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **precision_args,
    )
    loader = torch.utils.data.DataLoader(
        [batches[i % len(batches)] for i in range(setup.steps)], batch_size=None, shuffle=False
    )
    trainer.fit(module, train_dataloaders=loader)
    probabilities = callback.probabilities()  # flushes the last (lazy) bandit update into the tap
    outcome = FitOutcome(
        method=method,
        precision=precision,
        device=device,
        initial=initial,
        final=parameters_of(module),
        steps=int(callback.steps),
        loss_scale=_loss_scale(trainer),
        updates=tap.updates,
        initial_probabilities=tap.initial_probabilities,
        probabilities=probabilities,
        wall_s=time.perf_counter() - started,
    )
    if injector is not None:
        seen = dict(injector.seen)
        if injector.after_weights is not None:
            seen["trained_after"] = any(
                not torch.equal(outcome.final[n], injector.after_weights[n]) for n in outcome.final
            )
        seen["final_finite"] = all(bool(torch.isfinite(w).all()) for w in outcome.final.values())
        outcome.overflow = seen
    return outcome


# --- the comparisons (pure functions of recorded tensors) ----------------------------------------------------------
def compare_weights(case: FitOutcome, ref: FitOutcome) -> dict[str, Any]:
    """Differences of ``case`` from ``ref``: max abs, max per-tensor relative, and the update's relative error."""
    if case.initial.keys() != ref.initial.keys():
        raise ValueError("the two fits have different parameters")
    same_start = all(torch.equal(case.initial[n], ref.initial[n]) for n in ref.initial)
    max_abs = max(float((case.final[n] - ref.final[n]).abs().max()) for n in ref.final)
    diff_sq = sum(float((case.final[n] - ref.final[n]).double().square().sum()) for n in ref.final)
    weight_sq = sum(float(ref.final[n].double().square().sum()) for n in ref.final)
    error_sq = sum(
        float(((case.final[n] - case.initial[n]) - (ref.final[n] - ref.initial[n])).double().square().sum())
        for n in ref.final
    )
    update_sq = sum(float((ref.final[n] - ref.initial[n]).double().square().sum()) for n in ref.final)
    update_rel = math.sqrt(error_sq) / math.sqrt(update_sq) if update_sq > 0 else math.inf
    return {
        "same_start": same_start,
        "max_abs_weight_diff": max_abs,
        "rel_weight_diff": math.sqrt(diff_sq / weight_sq),
        "update_rel_error": update_rel,
        "reference_update_norm": math.sqrt(update_sq),
    }


def same_arm_steps(case: FitOutcome, ref: FitOutcome) -> int:
    """How many leading steps sampled the same arms in both fits (all of them for SAM, which samples nothing)."""
    agreed = 0
    for (active_c, _), (active_r, _) in zip(case.updates, ref.updates, strict=False):
        if not torch.equal(active_c, active_r):
            break
        agreed += 1
    return agreed


def judge_weights(metrics: dict[str, Any], tolerance: Tolerance) -> tuple[str, str]:
    """``("pass" | "fail", why)`` for the metrics of :func:`compare_weights` under ``tolerance``."""
    problems = []
    if not metrics["same_start"]:
        problems.append("the fits did not start from the same weights")
    if not metrics["reference_update_norm"] > 0:
        problems.append("the reference did not move (nothing to compare)")
    bound = tolerance.max_abs_weight_diff
    if bound is not None and not metrics["max_abs_weight_diff"] <= bound:
        problems.append(f"max abs weight diff {metrics['max_abs_weight_diff']:.3g} > {bound:g}")
    if not metrics["update_rel_error"] <= tolerance.update_rel_error:
        problems.append(f"update error {metrics['update_rel_error']:.3g} > {tolerance.update_rel_error:g}")
    return ("fail", "; ".join(problems)) if problems else ("pass", "")


def compare_bandit(case: FitOutcome, ref: FitOutcome) -> dict[str, Any]:
    """The norms the sampler got under ``case`` vs ``ref``, step by step while the sampled arms agree, and the
    final probabilities when they agreed on every step."""
    agreed = 0
    worst = 0.0
    ratios: list[float] = []
    for (active_c, norms_c), (active_r, norms_r) in zip(case.updates, ref.updates, strict=False):
        if not torch.equal(active_c, active_r):
            break
        agreed += 1
        mask = active_r & (norms_r > 0) & torch.isfinite(norms_r)
        if bool(mask.any()):
            ratio = norms_c[mask] / norms_r[mask]
            worst = max(worst, float((ratio - 1).abs().max()))
            ratios.extend(ratio.tolist())
    all_agreed = agreed == len(ref.updates) == len(case.updates) and agreed > 0
    result: dict[str, Any] = {
        "steps": len(ref.updates),
        "steps_with_same_arms": agreed,
        "max_norm_rel_error": worst if ratios else None,
        "median_norm_ratio": sorted(ratios)[len(ratios) // 2] if ratios else None,
        "probabilities_compared": False,
    }
    if all_agreed and None not in (case.probabilities, ref.probabilities, ref.initial_probabilities):
        assert case.probabilities is not None and ref.probabilities is not None
        assert ref.initial_probabilities is not None
        result["probabilities_compared"] = True
        result["reference_movement"] = float((ref.probabilities - ref.initial_probabilities).abs().max())
        result["max_probability_diff"] = float((case.probabilities - ref.probabilities).abs().max())
    return result


def judge_bandit(metrics: dict[str, Any]) -> tuple[str, str]:
    problems = []
    if metrics["steps_with_same_arms"] == 0:
        problems.append("the first step already sampled other arms (same seed, same start: it must not)")
    elif metrics["max_norm_rel_error"] is None:
        problems.append("no norm was compared")
    elif not metrics["max_norm_rel_error"] <= BANDIT_NORM_RTOL:
        ratio = metrics["median_norm_ratio"]
        problems.append(
            f"norms off by up to {metrics['max_norm_rel_error']:.3g} relative (median ratio {ratio:.4g}) > "
            f"{BANDIT_NORM_RTOL:g}"
        )
    notes = []
    if metrics["probabilities_compared"]:
        movement, diff = metrics["reference_movement"], metrics["max_probability_diff"]
        if not movement >= BANDIT_MIN_MOVEMENT:
            problems.append(f"the reference's probabilities moved only {movement:.3g}: the comparison is vacuous")
        elif not diff <= BANDIT_PROB_RTOL * movement:
            problems.append(f"probabilities differ by {diff:.3g} > {BANDIT_PROB_RTOL:g} x movement {movement:.3g}")
    else:
        notes.append(
            f"arms diverged after step {metrics['steps_with_same_arms']} of {metrics['steps']}: norms compared up to "
            "there, final probabilities not compared"
        )
    return ("fail", "; ".join(problems + notes)) if problems else ("pass", "; ".join(notes))


def judge_overflow(seen: dict[str, Any], backoff: float = 0.5) -> tuple[str, str]:
    problems = []
    if not seen:
        return "fail", "the injected step never ran"
    if not seen["weights_unchanged"]:
        problems.append("parameters changed")
    if not seen["optimizer_state_unchanged"]:
        problems.append("optimizer state changed")
    if seen["forward_passes"] != 1:
        problems.append(f"{seen['forward_passes']} forward passes (pass 2 must not run)")
    before, after = seen["scale_before"], seen["scale_after"]
    if before is None or after is None or after != before * backoff:
        problems.append(f"loss scale {before} -> {after}, expected x {backoff:g}")
    if seen["bandit_unchanged"] is False:
        problems.append("the bandit learnt from the overflowed step")
    if not seen.get("trained_after", False):
        problems.append("the step after the overflow did not train")
    if not seen.get("final_finite", False):
        problems.append("non-finite weights at the end")
    return ("fail", "; ".join(problems)) if problems else ("pass", "")


# --- section 1 ------------------------------------------------------------------------------------------------------
class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-6:])


def run_correctness(device: str, setup: CheckSetup, deadline: Deadline, dry_run: bool) -> dict[str, Any]:
    """Every correctness case on ``device`` against the fp32 CPU reference; a list of checks with their status."""
    started = time.perf_counter()
    batches = make_batches(setup)
    checks: list[dict[str, Any]] = []
    fits: dict[tuple[str, str, str, str], FitOutcome | str] = {}  # an outcome, or why there is none

    def fit(method: str, precision: str, where: str, role: str) -> FitOutcome | str:
        """``role``: "reference", "case" or "overflow" (the dry run's fp32 case is a second, separate fit)."""
        key = (method, precision, where, role)
        overflow = role == "overflow"
        if key not in fits:
            if deadline.left() <= 0:
                fits[key] = "cut: the correctness section's time budget was spent"
            else:
                try:
                    fits[key] = run_fit(method, precision, where, setup, batches, inject_overflow=overflow)
                except Exception as exc:  # one broken case must not hide the others
                    fits[key] = "error: " + _error(exc)
        return fits[key]

    def unavailable(precision: str) -> str | None:
        if precision == "bf16-mixed" and device == "cuda" and not torch.cuda.is_bf16_supported():
            return "skipped: this GPU does not support bfloat16"
        return None

    def record(check: dict[str, Any], outcome: FitOutcome | str, *more: FitOutcome | str) -> bool:
        """Fill in status/reason when a fit is missing; True when every fit is there."""
        for item in (outcome, *more):
            if isinstance(item, str):
                kind, _, why = item.partition(": ")
                check["status"] = "skipped" if kind in ("cut", "skipped") else "error"
                check["reason"] = why
                checks.append(check)
                return False
        return True

    sensitivity: dict[str, Any] = {}
    for method in CHECK_METHODS:
        ref = fit(method, "32-true", "cpu", "reference")
        if method == "sam" and isinstance(ref, FitOutcome) and deadline.left() > 0:
            try:  # what losing the ascent would look like: SAM at rho = 0 against the reference
                no_ascent = run_fit("sam", "32-true", "cpu", dataclasses.replace(setup, rho=0.0), batches)
                sensitivity["sam_without_ascent_update_rel_error"] = compare_weights(no_ascent, ref)["update_rel_error"]
            except Exception as exc:
                sensitivity["error"] = _error(exc)
        for precision in PRECISIONS:
            check: dict[str, Any] = {
                "id": f"correctness/{method}/{precision}",
                "kind": "weights",
                "method": method,
                "precision": precision,
                "device": device,
                "tolerance": asdict(TOLERANCES[precision]),
            }
            missing = unavailable(precision)
            case = missing or fit(method, precision, device, "case")
            if not record(check, case, ref):
                continue
            assert isinstance(case, FitOutcome) and isinstance(ref, FitOutcome)
            metrics = compare_weights(case, ref)
            status, why = judge_weights(metrics, TOLERANCES[precision])
            problems = [why] if why else []
            if case.loss_scale is not None and case.loss_scale != setup.loss_scale:
                problems.append(f"a step overflowed (loss scale {case.loss_scale:g})")
            if case.steps != setup.steps:
                problems.append(f"{case.steps} of {setup.steps} steps ran")
            metrics["steps_with_same_arms"] = same_arm_steps(case, ref)
            if not metrics["steps_with_same_arms"] == len(ref.updates) == len(case.updates):
                problems.append(f"other arms sampled from step {metrics['steps_with_same_arms'] + 1} on")
            status = "fail" if problems else "pass"
            if device == "cpu" and precision == "32-true":
                problems.append("dry run: a second fp32 CPU fit against the reference (determinism, plumbing)")
            checks.append(
                {**check, **metrics, "status": status, "reason": "; ".join(problems), "wall_s": round(case.wall_s, 2)}
            )

        overflow_check: dict[str, Any] = {
            "id": f"overflow/{method}/16-mixed",
            "kind": "overflow",
            "method": method,
            "precision": "16-mixed",
            "device": device,
            "injected_at_step": setup.overflow_step,
        }
        case = fit(method, "16-mixed", device, "overflow")
        if record(overflow_check, case):
            assert isinstance(case, FitOutcome) and case.overflow is not None
            status, why = judge_overflow(case.overflow)
            checks.append({**overflow_check, **case.overflow, "status": status, "reason": why})

    bandit_check: dict[str, Any] = {
        "id": "bandit/slsam/16-mixed",
        "kind": "bandit",
        "method": "slsam",
        "precision": "16-mixed",
        "device": device,
        "tolerance": {"norm_rtol": BANDIT_NORM_RTOL, "probability_rtol_of_movement": BANDIT_PROB_RTOL},
    }
    case = fit("slsam_fast_bandit", "16-mixed", device, "case")
    ref = fit("slsam_fast_bandit", "32-true", "cpu", "reference")
    if record(bandit_check, case, ref):
        assert isinstance(case, FitOutcome) and isinstance(ref, FitOutcome)
        metrics = compare_bandit(case, ref)
        status, why = judge_bandit(metrics)
        checks.append({**bandit_check, **metrics, "status": status, "reason": why})

    skipped_items = []
    if dry_run:
        skipped_items.append("the CUDA device: dry run, every case above ran on the CPU (CPU autocast, CPU GradScaler)")
        skipped_items.append("TF32 off: CUDA only")
    return {
        "device": device,
        "reference": "fp32 on the CPU, same seed, same batches, same Trainer path",
        "setup": asdict(setup),
        "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
        "checks": checks,
        "sensitivity": sensitivity,
        "skipped": skipped_items,
        "wall_s": round(time.perf_counter() - started, 1),
    }


# --- section 2 ------------------------------------------------------------------------------------------------------
def _load_bench() -> Any:
    experiments = str(REPO / "experiments")
    if experiments not in sys.path:
        sys.path.insert(0, experiments)
    import bench_step

    return bench_step


def run_sharded(args: argparse.Namespace, out: Path, deadline: Deadline) -> dict[str, Any]:
    """Section 3: the causal-LM recipe's shape sharded with FSDP2 on this device (``bench_sharded.py``, one rank:
    one GPU): step time, peak memory and the gradient bytes at the optimizer step of AdamW, SAM, SL-SAM and
    slsam_plus. The dry run: the tiny preset, SL-SAM only, one timed step."""
    if deadline.left() < SHARDED_MIN_S:
        return {"reason": f"skipped: {deadline.left():.0f} s left, the section needs {SHARDED_MIN_S:.0f} s"}
    experiments = str(REPO / "experiments")
    if experiments not in sys.path:
        sys.path.insert(0, experiments)
    import bench_sharded

    argv = ["--preset", "tiny" if args.dry_run else "gpu", "--ranks", "1", "--out", str(out / "sharded")]
    argv += ["--methods", "slsam", "--steps", "1", "--warmup", "1", "--cpu"] if args.dry_run else []
    results = bench_sharded.main(argv)
    return {"command": "python experiments/bench_sharded.py " + " ".join(argv), "table": bench_sharded.table(results)}


def library_method_schema(name: str) -> type | None:
    """The structured-config schema of a library method, or None if the library has no method of that name."""
    from lightning_slsam.app import config_schema

    return getattr(config_schema, "METHOD_SCHEMAS", {}).get(name)


def optional_method_status(name: str = OPTIONAL_COST_METHOD) -> tuple[str | None, str]:
    """``(how, note)``: ``"bench"`` if bench_step builds it, ``"schema"`` if only the library's schema has it,
    None (with the reason) if it is absent."""
    bench = _load_bench()
    try:
        bench.make_callback(name)
        return "bench", f"{name}: built by experiments/bench_step.py"
    except ValueError:
        pass
    if library_method_schema(name) is not None:
        return "schema", f"{name}: built from the library's config schema defaults (bench_step does not name it)"
    return None, f"{name}: skipped, the library has no method of that name (lightning_slsam.app.config_schema)"


def bench_child(argv: list[str]) -> None:
    """Run bench_step in this process, after registering an optional method that only the library's schema has."""
    bench = _load_bench()
    how, note = optional_method_status()
    if how == "schema":
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        schema = library_method_schema(OPTIONAL_COST_METHOD)
        config = OmegaConf.structured(schema)
        if "seed" in config:
            config.seed = 0

        def build() -> SharpnessAware:
            return instantiate(config)

        bench.FIXED_METHODS[OPTIONAL_COST_METHOD] = (build, note)
    bench.main(argv)


def run_cost(presets: list[str], args: argparse.Namespace, out: Path, deadline: Deadline, tag: str) -> dict[str, Any]:
    """bench_step on each preset, one subprocess each, sharing what is left of the time budget."""
    started = time.perf_counter()
    how, note = optional_method_status()
    methods = list(COST_METHODS) + ([OPTIONAL_COST_METHOD] if how is not None else [])
    skipped_methods = {} if how is not None else {OPTIONAL_COST_METHOD: note}
    bench_out = out / "bench"
    results: dict[str, Any] = {}
    for index, preset in enumerate(presets):
        share = deadline.left() / (len(presets) - index)
        entry: dict[str, Any] = {"preset": preset}
        if share < MIN_PRESET_TIMEOUT_S:
            entry.update(status="cut", reason=f"time budget: {max(share, 0):.0f} s left for this preset")
            results[preset] = entry
            continue
        bench_tag = f"{preset}_{tag}"
        argv = [
            "--preset",
            preset,
            "--device",
            args.device,
            "--precision",
            args.cost_precision,
            "--methods",
            *methods,
            "--steps",
            str(args.cost_steps),
            "--warmup",
            str(args.cost_warmup),
            "--rounds",
            "1",
            "--out",
            str(bench_out),
            "--tag",
            bench_tag,
        ]
        if args.cost_batch_size:
            argv += ["--batch-size", str(args.cost_batch_size)]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        if args.device == "cpu":
            argv += ["--memory", "off"]  # CPU peak RSS needs a fresh process per method: too slow for a dry run
        command = [sys.executable, str(Path(__file__).resolve()), "--bench-child", *argv]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        entry["command"] = "python experiments/bench_step.py " + " ".join(argv)
        entry["timeout_s"] = round(share)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=share, check=False)
        except subprocess.TimeoutExpired:
            entry.update(status="cut", reason=f"time budget: the bench run passed its {share:.0f} s and was stopped")
            results[preset] = entry
            continue
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        json_path = bench_out / f"step_{bench_tag}.json"
        if done.returncode != 0 or not json_path.exists():
            entry.update(status="error", reason=f"exit {done.returncode}: {(done.stderr or done.stdout)[-3000:]}")
            results[preset] = entry
            continue
        record = json.loads(json_path.read_text())
        entry.update(status="done", reason="", record=record, markdown_file=str(json_path.with_suffix(".md").name))
        entry["looksam_window"] = looksam_window_note(record)
        results[preset] = entry
    skipped = []
    if args.device == "cpu":
        skipped.append(
            f"presets {', '.join(GPU_PRESETS)}: dry run, {DRY_RUN_PRESET} with batch {args.cost_batch_size} instead"
        )
        skipped.append("peak memory: torch.cuda.max_memory_allocated is CUDA only")
    return {
        "precision": args.cost_precision,
        "methods": methods,
        "optional_method": note,
        "skipped_methods": skipped_methods,
        "steps": args.cost_steps,
        "warmup": args.cost_warmup,
        "presets": results,
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def looksam_window_note(record: dict[str, Any]) -> str:
    """Whether LookSAM's timed steps held its SAM steps in the right proportion (1 + 1/k passes per step)."""
    row = record["results"].get("looksam")
    if row is None:
        return "looksam not run"
    expected = 1 + 1 / LOOKSAM_K
    got = row["passes_per_step"]
    if abs(got - expected) < 1e-9:
        return f"looksam: {got:.2f} passes per timed step = 1 + 1/{LOOKSAM_K}, whole periods timed"
    return f"looksam: {got:.2f} passes per timed step, expected {expected:.2f}: the window is not whole periods"


# --- report ---------------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """The step benchmark's machine record (versions, CPU, threads, date, load), plus the commit and CUDA details."""
    info: dict[str, Any] = _load_bench().machine_info(device, torch.get_num_threads())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def device_tag(info: dict[str, Any], dry_run: bool) -> str:
    name = "dry-run-cpu" if dry_run else str(info.get("gpu", "cuda"))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _num(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    info, correctness, cost = report["machine"], report["correctness"], report["cost"]
    where = info.get("gpu") or "the CPU (dry run)"
    verdict = report["verdict"]
    lines = [
        f"# GPU check: {where}",
        "",
        f"`{report['command']}`: {info['date']}, torch {info['torch']}"
        + (f" (CUDA {info['cuda']}, cuDNN {info['cudnn']})" if "cuda" in info else "")
        + f", lightning {info['lightning']}, lightning_slsam {info['lightning_slsam']}"
        + (f", commit `{info['git_commit'][:12]}`" if "git_commit" in info else "")
        + f"; {report['wall_s']:.0f} s wall (budget {report['budget_s']:.0f} s).",
        "",
        f"**Verdict: {verdict['text']}**",
        "",
        f"## 1. Correctness on {correctness.get('device', '-')}",
        "",
    ]
    if "checks" not in correctness:
        lines += [correctness.get("reason", "not run"), ""]
    else:
        setup = correctness["setup"]
        lines += [
            f"Reference: {correctness['reference']}. Network: conv+BatchNorm stem, one transformer encoder layer "
            f"(width {setup['width']}, {setup['heads']} heads), {setup['image_size']}x{setup['image_size']} inputs, "
            f"batch {setup['batch_size']}, {setup['steps']} steps of SGD (lr {setup['lr']}, momentum "
            f"{setup['momentum']}); SAM rho {setup['rho']}; SL-SAM sparsity {setup['sparsity']}, bandit step size "
            f"{setup['bandit_lr']:g} ({setup['bandit_check_lr']:g} in the bandit check); 16-mixed with a GradScaler "
            f"at scale {setup['loss_scale']:g}, no growth.",
            "",
            "Tolerances against the reference: "
            + "; ".join(
                f"{p}: max abs weight diff <= {_num(t['max_abs_weight_diff'], 'g')}, update error <= "
                f"{t['update_rel_error']:g} ({t['why']})"
                for p, t in correctness["tolerances"].items()
            )
            + f". Bandit norms within {BANDIT_NORM_RTOL:g} relative, probabilities within {BANDIT_PROB_RTOL:g} of "
            "the reference's movement.",
            "",
            "For scale: SAM without its ascent (rho = 0) has an update error of "
            f"{_num(correctness.get('sensitivity', {}).get('sam_without_ascent_update_rel_error'))} against the "
            "reference; a bound above that would not notice a lost ascent.",
            "",
            "| check | status | max abs weight diff | rel weight diff | update error | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for check in correctness["checks"]:
            if check["kind"] != "weights":
                continue
            lines.append(
                f"| `{check['id']}` | {check['status']} | {_num(check.get('max_abs_weight_diff'))} | "
                f"{_num(check.get('rel_weight_diff'))} | {_num(check.get('update_rel_error'))} | "
                f"{_cell(check.get('reason', ''))} |"
            )
        lines += [
            "",
            "| overflow check | status | weights unchanged | optimizer state unchanged | forward passes | "
            "loss scale | bandit unchanged | trains after | note |",
            "|---|---|---|---|---:|---|---|---|---|",
        ]
        for check in correctness["checks"]:
            if check["kind"] != "overflow":
                continue
            lines.append(
                f"| `{check['id']}` | {check['status']} | {check.get('weights_unchanged', '-')} | "
                f"{check.get('optimizer_state_unchanged', '-')} | {check.get('forward_passes', '-')} | "
                f"{_num(check.get('scale_before'), 'g')} -> {_num(check.get('scale_after'), 'g')} | "
                f"{'-' if check.get('bandit_unchanged') is None else check['bandit_unchanged']} | "
                f"{check.get('trained_after', '-')} | {_cell(check.get('reason', ''))} |"
            )
        lines += [
            "",
            "| bandit check | status | steps with the same arms | max norm rel error | median norm ratio | "
            "max probability diff | reference movement | note |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for check in correctness["checks"]:
            if check["kind"] != "bandit":
                continue
            lines.append(
                f"| `{check['id']}` | {check['status']} | {check.get('steps_with_same_arms', '-')} / "
                f"{check.get('steps', '-')} | {_num(check.get('max_norm_rel_error'))} | "
                f"{_num(check.get('median_norm_ratio'), '.5g')} | {_num(check.get('max_probability_diff'))} | "
                f"{_num(check.get('reference_movement'))} | {_cell(check.get('reason', ''))} |"
            )
        lines += [""] + [f"- skipped: {item}" for item in correctness.get("skipped", [])]
        lines.append("")

    lines += ["## 2. Cost", ""]
    if "presets" not in cost:
        lines += [cost.get("reason", "not run"), ""]
    else:
        lines += [
            f"`experiments/bench_step.py`, precision {cost['precision']}, {cost['steps']} timed steps per method "
            f"after {cost['warmup']} warm-up steps, methods {', '.join(f'`{m}`' for m in cost['methods'])}; "
            f"{cost['optional_method']}.",
            "",
        ]
        for preset, entry in cost["presets"].items():
            if entry["status"] != "done":
                lines += [f"### `{preset}`: {entry['status']}", "", _cell(entry.get("reason", "")), ""]
                continue
            table = (report["out"] / "bench" / entry["markdown_file"]).read_text()
            lines += [table.rstrip(), "", entry["looksam_window"] + ".", ""]
        lines += [f"- skipped: {item}" for item in cost.get("skipped", [])]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def verdict_of(correctness: dict[str, Any]) -> dict[str, Any]:
    checks = correctness.get("checks", [])
    counts = {s: sum(c["status"] == s for c in checks) for s in ("pass", "fail", "error", "skipped")}
    failed = [c["id"] for c in checks if c["status"] in ("fail", "error")]
    if failed:
        text = f"{len(failed)} correctness check(s) FAILED: {', '.join(failed)}"
    else:
        text = f"all {counts['pass']} correctness checks passed ({counts['skipped']} skipped)"
    return {"ok": not failed and counts["pass"] > 0, "counts": counts, "failed": failed, "text": text}


# --- main -------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the whole script on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default $OUT, else {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time bound of the run (default 420 s)")
    parser.add_argument(
        "--correctness-budget-s", type=float, default=150.0, help="at most this for section 1 (default 150 s)"
    )
    parser.add_argument("--steps", type=int, default=None, help="correctness steps per fit (default 6; dry run 3)")
    parser.add_argument("--presets", nargs="+", default=None, help=f"cost presets (default {' '.join(GPU_PRESETS)})")
    parser.add_argument(
        "--cost-precision", choices=PRECISIONS, default="bf16-mixed", help="Trainer precision of the cost section"
    )
    parser.add_argument(
        "--cost-steps",
        type=int,
        default=None,
        help=f"timed steps per method, a multiple of LookSAM's k={LOOKSAM_K} (default 20; dry run 5)",
    )
    parser.add_argument("--cost-warmup", type=int, default=None, help="untimed steps per fit (default 3; dry run 1)")
    parser.add_argument("--cost-batch-size", type=int, default=None, help="override the presets' batch (dry run 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all; dry run 1)")
    parser.add_argument("--skip-cost", action="store_true", help="run the correctness section only")
    parser.add_argument("--skip-sharded", action="store_true", help="leave out section 3 (FSDP2 causal LM)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (3 if dry else CheckSetup.steps)
    args.cost_steps = args.cost_steps or (LOOKSAM_K if dry else 4 * LOOKSAM_K)
    args.cost_warmup = args.cost_warmup if args.cost_warmup is not None else (1 if dry else 3)
    args.presets = args.presets or ([DRY_RUN_PRESET] if dry else list(GPU_PRESETS))
    if dry:
        args.cost_batch_size = args.cost_batch_size or 4
        args.threads = args.threads or 1
        args.cost_precision = "32-true" if args.cost_precision == "bf16-mixed" else args.cost_precision
    if args.steps < 2 + CheckSetup.overflow_step:
        parser.error(f"--steps must be >= {2 + CheckSetup.overflow_step} (the overflow step and one after it)")
    if args.cost_steps < 1 or args.cost_steps % LOOKSAM_K:
        parser.error(f"--cost-steps must be a positive multiple of LookSAM's k = {LOOKSAM_K}")
    unknown = [name for name in args.presets if name not in _load_bench().PRESETS]
    if unknown:
        parser.error(f"--presets: unknown preset(s) {', '.join(unknown)}; expected {', '.join(_load_bench().PRESETS)}")
    if args.budget_s <= 0 or args.correctness_budget_s <= 0:
        parser.error("--budget-s and --correctness-budget-s must be > 0")
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device is available; run with --dry-run to check the script on the CPU")
    args.device = "cpu" if dry else "cuda"
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT
    return args


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run the check; writes ``gpu_check_<device>.json`` and ``.md``; returns the exit status."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--bench-child"]:
        _quiet()
        bench_child(raw[1:])
        return 0
    args = parse_args(raw)
    _quiet()
    started = time.perf_counter()
    total = Deadline(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    info = machine_info(args.device)
    tag = device_tag(info, args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = CheckSetup(steps=args.steps)

    print(f"[gpu_check] correctness on {args.device} (budget {args.correctness_budget_s:.0f} s)", flush=True)
    correctness_deadline = Deadline(min(args.correctness_budget_s, total.left()))
    try:
        correctness = run_correctness(args.device, setup, correctness_deadline, args.dry_run)
    except Exception as exc:
        correctness = {"device": args.device, "reason": "error: " + _error(exc), "checks": []}
        correctness["checks"].append({"id": "correctness", "kind": "section", "status": "error", "reason": _error(exc)})
    for check in correctness["checks"]:
        print(f"[gpu_check] {check['id']:<28} {check['status']:<7} {check.get('reason', '')[:150]}", flush=True)

    if args.skip_cost:
        cost: dict[str, Any] = {"reason": "skipped: --skip-cost"}
    else:
        print(f"[gpu_check] cost: {', '.join(args.presets)} ({total.left():.0f} s left)", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the bench subprocesses share the GPU with this process
        try:
            reserve = 0.0 if args.skip_sharded else SHARDED_RESERVE_S
            cost = run_cost(args.presets, args, args.out, Deadline(max(1.0, total.left() - reserve)), tag)
        except Exception as exc:
            cost = {"reason": "error: " + _error(exc)}
        for preset, entry in cost.get("presets", {}).items():
            print(f"[gpu_check] cost {preset:<14} {entry['status']} {entry.get('reason', '')[:300]}", flush=True)

    if args.skip_sharded:
        sharded: dict[str, Any] = {"reason": "skipped: --skip-sharded"}
    else:
        print(f"[gpu_check] sharded causal LM ({total.left():.0f} s left)", flush=True)
        try:
            sharded = run_sharded(args, args.out, total)
        except Exception as exc:
            sharded = {"reason": "error: " + _error(exc)}
        print(f"[gpu_check] sharded {sharded.get('reason', 'done')}", flush=True)

    report: dict[str, Any] = {
        "check": "gpu_check",
        "mode": "dry-run" if args.dry_run else "gpu",
        "command": "python experiments/gpu_check.py " + " ".join(raw),
        "budget_s": args.budget_s,
        "machine": info,
        "correctness": correctness,
        "cost": cost,
        "sharded": sharded,
        "verdict": verdict_of(correctness),
        "out": args.out,
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = markdown(report)
    text += "\n## 3. Sharded causal LM (FSDP2, one rank)\n\n" + (
        f"`{sharded['command']}`\n\n{sharded['table']}" if "table" in sharded else f"{sharded['reason']}\n"
    )
    del report["out"]
    (args.out / f"gpu_check_{tag}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / f"gpu_check_{tag}.md").write_text(text)
    print(text, flush=True)
    print(f"[gpu_check] wrote {args.out / f'gpu_check_{tag}.json'} and .md", flush=True)
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
