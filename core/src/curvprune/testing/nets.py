"""Small networks for testing channel structures, gates and physical removal.

* :func:`sequential_cnn`: conv-BN-ReLU blocks (optional max-pool), flatten, Linear layers;
* :class:`TinyResNet`: a ResNet with torchvision-style ``BasicBlock`` or ``Bottleneck``
  blocks (1×1-conv + BN downsample where the shape changes), so residual streams couple;
* :class:`PadShortcutNet` and :class:`SplitNet`: an option-A zero-pad shortcut (``F.pad`` on
  the channel dim) and a ``torch.split`` at a literal size, which the remover must refuse;
* :class:`ChunkNet`: a ShuffleNetV2-like ``chunk`` of the channels (no shuffle);
* :class:`CatNet` and :class:`DenseCatNet`: a ``torch.cat`` of two branches, and a
  DenseNet-like pre-activation block (BatchNorms and a flatten over concatenations);
* :class:`InvertedResidualNet`, :class:`GroupedNet` and :class:`SqueezeExciteNet`:
  MobileNetV2-like depthwise convolutions, RegNet-like grouped convolutions and an
  EfficientNet-like squeeze-and-excitation product;
* :func:`randomize_`: draw weights, BatchNorm affine parameters and running statistics, so
  a test sees every term (a fresh BN is the identity in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CatNet",
    "ChunkNet",
    "DenseCatNet",
    "GroupedNet",
    "InvertedResidualNet",
    "PadShortcutNet",
    "SplitNet",
    "SqueezeExciteNet",
    "TinyResNet",
    "randomize_",
    "sequential_cnn",
]


def sequential_cnn(
    widths: Sequence[int],
    hidden: Sequence[int] = (),
    *,
    in_channels: int = 1,
    image: int = 4,
    classes: int = 3,
    pool: bool = False,
    bias: bool = True,
) -> nn.Sequential:
    """Conv3×3-BN-ReLU per width, an optional 2×2 max-pool, flatten, Linear-ReLU per hidden
    width, then a Linear classifier."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=bias), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    side = image
    if pool:
        layers.append(nn.MaxPool2d(2))
        side //= 2
    layers.append(nn.Flatten())
    features = c * side * side
    for h in hidden:
        layers += [nn.Linear(features, h), nn.ReLU()]
        features = h
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class _Bottleneck(nn.Module):
    expansion = 2

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, stages of residual blocks, global average pool, Linear classifier.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        widths: the block width of each stage (stages after the first use stride 2).
        blocks: blocks per stage.
        stem: stem width.
        classes: classifier outputs.
    """

    def __init__(
        self,
        block: str = "basic",
        widths: Sequence[int] = (4, 8),
        blocks: int = 2,
        stem: int = 4,
        classes: int = 3,
    ) -> None:
        super().__init__()
        kind = {"basic": _Basic, "bottleneck": _Bottleneck}[block]
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages = []
        c = stem
        for i, w in enumerate(widths):
            layers = []
            for j in range(blocks):
                layers.append(kind(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w * kind.expansion
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class PadShortcutNet(nn.Module):
    """One residual block with an option-A shortcut: subsample and zero-pad the channels."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, x.shape[1]))
        x = F.relu(self.conv2(x) + shortcut)
        return self.fc(x.mean((2, 3)))


class CatNet(nn.Module):
    """Two branches concatenated on the channel dim, then a 1×1 conv and a classifier."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(3, c, 3, padding=1)
        self.mix = nn.Conv2d(2 * c, c, 1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        x = F.relu(self.mix(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SplitNet(nn.Module):
    """A conv whose channels are split in two with ``torch.split`` at a literal size (refused:
    the literal would be stale after a removal)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2 * c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 1)
        self.c = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(F.relu(self.a(x)), self.b.in_channels, dim=1)
        x = F.relu(self.b(x1) + self.c(x2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ChunkNet(nn.Module):
    """ShuffleNetV2-like unit without the shuffle: a conv-BN-ReLU map chunked in two; one
    half passes, the other goes through a 1×1, a depthwise 3×3-BN and a 1×1; both are
    concatenated again into a 1×1 conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c),
                               nn.ReLU())
        self.pw1 = nn.Conv2d(c, c, 1)
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
        self.pw2 = nn.Conv2d(c, c, 1)
        self.mix = nn.Conv2d(2 * c, c, 1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = F.relu(self.a(x)).chunk(2, dim=1)
        x2 = F.relu(self.pw2(self.dw(F.relu(self.pw1(x2)))))
        x = F.relu(self.mix(torch.cat([x1, x2], 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseCatNet(nn.Module):
    """A DenseNet-like block: each layer is BN-ReLU-conv over the concatenation of all earlier
    outputs; then BN-ReLU over the last concatenation, and a flatten of the 2×2 map into the
    classifier (4 features per channel)."""

    def __init__(self, stem: int = 4, growth: int = 3, layers: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, stride=2, padding=1)
        c = stem
        self.norms, self.convs = nn.ModuleList(), nn.ModuleList()
        for _ in range(layers):
            self.norms.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, growth, 3, padding=1, bias=False))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * c, 3)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.stem(x)]
        for norm, conv in zip(self.norms, self.convs, strict=True):
            features.append(conv(F.relu(norm(torch.cat(features, 1)))))
        x = self.pool(F.relu(self.norm(torch.cat(features, 1))))
        return self.fc(torch.flatten(x, 1))


class InvertedResidualNet(nn.Module):
    """MobileNetV2-like: stem, then an inverted residual block (1×1 expand-BN-ReLU6, 3×3
    depthwise-BN-ReLU6, 1×1 project-BN, residual add); a second depthwise conv with a bias
    and no BN reads the expanded channels off the private chain (they also feed a skip)."""

    def __init__(self, c: int = 4, expand: int = 3) -> None:
        super().__init__()
        e = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e),
                                    nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False),
                                nn.BatchNorm2d(e), nn.ReLU6())
        self.dw2 = nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        h = self.expand(x)
        h = self.dw(h) + self.dw2(h)
        x = x + self.project(h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedNet(nn.Module):
    """RegNet-like: 1×1-BN-ReLU, a grouped 3×3 (``groups``)-BN-ReLU, 1×1-BN, residual add."""

    def __init__(self, c: int = 4, width: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.a = nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups),
                               nn.BatchNorm2d(width), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = F.relu(x + self.c(self.b(self.a(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExciteNet(nn.Module):
    """EfficientNet-like: conv-BN-SiLU, a squeeze-and-excitation scale (pool, 1×1 conv, SiLU,
    1×1 conv, sigmoid) multiplying the map, then a 1×1 projection and the classifier."""

    def __init__(self, c: int = 6, squeeze: int = 2) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.SiLU())
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.project = nn.Conv2d(c, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.relu(self.project(x * scale))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draw every parameter ~ N(0, 0.5²), BN γ in [0.5, 1.5], running means in [-0.5, 0.5]
    and running variances in [0.5, 2] (in place); returns ``model``."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            dtype = module.running_mean.dtype
            if module.affine:
                module.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=dtype))
            module.running_mean.copy_(torch.rand(n, generator=generator, dtype=dtype) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator, dtype=dtype))
    return model
