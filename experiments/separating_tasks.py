"""Tasks where SAM beats AdamW, and every method on them: run the sweep, summarise it, write the report.

Three subcommands, each one exact command in ``docs/results.md``:

    python experiments/separating_tasks.py run --task digits_noisy --methods base sam slsam slsam_noisy \\
        --lrs 1e-3 3e-3 --seeds 0 1 2 --jobs 2 --out multirun/separating/digits_noisy
    python experiments/separating_tasks.py summarize multirun/separating/digits_noisy \\
        --out experiments/results/separating/digits_noisy.json
    python experiments/separating_tasks.py report experiments/results/separating/digits_noisy.json \\
        --bench experiments/results/step_resnet20_cifar_digits_amd-epyc-2t.json --assets docs/assets/results/separating

``run`` starts ``slsam-train`` once per (method, learning rate, seed), ``--jobs`` at a time with the cores split
between them (``OMP_NUM_THREADS``); a run whose ``result.json`` exists is skipped, so an interrupted sweep
resumes. The per-run folders (Hydra output, logs) stay out of git. ``summarize`` keeps what the report needs
from each run (best and final validation accuracy, the validation curve per epoch, counters, a downsampled
sampling-probability history with arm names, and whether the run diverged: see ``divergence``) in one JSON file,
which is committed. ``report`` picks each method's best learning rate (highest mean accuracy over seeds, diverged
runs included), says how many of the rates tried had diverged runs, and writes the markdown tables
(equal steps: mean ± std over seeds; equal time: accuracy at the time budget of base's run, with each method's
step time taken from the interleaved step benchmark ``--bench``, never from the sweep's own clock, which
shares the cores with other runs) and the figures: accuracy against time, and the per-arm probability heatmap.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

#: the base overrides of each task (``slsam-train`` keys); method and learning rate are added per run
TASKS: dict[str, list[str]] = {
    # ResNet-20 (CIFAR-10 weights) on 1,000 digits with 40% of the labels replaced at random; 359 clean
    # validation images; long enough that AdamW fits the noise
    "digits_noisy": [
        "experiment=digits_resnet20",
        "data.train_limit=1000",
        "data.label_noise=0.4",
        "trainer.max_epochs=20",
        "scheduler=cosine",
        "rho=0.3",
    ],
    # MiniLM on 1,000 SST-2 sentences with 30% of the labels flipped; the full 872-sentence dev set
    "sst2_noisy": [
        "experiment=sst2_minilm",
        "data.path=../shared/data/sst2",
        "data.train_limit=1000",
        "data.label_noise=0.3",
        "trainer.max_epochs=6",
        "data.max_length=48",
        "rho=0.05",
    ],
    # the clean counterparts (issue 23: does a method hold where no label is wrong?): the CIFAR-10 ResNet-20 on 300
    # clean digits, 10 epochs (50 steps of 64), cosine schedule, the digits experiment's rho 0.05
    "digits_clean": [
        "experiment=digits_resnet20",
        "data.train_limit=300",
        "data.label_noise=0",
        "trainer.max_epochs=10",
        "scheduler=cosine",
        "rho=0.05",
    ],
    # the paper's schedule length on the clean vision task: the same 300 clean digits for 30 epochs (150 steps of 64)
    # at smaller rates, so that a method is judged at the schedule users of the paper run as well as a short one
    "digits_clean_long": [
        "experiment=digits_resnet20",
        "data.train_limit=300",
        "data.label_noise=0",
        "trainer.max_epochs=30",
        "scheduler=cosine",
        "rho=0.05",
    ],
    # few examples: the same network on 100 clean digits (about 10 a class) for 30 epochs (60 steps, the second batch
    # of each epoch 36 images), the place where SAM is most likely to separate from AdamW without label noise
    "digits_clean_few": [
        "experiment=digits_resnet20",
        "data.train_limit=100",
        "data.label_noise=0",
        "trainer.max_epochs=30",
        "scheduler=cosine",
        "rho=0.05",
    ],
    # MiniLM on 1,000 clean SST-2 sentences, 4 epochs (128 steps of 32); the data path is absolute so that any
    # checkout under /work finds it
    "sst2_clean": [
        "experiment=sst2_minilm",
        "data.path=/work/shared/data/sst2",
        "data.train_limit=1000",
        "data.label_noise=0",
        "trainer.max_epochs=4",
        "data.max_length=48",
        "rho=0.05",
    ],
}

#: chance accuracy of each task's validation set (a model that answers one class): digits has 10 balanced
#: classes, SST-2's dev set is 444 positive of 872 sentences
CHANCE: dict[str, float] = {
    "digits_noisy": 0.1,
    "digits_clean": 0.1,
    "digits_clean_long": 0.1,
    "digits_clean_few": 0.1,
    "sst2_noisy": 444 / 872,
    "sst2_clean": 444 / 872,
}

#: a run has diverged when its last validation accuracy is this far (absolute) below its first epoch's ...
DIVERGENCE_DROP = 0.2
#: ... or within this much of chance (issue 23: a collapse is reported, not hidden behind the best rate)
CHANCE_MARGIN = 0.05


def divergence(run: dict[str, Any], chance: float | None) -> str | None:
    """Why ``run`` (a summary's run: ``final`` and its ``curve``) counts as diverged, or None: ``"collapsed"``
    when its last validation accuracy is at least ``DIVERGENCE_DROP`` below its first epoch's, ``"chance"`` when
    it ends within ``CHANCE_MARGIN`` of ``chance`` (None: not checked). A run that falls slowly from a high peak
    (fitting noisy labels late) but stays above its first epoch is not flagged: that is what the last-epoch
    table shows."""
    final = run["final"]
    curve = run.get("curve") or []
    if curve and curve[0]["acc"] - final >= DIVERGENCE_DROP - 1e-9:
        return "collapsed"
    if chance is not None and final <= chance + CHANCE_MARGIN:
        return "chance"
    return None


def _diverged(run: dict[str, Any], chance: float | None) -> str | None:
    """The run's flag as its summary wrote it, or computed now for summaries written before the flag existed."""
    return run["diverged"] if "diverged" in run else divergence(run, chance)


#: the method overrides of each method name of the sweep (SL-SAM's levers one at a time, all together, and the
#: shipped combination)
METHODS: dict[str, list[str]] = {
    "base": ["method=base"],
    "sam": ["method=sam"],
    "looksam": ["method=looksam"],
    "lagnp": ["method=lagnp"],
    "rst": ["method=rst"],
    "arsam": ["method=arsam"],
    "slsam": ["method=slsam"],
    "slsam_head": ["method=slsam", "method.always_active=[head]"],
    "slsam_head_vectors": ["method=slsam", "method.always_active=[head,vectors]"],
    "slsam_rm": ["method=slsam", "method.norm_scale=running_mean"],
    "slsam_all_levers": [
        "method=slsam",
        "method.always_active=[head,vectors]",
        "method.norm_scale=running_mean",
        "method.max_update_scale=5.0",
    ],
    # the update scaling alone (max_update_scale=5), and with one more lever each (the text task's probes)
    "slsam_scaled": ["method=slsam", "method.max_update_scale=5.0"],
    "slsam_scaled_rm": ["method=slsam", "method.max_update_scale=5.0", "method.norm_scale=running_mean"],
    "slsam_scaled_s05": ["method=slsam", "method.max_update_scale=5.0", "method.sparsity=0.5"],
    # the noisy-label setting (slsam_plus until it was renamed): the head and 1-D tensors always active, and the
    # update scaling
    "slsam_noisy": ["method=slsam_noisy"],
    # the controls that separate sharpness from sparsity (issue 23): the same sampler, pinned arms and update scaling
    # with no ascent at all. ``method.rho`` (not the global ``rho``, which the task sets and the method config only
    # interpolates) so that the override lands on the method whatever the task's rho is
    "slsam_rho0": ["method=slsam", "method.rho=0"],
    "slsam_noisy_rho0": ["method=slsam_noisy", "method.rho=0"],
    # candidate defaults that bound how far a sampled tensor moves per step: the update-scale cap at 2 instead of 5
    "slsam_noisy_c2": ["method=slsam_noisy", "method.max_update_scale=2.0"],
    "slsam_noisy_c2_rho0": ["method=slsam_noisy", "method.max_update_scale=2.0", "method.rho=0"],
    # and one that samples half of the tensors instead of a fifth (more of each step's update is dense)
    "slsam_noisy_s05": ["method=slsam_noisy", "method.sparsity=0.5"],
    # one pass per step: Momentum-SAM (its own radius, 3.0, not the task's rho) and its sparse form on slsam_noisy's
    # sampler and levers, with the control that runs the same sparse one-pass step without any ascent
    "msam": ["method=msam"],
    "sparse_msam": ["method=sparse_msam"],
    "sparse_msam_rho0": ["method=sparse_msam", "method.rho=0"],
    # the cheaper setting of the step benchmark: only the head pinned, so the backward pass stops above the lowest
    # sampled arm
    "sparse_msam_head": ["method=sparse_msam", "method.always_active=[head]"],
    # Momentum-SAM's radius of 3 (the authors', from-scratch training) collapses the pretrained MiniLM; 0.3 trains
    "msam_r0.3": ["method=msam", "method.rho=0.3"],
    "sparse_msam_r0.3": ["method=sparse_msam", "method.rho=0.3"],
    # slsam_noisy with AE-SAM's gate on the second pass: the ascent and pass 2 only on steps whose squared pass-1
    # norm is at least its running mean (c = 0) or half a standard deviation under it (c = -0.5)
    "slsam_noisy_gate0": ["method=slsam_noisy", "method.second_pass_gate=0"],
    "slsam_noisy_gate-0.5": ["method=slsam_noisy", "method.second_pass_gate=-0.5"],
    # the shipped default: the ascent on a fifth of the top third of the tensors and the head (pass 1's backward
    # stops at that window), a dense update: pass 2 and AdamW on every tensor. Its rho=0 control is AdamW (bitwise)
    "slsam_plus": ["method=slsam_plus"],
    # the same dense update with the ascent at every depth, slsam_noisy's pins (head and 1-D tensors): more ascent,
    # and pass 1's backward reaches the input
    "slsam_plus_full": ["method=slsam_plus", "method.always_active=[head,vectors]", "method.top_fraction=1.0"],
}


def bench_name(method: str) -> str:
    """The step benchmark's name of a sweep method (``NAME[:key=value,...]``, see ``bench_step.py``), read off its
    overrides: ``slsam_scaled_s05`` -> ``slsam:max_update_scale=5.0,sparsity=0.5``."""
    name, arguments = "", []
    for override in METHODS[method]:
        key, _, value = override.partition("=")
        if key == "method":
            name = value
        else:
            arguments.append(f"{key.removeprefix('method.')}={value}")
    return name + (":" + ",".join(arguments) if arguments else "")


def finished(folder: Path) -> bool:
    """Whether the run in ``folder`` ended: its record says so (``finished``), or, for records written before that
    key existed, its output ends with the CLI's closing line."""
    path = folder / "result.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if "finished" in record:
        return bool(record["finished"])
    output = folder / "stdout.txt"
    return output.is_file() and "(results in " in output.read_text(errors="replace")


# --- run ------------------------------------------------------------------------------------------------------------
def run_name(method: str, lr: str, seed: int) -> str:
    return f"{method}_lr{lr}_s{seed}"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    queue = [(m, lr, s) for s in args.seeds for lr in args.lrs for m in args.methods]
    running: list[tuple[subprocess.Popen, Path]] = []
    started: list[tuple[subprocess.Popen, Path]] = []
    train = [sys.executable, "-c", "from lightning_slsam.app.cli import main; main()"]
    for method, lr, seed in queue:
        folder = out / run_name(method, lr, seed)
        if finished(folder):
            continue
        while len(running) >= args.jobs:
            running = [(p, f) for p, f in running if p.poll() is None]
            time.sleep(1)
        overrides = [
            *TASKS[args.task],
            *METHODS[method],
            f"optimizer.lr={lr}",
            f"seed={seed}",
            f"method_label={method}",
            *args.extra,
            f"hydra.run.dir={folder}",
            "save_checkpoints=false",
            "logger=csv",
        ]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "command.txt").write_text("slsam-train " + " ".join(overrides[:-3]) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        log = (folder / "stdout.txt").open("w")
        process = subprocess.Popen([*train, *overrides], env=env, stdout=log, stderr=subprocess.STDOUT)
        running.append((process, folder))
        started.append((process, folder))
        print(f"{time.strftime('%H:%M:%S')} started {folder.name}", flush=True)
    failed = [folder.name for process, folder in started if process.wait() != 0]
    if failed:
        print(f"failed runs (see their stdout.txt): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# --- summarize ------------------------------------------------------------------------------------------------------
def _curve(run_dir: Path) -> list[dict[str, float]]:
    """Validation accuracy per epoch from the CSV logger: ``[{epoch, step, acc}]``."""
    points: dict[int, dict[str, float]] = {}
    for metrics in run_dir.rglob("metrics.csv"):
        with metrics.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/acc"):
                    epoch = int(float(row["epoch"]))
                    points[epoch] = {"epoch": epoch, "step": int(float(row["step"])), "acc": float(row["val/acc"])}
    return [points[e] for e in sorted(points)]


def _probabilities(run_dir: Path, points: int = 24) -> dict[str, Any] | None:
    source = run_dir / "probabilities.pt"
    if not source.is_file():
        return None
    import torch

    data = torch.load(source, map_location="cpu", weights_only=True)
    history = torch.as_tensor(data["history"]).to(torch.float64)
    if history.ndim != 2 or history.shape[0] == 0:
        return None
    every = int(data.get("every") or 1)
    index = torch.linspace(0, history.shape[0] - 1, min(points, history.shape[0])).round().long()
    return {
        "arm_names": [str(n) for n in data.get("arm_names") or []],
        "steps": [int(i) * every for i in index.tolist()],
        "history": [[round(float(p), 5) for p in row] for row in history[index].tolist()],
    }


def summarize(args: argparse.Namespace) -> int:
    runs = []
    for record_path in sorted(Path(args.sweep).glob("*/result.json")):
        record = json.loads(record_path.read_text())
        folder = record_path.parent
        if not finished(folder):
            print(f"skipping {folder.name}: the run has not finished", file=sys.stderr)
            continue
        lr = record["config"]["optimizer"]["lr"]
        runs.append(
            {
                "method": record.get("method_label") or record["method"],
                "lr": lr,
                "seed": record["seed"],
                "best": record["best_metric"],
                "final": record["final_metric"],
                "steps": record["steps"],
                "active_ratio": record.get("active_ratio"),
                "passes_per_step": record.get("passes_per_step"),
                "curve": _curve(folder),
                "probabilities": _probabilities(folder) if record.get("seed") == 0 else None,
                "command": (folder / "command.txt").read_text().strip() if (folder / "command.txt").exists() else None,
            }
        )
    if not runs:
        print(f"no result.json below {args.sweep}", file=sys.stderr)
        return 1
    out = Path(args.out)
    task = Path(args.sweep).name
    if args.merge and out.is_file():
        runs = merge_runs(json.loads(out.read_text()), runs, task)
    chance = CHANCE.get(task)
    for r in runs:
        r["diverged"] = divergence(r, chance)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"task": task, "overrides": TASKS.get(task), "chance": chance, "runs": runs}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    flagged = [f"{r['method']} lr {r['lr']:g} seed {r['seed']} ({r['diverged']})" for r in runs if r["diverged"]]
    print(f"{len(runs)} runs -> {out}" + (f"; diverged: {', '.join(flagged)}" if flagged else ""))
    return 0


def merge_runs(summary: dict[str, Any], runs: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The runs of an existing ``summary`` of ``task`` followed by ``runs``, a new run replacing an old one of the
    same method, learning rate and seed (the per-run folders stay out of git, so a summary is how earlier runs
    survive a later sweep)."""
    if summary.get("task") != task:
        raise SystemExit(f"--merge: the summary is of task {summary.get('task')!r}, the sweep of {task!r}")

    def key(r: dict[str, Any]) -> tuple[str, float, int]:
        return r["method"], float(r["lr"]), int(r["seed"])

    new = {key(r) for r in runs}
    return [r for r in summary["runs"] if key(r) not in new] + runs


# --- report ---------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _accuracies(runs: list[dict[str, Any]], method: str, lr: Any, metric: str) -> list[float]:
    """``metric`` (``"best"`` or ``"final"``) of ``method``'s runs at ``lr``, in percent, one per seed."""
    return [100 * r[metric] for r in runs if r["method"] == method and r["lr"] == lr]


def best_learning_rates(runs: list[dict[str, Any]], metric: str = "final") -> dict[str, Any]:
    """Each method's learning rate with the highest mean ``metric`` (``"final"`` or ``"best"``) over its seeds
    (ties: more seeds)."""
    by: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in runs:
        by[(r["method"], r["lr"])].append(r[metric])
    best: dict[str, tuple[float, int, Any]] = {}
    for (method, lr), values in by.items():
        key = (statistics.fmean(values), len(values), lr)
        if method not in best or key[:2] > best[method][:2]:
            best[method] = key
    return {m: v[2] for m, v in best.items()}


def _accuracy_at_time(curve: list[dict[str, float]], step_cost: float, budget: float) -> float | None:
    """The best validation accuracy reached within ``budget`` (in base-step units) at ``step_cost`` per step."""
    reached = [p["acc"] for p in curve if p["step"] * step_cost <= budget + 1e-9]
    return max(reached) if reached else None


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"


def _gap(values: list[float], reference: list[float] | None) -> str:
    return "-" if not reference else f"{statistics.fmean(values) - statistics.fmean(reference):+.1f}"


def diverged_by_rate(runs: list[dict[str, Any]], method: str, chance: float | None) -> dict[Any, tuple[int, int]]:
    """``method``'s learning rates, each with (seeds diverged, seeds run), in increasing order of rate."""
    counts: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for r in runs:
        if r["method"] == method:
            counts[r["lr"]][0] += bool(_diverged(r, chance))
            counts[r["lr"]][1] += 1
    return {lr: (counts[lr][0], counts[lr][1]) for lr in sorted(counts, key=float)}


def divergence_cell(runs: list[dict[str, Any]], method: str, lr: Any, chance: float | None) -> str:
    """What the best-rate choice hides: seeds diverged at the chosen rate, and how many of the rates tried had a
    diverged seed (each with its count), e.g. ``0/3; 1 of 4 rates (0.03: 3/3)``."""
    counts = diverged_by_rate(runs, method, chance)
    at = counts.get(lr, (0, 0))
    bad = {rate: c for rate, c in counts.items() if c[0]}
    listed = ", ".join(f"{rate:g}: {d}/{n}" for rate, (d, n) in bad.items())
    return f"{at[0]}/{at[1]}; {len(bad)} of {len(counts)} rates" + (f" ({listed})" if bad else "")


def rate_place(runs: list[dict[str, Any]], method: str, lr: Any) -> str:
    """Where ``lr`` lies among the learning rates ``method`` was run at: ``"interior of N"`` (a lower and a higher
    rate were tried, so a best rate there is bracketed), ``"lowest of N"`` / ``"highest of N"`` (the sweep's edge:
    a better rate may lie beyond it) or ``"only rate"``."""
    rates = sorted({r["lr"] for r in runs if r["method"] == method}, key=float)
    if len(rates) < 2:
        return "only rate"
    place = "lowest" if lr == rates[0] else "highest" if lr == rates[-1] else "interior"
    return f"{place} of {len(rates)}"


def accuracy_table(
    runs: list[dict[str, Any]], metric: str, cost: dict[str, float] | None = None, chance: float | None = None
) -> list[str]:
    """Markdown rows: each method at the learning rate that maximises ``metric``, mean ± std over seeds, its gap
    to SAM and to base, the diverged runs (at that rate, and the rates with any; ``chance``: the task's chance
    accuracy, see ``divergence``) and where the rate lies in the sweep (``rate_place``); with ``cost`` (step time
    in base steps), also the best accuracy reached within base's whole run's time."""
    chosen = best_learning_rates(runs, metric)
    order = [m for m in METHODS if m in chosen]
    values = {m: _accuracies(runs, m, chosen[m], metric) for m in order}
    base_steps = max((r["steps"] for r in runs if r["method"] == "base"), default=None)
    timed = cost is not None and base_steps is not None
    header = (
        "| method | lr | lr in the sweep | seeds | accuracy (%) | − SAM | − base | diverged: seeds at lr; rates |"
        + (" within base's time (%) |" if timed else "")
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---|" + ("---:|" if timed else "")]
    for method in order:
        row = (
            f"| `{method}` | {chosen[method]:g} | {rate_place(runs, method, chosen[method])} | "
            f"{len(values[method])} | {_cell(values[method])} | "
            f"{_gap(values[method], values.get('sam'))} | {_gap(values[method], values.get('base'))} | "
            f"{divergence_cell(runs, method, chosen[method], chance)} |"
        )
        if timed:
            assert cost is not None and base_steps is not None
            at = [
                _accuracy_at_time(r["curve"], cost[method], base_steps)
                for r in runs
                if r["method"] == method and r["lr"] == chosen[method] and method in cost
            ]
            reached = [100 * a for a in at if a is not None]
            row += f" {_cell(reached)} |" if reached else " - |"
        lines.append(row)
    return lines


#: each sparse variant of the sweep (SL-SAM, sparse_msam) with its ``rho=0`` control: the same sampler, pinned arms and
#: scaling, no ascent (at ``rho=0`` the radius is gone, so one control serves ``sparse_msam`` at every radius)
RHO0_CONTROLS: dict[str, str] = {
    "slsam": "slsam_rho0",
    "slsam_noisy": "slsam_noisy_rho0",
    "sparse_msam": "sparse_msam_rho0",
    "sparse_msam_r0.3": "sparse_msam_rho0",
    # a dense update without an ascent is AdamW's step (tests/test_slsam_levers.py, bitwise): AdamW is the control
    "slsam_plus": "base",
    "slsam_plus_full": "base",
}


def control_table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows, one per SL-SAM variant swept with its ``rho=0`` control (and base): its gain over AdamW
    (base) split into what the sparse, scaled updates alone give (control − base) and what the ascent adds
    (variant − control), at the best and the last epoch, each method at its own best rate for that metric (mean
    over seeds)."""
    means: dict[str, dict[str, float]] = {}
    for metric in ("best", "final"):
        chosen = best_learning_rates(runs, metric)
        for method, lr in chosen.items():
            means.setdefault(method, {})[metric] = statistics.fmean(_accuracies(runs, method, lr, metric))
    lines = [
        "| method | − base (best / last) | sparsity alone: `rho=0` − base | the ascent: method − `rho=0` |",
        "|---|---:|---:|---:|",
    ]
    if "base" not in means:
        return []
    base = means["base"]
    for method, control in RHO0_CONTROLS.items():
        if method not in means or control not in means:
            continue

        def pair(a: dict[str, float], b: dict[str, float]) -> str:
            return f"{a['best'] - b['best']:+.1f} / {a['final'] - b['final']:+.1f}"

        lines.append(
            f"| `{method}` | {pair(means[method], base)} | {pair(means[control], base)} | "
            f"{pair(means[method], means[control])} |"
        )
    return lines if len(lines) > 2 else []


def cost_table(
    cost: dict[str, float], cost_sam: dict[str, float | None], memory: dict[str, float | None], methods: list[str]
) -> list[str]:
    """Markdown rows: step time in base and SAM steps, and peak memory against base, from the step benchmark."""
    lines = ["| method | step time x base | step time x SAM | peak memory x base |", "|---|---:|---:|---:|"]
    for method in methods:
        if method not in cost:
            continue
        sam = f"{cost_sam[method]:.2f}" if cost_sam.get(method) else "-"
        mem = f"{memory[method]:.2f}" if memory.get(method) else "-"
        lines.append(f"| `{method}` | {cost[method]:.2f} | {sam} | {mem} |")
    return lines


def read_benches(paths: list[str]) -> dict[str, dict[str, Any]]:
    """Each sweep method's row of the step benchmarks in ``paths`` (the first file that has the method's bench name
    wins); every ratio in a row is against the base optimizer of the row's own benchmark run."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        measured = json.loads(Path(path).read_text())["results"]
        for method in METHODS:
            if method not in rows and (name := bench_name(method)) in measured:
                rows[method] = dict(measured[name], bench=Path(path).name)
    for method in METHODS:
        # a nonzero radius changes no work of the step (the same passes over the same arms), so a method that differs
        # from a measured one only in ``method.rho`` costs what that one costs; rho=0 is measured on its own
        base, _, radius = bench_name(method).partition(":rho=")
        if method not in rows and radius and "," not in radius and float(radius) != 0.0:
            same = next((m for m in METHODS if bench_name(m) == base and m in rows), None)
            if same is not None:
                rows[method] = dict(rows[same], bench=f"{rows[same]['bench']} ({same}'s row)")
    return rows


#: the benchmark's name suffix of a gated method's one-pass step: a gate this high opens on the first step only (its
#: spread is 0 there), never again in a benchmark's few steps
ONE_PASS_GATE = "1e9"


def gated_rows(paths: list[str], runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Benchmark rows of the sweep methods with ``second_pass_gate``, which take pass 2 on a fraction of their steps
    that only training shows: for a method whose runs at its best-epoch rate (the rate its accuracy is reported at)
    took pass 2 on a fraction f of their steps (``passes_per_step - 1``, mean over those seeds), step time ``f x``
    the ungated method's ``+ (1 - f) x`` the same method's with a gate that never opens, and peak memory the larger
    of the two, both read from the first benchmark in ``paths`` that measured the pair."""
    rows: dict[str, dict[str, Any]] = {}
    benches = [(Path(path).name, json.loads(Path(path).read_text())["results"]) for path in paths]
    chosen = best_learning_rates(runs, "best")
    for method in METHODS:
        name, _, arguments = bench_name(method).partition(":")
        items = arguments.split(",") if arguments else []
        gate = [item for item in items if item.startswith("second_pass_gate=")]
        fractions = [
            r["passes_per_step"] - 1
            for r in runs
            if r["method"] == method and r["lr"] == chosen.get(method) and r.get("passes_per_step")
        ]
        if not gate or not fractions:
            continue
        rest = [item for item in items if item not in gate]
        two = name + (":" + ",".join(rest) if rest else "")
        one = f"{name}:" + ",".join([*rest, f"second_pass_gate={ONE_PASS_GATE}"])
        fraction = statistics.fmean(fractions)
        for source, measured in benches:
            if one not in measured or two not in measured:
                continue
            row: dict[str, Any] = {"pass2_fraction": fraction}
            for key in ("cost_vs_base", "median_vs_base"):
                if measured[one].get(key) is not None and measured[two].get(key) is not None:
                    row[key] = fraction * measured[two][key] + (1 - fraction) * measured[one][key]
            memories = [measured[n].get("memory_vs_base") for n in (one, two)]
            row["memory_vs_base"] = max(memories) if None not in memories else None
            row["bench"] = f"{source} (pass 2 on {fraction:.2f} of the steps: {two} / {one})"
            rows[method] = row
            break
    return rows


#: a method's point counts for the frontier and the budget table only with at least this many seeds at its rate
FRONTIER_MIN_SEEDS = 3


def frontier(
    runs: list[dict[str, Any]], cost: dict[str, float], memory: dict[str, float | None]
) -> list[dict[str, Any]]:
    """Each method that has a step-time ratio, at its best-epoch learning rate: accuracy (mean, std, seeds, %),
    step time and peak memory against the base optimizer, and whether it is on the time frontier (no other method is
    at most as slow and more accurate; only points with ``FRONTIER_MIN_SEEDS`` seeds take part). Sorted by step
    time."""
    chosen = best_learning_rates(runs, "best")
    points = []
    for method in METHODS:
        if method not in chosen or method not in cost:
            continue
        values = _accuracies(runs, method, chosen[method], "best")
        mean, std = _mean_std(values)
        points.append(
            {
                "method": method,
                "lr": chosen[method],
                "seeds": len(values),
                "accuracy": mean,
                "std": std,
                "time": cost[method],
                "memory": memory.get(method),
            }
        )
    counted = [p for p in points if p["seeds"] >= FRONTIER_MIN_SEEDS]
    for p in points:
        p["frontier"] = p["seeds"] >= FRONTIER_MIN_SEEDS and not any(
            q is not p and q["time"] <= p["time"] and q["accuracy"] > p["accuracy"] for q in counted
        )
    return sorted(points, key=lambda p: (p["time"], -p["accuracy"]))


def frontier_table(points: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of ``frontier``'s points, cheapest first."""
    lines = [
        "| method | lr | seeds | accuracy (%) | step time x AdamW | peak memory x AdamW | on the frontier |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for p in points:
        mem = f"{p['memory']:.2f}" if p["memory"] else "-"
        lines.append(
            f"| `{p['method']}` | {p['lr']:g} | {p['seeds']} | {p['accuracy']:.1f} ± {p['std']:.1f} | "
            f"{p['time']:.2f} | {mem} | {'yes' if p['frontier'] else ''} |"
        )
    return lines


def report(args: argparse.Namespace) -> int:
    summary = json.loads(Path(args.summary).read_text())
    runs, task = summary["runs"], summary["task"]
    bench = read_benches(args.bench or [])
    bench.update(gated_rows(args.bench or [], runs))
    cost = {m: row.get("cost_vs_base") or row.get("median_vs_base") for m, row in bench.items()}
    cost_sam = {m: row.get("cost_vs_sam") for m, row in bench.items()}
    memory = {m: row.get("memory_vs_base") for m, row in bench.items()}
    order = [m for m in METHODS if any(r["method"] == m for r in runs)]
    chance = summary.get("chance", CHANCE.get(task))

    def rate(m: str, lr: Any, d: int, n: int) -> str:
        at = [r for r in runs if r["method"] == m and r["lr"] == lr]
        means = " / ".join(f"{100 * statistics.fmean(r[k] for r in at):.1f}" for k in ("best", "final"))
        return f"{lr:g} ({means}" + (f", {d}/{n} diverged)" if d else ")")

    tried = "; ".join(
        f"`{m}` " + ", ".join(rate(m, lr, d, n) for lr, (d, n) in diverged_by_rate(runs, m, chance).items())
        for m in order
    )
    lines = [
        "Best-epoch validation accuracy (checkpoint selection), each method at the learning rate that maximises it "
        '(mean ± std over seeds; "lr in the sweep": interior when a lower and a higher rate were also run, else the '
        "sweep's edge, beyond which a better rate may lie); the last column is the best accuracy reached within the "
        "time of base's whole run, with each method's step time from the step benchmark:",
        "",
        *accuracy_table(runs, "best", cost if cost else None, chance),
        "",
        "Last-epoch validation accuracy, each method at the learning rate that maximises it:",
        "",
        *accuracy_table(runs, "final", chance=chance),
        "",
        f"Learning rates tried (mean best / last epoch accuracy over the rate's seeds): {tried}.",
        "",
        f"A run counts as diverged when its last validation accuracy is {100 * DIVERGENCE_DROP:.0f} points or more "
        f"below its first epoch's, or within {100 * CHANCE_MARGIN:.0f} points of chance"
        + (f" ({100 * chance:.1f} %)" if chance is not None else "")
        + "; a diverged run stays in its rate's mean.",
    ]
    controls = control_table(runs)
    if controls:
        lines += [
            "",
            "Where the gain over AdamW comes from (points, mean over seeds, best / last epoch, each method at its "
            "own best rate): the `rho=0` control runs the same sampler, pinned arms and update scaling without the "
            "ascent:",
            "",
            *controls,
        ]
    points: list[dict[str, Any]] = []
    sources = sorted({row["bench"] for row in bench.values()})
    if cost:
        points = frontier(runs, cost, memory)
        lines += [
            "",
            "Cost (step benchmark, same model and batch; " + ", ".join(f"`{s}`" for s in sources) + "):",
            "",
            *cost_table(cost, cost_sam, memory, order),
            "",
            "The frontier: each method at its best-epoch rate against its step time and peak memory (a method is on "
            "the frontier when no method at most as slow is more accurate; a method with fewer than "
            f"{FRONTIER_MIN_SEEDS} seeds at its rate is listed but takes no part):",
            "",
            *frontier_table(points),
        ]
    assets = Path(args.assets)
    assets.mkdir(parents=True, exist_ok=True)
    chosen = best_learning_rates(runs, "best")
    stats = {m: {"runs": [r for r in runs if r["method"] == m and r["lr"] == chosen[m]]} for m in order}
    figure = _plot_accuracy_vs_time(task, order, stats, cost, assets / f"{task}_accuracy_vs_time.png")
    frontier_figure = _plot_frontier(task, points, assets / f"{task}_frontier.png") if points else None
    heatmaps = _plot_heatmaps(task, runs, chosen, assets)
    prefix = args.image_prefix
    text = "\n".join(lines) + "\n"
    if figure:
        text += f"\n![accuracy against time, {task}]({prefix}{figure.name})\n"
    if frontier_figure:
        text += f"\n![accuracy against step time and peak memory, {task}]({prefix}{frontier_figure.name})\n"
    for path in heatmaps:
        text += f"\n![sampling probabilities, {path.stem}]({prefix}{path.name})\n"
    if args.page:
        _write_into_page(Path(args.page), task, text)
    out = Path(args.out) if args.out else Path(args.summary).with_suffix(".md")
    out.write_text(text)
    if points:
        record = {"task": task, "bench": sources, "points": points}
        out.with_suffix(".frontier.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
    return 0


def _write_into_page(page: Path, task: str, text: str) -> None:
    """Replace the block between ``<!-- separating: TASK -->`` and ``<!-- end separating: TASK -->`` of ``page``."""
    pattern = re.compile(
        rf"(<!-- separating: {re.escape(task)} -->\n).*?(<!-- end separating: {re.escape(task)} -->)", re.S
    )
    content = page.read_text()
    if len(pattern.findall(content)) != 1:
        raise SystemExit(
            f"{page}: needs exactly one block '<!-- separating: {task} -->' ... '<!-- end separating: {task} -->'"
        )
    page.write_text(pattern.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(2), content))


MARKERS = "osD^vP*Xhp<>"


def _plot_accuracy_vs_time(
    task: str, order: list[str], stats: dict[str, Any], cost: dict[str, float], path: Path
) -> Path | None:
    """Mean validation accuracy (over seeds) against time in base-step units, one marker and colour per method."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.subplots()
    colours = [f"C{i}" for i in range(10)] + ["black", "grey"]
    drawn = 0
    for index, method in enumerate(order):
        runs = stats[method]["runs"]
        if method not in cost or not runs or not runs[0]["curve"]:
            continue
        epochs = sorted({p["epoch"] for r in runs for p in r["curve"]})
        xs, ys = [], []
        for epoch in epochs:
            values = [p for r in runs for p in r["curve"] if p["epoch"] == epoch]
            xs.append(statistics.fmean(p["step"] for p in values) * cost[method])
            ys.append(100 * statistics.fmean(p["acc"] for p in values))
        ax.plot(
            xs,
            ys,
            marker=MARKERS[index % len(MARKERS)],
            color=colours[index % len(colours)],
            label=method,
            markersize=4,
            linewidth=1.2,
        )
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("time (base optimizer steps; each method's step cost from the interleaved benchmark)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{task}: accuracy against time (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _plot_frontier(task: str, points: list[dict[str, Any]], path: Path) -> Path | None:
    """Two panels, accuracy (mean ± std over seeds at each method's best rate) against step time and against peak
    memory, both relative to the base optimizer; one point per method, ``rho=0`` controls hollow, the time
    frontier joined by a line."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(11, 4.8))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, key, label in ((axes[0], "time", "step time"), (axes[1], "memory", "peak memory")):
        for index, p in enumerate(points):
            if p[key] is None:
                continue
            control = p["method"].endswith("_rho0")
            colour = f"C{index % 10}"
            ax.errorbar(
                p[key],
                p["accuracy"],
                yerr=p["std"],
                marker=MARKERS[index % len(MARKERS)],
                color=colour,
                markerfacecolor="none" if control else colour,
                markersize=6,
                capsize=2,
                linewidth=0.8,
            )
            ax.annotate(p["method"], (p[key], p["accuracy"]), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
        if key == "time":
            front = [p for p in points if p["frontier"]]
            ax.plot([p["time"] for p in front], [p["accuracy"] for p in front], color="grey", linewidth=0.8, zorder=0)
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel(f"{label} x AdamW (interleaved step benchmark)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best-epoch validation accuracy (%, mean ± std over seeds)")
    figure.suptitle(f"{task}: accuracy against cost, each at its best rate (hollow: rho=0 controls)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


#: the budgets of the cross-task table: a name and the most step time (x AdamW) a method may take, None for any
BUDGETS: tuple[tuple[str, float | None], ...] = (
    ("AdamW's step time (≤ 1.0x)", 1.0),
    ("≤ 1.3x AdamW", 1.3),
    ("≤ 1.6x AdamW", 1.6),
    ("any (SAM is about 2x)", None),
)


def budget_table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows, one per budget of ``BUDGETS``, one column per task (a ``.frontier.json`` record): the most
    accurate method whose step time fits the budget, with its accuracy, its gap to AdamW (points) and the seed
    spread, read off the task's frontier."""
    lines = [
        "| budget | " + " | ".join(f"`{r['task']}`" for r in records) + " |",
        "|---|" + "---|" * len(records),
    ]
    for name, limit in BUDGETS:
        cells = []
        for record in records:
            points = record["points"]
            base = next((p for p in points if p["method"] == "base"), None)
            fits = [
                p
                for p in points
                if p.get("seeds", FRONTIER_MIN_SEEDS) >= FRONTIER_MIN_SEEDS
                and (limit is None or p["time"] <= limit + 1e-9)
            ]
            if not fits:
                cells.append("-")
                continue
            best = max(fits, key=lambda p: p["accuracy"])
            gap = f", {best['accuracy'] - base['accuracy']:+.1f} vs AdamW" if base else ""
            cells.append(f"`{best['method']}` {best['accuracy']:.1f} ± {best['std']:.1f}{gap} ({best['time']:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def budget(args: argparse.Namespace) -> int:
    records = [json.loads(Path(path).read_text()) for path in args.frontiers]
    text = "\n".join(budget_table(records)) + "\n"
    if args.page:
        _write_into_page(Path(args.page), "budget", text)
    print(text)
    return 0


#: the methods whose sampling probabilities (seed 0, best-epoch learning rate) are drawn as a heatmap
HEATMAP_METHODS = ("slsam", "slsam_scaled", "slsam_scaled_s05", "slsam_noisy", "slsam_plus")


def _plot_heatmaps(task: str, runs: list[dict[str, Any]], chosen: dict[str, Any], assets: Path) -> list[Path]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return []
    paths = []
    for method in HEATMAP_METHODS:
        run_ = next(
            (r for r in runs if r["method"] == method and r["lr"] == chosen.get(method) and r["probabilities"]), None
        )
        if run_ is None:
            continue
        probs = run_["probabilities"]
        names = probs["arm_names"]
        matrix = list(zip(*probs["history"], strict=True))  # arms x time
        figure = Figure(figsize=(8, max(3.0, 0.16 * len(matrix) + 1)))
        ax = figure.subplots()
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(names)), names, fontsize=5)
        ticks = list(range(0, len(probs["steps"]), max(1, len(probs["steps"]) // 6)))
        ax.set_xticks(ticks, [str(probs["steps"][i]) for i in ticks])
        ax.set_xlabel("training step")
        ax.set_title(f"{task}, {method} (lr {run_['lr']:g}, seed 0): sampling probability per arm", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        figure.tight_layout()
        path = assets / f"{task}_probabilities_{method}.png"
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the sweep")
    p_run.add_argument("--task", choices=sorted(TASKS), required=True)
    p_run.add_argument("--methods", nargs="+", choices=list(METHODS), required=True)
    p_run.add_argument("--lrs", nargs="+", required=True, help="learning rates, as written in the run names")
    p_run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p_run.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are split between them)")
    p_run.add_argument("--threads", type=int, default=None, help="threads per run (default: the cores / --jobs)")
    p_run.add_argument("--out", required=True, help="folder of the per-run folders (kept out of git)")
    p_run.add_argument("--extra", nargs="*", default=[], help="more slsam-train overrides for every run")
    p_sum = sub.add_parser("summarize", help="one JSON summary of a sweep folder")
    p_sum.add_argument("sweep")
    p_sum.add_argument("--out", required=True)
    p_sum.add_argument(
        "--merge", action="store_true", help="keep the runs already in --out that this sweep did not rerun"
    )
    p_rep = sub.add_parser("report", help="markdown tables and figures from a summary")
    p_rep.add_argument("summary")
    p_rep.add_argument(
        "--bench",
        nargs="+",
        default=None,
        help="the step benchmarks' JSON files (step-time and memory ratios; a method's row comes from the first "
        "file that has it)",
    )
    p_rep.add_argument("--assets", default="docs/assets/results/separating")
    p_rep.add_argument("--out", default=None, help="markdown output (default: the summary's path with .md)")
    p_rep.add_argument("--page", default=None, help="also write the markdown into this page's separating block")
    p_rep.add_argument(
        "--image-prefix", default="", help="prefix of the figure links (e.g. assets/results/separating/)"
    )
    p_bud = sub.add_parser("budget", help="the cross-task budget table from the reports' .frontier.json files")
    p_bud.add_argument("frontiers", nargs="+")
    p_bud.add_argument("--page", default=None, help="also write the table into this page's 'budget' block")
    args = parser.parse_args(argv)
    if args.command == "run" and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return {"run": run, "summarize": summarize, "report": report, "budget": budget}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
