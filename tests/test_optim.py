"""``lightning_slsam.optim``: the methods as plain-PyTorch optimizers, on the same step engine as the mixin.

The reference for a plain loop is ``Trainer.fit`` with the callback of the same name on the same data (CPU,
fp32, no shuffle, same seeds): both must end with bitwise-equal weights, BatchNorm buffers and method state.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, make_dataset, quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_slsam
from lightning_slsam import optim

EPOCHS = 2
BATCHES = 3  # per epoch: 48 points in batches of 16

# (name, arguments): every method of lightning_slsam.optim, with seeds where it draws at random
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("Base", {}),
    ("SAM", {"rho": 0.1}),
    ("ASAM", {"rho": 0.5}),
    ("SLSAM", {"rho": 0.1, "sparsity": 0.5, "seed": 3}),
    ("SLSAMNoisy", {"rho": 0.1, "seed": 3}),
    ("LookSAM", {"rho": 0.1, "k": 2}),
    ("RST", {"rho": 0.1, "seed": 3}),
    ("ARSAM", {"rho": 0.1, "max_interval": 2}),
    ("LayerwiseGNP", {"rho": 0.1, "layer_fraction": 0.5}),
    ("SSAMD", {"rho": 0.1, "seed": 3}),
    ("SSAMF", {"rho": 0.1, "unperturbed_fraction": 0.6, "num_samples": 20}),  # 20: one batch and a cut one
]


class Holder(nn.Module):
    """A plain ``nn.Module`` holding the same ``model`` Sequential as ``TinyNet`` (same parameter names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def loader() -> DataLoader:
    return DataLoader(make_dataset(n=16 * BATCHES), batch_size=16, shuffle=False)


def plain_model() -> tuple[Holder, torch.optim.Optimizer]:
    net = TinyNet(batch_norm=True)  # the weights TinyNet draws; the optimizer its configure_optimizers builds
    holder = Holder(copy.deepcopy(net.model))
    return holder, torch.optim.AdamW(holder.parameters(), lr=net.lr, weight_decay=net.weight_decay)


def run_plain(name: str, kwargs: dict[str, Any], **options: Any) -> tuple[Holder, optim.SharpnessAwareOptimizer]:
    """The loop a user writes: ``start_epoch``, then ``step(closure)`` and ``zero_grad`` per batch."""
    model, base = plain_model()
    wrap = options.pop("wrap", None)
    if wrap is not None:
        model, base = wrap(model, base)
    opt = getattr(optim, name)(model, base, **kwargs, **fisher_arguments(name, model), **options)
    model.train()
    for epoch in range(EPOCHS):
        opt.start_epoch(epoch, total_epochs=EPOCHS)
        for x, y in loader():

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                return F.cross_entropy(model.model(x), y)

            opt.step(closure)
            opt.zero_grad()
    return model, opt


def fisher_arguments(name: str, model: nn.Module) -> dict[str, Any]:
    """SSAM-F's training samples (the loop's own loader) and the loss of a batch (``TinyNet.compute_loss``'s)."""
    if name != "SSAMF":
        return {}

    def loss_of(batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(model.model(x), y)

    return {"fisher_data": loader(), "fisher_loss": loss_of}


def assert_same_state(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and numbers, equal bitwise (generator states included)."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, f"{where}[{index}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, where


def assert_models_bitwise(actual: nn.Module, expected: nn.Module) -> None:
    got, want = dict(actual.named_parameters()), dict(expected.named_parameters())
    got.update(actual.named_buffers())
    want.update(expected.named_buffers())
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# --- plain loop == Trainer.fit --------------------------------------------------------------------------------
# callback options the plain API honours too: clipping, BatchNorm statistics in both passes, other arms, no replay
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("SAM", {"rho": 0.1, "clip_grad_norm": 0.05, "clip_grad_value": 0.01}),
    ("SLSAM", {"rho": 0.1, "sparsity": 0.5, "seed": 3, "arms": "module", "bn_running_stats": "both"}),
    ("SLSAM", {"rho": 0.1, "sparsity": 0.5, "seed": 3, "arms": "block", "reuse_prefix": False}),
    ("SLSAMNoisy", {"rho": 0.1, "sparsity": 0.5, "seed": 3, "second_pass_gate": 0.0}),
]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    METHODS + OPTIONS,
    ids=[name for name, _ in METHODS] + ["SAM-clip", "SLSAM-module-bn-both", "SLSAM-block-no-reuse", "SLSAMNoisy-gate"],
)
def test_plain_loop_equals_trainer_fit(name: str, kwargs: dict[str, Any]) -> None:
    module = TinyNet(batch_norm=True)
    callback = getattr(lightning_slsam, name)(**kwargs)
    quiet_trainer([callback], max_steps=-1, max_epochs=EPOCHS).fit(module, loader())
    model, opt = run_plain(name, kwargs)
    assert opt.steps == EPOCHS * BATCHES == callback.steps
    assert callback.method is not None and opt.method.name == callback.method.name
    assert_models_bitwise(model, module)
    assert_same_state(opt.method.state_dict(), callback.method.state_dict(), "method_state")
    assert_same_state(opt.skipped.state_dict(), callback.skipped.state_dict(), "skipped_steps")


@pytest.mark.parametrize("name", ["SAM", "SLSAM"])
def test_fabric_loop_equals_plain_loop(name: str) -> None:
    kwargs = dict(METHODS)[name]
    fabric = L.Fabric(accelerator="cpu", devices=1)

    def setup(model: nn.Module, base: torch.optim.Optimizer) -> tuple[Any, Any]:
        return fabric.setup(model, base)

    wrapped, fabric_opt = run_plain(name, kwargs, wrap=setup, backward=fabric.backward)
    model, opt = run_plain(name, kwargs)
    assert_models_bitwise(wrapped.module, model)
    assert_same_state(fabric_opt.method.state_dict(), opt.method.state_dict())


# --- GradScaler -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["SAM", "SLSAM"])
def test_grad_scaler_matches_unscaled_run(name: str) -> None:
    """A power-of-two loss scale: the update and the bandit's norms are those of the unscaled run."""
    kwargs = dict(METHODS)[name]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled_model, scaled = run_plain(name, kwargs, scaler=scaler)
    model, opt = run_plain(name, kwargs)
    for (key, p), q in zip(scaled_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=key)
    torch.testing.assert_close(scaled.last_step.first.arm_norms, opt.last_step.first.arm_norms)
    if name == "SLSAM":
        torch.testing.assert_close(scaled.method.probabilities(), opt.method.probabilities())


@pytest.mark.parametrize("name", ["SAM", "SLSAM"])
def test_grad_scaler_skips_an_inf_step(name: str) -> None:
    """An inf loss: the scaler skips the update and halves its scale; weights and method state stay."""
    kwargs = dict(METHODS)[name]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, base = plain_model()
    opt = getattr(optim, name)(model, base, scaler=scaler, **kwargs, **fisher_arguments(name, model))
    x, y = next(iter(loader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: F.cross_entropy(model.model(x), y).float())  # one finite step under bf16 autocast
    opt.zero_grad()
    weights = {key: p.detach().clone() for key, p in model.named_parameters()}
    method_state = copy.deepcopy(opt.method.state_dict())
    adam_state = copy.deepcopy(base.state_dict())
    scale = scaler.get_scale()
    with pytest.warns(RuntimeWarning, match="skipped global step 1"):
        opt.step(lambda: F.cross_entropy(model.model(x), y) * float("inf"))
    opt.zero_grad()
    assert opt.last_step is not None and opt.last_step.skipped
    assert opt.skipped.total == 1
    assert scaler.get_scale() == scale / 2
    for key, p in model.named_parameters():
        assert torch.equal(p, weights[key]), key
    assert_same_state(opt.method.state_dict(), method_state)
    assert_same_state(base.state_dict(), adam_state)


def test_inf_loss_without_scaler_skips_the_step() -> None:
    model, base = plain_model()
    opt = optim.SLSAM(model, base, rho=0.1, sparsity=0.5, seed=0)
    x, y = next(iter(loader()))
    weights = {key: p.detach().clone() for key, p in model.named_parameters()}
    sampler = copy.deepcopy(opt.method.state_dict())
    with pytest.warns(RuntimeWarning, match="the optimizer was not stepped"):
        opt.step(lambda: F.cross_entropy(model.model(x), y) * float("nan"))
    for key, p in model.named_parameters():
        assert torch.equal(p, weights[key]), key
    assert_same_state(opt.method.state_dict(), sampler)


# --- state_dict -----------------------------------------------------------------------------------------------
def test_state_dict_resumes_exactly() -> None:
    kwargs = dict(METHODS)["SLSAM"]
    batches = list(loader())

    def steps(opt: optim.SharpnessAwareOptimizer, model: Holder, chunk: list[Any]) -> None:
        for x, y in chunk:
            opt.step(lambda x=x, y=y: F.cross_entropy(model.model(x), y))
            opt.zero_grad()

    model, base = plain_model()
    opt = optim.SLSAM(model, base, **kwargs)
    steps(opt, model, batches[:2])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    steps(opt, model, batches[2:])

    resumed, resumed_base = plain_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = optim.SLSAM(resumed, resumed_base, **{**kwargs, "seed": 99})  # the state overrides the seed
    resumed_opt.load_state_dict(saved_opt)
    steps(resumed_opt, resumed, batches[2:])
    assert_models_bitwise(resumed, model)
    assert_same_state(resumed_opt.state_dict(), opt.state_dict())

    other = optim.SAM(*plain_model())
    with pytest.raises(ValueError, match="state_dict"):
        other.load_state_dict(saved_opt)


# --- argument checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda m, b: optim.SAM(object(), b), "model"),  # type: ignore[arg-type]
        (lambda m, b: optim.SAM(m, object()), "base_optimizer"),  # type: ignore[arg-type]
        (lambda m, b: optim.SAM(m, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)), "base_optimizer"),
        (lambda m, b: optim.SAM(m, b, rho=-1.0), "rho"),
        (lambda m, b: optim.SLSAM(m, b, sparsity=2.0), "sparsity"),
        (lambda m, b: optim.SLSAM(m, b, bandit_lr=float("nan")), "bandit_lr"),
        (lambda m, b: optim.LookSAM(m, b, k=0), "k"),
        (lambda m, b: optim.SAM(m, b, arms="layers"), "arms"),
        (lambda m, b: optim.SAM(m, b, accumulate=2), "accumulate"),
        (lambda m, b: optim.SAM(m, b, history_every=2), "history_every"),
        (lambda m, b: optim.SAM(m, b, scaler="fp16"), "scaler"),
        (lambda m, b: optim.SAM(m, b, backward=1), "backward"),
        (lambda m, b: optim.SSAMF(m, b, fisher_data=iter(loader())), "fisher_data"),  # used up by one refresh
        (lambda m, b: optim.SSAMF(m, b, fisher_data=loader()), "fisher_loss"),  # Holder has no compute_loss
        (lambda m, b: optim.SSAMF(m, b, fisher_data=loader(), fisher_loss=1), "fisher_loss"),
        (
            lambda m, b: optim.SSAMF(m, b, fisher_data=loader(), fisher_loss=len, unperturbed_fraction=2),
            "unperturbed_fraction",
        ),
    ],
)
def test_bad_arguments_name_the_argument(build: Any, argument: str) -> None:
    model, base = plain_model()
    with pytest.raises(ValueError, match=f"^{argument}:"):
        build(model, base)


