"""SL-SAM's levers against update starvation: always-active arms, update scaling, and ``slsam_noisy``.

Each lever is compared with a plain reference written here: the arm groups with names listed by hand, the
pinned sampler with the inner sampler fed directly, the scaled update with a python loop of SL-SAM whose
update is ``w0 + min(1 / p, c) (w - w0)``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, gradient_after_ascent, snapshot
from torch import nn

from lightning_slsam import SLSAM, Exp3Sampler, PinnedArmsSampler, SLSAMNoisy, SLSAMPlus, UniformSampler, build_arms
from lightning_slsam.engine.arm_groups import select_arms

LR, WEIGHT_DECAY, RHO, STEPS = 1e-2, 0.1, 0.2, 6


# --- arm groups ---------------------------------------------------------------------------------------------------
class TextLike(nn.Module):
    """Embedding -> LayerNorm -> Linear -> Linear head, with a parameter-free module last."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)
        self.dropout = nn.Dropout(0.1)


def selected_names(module: nn.Module, spec: Sequence[str], mode: str = "tensor") -> set[str]:
    layout = build_arms(module, mode)
    mask = select_arms(module, layout, spec)
    return {name for name, on in zip(layout.names, mask.tolist(), strict=True) if on}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (["head"], {"classifier.weight", "classifier.bias"}),
        (["norms"], {"norm.weight", "norm.bias"}),
        (["biases"], {"norm.bias", "body.bias", "classifier.bias"}),
        (["vectors"], {"norm.weight", "norm.bias", "body.bias", "classifier.bias"}),
        (["embeddings"], {"embed.weight"}),
        (["head", "embeddings"], {"classifier.weight", "classifier.bias", "embed.weight"}),
        (["body.*"], {"body.weight", "body.bias"}),
    ],
)
def test_arm_groups_select_the_listed_tensors(spec: list[str], expected: set[str]) -> None:
    assert selected_names(TextLike(), spec) == expected


def test_arm_groups_on_batchnorm_net() -> None:
    net = TinyNet(batch_norm=True)
    assert selected_names(net, ["head"]) == {"model.5.weight", "model.5.bias"}
    assert selected_names(net, ["norms"]) == {"model.1.weight", "model.1.bias"}
    assert selected_names(net, ["vectors"]) == {"model.1.weight", "model.1.bias", "model.3.bias", "model.5.bias"}


def test_module_arms_are_selected_only_when_every_parameter_matches() -> None:
    # module arms: the LayerNorm's arm is all vectors, the Linear arms hold a matrix too
    assert selected_names(TextLike(), ["vectors"], mode="module") == {"norm"}
    assert selected_names(TextLike(), ["head"], mode="module") == {"classifier"}


@pytest.mark.parametrize("spec", [["nothing.*"], ["head", "typo"]])
def test_arm_group_matching_nothing_is_refused(spec: list[str]) -> None:
    module = TextLike()
    with pytest.raises(ValueError, match=r"always_active: .* selects no arm"):
        select_arms(module, build_arms(module), spec)


# --- the pinned sampler -------------------------------------------------------------------------------------------
def test_pinned_sampler_keeps_pinned_arms_and_forwards_the_rest() -> None:
    pinned = torch.tensor([True, False, False, True, False, False, False])
    sampler = PinnedArmsSampler(Exp3Sampler(5, 0.4, seed=3), pinned)
    twin = Exp3Sampler(5, 0.4, seed=3)  # the reference: the inner sampler fed the unpinned arms by hand
    free = ~pinned
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = sampler.sample()
        assert bool(mask[pinned].all())
        assert torch.equal(mask[free], twin.sample())
        norms = torch.rand(7, generator=gen, dtype=torch.float64) * 3
        sampler.update(mask, norms)
        twin.update(mask[free], norms[free])
        assert torch.equal(sampler.probs[free], twin.probs)
        assert bool((sampler.probs[pinned] == 1).all())
    state = sampler.state_dict()
    copy_ = PinnedArmsSampler(Exp3Sampler(5, 0.4, seed=99), pinned)
    copy_.load_state_dict(state)
    assert torch.equal(copy_.sample(), sampler.sample())


