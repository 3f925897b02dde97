"""Could an AE-SAM gate decide when an SL-SAM step is worth its second pass? A measurement of the gate's premise.

AE-SAM (Jiang et al. 2023) takes SAM's second pass only on steps where the squared stochastic gradient norm is high
against its running mean and spread: ``s_t >= mu_t + c * sigma_t``, ``mu`` and ``sigma^2`` exponential moving
averages (momentum ``delta``) of ``s`` and of its squared deviation. Under SL-SAM only the sampled arms have a
gradient on pass 1, so a gate has ``s_S = sum_{i in S_t} ||g_i||^2`` instead of the dense ``s``; ``S_t`` changes
every step. This script trains ResNet-20 densely (AdamW) on the noisy-digits task of docs/results.md, records every
arm's squared gradient norm at every step, replays SL-SAM's sampler over those norms (``slsam_noisy``'s, the head and
1-D tensors pinned, and the paper's, nothing pinned), and asks how often a gate on what SL-SAM can see takes the same
decision as the gate on the dense norm:

- ``sampled``: the gate on ``s_S`` (what a gate inside SL-SAM's pass 1 has);
- ``per_arm``: the gate on ``s_S / sum_{i in S_t} m_i``, ``m_i`` a running mean of arm i's own squared norm over
  the steps it was sampled (divides out which arms were drawn);
- ``shuffled``: the dense gate's decisions in a random order (the agreement of a gate that knows nothing).

Agreement is the fraction of steps with the same decision, and Cohen's kappa corrects it for chance (0: no better
than chance, 1: the same decisions). The training is dense (the trajectory is AdamW's, not SL-SAM's); the question
is only what the statistic tracks.

    python experiments/gate_premise.py --out experiments/results/gate_premise_digits_noisy.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_slsam.data import DigitsDataModule
from lightning_slsam.engine.arms import build_arms
from lightning_slsam.methods.slsam import SLSAMNoisyOptions, SLSAMOptions, gate_step
from lightning_slsam.models.resnet_cifar import resnet20_cifar


def ae_sam_gate(values: Sequence[float], c: float) -> list[bool]:
    """The library's gate (:func:`~lightning_slsam.methods.slsam.gate_step`, AE-SAM's rule) over a sequence of
    statistics: step t takes the second pass when ``values[t] >= mu_t + c sigma_t``. NaN (no statistic this step)
    keeps the state and takes the pass."""
    decisions: list[bool] = []
    state: tuple[float, float] | None = None
    for v in values:
        if math.isnan(v):
            decisions.append(True)
            continue
        state, take = gate_step(state, v, c)
        decisions.append(take)
    return decisions


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two binary decision sequences (1: identical, 0: chance agreement; 0 when undefined)."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return 0.0 if expected == 1 else (observed - expected) / (1 - expected)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (no ties expected: continuous norms)."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def record_norms(seed: int, epochs: int, lr: float, threads: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """Dense AdamW on the noisy-digits task; returns the model and the ``(steps, arms)`` squared gradient norms."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    data = DigitsDataModule(batch_size=64, image_size=32, channels=3, train_limit=1000, label_noise=0.4, seed=seed)
    data.setup("fit")
    model = resnet20_cifar(num_classes=10, weights="packaged")
    layout = build_arms(model, "tensor")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * len(data.train_dataloader())
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    norms = []
    model.train()
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            norms.append([sum(float(p.grad.pow(2).sum()) for p in arm.params) for arm in layout])
            optimizer.step()
            schedule.step()
    return model, torch.tensor(norms, dtype=torch.float64)


#: the samplers replayed: SL-SAM's options at their defaults (sparsity 0.2, the Exp3 bandit over tensor arms)
SAMPLERS = {"slsam_noisy": SLSAMNoisyOptions, "slsam": SLSAMOptions}


