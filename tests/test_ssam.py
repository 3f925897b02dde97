"""SSAM-F and SSAM-D (Mi et al. 2022) through a real ``Trainer.fit``, against plain references written here.

The references are slow, obviously-right loops on a deepcopy of the model: the Fisher score by one
``torch.autograd.grad`` per sample, the drop and grow by sorting python lists, the masked ascent and the
restore by hand, and ``torch.optim.AdamW`` for the update.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, assert_models_close, assert_models_equal, snapshot
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_slsam.optim
from lightning_slsam import SAM, SSAMD, SSAMF, SharpnessAware, SharpnessAwareMixin, build_arms
from lightning_slsam.methods.fisher_score import fisher_scores
from lightning_slsam.methods.ssam import SSAMDMethod, SSAMDOptions, SSAMFMethod, SSAMFOptions, cosine_drop_rate

LR = 1e-2  # TinyNet's defaults, which the references copy
WEIGHT_DECAY = 0.1
RHO = 0.2
PREFIX = "model."


# --- helpers ----------------------------------------------------------------------------------------------------
def masks_by_name(callback: SharpnessAware) -> dict[str, Tensor]:
    """The method's mask of each parameter, by the name inside ``module.model`` (``0.weight``)."""
    method, layout = callback.method, callback.layout
    assert isinstance(method, (SSAMFMethod, SSAMDMethod)) and layout is not None
    names = [name.removeprefix(PREFIX) for arm in layout for name in arm.param_names]
    return {name: mask.clone() for name, mask in zip(names, method.masks, strict=True)}


def flat(tensors: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflat(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].view(t.shape).clone()
        start += t.numel()
    return out


def samples(loader: DataLoader, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of ``loader``'s first pass."""
    xs, ys = zip(*list(loader), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) >= n
    return x[:n], y[:n]


class MaskProbe(L.Callback):
    """The method's masks (as tensor objects) before and after every step, and the epoch of each step."""

    def __init__(self) -> None:
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []
        self.flat_before: list[Tensor] = []
        self.epochs: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, SharpnessAware))
        self.before.append(masks_by_name(callback))
        self.flat_before.append(callback.method._flat)  # the object itself: a refresh makes a new one
        self.epochs.append(trainer.current_epoch)
        assert pl_module.training and all(m.training for m in pl_module.modules()), "train mode not restored"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, SharpnessAware))
        self.after.append(masks_by_name(callback))


