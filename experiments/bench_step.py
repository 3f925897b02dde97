"""Step-cost benchmark: every method on the same real Lightning step, interleaved step by step in one process.

For one model and batch shape (a *preset*), each method trains with a real ``lightning.Trainer`` (its
callback on the Trainer, a ``SharpnessAwareMixin`` module from the library, synthetic inputs of the preset's
shape) and the wall time of each optimizer step is recorded (``on_train_batch_start`` to
``on_train_batch_end``: both passes, ascent, restore, optimizer step, sampler update and logging; data
loading excluded; CUDA synchronised at both ends on a GPU).

Interleaving (``--interleave step``, the default): every method's ``Trainer.fit`` runs in its own thread and
a baton lets exactly one of them compute at a time, one optimizer step each in turn (the order rotated every
cycle), so consecutive steps of different methods are seconds apart and machine-load drift hits them alike.
``--interleave fit`` instead runs one fit per method after another, the order rotated every round (less
memory: one model alive at a time). ``--rounds`` repeats the whole thing with fresh fits; ``--warmup``
steps at the start of every fit are not timed.

Reported per method: median and mean step time and their ratios to ``base`` and ``sam``; the *paired*
ratio (median over timed steps of ``t_method[i] / t_base[i]``, the i-th steps of the two methods ran in
the same cycle) with its interquartile range; peak memory; the mean active-parameter ratio of pass 1 and of
pass 2 (0 on one-pass steps); the mean forward+backward passes per step.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over a fit of ``--memory-steps`` steps run alone
after the timing (weights, gradients, optimizer state, activations). On the CPU, a fresh subprocess per
method builds the model and the data, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5),
notes its RSS, runs ``--memory-steps`` steps (default 3, the first included) in a Trainer and reports the
peak RSS growth (``VmHWM`` minus the RSS just before fit, MiB); where the counter cannot be reset, the growth
of ``getrusage(RUSAGE_SELF).ru_maxrss``.

Examples::

    python experiments/bench_step.py --preset vit_small_64px                 # every method, CPU
    python experiments/bench_step.py --preset resnet20_cifar --methods base sam slsam slsam:arms=block
    python experiments/bench_step.py --preset vit_small --device cuda --steps 20
    python experiments/bench_step.py --preset vit_small_64px --methods base sam slsam --profile slsam

Methods are named as everywhere else: the method's name (``conf/method/<name>.yaml``: ``base sam asam ssam_f
ssam_d lagnp arsam looksam rst slsam slsam_uniform slsam_noisy msam sparse_msam``), optionally followed by ``:`` and
arguments of its callback, ``NAME:key=value,key=value`` (``slsam:sparsity=0.5,arms=block,top_fraction=0.5``,
``slsam:norm_scale=running_mean``, ``slsam:reuse_prefix=false``, ``slsam:always_active=[head,vectors]``); the
string is the method's label in the results. Every method runs with ``rho=0.05`` (ASAM, MSAM and sparse MSAM: their
own radius, 0.5 and 3.0) and ``seed=0`` unless the arguments say otherwise. ``all`` is every method, with SL-SAM
also at sparsity 0.5, with block arms and with the uniform sampler.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

import lightning_slsam
from lightning_slsam.lightning_adapter.callback import CALLBACKS, SharpnessAware

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "results"
DISTINCT_BATCHES = 4  # synthetic batches cycled through (the same tensors every fit)
MEMORY_STEPS = 3  # default steps of a memory measurement (the first included), as in the reference protocol


# --- presets ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A model and an input shape. ``build(batch_size)`` returns ``(module factory, batches)``."""

    name: str
    description: str
    batch_size: int
    build: Callable[[int, torch.Generator], tuple[Callable[[], pl.LightningModule], list[Any]]]


