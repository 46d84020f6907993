"""A zoo of tiny backbones of every graph shape users bring, with the layer names they write.

Each :class:`Backbone` has ``build(n_outputs)``, the input shape without the batch, and the
placements of ``stochastic_module_names``: ``first``, ``inner`` (a layer inside a block),
``last``, ``first+last`` and ``all`` (``None``). Every network is batch first and traceable by
``torch.fx``. ``BACKBONES`` maps the names to the entries, ``BACKBONE_CASES`` lists every
``(name, placement)`` pair. ``torchvision_backbones()`` adds torchvision's own models (no weights)
where torchvision is importable (the Laplace environment); their placements,
``TORCHVISION_PLACEMENTS`` and ``TORCHVISION_CASES``, import without it.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from uq_box.nn import MCDropout


@dataclass(frozen=True)
class Backbone:
    """``build(n_outputs)`` gives a fresh network (seed first for a fixed init) mapping
    ``[N, *input_shape]`` to ``[N, n_outputs]``; ``placements`` maps a label to a value of
    ``stochastic_module_names`` (dotted module names of Linear / Conv / ConvTranspose layers, or
    ``None`` for all)."""

    name: str
    build: Callable[[int], nn.Module]
    input_shape: tuple[int, ...]
    placements: dict


def _placements(first, inner, last):
    return {
        "first": [first],
        "inner": [inner],
        "last": [last],
        "first+last": [first, last],
        "all": None,
    }


class LeNet(nn.Module):
    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4 * 2 * 2, 8), nn.Linear(8, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """ResNet block: identity shortcut, or a 1x1 convolution + BatchNorm projection."""

    def __init__(self, width_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResidualNet(nn.Module):
    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.block1 = BasicBlock(4, 4)  # identity shortcut
        self.block2 = BasicBlock(4, 6, stride=2)  # projection shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, width_in: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width_in)
        self.conv = nn.Conv2d(width_in, growth, 3, padding=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.conv(torch.relu(self.norm(torch.cat(features, 1))))


class DenseNet(nn.Module):
    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1, self.layer2 = DenseLayer(4, 3), DenseLayer(7, 3)
        self.classifier = nn.Linear(10, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.stem(x)]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        x = F.adaptive_avg_pool2d(torch.cat(features, 1), 1)
        return self.classifier(x.view(x.size(0), -1))


class UNet(nn.Module):
    """Encoder, bottleneck, a transposed-convolution decoder step and an upsampling one, with
    concatenated skips; pooled to ``[N, n_outputs]``."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.bottleneck = nn.Conv2d(6, 6, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.dec1 = nn.Conv2d(4 + 6, 4, 3, padding=1)
        self.dec2 = nn.Conv2d(4 + 4, 4, 3, padding=1)
        self.head = nn.Linear(4, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        e1 = torch.relu(self.enc1(x))  # 8x8
        e2 = torch.relu(self.enc2(F.max_pool2d(e1, 2)))  # 4x4
        b = torch.relu(self.bottleneck(F.max_pool2d(e2, 2)))  # 2x2
        d1 = torch.relu(self.dec1(torch.cat([self.up1(b), e2], 1)))  # 4x4
        d2 = F.interpolate(d1, scale_factor=2, mode="nearest")  # 8x8
        d2 = torch.relu(self.dec2(torch.cat([d2, e1], 1)))
        return self.head(d2.mean((2, 3)))


class TwoBranch(nn.Module):
    """Inception-like: parallel 1x1 and 3x3 branches concatenated, plus an added third one."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch1 = nn.Conv2d(4, 3, 1)
        self.branch3 = nn.Conv2d(4, 3, 3, padding=1)
        self.side = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        h = torch.cat([self.branch1(h), self.branch3(h)], 1) + self.side(h)
        return self.head(F.avg_pool2d(torch.relu(h), 8).flatten(1))


class Shared(nn.Module):
    """One Linear layer called twice (shared weights)."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.shared(h)))


class Transformer(nn.Module):
    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.embed(x)).mean(1))


