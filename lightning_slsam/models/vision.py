"""Image networks for the configs: torchvision ResNets and Vision Transformers at the standard sizes.

Nothing downloads unless ``pretrained=True`` is asked for (torchvision's weights for ResNets, timm's for ViTs);
a ViT's ``weights=<file>`` loads a local file instead (timm's or torchvision's names), with no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from lightning_slsam.loading.checkpoint_files import read_torch_file
from lightning_slsam.loading.network_access import NetworkUnavailableError
from lightning_slsam.loading.optional_dependencies import import_optional
from lightning_slsam.models.timm_vit_weights import (
    TIMM_PATCH_SIZE,
    TIMM_VIT_MODELS,
    rename_timm_vit,
    resize_position_embedding,
    timm_vit_state_dict,
)

TORCHVISION_RESNETS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ViTShape:
    """The size of a Vision Transformer: blocks, attention heads, token width and MLP width."""

    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int


#: standard ViT sizes (Touvron et al. 2021 / Steiner et al. 2021); DeiT-S is ViT-S's shape
VIT_SHAPES: dict[str, ViTShape] = {
    "vit_tiny": ViTShape(num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
    "vit_small": ViTShape(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
    "deit_small": ViTShape(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
}


def _check_num_classes(num_classes: int) -> None:
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")


def torchvision_resnet(
    name: str = "resnet18", num_classes: int = 1000, pretrained: bool = False, small_input: bool = False
) -> nn.Module:
    """A torchvision ResNet with a ``num_classes`` head.

    Args:
        name: ``"resnet18"`` (default), ``"resnet34"``, ``"resnet50"``, ``"resnet101"`` or ``"resnet152"``.
        num_classes: outputs of the ``fc`` head (default 1000).
        pretrained: load torchvision's ImageNet weights (``weights="DEFAULT"``; downloads to ``TORCH_HOME`` on first
            use, so it needs a network once). With ``num_classes != 1000`` the ``fc`` head is new (random).
            Default False: random weights, no download.
        small_input: replace the 7x7 stride-2 stem and its max-pool by a 3x3 stride-1 convolution, the usual
            change for 32x32 images (that stem is random even when pretrained). Default False.
    """
    if name not in TORCHVISION_RESNETS:
        raise ValueError(f"name: expected one of {', '.join(TORCHVISION_RESNETS)}, got {name!r}")
    _check_num_classes(num_classes)
    builder = getattr(torchvision.models, name)
    if pretrained:
        try:
            model = builder(weights="DEFAULT")
        except OSError as error:  # URLError and the like: the download failed (urllib does not retry)
            reason = (str(getattr(error, "reason", error)).strip().splitlines() or [type(error).__name__])[0]
            raise NetworkUnavailableError(
                f"pretrained: cannot fetch torchvision's {name} ImageNet weights ({reason}); use "
                "model.pretrained=false (pretrained=False) for random weights, or copy the file into "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} on a machine with a network"
            ) from error
        if num_classes != IMAGENET_CLASSES:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model = builder(weights=None, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def vit(
    name: str = "vit_small",
    num_classes: int = 1000,
    image_size: int = 224,
    patch_size: int = 16,
    pretrained: bool = False,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    weights: str | Path | None = None,
) -> VisionTransformer:
    """A torchvision ``VisionTransformer`` of a standard size.

    Sizes (blocks / heads / width / MLP width): ``"vit_tiny"`` 12 / 3 / 192 / 768 (5.7M parameters at 224 px,
    patch 16, 1000 classes); ``"vit_small"`` and ``"deit_small"`` 12 / 6 / 384 / 1536 (22.05M, of which 21.67M
    without the head).

    Args:
        name: ``"vit_tiny"``, ``"vit_small"`` (default) or ``"deit_small"``.
        num_classes: outputs of the ``heads.head`` linear layer (default 1000).
        image_size: input side in pixels (default 224); a multiple of ``patch_size``.
        patch_size: patch side in pixels (default 16).
        pretrained: load timm's ImageNet-1k weights (``vit_tiny_patch16_224``, ``vit_small_patch16_224``,
            ``deit_small_patch16_224``; needs ``pip install timm`` and a network once). Requires ``patch_size=16``;
            other image sizes get the position embedding resampled (bicubic); with ``num_classes != 1000`` the
            head stays newly initialised (zeros, torchvision's init). timm's ViT weights expect inputs normalised
            with mean = std = 0.5, DeiT's with the ImageNet mean/std. Default False: random weights, no download.
        dropout: dropout rate in the MLPs and after the embedding (default 0).
        attention_dropout: dropout rate on the attention weights (default 0).
        weights: a local weights file to start from instead of ``pretrained`` (no network): a ``.safetensors``
            file or a ``torch.save`` file holding a state dict (bare, or under ``state_dict`` / ``model``), in
            timm's names (e.g. the ``model.safetensors`` of ``timm/vit_small_patch16_224.augreg_in21k_ft_in1k``,
            fetched once on a machine with a network) or in torchvision's. The grid and the head are adapted as for
            ``pretrained``. Default None.

    Raises:
        ValueError: an unknown ``name``, sizes that do not fit, or a weights file that does not fit (naming the
            argument).
        FileNotFoundError: ``weights`` names no file.
        ImportError: ``pretrained=True`` without timm installed.
    """
    if name not in VIT_SHAPES:
        raise ValueError(f"name: expected one of {', '.join(VIT_SHAPES)}, got {name!r}")
    _check_num_classes(num_classes)
    if not (isinstance(patch_size, int) and patch_size >= 1):
        raise ValueError(f"patch_size: must be an int >= 1, got {patch_size!r}")
    if not (isinstance(image_size, int) and image_size >= patch_size and image_size % patch_size == 0):
        raise ValueError(f"image_size: must be a positive multiple of patch_size={patch_size}, got {image_size!r}")
    for key, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{key}: must lie in [0, 1), got {rate!r}")
    if pretrained and weights is not None:
        raise ValueError(
            f"weights: set pretrained=True (timm's weights, network) or a weights file ({str(weights)!r}), not both"
        )
    if pretrained and patch_size != TIMM_PATCH_SIZE:
        raise ValueError(f"patch_size: the pretrained weights use patches of {TIMM_PATCH_SIZE}, got {patch_size}")
    shape = VIT_SHAPES[name]
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        hidden_dim=shape.hidden_dim,
        mlp_dim=shape.mlp_dim,
        dropout=dropout,
        attention_dropout=attention_dropout,
        num_classes=num_classes,
    )
    if pretrained:
        load_timm_vit_weights(model, name)
    elif weights is not None:
        load_vit_weights_file(model, name, weights)
    return model


def load_timm_vit_weights(model: VisionTransformer, name: str) -> None:
    """Load timm's pretrained ``name`` weights into ``model`` (same shape), adapting the grid and the head."""
    state = rename_timm_vit(timm_vit_state_dict(name))
    _load_vit_state(model, name, state, f"pretrained: timm's {TIMM_VIT_MODELS[name]}")


