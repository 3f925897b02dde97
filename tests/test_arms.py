"""Tests of ``build_arms``: how a model's trainable parameters are grouped into arms.

The references are plain loops over ``named_parameters`` / ``named_modules`` (tensor and module mode) and
hand-written name lists (block mode) for models whose structure is known.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_slsam import Arm, ArmLayout, build_arms

MODES = ["tensor", "module", "block"]


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, image: int = 16, patch: int = 4, dim: int = 16, heads: int = 2, depth: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def make_resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


def make_tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


class Tied(nn.Module):
    """An embedding and an output head sharing one weight, plus a module registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.alias = self.body  # the same module twice
        self.head = nn.Linear(6, 11)
        self.head.weight = self.emb.weight  # tied parameter


MODEL_FACTORIES = {
    "mlp": make_mlp,
    "tiny_vit": TinyViT,
    "resnet18": make_resnet18,
    "tv_vit": make_tv_vit,
    "tied": Tied,
}


# ---------------------------------------------------------------------------------------------------------------------
# Plain references
# ---------------------------------------------------------------------------------------------------------------------


def reference_tensor_arms(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    arms = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            arms.append((name, (name,)))
    return arms


def reference_module_arms(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """One arm per module owning trainable parameters directly, in ``named_modules`` order, first owner wins."""
    seen: set[int] = set()
    arms = []
    for module_name, module in model.named_modules():
        names = []
        for param_name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
        if names:
            arms.append((module_name or "(root)", tuple(names)))
    return arms


def trainable(model: nn.Module) -> list[nn.Parameter]:
    out, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def check_layout_consistent(model: nn.Module, layout: ArmLayout) -> None:
    """Every trainable parameter in exactly one arm; names, params, indices and sizes agree with each other."""
    assert isinstance(layout, ArmLayout)
    expected = trainable(model)
    got_ids = [id(p) for p in layout.params]
    assert len(got_ids) == len(set(got_ids)), "a parameter sits in two arms"
    assert set(got_ids) == {id(p) for p in expected}
    by_name = dict(model.named_parameters(remove_duplicate=False))
    total = 0
    for index, arm in enumerate(layout.arms):
        assert isinstance(arm, Arm)
        assert arm.params, f"arm {arm.name} is empty"
        assert len(arm.param_names) == len(arm.params)
        for param_name, p in zip(arm.param_names, arm.params, strict=True):
            assert by_name[param_name] is p
            assert p.requires_grad
        assert arm.numel == sum(p.numel() for p in arm.params)
        assert int(layout.numels[index]) == arm.numel
        total += arm.numel
    assert layout.total_numel == total == sum(p.numel() for p in expected)
    assert layout.numels.dtype == torch.int64
    assert layout.param_arm.dtype == torch.int64
    arm_of = [i for i, arm in enumerate(layout.arms) for _ in arm.params]
    assert layout.param_arm.tolist() == arm_of
    assert len(layout) == len(layout.arms)
    assert layout.names == [arm.name for arm in layout.arms]
    assert len(set(layout.names)) == len(layout.names), "duplicate arm names"
    assert [arm.name for arm in layout] == layout.names
    assert layout[0] is layout.arms[0]


def arm_summary(layout: ArmLayout) -> list[tuple[str, tuple[str, ...]]]:
    return [(arm.name, arm.param_names) for arm in layout.arms]


# ---------------------------------------------------------------------------------------------------------------------
# 1-2. tensor and module mode against the plain references, on every model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODEL_FACTORIES))
def test_tensor_mode_one_arm_per_parameter(model_name: str) -> None:
    model = MODEL_FACTORIES[model_name]()
    layout = build_arms(model, "tensor")
    assert layout.mode == "tensor"
    assert arm_summary(layout) == reference_tensor_arms(model)
    assert layout.names == [name for name, p in model.named_parameters() if p.requires_grad]
    check_layout_consistent(model, layout)


@pytest.mark.parametrize("model_name", list(MODEL_FACTORIES))
def test_module_mode_matches_reference(model_name: str) -> None:
    model = MODEL_FACTORIES[model_name]()
    layout = build_arms(model, "module")
    assert layout.mode == "module"
    assert arm_summary(layout) == reference_module_arms(model)
    check_layout_consistent(model, layout)


@pytest.mark.parametrize("model_name", list(MODEL_FACTORIES))
@pytest.mark.parametrize("mode", MODES)
def test_every_trainable_parameter_in_exactly_one_arm(model_name: str, mode: str) -> None:
    model = MODEL_FACTORIES[model_name]()
    layout = build_arms(model, mode)
    check_layout_consistent(model, layout)
    assert layout.total_numel == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_build_arms_default_mode_is_tensor() -> None:
    model = make_mlp()
    assert build_arms(model).mode == "tensor"
    assert build_arms(model).names == build_arms(model, "tensor").names


@pytest.mark.parametrize("mode", ["module", "block"])
def test_mlp_groups_weight_and_bias(mode: str) -> None:
    model = make_mlp()
    layout = build_arms(model, mode)
    # the Linear run 0, 2, 4 (ReLUs hold nothing) is a block run in block mode; each Linear is its own module
    assert arm_summary(layout) == [
        ("0", ("0.weight", "0.bias")),
        ("2", ("2.weight", "2.bias")),
        ("4", ("4.weight", "4.bias")),
    ]
    for arm, linear in zip(layout.arms, [model[0], model[2], model[4]], strict=True):
        assert arm.params[0] is linear.weight and arm.params[1] is linear.bias
    check_layout_consistent(model, layout)


def test_mlp_tensor_mode_names() -> None:
    layout = build_arms(make_mlp(), "tensor")
    assert layout.names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def test_nested_sequential_of_blocks() -> None:
    """Block mode takes a repeated composite child whole; module mode splits it into its leaves."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, 3)
            self.fc2 = nn.Linear(3, 3, bias=False)

    model = nn.Sequential(Pair(), Pair(), Pair(), nn.LayerNorm(3), nn.Linear(3, 2))
    block = build_arms(model, "block")
    assert arm_summary(block) == [
        ("0", ("0.fc1.weight", "0.fc1.bias", "0.fc2.weight")),
        ("1", ("1.fc1.weight", "1.fc1.bias", "1.fc2.weight")),
        ("2", ("2.fc1.weight", "2.fc1.bias", "2.fc2.weight")),
        ("3", ("3.weight", "3.bias")),
        ("4", ("4.weight", "4.bias")),
    ]
    module = build_arms(model, "module")
    assert module.names == ["0.fc1", "0.fc2", "1.fc1", "1.fc2", "2.fc1", "2.fc2", "3", "4"]
    for layout in (block, module):
        check_layout_consistent(model, layout)


def test_single_composite_child_is_not_a_block() -> None:
    """A run needs two or more same-typed children: a lone composite child is split by module."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, 3)
            self.fc2 = nn.Linear(3, 3)

    model = nn.Sequential(Pair(), nn.Linear(3, 3))
    assert build_arms(model, "block").names == ["0.fc1", "0.fc2", "1"]


# ---------------------------------------------------------------------------------------------------------------------
# 3. torchvision resnet18
# ---------------------------------------------------------------------------------------------------------------------

RESNET_BLOCK_ARMS = [
    "conv1",
    "bn1",
    "layer1.0",
    "layer1.1",
    "layer2.0",
    "layer2.1",
    "layer3.0",
    "layer3.1",
    "layer4.0",
    "layer4.1",
    "fc",
]


def test_resnet18_block_mode() -> None:
    model = make_resnet18()
    layout = build_arms(model, "block")
    assert layout.names == RESNET_BLOCK_ARMS
    assert len(layout) == 11
    modules = dict(model.named_modules())
    for arm in layout.arms:
        # a block arm holds exactly the trainable parameters of that module, in named_parameters order
        expected = [f"{arm.name}.{n}" for n, p in modules[arm.name].named_parameters() if p.requires_grad]
        assert list(arm.param_names) == expected
    assert {type(modules[name]) for name in RESNET_BLOCK_ARMS[2:-1]} == {torchvision.models.resnet.BasicBlock}
    # the downsample branch belongs to its block, it is no arm of its own
    assert "layer2.0.downsample.0.weight" in layout.arms[RESNET_BLOCK_ARMS.index("layer2.0")].param_names
    check_layout_consistent(model, layout)


def test_resnet18_module_mode() -> None:
    model = make_resnet18()
    layout = build_arms(model, "module")
    modules = dict(model.named_modules())
    expected = []
    for name, module in model.named_modules():
        owns = next(module.parameters(recurse=False), None) is not None
        if owns and isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            expected.append(name)
    assert layout.names == expected
    assert len(layout) == 20 + 20 + 1  # 20 convs (3 in downsample branches), 20 batch norms, fc
    for name in ("layer2.0.downsample.0", "layer2.0.downsample.1", "layer3.0.downsample.0", "layer4.0.downsample.1"):
        assert name in layout.names
    for arm in layout.arms:
        assert isinstance(modules[arm.name], (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    check_layout_consistent(model, layout)


@pytest.mark.parametrize("mode", MODES)
def test_resnet18_numels_sum_to_trainable_count(mode: str) -> None:
    model = make_resnet18()
    layout = build_arms(model, mode)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert layout.total_numel == count
    assert int(layout.numels.sum()) == count
    # buffers (running stats) are never arms
    buffer_ids = {id(b) for b in model.buffers()}
    assert not any(id(p) in buffer_ids for p in layout.params)


# ---------------------------------------------------------------------------------------------------------------------
# 4. A ViT built here, and torchvision's VisionTransformer
# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_vit_forward_works() -> None:
    model = TinyViT()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_tiny_vit_block_mode() -> None:
    model = TinyViT()
    layout = build_arms(model, "block")
    assert layout.names == ["(root)", "patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm", "head"]
    root = layout.arms[0]
    assert root.param_names == ("cls_token", "pos_embed")
    assert root.params[0] is model.cls_token and root.params[1] is model.pos_embed
    for i in range(4):
        arm = layout.arms[2 + i]
        block_params = [f"blocks.{i}.{n}" for n, _ in model.blocks[i].named_parameters()]
        assert list(arm.param_names) == block_params
        assert f"blocks.{i}.attn.in_proj_weight" in arm.param_names
        assert f"blocks.{i}.mlp.2.bias" in arm.param_names
    assert layout.arms[-1].param_names == ("head.weight", "head.bias")
    # the four identical blocks have identical sizes
    assert len(set(layout.numels[2:6].tolist())) == 1
    check_layout_consistent(model, layout)


def test_tiny_vit_module_mode() -> None:
    model = TinyViT(depth=2)
    layout = build_arms(model, "module")
    per_block = ["norm1", "attn", "attn.out_proj", "norm2", "mlp.0", "mlp.2"]
    expected = ["(root)", "patch_embed"]
    for i in range(2):
        expected += [f"blocks.{i}.{name}" for name in per_block]
    expected += ["norm", "head"]
    assert layout.names == expected
    attn = layout.arms[layout.names.index("blocks.0.attn")]
    assert attn.param_names == ("blocks.0.attn.in_proj_weight", "blocks.0.attn.in_proj_bias")
    check_layout_consistent(model, layout)


def test_torchvision_vit_block_mode() -> None:
    model = make_tv_vit()
    layout = build_arms(model, "block")
    assert layout.names == [
        "(root)",  # class_token
        "conv_proj",
        "encoder",  # pos_embedding, owned by the encoder itself
        "encoder.layers.encoder_layer_0",
        "encoder.layers.encoder_layer_1",
        "encoder.ln",
        "heads.head",
    ]
    assert layout.arms[0].param_names == ("class_token",)
    assert layout.arms[2].param_names == ("encoder.pos_embedding",)
    check_layout_consistent(model, layout)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Frozen and tied parameters
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_are_never_arms(mode: str) -> None:
    model = TinyViT()
    model.cls_token.requires_grad_(False)
    model.patch_embed.requires_grad_(False)  # a whole module
    model.blocks[1].requires_grad_(False)  # a whole block
    model.blocks[2].norm1.bias.requires_grad_(False)  # one tensor inside a block
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    layout = build_arms(model, mode)
    assert not any(id(p) in frozen for p in layout.params)
    check_layout_consistent(model, layout)
    names = layout.names
    assert not any(name.startswith("patch_embed") for name in names)
    assert not any(name.startswith("blocks.1") for name in names)
    assert "blocks.2.norm1.bias" not in {n for arm in layout.arms for n in arm.param_names}
    if mode == "block":
        assert names == ["(root)", "blocks.0", "blocks.2", "blocks.3", "norm", "head"]
        assert layout.arms[0].param_names == ("pos_embed",)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_resnet_batchnorms(mode: str) -> None:
    model = make_resnet18()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    layout = build_arms(model, mode)
    check_layout_consistent(model, layout)
    if mode == "block":
        assert layout.names == [name for name in RESNET_BLOCK_ARMS if name != "bn1"]
    if mode == "module":
        assert len(layout) == 21  # convs and fc


@pytest.mark.parametrize("mode", MODES)
def test_tied_parameters_appear_once(mode: str) -> None:
    model = Tied()
    layout = build_arms(model, mode)
    check_layout_consistent(model, layout)
    shared = model.emb.weight
    assert sum(p is shared for p in layout.params) == 1
    assert sum(p is model.body.weight for p in layout.params) == 1
    if mode != "tensor":
        # the first owner (emb) takes the shared weight; the head keeps its bias; the alias adds nothing
        assert arm_summary(layout) == [
            ("emb", ("emb.weight",)),
            ("body", ("body.weight", "body.bias")),
            ("head", ("head.bias",)),
        ]
    else:
        assert layout.names == ["emb.weight", "body.weight", "body.bias", "head.bias"]


@pytest.mark.parametrize("mode", MODES)
def test_tied_weights_across_blocks(mode: str) -> None:
    """Two blocks of a ModuleList sharing one Linear: its parameters belong to the first block only."""
    shared = nn.Linear(4, 4)
    model = nn.ModuleList([nn.Sequential(shared, nn.Linear(4, 4)), nn.Sequential(shared, nn.Linear(4, 4))])
    layout = build_arms(model, mode)
    check_layout_consistent(model, layout)
    assert sum(p is shared.weight for p in layout.params) == 1
    if mode == "block":
        assert arm_summary(layout) == [
            ("0", ("0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias")),
            ("1", ("1.1.weight", "1.1.bias")),
        ]


# ---------------------------------------------------------------------------------------------------------------------
# 6. Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["layer", "blocks", "", "Tensor", None])
def test_unknown_mode_raises(mode) -> None:
    with pytest.raises(ValueError, match="arms"):
        build_arms(make_mlp(), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", ["frozen_mlp", "relu", "empty_list"])
def test_no_trainable_parameters_raises(mode: str, model_name: str) -> None:
    if model_name == "frozen_mlp":
        model = make_mlp().requires_grad_(False)
    elif model_name == "relu":
        model = nn.ReLU()
    else:
        model = nn.ModuleList()
    with pytest.raises(ValueError, match="trainable"):
        build_arms(model, mode)


# ---------------------------------------------------------------------------------------------------------------------
# 7. params_of, active_ratio, fingerprint, table
# ---------------------------------------------------------------------------------------------------------------------


def _masks(num_arms: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(num_arms)
    masks = [torch.ones(num_arms, dtype=torch.bool), torch.zeros(num_arms, dtype=torch.bool)]
    one = torch.zeros(num_arms, dtype=torch.bool)
    one[-1] = True
    masks.append(one)
    masks += [torch.rand(num_arms, generator=gen) < 0.4 for _ in range(5)]
    return masks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", ["tiny_vit", "resnet18"])
def test_params_of_and_active_ratio(model_name: str, mode: str) -> None:
    model = MODEL_FACTORIES[model_name]()
    layout = build_arms(model, mode)
    assert layout.params_of(None) == list(layout.params)
    for mask in _masks(len(layout)):
        expected = []
        numel = 0
        for on, arm in zip(mask.tolist(), layout.arms, strict=True):
            if on:
                expected.extend(arm.params)
                numel += sum(p.numel() for p in arm.params)
        got = layout.params_of(mask)
        assert len(got) == len(expected)
        assert all(a is b for a, b in zip(got, expected, strict=True))
        assert layout.active_ratio(mask) == pytest.approx(numel / layout.total_numel, rel=1e-12)
    assert layout.active_ratio(torch.ones(len(layout), dtype=torch.bool)) == pytest.approx(1.0)
    assert layout.active_ratio(torch.zeros(len(layout), dtype=torch.bool)) == 0.0


def test_fingerprint() -> None:
    model = TinyViT()
    prints = {mode: build_arms(model, mode).fingerprint() for mode in MODES}
    for mode, fingerprint in prints.items():
        layout = build_arms(model, mode)
        assert fingerprint == layout.fingerprint()  # deterministic
        assert fingerprint["mode"] == mode
        assert fingerprint["names"] == layout.names
        assert fingerprint["numels"] == layout.numels.tolist()
    assert prints["tensor"] != prints["module"] != prints["block"] != prints["tensor"]
    # the same mode on a model of another shape differs too
    assert build_arms(TinyViT(depth=3), "block").fingerprint() != prints["block"]
    # a fresh copy of the same architecture matches
    assert build_arms(TinyViT(), "block").fingerprint() == prints["block"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", ["tiny_vit", "resnet18", "tv_vit"])
def test_table_lists_every_arm(model_name: str, mode: str) -> None:
    layout = build_arms(MODEL_FACTORIES[model_name](), mode)
    table = layout.table()
    assert isinstance(table, str)
    for name in layout.names:
        assert name in table
    assert f"{len(layout)} arms ({mode})" in table
    probs = torch.linspace(0.1, 0.9, len(layout), dtype=torch.float64)
    with_probs = layout.table(probs)
    assert "prob" in with_probs
    for name, p in zip(layout.names, probs.tolist(), strict=True):
        assert name in with_probs
        assert f"{p:.4f}" in with_probs
