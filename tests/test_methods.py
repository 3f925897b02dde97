"""The competitor methods (LayerwiseGNP, LookSAM, RST, ASAM) through a real ``Trainer.fit``, against references.

Each reference is a slow, obviously-right loop written here on a deepcopy of ``module.model``:
``torch.autograd.grad`` for the gradients, a python loop for the ascent and the restore, and its own
``torch.optim.AdamW`` (TinyNet's settings) for the update. Where a method reduces to another one (SAM, the
base optimizer) the two library runs are compared bitwise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH_SIZE, TinyNet, assert_models_equal, make_dataset
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_slsam import ASAM, MSAM, RST, SAM, SLSAM, Base, LayerwiseGNP, LookSAM, SharpnessAware, SparseMSAM

LR = 1e-2  # TinyNet's defaults, which the references copy
WEIGHT_DECAY = 0.1
RHO = 0.2
PREFIX = "model."
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


# --- helpers ------------------------------------------------------------------------------------------------------
def take(loader: DataLoader, k: int) -> list[Any]:
    """The first ``k`` batches the Trainer sees with ``max_steps=k`` (the no-shuffle loader cycled over epochs)."""
    batches = list(loader)
    return [batches[i % len(batches)] for i in range(k)]


def assert_models_close(actual: nn.Module, expected: nn.Module) -> None:
    got, want = dict(actual.named_parameters()), dict(expected.named_parameters())
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}", **TOLERANCE)


def models_close(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def loss_at(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def norm_of(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def gradient_at_perturbed(
    model: nn.Module, batch: Any, params: Sequence[nn.Parameter], ascent: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """``w <- w + e`` on ``params``, the gradient of the loss w.r.t. ``params`` there, then ``w`` put back."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ascent, strict=True):
            p.add_(e)
    grads = torch.autograd.grad(loss_at(model, batch), list(params))
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    return grads


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def apply_update(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StepRecorder(L.Callback):
    """Per optimizer step: every ``compute_loss`` call (with the parameters that required grad during it) and
    every value the module logged. Installs its wrappers on the module at ``setup``."""

    def __init__(self) -> None:
        self.requires_grad: list[list[set[str]]] = []  # per step, per compute_loss call
        self.logged: list[dict[str, float]] = []  # per step
        self._calls: list[set[str]] = []
        self._logs: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        compute_loss, log = pl_module.compute_loss, pl_module.log

        def recording_loss(batch: Any) -> Tensor:
            self._calls.append({n for n, p in pl_module.named_parameters() if p.requires_grad})
            return compute_loss(batch)

        def recording_log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self._logs[name] = float(value)
            log(name, value, *args, **kwargs)

        pl_module.compute_loss = recording_loss
        pl_module.log = recording_log

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.requires_grad.append(self._calls)
        self.logged.append(self._logs)
        self._calls, self._logs = [], {}

    @property
    def passes(self) -> list[int]:
        """``compute_loss`` calls per step."""
        return [len(calls) for calls in self.requires_grad]

    def series(self, key: str) -> list[float]:
        return [logs[key] for logs in self.logged]


def fit(
    make_trainer: Callable[..., L.Trainer],
    callback: SharpnessAware,
    loader: DataLoader,
    steps: int,
    **module_kwargs: Any,
) -> tuple[TinyNet, nn.Module, StepRecorder, L.Trainer]:
    """Train a fresh TinyNet for ``steps``.

    Returns the module, a deepcopy of its initial ``model``, the step recorder and the Trainer.
    """
    module = TinyNet(**module_kwargs)
    initial = copy.deepcopy(module.model)
    recorder = StepRecorder()
    trainer = make_trainer(callbacks=[callback, recorder], max_steps=steps)
    trainer.fit(module, loader)
    assert trainer.global_step == steps
    return module, initial, recorder, trainer


# --- references ---------------------------------------------------------------------------------------------------
def reference_sam_step(model: nn.Module, batch: Any, rho: float) -> tuple[list[Tensor], list[Tensor]]:
    """Plain SAM's two passes on every parameter: ``(g(w), g(w + e))`` with ``e = rho g / ||g||``."""
    params = list(model.parameters())
    grads = list(torch.autograd.grad(loss_at(model, batch), params))
    norm = norm_of(grads)
    return grads, list(gradient_at_perturbed(model, batch, params, [rho * g / norm for g in grads]))


def reference_lagnp(
    model: nn.Module,
    batches: Sequence[Any],
    arms: Sequence[Sequence[str]],
    *,
    rho: float,
    alpha: float,
    layer_fraction: float,
    reselect_every: int,
) -> list[list[int]]:
    """Layer-wise GNP on ``model`` (in place); ``arms`` lists each arm's parameter names (inside ``model``).

    Returns the chosen arm indices of every step.
    """
    named = dict(model.named_parameters())
    optimizer = adamw(model)
    k = max(1, round(layer_fraction * len(arms)))
    history: list[list[int]] = []
    chosen: list[int] = []
    for step, batch in enumerate(batches):
        grads = dict(zip(named, torch.autograd.grad(loss_at(model, batch), list(named.values())), strict=True))
        if step % reselect_every == 0:  # on the other steps the last choice is reused
            arm_norms = [float(norm_of([grads[n] for n in arm])) for arm in arms]
            chosen = sorted(sorted(range(len(arms)), key=lambda i: -arm_norms[i])[:k])
        history.append(chosen)
        names = [n for i in chosen for n in arms[i]]
        norm = norm_of([grads[n] for n in names])
        ascent = [rho * grads[n] / norm for n in names]
        perturbed = gradient_at_perturbed(model, batch, [named[n] for n in names], ascent)
        final = dict(grads)  # every other arm keeps g(w)
        for n, g2 in zip(names, perturbed, strict=True):
            final[n] = (1 - alpha) * grads[n] + alpha * g2
        apply_update(optimizer, [named[n] for n in final], list(final.values()))
    return history


def reference_looksam(model: nn.Module, batches: Sequence[Any], *, rho: float, k: int, alpha: float) -> list[int]:
    """LookSAM on ``model`` (in place), per tensor; returns the passes of every step."""
    params = list(model.parameters())
    optimizer = adamw(model)
    g_v: list[Tensor] = []
    passes = []
    for step, batch in enumerate(batches):
        if step % k == 0:  # full SAM step, which stores the orthogonal components
            grads, sam_grads = reference_sam_step(model, batch, rho)
            g_v = []
            for g, g_s in zip(grads, sam_grads, strict=True):
                cos = (g * g_s).sum() / (g.norm() * g_s.norm())
                g_v.append(g_s - g_s.norm() * cos * g / g.norm())
            apply_update(optimizer, params, sam_grads)
            passes.append(2)
        else:
            grads = torch.autograd.grad(loss_at(model, batch), params)
            mixed = [g + alpha * (g.norm() / v.norm()) * v for g, v in zip(grads, g_v, strict=True)]
            apply_update(optimizer, params, mixed)
            passes.append(1)
    return passes


def reference_sam_or_base(model: nn.Module, batches: Sequence[Any], sam_steps: Sequence[bool], rho: float) -> None:
    """Step t is a SAM step where ``sam_steps[t]``, else a plain AdamW step (``model`` changed in place)."""
    params = list(model.parameters())
    optimizer = adamw(model)
    for batch, sam in zip(batches, sam_steps, strict=True):
        if sam:
            apply_update(optimizer, params, reference_sam_step(model, batch, rho)[1])
        else:
            apply_update(optimizer, params, torch.autograd.grad(loss_at(model, batch), params))


def reference_asam(model: nn.Module, batches: Sequence[Any], *, rho: float, eta: float) -> None:
    """ASAM: ``e = rho T^2 g / ||T g||``, ``T = |w| + eta`` on weights and 1 on biases (``model`` in place)."""
    named = dict(model.named_parameters())
    params = list(named.values())
    optimizer = adamw(model)
    for batch in batches:
        grads = torch.autograd.grad(loss_at(model, batch), params)
        scale = [torch.ones_like(p) if n.endswith("bias") else p.detach().abs() + eta for n, p in named.items()]
        norm = norm_of([t * g for t, g in zip(scale, grads, strict=True)])
        ascent = [rho * t**2 * g / norm for t, g in zip(scale, grads, strict=True)]
        apply_update(optimizer, params, gradient_at_perturbed(model, batch, params, ascent))


def reference_adamw(model: nn.Module, batches: Sequence[Any]) -> None:
    reference_sam_or_base(model, batches, [False] * len(batches), rho=0.0)


SAM_STEPS = 4


@pytest.fixture(scope="module")
def sam_run() -> Callable[[str], TinyNet]:
    """``sam_run(arms)``: TinyNet after ``SAM_STEPS`` steps of ``SAM(rho=RHO, arms=arms)`` on the conftest loader,
    what the methods that reduce to SAM must reproduce bitwise; each arms mode trained once per module.

    The arms mode matters at the last bit: the ascent's norm is summed per arm, then over arms."""
    runs: dict[str, TinyNet] = {}

    def get(arms: str) -> TinyNet:
        if arms not in runs:
            module = TinyNet()
            trainer = L.Trainer(
                callbacks=[SAM(rho=RHO, arms=arms)],
                max_steps=SAM_STEPS,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                devices=1,
                deterministic=True,
            )
            trainer.fit(module, DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=False))
            runs[arms] = module
        return runs[arms]

    return get


