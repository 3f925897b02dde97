"""SAM and SL-SAM with a ``torch.compile``d model: recompiles and step time against eager (CPU).

A residual MLP (``--depth`` blocks ``x + relu(Linear(x))`` between a stem and a head ``Linear``) sits in a
``SharpnessAwareMixin`` module; it is trained for ``--steps`` optimizer steps by a real ``lightning.Trainer``
with each method, in each of three ways:

- ``eager``: not compiled;
- ``whole``: ``model.compile()`` (one compiled frame for the whole model);
- ``regional``: ``child.compile()`` for the stem, every block and the head (PyTorch's "regional compilation").

SL-SAM turns ``requires_grad`` off on the parameters of its inactive arms, so that backward passes skip them. A
compiled frame guards on each parameter's ``requires_grad``: every new active set is a recompile; after
``torch._dynamo.config.recompile_limit`` (8) of them Dynamo stops compiling that frame and compiles the frames
of the modules it calls instead, each again until its own limit. A frame that holds one block sees few
``requires_grad`` patterns (its own arms', and whether its input needs a gradient), but identical blocks share
one compiled code object, so their patterns add up there. ``--no-toggle`` runs SL-SAM the other way: every
parameter keeps ``requires_grad`` and each backward pass is ``loss.backward(inputs=<the active arms'
parameters>)``; the update is the same, autograd skips what leads to no active parameter in eager mode, but a
compiled region's backward computes the gradients of all its parameters.

For every run: compiled graphs (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``), recompiles (graphs
beyond those of the base optimizer compiled the same way), whether the recompile limit was hit, the first
step's time (it includes the compilation; Inductor's caches are off unless ``--keep-caches``), and the median
and the minimum step time over the last half of the steps (``on_train_batch_start`` to ``on_train_batch_end``;
the minimum is the figure least disturbed by other load on the machine), with the median's ratio to the eager
run of the same method.

    python experiments/compile_step.py                        # base, sam, slsam, slsam:arms=block; 40 steps each
    python experiments/compile_step.py --threads 1 --steps 30 --depth 4   # experiments/results/compile_mlp_*
    python experiments/compile_step.py --methods slsam --steps 60 --backend aot_eager
    python experiments/compile_step.py --no-toggle --methods slsam slsam:arms=block
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_slsam import SAM, SLSAM, Base, SharpnessAwareMixin
from lightning_slsam.engine.trainable import TrainableSet

WAYS = ("eager", "whole", "regional")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x))


class Net(SharpnessAwareMixin, L.LightningModule):
    def __init__(self, features: int, width: int, depth: int, classes: int, way: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(features, width), *[Block(width) for _ in range(depth)], nn.Linear(width, classes)
        )
        if way == "whole":
            self.model.compile(backend=BACKEND)
        elif way == "regional":
            for child in self.model:
                child.compile(backend=BACKEND)

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        active = getattr(self.trainer.callbacks[0], "active_params", None)  # --no-toggle: the step's arms only
        if active is not None:
            kwargs["inputs"] = active
        super().manual_backward(loss, *args, **kwargs)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


class KeepRequiresGrad:
    """``--no-toggle``: the step's ``TrainableSet.enable`` replaced by one that turns on every trainable parameter."""

    def __init__(self) -> None:
        self.original = TrainableSet.enable

    def __enter__(self) -> KeepRequiresGrad:
        original = self.original
        TrainableSet.enable = lambda trainable, active: original(trainable, torch.ones_like(active))  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        TrainableSet.enable = self.original  # type: ignore[method-assign]