def test_pinned_sampler_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="num_arms: the inner sampler has 1 arms, 0 are unpinned"):
        PinnedArmsSampler(UniformSampler(1, 0.5), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_arms: the inner sampler has 0 arms, 1 are unpinned"):
        PinnedArmsSampler(None, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="num_arms"):
        PinnedArmsSampler(UniformSampler(4, 0.5), torch.tensor([True, False, False]))
    other = PinnedArmsSampler(UniformSampler(2, 0.5), torch.tensor([False, True, False]))
    with pytest.raises(ValueError, match="always_active differs"):
        PinnedArmsSampler(UniformSampler(2, 0.5), torch.tensor([True, False, False])).load_state_dict(
            other.state_dict()
        )


# --- the scaled update against a reference loop -------------------------------------------------------------------
def recorded_masks(module: TinyNet, callback: SLSAM, loader: Any, make_trainer: Any) -> tuple[list, list]:
    """Fit, recording per step the parameter names with a gradient at the optimizer and their probabilities."""

    masks: list[list[str]] = []
    probs: list[dict[str, float]] = []

    class Recorder(L.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            masks.append([n for n, p in pl_module.named_parameters() if p.grad is not None])
            method = callback.method
            assert method is not None and callback.layout is not None
            # the probabilities this step was sampled with (the bandit's update is applied before the next sample)
            p = method.sampler.probs
            probs.append({name: float(p[i]) for i, name in enumerate(callback.layout.names)})

    make_trainer(callbacks=[callback, Recorder()], max_steps=STEPS).fit(module, loader)
    return masks, probs


def reference_scaled_slsam(
    model: nn.Module,
    batches: Sequence[Any],
    masks: Sequence[Sequence[str]],
    scales: Sequence[dict[str, float]],
    c: float | None = None,
) -> tuple[list[bool], tuple[float, float]]:
    """SL-SAM on the given arms, each arm's AdamW update multiplied by ``scales[t][name]`` (a python loop). With a
    gate ``c`` the ascent and pass 2 are taken only when ``s = ||g_S||^2 >= mu + c sigma`` (AE-SAM's rule, ``mu``,
    ``sigma^2`` moving averages with momentum 0.9 updated with ``s`` first), else AdamW steps on ``g_S``. Returns
    the decisions and the final ``(mu, sigma^2)``."""
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    mean = var = None
    decisions = []
    for step, (x, y) in enumerate(batches):
        names = list(masks[step])
        params = [named[n] for n in names]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        s = float(sum((g.double() ** 2).sum() for g in grads))
        mean = s if mean is None else 0.9 * mean + 0.1 * s
        var = 0.0 if var is None else var
        var = 0.9 * var + 0.1 * (s - mean) ** 2
        decisions.append(c is None or s >= mean + c * var**0.5)
        before = [p.detach().clone() for p in params]
        if decisions[-1]:
            grads = gradient_after_ascent(model, x, y, params, grads, RHO)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p, w in zip(names, params, before, strict=True):
                p.copy_(w + scales[step][name] * (p - w))
    return decisions, (mean, var)


def take(loader: Any, k: int) -> list[Any]:
    batches = list(loader)
    return [batches[i % len(batches)] for i in range(k)]


def strip(names: Sequence[str]) -> list[str]:
    return [n.removeprefix("model.") for n in names]


@pytest.mark.parametrize(
    ("options", "cap"),
    [
        ({"sampler": "uniform", "sparsity": 0.5}, 1.5),  # 1 / p = 2, capped at 1.5
        ({"sampler": "uniform", "sparsity": 0.5}, 5.0),  # 1 / p = 2
        ({"sparsity": 0.5, "bandit_lr": 0.5}, 5.0),  # the Exp3 bandit moves p between steps
        ({"sampler": "uniform", "sparsity": 0.5, "always_active": ["head"]}, 5.0),  # pinned: p = 1
    ],
)
def test_scaled_update_matches_reference(make_trainer, tiny_loader, options: dict[str, Any], cap: float) -> None:
    module = TinyNet()
    ref = copy.deepcopy(module.model)
    callback = SLSAM(rho=RHO, seed=0, max_update_scale=cap, **options)
    masks, probs = recorded_masks(module, callback, tiny_loader, make_trainer)
    scales = [{n.removeprefix("model."): min(1.0 / p[n], cap) for n in p} for p in probs]
    assert any(s != 1.0 for step in scales for s in step.values())
    decisions, _ = reference_scaled_slsam(ref, take(tiny_loader, STEPS), [strip(m) for m in masks], scales)
    assert all(decisions)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(module.model.named_parameters())[name], p, rtol=1e-6, atol=1e-6)


def test_scaled_update_with_cap_one_equals_plain_slsam_bitwise(make_trainer, tiny_loader) -> None:
    plain, capped = TinyNet(), TinyNet()
    make_trainer(callbacks=[SLSAM(rho=RHO, sparsity=0.5, seed=0)], max_steps=STEPS).fit(plain, tiny_loader)
    make_trainer(callbacks=[SLSAM(rho=RHO, sparsity=0.5, seed=0, max_update_scale=1.0)], max_steps=STEPS).fit(
        capped, tiny_loader
    )
    for (name, p), q in zip(plain.named_parameters(), capped.parameters(), strict=True):
        assert torch.equal(p, q), name


# --- slsam_noisy -----------------------------------------------------------------------------------------------------
def test_pinned_head_and_vectors_are_active_every_step(make_trainer, tiny_loader) -> None:
    module = TinyNet(batch_norm=True)
    callback = SLSAM(rho=RHO, seed=0, always_active=["head", "vectors"], norm_scale="running_mean", max_update_scale=5)
    masks, probs = recorded_masks(module, callback, tiny_loader, make_trainer)
    always = {"model.5.weight", "model.5.bias", "model.1.weight", "model.1.bias", "model.3.bias"}
    for step_mask, step_probs in zip(masks, probs, strict=True):
        assert always <= set(step_mask)
        assert all(step_probs[n] == 1.0 for n in always)
    assert not torch.equal(snapshot(module)["model.0.weight"], snapshot(TinyNet(batch_norm=True))["model.0.weight"])


def test_slsam_noisy_is_slsam_with_pinned_head_and_vectors_and_scaled_updates(make_trainer, tiny_loader) -> None:
    plus, slsam = TinyNet(batch_norm=True), TinyNet(batch_norm=True)
    callback = SLSAMNoisy(rho=RHO, seed=0)
    make_trainer(callbacks=[callback], max_steps=STEPS).fit(plus, tiny_loader)
    assert callback.method is not None and callback.method.name == "slsam_noisy"
    same = SLSAM(rho=RHO, seed=0, max_update_scale=5.0, always_active=["head", "vectors"])
    make_trainer(callbacks=[same], max_steps=STEPS).fit(slsam, tiny_loader)
    for (name, p), q in zip(plus.named_parameters(), slsam.parameters(), strict=True):
        assert torch.equal(p, q), name
    # the pinned arms took part in every step: the head and every 1-D tensor moved
    fresh = snapshot(TinyNet(batch_norm=True))
    for name in ("model.5.weight", "model.5.bias", "model.1.weight", "model.1.bias", "model.3.bias"):
        assert not torch.equal(snapshot(plus)[name], fresh[name]), name


def test_slsam_noisy_levers_can_be_switched_off_to_the_papers_rule(make_trainer, tiny_loader) -> None:
    plus, slsam = TinyNet(), TinyNet()
    off = SLSAMNoisy(rho=RHO, seed=0, always_active=[], max_update_scale=None)
    make_trainer(callbacks=[off], max_steps=STEPS).fit(plus, tiny_loader)
    make_trainer(callbacks=[SLSAM(rho=RHO, seed=0)], max_steps=STEPS).fit(slsam, tiny_loader)
    for (name, p), q in zip(plus.named_parameters(), slsam.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_update_scale": 0.5}, "max_update_scale"),
        ({"max_update_scale": float("inf")}, "max_update_scale"),
        ({"always_active": [""]}, "always_active"),
        ({"always_active": [3]}, "always_active"),
        ({"bandit_lr": float("inf")}, "bandit_lr"),
        ({"bandit_lr": float("nan")}, "bandit_lr"),
        ({"second_pass_gate": float("nan")}, "second_pass_gate"),
        ({"second_pass_gate": float("inf")}, "second_pass_gate"),
        ({"second_pass_gate": "high"}, "second_pass_gate"),
        ({"dense_update": 1}, "dense_update"),
        ({"dense_update": True, "max_update_scale": 2.0}, "dense_update"),
        ({"dense_update": True, "max_update_scale": None, "second_pass_gate": 0.0}, "dense_update"),
    ],
)
@pytest.mark.parametrize("callback", [SLSAM, SLSAMNoisy])
def test_bad_lever_arguments_name_the_argument(callback: type, kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        callback(**kwargs)


@pytest.mark.parametrize("spec", [["nothing.*"], ["model.*"]])
def test_always_active_problems_are_refused_before_the_first_step(make_trainer, tiny_loader, spec) -> None:
    module = TinyNet()
    before = snapshot(module)
    with pytest.raises(ValueError, match="always_active"):
        make_trainer(callbacks=[SLSAM(always_active=spec)]).fit(module, tiny_loader)
    for name, value in snapshot(module).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("spec", ["[nothing.*]", "[model.*]"])
def test_cli_refuses_a_bad_always_active_before_training(tmp_path, spec: str) -> None:
    from conftest import SHRINK, compose_config

    from lightning_slsam.app.cli import ConfigError, train

    cfg = compose_config(
        ["method=slsam_noisy", "model=resnet20_cifar", "model.weights=null", f"method.always_active={spec}", *SHRINK],
        str(tmp_path),
    )
    with pytest.raises(ConfigError, match=r"^method\.always_active: "):
        train(cfg)
    assert not (tmp_path / "result.json").exists()


def test_every_arm_pinned_is_every_arm_active() -> None:
    """While a model's only trainable arms are pinned ones (a new head over a frozen backbone), every step
    activates all of them and there is nothing for a bandit to learn."""
    sampler = PinnedArmsSampler(None, torch.ones(3, dtype=torch.bool))
    for _ in range(3):
        assert bool(sampler.sample().all())
    sampler.update(torch.ones(3, dtype=torch.bool), torch.ones(3))
    assert torch.equal(sampler.probs, torch.ones(3, dtype=torch.float64))
    assert sampler.generator_of() is None
    restored = PinnedArmsSampler(None, torch.ones(3, dtype=torch.bool))
    restored.load_state_dict(sampler.state_dict())


# --- the AE-SAM gate on the second pass -----------------------------------------------------------------------------
@pytest.mark.parametrize(("c", "cap"), [(0.0, 1.0), (-0.5, 2.0)])
def test_gated_second_pass_matches_reference(make_trainer, tiny_loader, c: float, cap: float) -> None:
    steps = 12
    module = TinyNet()
    ref = copy.deepcopy(module.model)
    callback = SLSAM(rho=RHO, seed=0, sampler="uniform", sparsity=0.5, max_update_scale=cap, second_pass_gate=c)
    masks: list[list[str]] = []
    total_passes = [0]

    class Recorder(L.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            masks.append([n for n, p in pl_module.named_parameters() if p.grad is not None])

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            total_passes.append(callback.record.passes_sum)

    make_trainer(callbacks=[callback, Recorder()], max_steps=steps).fit(module, tiny_loader)
    passes = [b - a == 2 for a, b in itertools.pairwise(total_passes)]
    scales = [{n.removeprefix("model."): min(2.0, cap) for n in m} for m in masks]
    decisions, gate = reference_scaled_slsam(ref, take(tiny_loader, steps), [strip(m) for m in masks], scales, c)
    assert decisions == passes
    assert callback.method is not None
    torch.testing.assert_close(callback.method.state_dict()["gate"], list(gate), rtol=1e-5, atol=0.0)
    assert True in decisions and False in decisions  # both kinds of step were compared
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(module.model.named_parameters())[name], p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [4.0, 0.30000000000000004])  # 0.9 v + 0.1 v rounds above the second
def test_the_gate_opens_on_its_first_step_whatever_the_threshold(value: float) -> None:
    from lightning_slsam.methods.slsam import gate_step

    assert 0.9 * 0.30000000000000004 + 0.1 * 0.30000000000000004 > 0.30000000000000004
    assert gate_step(None, value, 1e9) == ((value, 0.0), True)


def test_a_gate_that_always_opens_is_slsam_bitwise(make_trainer, tiny_loader) -> None:
    plain, gated = TinyNet(batch_norm=True), TinyNet(batch_norm=True)
    make_trainer(callbacks=[SLSAMNoisy(rho=RHO, seed=0)], max_steps=STEPS).fit(plain, tiny_loader)
    callback = SLSAMNoisy(rho=RHO, seed=0, second_pass_gate=-1e30)
    make_trainer(callbacks=[callback], max_steps=STEPS).fit(gated, tiny_loader)
    for (name, p), q in zip(plain.named_parameters(), gated.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert callback.method is not None and callback.method.state_dict()["gate"][0] > 0


def test_gate_statistics_resume_and_a_skipped_step_leaves_no_trace(make_trainer, tiny_loader) -> None:
    from lightning_slsam.engine.method import PassOne

    callback = SLSAMNoisy(rho=RHO, seed=0, second_pass_gate=0.0)
    make_trainer(callbacks=[callback], max_steps=3).fit(TinyNet(batch_norm=True), tiny_loader)
    method = callback.method
    assert method is not None
    state = method.state_dict()
    restored = SLSAMNoisy(rho=RHO, seed=0, second_pass_gate=0.0)
    make_trainer(callbacks=[restored], max_steps=1).fit(TinyNet(batch_norm=True), tiny_loader)
    assert restored.method is not None
    restored.method.load_state_dict(state)
    assert restored.method.state_dict()["gate"] == state["gate"]
    # a step that pass 1 measured and that is then skipped: the statistics are those before it
    n = method.sampler.num_arms
    first = PassOne(
        active=torch.ones(n, dtype=torch.bool),
        params=[],
        arm_of_param=torch.zeros(0, dtype=torch.long),
        arm_norms=torch.full((n,), 1e3),
        grad_scale=torch.tensor(1.0),
        finite=torch.tensor(True),
        local_arm_norms=torch.full((n,), 1e3),
    )
    method.begin_step()
    assert method.pass2_arms(first) is not None  # far above the mean: the gate opens
    assert method.state_dict()["gate"] != state["gate"]
    method.discard_step()
    assert method.state_dict()["gate"] == state["gate"]


# --- the sparse ascent with a dense update --------------------------------------------------------------------------
def reference_dense_update(model: nn.Module, batches: Sequence[Any], drawn: Sequence[Sequence[str]]) -> None:
    """A python loop: the ascent ``RHO g_S / ||g_S||`` on the drawn tensors S only, then the gradient at
    ``w + e_S`` of every parameter, and AdamW on all of them."""
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step, (x, y) in enumerate(batches):
        sampled = [named[n] for n in drawn[step]]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), sampled)
        everything = list(model.parameters())
        dense = gradient_after_ascent(model, x, y, sampled, grads, RHO, everything)
        for p, g in zip(everything, dense, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("make_callback", "name"),
    [
        (lambda: SLSAM(rho=RHO, seed=0, dense_update=True, sampler="uniform", sparsity=0.5), "slsam_uniform_dense"),
        # the bandit moves between steps
        (lambda: SLSAM(rho=RHO, seed=0, dense_update=True, sparsity=0.5, bandit_lr=0.5), "slsam_dense"),
        (
            lambda: SLSAM(
                rho=RHO, seed=0, dense_update=True, sampler="uniform", sparsity=0.3, always_active=["head", "vectors"]
            ),
            "slsam_uniform_dense",
        ),
        # the shipped default: the bandit in the top third, the head pinned, the dense update
        (lambda: SLSAMPlus(rho=RHO, seed=0, sparsity=0.3, bandit_lr=0.5), "slsam_plus"),
    ],
    ids=["uniform", "bandit", "uniform-pinned", "slsam_plus"],
)
def test_dense_update_matches_reference(make_trainer, tiny_loader, make_callback, name: str) -> None:
    module = TinyNet()
    ref = copy.deepcopy(module.model)
    callback = make_callback()
    drawn: list[list[str]] = []
    updated: list[list[str]] = []

    class Recorder(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            method, layout = callback.method, callback.layout
            assert method is not None and layout is not None
            sample = method.pass1_arms

            def recording() -> torch.Tensor:
                arms = sample()
                drawn.append([n for n, on in zip(layout.names, arms.tolist(), strict=True) if on])
                return arms

            method.pass1_arms = recording  # type: ignore[method-assign]

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            updated.append([n for n, p in pl_module.named_parameters() if p.grad is not None])

    make_trainer(callbacks=[callback, Recorder()], max_steps=STEPS).fit(module, tiny_loader)
    assert callback.method is not None
    assert callback.method.name == name
    everything = [n for n, _ in module.named_parameters()]
    assert updated == [everything] * STEPS  # every tensor reaches the optimizer on every step
    assert all(0 < len(d) < len(everything) for d in drawn)  # while the ascent was sparse
    reference_dense_update(ref, take(tiny_loader, STEPS), [strip(d) for d in drawn])
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(module.model.named_parameters())[name], p, rtol=1e-6, atol=1e-6)