# --- 1. LayerwiseGNP ----------------------------------------------------------------------------------------------
LAGNP_STEPS = 6
LAGNP_CASES = [
    ("tensor", 0.8, 1),
    ("tensor", 0.5, 2),
    ("module", 0.8, 2),
    ("module", 0.5, 1),
    ("block", 0.8, 2),
]


@pytest.mark.parametrize(
    ("arms", "alpha", "reselect_every"), LAGNP_CASES, ids=[f"{a}-alpha{al}-every{r}" for a, al, r in LAGNP_CASES]
)
def test_lagnp_matches_reference(make_trainer, tiny_loader, arms: str, alpha: float, reselect_every: int) -> None:
    callback = LayerwiseGNP(rho=RHO, alpha=alpha, layer_fraction=0.3, reselect_every=reselect_every, arms=arms)
    module, ref, recorder, _ = fit(make_trainer, callback, tiny_loader, LAGNP_STEPS)

    layout = callback.layout
    assert layout is not None
    # TinyNet: 6 tensor arms (top 2 chosen); module and block mode both give one arm per Linear (top 1)
    assert len(layout) == (6 if arms == "tensor" else 3)
    arm_names = [[n.removeprefix(PREFIX) for n in arm.param_names] for arm in layout]
    history = reference_lagnp(
        ref,
        take(tiny_loader, LAGNP_STEPS),
        arm_names,
        rho=RHO,
        alpha=alpha,
        layer_fraction=0.3,
        reselect_every=reselect_every,
    )
    assert_models_close(module.model, ref)
    assert all(len(chosen) == (2 if arms == "tensor" else 1) for chosen in history)
    if reselect_every == 2:
        assert all(history[step] == history[step - 1] for step in range(1, LAGNP_STEPS, 2))

    # pass 1 differentiates every parameter; pass 2 only the chosen arms' parameters (as the reference chose)
    everything = {n for n, _ in module.named_parameters()}
    assert recorder.passes == [2] * LAGNP_STEPS
    for step, (pass1, pass2) in enumerate(recorder.requires_grad):
        assert pass1 == everything, step
        assert pass2 == {PREFIX + n for i in history[step] for n in arm_names[i]}, step
    assert recorder.series("train/passes") == [2.0] * LAGNP_STEPS
    numel = {n: p.numel() for n, p in module.named_parameters()}
    expected_ratio = [sum(numel[PREFIX + n] for i in h for n in arm_names[i]) / sum(numel.values()) for h in history]
    assert recorder.series("train/active_ratio_pass2") == pytest.approx(expected_ratio, rel=1e-12)


