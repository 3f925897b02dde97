"""``experiments/gate_premise.py``: AE-SAM's gate rule, the agreement statistics and the sampler replay, each against
a plain computation written here."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gate_premise.py"


@pytest.fixture(scope="module")
def premise():
    spec = importlib.util.spec_from_file_location("gate_premise", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gate_premise"] = module
    spec.loader.exec_module(module)
    return module


def test_gate_is_ae_sams_rule_on_moving_statistics(premise) -> None:
    values = [4.0, 2.0, 8.0, float("nan"), 1.0]
    # the rule written out (delta 0.9, c = 0), and its decisions by hand: 4 starts the mean; 2 and 1 fall under it
    mu, var, expected = None, 0.0, []
    for v in values:
        if math.isnan(v):
            expected.append(True)
            continue
        mu = v if mu is None else 0.9 * mu + 0.1 * v
        var = 0.9 * var + 0.1 * (v - mu) ** 2
        expected.append(v >= mu)
    assert premise.ae_sam_gate(values, 0.0) == expected == [True, False, True, True, False]
    # a high threshold passes only the first step (sigma is 0 there), a very low one every step
    assert premise.ae_sam_gate(values, 10.0) == [True, False, False, True, False]
    assert all(premise.ae_sam_gate(values, -10.0))


def test_kappa_and_spearman(premise) -> None:
    a = [True, False, True, True, False, False]
    assert premise.cohen_kappa(a, a) == 1.0
    assert premise.cohen_kappa(a, [not x for x in a]) == -1.0
    # observed 4/6, expected 0.5 (both pass half the steps): (2/3 - 1/2) / (1/2)
    assert premise.cohen_kappa(a, [True, False, False, True, False, True]) == pytest.approx(1 / 3)
    rng = random.Random(0)
    x = [rng.random() for _ in range(20)]
    assert premise.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert premise.spearman(x, [-v for v in x]) == pytest.approx(-1.0)


def test_replay_sums_the_squared_norms_of_the_sampled_arms(premise) -> None:
    from lightning_slsam.engine.arms import build_arms
    from lightning_slsam.models.resnet_cifar import resnet20_cifar

    model = resnet20_cifar(num_classes=10)
    arms = len(build_arms(model, "tensor"))
    norms = torch.rand(6, arms, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampled, per_arm = premise.replay(model, norms, "slsam_noisy", 3)
    # the same sampler, fed the same norms, draws the same arms
    sampler = premise.SAMPLERS["slsam_noisy"](seed=3).sampler_for(
        model, build_arms(model, "tensor"), torch.ones(arms, dtype=torch.bool), 3
    )
    for step, q in enumerate(norms):
        active = sampler.sample()
        assert sampled[step] == pytest.approx(float(q[active].sum()))
        sampler.update(active, q.sqrt() * active)
    assert math.isnan(per_arm[0]) and not any(math.isnan(v) for v in per_arm[1:])  # pinned arms are known at step 2