def test_bad_closure_names_the_closure() -> None:
    model, base = plain_model()
    opt = optim.SAM(model, base)
    with pytest.raises(ValueError, match=r"^closure:"):
        opt.step(None)  # type: ignore[arg-type]
    x, _ = next(iter(loader()))
    with pytest.raises(ValueError, match=r"^closure:.*shape"):
        opt.step(lambda: model.model(x))
    for p in model.parameters():  # the step restored requires_grad although the closure failed
        assert p.requires_grad
    with pytest.raises(ValueError, match=r"^epoch:"):
        opt.start_epoch(-1)


# --- DistributedDataParallel (2 CPU processes, gloo) ----------------------------------------------------------
DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_optim.py"


def run_ddp_script(out: Path, steps: int) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    # the package of this checkout, also where another one is installed (editable install, worktrees)
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    args = [sys.executable, str(DDP_SCRIPT), str(out), str(steps)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_ddp_replicas_agree_and_gradients_are_averaged(tmp_path: Path) -> None:
    """SL-SAM on a DDP-wrapped model: the ranks sample the same arms (seed broadcast, checked every step) and
    stay bitwise equal; the base optimizer on two half batches takes the steps of one process on the whole."""
    rank0, rank1 = run_ddp_script(tmp_path, steps=6)
    assert rank0["world_size"] == 2
    for name, value in rank0["slsam"]["params"].items():
        assert torch.equal(value, rank1["slsam"]["params"][name]), name
    probs = rank0["slsam"]["probs"]
    assert torch.equal(probs, rank1["slsam"]["probs"])
    assert not torch.allclose(probs, torch.full_like(probs, 0.4))  # the bandit learned
    for name, value in rank0["single"]["params"].items():
        torch.testing.assert_close(rank0["plain"]["params"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), METHODS, ids=[name for name, _ in METHODS])
def test_a_float64_model_trains(name: str, kwargs: dict[str, Any]) -> None:
    """float64 weights: the per-tensor norms and the finiteness check must not narrow them to float32 (torch
    refuses); ``Base`` is then exactly plain SGD."""
    torch.manual_seed(0)
    model = Holder(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))).double()
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    opt = getattr(optim, name)(
        model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs, **fisher_arguments(name, model)
    )
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = torch.randn(48, 4, dtype=torch.float64), torch.randint(0, 3, (48,))
    if name == "SSAMF":
        opt.fisher_data = [(x[:16], y[:16])]
    opt.start_epoch(0, total_epochs=1)
    for xb, yb in zip(x.split(16), y.split(16), strict=True):
        opt.step(lambda xb=xb, yb=yb: F.cross_entropy(model.model(xb), yb))
        opt.zero_grad()
        plain.zero_grad()
        F.cross_entropy(reference.model(xb), yb).backward()
        plain.step()
    assert opt.skipped.total == 0 and all(p.dtype == torch.float64 for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters(), strict=True))
    if name == "Base":
        assert_models_bitwise(model, reference)