def test_lagnp_reselect_every_reuses_a_stale_choice(make_trainer, tiny_loader) -> None:
    """The reselect_every=2 cases mean something: with module arms the top arm changes at step 4, and a fresh
    choice at step 5 would differ from the reused one."""
    callback = LayerwiseGNP(rho=RHO, alpha=0.8, layer_fraction=0.3, reselect_every=2, arms="module")
    module, ref, *_ = fit(make_trainer, callback, tiny_loader, LAGNP_STEPS)
    fresh = copy.deepcopy(ref)
    arm_names = [[n.removeprefix(PREFIX) for n in arm.param_names] for arm in callback.layout]
    kwargs = {"rho": RHO, "alpha": 0.8, "layer_fraction": 0.3}
    stale = reference_lagnp(ref, take(tiny_loader, LAGNP_STEPS), arm_names, reselect_every=2, **kwargs)
    every = reference_lagnp(fresh, take(tiny_loader, LAGNP_STEPS), arm_names, reselect_every=1, **kwargs)
    assert stale[4] == stale[5] != every[5], (stale, every)
    assert_models_close(module.model, ref)
    assert not models_close(module.model, fresh)


@pytest.mark.parametrize("arms", ["tensor", "block"])
def test_lagnp_full_fraction_alpha_one_equals_sam_bitwise(make_trainer, tiny_loader, sam_run, arms: str) -> None:
    lagnp = LayerwiseGNP(rho=RHO, alpha=1.0, layer_fraction=1.0, arms=arms)
    lagnp_module, _, recorder, _ = fit(make_trainer, lagnp, tiny_loader, SAM_STEPS)
    everything = {n for n, _ in lagnp_module.named_parameters()}
    assert all(calls == [everything, everything] for calls in recorder.requires_grad)
    assert_models_equal(lagnp_module, sam_run(arms))


