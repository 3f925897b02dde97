"""DDP on 2 CPU processes (gloo): same arms on every rank, bitwise-equal replicas, averaged gradients.

Each case launches tests/scripts/ddp_train.py in a subprocess (Lightning's ``ddp`` launcher re-executes
the script for rank 1). The script seeds every rank's global RNG differently, so agreeing samplers prove
the seed broadcast, and it runs with ``check_ranks=True`` (an all-reduce of the active mask every step).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
pytestmark = pytest.mark.slow


def _run(out: Path, strategy: str, method: str, steps: int, shuffle: bool, batch_size: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(out), strategy, method, str(steps), "1" if shuffle else "0", str(batch_size)]
    # the package of this checkout, also where another one is installed (editable install, worktrees)
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = 1 if strategy == "single" else 2
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


@pytest.mark.parametrize(("strategy", "method"), [("ddp", "slsam"), ("ddp_spawn", "sam")])
def test_replicas_and_samplers_stay_bitwise_equal(tmp_path: Path, strategy: str, method: str) -> None:
    rank0, rank1 = _run(tmp_path, strategy, method, steps=20, shuffle=True, batch_size=16)
    assert rank0["world_size"] == 2 and rank0["global_step"] == 20
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    if method == "slsam":
        assert torch.equal(rank0["probs"], rank1["probs"])
        assert torch.equal(rank0["counts"], rank1["counts"])
        assert not torch.allclose(rank0["probs"], torch.full_like(rank0["probs"], 0.4))  # the bandit learned


def test_gradients_are_averaged_across_ranks(tmp_path: Path) -> None:
    """Two ranks with batch 8 each take the same steps as one process with their union (batch 16)."""
    rank0, _ = _run(tmp_path / "ddp", "ddp", "plain", steps=6, shuffle=False, batch_size=8)
    (single,) = _run(tmp_path / "single", "single", "plain", steps=6, shuffle=False, batch_size=16)
    for name, value in single["params"].items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-5, atol=1e-6)