# --- references -------------------------------------------------------------------------------------------------
def reference_fisher(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``sum_i (d loss_i / d w)^2`` over the samples, one backward per sample, the model in eval mode."""
    model = copy.deepcopy(model).eval()
    named = dict(model.named_parameters())
    scores = {n: torch.zeros_like(p) for n, p in named.items()}
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        for (name, _), g in zip(named.items(), torch.autograd.grad(loss, list(named.values())), strict=True):
            scores[name] += g.square()
    return scores


def reference_fisher_mask(model: nn.Module, x: Tensor, y: Tensor, unperturbed: float) -> dict[str, Tensor]:
    """Keep the ``round((1 - unperturbed) * numel)`` largest Fisher scores (a clear margin to the next one)."""
    scores = reference_fisher(model, x, y)
    vector = flat(scores, list(scores))
    k = round((1 - unperturbed) * vector.numel())
    ranked = vector.sort(descending=True).values
    if 0 < k < len(ranked):
        assert ranked[k - 1] - ranked[k] > 1e-6 * ranked[k - 1], "a near-tie at the threshold: pick other data"
    keep = torch.zeros(vector.numel(), dtype=torch.bool)
    keep[vector.topk(k).indices] = True
    return unflat(keep, scores)


def reference_masked_sam(
    model: nn.Module, batches: Sequence[Any], masks: Sequence[dict[str, Tensor]], rho: float
) -> torch.optim.AdamW:
    """SAM with ``e = rho g / ||g|| * m`` (the norm over the full g); step t uses ``masks[t]``."""
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for (x, y), mask in zip(batches, masks, strict=True):
        params = list(named.values())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for name, p, g in zip(named, params, grads, strict=True):
                p.add_(rho * g / (norm + 1e-12) * mask[name])
        grads2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
        for p, g in zip(params, grads2, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def epoch_batches(loader: DataLoader, epochs: int, per_epoch: int) -> list[tuple[int, int, Any]]:
    """(epoch, batch index, batch) as a Trainer with ``limit_train_batches=per_epoch`` sees them (no shuffle)."""
    batches = list(loader)[:per_epoch]
    return [(e, b, batches[b]) for e in range(epochs) for b in range(per_epoch)]


# --- SSAM-F -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
@pytest.mark.parametrize("unperturbed", [0.3, 0.8])
def test_ssamf_mask_is_the_fisher_top_k(make_module, make_trainer, tiny_loader, unperturbed: float, per_sample) -> None:
    module = make_module(batch_norm=True)  # the Fisher pass runs in eval mode: BatchNorm on running stats
    initial = copy.deepcopy(module.model)
    callback = SSAMF(
        rho=RHO, unperturbed_fraction=unperturbed, num_samples=40, per_sample=per_sample
    )  # 2.5 batches of 16
    probe = MaskProbe()
    make_trainer(callbacks=[callback, probe], max_steps=2).fit(module, tiny_loader)

    method = callback.method
    assert isinstance(method, SSAMFMethod) and method.per_sample_used == per_sample
    total = sum(p.numel() for p in module.parameters())
    assert method.total_numel == total
    assert method.num_live == round((1 - unperturbed) * total)
    assert all(m.dtype == torch.bool for m in method.masks)
    x, y = samples(tiny_loader, 40)
    expected = reference_fisher_mask(initial, x, y, unperturbed)
    got = probe.before[0]
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_ssamf_refreshes_on_schedule(make_module, make_trainer, tiny_loader) -> None:
    callback = SSAMF(unperturbed_fraction=0.5, num_samples=16, update_every_epochs=2)
    probe = MaskProbe()
    trainer = make_trainer(callbacks=[callback, probe], max_steps=-1, max_epochs=4, limit_train_batches=2)
    trainer.fit(make_module(), tiny_loader)

    assert callback.method.refresh_epochs == [0, 2]
    assert probe.epochs == [0, 0, 1, 1, 2, 2, 3, 3]
    mask_of = probe.flat_before  # the mask tensor each step used: a refresh makes a new one
    assert all(mask_of[i] is mask_of[0] for i in range(4))  # epochs 0 and 1
    assert all(mask_of[i] is mask_of[4] for i in range(4, 8))  # epochs 2 and 3
    assert mask_of[4] is not mask_of[0]
    assert not torch.equal(mask_of[4], mask_of[0]), "the weights moved, so the Fisher mask should too"


def test_ssamf_steps_match_reference(make_module, make_trainer, tiny_loader) -> None:
    steps, unperturbed = 3, 0.5
    module = make_module()
    ref = copy.deepcopy(module.model)
    x, y = samples(tiny_loader, 32)
    mask = reference_fisher_mask(ref, x, y, unperturbed)
    make_trainer(callbacks=[SSAMF(rho=RHO, unperturbed_fraction=unperturbed, num_samples=32)], max_steps=steps).fit(
        module, tiny_loader
    )

    reference_masked_sam(ref, list(tiny_loader)[:steps], [mask] * steps, RHO)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)
    # the mask matters: full SAM gives other weights
    sam = make_module().model
    reference_masked_sam(sam, list(tiny_loader)[:steps], [{n: 1.0 for n in mask}] * steps, RHO)
    assert not all(
        torch.allclose(p, q, rtol=1e-4, atol=1e-5) for p, q in zip(ref.parameters(), sam.parameters(), strict=True)
    )


@pytest.mark.parametrize(("unperturbed", "own_generator"), [(0.0, False), (1e-9, True)], ids=["zero", "tiny"])
def test_ssamf_all_live_equals_sam(make_module, make_trainer, tiny_dataset, unperturbed: float, own_generator) -> None:
    """Every element live is SAM, bitwise; over two shuffled epochs, so a Fisher pass that moved the global RNG
    or the loader's own generator (the next epoch's order), or left BatchNorm in eval mode, would show."""
    sam, ssam = make_module(batch_norm=True), make_module(batch_norm=True)
    options = {"max_steps": -1, "max_epochs": 2, "limit_train_batches": 3}
    results = []
    for module, callback in (
        (sam, SAM(rho=RHO)),
        (ssam, SSAMF(rho=RHO, unperturbed_fraction=unperturbed, num_samples=20)),
    ):
        generator = torch.Generator().manual_seed(5) if own_generator else None
        loader = DataLoader(tiny_dataset, batch_size=16, shuffle=True, generator=generator)
        torch.manual_seed(0)
        make_trainer(callbacks=[callback], **options).fit(module, loader)
        results.append(callback)
    method = results[1].method
    assert method.refresh_epochs == [0, 1]
    assert method.num_live == method.total_numel
    assert_models_equal(ssam, sam)
    for a, b in zip(sam.buffers(), ssam.buffers(), strict=True):
        assert torch.equal(a, b)


class DictNet(nn.Module):
    """compute_loss on a dict batch with a per-sample weight and a batch-wide (unsliced) temperature."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
            self.unused = nn.Linear(2, 2)  # no gradient: its score stays 0

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        logits = self.model(batch["inputs"][0]) / batch["temperature"]
        losses = F.cross_entropy(logits, batch["inputs"][1], reduction="none")
        return (losses * batch["weight"]).mean() if batch["tag"] == "weighted" else losses.mean()


