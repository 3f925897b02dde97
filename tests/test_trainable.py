"""TrainableSet against a plain reference: what is trainable is ``requires_grad`` and held by the optimizer, read
again at every refresh; ``enable`` and ``restore`` touch only flags, and put back exactly what the user had."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_slsam.engine.arms import build_arms
from lightning_slsam.engine.trainable import TrainableSet, check_parameters, held_parameters


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _reference(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> tuple[list[bool], list[int]]:
    """Per arm: has a trainable parameter, and how many trainable elements; written out the slow way."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    layout = build_arms(model, mode, include_frozen=True)
    eligible, numels = [], []
    for arm in layout.arms:
        trainable = [p for p in arm.params if p.requires_grad and id(p) in held]
        eligible.append(bool(trainable))
        numels.append(sum(p.numel() for p in trainable))
    return eligible, numels


@pytest.mark.parametrize("mode", ["tensor", "module", "block"])
def test_refresh_follows_freezing_and_late_groups_like_the_reference(mode: str) -> None:
    model = _model()
    optimizer = torch.optim.SGD(list(model[0].parameters()) + list(model[2].parameters()), lr=0.1)
    trainable = TrainableSet(build_arms(model, mode, include_frozen=True))

    def check() -> None:
        eligible, numels = _reference(model, optimizer, mode)
        assert trainable.arms.tolist() == eligible
        assert trainable.numels.tolist() == numels
        assert trainable.total_numel == sum(numels)

    assert trainable.refresh(optimizer) is True
    check()
    assert trainable.refresh(optimizer) is False  # nothing changed
    model[0].requires_grad_(False)  # freeze mid-run
    assert trainable.refresh(optimizer) is True
    check()
    optimizer.add_param_group({"params": list(model[3].parameters()) + list(model[4].parameters())})
    assert trainable.refresh(optimizer) is True
    check()
    assert trainable.version == 2


def test_enable_and_restore_give_back_the_users_flags() -> None:
    model = _model()
    model[2].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    layout = build_arms(model, "tensor", include_frozen=True)
    trainable = TrainableSet(layout)
    trainable.refresh(optimizer)
    active = torch.zeros(len(layout), dtype=torch.bool)
    active[::2] = True
    trainable.enable(active)
    for i, p in enumerate(layout.params):
        assert p.requires_grad == (bool(active[i]) and before[i]), layout.arms[i].name  # a frozen one stays frozen
    trainable.restore()
    assert [p.requires_grad for p in model.parameters()] == before
    assert [p.requires_grad for p in trainable.params_of(None)] == [True] * (len(before) - 1)


def test_active_ratio_counts_trainable_elements_only() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.1)
    layout = build_arms(model, "module", include_frozen=True)
    trainable = TrainableSet(layout)
    trainable.refresh(optimizer)
    head = torch.tensor([a.name == "4" for a in layout.arms])
    assert trainable.active_ratio(head) == 1.0
    assert trainable.active_ratio(~head) == 0.0


def test_foreign_and_all_frozen_optimizers_are_refused_by_argument_name() -> None:
    model = _model()
    layout = build_arms(model, "tensor", include_frozen=True)
    stray = nn.Parameter(torch.zeros(7, 2))
    with pytest.raises(ValueError, match=r"^base_optimizer: it holds 1 parameter\(s\) that are not the model's"):
        TrainableSet(layout, "base_optimizer").refresh(torch.optim.SGD([stray, *model.parameters()], lr=0.1))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^optimizer: none of its parameters requires grad"):
        TrainableSet(layout).refresh(torch.optim.SGD(model.parameters(), lr=0.1))


def test_held_parameters_reads_every_group() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    optimizer.add_param_group({"params": model[4].parameters(), "lr": 0.0})
    assert set(held_parameters(optimizer)) == {id(p) for p in [*model[0].parameters(), *model[4].parameters()]}


def test_check_parameters_names_complex_and_sparse_embeddings() -> None:
    complex_model = nn.Linear(2, 2)
    complex_model.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"^weight: complex parameters are not supported"):
        check_parameters(complex_model.named_parameters(), complex_model.named_modules())
    emb = nn.Sequential(nn.Embedding(5, 3, sparse=True))
    with pytest.raises(ValueError, match=r"^0: Embedding\(sparse=True\) gives sparse gradients"):
        check_parameters(emb.named_parameters(), emb.named_modules())
    emb.requires_grad_(False)  # a frozen sparse embedding gets no gradient: allowed
    check_parameters(emb.named_parameters(), emb.named_modules())