# --- a torch.optim.Optimizer over the base optimizer's groups and state ------------------------------------------
NAMED = [cls.__name__ for cls in optim.NAMED_OPTIMIZERS if cls.__name__ != "SSAMF"]  # SSAMF needs fisher_data


def _plain(name: str, model: nn.Module, base: torch.optim.Optimizer) -> optim.SharpnessAwareOptimizer:
    return getattr(optim, name)(model, base, rho=0.05) if name != "Base" else optim.Base(model, base)


@pytest.mark.parametrize("name", NAMED)
def test_an_lr_scheduler_runs_straight_on_the_wrapper(name: str) -> None:
    """``StepLR(opt)`` accepts the wrapper (an Optimizer) and changes the rate the base optimizer steps with,
    exactly as the same scheduler on the base optimizer alone would."""
    model = TinyNet().model
    # the Momentum-SAM methods perturb along the optimizer's momentum and refuse an optimizer without one
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9 if "MSAM" in name else 0.0)
    opt = _plain(name, model, base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = make_dataset(16).tensors
    rates = []
    for _ in range(5):
        rates.append(base.param_groups[0]["lr"])
        opt.step(lambda: F.cross_entropy(model(x), y))
        scheduler.step()
    assert rates == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert scheduler.state_dict()["_step_count"] == 6  # torch saw every step: no "step before optimizer.step" warning


def test_add_param_group_on_the_wrapper_reaches_the_base_and_trains_once_per_step() -> None:
    """A group added through the wrapper is the base optimizer's, and the next step gives it one gradient: its
    SGD update equals lr times the gradient at w + e of SAM (never g(w) + g(w + e))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    head = list(model[2].parameters())
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    for p in head:
        p.requires_grad_(False)
    opt = optim.SAM(model, base, rho=0.05)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt.step(lambda: F.cross_entropy(model(x), y))
    for p in head:
        p.requires_grad_(True)
    opt.add_param_group({"params": head, "lr": 0.2})
    assert len(base.param_groups) == 2 and base.param_groups[1]["lr"] == 0.2
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in head]
    # the reference: SAM's g(w + e) over every trainable parameter, by hand
    loss = F.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads, strict=True):
            p.add_(0.05 * g / norm)
    perturbed = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
    opt.step(lambda: F.cross_entropy(model(x), y))
    for p, p0, g in zip(head, before, perturbed[2:], strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.2 * g)


def test_the_wrappers_groups_and_state_are_read_only_views() -> None:
    model = TinyNet().model
    opt = optim.SAM(model, torch.optim.AdamW(model.parameters()), rho=0.05)
    with pytest.raises(AttributeError, match=r"^param_groups: they are the base optimizer's"):
        opt.param_groups = []
    with pytest.raises(AttributeError, match=r"^state: it is the base optimizer's"):
        opt.state = {}