def _adamw(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


def _image_preset(
    arch: str, image_size: int, patch_size: int = 16, num_classes: int = 10
) -> Callable[[int, torch.Generator], tuple[Callable[[], pl.LightningModule], list[Any]]]:
    def build(batch_size: int, generator: torch.Generator) -> tuple[Callable[[], pl.LightningModule], list[Any]]:
        from lightning_slsam.models import Classifier
        from lightning_slsam.models.factory import build_network

        def make() -> pl.LightningModule:
            net = build_network(arch, num_classes, image_size=image_size, patch_size=patch_size)
            return Classifier(net, num_classes=num_classes, optimizer=_adamw(1e-4))

        batches = [
            (
                torch.randn(batch_size, 3, image_size, image_size, generator=generator),
                torch.randint(0, num_classes, (batch_size,), generator=generator),
            )
            for _ in range(DISTINCT_BATCHES)
        ]
        return make, batches

    return build


@functools.cache
def _random_bert_base() -> str:
    """A folder with a randomly initialised BERT-base classifier (no download; cost does not need weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = Path(tempfile.mkdtemp(prefix="bench_bert_base_"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(num_labels=2)).save_pretrained(folder)
    return str(folder)


def _text_preset(
    model: str, seq_len: int
) -> Callable[[int, torch.Generator], tuple[Callable[[], pl.LightningModule], list[Any]]]:
    def build(batch_size: int, generator: torch.Generator) -> tuple[Callable[[], pl.LightningModule], list[Any]]:
        from lightning_slsam.models import TextClassifier
        from lightning_slsam.models.text_classifier import minilm_path

        path = minilm_path() if model == "minilm" else _random_bert_base()

        def make() -> pl.LightningModule:
            return TextClassifier(path, num_labels=2, optimizer=_adamw(2e-5))

        vocab = 30522  # BERT's uncased vocabulary; MiniLM-L6 shares it
        batches = [
            {
                "input_ids": torch.randint(1000, vocab, (batch_size, seq_len), generator=generator),
                "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (batch_size,), generator=generator),
            }
            for _ in range(DISTINCT_BATCHES)
        ]
        return make, batches

    return build


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "resnet50",
            "torchvision ResNet-50, 224x224, 1000 classes",
            64,
            _image_preset("resnet50", 224, num_classes=1000),
        ),
        Preset(
            "vit_small",
            "ViT-S/16 (12 layers, 6 heads, width 384), 224x224, 100 classes",
            64,
            _image_preset("vit_small", 224, 16, 100),
        ),
        Preset("bert_base", "BERT-base (random init), sequence 128, 2 labels", 32, _text_preset("bert_base", 128)),
        Preset(
            "vit_small_64px",
            "ViT-S shape (12 layers, 6 heads, width 384), 64x64, patch 8, 10 classes",
            32,
            _image_preset("vit_small", 64, 8, 10),
        ),
        Preset("resnet20_cifar", "ResNet-20 (CIFAR), 32x32, 10 classes", 128, _image_preset("resnet20_cifar", 32)),
        Preset(
            "minilm_seq64",
            "all-MiniLM-L6-v2 (6 layers, width 384, pretrained), sequence 64, 2 labels",
            32,
            _text_preset("minilm", 64),
        ),
        Preset(
            "minilm_seq48",
            "all-MiniLM-L6-v2 (6 layers, width 384, pretrained), sequence 48, 2 labels (the sst2_noisy task's shape)",
            32,
            _text_preset("minilm", 48),
        ),
    )
}


# --- methods ----------------------------------------------------------------------------------------------------
#: methods whose radius is on a scale of its own (their configs do not read the global ``rho``): their default stays
OWN_RADIUS: tuple[str, ...] = ("asam", "msam", "sparse_msam")
#: named variants of a method that have their own config file (``conf/method/slsam_uniform.yaml``)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"slsam_uniform": ("slsam", {"sampler": "uniform"})}
#: ``all``: every registered method, and SL-SAM at sparsity 0.5, with block arms and with the uniform sampler
ALL_METHODS = (*CALLBACKS, "slsam:sparsity=0.5", "slsam:arms=block", "slsam_uniform")
_ARGUMENT_SPLIT = re.compile(r",(?![^\[]*\])")  # commas outside [...]


def _value(text: str) -> Any:
    """A command-line value: a number, true/false, null, a [list] of values, else the string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_value(item) for item in text[1:-1].split(",") if item.strip()]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method(label: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:key=value,...]`` -> (method name, callback arguments); the names of the methods' configs."""
    name, _, arguments = label.partition(":")
    known = sorted({*CALLBACKS, *VARIANTS})
    if name not in known:
        raise ValueError(
            f"--methods: unknown method {label!r}; expected NAME[:key=value,...] with NAME one of {', '.join(known)}, "
            "or 'all'"
        )
    base, kwargs = VARIANTS.get(name, (name, {}))
    kwargs = dict(kwargs)
    if name not in OWN_RADIUS and "rho" in CALLBACKS[base].options_class.field_names():
        kwargs["rho"] = 0.05
    if "seed" in CALLBACKS[base].options_class.field_names():
        kwargs["seed"] = 0
    for item in _ARGUMENT_SPLIT.split(arguments) if arguments else []:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--methods: {label!r}: expected key=value after ':', got {item!r}")
        kwargs[key.strip()] = _value(value)
    return base, kwargs


