"""Fine-tuning is never silently wrong: freezing schedules, late parameter groups, interruptions, unused parameters.

Each numeric case is checked against a plain reference written out here (a SAM step by ``torch.autograd.grad`` on
exactly the parameters that should train), through ``Trainer.fit`` with the callback and through the plain
``lightning_slsam.optim`` loop where both apply.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import IN_FEATURES, NUM_CLASSES, TinyNet, make_dataset, quiet_trainer, snapshot
from lightning.pytorch.callbacks import BackboneFinetuning, OnExceptionCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_slsam
from lightning_slsam import SAM, SLSAM, Base, SharpnessAwareMixin, SLSAMNoisy, optim
from lightning_slsam.lightning_adapter.callback import CALLBACKS

RHO = 0.05
LR = 0.1
BATCHES = 4  # per epoch


def loader() -> DataLoader:
    return DataLoader(make_dataset(n=16 * BATCHES), batch_size=16, shuffle=False)


class BackboneNet(SharpnessAwareMixin, L.LightningModule):
    """``backbone`` (Linear, Tanh, Linear, Tanh) and ``head`` (Linear); SGD without momentum over the parameters
    that require grad (the convention ``BackboneFinetuning`` expects), so one step is ``w - lr * g``; ``momentum``
    gives SGD one (the Momentum-SAM methods perturb along it)."""

    def __init__(self, seed: int = 0, momentum: float = 0.0) -> None:
        super().__init__()
        self.momentum = momentum
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
            self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR, momentum=self.momentum)


# --- the plain reference ------------------------------------------------------------------------------------------
def reference_sam_update(
    model: BackboneNet, batch: Any, groups: list[tuple[float, list[str]]], rho: float
) -> dict[str, Tensor]:
    """One SAM step with SGD written out: the parameters that train are those the optimizer holds that require
    grad; ``e = rho g / ||g||`` over them alone; each moves by ``-lr g(w + e)``, one gradient per step."""
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    train = [(lr, name) for lr, names in groups for name in names if named[name].requires_grad]
    params = [named[name] for _, name in train]
    grads = torch.autograd.grad(model.compute_loss(batch), params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g * (rho / (norm + 1e-12)))
    grads2 = torch.autograd.grad(model.compute_loss(batch), params)
    after = {name: p.detach().clone() for name, p in named.items()}
    for (lr, name), w0, g2 in zip(train, w, grads2, strict=True):
        after[name] = w0 - lr * g2
    return after


class StepRecorder(L.Callback):
    """Before every training batch: the weights, the batch, the optimizer's (lr, parameter names) groups and the
    ``requires_grad`` flags; at the end of training the final weights."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.final: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        names = {id(p): n for n, p in module.named_parameters()}
        groups = [(g["lr"], [names[id(p)] for p in g["params"]]) for g in trainer.optimizers[0].param_groups]
        self.records.append(
            {
                "epoch": trainer.current_epoch,
                "weights": snapshot(module),
                "batch": [t.clone() for t in batch],
                "groups": groups,
                "flags": {n: p.requires_grad for n, p in module.named_parameters()},
            }
        )

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.final = snapshot(module)


def check_against_reference(records: list[dict[str, Any]], final: dict[str, Tensor], rho: float) -> None:
    """Each recorded step's weights follow from the previous record by the reference SAM step."""
    for k, record in enumerate(records):
        model = BackboneNet()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(record["weights"][name])
                p.requires_grad_(record["flags"][name])
        want = reference_sam_update(model, record["batch"], record["groups"], rho)
        got = records[k + 1]["weights"] if k + 1 < len(records) else final
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=lambda m, k=k, name=name: f"step {k} {name}: {m}")