# --- 2. LookSAM ---------------------------------------------------------------------------------------------------
LOOKSAM_CASES = [(0.7, 7), (2.0, 6)]  # the 7-step run ends on a SAM step, the 6-step one on a one-pass step


@pytest.mark.parametrize(("alpha", "steps"), LOOKSAM_CASES, ids=[f"alpha{a}-{s}steps" for a, s in LOOKSAM_CASES])
def test_looksam_matches_reference(make_trainer, tiny_loader, alpha: float, steps: int) -> None:
    callback = LookSAM(rho=RHO, k=3, alpha=alpha)
    module, ref, recorder, trainer = fit(make_trainer, callback, tiny_loader, steps)
    no_reuse = copy.deepcopy(ref)
    passes = reference_looksam(ref, take(tiny_loader, steps), rho=RHO, k=3, alpha=alpha)
    assert_models_close(module.model, ref)
    # alpha matters on the one-pass steps: with alpha=0 (plain g there) the reference ends elsewhere
    reference_looksam(no_reuse, take(tiny_loader, steps), rho=RHO, k=3, alpha=0.0)
    assert not models_close(module.model, no_reuse)

    assert passes == [2, 1, 1, 2, 1, 1, 2][:steps]
    assert recorder.passes == passes  # compute_loss calls per step
    assert recorder.series("train/passes") == [float(p) for p in passes]
    assert recorder.series("train/active_ratio_pass2") == [1.0 if p == 2 else 0.0 for p in passes]
    assert float(trainer.callback_metrics["train/passes"]) == passes[-1]  # the last step's
    assert float(trainer.callback_metrics["train/active_ratio_pass2"]) == (1.0 if passes[-1] == 2 else 0.0)
    assert callback.method.steps == steps


def test_looksam_k1_equals_sam_bitwise(make_trainer, tiny_loader, sam_run) -> None:
    looksam_module, _, recorder, _ = fit(make_trainer, LookSAM(rho=RHO, k=1), tiny_loader, SAM_STEPS)
    assert recorder.passes == [2] * SAM_STEPS
    assert_models_equal(looksam_module, sam_run("tensor"))


# --- 3. RST -------------------------------------------------------------------------------------------------------
RST_STEPS = 20


def test_rst_p1_equals_sam_bitwise(make_trainer, tiny_loader, sam_run) -> None:
    rst = RST(rho=RHO, p=1.0, seed=0)
    rst_module, _, recorder, _ = fit(make_trainer, rst, tiny_loader, SAM_STEPS)
    assert recorder.passes == [2] * SAM_STEPS and rst.method.sam_steps == SAM_STEPS
    assert_models_equal(rst_module, sam_run("tensor"))