class ItemNet(DictNet):
    """A loss that reads a value on the host: torch.func.vmap cannot run it."""

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        loss = super().compute_loss(batch)
        if float(loss.detach()) < 0:
            raise AssertionError
        return loss


def dict_batches(loader: DataLoader) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(3)
    return [
        {"inputs": (x, y), "weight": torch.rand(len(x), generator=generator), "temperature": torch.tensor(1.5)}
        | {"tag": "weighted"}
        for x, y in list(loader)[:2]
    ]


def test_fisher_vmap_equals_loop_and_reference(tiny_loader) -> None:
    module = DictNet()
    module.model[1].running_mean.uniform_(-0.5, 0.5)  # eval-mode BatchNorm normalises with these
    params = list(module.parameters())
    batches = dict_batches(tiny_loader)
    vmapped = fisher_scores(module, batches, params, per_sample="vmap")
    looped = fisher_scores(module, batches, params, per_sample="loop")
    assert module.training and module.model[1].training  # train mode restored
    # the plain reference: one autograd.grad per sample, eval mode
    reference = [torch.zeros_like(p) for p in params]
    model = copy.deepcopy(module).eval()
    for batch in batches:
        (x, y), weight = batch["inputs"], batch["weight"]
        for i in range(len(x)):
            logits = model.model(x[i : i + 1]) / 1.5
            loss = (F.cross_entropy(logits, y[i : i + 1], reduction="none") * weight[i : i + 1]).mean()
            grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            for r, g in zip(reference, grads, strict=True):
                if g is not None:
                    r += g.square()
    for v, lo, r in zip(vmapped, looped, reference, strict=True):
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, lo, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(lo, r, rtol=1e-5, atol=1e-9)
    assert float(vmapped[-1].abs().sum()) == 0.0 and float(vmapped[0].sum()) > 0.0


