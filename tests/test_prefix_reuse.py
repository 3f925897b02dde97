"""Prefix reuse (``prefix_reuse.py``): pass 2 of an SL-SAM step replays pass 1's prefix calls, bitwise exact.

Each fit with ``reuse_prefix=True`` is compared with the same fit (same initial weights, same sampler seed,
same batches) with ``reuse_prefix=False``: every parameter and buffer must be bitwise equal. Every
comparison also checks that calls were really replayed (``PrefixReuse.replayed_calls`` summed over the
pass-2 replays, and fewer runs of the blocks' ``forward``), so that no test passes without reuse happening.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from lightning_slsam import SAM, SLSAM, FixedSampler, SharpnessAwareMixin, SLSAMMethod, prefix_reuse
from lightning_slsam.engine.prefix_reuse import PrefixReuse
from tests.conftest import BATCH_SIZE, IN_FEATURES, NUM_CLASSES, make_dataset, quiet_trainer

WIDTH = 16
DEPTH = 6
STEPS = 6
SEED = 0  # the uniform sampler's seed: with it, some steps leave the stem and the lower blocks inactive


# --- models ---------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """``Linear -> activation``; counts the runs of its own ``forward`` (a replayed call does not run it)."""

    def __init__(self, act: nn.Module | None = None, inplace: bool = False, batch_norm: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, bias=not batch_norm)
        self.norm = nn.BatchNorm1d(WIDTH) if batch_norm else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True) if inplace else nn.GELU()
        self.runs = 0

    def forward(self, x: Tensor) -> Tensor:
        self.runs += 1
        return self.act(self.norm(self.linear(x)))


class CountingLinear(nn.Linear):
    """A ``Linear`` that counts the runs of its ``forward``."""

    runs = 0

    def forward(self, x: Tensor) -> Tensor:
        self.runs += 1
        return super().forward(x)


class TupleBlock(Block):
    """Returns ``(hidden, {"aux": a tensor, "depth": an int})``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:  # type: ignore[override]
        h = super().forward(x)
        return h, {"aux": h.square().mean(), "depth": self.depth}


class Net(SharpnessAwareMixin, pl.LightningModule):
    """``stem -> blocks -> head``; subclasses change the blocks and how they are run (``body``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Linear(IN_FEATURES, WIDTH)
            self.blocks = nn.ModuleList(self.make_blocks())
            self.head = nn.Linear(WIDTH, NUM_CLASSES)

    def make_blocks(self) -> list[nn.Module]:
        return [Block() for _ in range(DEPTH)]

    def body(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def block_runs(self) -> int:
        return sum(m.runs for m in self.modules() if isinstance(m, (Block, CountingLinear)))


class InPlaceNet(Net):
    """A top-level in-place ReLU after the stem; blocks alternate ``Linear -> ReLU(inplace=True)`` and
    ``Linear -> GELU`` followed by ``h += residual`` (GELU's backward does not need its output)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = CountingLinear(IN_FEATURES, WIDTH)
        self.relu = nn.ReLU(inplace=True)

    def make_blocks(self) -> list[nn.Module]:
        return [Block(inplace=i % 2 == 0) for i in range(DEPTH)]

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.stem(x))  # modifies the stem's output in place: that call must not be replayed
        for i, block in enumerate(self.blocks):
            residual = h
            h = block(h)
            if i % 2:
                h += residual  # modifies this block's output in place: its call must not be replayed
        return self.head(h)


class SharedNet(Net):
    """One ``GELU`` inside every block and at the top level; one ``Linear`` called after the stem and again last."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.mix = nn.Linear(WIDTH, WIDTH)

    def make_blocks(self) -> list[nn.Module]:
        self.shared_act = nn.GELU()
        return [Block(act=self.shared_act) for _ in range(DEPTH)]

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(self.shared_act(self.stem(x)))
        h = self.body(h)
        return self.head(self.shared_act(self.mix(h)))


class BatchNormNet(Net):
    """``Linear -> BatchNorm1d -> GELU`` blocks (nested BatchNorm) and a top-level BatchNorm after the stem."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.stem_norm = nn.BatchNorm1d(WIDTH)

    def make_blocks(self) -> list[nn.Module]:
        return [Block(batch_norm=True) for _ in range(DEPTH)]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem_norm(self.stem(x))))