def test_rst_p0_equals_plain_bitwise(make_trainer, tiny_loader) -> None:
    rst = RST(rho=RHO, p=0.0, seed=0)
    rst_module, ref, recorder, _ = fit(make_trainer, rst, tiny_loader, 4)
    plain_module, _, plain_recorder, _ = fit(make_trainer, Base(), tiny_loader, 4)
    assert recorder.passes == plain_recorder.passes == [1] * 4 and rst.method.sam_steps == 0
    assert_models_equal(rst_module, plain_module)
    reference_adamw(ref, take(tiny_loader, 4))
    assert_models_equal(rst_module.model, ref)


def test_rst_coin_is_seeded_and_matches_reference(make_trainer, tiny_loader) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        callback = RST(rho=RHO, p=0.5, seed=seed)
        module, ref, recorder, _ = fit(make_trainer, callback, tiny_loader, RST_STEPS)
        assert set(recorder.passes) <= {1, 2}
        assert callback.method.sam_steps == recorder.passes.count(2)
        assert callback.method.steps == RST_STEPS
        assert recorder.series("train/passes") == [float(p) for p in recorder.passes]
        assert recorder.series("train/active_ratio_pass2") == [float(p == 2) for p in recorder.passes]
        runs[name] = (module, ref, recorder.passes)

    module, ref, passes = runs["a"]
    assert passes == runs["b"][2], "the same seed must give the same SAM/base sequence"
    assert passes != runs["other"][2], "another seed should give another sequence over 20 steps"
    assert 0 < passes.count(2) < RST_STEPS
    assert_models_equal(module, runs["b"][0])

    reference_sam_or_base(ref, take(tiny_loader, RST_STEPS), [p == 2 for p in passes], rho=RHO)
    assert_models_close(module.model, ref)


# --- 4. ASAM ------------------------------------------------------------------------------------------------------
def test_asam_callback_equals_adaptive_sam_and_reference(make_trainer, tiny_loader) -> None:
    asam_module, ref, *_ = fit(make_trainer, ASAM(rho=0.5, eta=0.01), tiny_loader, 4)
    sam_module, *_ = fit(make_trainer, SAM(rho=0.5, adaptive=True, eta=0.01), tiny_loader, 4)
    assert_models_equal(asam_module, sam_module)

    plain_sam = copy.deepcopy(ref)
    reference_asam(ref, take(tiny_loader, 4), rho=0.5, eta=0.01)
    assert_models_close(asam_module.model, ref)
    # and the ASAM reference is not secretly SAM's at the same radius
    reference_sam_or_base(plain_sam, take(tiny_loader, 4), [True] * 4, rho=0.5)
    assert not models_close(plain_sam, ref)


# --- 5. every method callback trains, logs and resumes -------------------------------------------------------------
SMOKE: dict[str, tuple[Callable[[], SharpnessAware], list[int] | None]] = {
    # name: (callback factory, compute_loss calls per step over 4 steps, None where the method's coin decides)
    "plain": (Base, [1, 1, 1, 1]),
    "sam": (SAM, [2, 2, 2, 2]),
    "asam": (ASAM, [2, 2, 2, 2]),
    "lagnp": (LayerwiseGNP, [2, 2, 2, 2]),
    "looksam-k2": (lambda: LookSAM(k=2), [2, 1, 2, 1]),
    "rst": (lambda: RST(seed=0), None),
    "slsam": (lambda: SLSAM(seed=0), [2, 2, 2, 2]),
    "slsam-uniform": (lambda: SLSAM(sampler="uniform", seed=0), [2, 2, 2, 2]),
    "msam": (MSAM, [1, 1, 1, 1]),
    "sparse-msam": (lambda: SparseMSAM(seed=0), [1, 1, 1, 1]),
}


