"""SSAM-F's empirical Fisher score and its batch helpers (``lightning_slsam/methods/fisher_score.py``), without
Lightning.

``batch_size`` and ``slice_batch`` on tuples, dicts and nests (a tensor whose first dimension is not the batch size
is kept whole); ``first_samples`` (exactly n samples, the last batch cut; fewer with a warning; none is an error;
``prepare`` on each batch; no batch pulled past the n-th sample); ``preserved_rng``; and ``fisher_scores`` against a
plain reference that loops over the samples with one ``torch.autograd.grad`` each, through vmap and the loop, with
the module's ``compute_loss`` and with an explicit ``loss_of``, and the module's train/eval flags put back.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import IN_FEATURES, NUM_CLASSES, TinyNet, make_dataset
from torch import Tensor, nn

from lightning_slsam.methods import fisher_score
from lightning_slsam.methods.fisher_score import (
    PER_SAMPLE,
    batch_size,
    first_samples,
    fisher_scores,
    preserved_rng,
    slice_batch,
)

WAYS = ["vmap", "loop"]


def batches_of(sizes: Sequence[int], seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Consecutive ``(x, y)`` batches of the given sizes from the tiny dataset."""
    data = make_dataset(n=sum(sizes), seed=seed)
    out, start = [], 0
    for size in sizes:
        out.append((data.tensors[0][start : start + size], data.tensors[1][start : start + size]))
        start += size
    return out


def assert_nests_equal(actual: Any, expected: Any) -> None:
    """Same nest structure and container types, bitwise-equal tensors, equal plain leaves."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, Tensor):
        assert actual.shape == expected.shape and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_nests_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_nests_equal(a, e)
    else:
        assert actual == expected


# --- batch_size --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ((torch.zeros(5, 3), torch.zeros(5)), 5),
        ([torch.zeros(2)], 2),
        ({"input_ids": torch.zeros(7, 4), "labels": torch.zeros(7)}, 7),
        ((torch.tensor(1.0), torch.zeros(4, 2)), 4),  # a 0-d tensor has no batch dimension
        ({"meta": "text", "n": 3, "inner": [(torch.zeros(6, 1),)]}, 6),
        ((torch.zeros(3, 2), torch.zeros(8)), 3),  # the first tensor decides
        (torch.zeros(9, 2), 9),
    ],
)
def test_batch_size_is_the_first_dimension_of_the_first_tensor(batch: Any, expected: int) -> None:
    assert batch_size(batch) == expected


@pytest.mark.parametrize("batch", [(), {"a": 1, "b": "x"}, [1.0, 2.0], (torch.tensor(3.0),)])
def test_batch_size_without_a_tensor_is_a_type_error(batch: Any) -> None:
    with pytest.raises(TypeError, match=r"^ssam_f: cannot find the batch size"):
        batch_size(batch)


# --- slice_batch -------------------------------------------------------------------------------------------------
def test_slice_batch_cuts_per_sample_tensors_and_keeps_the_rest() -> None:
    x, y = torch.arange(24.0).view(6, 4), torch.arange(6)
    weights = torch.tensor([0.5, 2.0, 1.0])  # 3 != 6: kept whole
    scalar = torch.tensor(7.0)
    batch = {"x": x, "y": y, "weights": weights, "scalar": scalar, "name": "digits", "nested": [(x * 2, {"m": y + 1})]}
    expected = {
        "x": x[1:4],
        "y": y[1:4],
        "weights": weights,
        "scalar": scalar,
        "name": "digits",
        "nested": [(x[1:4] * 2, {"m": y[1:4] + 1})],
    }
    assert_nests_equal(slice_batch(batch, 1, 4, 6), expected)


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (3, 4), (5, 6), (0, 6), (2, 5)])
def test_slice_batch_on_a_tuple_equals_indexing_each_tensor(start: int, stop: int) -> None:
    x, y = batches_of([6])[0]
    assert_nests_equal(slice_batch((x, y), start, stop, 6), (x[start:stop], y[start:stop]))
    assert_nests_equal(slice_batch([x, y], start, stop, 6), [x[start:stop], y[start:stop]])


def test_slice_batch_leaves_the_batch_itself_alone() -> None:
    x, y = batches_of([6])[0]
    batch = {"x": x, "y": y}
    slice_batch(batch, 0, 2, 6)
    assert batch["x"] is x and batch["y"] is y and x.shape[0] == 6


# --- first_samples -----------------------------------------------------------------------------------------------
def concatenated(batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


class Counting:
    """An iterable of batches that counts how many were pulled."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)
        self.pulled = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.pulled += 1
            yield batch