class ActiveInputsSLSAM(SLSAM):
    """``--no-toggle`` SL-SAM: every parameter keeps ``requires_grad``, and each backward pass differentiates
    only the parameters of the step's arms (``loss.backward(inputs=...)``, see ``Net.manual_backward``), so the
    other arms get no gradient, as with the library's toggling. SL-SAM uses the same arms in both passes.
    Prefix replay is off (it relies on the inactive prefix not being part of pass 1's graph)."""

    active_params: list[nn.Parameter] | None = None

    def build_method(self, layout: Any) -> Any:
        method = super().build_method(layout)
        sample = method.pass1_arms

        def remembering() -> torch.Tensor:
            active = sample()
            self.active_params = layout.params_of(active)
            return active

        method.pass1_arms = remembering  # type: ignore[method-assign]
        return method


def make_callback(method: str, no_toggle: bool) -> L.Callback:
    if method == "base":
        return Base()
    if method == "sam":
        return SAM(rho=0.05)
    arms = "block" if method == "slsam:arms=block" else "tensor"
    if no_toggle:
        return ActiveInputsSLSAM(rho=0.05, sparsity=0.2, arms=arms, seed=0, reuse_prefix=False)
    return SLSAM(rho=0.05, sparsity=0.2, arms=arms, seed=0)


def run(method: str, way: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.steps * args.batch_size, args.features, generator=generator)
    y = torch.randint(0, args.classes, (len(x),), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    module = Net(args.features, args.width, args.depth, args.classes, way)
    timer = StepTimer()
    callback = make_callback(method, args.no_toggle and method.startswith("slsam"))
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[callback, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    if args.no_toggle and method.startswith("slsam"):
        with KeepRequiresGrad():
            trainer.fit(module, loader)
    else:
        trainer.fit(module, loader)
    tail = timer.times[len(timer.times) // 2 :]
    return {
        "method": method,
        "way": way,
        "graphs": int(counters["stats"]["unique_graphs"]),
        "limit_hit": any("recompile limit" in str(key).lower() for key in counters["unimplemented"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "first_step_s": timer.times[0],
        "median_step_ms": 1000 * statistics.median(tail),
        "min_step_ms": 1000 * min(tail),
        "passes_per_step": getattr(callback, "mean_passes", float("nan")),
    }


def main() -> None:
    global BACKEND
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["base", "sam", "slsam", "slsam:arms=block"])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-toggle", action="store_true", help="SL-SAM without toggling requires_grad")
    parser.add_argument("--keep-caches", action="store_true", help="let Inductor reuse kernels of earlier runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args()
    BACKEND = args.backend
    torch.set_num_threads(args.threads)
    if not args.keep_caches:  # a cold compile every run, so that the first step shows its full cost
        inductor_config.force_disable_caches = True
    rows = [run(method, way, args) for method in args.methods for way in args.ways]
    eager = {row["method"]: row for row in rows if row["way"] == "eager"}
    # what one graph per compiled code object gives: base's count for the same way (1 whole; 3 regional, since
    # the identical blocks share one code object and the stem and head Linear another)
    plain = {"eager": 0, "whole": 1, "regional": 3}
    for row in rows:
        row["recompiles"] = max(0, row["graphs"] - plain[row["way"]])
    header = (
        "| method | compiled | graphs | recompiles | limit hit | first step (s) | median step (ms) | min step (ms) "
        "| median vs eager |"
    )
    print(
        f"torch {torch.__version__}, backend {BACKEND}, {args.threads} threads, {args.steps} steps, "
        f"MLP {args.features}-{args.width}x{args.depth}-{args.classes}, batch {args.batch_size}"
        + (", SL-SAM without requires_grad toggling" if args.no_toggle else "")
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for row in rows:
        base = eager.get(row["method"])
        ratio = row["median_step_ms"] / base["median_step_ms"] if base else float("nan")
        print(
            f"| {row['method']} | {row['way']} | {row['graphs']} | {row['recompiles']} | "
            f"{'yes' if row['limit_hit'] else 'no'} | {row['first_step_s']:.1f} | {row['median_step_ms']:.1f} | "
            f"{row['min_step_ms']:.1f} | {ratio:.2f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


BACKEND = "inductor"

if __name__ == "__main__":
    main()
