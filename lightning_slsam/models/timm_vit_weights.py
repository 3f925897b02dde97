"""Pretrained ViT weights from timm (optional dependency), converted to torchvision's ``VisionTransformer`` names.

timm and torchvision build the same network (pre-norm blocks, packed q/k/v projection, LayerNorm eps 1e-6,
exact GELU, class-token pooling); only the names differ, so the conversion is a renaming. timm downloads its
weights from the Hugging Face hub on first use (network needed once; cached under ``HF_HOME`` afterwards).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_slsam.loading.network_access import hf_endpoint, hugging_face_hub

#: our ViT names -> the timm models whose ImageNet-1k weights they load (patch 16, 224x224)
TIMM_VIT_MODELS: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "deit_small": "deit_small_patch16_224",
}
TIMM_PATCH_SIZE = 16
TIMM_IMAGE_SIZE = 224

_BLOCK_RENAMES: dict[str, str] = {
    "norm1": "ln_1",
    "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.3",
}
_TOP_RENAMES: dict[str, str] = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj": "conv_proj",
    "norm": "encoder.ln",
    "head": "heads.head",
}


def import_timm() -> Any:
    """``import timm``, or an ImportError that says how to get it."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            "pretrained: pretrained ViT weights come from timm, which is not installed; pip install timm "
            "(or lightning-slsam[timm]), or use pretrained=False"
        ) from error
    return timm


def timm_vit_state_dict(name: str) -> dict[str, Tensor]:
    """The ImageNet-1k pretrained weights of ``name`` (a key of :data:`TIMM_VIT_MODELS`) in timm's names.

    Raises:
        NetworkUnavailableError: offline without a cached copy, at once (``pretrained: cannot fetch ...``).
    """
    timm = import_timm()
    with hugging_face_hub(
        "pretrained",
        f"timm's {TIMM_VIT_MODELS[name]} weights for {name} from {hf_endpoint()}",
        "use model.pretrained=false (random weights) or model.weights=<a local .safetensors or .pth file> "
        "(pretrained=False / weights=... in Python)",
    ):
        model = timm.create_model(TIMM_VIT_MODELS[name], pretrained=True)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def rename_timm_vit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ViT names -> torchvision ``VisionTransformer`` names (values unchanged).

    Raises:
        ValueError: a key that a plain class-token ViT does not have (e.g. register tokens, a distillation head).
    """
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for old, new in _BLOCK_RENAMES.items():
                if rest == old or rest.startswith(old + "."):
                    renamed[f"encoder.layers.encoder_layer_{index}.{new}{rest[len(old) :]}"] = value
                    break
            else:
                raise ValueError(f"pretrained: unexpected timm ViT weight {key!r}")
            continue
        for old, new in _TOP_RENAMES.items():
            if key == old or key.startswith(old + "."):
                renamed[new + key[len(old) :]] = value
                break
        else:
            raise ValueError(f"pretrained: unexpected timm ViT weight {key!r}")
    return renamed


def resize_position_embedding(pos_embedding: Tensor, grid_size: int) -> Tensor:
    """Resample a ``(1, 1 + g*g, dim)`` position embedding (class token first) to a new grid side.

    Bicubic and antialiased, as timm does it.
    """
    class_pos, patch_pos = pos_embedding[:, :1], pos_embedding[:, 1:]
    old_grid = math.isqrt(patch_pos.shape[1])
    if old_grid == grid_size:
        return pos_embedding
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False, antialias=True)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(pos_embedding.dtype)
    return torch.cat([class_pos, patch_pos], dim=1)