# --- freezing schedules through the Trainer ---------------------------------------------------------------------
def test_backbone_finetuning_holds_and_unfrozen_layers_take_one_gradient_per_step() -> None:
    """Lightning's BackboneFinetuning: the backbone stays bitwise unchanged until its unfreeze epoch (the step
    never turns its requires_grad back on), and every step before and after it equals the reference SAM step over
    the parameters the optimizer holds, the late parameter group included (no g(w) + g(w + e))."""
    recorder = StepRecorder()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)
    module = BackboneNet()
    start = snapshot(module)
    trainer = quiet_trainer([SAM(rho=RHO), finetuning, recorder], max_steps=3 * BATCHES)
    trainer.fit(module, loader())
    records = recorder.records
    epoch0 = [r for r in records if r["epoch"] == 0] + [next(r for r in records if r["epoch"] == 1)]
    for record in epoch0:
        for name in start:
            if name.startswith("backbone."):
                assert torch.equal(record["weights"][name], start[name]), f"{name} moved while frozen"
                assert record["flags"][name] is False or record["epoch"] == 1
    assert not torch.equal(recorder.final["backbone.0.weight"], start["backbone.0.weight"])
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone's group, added at epoch 1
    check_against_reference(records, recorder.final, RHO)


class FreezeAt(L.Callback):
    """Freeze ``prefix``'s parameters at the start of epoch ``epoch`` (as a user's own schedule would)."""

    def __init__(self, prefix: str, epoch: int) -> None:
        self.prefix, self.epoch = prefix, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            for name, p in module.named_parameters():
                if name.startswith(self.prefix):
                    p.requires_grad_(False)


#: the methods that perturb along the optimizer's momentum (an optimizer without one is refused)
MOMENTUM_METHODS = ("msam", "sparse_msam")


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_a_layer_frozen_during_training_stays_frozen(name: str) -> None:
    """Every method: a layer frozen at epoch 1 keeps requires_grad=False and its values from then on."""
    kwargs: dict[str, Any] = {"rho": RHO} if name != "base" else {}
    if name in ("slsam", "slsam_noisy", "rst", "ssam_d", "sparse_msam"):
        kwargs["seed"] = 0
    if name == "ssam_f":
        kwargs.update(num_samples=8, per_sample="loop")
    module = BackboneNet(momentum=0.9 if name in MOMENTUM_METHODS else 0.0)
    recorder = StepRecorder()
    trainer = quiet_trainer([CALLBACKS[name](**kwargs), FreezeAt("backbone.", 1), recorder], max_steps=3 * BATCHES)
    trainer.fit(module, loader())
    frozen_from = next(r for r in recorder.records if r["epoch"] == 1)["weights"]
    for record in [r for r in recorder.records if r["epoch"] >= 1]:
        assert all(flag is False for n, flag in record["flags"].items() if n.startswith("backbone."))
        for n in frozen_from:
            if n.startswith("backbone."):
                assert torch.equal(record["weights"][n], frozen_from[n]), f"{name}: {n} moved after freezing"
    assert all(not p.requires_grad for p in module.backbone.parameters())
    assert all(p.requires_grad for p in module.head.parameters())


@pytest.mark.parametrize(
    "callback", [lambda: SLSAM(rho=RHO, sparsity=0.5, seed=0), lambda: SLSAMNoisy(rho=RHO, seed=0)]
)
def test_slsam_samples_only_trainable_arms_and_follows_an_unfreeze(callback: Callable[[], Any]) -> None:
    """SL-SAM (and slsam_noisy, whose pinned head is then its only trainable arm) samples only arms with a trainable
    parameter; after the unfreeze the sampler covers the backbone too, with the same random stream going on."""
    module = BackboneNet()
    sam = callback()
    recorder = StepRecorder()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)
    trainer = quiet_trainer([sam, finetuning, recorder], max_steps=3 * BATCHES)
    trainer.fit(module, loader())
    names = sam.layout.names
    backbone = torch.tensor([n.startswith("backbone.") for n in names])
    probs = sam.probabilities()
    assert bool((probs[backbone] > 0).all())  # sampled after the unfreeze
    assert int(sam.selection_counts[backbone].sum()) > 0
    start = snapshot(BackboneNet())
    for record in [r for r in recorder.records if r["epoch"] == 0]:
        assert all(torch.equal(record["weights"][n], start[n]) for n in start if n.startswith("backbone."))