def replay(
    model: torch.nn.Module, norms: torch.Tensor, sampler: str, sampler_seed: int
) -> tuple[list[float], list[float]]:
    """``sampler`` (a key of :data:`SAMPLERS`) replayed over ``norms``: per step ``s_S`` and the per-arm normalised
    statistic."""
    layout = build_arms(model, "tensor")
    sampler = SAMPLERS[sampler](seed=sampler_seed).sampler_for(
        model, layout, torch.ones(len(layout), dtype=torch.bool), sampler_seed
    )
    mean = torch.full((len(layout),), float("nan"), dtype=torch.float64)
    sampled, per_arm = [], []
    for q in norms:
        active = sampler.sample()
        sampled.append(float(q[active].sum()))
        known = active & ~mean.isnan()
        per_arm.append(float(q[known].sum() / mean[known].sum()) if bool(known.any()) else float("nan"))
        fresh = active & mean.isnan()
        mean[fresh] = q[fresh]
        seen = active & ~fresh
        mean[seen] = 0.9 * mean[seen] + 0.1 * q[seen]
        sampler.update(active, q.sqrt() * active)
    return sampled, per_arm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="training seed (data split, noise, init of the head)")
    parser.add_argument("--epochs", type=int, default=20, help="the noisy-digits task's 20 epochs")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW's best rate on the task")
    parser.add_argument("--sampler-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[-1.0, 0.0, 1.0], help="AE-SAM's c")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="JSON; a markdown table is written next to it")
    args = parser.parse_args()
    start = time.perf_counter()
    model, norms = record_norms(args.seed, args.epochs, args.lr, args.threads)
    dense = norms.sum(dim=1).tolist()
    rows = []
    replays = {
        (sampler, seed): replay(model, norms, sampler, seed) for sampler in SAMPLERS for seed in args.sampler_seeds
    }
    for sampler, c, name in itertools.product(SAMPLERS, args.thresholds, ("sampled", "per_arm", "shuffled")):
        reference = ae_sam_gate(dense, c)
        kappas, agreements, rhos, fractions = [], [], [], []
        for seed in args.sampler_seeds:
            sampled, per_arm = replays[sampler, seed]
            if name == "shuffled":
                gate = list(reference)
                random.Random(seed).shuffle(gate)
                statistic = None
            else:
                statistic = sampled if name == "sampled" else per_arm
                gate = ae_sam_gate(statistic, c)
            kappas.append(cohen_kappa(reference, gate))
            agreements.append(sum(a == b for a, b in zip(reference, gate, strict=True)) / len(gate))
            fractions.append(sum(gate) / len(gate))
            if statistic is not None:
                pairs = [(d, s) for d, s in zip(dense, statistic, strict=True) if not math.isnan(s)]
                rhos.append(spearman([d for d, _ in pairs], [s for _, s in pairs]))
        rows.append(
            {
                "sampler": sampler,
                "c": c,
                "statistic": name,
                "dense_pass_fraction": sum(reference) / len(reference),
                "pass_fraction": sum(fractions) / len(fractions),
                "agreement": sum(agreements) / len(agreements),
                "kappa": sum(kappas) / len(kappas),
                "kappa_min": min(kappas),
                "kappa_max": max(kappas),
                "spearman_with_dense": (sum(rhos) / len(rhos)) if rhos else None,
            }
        )
    result = {
        "task": "digits_noisy (ResNet-20, 1,000 digits, 40 % noisy labels, 20 epochs, AdamW, cosine)",
        "seed": args.seed,
        "lr": args.lr,
        "steps": len(dense),
        "arms": norms.shape[1],
        "samplers": "Exp3 over the tensor arms, sparsity 0.2; slsam_noisy: head and 1-D tensors pinned; slsam: none",
        "sampler_seeds": args.sampler_seeds,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"AE-SAM gate on what SL-SAM sees, {result['task']}; {result['steps']} steps, {result['arms']} arms; "
        f"{result['samplers']}; sampler seeds {args.sampler_seeds} (mean, kappa min-max)",
        "",
        "| sampler | c | statistic | passes (dense gate) | passes | agreement | Cohen's kappa | Spearman with dense |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rho = "–" if r["spearman_with_dense"] is None else f"{r['spearman_with_dense']:.2f}"
        lines.append(
            f"| `{r['sampler']}` | {r['c']:g} | {r['statistic']} | {r['dense_pass_fraction']:.2f} | "
            f"{r['pass_fraction']:.2f} | "
            f"{r['agreement']:.2f} | {r['kappa']:.2f} ({r['kappa_min']:.2f} to {r['kappa_max']:.2f}) | {rho} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