@pytest.mark.parametrize(
    ("sizes", "n", "expected_sizes", "pulled"),
    [
        ([4, 4, 4], 6, [4, 2], 2),
        ([4, 4, 4], 8, [4, 4], 2),  # exactly at a batch boundary: the third batch is never pulled
        ([4, 4, 4], 1, [1], 1),
        ([4, 4, 4], 12, [4, 4, 4], 3),
        ([5, 1, 3], 7, [5, 1, 1], 3),
        ([10], 3, [3], 1),
    ],
)
def test_first_samples_are_exactly_n_with_the_last_batch_cut(
    sizes: list[int], n: int, expected_sizes: list[int], pulled: int
) -> None:
    batches = batches_of(sizes)
    source = Counting(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        taken = first_samples(source, n)
    assert [batch_size(b) for b in taken] == expected_sizes
    assert source.pulled == pulled
    x, y = concatenated(batches)
    got_x, got_y = concatenated(taken)
    assert torch.equal(got_x, x[:n]) and torch.equal(got_y, y[:n])


def test_first_samples_cuts_dict_batches_and_keeps_whole_tensors() -> None:
    (x1, y1), (x2, y2) = batches_of([4, 4])
    weights = torch.ones(NUM_CLASSES)
    taken = first_samples([{"x": x1, "y": y1, "w": weights}, {"x": x2, "y": y2, "w": weights}], 5)
    assert_nests_equal(taken, [{"x": x1, "y": y1, "w": weights}, {"x": x2[:1], "y": y2[:1], "w": weights}])


def test_fewer_samples_than_asked_warn_and_give_what_exists() -> None:
    batches = batches_of([4, 3])
    with pytest.warns(UserWarning, match=r"ssam_f: num_samples=20 but the training data holds 7 samples"):
        taken = first_samples(iter(batches), 20)
    assert_nests_equal(taken, batches)


@pytest.mark.parametrize("batches", [[], [(torch.zeros(0, IN_FEATURES), torch.zeros(0, dtype=torch.long))]])
def test_no_samples_is_a_runtime_error(batches: list[Any]) -> None:
    with pytest.raises(RuntimeError, match="no samples"):
        first_samples(batches, 4)


def test_prepare_is_applied_to_each_batch_before_the_cut() -> None:
    batches = batches_of([4, 4, 4])
    seen: list[int] = []

    def prepare(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        seen.append(batch_size(batch))
        x, y = batch
        return {"x": x * 10.0, "y": y}

    taken = first_samples(batches, 6, prepare)
    assert seen == [4, 4]  # called on the whole batches pulled, and on no other
    expected = [
        {"x": batches[0][0] * 10.0, "y": batches[0][1]},
        {"x": batches[1][0][:2] * 10.0, "y": batches[1][1][:2]},
    ]
    assert_nests_equal(taken, expected)


# --- preserved_rng -----------------------------------------------------------------------------------------------
def test_preserved_rng_puts_the_global_generator_back() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    with preserved_rng(torch.device("cpu")):
        inside = torch.rand(5)
        torch.randn(100)
        torch.randperm(10)
    assert torch.equal(torch.get_rng_state(), before)
    # the next draws are those a run without the block would make
    assert torch.equal(torch.rand(5), inside)


def test_preserved_rng_puts_the_generator_back_after_an_error() -> None:
    before = torch.get_rng_state()
    with pytest.raises(KeyError), preserved_rng(torch.device("cpu")):
        torch.rand(3)
        raise KeyError("inside")
    assert torch.equal(torch.get_rng_state(), before)


def test_preserved_rng_leaves_a_private_generator_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    with preserved_rng(torch.device("cpu")):
        first = torch.rand(3, generator=generator)
    assert not torch.equal(torch.rand(3, generator=generator), first)  # it moved on


# --- fisher_scores -----------------------------------------------------------------------------------------------
def reference_fisher(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    names: Sequence[str],
    loss_of: Callable[[nn.Module, Any], Tensor],
    sample_keys: Sequence[str] = ("x", "y"),
) -> list[Tensor]:
    """``sum_i (d loss(sample_i) / d w)^2`` by one ``torch.autograd.grad`` per sample, on an eval-mode copy; sample
    ``i`` of a dict batch is row ``i`` of each of ``sample_keys`` and the other entries whole."""
    model = copy.deepcopy(model).eval()
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    scores = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    for batch in batches:
        for i in range(len(batch[sample_keys[0]])):
            sample = {k: v[i : i + 1] if k in sample_keys else v for k, v in batch.items()}
            grads = torch.autograd.grad(loss_of(model, sample), params, allow_unused=True)
            for score, g in zip(scores, grads, strict=True):
                if g is not None:
                    score += g.float().square()
    return scores


def tinynet_loss(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model.model(batch["x"]), batch["y"])


class DictNet(TinyNet):
    """TinyNet on dict batches (``{"x": ..., "y": ...}``)."""

    def compute_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.model(batch["x"]), batch["y"])


def dict_batches(sizes: Sequence[int], seed: int = 0) -> list[dict[str, Tensor]]:
    return [{"x": x, "y": y} for x, y in batches_of(sizes, seed)]


@pytest.mark.parametrize("per_sample", WAYS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_scores_equal_the_per_sample_loop_with_compute_loss(per_sample: str, batch_norm: bool) -> None:
    module = DictNet(batch_norm=batch_norm, seed=3).train()
    if batch_norm:  # running statistics that are not the defaults, so that eval mode shows
        with torch.no_grad():
            module.model[1].running_mean.uniform_(-0.5, 0.5)
            module.model[1].running_var.uniform_(0.5, 2.0)
    batches = dict_batches([5, 4, 3])
    names = [n for n, _ in module.named_parameters()]
    want = reference_fisher(module, batches, names, tinynet_loss)
    got = fisher_scores(module, batches, list(module.parameters()), per_sample=per_sample)
    assert len(got) == len(want)
    for g, w, p in zip(got, want, module.parameters(), strict=True):
        assert g.dtype == torch.float32 and g.shape == p.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert all(m.training for m in module.modules())


@pytest.mark.parametrize("per_sample", WAYS)
def test_scores_of_a_subset_of_parameters_in_any_order(per_sample: str) -> None:
    module = DictNet(seed=1)
    names = ["model.4.weight", "model.0.bias", "model.2.weight"]
    named = dict(module.named_parameters())
    batches = dict_batches([6, 2])
    want = reference_fisher(module, batches, names, tinynet_loss)
    got = fisher_scores(module, batches, [named[n] for n in names], per_sample=per_sample)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


class Regressor(nn.Module):
    """A plain module without ``compute_loss``, with a parameter its loss never reads."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.body = nn.Sequential(nn.Linear(IN_FEATURES, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2))
            self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def regression_loss(model: nn.Module, batch: Any) -> Tensor:
    """Squared error to the targets, times a tensor kept whole (its first dimension is not the batch size)."""
    return F.mse_loss(model(batch["x"]), batch["t"]) * batch["scale"].sum()


def regression_batches(sizes: Sequence[int]) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.5, 1.5, 2.0])
    return [
        {
            "x": torch.randn(n, IN_FEATURES, generator=generator),
            "t": torch.randn(n, 2, generator=generator),
            "scale": scale,
        }
        for n in sizes
    ]


@pytest.mark.parametrize("per_sample", WAYS)
def test_scores_with_an_explicit_loss_of(per_sample: str) -> None:
    module = Regressor().train()  # dropout on: the score must run in eval mode, deterministically
    batches = regression_batches([4, 5])
    names = [n for n, _ in module.named_parameters()]
    want = reference_fisher(module, batches, names, regression_loss, sample_keys=("x", "t"))
    got = fisher_scores(
        module, batches, list(module.parameters()), per_sample=per_sample, loss_of=lambda b: regression_loss(module, b)
    )
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(got[names.index("unused")], torch.zeros(3))
    assert module.training and module.body[1].training


def test_vmap_and_loop_agree_and_vmap_chunks_give_the_same_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    module = DictNet(seed=2)
    batches = dict_batches([7, 9])
    params = list(module.parameters())
    loop = fisher_scores(module, batches, params, per_sample="loop")
    whole = fisher_scores(module, batches, params, per_sample="vmap")
    numel = sum(p.numel() for p in params)
    monkeypatch.setattr(fisher_score, "VMAP_CHUNK_ELEMENTS", 2 * numel)  # chunks of two samples (and a rest of one)
    chunked = fisher_scores(module, batches, params, per_sample="vmap")
    for a, b, c in zip(loop, whole, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)


def test_a_double_precision_model_gives_float32_scores() -> None:
    module = DictNet(seed=4).double()
    batches = [{"x": b["x"].double(), "y": b["y"]} for b in dict_batches([4])]
    names = [n for n, _ in module.named_parameters()]
    want = reference_fisher(module, batches, names, tinynet_loss)
    for per_sample in WAYS:
        got = fisher_scores(module, batches, list(module.parameters()), per_sample=per_sample)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_auto_falls_back_to_the_loop_with_a_warning_when_vmap_fails() -> None:
    module = DictNet(seed=6)
    batches = dict_batches([3, 2])

    def loss_with_item(batch: Any) -> Tensor:
        loss = module.compute_loss(batch)
        assert loss.item() >= 0.0  # a host read: vmap cannot take it
        return loss

    names = [n for n, _ in module.named_parameters()]
    want = reference_fisher(module, batches, names, tinynet_loss)
    with pytest.warns(UserWarning, match=r"torch\.func\.vmap failed .*using one backward pass per sample"):
        got = fisher_scores(module, batches, list(module.parameters()), per_sample="auto", loss_of=loss_with_item)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError):  # vmap asked for by name: no fallback
        fisher_scores(module, batches, list(module.parameters()), per_sample="vmap", loss_of=loss_with_item)


def test_the_way_is_checked_and_a_module_without_a_loss_is_refused() -> None:
    assert PER_SAMPLE == ("auto", "vmap", "loop")
    module = DictNet()
    batches = dict_batches([2])
    with pytest.raises(ValueError, match=r"^per_sample: .*'vmap'.*got 'batched'"):
        fisher_scores(module, batches, list(module.parameters()), per_sample="batched")
    plain = Regressor()
    with pytest.raises(ValueError, match=r"^loss_of: .*Regressor has none"):
        fisher_scores(plain, regression_batches([2]), list(plain.parameters()))


@pytest.mark.parametrize("per_sample", [*WAYS, "auto"])
def test_every_submodule_runs_in_eval_mode_and_gets_its_own_flag_back(per_sample: str) -> None:
    module = DictNet(batch_norm=True).train()
    module.model[1].eval()  # a mix of flags: BatchNorm frozen, the rest training
    module.model[3].eval()
    before = [m.training for m in module.modules()]
    assert any(before) and not all(before)
    during: list[list[bool]] = []

    def loss_of(batch: Any) -> Tensor:
        during.append([m.training for m in module.modules()])
        return module.compute_loss(batch)

    fisher_scores(module, dict_batches([3]), list(module.parameters()), per_sample=per_sample, loss_of=loss_of)
    assert during and all(not any(flags) for flags in during)
    assert [m.training for m in module.modules()] == before


@pytest.mark.parametrize("per_sample", WAYS)
def test_the_flags_come_back_when_the_loss_raises(per_sample: str) -> None:
    module = DictNet().train()
    module.model[0].eval()
    before = [m.training for m in module.modules()]

    def broken(batch: Any) -> Tensor:
        raise ArithmeticError("broken loss")

    with pytest.raises(ArithmeticError, match="broken loss"):
        fisher_scores(module, dict_batches([2]), list(module.parameters()), per_sample=per_sample, loss_of=broken)
    assert [m.training for m in module.modules()] == before


@pytest.mark.parametrize("per_sample", WAYS)
def test_the_weights_and_their_gradients_are_left_alone(per_sample: str) -> None:
    module = DictNet(seed=8)
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.25)
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    fisher_scores(module, dict_batches([4]), list(module.parameters()), per_sample=per_sample)
    for name, p in module.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert torch.equal(p.grad, torch.full_like(p, 0.25)), name