# --- the plain loop: late parameter groups, an optimizer over half the model ---------------------------------------
def plain_records(
    opt: Any, model: BackboneNet, base: torch.optim.Optimizer, steps: int, on_step: Callable[[int], None]
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    records = []
    batches = list(loader())
    for k in range(steps):
        on_step(k)
        batch = batches[k % len(batches)]
        records.append(
            {
                "weights": snapshot(model),
                "batch": batch,
                "groups": [(g["lr"], [names[id(p)] for p in g["params"]]) for g in base.param_groups],
                "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            }
        )
        opt.step(lambda batch=batch: model.compute_loss(batch))
        opt.zero_grad()
    return records, snapshot(model)


def test_plain_loop_with_a_parameter_group_added_mid_run() -> None:
    """optim.SAM over the head only while the backbone is frozen; at step 4 the backbone is unfrozen and added with
    add_param_group: every step equals the reference (one gradient per step, the new group's own lr)."""
    model = BackboneNet()
    model.backbone.requires_grad_(False)
    base = torch.optim.SGD(model.head.parameters(), lr=LR)
    opt = optim.SAM(model, base, rho=RHO)

    def unfreeze(k: int) -> None:
        if k == 4:
            model.backbone.requires_grad_(True)
            base.add_param_group({"params": list(model.backbone.parameters()), "lr": LR / 2})

    records, final = plain_records(opt, model, base, 8, unfreeze)
    check_against_reference(records, final, RHO)
    assert not torch.equal(final["backbone.0.weight"], records[4]["weights"]["backbone.0.weight"])


def test_plain_loop_optimizer_over_half_the_model_ascends_exactly_rho_on_that_half() -> None:
    """The optimizer holds the head only; the backbone requires grad but is not the optimizer's: the ascent is
    rho over the head alone, the backbone is neither perturbed nor changed, and the step equals the reference."""
    model = BackboneNet()
    base = torch.optim.SGD(model.head.parameters(), lr=LR)
    opt = optim.SAM(model, base, rho=0.5)
    batch = next(iter(loader()))
    seen: list[dict[str, Tensor]] = []

    def closure() -> Tensor:
        seen.append(snapshot(model))
        return model.compute_loss(batch)

    before = snapshot(model)
    want = reference_sam_update(model, batch, [(LR, ["head.weight", "head.bias"])], 0.5)
    opt.step(closure)
    at_w, at_w_plus_e = seen
    ascent = {n: at_w_plus_e[n] - at_w[n] for n in at_w}
    head_norm = torch.sqrt(sum(ascent[n].double().square().sum() for n in ("head.weight", "head.bias")))
    torch.testing.assert_close(head_norm, torch.tensor(0.5, dtype=torch.float64), rtol=1e-5, atol=0)
    assert all(torch.equal(ascent[n], torch.zeros_like(ascent[n])) for n in ascent if n.startswith("backbone."))
    after = snapshot(model)
    for n in after:
        torch.testing.assert_close(after[n], want[n])
        if n.startswith("backbone."):
            assert torch.equal(after[n], before[n])
    assert all(p.requires_grad for p in model.parameters())  # the user's flags, as they were


def test_slsam_over_half_the_model_samples_only_the_optimizer_arms() -> None:
    """Under SL-SAM every step samples among the arms the optimizer holds: each step updates something."""
    model = BackboneNet()
    base = torch.optim.SGD(model.head.parameters(), lr=LR)
    opt = optim.SLSAM(model, base, rho=RHO, sparsity=0.5, seed=0)
    head = torch.tensor([n.startswith("head.") for n in opt.layout.names])
    batches = list(loader())
    for k in range(20):
        before = snapshot(model)
        opt.step(lambda batch=batches[k % BATCHES]: model.compute_loss(batch))
        assert bool(opt.last_step.active1.any())
        assert not bool((opt.last_step.active1 & ~head).any())
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        assert moved and all(n.startswith("head.") for n in moved), f"step {k} moved {sorted(moved)}"


def test_a_parameter_outside_the_model_is_refused() -> None:
    model = BackboneNet()
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^base_optimizer: it holds 1 parameter\(s\) that are not the model's"):
        optim.SAM(model, torch.optim.SGD([*model.parameters(), extra], lr=LR), rho=RHO)
    opt = optim.SAM(model, torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    opt.base_optimizer.add_param_group({"params": [extra]})
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^base_optimizer: it holds 1 parameter"):
        opt.step(lambda: model.compute_loss(next(iter(loader()))))
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- interruptions: w is restored at every point, and no checkpoint holds w + e ---------------------------------------
def _traced_lines(run: Callable[[], Any], interrupt_at: int | None) -> int:
    """Run ``run`` with a line tracer on the package's code; raise KeyboardInterrupt at line event
    ``interrupt_at`` (as a SIGINT at that point would). Returns the number of line events."""
    package = os.path.dirname(lightning_slsam.__file__)
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if not frame.f_code.co_filename.startswith(package):
            return None
        if event == "line":
            if count == interrupt_at:
                count += 1
                raise KeyboardInterrupt(f"line {count}")
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda m, b: optim.SAM(m, b, rho=RHO),
        lambda m, b: optim.SLSAM(m, b, rho=RHO, sparsity=0.5, seed=0),
        lambda m, b: optim.SLSAMNoisy(m, b, rho=RHO, seed=0),
    ],
    ids=["sam", "slsam", "slsam_noisy"],
)
def test_an_interrupt_at_every_line_of_a_step_leaves_no_perturbed_weight(make: Callable[..., Any]) -> None:
    """A KeyboardInterrupt raised at each line the package runs during one step (a Ctrl-C there): afterwards the
    weights are the step's start or its end (slsam_noisy: or its end before the update scaling, a plain optimizer
    update), never w + e, and the user's requires_grad flags are as they were."""
    batch = next(iter(loader()))

    def fresh() -> tuple[BackboneNet, Any]:
        model = BackboneNet()
        model.head.bias.requires_grad_(False)  # a frozen parameter the step must hand back frozen
        return model, make(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR))

    model, opt = fresh()
    start = snapshot(model)
    lines = _traced_lines(lambda: opt.step(lambda: model.compute_loss(batch)), None)
    end = snapshot(model)
    assert lines > 50
    outcomes = {"w (the step's start)": start, "the step's result": end}
    if getattr(opt.method, "max_update_scale", None):  # slsam_noisy scales the update after the optimizer step
        model, opt = fresh()
        opt.method._scale_updates = lambda: setattr(opt.method, "_before", None)
        opt.step(lambda: model.compute_loss(batch))
        outcomes["the optimizer's update, not yet scaled"] = snapshot(model)
    seen = set()
    for k in range(lines):
        model, opt = fresh()
        with contextlib.suppress(KeyboardInterrupt):
            _traced_lines(lambda model=model, opt=opt: opt.step(lambda: model.compute_loss(batch)), k)
        weights = snapshot(model)
        found = [what for what, o in outcomes.items() if all(torch.equal(weights[n], o[n]) for n in o)]
        assert found, f"interrupted at line {k}: the weights are none of {list(outcomes)}"
        seen.update(found)
        assert model.head.bias.requires_grad is False, f"line {k}: a frozen parameter was left trainable"
        assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.bias"), f"line {k}"
    assert seen == set(outcomes)  # every outcome was reached by some interrupt point


