"""A ``torch.compile``d model inside the module (numbers in docs/guide/lightning.md).

SAM compiles once and trains as eager; SL-SAM recompiles when the active arms (the parameters' ``requires_grad``)
change, and still trains as eager, also past Dynamo's recompile limit. The ``aot_eager`` backend keeps the test
fast: Dynamo and AOT autograd decide the graphs and the recompiles, no C++ is compiled.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import TinyNet, assert_models_close, make_dataset, quiet_trainer
from torch.utils.data import DataLoader

from lightning_slsam import SAM, SLSAM

pytestmark = pytest.mark.slow

STEPS = 10


@pytest.fixture
def fresh_dynamo() -> Iterator[dict]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def loader() -> DataLoader:
    return DataLoader(make_dataset(STEPS * 16), batch_size=16, shuffle=False)


@pytest.mark.parametrize("method", ["sam", "slsam"])
def test_compiled_model_trains_as_eager(method: str, fresh_dynamo: dict) -> None:
    def make_callback():
        return SAM(rho=0.1) if method == "sam" else SLSAM(rho=0.1, sparsity=0.5, seed=0)

    eager, compiled = TinyNet(), TinyNet()
    compiled.model.compile(backend="aot_eager")
    quiet_trainer([make_callback()], max_steps=STEPS).fit(eager, loader())
    quiet_trainer([make_callback()], max_steps=STEPS).fit(compiled, loader())
    assert_models_close(compiled, eager, rtol=1e-5, atol=1e-6)

    graphs = int(fresh_dynamo["stats"]["unique_graphs"])
    if method == "sam":
        assert graphs == 1  # compiled once, reused for both passes of every step
    else:
        # a new requires_grad pattern is a new graph (past the recompile limit of the model's frame, Dynamo
        # goes on compiling the frames of its submodules, each with its own limit)
        assert graphs > 1
