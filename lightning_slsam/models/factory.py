"""``image_classifier``: one constructor for every image network of the configs' ``model`` group.

Lets a config (or a command line) say ``model.arch=resnet20_cifar model.weights=packaged`` without knowing
how each network is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_slsam.models.classifier import Classifier

ARCHES = ("resnet20_cifar", "resnet18", "resnet50", "vit_tiny", "vit_small", "deit_small")


def build_network(
    arch: str,
    num_classes: int,
    weights: str | None = None,
    pretrained: bool = False,
    image_size: int = 224,
    patch_size: int = 16,
) -> nn.Module:
    """The network ``arch`` with a ``num_classes`` head.

    Args:
        arch: one of ``resnet20_cifar`` (ours, 32x32 inputs), ``resnet18``, ``resnet50`` (torchvision),
            ``vit_tiny``, ``vit_small``, ``deit_small``.
        num_classes: outputs.
        weights: a local weights file to start from (no network); None (default) for random weights (or
            ``pretrained``). ``resnet20_cifar``: ``"packaged"`` (the CIFAR-10 checkpoint shipped in the package) or a
            checkpoint file with matching names. ViTs: a ``.safetensors`` or ``torch.save`` state dict in timm's or
            torchvision's names (:func:`~lightning_slsam.models.vision.vit`). Not for the torchvision ResNets.
        pretrained: torchvision / timm pretrained weights (needs a network the first time; default False).
        image_size: ViT input side, in pixels (default 224).
        patch_size: ViT patch side, in pixels (default 16).
    """
    if arch not in ARCHES:
        raise ValueError(f"arch: unknown network {arch!r}; expected one of {', '.join(ARCHES)}")
    if weights is not None and arch.startswith("resnet") and arch != "resnet20_cifar":
        raise ValueError(
            f"weights: a weights file is supported for resnet20_cifar and the ViTs, not {arch}; use pretrained=true"
        )
    if arch == "resnet20_cifar":
        if pretrained:
            raise ValueError(
                "pretrained: resnet20_cifar has no hub weights; use weights=packaged (CIFAR-10) or a checkpoint file"
            )
        from lightning_slsam.models.resnet_cifar import resnet20_cifar

        return resnet20_cifar(num_classes=num_classes, weights=weights)
    if arch.startswith("resnet"):
        from lightning_slsam.models.vision import torchvision_resnet

        return torchvision_resnet(arch, num_classes=num_classes, pretrained=pretrained)
    from lightning_slsam.models.vision import vit

    return vit(
        arch,
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        pretrained=pretrained,
        weights=weights,
    )


def image_classifier(
    arch: str,
    num_classes: int,
    weights: str | None = None,
    pretrained: bool = False,
    image_size: int = 224,
    patch_size: int = 16,
    optimizer: Callable[..., Any] | None = None,
    scheduler: Callable[..., Any] | None = None,
) -> Classifier:
    """A :class:`Classifier` LightningModule around :func:`build_network` (same arguments), with the
    optimizer and scheduler factories of the ``optimizer`` and ``scheduler`` config groups."""
    net = build_network(arch, num_classes, weights, pretrained, image_size, patch_size)
    return Classifier(net, num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