def make_callback(label: str) -> SharpnessAware:
    """The callback of a method label (see the module docstring); bad arguments fail here, naming the key."""
    name, kwargs = parse_method(label)
    try:
        return CALLBACKS[name](**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--methods: {label!r}: {error}") from error


def describe_method(label: str) -> str:
    """The method's first docstring line and the arguments that differ from its defaults."""
    callback = make_callback(label)  # the one parse of the label
    options = callback.options
    summary = (type(options).__doc__ or options.name).strip().splitlines()[0].rstrip(".")
    defaults = type(options)().as_dict()
    changed = [f"{k}={v}" for k, v in options.as_dict().items() if v != defaults[k] and k != "seed"]
    changed += [f"arms={callback.arms}"] if callback.arms != type(options).default_arms else []
    changed += [] if callback.reuse_prefix else ["reuse_prefix=False"]
    return summary + (f" ({', '.join(changed)})" if changed else "")


def expand_methods(names: list[str]) -> list[str]:
    methods: list[str] = []
    for name in names:
        for item in ALL_METHODS if name == "all" else (name,):
            make_callback(item)  # validates the name
            if item not in methods:
                methods.append(item)
    return methods


# --- the measured fit -------------------------------------------------------------------------------------------
class _Batches(Dataset):
    """``length`` items cycling through prepared batches (``DataLoader(batch_size=None)``: no collation)."""

    def __init__(self, batches: list[Any], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batches[index % len(self.batches)]


class Baton:
    """Lets exactly one of several threads run at a time, each in turn; the turn order rotates every cycle.

    A thread ``wait``s for its first turn, ``pass_and_wait``s at the start of each of its steps (so everything
    between two of its step starts runs while it holds the baton) and ``finish``es when its fit is over.
    """

    def __init__(self, names: list[str]) -> None:
        self.active = list(names)
        self.cycle = 0
        self.pending = list(names)
        self.current: str | None = self.pending.pop(0)
        self.condition = threading.Condition()

    def _advance(self) -> None:
        if not self.pending and self.active:
            self.cycle += 1
            shift = self.cycle % len(self.active)
            self.pending = self.active[shift:] + self.active[:shift]
        self.current = self.pending.pop(0) if self.pending else None
        self.condition.notify_all()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.current == name)

    def pass_and_wait(self, name: str) -> None:
        with self.condition:
            if self.current != name:
                raise RuntimeError(f"baton: {name} ran without holding the baton (held by {self.current})")
            self._advance()
            self.condition.wait_for(lambda: self.current == name)

    def finish(self, name: str) -> None:
        with self.condition:
            self.active.remove(name)
            if name in self.pending:
                self.pending.remove(name)
            if self.current == name:
                self._advance()


class StepRecorder(pl.Callback):
    """Per optimizer step: wall time, passes and active-parameter ratios (from the method callback's counters).

    Time covers ``on_train_batch_start`` to ``on_train_batch_end`` (the whole mixin step: both passes, the
    ascent, restore, optimizer step, bandit and logging), with a CUDA synchronisation at both ends on a GPU.
    With a baton, each step starts by handing the baton on and waiting for the next turn.
    """

    def __init__(
        self, method: SharpnessAware, warmup: int, name: str, baton: Baton | None = None, profile: bool = False
    ) -> None:
        self.method = method
        self.warmup = warmup
        self.name = name
        self.baton = baton
        self.records: list[dict[str, float]] = []
        self.profile = profile
        self.profiler: torch.profiler.profile | None = None
        self._start = 0.0
        self._counters: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _counts(self) -> tuple[float, float, float]:
        m = self.method
        return (m.record.active_ratio_sum, m.record.active_ratio2_sum, float(m.record.passes_sum))

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        if self.baton is not None:
            self.baton.pass_and_wait(self.name)
        self._counters = self._counts()
        if self.profile and trainer.global_step == self.warmup:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.strategy.root_device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        elapsed = time.perf_counter() - self._start
        if self.profiler is not None and trainer.global_step == self.warmup + 1:
            self.profiler.__exit__(None, None, None)
        ratio1, ratio2, passes = (now - before for now, before in zip(self._counts(), self._counters, strict=True))
        if trainer.global_step > self.warmup:  # global_step counts finished optimizer steps
            self.records.append(
                {"time_s": elapsed, "active_ratio": ratio1, "active_ratio_pass2": ratio2, "passes": passes}
            )


@dataclass
class Fit:
    """A Trainer, module and data ready to ``run``, and the recorder of its steps."""

    trainer: pl.Trainer
    module: pl.LightningModule
    loader: DataLoader
    recorder: StepRecorder

    def run(self) -> list[dict[str, float]]:
        self.trainer.fit(self.module, train_dataloaders=self.loader)
        expected = self.trainer.max_steps - self.recorder.warmup
        if len(self.recorder.records) != expected:
            got = len(self.recorder.records)
            raise RuntimeError(f"{self.recorder.name}: expected {expected} timed steps, recorded {got}")
        return self.recorder.records


def prepare_fit(
    make_module: Callable[[], pl.LightningModule],
    batches: list[Any],
    method: str,
    warmup: int,
    steps: int,
    device: str,
    precision: str,
    baton: Baton | None = None,
    profile: bool = False,
) -> Fit:
    """A fresh module (seeded) and Trainer for ``warmup + steps`` optimizer steps of ``method``."""
    torch.manual_seed(0)
    module = make_module()
    callback = make_callback(method)
    recorder = StepRecorder(callback, warmup, method, baton, profile)
    total = warmup + steps
    loader = DataLoader(_Batches(batches, total), batch_size=None, shuffle=False, num_workers=0)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=total,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[callback, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Fit(trainer, module, loader, recorder)


def run_interleaved(
    make_module: Callable[[], pl.LightningModule],
    batches: list[Any],
    methods: list[str],
    args: argparse.Namespace,
) -> dict[str, list[dict[str, float]]]:
    """One fit per method, each in a thread, one optimizer step at a time in turn (see :class:`Baton`)."""
    baton = Baton(methods)
    fits = {
        m: prepare_fit(make_module, batches, m, args.warmup, args.steps, args.device, args.precision, baton)
        for m in methods
    }
    errors: dict[str, BaseException] = {}

    def worker(method: str) -> None:
        torch.set_num_threads(args.threads)  # OpenMP's thread count is per calling thread
        baton.wait(method)
        try:
            fits[method].run()
        except BaseException as error:
            errors[method] = error
        finally:
            baton.finish(method)

    threads = [threading.Thread(target=worker, args=(m,), name=f"bench-{m}", daemon=True) for m in methods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        method, error = next(iter(errors.items()))
        raise RuntimeError(f"{method} failed during the interleaved fits: {error!r}") from error
    return {m: fits[m].recorder.records for m in methods}


def run_sequential(
    make_module: Callable[[], pl.LightningModule],
    batches: list[Any],
    methods: list[str],
    args: argparse.Namespace,
    round_index: int,
) -> dict[str, list[dict[str, float]]]:
    """One fit per method, one after another, the order rotated by ``round_index``."""
    shift = round_index % len(methods)
    out = {}
    for method in methods[shift:] + methods[:shift]:
        fit = prepare_fit(make_module, batches, method, args.warmup, args.steps, args.device, args.precision)
        out[method] = fit.run()
        del fit
    return {m: out[m] for m in methods}


def cuda_peak_memory(
    make_module: Callable[[], pl.LightningModule], batches: list[Any], method: str, args: argparse.Namespace
) -> float:
    """``torch.cuda.max_memory_allocated`` (MiB) over a fit of ``--memory-steps`` steps run alone."""
    gc.collect()
    torch.cuda.empty_cache()
    fit = prepare_fit(make_module, batches, method, 0, args.memory_steps, "cuda", args.precision)
    torch.cuda.reset_peak_memory_stats()
    fit.run()
    peak = torch.cuda.max_memory_allocated() / 2**20
    del fit
    gc.collect()
    torch.cuda.empty_cache()
    return peak


# --- CPU memory in a fresh process --------------------------------------------------------------------------------
def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _max_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PeakRssGrowth:
    """This process's peak RSS growth (MiB) from construction on: ``VmHWM`` after resetting the kernel's counter
    minus the RSS then, or, where the counter cannot be reset, the growth of ``ru_maxrss``."""

    def __init__(self) -> None:
        self.reset = _reset_peak_rss()
        self.rss_before = _proc_status_mib("VmRSS")
        self.maxrss_before = _max_rss_mib()

    def read(self) -> dict[str, Any]:
        """``peak_rss_growth_mib`` and ``how`` it was measured (with ``rss_before_mib`` where the counter reset)."""
        hwm = _proc_status_mib("VmHWM")
        if self.reset and hwm is not None and self.rss_before is not None:
            return {
                "peak_rss_growth_mib": hwm - self.rss_before,
                "rss_before_mib": self.rss_before,
                "how": "VmHWM after clear_refs minus VmRSS before fit",
            }
        return {"peak_rss_growth_mib": _max_rss_mib() - self.maxrss_before, "how": "ru_maxrss growth during fit"}


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: peak RSS growth (MiB) over ``--memory-steps`` steps of one method, from just before fit."""
    preset = PRESETS[args.preset]
    make_module, batches = preset.build(args.batch_size or preset.batch_size, torch.Generator().manual_seed(0))
    fit = prepare_fit(make_module, batches, args.memory_child, 0, args.memory_steps, "cpu", args.precision)
    gc.collect()
    growth = PeakRssGrowth()
    fit.run()
    return growth.read()


def measure_cpu_memory(args: argparse.Namespace, method: str) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--preset",
        args.preset,
        "--memory-child",
        method,
        "--memory-steps",
        str(args.memory_steps),
        "--threads",
        str(args.threads),
        "--precision",
        args.precision,
    ]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess for {method} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- machine and summary ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info(device: str, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores_available": available_cores(),
        "torch_threads": threads,
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "lightning_slsam": lightning_slsam.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_tag(info: dict[str, Any]) -> str:
    name = info["gpu"] if info["device"] == "cuda" else f"{info['cpu']}-{info['torch_threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0], values[0], values[0])
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q1, q2, q3)


def summarise(method: str, rounds: list[list[dict[str, float]]]) -> dict[str, Any]:
    """Statistics of one method's timed steps (``rounds``: the records of each round)."""
    records = [r for rnd in rounds for r in rnd]
    times = [r["time_s"] for r in records]
    # a method whose steps differ in passes (LookSAM, ARSAM, RST) costs its mean over whole periods; a median
    # of a few steps can miss its two-pass steps entirely
    varying = len({r["passes"] for r in records}) > 1
    return {
        "cost_statistic": "mean" if varying else "median",
        "cost_step_s": statistics.fmean(times) if varying else statistics.median(times),
        "method": method,
        "description": describe_method(method),
        "steps_timed": len(times),
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.fmean(times),
        "min_step_s": min(times),
        "round_medians_s": [statistics.median(r["time_s"] for r in rnd) for rnd in rounds],
        "active_ratio_pass1": statistics.fmean(r["active_ratio"] for r in records),
        "active_ratio_pass2": statistics.fmean(r["active_ratio_pass2"] for r in records),
        "passes_per_step": statistics.fmean(r["passes"] for r in records),
        "step_times_s": [[r["time_s"] for r in rnd] for rnd in rounds],
    }


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Ratios of every method to ``base`` and ``sam`` (when they ran): medians, means, paired steps, memory."""
    for ref_name in ("base", "sam"):
        ref = results.get(ref_name)
        if ref is None:
            continue
        for row in results.values():
            row[f"median_vs_{ref_name}"] = row["median_step_s"] / ref["median_step_s"]
            row[f"mean_vs_{ref_name}"] = row["mean_step_s"] / ref["mean_step_s"]
            # like with like: a method whose steps vary is compared mean to mean (load spikes raise every mean)
            if "mean" in (row["cost_statistic"], ref["cost_statistic"]):
                row[f"cost_vs_{ref_name}"] = row["mean_step_s"] / ref["mean_step_s"]
            else:
                row[f"cost_vs_{ref_name}"] = row["median_step_s"] / ref["median_step_s"]
            paired = [
                t / t_ref
                for rnd, rnd_ref in zip(row["step_times_s"], ref["step_times_s"], strict=True)
                for t, t_ref in zip(rnd, rnd_ref, strict=True)
            ]
            row[f"paired_vs_{ref_name}_quartiles"] = list(_quartiles(paired))
            per_round = [m / b for m, b in zip(row["round_medians_s"], ref["round_medians_s"], strict=True)]
            row[f"round_ratio_range_vs_{ref_name}"] = [min(per_round), max(per_round)]
            if row.get("peak_memory_mib") is not None and ref.get("peak_memory_mib"):
                row[f"memory_vs_{ref_name}"] = row["peak_memory_mib"] / ref["peak_memory_mib"]


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(record: dict[str, Any]) -> str:
    info, config = record["machine"], record["config"]
    where = info.get("gpu") if info["device"] == "cuda" else f"{info['cpu']}, {info['torch_threads']} torch threads"
    memory_what = (
        f"CUDA max allocated over {config['memory_steps']} steps (MiB)"
        if info["device"] == "cuda"
        else f"peak RSS growth over the first {config['memory_steps']} steps in a fresh process (MiB)"
    )
    interleave = "step by step (one thread per fit, a baton)" if config["interleave"] == "step" else "fit by fit"
    lines = [
        f"### `{config['preset']}`: {config['preset_description']}, batch {config['batch_size']}",
        "",
        f"Machine: {where} ({info['device']}); torch {info['torch']}, lightning {info['lightning']}; "
        f"{info['date']}; load average at start {info.get('load_average_at_start', '-')}. "
        f"{config['rounds']} round(s) x {config['steps']} timed steps per method after {config['warmup']} warm-up "
        f"step(s) per fit, methods interleaved {interleave}, order rotated; precision {config['precision']}; "
        f"{config['wall_s']:.0f} s wall. Memory: {memory_what}.",
        "",
        "| method | median step (ms) | x base | x SAM | paired x base (IQR) | mean x base | cost x SAM | "
        "peak mem (MiB) | mem x base | active pass 1 | active pass 2 | passes/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["results"].values():
        paired = row.get("paired_vs_base_quartiles")
        paired_text = "-" if paired is None else f"{paired[1]:.2f} ({paired[0]:.2f}-{paired[2]:.2f})"
        lines.append(
            f"| `{row['method']}` | {row['median_step_s'] * 1000:.0f} | {_fmt(row.get('median_vs_base'))} | "
            f"{_fmt(row.get('median_vs_sam'))} | {paired_text} | {_fmt(row.get('mean_vs_base'))} | "
            f"{_fmt(row.get('cost_vs_sam'))}{'*' if row.get('cost_statistic') == 'mean' else ''} | "
            f"{_fmt(row.get('peak_memory_mib'), '.0f')} | {_fmt(row.get('memory_vs_base'))} | "
            f"{row['active_ratio_pass1']:.3f} | {row['active_ratio_pass2']:.3f} | {row['passes_per_step']:.2f} |"
        )
    lines += [
        "",
        "Cost x SAM: the median step time's ratio, or (*) the ratio of the means for a method whose steps differ in "
        "passes (LookSAM, ARSAM, RST), timed over whole periods.",
    ]
    lines += ["", "Methods: " + "; ".join(f"`{r['method']}` {r['description']}" for r in record["results"].values())]
    for name, table in record.get("profiles", {}).items():
        lines += [
            "",
            f"Profile of one `{name}` step (after warm-up), top ops by self time:",
            "",
            "```",
            table.rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit_small_64px")
    parser.add_argument("--methods", nargs="+", default=["all"], help="method names, or 'all' (default)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every fit (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions with fresh fits (default 1)")
    parser.add_argument(
        "--interleave",
        choices=("step", "fit"),
        default="step",
        help="step: fits in threads, one step each in turn (default); fit: one fit after another",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="32-true", help="Trainer precision (default 32-true)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    parser.add_argument(
        "--memory",
        choices=("auto", "off"),
        default="auto",
        help="auto: CUDA max allocated, or a fresh subprocess per method on the CPU; off: skip",
    )
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=MEMORY_STEPS,
        help=f"steps of a memory measurement, the first included (default {MEMORY_STEPS})",
    )
    parser.add_argument("--profile", nargs="*", default=[], help="methods to profile for one step (torch.profiler)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (JSON and markdown)")
    parser.add_argument("--tag", default=None, help="file-name tag (default: <preset>_<machine>)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps % 5:
        warnings.warn(
            f"--steps {args.steps} is not a multiple of 5: LookSAM's and ARSAM's periods (5 steps) are cut, so their "
            "mean step time over- or under-counts their two-pass steps",
            stacklevel=2,
        )
    for key, minimum in (("steps", 1), ("warmup", 0), ("rounds", 1), ("memory_steps", 1)):
        if getattr(args, key) < minimum:
            parser.error(f"--{key.replace('_', '-')} must be >= {minimum}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is None:
        args.threads = available_cores()
    return args


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the record also written to ``<out>/step_<tag>.json`` and ``.md``."""
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        result = memory_child(args)
        print(json.dumps(result), flush=True)
        return result
    methods = expand_methods(args.methods)
    profile = expand_methods(args.profile) if args.profile else []
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset.batch_size
    make_module, batches = preset.build(batch_size, torch.Generator().manual_seed(0))
    if args.device == "cuda":
        batches = [pl.utilities.move_data_to_device(b, "cuda") for b in batches]  # no copy inside the timed step
    info = machine_info(args.device, args.threads)
    started = time.perf_counter()

    rounds: dict[str, list[list[dict[str, float]]]] = {m: [] for m in methods}
    for round_index in range(args.rounds):
        if args.interleave == "step":
            measured = run_interleaved(make_module, batches, methods, args)
        else:
            measured = run_sequential(make_module, batches, methods, args, round_index)
        for method in methods:
            rounds[method].append(measured[method])
            median_ms = statistics.median(r["time_s"] for r in measured[method]) * 1000
            print(f"[round {round_index + 1}/{args.rounds}] {method:<20} median {median_ms:8.1f} ms", flush=True)

    results = {m: summarise(m, rounds[m]) for m in methods}
    for method in methods:
        if args.memory == "off":
            results[method]["peak_memory_mib"] = None
        elif args.device == "cuda":
            results[method]["peak_memory_mib"] = cuda_peak_memory(make_module, batches, method, args)
            results[method]["memory_how"] = f"torch.cuda.max_memory_allocated over {args.memory_steps} steps"
        else:
            measured_memory = measure_cpu_memory(args, method)
            results[method]["peak_memory_mib"] = measured_memory["peak_rss_growth_mib"]
            results[method]["memory_how"] = measured_memory["how"]
        if results[method]["peak_memory_mib"] is not None:
            print(f"[memory] {method:<20} {results[method]['peak_memory_mib']:8.0f} MiB", flush=True)
    add_ratios(results)

    profiles: dict[str, str] = {}
    for method in profile:
        fit = prepare_fit(
            make_module, batches, method, max(args.warmup, 1), 1, args.device, args.precision, profile=True
        )
        fit.run()
        assert fit.recorder.profiler is not None
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        profiles[method] = fit.recorder.profiler.key_averages().table(
            sort_by=sort, row_limit=25, max_name_column_width=48
        )
        print(f"[profile] {method}\n{profiles[method]}", flush=True)

    record = {
        "benchmark": "bench_step",
        "config": {
            "preset": args.preset,
            "preset_description": preset.description,
            "batch_size": batch_size,
            "methods": methods,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "interleave": args.interleave,
            "precision": args.precision,
            "memory": args.memory,
            "memory_steps": args.memory_steps,
            "command": "python experiments/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "machine": info,
        "results": results,
        "profiles": profiles,
    }
    tag = args.tag or f"{args.preset}_{machine_tag(info)}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"step_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"step_{tag}.md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
