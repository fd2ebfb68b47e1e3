"""A small CNN that tells which zoo photo a 48 x 48 crop comes from; its penultimate layer is the feature space
of the zoo's Frechet distance (`specdec.metrics.feature_fd`), an offline stand-in for Inception features in FID
(Heusel et al., 2017). A classifier trained on exactly these classes makes the features sensitive to what matters
here: colour, texture and content of each photo.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureConfig:
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128, 128)   # first at full resolution, then each halves it
    feature_dim: int = 64
    image_size: int = 48

    def __post_init__(self):
        if self.num_classes < 2 or self.feature_dim < 1:
            raise ValueError(f"need num_classes >= 2 and feature_dim >= 1, got {self.num_classes}, "
                             f"{self.feature_dim}")
        if not self.channels or min(self.channels) < 8:
            raise ValueError(f"channels must be non-empty widths >= 8 (GroupNorm groups), got {self.channels}")


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: features of one image must not depend on the rest of its batch
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class FeatureNet(nn.Module):
    """images [B, 3, 48, 48] in [-1, 1] -> features [B, F] (`features`) or class logits [B, C] (`forward`)."""

    def __init__(self, config: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.config = config
        chans = (3,) + tuple(config.channels)
        self.body = nn.Sequential(*(_stage(chans[i], chans[i + 1], 1 if i == 0 else 2)
                                    for i in range(len(config.channels))))
        self.embed = nn.Linear(chans[-1], config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> penultimate features [B, feature_dim] (before the class head)."""
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}], got {tuple(images.shape)}")
        return self.embed(self.body(images).mean((2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.head(nn.functional.silu(self.features(images)))