class TopLevelBatchNormNet(Net):
    """Top-level ``Linear -> BatchNorm1d -> GELU`` triples (every BatchNorm is called by the root's forward)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.norms = nn.ModuleList(nn.BatchNorm1d(WIDTH) for _ in range(DEPTH + 1))

    def make_blocks(self) -> list[nn.Module]:
        return [CountingLinear(WIDTH, WIDTH) for _ in range(DEPTH)]

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.norms[0](self.stem(x)))
        for linear, norm in zip(self.blocks, self.norms[1:], strict=True):
            h = F.gelu(norm(linear(h)))
        return self.head(h)


class TupleNet(Net):
    def make_blocks(self) -> list[nn.Module]:
        return [TupleBlock(i) for i in range(DEPTH)]

    def body(self, h: Tensor) -> Tensor:
        self.aux = torch.zeros(())
        for block in self.blocks:
            h, extra = block(h)
            assert isinstance(extra["depth"], int)
            self.aux = self.aux + extra["aux"]
        return h

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.01 * self.aux


class CheckpointNet(Net):
    """Blocks from ``first`` upwards run under ``torch.utils.checkpoint`` (non-reentrant)."""

    def __init__(self, first: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.first = first

    def body(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, use_reentrant=False) if i >= self.first else block(h)
        return h


# --- helpers --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread: these tensors are tiny, and a busy 2-core machine makes threaded BatchNorm crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``replayed_calls`` of every pass-2 replay, appended when the replay ends."""
    counts: list[int] = []
    exit_replay = prefix_reuse._Replay.__exit__

    def recording_exit(self: Any, *exc: Any) -> None:
        counts.append(self.reuse.replayed_calls)
        exit_replay(self, *exc)

    monkeypatch.setattr(prefix_reuse._Replay, "__exit__", recording_exit)
    return counts


def loader() -> DataLoader:
    return DataLoader(make_dataset(n=STEPS * BATCH_SIZE), batch_size=BATCH_SIZE, shuffle=False)


def fit(model: Net, reuse: bool, **options: Any) -> Net:
    options = {"rho": 0.1, "sparsity": 0.3, "arms": "block", "sampler": "uniform", "seed": SEED, **options}
    quiet_trainer(callbacks=[SLSAM(reuse_prefix=reuse, **options)], max_steps=STEPS).fit(model, loader())
    return model


def assert_states_equal(actual: nn.Module, expected: nn.Module) -> None:
    """Bitwise equality of every parameter and buffer (BatchNorm running statistics included)."""
    got, want = actual.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    differing = {
        k: float((got[k].double() - want[k].double()).abs().max()) for k in got if not torch.equal(got[k], want[k])
    }
    assert not differing, f"not bitwise equal (max abs difference per tensor): {differing}"


def fit_both(
    make: Callable[[], Net], replays: list[int], blocks_replayed: bool = True, **options: Any
) -> tuple[Net, Net]:
    """Fit a model with and without reuse from the same weights; check equality and that calls were replayed."""
    reused = make()
    plain = make()
    plain.load_state_dict(copy.deepcopy(reused.state_dict()))
    start = {k: v.clone() for k, v in reused.state_dict().items()}
    fit(plain, reuse=False, **options)
    assert replays == [], "reuse_prefix=False must not replay"
    fit(reused, reuse=True, **options)
    assert len(replays) > 0 and sum(replays) > 0, f"no call was replayed (per pass 2: {replays}); pick another seed"
    if blocks_replayed:
        assert reused.block_runs() < plain.block_runs(), "a replayed block must not run its forward"
    else:  # a block holding a module that must run in pass 2 runs whole; its other sub-calls are replayed
        assert reused.block_runs() == plain.block_runs()
    assert any(not torch.equal(v, start[k]) for k, v in reused.state_dict().items()), "training changed nothing"
    assert_states_equal(reused, plain)
    return reused, plain


