"""A small convolutional network for 8x8 grey digits (about 30k parameters)."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Two conv blocks (conv, BatchNorm, ReLU) and a two-layer head.

    Args:
        num_classes: outputs (default 10).
        channels: input channels (default 1).
        width: channels of the first conv block; the second has twice as many (default 16).
    """

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