def test_fisher_auto_falls_back_to_the_loop(tiny_loader) -> None:
    module, plain = ItemNet(), DictNet()
    batches = dict_batches(tiny_loader)
    with pytest.raises(RuntimeError):
        fisher_scores(module, batches, list(module.parameters()), per_sample="vmap")
    with pytest.warns(UserWarning, match="vmap failed"):
        auto = fisher_scores(module, batches, list(module.parameters()), per_sample="auto")
    expected = fisher_scores(plain, batches, list(plain.parameters()), per_sample="loop")
    for a, e in zip(auto, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


class ItemTinyNet(TinyNet):
    """TinyNet whose loss reads a value on the host: the method falls back to the per-sample loop."""

    def compute_loss(self, batch: Any) -> Tensor:
        loss = super().compute_loss(batch)
        if math.isnan(float(loss.detach())):
            raise AssertionError
        return loss


def test_ssamf_method_falls_back_once_and_remembers(make_trainer, tiny_loader) -> None:
    callback = SSAMF(unperturbed_fraction=0.5, num_samples=8)
    trainer = make_trainer(callbacks=[callback], max_steps=-1, max_epochs=2, limit_train_batches=1)
    with pytest.warns(UserWarning, match="vmap failed") as record:
        trainer.fit(ItemTinyNet(), tiny_loader)
    assert sum("vmap failed" in str(w.message) for w in record) == 1
    assert callback.method.per_sample_used == "loop" and callback.method.refresh_epochs == [0, 1]


class TwoLoaderNet(SharpnessAwareMixin, L.LightningModule):
    """Trained on a dict of two loaders (Lightning's CombinedLoader): the loss uses both."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        return self.net.compute_loss(batch["a"]) + self.net.compute_loss(batch["b"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


def test_ssamf_with_combined_loaders(make_trainer, tiny_dataset) -> None:
    loaders = {"a": DataLoader(tiny_dataset, batch_size=16), "b": DataLoader(tiny_dataset, batch_size=16)}
    callback = SSAMF(unperturbed_fraction=0.25, num_samples=20)
    module = TwoLoaderNet()
    initial = copy.deepcopy(module.net)
    trainer = make_trainer(callbacks=[callback], max_steps=1)
    trainer.fit(module, loaders)
    method = callback.method
    assert method.num_live == round(0.75 * method.total_numel)
    # the reference: sample i of the combined batch is sample i of "a" and sample i of "b" (first 20 samples)
    x, y = samples(DataLoader(tiny_dataset, batch_size=16), 20)
    named = dict(initial.named_parameters())
    scores = {n: torch.zeros_like(p) for n, p in named.items()}
    for i in range(20):
        loss = 2 * F.cross_entropy(initial.model(x[i : i + 1]), y[i : i + 1])
        for n, g in zip(named, torch.autograd.grad(loss, list(named.values())), strict=True):
            scores[n] += g.square()
    vector = flat(scores, list(scores))
    keep = torch.zeros(vector.numel(), dtype=torch.bool)
    keep[vector.topk(method.num_live).indices] = True
    assert torch.equal(torch.cat([m.reshape(-1) for m in method.masks]), keep)


# --- SSAM-D -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unperturbed", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_ssamd_initial_mask_has_the_asked_unperturbed_fraction(make_module, unperturbed: float) -> None:
    module = make_module()
    layout = build_arms(module)
    method = SSAMDMethod(**SSAMDOptions(unperturbed_fraction=unperturbed, seed=3).as_dict())
    method.setup(layout)
    total = sum(p.numel() for p in module.parameters())
    assert method.num_live == round((1 - unperturbed) * total)
    for mask, p in zip(method.masks, layout.params, strict=True):
        assert mask.dtype == torch.bool and mask.shape == p.shape and mask.device == p.device
    again = SSAMDMethod(**SSAMDOptions(unperturbed_fraction=unperturbed, seed=3).as_dict())
    other = SSAMDMethod(**SSAMDOptions(unperturbed_fraction=unperturbed, seed=4).as_dict())
    again.setup(layout)
    other.setup(layout)
    assert all(torch.equal(a, b) for a, b in zip(method.masks, again.masks, strict=True))
    if 0.0 < unperturbed < 1.0:
        assert not all(torch.equal(a, b) for a, b in zip(method.masks, other.masks, strict=True))


def test_cosine_drop_rate_values() -> None:
    assert cosine_drop_rate(0.5, 0, 10) == pytest.approx(0.5)
    assert cosine_drop_rate(0.5, 5, 10) == pytest.approx(0.25)
    assert cosine_drop_rate(0.5, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_drop_rate(0.5, 12, 10) == pytest.approx(0.0, abs=1e-12)  # clipped, not rising again
    assert cosine_drop_rate(0.4, 1, 3) == pytest.approx(0.2 * (1 + math.cos(math.pi / 3)))
    assert cosine_drop_rate(0.4, 7, None) == 0.4  # unbounded training: no decay
    values = [cosine_drop_rate(0.8, e, 20) for e in range(21)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "expected"), [(5, -1, 5), (None, 10, 3), (None, 4, 1)], ids=["epochs", "steps", "one"]
)
def test_ssamd_takes_the_schedule_length_from_the_trainer(
    make_module, make_trainer, tiny_loader, max_epochs, max_steps, expected
) -> None:
    callback = SSAMD(seed=0)
    make_trainer(callbacks=[callback], max_steps=max_steps, max_epochs=max_epochs, limit_train_batches=4).fit(
        make_module(), tiny_loader
    )
    method = callback.method
    assert method.total_epochs == expected
    assert method.current_drop_rate() == pytest.approx(cosine_drop_rate(0.5, method.epoch, expected))


@pytest.mark.parametrize(
    ("drop", "grow"), [("gradient", "gradient"), ("gradient", "random"), ("random", "random"), ("random", "gradient")]
)
def test_ssamd_steps_and_refreshes_match_reference(make_module, make_trainer, tiny_loader, drop, grow) -> None:
    """Drop the floor(d_t * live) live elements of smallest |g| (pass-1 g of the epoch's first step), grow as
    many of the largest |g| among the dead (random choices are checked for their constraints, then followed)."""
    epochs, per_epoch, unperturbed, drop_rate = 4, 2, 0.6, 0.5
    module = make_module()
    ref = copy.deepcopy(module.model)
    callback = SSAMD(rho=RHO, unperturbed_fraction=unperturbed, drop_rate=drop_rate, drop=drop, grow=grow, seed=1)
    probe = MaskProbe()
    make_trainer(callbacks=[callback, probe], max_steps=-1, max_epochs=epochs, limit_train_batches=per_epoch).fit(
        module, tiny_loader
    )
    assert callback.method.refresh_epochs == [1, 2, 3]

    names = list(probe.before[0])
    total = sum(m.numel() for m in probe.before[0].values())
    live0 = round((1 - unperturbed) * total)
    named = dict(ref.named_parameters())
    optimizer = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    mask = flat(probe.before[0], names)
    assert int(mask.sum()) == live0
    for step, (epoch, index, (x, y)) in enumerate(epoch_batches(tiny_loader, epochs, per_epoch)):
        assert torch.equal(flat(probe.before[step], names), mask), step
        params = [named[n] for n in names]
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
        if epoch > 0 and index == 0:  # the refresh
            magnitude = torch.cat([g.abs().reshape(-1) for g in grads]).tolist()
            d = drop_rate / 2 * (1 + math.cos(math.pi * epoch / epochs))
            live = [i for i in range(total) if mask[i]]
            dead = [i for i in range(total) if not mask[i]]
            n = min(math.floor(d * len(live)), len(dead))
            assert n > 0
            new = flat(probe.after[step], names)
            dropped = {i for i in live if not new[i]}
            grown = {i for i in dead if new[i]}
            assert len(dropped) == len(grown) == n
            if drop == "gradient":
                assert dropped == set(sorted(live, key=lambda i: (magnitude[i], i))[:n])
            if grow == "gradient":
                assert grown == set(sorted(dead, key=lambda i: (-magnitude[i], i))[:n])
            mask = new
        assert torch.equal(flat(probe.after[step], names), mask), step
        assert int(mask.sum()) == live0  # the live count never changes
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        masks = unflat(mask, probe.before[0])
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for name, p, g in zip(names, params, grads, strict=True):
                p.add_(RHO * g / (norm + 1e-12) * masks[name])
        grads2 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
        with torch.no_grad():
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
        for p, g in zip(params, grads2, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert_models_close(module.model, ref, rtol=1e-6, atol=1e-6)


def test_ssamd_every_two_epochs(make_module, make_trainer, tiny_loader) -> None:
    callback = SSAMD(unperturbed_fraction=0.5, update_every_epochs=2, seed=0)
    probe = MaskProbe()
    make_trainer(callbacks=[callback, probe], max_steps=-1, max_epochs=5, limit_train_batches=2).fit(
        make_module(), tiny_loader
    )
    assert callback.method.refresh_epochs == [2, 4]
    changed = [
        not torch.equal(flat(a, list(a)), flat(b, list(b))) for a, b in zip(probe.before, probe.after, strict=True)
    ]
    assert changed == [False, False, False, False, True, False, False, False, True, False]


def test_ssamd_all_live_equals_sam(make_module, make_trainer, tiny_loader) -> None:
    sam, ssam = make_module(), make_module()
    options = {"max_steps": -1, "max_epochs": 2, "limit_train_batches": 3}
    make_trainer(callbacks=[SAM(rho=RHO)], **options).fit(sam, tiny_loader)
    make_trainer(callbacks=[SSAMD(rho=RHO, unperturbed_fraction=0.0, seed=0)], **options).fit(ssam, tiny_loader)
    assert_models_equal(ssam, sam)


# --- both -------------------------------------------------------------------------------------------------------
MAKERS: dict[str, Callable[[], SharpnessAware]] = {
    "ssam_f": lambda: SSAMF(num_samples=16),
    "ssam_d": lambda: SSAMD(seed=0),
    "ssam_d-random": lambda: SSAMD(drop="random", grow="gradient", seed=0),
}


@pytest.mark.parametrize("make_callback", list(MAKERS.values()), ids=list(MAKERS))
def test_short_fit_trains(make_module, make_trainer, tiny_loader, make_callback) -> None:
    module = make_module(batch_norm=True)
    before = snapshot(module)
    callback = make_callback()
    trainer = make_trainer(callbacks=[callback], max_steps=-1, max_epochs=2, limit_train_batches=3)
    trainer.fit(module, tiny_loader)
    assert trainer.global_step == 6
    for key in ("train/loss", "train/loss_perturbed", "train/sharpness"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    after = snapshot(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert callback.method.name in ("ssam_f", "ssam_d")


@pytest.mark.parametrize(
    ("make_options", "argument"),
    [
        (lambda: SSAMFOptions(rho=-1), "rho"),
        (lambda: SSAMFOptions(unperturbed_fraction=-0.1), "unperturbed_fraction"),
        (lambda: SSAMFOptions(unperturbed_fraction=1.5), "unperturbed_fraction"),
        (lambda: SSAMFOptions(unperturbed_fraction="half"), "unperturbed_fraction"),
        (lambda: SSAMFOptions(num_samples=0), "num_samples"),
        (lambda: SSAMFOptions(num_samples=2.5), "num_samples"),
        (lambda: SSAMFOptions(update_every_epochs=0), "update_every_epochs"),
        (lambda: SSAMFOptions(per_sample="batched"), "per_sample"),
        (lambda: SSAMDOptions(rho=float("nan")), "rho"),
        (lambda: SSAMDOptions(unperturbed_fraction=2), "unperturbed_fraction"),
        (lambda: SSAMDOptions(drop_rate=-0.5), "drop_rate"),
        (lambda: SSAMDOptions(drop_rate=1.01), "drop_rate"),
        (lambda: SSAMDOptions(update_every_epochs=True), "update_every_epochs"),
        (lambda: SSAMDOptions(drop="weight"), "drop"),
        (lambda: SSAMDOptions(grow="magnitude"), "grow"),
        (lambda: SSAMDOptions(seed=1.5), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(make_options, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        make_options()


@pytest.mark.parametrize("make", [SSAMF, SSAMD, lightning_slsam.optim.SSAMD], ids=["SSAMF", "SSAMD", "optim.SSAMD"])
def test_the_papers_name_sparsity_is_refused_with_the_new_name(make) -> None:
    """SSAM's "sparsity" (the fraction NOT perturbed) is ``unperturbed_fraction`` here: SL-SAM's ``sparsity`` is
    the fraction of arms that ARE active, and one name must not mean both."""
    model = nn.Linear(2, 2)
    args = (model, torch.optim.SGD(model.parameters(), lr=0.1)) if make.__module__.endswith("optim") else ()
    with pytest.raises(TypeError, match="'sparsity' was renamed 'unperturbed_fraction'"):
        make(*args, sparsity=0.5)


@pytest.mark.parametrize("kind", ["ssam_f", "ssam_d"])
def test_state_dict_round_trip_restores_masks(make_module, make_trainer, tiny_loader, kind: str) -> None:
    module = make_module()
    callback = SSAMF(num_samples=16) if kind == "ssam_f" else SSAMD(grow="random", seed=5)
    make_trainer(callbacks=[callback], max_steps=-1, max_epochs=3, limit_train_batches=2).fit(module, tiny_loader)
    method = callback.method
    state = method.state_dict()
    assert all(m.device.type == "cpu" and m.dtype == torch.bool for m in state["masks"])

    fresh = (
        SSAMFMethod(**SSAMFOptions(num_samples=16).as_dict())
        if kind == "ssam_f"
        else SSAMDMethod(**SSAMDOptions(grow="random", seed=99).as_dict())
    )
    fresh.setup(build_arms(module))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.masks, method.masks, strict=True))
    assert fresh.refresh_epochs == method.refresh_epochs == ([0, 1, 2] if kind == "ssam_f" else [1, 2])
    if isinstance(fresh, SSAMDMethod):
        assert torch.equal(fresh.generator.get_state(), method.generator.get_state())
        assert (fresh.epoch, fresh.total_epochs) == (method.epoch, method.total_epochs) == (2, 3)
    # the state is a copy: training on does not change it
    state["masks"][0][...] = ~state["masks"][0]
    assert not torch.equal(state["masks"][0], method.masks[0])


class StopAfter(L.Callback):
    """Interrupt training at the end of epoch ``epoch`` (the schedule still sees the full ``max_epochs``)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize("kind", ["ssam_f", "ssam_d"])
def test_resume_from_checkpoint_is_exact(make_module, make_trainer, tiny_loader, tmp_path, kind: str) -> None:
    def make_callback() -> SharpnessAware:
        return SSAMF(rho=RHO, num_samples=16) if kind == "ssam_f" else SSAMD(rho=RHO, drop="random", seed=2)

    options = {"max_steps": -1, "max_epochs": 4, "limit_train_batches": 2}
    straight = make_module()
    make_trainer(callbacks=[make_callback()], **options).fit(straight, tiny_loader)

    trainer = make_trainer(callbacks=[make_callback(), StopAfter(1)], **options)
    trainer.fit(make_module(), tiny_loader)
    assert trainer.current_epoch == 2 and trainer.global_step == 4
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = make_module(seed=7)  # other weights: the checkpoint must restore them
    callback = make_callback()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(callbacks=[callback], **options).fit(resumed, tiny_loader, ckpt_path=path)
    assert callback.method.refresh_epochs == ([0, 1, 2, 3] if kind == "ssam_f" else [1, 2, 3])
    assert_models_equal(resumed, straight)