@pytest.mark.parametrize(("make_callback", "expected_passes"), list(SMOKE.values()), ids=list(SMOKE))
def test_every_method_trains_and_logs(make_trainer, tiny_loader, make_callback, expected_passes) -> None:
    module, initial, recorder, trainer = fit(make_trainer, make_callback(), tiny_loader, 4)

    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(module.model.parameters(), initial.parameters(), strict=True))
    if expected_passes is not None:
        assert recorder.passes == expected_passes
    passes, pass2 = recorder.series("train/passes"), recorder.series("train/active_ratio_pass2")
    assert passes == [float(p) for p in recorder.passes]
    for step, (p, ratio) in enumerate(zip(passes, pass2, strict=True)):
        assert (ratio == 0.0) if p == 1.0 else (0.0 < ratio <= 1.0), (step, p, ratio)
    for key in ("train/passes", "train/active_ratio_pass2"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(recorder.logged[-1][key], rel=1e-6)  # float32


def resume_pair(tmp_path: Path, make_callback: Callable[[int], SharpnessAware]):
    """Run A: 2 epochs of 4 batches straight. Run B: 1 epoch, then resume from its epoch-0 checkpoint to 2 epochs.

    No shuffling and a fresh DataLoader for the resumed run (as in a new process). The resumed callback and
    module are built with another seed, so everything must come from the checkpoint.
    """

    def loader() -> DataLoader:
        return DataLoader(make_dataset(4 * BATCH_SIZE), batch_size=BATCH_SIZE, shuffle=False)

    options = {"max_steps": -1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    options |= {"accelerator": "cpu", "devices": 1, "deterministic": True}
    straight, straight_cb = TinyNet(), make_callback(0)
    L.Trainer(callbacks=[straight_cb], max_epochs=2, enable_checkpointing=False, **options).fit(straight, loader())

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    L.Trainer(callbacks=[make_callback(0), checkpoint], max_epochs=1, **options).fit(TinyNet(), loader())
    (path,) = tmp_path.glob("epoch=0*.ckpt")
    resumed, resumed_cb = TinyNet(seed=1), make_callback(123)
    L.Trainer(callbacks=[resumed_cb], max_epochs=2, enable_checkpointing=False, **options).fit(
        resumed, loader(), ckpt_path=path
    )
    return straight, straight_cb, resumed, resumed_cb


RESUME_WARNING = "ignore:Be aware that when using `ckpt_path`"


@pytest.mark.filterwarnings(RESUME_WARNING)
def test_exact_resume_looksam(tmp_path: Path) -> None:
    # k=3 on 4 batches per epoch: the SAM step 3 of epoch 0 stores the g_v that steps 4 and 5 of epoch 1 reuse
    straight, straight_cb, resumed, resumed_cb = resume_pair(tmp_path, lambda seed: LookSAM(rho=RHO, k=3))
    assert_models_equal(resumed, straight)
    assert resumed_cb.method.steps == straight_cb.method.steps == 8
    assert resumed_cb.steps == straight_cb.steps == 8
    assert resumed_cb.method.g_v.keys() == straight_cb.method.g_v.keys() and straight_cb.method.g_v
    for i, g_v in straight_cb.method.g_v.items():
        assert torch.equal(resumed_cb.method.g_v[i], g_v), i


@pytest.mark.filterwarnings(RESUME_WARNING)
def test_exact_resume_rst(tmp_path: Path) -> None:
    # the resumed callback is built with seed 123: its coin must come from the checkpoint
    straight, straight_cb, resumed, resumed_cb = resume_pair(tmp_path, lambda seed: RST(rho=RHO, p=0.5, seed=seed))
    assert_models_equal(resumed, straight)
    assert resumed_cb.method.sam_steps == straight_cb.method.sam_steps
    assert 0 < straight_cb.method.sam_steps < 8
    assert resumed_cb.method.steps == straight_cb.method.steps == 8
    assert torch.equal(resumed_cb.method.generator.get_state(), straight_cb.method.generator.get_state())


@pytest.mark.filterwarnings(RESUME_WARNING)
@pytest.mark.parametrize(
    "make_callback",
    [lambda seed: MSAM(rho=RHO), lambda seed: SparseMSAM(rho=RHO, seed=seed)],
    ids=["msam", "sparse_msam"],
)
def test_exact_resume_msam(tmp_path: Path, make_callback: Callable[[int], SharpnessAware]) -> None:
    # the momentum the resumed steps move along comes from the checkpoint's optimizer state, the sampler from the
    # callback's (the resumed callback is built with seed 123)
    straight, straight_cb, resumed, resumed_cb = resume_pair(tmp_path, make_callback)
    assert_models_equal(resumed, straight)
    assert resumed_cb.steps == straight_cb.steps == 8


@pytest.mark.parametrize(
    ("make_callback", "steps"),
    [
        (lambda: LookSAM(rho=RHO, k=3), 4),  # steps 4 and 5 reuse the g_v of step 3
        (lambda: RST(rho=RHO, p=0.5, seed=0), 5),
        # step 5 reuses step 4's choice (model.1), where a fresh choice would be model.2 (see the stale test)
        (lambda: LayerwiseGNP(rho=RHO, layer_fraction=0.3, reselect_every=2, arms="module"), 5),
    ],
    ids=["looksam", "rst", "lagnp"],
)
def test_method_state_dict_round_trip(make_trainer, tiny_loader, make_callback, steps: int) -> None:
    """Train, copy the callback state, module and optimizer; continue in a fresh Trainer: same as one run."""
    batches = list(tiny_loader)
    straight_module, *_ = fit(make_trainer, make_callback(), DataLoader(batches * 2, batch_size=None), 2 * steps)

    module = TinyNet()
    first_cb = make_callback()
    trainer = make_trainer(callbacks=[first_cb], max_steps=steps)
    trainer.fit(module, DataLoader(batches[:steps], batch_size=None))
    state = copy.deepcopy(first_cb.state_dict())
    optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
    weights = copy.deepcopy(module.state_dict())

    resumed = TinyNet(seed=1)
    resumed.load_state_dict(weights)
    resumed_cb = make_callback()
    resumed_cb.load_state_dict(state)

    class LoadOptimizer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].load_state_dict(optimizer_state)

    rest = (batches * 2)[steps : 2 * steps]
    make_trainer(callbacks=[resumed_cb, LoadOptimizer()], max_steps=steps).fit(
        resumed, DataLoader(rest, batch_size=None)
    )
    assert_models_equal(resumed, straight_module)


# --- 6. bad arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make_callback", "argument"),
    [
        (lambda: LayerwiseGNP(alpha=1.5), "alpha"),
        (lambda: LayerwiseGNP(alpha=-0.1), "alpha"),
        (lambda: LayerwiseGNP(layer_fraction=0), "layer_fraction"),
        (lambda: LayerwiseGNP(layer_fraction=1.5), "layer_fraction"),
        (lambda: LayerwiseGNP(reselect_every=0), "reselect_every"),
        (lambda: LayerwiseGNP(reselect_every=1.5), "reselect_every"),
        (lambda: LayerwiseGNP(rho=-1), "rho"),
        (lambda: LookSAM(k=0), "k"),
        (lambda: LookSAM(k=2.0), "k"),
        (lambda: LookSAM(alpha=-1), "alpha"),
        (lambda: LookSAM(rho=float("inf")), "rho"),
        (lambda: RST(p=1.5), "p"),
        (lambda: RST(p=-0.5), "p"),
        (lambda: RST(rho=-1), "rho"),
        (lambda: ASAM(rho=-1), "rho"),
        (lambda: ASAM(eta=-1), "eta"),
    ],
    ids=[
        "lagnp-alpha-1.5",
        "lagnp-alpha-neg",
        "lagnp-fraction-0",
        "lagnp-fraction-1.5",
        "lagnp-reselect-0",
        "lagnp-reselect-float",
        "lagnp-rho",
        "looksam-k-0",
        "looksam-k-float",
        "looksam-alpha",
        "looksam-rho-inf",
        "rst-p-1.5",
        "rst-p-neg",
        "rst-rho",
        "asam-rho",
        "asam-eta",
    ],
)
def test_bad_arguments_name_the_argument(make_callback, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        make_callback()
