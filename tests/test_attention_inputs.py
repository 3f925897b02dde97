"""The MultiheadAttention contiguous-input hook: same values and gradients, no bmm fallback, removed after fit."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_slsam import SLSAM, SharpnessAwareMixin, attention_inputs
from tests.conftest import quiet_trainer


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _attention(freeze: bool, batch_first: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first)
    mha.in_proj_weight.requires_grad_(not freeze)
    mha.in_proj_bias.requires_grad_(not freeze)
    return mha


def _run(mha: nn.MultiheadAttention, x: torch.Tensor, self_attention: bool = True):
    x = x.clone().requires_grad_(True)
    if self_attention:
        out, _ = mha(x, x, x, need_weights=False)
    else:
        out, _ = mha(query=x, key=x * 2, value=x * 3, need_weights=False)
    out.square().sum().backward()
    grads = {name: p.grad for name, p in mha.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross-kwargs"])
def test_hook_keeps_values_and_gradients(freeze: bool, self_attention: bool) -> None:
    x = torch.randn(4, 7, 16)
    plain, hooked = _attention(freeze), _attention(freeze)
    handles = attention_inputs.install(hooked)
    assert len(handles) == 1
    want, got = _run(plain, x, self_attention), _run(hooked, x, self_attention)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name])


def test_frozen_projection_uses_mm_not_bmm() -> None:
    x = torch.randn(4, 7, 16)
    mha = _attention(freeze=True)
    assert "aten::bmm" in _ops(lambda: _run(mha, x)), "PyTorch no longer falls back to bmm; the hook may be moot"
    handles = attention_inputs.install(mha)
    assert "aten::bmm" not in _ops(lambda: _run(mha, x))
    for handle in handles:
        handle.remove()
    assert not mha._forward_pre_hooks


def test_hook_skips_inference_and_seq_first_modules() -> None:
    assert attention_inputs.install(_attention(False, batch_first=False)) == []
    mha = _attention(False)
    attention_inputs.install(mha)
    x = torch.randn(4, 7, 16)
    seen = []
    mha.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        mha(x, x, x, need_weights=False)
    assert seen[-1] is x
    mha(x, x, x, need_weights=False)
    assert seen[-1] is not x and seen[-1].transpose(0, 1).is_contiguous()


class AttentionNet(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))

    def compute_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(16, 5, 3, generator=g), torch.randint(0, 2, (16,), generator=g)), 4)


def test_slsam_training_matches_unhooked_reference_and_removes_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit with the hook equals a fit with ``install`` disabled (up to matmul rounding); no hook is left behind."""
    hooked, plain = AttentionNet(), AttentionNet()
    plain.load_state_dict(copy.deepcopy(hooked.state_dict()))
    quiet_trainer(max_steps=4, callbacks=[SLSAM(rho=0.05, sparsity=0.5, seed=3)]).fit(hooked, _loader())
    assert not hooked.attention._forward_pre_hooks
    monkeypatch.setattr(attention_inputs, "install", lambda model: [])
    quiet_trainer(max_steps=4, callbacks=[SLSAM(rho=0.05, sparsity=0.5, seed=3)]).fit(plain, _loader())
    for (name, a), b in zip(hooked.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
