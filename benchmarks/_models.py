"""Models the benchmarks share (not benchmarks themselves: the leading underscore)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut; option A (He et al., 2016, §4.2):
    when the width doubles, the shortcut subsamples by 2 and zero-pads the new channels, so
    shortcuts add no parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = c_out - c_in
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNet20(nn.Sequential):
    """ResNet-20 for 32×32 images (He et al., 2016, §4.2): 3 stages of 3 blocks, 16/32/64 wide.

    Its conv and linear weights number 268,336 (0.27 M parameters in all).
    """

    def __init__(self, num_classes: int = 10) -> None:
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
        super().__init__(*layers)


if __name__ == "__main__":  # pragma: no cover
    model = ResNet20()
    n = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in [m.weight])
    print(n, model(torch.randn(2, 3, 32, 32)).shape)
