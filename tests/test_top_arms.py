"""``top_fraction`` / ``TopArmsSampler``: SL-SAM on the top of the network only.

Reference: the same inner sampler driven by hand on the window's slice of masks and norms.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_slsam import SLSAM, Exp3Sampler, TopArmsSampler, UniformSampler
from tests.conftest import TinyNet, make_dataset, quiet_trainer, snapshot

NUM_ARMS = 11
WINDOW = 4


def _inner(kind: str) -> Exp3Sampler | UniformSampler:
    if kind == "uniform":
        return UniformSampler(WINDOW, 0.5, seed=3)
    return Exp3Sampler(WINDOW, 0.5, lr=0.05, seed=3)


@pytest.mark.parametrize("kind", ["exp3", "uniform"])
def test_top_arms_equals_the_inner_sampler_on_the_window(kind: str) -> None:
    sampler, reference = TopArmsSampler(_inner(kind), NUM_ARMS), _inner(kind)
    offset = NUM_ARMS - WINDOW
    assert sampler.offset == offset
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        mask, want = sampler.sample(), reference.sample()
        assert mask.shape == (NUM_ARMS,) and mask.dtype == torch.bool
        assert not mask[:offset].any()
        assert torch.equal(mask[offset:], want)
        norms = torch.rand(NUM_ARMS, generator=gen, dtype=torch.float64) * 3
        sampler.update(mask, norms)
        reference.update(want, norms[offset:])
        probs = sampler.probs
        assert torch.equal(probs[:offset], torch.zeros(offset, dtype=torch.float64))
        assert torch.equal(probs[offset:], reference.probs)


def test_top_arms_state_round_trip_and_mismatch() -> None:
    sampler = TopArmsSampler(_inner("exp3"), NUM_ARMS)
    for _ in range(5):
        sampler.update(sampler.sample(), torch.rand(NUM_ARMS, dtype=torch.float64))
    state = sampler.state_dict()
    restored = TopArmsSampler(Exp3Sampler(WINDOW, 0.5, lr=0.05, seed=99), NUM_ARMS)
    restored.load_state_dict(state)
    assert torch.equal(restored.probs, sampler.probs)
    assert all(torch.equal(restored.sample(), sampler.sample()) for _ in range(10))
    other = TopArmsSampler(Exp3Sampler(WINDOW + 1, 0.5, seed=0), NUM_ARMS)
    with pytest.raises(ValueError, match="top_fraction"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="num_arms"):
        TopArmsSampler(Exp3Sampler(NUM_ARMS + 1, 0.5), NUM_ARMS)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, "half"])
def test_top_fraction_must_lie_in_unit_interval(value: object) -> None:
    with pytest.raises(ValueError, match="top_fraction"):
        SLSAM(top_fraction=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("top_fraction", [0.5, 0.34])
def test_arms_below_the_window_never_train(top_fraction: float) -> None:
    """TinyNet has 6 tensor arms; the window is the last ceil(f * 6); nothing below it moves, the window does."""
    model = TinyNet()
    before = snapshot(model)
    callback = SLSAM(rho=0.05, sparsity=0.5, top_fraction=top_fraction, seed=0)
    loader = torch.utils.data.DataLoader(make_dataset(), batch_size=16)
    quiet_trainer(callbacks=[callback], max_steps=6).fit(model, loader)
    names = [arm.name for arm in callback.layout.arms]
    window = math.ceil(top_fraction * len(names))
    assert callback.selection_counts[: len(names) - window].sum() == 0
    assert callback.selection_counts[len(names) - window :].sum() > 0
    after = snapshot(model)
    below = names[: len(names) - window]
    assert all(torch.equal(after[name], before[name]) for name in below), below
    assert any(not torch.equal(after[name], before[name]) for name in names[len(names) - window :])
    probs = callback.probabilities()
    assert probs is not None and torch.equal(probs[: len(names) - window], torch.zeros(len(names) - window).double())