# --- 1-6: reuse_prefix=True trains bitwise as reuse_prefix=False ---------------------------------------------
@pytest.mark.parametrize("arms", ["block", "tensor"])
def test_sequential_blocks_bitwise_equal(replays: list[int], arms: str) -> None:
    fit_both(Net, replays, arms=arms)


def test_in_place_ops_bitwise_equal(replays: list[int]) -> None:
    reused, _ = fit_both(InPlaceNet, replays)
    # outputs modified in place after their call (the stem's, the odd blocks') are never replayed
    assert reused.stem.runs == 2 * STEPS
    assert [block.runs for block in reused.blocks[1::2]] == [2 * STEPS] * (DEPTH // 2)
    assert sum(block.runs for block in reused.blocks[0::2]) < 2 * STEPS * (DEPTH // 2)


def test_shared_modules_bitwise_equal(replays: list[int]) -> None:
    """A module called in the prefix and again later keeps its later calls (the call-index remapping)."""
    fit_both(SharedNet, replays)


@pytest.mark.parametrize(
    ("model", "bn_running_stats"),
    [
        pytest.param(BatchNormNet, "pass1", id="nested-pass1"),
        pytest.param(BatchNormNet, "both", id="nested-both"),
        pytest.param(TopLevelBatchNormNet, "pass1", id="top-level-pass1"),
        pytest.param(TopLevelBatchNormNet, "both", id="top-level-both"),
    ],
)
def test_batch_norm_params_and_running_stats_bitwise_equal(
    replays: list[int], model: type[Net], bn_running_stats: str
) -> None:
    nested_both = model is BatchNormNet and bn_running_stats == "both"
    fit_both(model, replays, blocks_replayed=not nested_both, bn_running_stats=bn_running_stats, arms="module")


def test_tuple_outputs_bitwise_equal(replays: list[int]) -> None:
    fit_both(TupleNet, replays)


@pytest.mark.parametrize("first", [3, 0], ids=["upper-blocks", "all-blocks"])
def test_activation_checkpointing_bitwise_equal(replays: list[int], first: int) -> None:
    fit_both(lambda: CheckpointNet(first), replays)


class AttentionNet(Net):
    """``stem -> MultiheadAttention -> head``: the attention's forward reads ``out_proj.weight`` without calling
    ``out_proj`` (``F.multi_head_attention_forward``), so ``out_proj`` owns an active parameter it never calls."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x).unsqueeze(1).expand(-1, 3, -1)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


class FixedSLSAM(SLSAM):
    """SL-SAM whose pass 1 always takes the named arms."""

    def __init__(self, active: list[str], **options: Any) -> None:
        super().__init__(**options)
        self.active = active

    def build_method(self, layout: Any) -> SLSAMMethod:
        mask = torch.tensor([arm.name in self.active for arm in layout.arms])
        assert int(mask.sum()) == len(self.active), [arm.name for arm in layout.arms]
        return SLSAMMethod(
            self.options.rho, FixedSampler(len(layout), mask), max_update_scale=None, second_pass_gate=None
        )


def test_module_reading_an_active_parameter_it_does_not_call(replays: list[int]) -> None:
    """Only ``attention.out_proj`` active: no active module is ever *called*, yet pass 2 must not replay the
    attention (its output depends on the perturbed ``out_proj.weight``)."""
    reused, plain = AttentionNet(), AttentionNet()
    plain.load_state_dict(copy.deepcopy(reused.state_dict()))
    for model, reuse in ((plain, False), (reused, True)):
        callback = FixedSLSAM(["attention.out_proj"], rho=0.5, arms="module", reuse_prefix=reuse)
        quiet_trainer(callbacks=[callback], max_steps=2).fit(model, loader())
    assert_states_equal(reused, plain)


# --- 7-8: which methods get it; hooks are taken off ------------------------------------------------------------
class PrefixReuseProbe(pl.Callback):
    """Records the sharpness callback's ``prefix_reuse`` and the model's hook counts at every batch start."""

    def __init__(self, sharpness: Any) -> None:
        self.sharpness = sharpness
        self.seen: list[Any] = []
        self.hooks: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.seen.append(self.sharpness.prefix_reuse)
        self.hooks.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules()))


@pytest.mark.parametrize(
    ("make_callback", "expected"),
    [
        (lambda: SAM(rho=0.1), None),
        (lambda: SLSAM(rho=0.1, sparsity=0.3, seed=SEED, reuse_prefix=False), None),
        (lambda: SLSAM(rho=0.1, sparsity=0.3, seed=SEED), PrefixReuse),
    ],
    ids=["SAM", "SLSAM-off", "SLSAM"],
)
def test_only_sparse_pass_one_methods_get_prefix_reuse(make_callback: Callable[[], Any], expected: Any) -> None:
    callback = make_callback()
    probe = PrefixReuseProbe(callback)
    quiet_trainer(callbacks=[callback, probe], max_steps=2).fit(Net(), loader())
    assert len(probe.seen) == 2
    if expected is None:
        assert probe.seen == [None, None]
        assert probe.hooks == [0, 0]
    else:
        assert all(isinstance(seen, expected) for seen in probe.seen)
    assert callback.prefix_reuse is None  # dropped at fit end


@pytest.mark.parametrize("value", ["yes", 1, None])
@pytest.mark.parametrize("method", [SLSAM, SAM])
def test_reuse_prefix_must_be_a_bool(method: type, value: Any) -> None:
    with pytest.raises(ValueError, match="reuse_prefix"):
        method(rho=0.1, reuse_prefix=value)


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert "forward" not in module.__dict__, f"{name}: forward still shadowed"


def test_hooks_removed_after_fit(replays: list[int]) -> None:
    model = Net()
    callback = SLSAM(rho=0.1, sparsity=0.3, arms="block", sampler="uniform", seed=SEED)
    probe = PrefixReuseProbe(callback)
    quiet_trainer(callbacks=[callback, probe], max_steps=STEPS).fit(model, loader())
    assert min(probe.hooks) == 2 * len(list(model.modules())), "a forward hook and a pre-hook on every module"
    assert sum(replays) > 0
    assert_no_hooks(model)


class FailingNet(Net):
    """Raises in the ``fail_at``-th call of ``compute_loss`` (a pass 2 when even)."""

    fail_at = 4

    def compute_loss(self, batch: Any) -> Tensor:
        self.losses = getattr(self, "losses", 0) + 1
        if self.losses == self.fail_at:
            raise RuntimeError("boom")
        return super().compute_loss(batch)


def fit_failing_in_pass_two(replays: list[int]) -> FailingNet:
    model = FailingNet()
    callback = SLSAM(rho=0.1, sparsity=0.3, arms="block", sampler="uniform", seed=SEED)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(callbacks=[callback], max_steps=STEPS).fit(model, loader())
    assert len(replays) == 2 and replays[0] > 0, "the failing pass 2 must have replayed calls"
    return model


def test_forward_shadows_removed_when_pass_two_raises(replays: list[int]) -> None:
    model = fit_failing_in_pass_two(replays)
    assert all("forward" not in module.__dict__ for module in model.modules())
    x, y = next(iter(loader()))
    before = model.block_runs()
    model.compute_loss((x, y))
    assert model.block_runs() == before + DEPTH  # every block computes again


def test_hooks_removed_when_fit_raises(replays: list[int]) -> None:
    assert_no_hooks(fit_failing_in_pass_two(replays))


# --- 9: PrefixReuse on its own ---------------------------------------------------------------------------------
def make_sequential() -> nn.Sequential:
    """Three frozen counting blocks below a trainable ``Linear`` (the boundary)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        seq = nn.Sequential(Block(), Block(), Block(), nn.Linear(WIDTH, NUM_CLASSES))
    for block in seq[:3]:
        block.requires_grad_(False)
    return seq


@pytest.mark.parametrize("modify", [False, True], ids=["intact", "modified-in-place"])
def test_prefix_reuse_records_and_replays(modify: bool) -> None:
    seq = make_sequential()
    reference = copy.deepcopy(seq)
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(0))
    reuse = PrefixReuse(seq)
    boundary = reuse.owners_of(seq[3].parameters())
    assert boundary == {id(seq[3])}
    outputs: list[Tensor] = []
    seq[1].register_forward_hook(lambda module, args, out: outputs.append(out))
    inputs: list[Tensor] = []  # what the boundary layer receives: the prefix's output
    seq[3].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))

    with reuse.record(boundary):
        out1 = seq(x)
        out1.square().sum().backward()
    assert [block.runs for block in seq[:3]] == [1, 1, 1]
    prefix1 = inputs[0].clone()
    grad1 = seq[3].weight.grad.clone()
    seq[3].weight.grad = None
    if modify:
        with torch.no_grad():
            outputs[0].add_(1)  # the kept output of block 1: its call must be computed again

    # pass 2 at perturbed weights of the boundary layer, against the same computation without hooks
    with torch.no_grad():
        for model in (seq, reference):
            model[3].weight.add_(0.01)
    with reuse.replay():
        out2 = seq(x)
        out2.square().sum().backward()
    want = reference(x)
    want.square().sum().backward()

    torch.testing.assert_close(inputs[1], prefix1, rtol=0, atol=0)  # the replayed prefix output, bitwise
    assert not inputs[1].requires_grad
    torch.testing.assert_close(out2, want, rtol=0, atol=0)
    torch.testing.assert_close(seq[3].weight.grad, reference[3].weight.grad, rtol=0, atol=0)
    assert not torch.equal(seq[3].weight.grad, grad1), "the boundary layer ran at its perturbed weights"
    if modify:
        assert reuse.replayed_calls == 2
        assert [block.runs for block in seq[:3]] == [1, 2, 1]
    else:
        assert reuse.replayed_calls == 3
        assert [block.runs for block in seq[:3]] == [1, 1, 1]
    assert all("forward" not in module.__dict__ for module in seq.modules())

    # between steps the hooks do nothing; remove takes them off
    seq(x)
    assert [block.runs for block in seq[:3]] == ([2, 3, 2] if modify else [2, 2, 2])
    reuse.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in seq.modules()) == 2  # the test's own


def test_prefix_reuse_never_skips_a_refused_module_inside_a_replayed_parent() -> None:
    """A module the predicate refuses (a training BatchNorm with ``bn_running_stats="both"``) must run in pass 2
    even when its parent call finished in the prefix: its running statistics update twice, as without reuse."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        seq = nn.Sequential(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH)), nn.Linear(WIDTH, 2))
    seq[0].requires_grad_(False)
    reference = copy.deepcopy(seq)
    reuse = PrefixReuse(seq, replayable=lambda m: not isinstance(m, nn.BatchNorm1d))
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(0))
    with reuse.record(reuse.owners_of(seq[1].parameters())):
        seq(x).sum().backward()
    with reuse.replay():
        seq(x).sum().backward()
    for _ in range(2):
        reference(x).sum().backward()
    assert int(reference[0][1].num_batches_tracked) == 2
    assert_states_equal(seq, reference)
