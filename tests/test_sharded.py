"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): a sharded run equals one process on the same global batch.

tests/scripts/fsdp2_optim.py trains each method that runs sharded twice on every rank: in one process on whole
batches (the reference), then sharded over the two ranks with half of every batch each. The ranks seed their
global RNGs differently; equal arms come from the broadcast seed and the global norms alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_slsam.engine.sharding import complete_optimizer_state, locals_of, sharding_of

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_optim.py"
STEPS = 6
METHODS = ["base", "sam", "slsam", "slsam_noisy", "rst", "slsam_plus"]
pytestmark = pytest.mark.slow


def clean_environment() -> dict[str, str]:
    """This process's environment without a process group's rendezvous variables (a subprocess picks its own) and
    without the global seed an earlier ``seed_everything`` left (Lightning's launcher would reseed every rank with
    it, and a reference run in one process would not be reseeded)."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "PL_GLOBAL_SEED")
    return {k: v for k, v in os.environ.items() if k not in names}


def run_command(command: list[str], cwd: Path | None = None) -> None:
    """Run ``command`` (its ranks start their own process group) with this checkout's package, one thread per
    process, and fail with its output's tail unless it succeeds."""
    # the package of this checkout, also where another one is installed (editable install, worktrees)
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**clean_environment(), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp2")
    run_command([sys.executable, str(SCRIPT), str(out), str(STEPS)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_two_sharded_ranks_equal_one_process(ranks: list[dict[str, Any]], method: str) -> None:
    single = ranks[0]["single"][method]
    for rank in ranks:
        sharded = rank["sharded"][method]
        assert set(sharded["params"]) == set(single["params"])
        for name, value in single["params"].items():
            torch.testing.assert_close(sharded["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        # the same arms on both ranks and as in one process, at every step
        assert torch.equal(sharded["arms"], single["arms"])
    assert ranks[0]["world_size"] == 2
    # the reference moved: a run that did nothing would also "agree"
    assert any(not torch.equal(v, ranks[0]["init"][k]) for k, v in single["params"].items() if k != "extra")


@pytest.mark.parametrize("method", ["slsam", "slsam_noisy", "slsam_plus"])
def test_sparse_steps_sample_and_learn_alike(ranks: list[dict[str, Any]], method: str) -> None:
    a, b = ranks[0]["sharded"][method], ranks[1]["sharded"][method]
    assert not bool(a["arms"].all())  # sparse: some arms left out
    torch.testing.assert_close(a["probs"], ranks[0]["single"][method]["probs"], rtol=1e-5, atol=1e-6)
    assert torch.equal(a["probs"], b["probs"])
    assert not torch.allclose(a["probs"], torch.full_like(a["probs"], 0.4))  # the bandit learned


@pytest.mark.parametrize("method", METHODS)
def test_only_active_arms_reach_the_optimizer_with_a_gradient(ranks: list[dict[str, Any]], method: str) -> None:
    """No gradient of an arm left out of the step is materialised (FSDP2 reduces only computed ones)."""
    run = ranks[1]["sharded"][method]
    per_param = run["stepped"][:, run["param_arm"]]  # the arm's flag for each parameter, per step
    assert torch.equal(run["with_grad"], per_param)
    if method == "slsam_plus":  # a sparse ascent, and every parameter stepped
        assert not bool(run["arms"].all()) and bool(run["with_grad"].all())


def test_a_fault_on_one_rank_skips_the_step_on_both(ranks: list[dict[str, Any]]) -> None:
    """Pass 2 on rank 0 puts an inf in a gradient entry that only rank 1's shard holds: both ranks skip."""
    assert ranks[0]["fault"]["skipped"] == [False, True, False, False]
    assert ranks[1]["fault"]["skipped"] == [False, True, False, False]
    for name, value in ranks[0]["fault"]["params"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, ranks[1]["fault"]["params"][name]), name


def test_resume_from_sharded_state_is_bitwise(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        for name, value in rank["resume"]["whole"].items():
            assert torch.equal(rank["resume"]["resumed"][name], value), name


def test_a_method_with_whole_tensor_statistics_is_refused(ranks: list[dict[str, Any]]) -> None:
    message = ranks[0]["refused"]
    assert message is not None and message.startswith("ASAM: method 'asam' is not supported on FSDP2")
    assert "\n" not in message


def test_an_fsdp1_model_is_refused() -> None:
    """FSDP1 needs an accelerator to wrap a model; a module of its class stands in for one (the check is a type
    check), and the refusal comes before the optimizer wrapper touches anything."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_slsam import optim

    stand_in = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(stand_in)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), stand_in)
    with pytest.raises(ValueError, match=r"^SLSAM: the model is wrapped in FSDP1 .*fully_shard"):
        optim.SLSAM(model, torch.optim.AdamW(model.parameters()), rho=0.05)


def test_plain_models_are_not_sharded() -> None:
    params = list(torch.nn.Linear(3, 2).parameters())
    assert sharding_of(params, "X") is None
    assert locals_of(params)[0] is params[0]


# --- Lightning: ModelParallelStrategy with fully_shard in configure_model ------------------------------------------
LIGHTNING_SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_lightning.py"


def run_lightning(out: Path, *args: str) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    run_command([sys.executable, str(LIGHTNING_SCRIPT), str(out), *args])
    world = 1 if args[0] == "single" else 2
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("method", ["slsam_noisy"])  # every method's equality: the plain-API tests above
def test_lightning_fsdp2_equals_one_process(tmp_path: Path, method: str) -> None:
    (single,) = run_lightning(tmp_path / "single", "single", method, "6")
    ranks = run_lightning(tmp_path / "fsdp2", "fsdp2", method, "6")
    assert single["sharded"] == "Parameter" and ranks[0]["sharded"] == "DTensor"
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["global_step"] == 6
        for name, value in single["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(rank["counts"], single["counts"])  # the same arms, step by step (check_ranks too)


def test_lightning_fsdp2_resumes_bitwise_from_a_distributed_checkpoint(tmp_path: Path) -> None:
    """6 steps straight, against 3 steps, a distributed checkpoint (a folder of shards), and 3 resumed steps.
    SL-SAM has left some parameters unsampled at the checkpoint: their optimizer state must be in it."""
    straight = run_lightning(tmp_path / "straight", "fsdp2", "slsam", "6", "3")
    checkpoint = tmp_path / "straight" / "at3.ckpt"
    assert checkpoint.is_dir()
    resumed = run_lightning(tmp_path / "resumed", "fsdp2", "slsam", "6", str(checkpoint))
    for a, b in zip(straight, resumed, strict=True):
        assert b["global_step"] == 6
        for name, value in a["params"].items():
            assert torch.equal(b["params"][name], value), name
        assert torch.equal(b["probs"], a["probs"]) and torch.equal(b["counts"], a["counts"])


def test_completing_adam_state_changes_no_step() -> None:
    """Adam's state created ahead of its first step (what a distributed checkpoint needs) gives bitwise the
    same steps, here with one parameter left without a gradient at the first step."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(4, 3)
    completed = torch.nn.Linear(4, 3)
    completed.load_state_dict(plain.state_dict())
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.1, weight_decay=0.1)
    opt_completed = torch.optim.AdamW(completed.parameters(), lr=0.1, weight_decay=0.1)
    assert complete_optimizer_state(opt_completed) == 2
    assert len(opt_completed.state) == 2 and len(opt_plain.state) == 0
    assert complete_optimizer_state(opt_completed) == 0  # idempotent
    x = torch.randn(5, 4)
    for step in range(3):
        for model, opt in ((plain, opt_plain), (completed, opt_completed)):
            model(x).square().sum().backward()
            if step == 0:
                model.bias.grad = None  # the bias is not sampled at the first step
            opt.step()
            opt.zero_grad()
        assert torch.equal(plain.weight, completed.weight) and torch.equal(plain.bias, completed.bias)
    assert complete_optimizer_state(torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)) == 0


# --- the causal-LM recipe sharded: slsam-train experiment=llama_platypus trainer=fsdp2 ------------------------------
FSDP2_CPU = [
    "trainer=fsdp2",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.strategy.process_group_backend=gloo",
]


def test_causal_lm_shards_one_unit_per_decoder_layer() -> None:
    """``CausalLM.configure_model`` under a data-parallel mesh (one process here): every parameter a DTensor, each
    decoder layer its own FSDP unit, the whole model the root; a second call changes nothing."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from lightning_slsam.models.causal_lm import CausalLM, decoder_layers

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        module = CausalLM(tiny=True)
        module._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        module.configure_model()
        layers = decoder_layers(module.model)
        assert len(layers) == 2 and all(isinstance(layer, FSDPModule) for layer in layers)
        assert isinstance(module.model, FSDPModule)
        assert all(type(p).__name__ == "DTensor" for p in module.parameters())
    finally:
        dist.destroy_process_group()


def test_slsam_train_runs_the_llm_recipe_on_two_sharded_cpu_ranks(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "instruction_tiny.jsonl"
    # the console script: Lightning's launcher starts rank 1 by running the same command line again
    script = Path(sys.executable).with_name("slsam-train")
    if not script.exists():
        pytest.skip("slsam-train is not installed next to this Python")
    command = [
        str(script),
        "experiment=llama_platypus",
        "model.tiny=true",
        f"data.path={fixture}",
        *FSDP2_CPU,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    ]
    run_command(command, cwd=tmp_path)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["finished"] is True and record["steps"] == 2
    assert record["config"]["trainer"]["strategy"]["_target_"].endswith("ModelParallelStrategy")
    assert 0.1 < record["active_ratio"] < 0.5  # SL-SAM at sparsity 0.2 on the sharded model