def read_vit_weights_file(weights: str | Path) -> dict[str, Tensor]:
    """The state dict in a ViT weights file, in torchvision's names (timm's are renamed, a ``module.`` prefix
    is removed).

    Raises:
        FileNotFoundError: no file at ``weights``.
        ValueError: the file is not readable or holds no state dict (naming ``weights``).
    """
    file = Path(weights).expanduser()
    if file.suffix == ".safetensors":
        if not file.is_file():
            raise FileNotFoundError(f"weights: no file at {str(weights)!r}")
        safetensors = import_optional("safetensors.torch", "weights=<file>.safetensors")
        try:
            checkpoint = safetensors.load_file(str(file), device="cpu")
        except Exception as error:  # a damaged header or a foreign file: the same thing to the user
            raise ValueError(f"weights: {str(weights)!r} is not a readable safetensors file ({error})") from error
    else:
        checkpoint = read_torch_file(file, "weights", weights_only=True)
    if isinstance(checkpoint, dict):
        nested = (checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict))
        checkpoint = next(nested, checkpoint)
    tensors = isinstance(checkpoint, dict) and all(isinstance(v, Tensor) for v in checkpoint.values())
    if not tensors or not checkpoint:
        raise ValueError(
            f"weights: {str(weights)!r} holds no state dict (a dict of tensors, or one under 'state_dict' or 'model')"
        )
    state = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    if "cls_token" in state or any(key.startswith("blocks.") for key in state):  # timm's names
        state = rename_timm_vit(state)
    return state


def load_vit_weights_file(model: VisionTransformer, name: str, weights: str | Path) -> None:
    """Load a local weights file (see :func:`vit`'s ``weights``) into ``model``, adapting the grid and the head."""
    _load_vit_state(model, name, read_vit_weights_file(weights), f"weights: {str(weights)!r}")


def _load_vit_state(model: VisionTransformer, name: str, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` (torchvision names) into ``model``: the position embedding resampled to the model's grid, the
    head left newly initialised when its class count differs; any other missing, extra or misshapen weight raises
    a ValueError that starts with ``source``."""
    state = dict(state)
    if "encoder.pos_embedding" in state:
        grid_size = model.image_size // model.patch_size
        state["encoder.pos_embedding"] = resize_position_embedding(state["encoder.pos_embedding"], grid_size)
    head_keys = {"heads.head.weight", "heads.head.bias"}
    expected = model.state_dict()
    head = state.get("heads.head.weight")
    if head is None or head.shape != expected["heads.head.weight"].shape:
        state = {key: value for key, value in state.items() if key not in head_keys}
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    missing = sorted(set(expected) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source} does not fit {name} (patch {model.patch_size}): missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    model.load_state_dict(state, strict=False)  # every weight but a replaced head was checked above