class StagedNet(BackboneNet):
    """Raises KeyboardInterrupt (or sends itself a signal) during a given pass of a given step."""

    def __init__(self, step: int, at_pass: int, action: str = "interrupt") -> None:
        super().__init__()
        self.fault_step, self.fault_pass, self.action = step, at_pass, action
        self.before: dict[str, Tensor] | None = None
        self.calls = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == self.fault_step:
            self.before = snapshot(self)

    def compute_loss(self, batch: Any) -> Tensor:
        loss = super().compute_loss(batch)
        if self.trainer.global_step == self.fault_step and self.sam_pass == self.fault_pass:
            if self.action == "interrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's requeue warning: Lightning saves a checkpoint now
        return loss


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("at_pass", [1, 2])
def test_ctrl_c_in_a_pass_leaves_weights_and_the_exception_checkpoint_at_w(
    at_pass: int, tmp_path: Path, restore_signals: None
) -> None:
    """Ctrl-C during pass 1 or pass 2 of step 2 under the Trainer: Lightning's graceful shutdown runs the
    OnExceptionCheckpoint, which must hold w (the weights at that step's start), and so must the module."""
    module = StagedNet(step=2, at_pass=at_pass)
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    trainer = quiet_trainer([SAM(rho=RHO), saver], max_steps=6, enable_checkpointing=True, default_root_dir=tmp_path)
    with pytest.raises(SystemExit):  # Lightning exits after a KeyboardInterrupt
        trainer.fit(module, loader())
    assert module.before is not None
    weights = snapshot(module)
    assert all(torch.equal(weights[n], module.before[n]) for n in weights)
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[n], module.before[n]) for n in module.before)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 is a POSIX signal")
def test_slurm_requeue_signal_during_pass_2_saves_w(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_signals: None
) -> None:
    """SLURM's requeue signal (SIGUSR1) arrives during pass 2, at w + e: Lightning's handler writes
    hpc_ckpt_1.ckpt on the spot; the checkpoint holds w, and training goes on from w."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "123",
        "SLURM_JOB_NAME": "train",
        "PATH": "/nonexistent",
    }.items():
        monkeypatch.setenv(key, value)
    module = StagedNet(step=2, at_pass=2, action="signal")
    trainer = quiet_trainer(
        [SAM(rho=RHO)], max_steps=4, plugins=[SLURMEnvironment(auto_requeue=True)], default_root_dir=tmp_path
    )
    trainer.fit(module, loader())
    written = list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert written, "Lightning's requeue handler wrote no checkpoint"
    saved = torch.load(written[0], weights_only=False)["state_dict"]
    assert module.before is not None
    assert all(torch.equal(saved[n], module.before[n]) for n in module.before)


# --- losses that cannot train, and unused parameters ------------------------------------------------------------------
class NoGradNet(TinyNet):
    def compute_loss(self, batch: Any) -> Tensor:
        with torch.no_grad():
            return super().compute_loss(batch)


@pytest.mark.parametrize("callbacks", [[], [Base()], [SAM(rho=RHO)]], ids=["no-callback", "base", "sam"])
def test_a_loss_under_no_grad_is_an_error_not_a_silent_run(callbacks: list[Any]) -> None:
    module = NoGradNet()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match=r"^loss: no trainable parameter received a gradient"):
        quiet_trainer(list(callbacks), max_steps=3).fit(module, loader())
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


@pytest.mark.parametrize("name", ["Base", "SAM", "LookSAM"])
def test_plain_loop_loss_under_no_grad_is_an_error(name: str) -> None:
    """A dense pass 1 (every trainable arm active) without a gradient is refused at once."""
    model = TinyNet()
    opt = getattr(optim, name)(model, torch.optim.SGD(model.parameters(), lr=LR))
    batch = next(iter(loader()))
    with pytest.raises(RuntimeError, match=r"^loss: no trainable parameter received a gradient"):
        opt.step(lambda: model.compute_loss(batch).detach())


@pytest.mark.parametrize("name", ["SLSAM", "SLSAMNoisy"])
def test_slsam_warns_when_no_sampled_parameter_gets_a_gradient_for_many_steps(name: str) -> None:
    """Plain SL-SAM samples a few tensors per step; a step without gradient may be an idle head, many in a row
    are a detached loss: warned once they reach NO_GRADIENT_WARN_STEPS."""
    from lightning_slsam.engine.step import NO_GRADIENT_WARN_STEPS

    model = TinyNet()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.model = nn.Sequential(nn.Linear(IN_FEATURES, 8), *[nn.Linear(8, 8) for _ in range(8)], nn.Linear(8, 3))
    before = snapshot(model)
    # 20 tensors (slsam_noisy: 9 sampled weights): all of them active at once has probability < 1e-8
    opt = getattr(optim, name)(model, torch.optim.SGD(model.parameters(), lr=LR), sparsity=0.1, seed=0)
    batch = next(iter(loader()))
    with pytest.warns(UserWarning, match="no sampled parameter received a gradient in 20 steps in a row"):
        for _ in range(NO_GRADIENT_WARN_STEPS):
            opt.step(lambda: model.compute_loss(batch).detach())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class AuxHeadNet(TinyNet):
    """TinyNet with an auxiliary head that the loss never uses (a multi-task model's idle head)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.aux = nn.Linear(16, 3)


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_an_unused_parameter_is_normal_for_every_method(name: str) -> None:
    """Every method trains a model with an unused head, through Trainer.fit and the plain loop; SL-SAM also on
    steps whose sampled arms all got no gradient. The unused head never moves."""
    kwargs: dict[str, Any] = {} if name == "base" else {"rho": RHO}
    if name in ("slsam", "slsam_noisy", "rst", "ssam_d", "sparse_msam"):
        kwargs["seed"] = 0
    if name == "slsam":
        kwargs["sparsity"] = 0.25
    if name == "ssam_f":
        kwargs.update(num_samples=8, per_sample="loop")
    module = AuxHeadNet()
    aux = snapshot(module.aux)
    quiet_trainer([CALLBACKS[name](**kwargs)], max_steps=12).fit(module, loader())
    assert all(torch.equal(p, aux[n]) for n, p in module.aux.named_parameters())
    if name == "ssam_f":
        return  # its plain class takes fisher_data; covered by the Trainer run above
    model = AuxHeadNet()
    opt = getattr(optim, CALLBACKS[name].__name__)(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kwargs)
    for batch in list(loader()) * 3:
        opt.step(lambda batch=batch: model.compute_loss(batch))
    assert all(torch.equal(p, aux[n]) for n, p in model.aux.named_parameters())


def test_slsam_step_whose_sampled_arms_got_no_gradient_proceeds() -> None:
    """Only the unused head sampled: no ascent, no update, the bandit learns a zero norm; no crash."""
    model = AuxHeadNet()
    opt = optim.SLSAM(model, torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, sparsity=0.2, seed=0)
    aux_arms = torch.tensor([n.startswith("aux.") for n in opt.layout.names])
    only_aux = 0
    for batch in list(loader()) * 15:
        before = snapshot(model)
        opt.step(lambda batch=batch: model.compute_loss(batch))
        if bool(opt.last_step.active1.any()) and not bool((opt.last_step.active1 & ~aux_arms).any()):
            only_aux += 1
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert not opt.last_step.skipped
    assert only_aux > 0, "no step sampled only the unused head; pick another seed"


class TiedLM(SharpnessAwareMixin, L.LightningModule):
    """A tiny language model whose output head shares the embedding matrix (as most causal LMs do)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = nn.Embedding(20, 8)
            self.mix = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def compute_loss(self, batch: Any) -> Tensor:
        tokens = batch[0]
        hidden = self.norm(torch.tanh(self.mix(self.embed(tokens[:, :-1]))))
        return F.cross_entropy(self.lm_head(hidden).flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_slsam_noisy_pins_a_tied_head_through_the_shared_tensor() -> None:
    tokens = torch.randint(0, 20, (64, 6), generator=torch.Generator().manual_seed(0))
    data = DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=16)
    module = TiedLM()
    callback = SLSAMNoisy(rho=RHO, seed=0)
    quiet_trainer([callback], max_steps=6).fit(module, data)
    embed = callback.layout.names.index("embed.weight")
    assert int(callback.selection_counts[embed]) == 6  # pinned: active on every step


# --- refused by name at setup ---------------------------------------------------------------------------------------
class ComplexNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex64))


class SparseEmbeddingNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 4, sparse=True)


@pytest.mark.parametrize(
    ("module_class", "message"),
    [
        (ComplexNet, "^phase: complex parameters are not supported"),
        (SparseEmbeddingNet, r"^table: Embedding\(sparse=True\)"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(module_class: type[TinyNet], message: str) -> None:
    model = module_class()
    with pytest.raises(ValueError, match=message):
        optim.SAM(model, torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    with pytest.raises(ValueError, match=message):
        quiet_trainer([SAM(rho=RHO)], max_steps=1).fit(module_class(), loader())


# --- arguments ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [3.5e38, 1e40])
def test_a_radius_float32_cannot_hold_is_refused(rho: float) -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"^rho: .*float32"):
        optim.SAM(model, torch.optim.SGD(model.parameters(), lr=LR), rho=rho)
    with pytest.raises(ValueError, match=r"^rho: .*float32"):
        SAM(rho=rho)


@pytest.mark.parametrize("sparsity", [1e-6, 1e-9])
def test_a_sparsity_that_would_stall_the_sampler_is_refused(sparsity: float) -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"^sparsity: "):
        optim.SLSAM(model, torch.optim.SGD(model.parameters(), lr=LR), sparsity=sparsity)
    with pytest.raises(ValueError, match=r"^sparsity: "):
        quiet_trainer([SLSAM(sparsity=max(sparsity, 1e-8))], max_steps=1).fit(TinyNet(), loader())


def test_load_state_dict_refuses_what_it_did_not_write() -> None:
    model = TinyNet()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    opt = optim.SLSAM(model, base, seed=0)
    with pytest.raises(ValueError, match=r"^state_dict: SLSAM.load_state_dict takes .*base optimizer's own"):
        opt.load_state_dict(base.state_dict())
    state = opt.state_dict()
    del state["method_state"]["sampler"]
    with pytest.raises(ValueError, match=r"^state: SL-SAM's state has no 'sampler' entry"):
        opt.load_state_dict(state)


def test_a_slsam_plus_state_from_before_the_dense_update_is_refused_not_resumed_as_dense() -> None:
    """A state named slsam_plus without the dense_update flag was written by the sparse, scaled update (now
    slsam_noisy): resuming it as the dense update would silently change the run's rule."""
    model = TinyNet()
    opt = optim.SLSAMPlus(model, torch.optim.AdamW(model.parameters(), lr=LR), seed=0)
    state = opt.state_dict()
    assert state["method_state"]["dense_update"] is True
    before = {k: v.clone() for k, v in opt.method.sampler.state_dict().items() if isinstance(v, torch.Tensor)}
    del state["method_state"]["dense_update"]
    with pytest.raises(ValueError, match=r"^state: this slsam_plus checkpoint was written before .*slsam_noisy"):
        opt.load_state_dict(state)
    after = opt.method.sampler.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded
    noisy = optim.SLSAMNoisy(model, torch.optim.AdamW(model.parameters(), lr=LR), seed=0)
    saved = noisy.state_dict()
    assert saved["method_state"]["dense_update"] is False
    noisy.load_state_dict(saved)


def test_a_closure_that_calls_backward_gets_a_clear_error() -> None:
    model = TinyNet()
    opt = optim.SAM(model, torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    batch = next(iter(loader()))
    before = snapshot(model)

    def closure() -> Tensor:
        loss = model.compute_loss(batch)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"^closure: it called backward itself"):
        opt.step(closure)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- the probability history is bounded ---------------------------------------------------------------------------
def test_probability_history_is_bounded_and_covers_the_whole_run() -> None:
    callback = SLSAM(sparsity=0.5, seed=0, history_size=4)
    quiet_trainer([callback], max_steps=20).fit(TinyNet(), loader())
    history = callback.probability_history()
    assert history is not None and 3 <= history.shape[0] <= 4
    assert callback.history_interval == 8  # 1 -> 2 -> 4 -> 8 as the records filled up
    assert callback.state_dict()["history_interval"] == 8
    with pytest.raises(ValueError, match=r"^history_size: "):
        SLSAM(history_size=1)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method=slsam", "method.sparsity=1e-9"], "method.sparsity"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["optimizer.lr=nan"], "optimizer.lr"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
        (["method=slsam", "method.seed=18446744073709551616"], "method.seed"),
        (["method.rho=1e40"], "method.rho"),
    ],
)
def test_hydra_errors_name_the_key(overrides: list[str], key: str, tmp_path: Path, monkeypatch: Any) -> None:
    """From the command line each of these is one ConfigError line naming the key, before a model is built."""
    from conftest import SHRINK, compose_config

    from lightning_slsam.app.cli import ConfigError, train

    def build_nothing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built although the configuration is invalid")

    monkeypatch.setattr("lightning_slsam.models.factory.build_network", build_nothing)
    cfg = compose_config([*overrides, *SHRINK], str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^{key}: ") as error:
        train(cfg)
    assert "\n" not in str(error.value)
