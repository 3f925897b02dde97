"""ResNet for 32x32 images, the CIFAR variant of He et al. 2016 (ResNet-20/32/44/56/110), and pretrained ResNet-20.

The layout and parameter names follow akamaster/pytorch_resnet_cifar10, so its released checkpoints load by name.
Its CIFAR-10 ResNet-20 (91.7% CIFAR-10 test accuracy, 1.1 MB, BSD-2-Clause) ships inside this package:
``resnet20_cifar(weights="packaged")`` loads it (the file: :data:`PACKAGED_RESNET20_WEIGHTS`; its licence and
source: ``weights/LICENSE-resnet20_cifar10.txt`` next to it). Those weights were trained on inputs normalised with
the ImageNet mean/std (``CIFARDataModule(normalize="imagenet")``).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_slsam.loading.checkpoint_files import read_torch_file

STAGE_CHANNELS: tuple[int, int, int] = (16, 32, 64)
RESNET20_CLASSES = 10
#: ``weights=PACKAGED`` selects the CIFAR-10 ResNet-20 checkpoint shipped in the package.
PACKAGED = "packaged"
#: That checkpoint: akamaster/pytorch_resnet_cifar10 ``pretrained_models/resnet20-12fca82f.th``, unchanged
#: (SHA-256 starting ``12fca82f``; BSD-2-Clause, notice in ``LICENSE-resnet20_cifar10.txt`` beside it).
PACKAGED_RESNET20_WEIGHTS: Path = Path(__file__).resolve().parent / "weights" / "resnet20_cifar10.th"


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters, no buffers).

    Args:
        extra_channels: zero channels added in total, half before and half after the input's channels.
    """

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions without bias.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of ``conv1`` (1, or 2 at a stage's first block, which then uses a zero-pad shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(out_channels - in_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet-(6n+2) for CIFAR-sized images: a 3x3 stem, three stages of n BasicBlocks, average pool, ``linear``.

    Parameters: ``conv1``, ``bn1``, ``layer{1,2,3}.{0..n-1}.{conv1,bn1,conv2,bn2}``, ``linear`` (stages of
    16/32/64 channels; the 2nd and 3rd halve the resolution). The pooling is global, so inputs other than
    32x32 work too (at least 4x4 pixels is sensible).

    Args:
        num_classes: outputs of ``linear`` (default 10).
        blocks_per_stage: n, BasicBlocks per stage (default 3 = ResNet-20; 5 = ResNet-32, 9 = ResNet-56).
        in_channels: input image channels (default 3).
    """

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")
        if not (isinstance(blocks_per_stage, int) and blocks_per_stage >= 1):
            raise ValueError(f"blocks_per_stage: must be an int >= 1, got {blocks_per_stage!r}")
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f"in_channels: must be an int >= 1, got {in_channels!r}")
        self.conv1 = nn.Conv2d(in_channels, STAGE_CHANNELS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.layer1 = self._stage(STAGE_CHANNELS[0], STAGE_CHANNELS[0], blocks_per_stage, stride=1)
        self.layer2 = self._stage(STAGE_CHANNELS[0], STAGE_CHANNELS[1], blocks_per_stage, stride=2)
        self.layer3 = self._stage(STAGE_CHANNELS[1], STAGE_CHANNELS[2], blocks_per_stage, stride=2)
        self.linear = nn.Linear(STAGE_CHANNELS[2], num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def load_resnet_cifar_state_dict(weights: str | Path) -> dict[str, Tensor]:
    """The state dict in a ResNet-CIFAR checkpoint file, with any ``module.`` (DataParallel) prefix removed.

    Accepts a bare state dict or a dict holding one under ``state_dict`` (akamaster's ``.th`` files).
    Raises FileNotFoundError naming ``weights`` when the file is missing, and a ValueError naming it and the
    file when the file is empty, truncated or not a PyTorch file.
    """
    checkpoint = read_torch_file(weights, "weights", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"weights: {str(weights)!r} holds no state dict (a dict of tensors, or one under 'state_dict')"
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def resnet20_cifar(num_classes: int = 10, weights: str | None = None, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-20 for 32x32 images, randomly initialised or loaded from a CIFAR-10 checkpoint.

    Args:
        num_classes: outputs (default 10). With ``weights`` and ``num_classes != 10``, every weight but the
            head is loaded and ``linear`` is freshly initialised (Kaiming normal) for the new class count.
        weights: ``"packaged"`` for the CIFAR-10 checkpoint shipped in the package
            (:data:`PACKAGED_RESNET20_WEIGHTS`), the path of another checkpoint with ResNet-20 weights (a ``module.``
            prefix is stripped; names must match exactly), or None (default) for random weights.
        in_channels: input channels (default 3; the pretrained weights need 3).

    Raises:
        FileNotFoundError: ``weights`` names no file.
        ValueError: the checkpoint's names or shapes do not fit ResNet-20.
    """
    model = ResNetCIFAR(num_classes=num_classes, blocks_per_stage=3, in_channels=in_channels)
    if weights is None:
        return model
    state = load_resnet_cifar_state_dict(PACKAGED_RESNET20_WEIGHTS if weights == PACKAGED else weights)
    if num_classes != RESNET20_CLASSES:
        state = {key: value for key, value in state.items() if not key.startswith("linear.")}
    expected = model.state_dict()
    optional = {key for key in expected if key.endswith("num_batches_tracked")}  # old checkpoints lack these
    if num_classes != RESNET20_CLASSES:
        optional |= {"linear.weight", "linear.bias"}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"weights: {weights!r} does not fit ResNet-20 (in_channels={in_channels}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    model.load_state_dict(state, strict=False)  # every required key was checked above
    return model