def test_slsam_plus_perturbs_only_its_top_third_and_the_head_and_updates_every_tensor() -> None:
    """The shipped window: pass 1 and the ascent stay among the top ceil(0.34 N) free tensors and the head, while
    every tensor, the ones below the window included, takes AdamW's step on every step."""
    from lightning_slsam import optim

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(5)], nn.Linear(8, 3))
    opt = optim.SLSAMPlus(model, torch.optim.AdamW(model.parameters(), lr=1e-2), rho=RHO, seed=0, sparsity=0.5)
    names = [n for n, _ in model.named_parameters()]  # 12 tensor arms, the last two the head
    window = set(names[10 - 4 : 10]) | {"5.weight", "5.bias"}  # ceil(0.34 * 10) = 4 free arms on top, and the head
    drawn: list[set[str]] = []
    sample = opt.method.pass1_arms

    def recording() -> torch.Tensor:
        arms = sample()
        drawn.append({n for n, on in zip(names, arms.tolist(), strict=True) if on})
        return arms

    opt.method.pass1_arms = recording  # type: ignore[method-assign]
    before = snapshot(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(6):
        opt.step(lambda: F.cross_entropy(model(x), y))
        after = snapshot(model)
        assert all(not torch.equal(after[n], before[n]) for n in names)  # every tensor stepped, every step
        before = after
    assert all({"5.weight", "5.bias"} <= d <= window for d in drawn)
    assert set().union(*drawn) - {"5.weight", "5.bias"}  # the bandit sampled inside the window


@pytest.mark.parametrize(
    "callback",
    [lambda: SLSAMPlus(rho=0.0), lambda: SLSAMNoisy(rho=0.0, dense_update=True, max_update_scale=None)],
    ids=["slsam_plus", "slsam_noisy-dense"],
)
def test_dense_update_without_ascent_is_adamw_bitwise(make_trainer, tiny_loader, callback) -> None:
    """``rho=0``: pass 2 runs at ``w`` on every tensor, so the step is AdamW's own (the ascent's control); the
    shipped ``slsam_plus`` is that dense update by default."""
    from lightning_slsam import Base

    adamw, dense = TinyNet(batch_norm=True), TinyNet(batch_norm=True)
    make_trainer(callbacks=[Base()], max_steps=STEPS).fit(adamw, tiny_loader)
    make_trainer(callbacks=[callback()], max_steps=STEPS).fit(dense, tiny_loader)
    for (name, p), q in zip(adamw.named_parameters(), dense.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_sparse_msam_refuses_a_dense_update() -> None:
    from lightning_slsam import SparseMSAM

    with pytest.raises(ValueError, match=r"^dense_update: sparse_msam takes one pass"):
        SparseMSAM(dense_update=True, max_update_scale=None)


def test_cli_refuses_a_dense_update_with_the_update_scaling_before_training(tmp_path) -> None:
    """``slsam_noisy`` scales its updates by default: a dense update must switch that off, and the CLI says so."""
    from conftest import SHRINK, compose_config

    from lightning_slsam.app.cli import ConfigError, train

    cfg = compose_config(
        ["method=slsam_noisy", "model=resnet20_cifar", "model.weights=null", "method.dense_update=true", *SHRINK],
        str(tmp_path),
    )
    with pytest.raises(ConfigError, match=r"^method\.dense_update: .*set max_update_scale=None"):
        train(cfg)
    assert not (tmp_path / "result.json").exists()