class Functional(nn.Module):
    """``+``, ``*``, ``torch.cat``, ``F.interpolate``, ``flatten``, ``view`` and pooling."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.gate = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(6 * 4 * 4, 8)
        self.head = nn.Linear(8 + 3, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv2(h) * torch.sigmoid(self.gate(h))
        small = F.max_pool2d(h, 2)
        up = F.interpolate(F.avg_pool2d(small, 2), scale_factor=2.0, mode="bilinear")
        h = torch.cat([small, up], 1)
        h = torch.relu(self.fc(h.view(h.size(0), -1)))
        return self.head(torch.cat([h, small.flatten(2).mean(-1)], 1))


def with_dropout(model: nn.Module, name: str, p: float = 0.3) -> nn.Module:
    """``model`` with MC dropout in front of layer ``name`` (a stochastic point inside a block)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, nn.Sequential(MCDropout(p), getattr(parent, child)))
    return model


def _mlp(n_outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, n_outputs)
    )


BACKBONES = {
    b.name: b
    for b in [
        Backbone("mlp", _mlp, (3,), _placements("0", "2", "4")),
        Backbone("lenet", LeNet, (1, 8, 8), _placements("conv1", "conv2", "fc2")),
        Backbone("residual", ResidualNet, (1, 8, 8), _placements("stem.0", "block1.conv1", "fc")),
        Backbone("dense", DenseNet, (1, 8, 8), _placements("stem", "layer1.conv", "classifier")),
        Backbone("unet", UNet, (1, 8, 8), _placements("enc1", "up1", "head")),
        Backbone("two_branch", TwoBranch, (1, 8, 8), _placements("stem", "branch3", "head")),
        Backbone("shared", Shared, (3,), _placements("inp", "shared", "head")),
        Backbone("transformer", Transformer, (5, 3), _placements("embed", "enc.linear1", "head")),
        Backbone("functional", Functional, (1, 8, 8), _placements("conv1", "conv2", "head")),
    ]
}
PLACEMENTS = ("first", "inner", "last", "first+last", "all")
BACKBONE_CASES = [(name, placement) for name in BACKBONES for placement in PLACEMENTS]


#: torchvision's models: placements of ``stochastic_module_names`` (importable without
#: torchvision, e.g. to parametrize tests)
TORCHVISION_PLACEMENTS = {
    "resnet18": {
        "last": ["fc"],
        "inner": ["layer4.1.conv2"],
        "block+last": ["layer4.1.conv1", "fc"],
        "all": None,
        # only the projection shortcut: torchvision's `out += identity` adds it in place
        "shortcut": ["layer2.0.downsample.0"],
    },
    "densenet121": {
        "last": ["classifier"],
        "inner+last": ["features.denseblock4.denselayer16.conv2", "classifier"],
    },
    "mobilenet_v3_small": {"last": ["classifier.3"], "inner": ["features.9.block.0.0"]},
    "vit": {"last": ["heads.head"], "mlp": ["encoder.layers.encoder_layer_0.mlp.0"]},
}
TORCHVISION_CASES = [
    (name, label) for name, table in TORCHVISION_PLACEMENTS.items() for label in table
]


def torchvision_backbones() -> dict[str, Backbone]:
    """torchvision's models (no weights, inputs 3 x 32 x 32) with the layer names users write."""
    from torchvision import models

    builders = {
        "resnet18": lambda n: models.resnet18(num_classes=n),
        "densenet121": lambda n: models.densenet121(num_classes=n),
        "mobilenet_v3_small": lambda n: models.mobilenet_v3_small(num_classes=n),
        "vit": lambda n: models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
            num_classes=n,
        ),
    }  # fmt: skip
    return {
        name: Backbone(name, build, (3, 32, 32), TORCHVISION_PLACEMENTS[name])
        for name, build in builders.items()
    }
