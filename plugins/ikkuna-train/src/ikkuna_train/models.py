"""Demonstration models for small images.

All models accept ``input_shape=(C, H, W)`` and ``num_classes`` keyword arguments and are sized
for 28x28 (MNIST-like, usually one channel) and 32x32 (CIFAR-like, usually three channels)
inputs. Adaptive pooling before the classifier heads lets every convolutional model handle
both sizes without changing its layer definitions.

Use :func:`get_model` to build a model by name (case-insensitive; the thesis's names in
:data:`ALIASES` are accepted too) and :func:`init_weights` to re-initialise its parameters
with a named scheme.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ALIASES",
    "MODELS",
    "VGG",
    "AlexNetMini",
    "BasicBlock",
    "DenseNet",
    "FullyConnected",
    "ResNet",
    "ThreeC3D",
    "get_model",
    "canonical_model_name",
    "init_weights",
    "resnet18",
    "resnet34",
]

Shape = tuple[int, int, int]
DEFAULT_INPUT_SHAPE: Shape = (3, 32, 32)


def _check_shape(input_shape: Sequence[int]) -> Shape:
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


class FullyConnected(nn.Module):
    """Multi-layer perceptron: flatten, hidden ``Linear + ReLU`` layers, linear classifier."""

    def __init__(
        self,
        *,
        input_shape: Shape = DEFAULT_INPUT_SHAPE,
        num_classes: int = 10,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        c, h, w = _check_shape(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        width = c * h * w
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlexNetMini(nn.Module):
    """A scaled-down AlexNet: five 3x3 convolutions, three max-pools, a three-layer head."""

    def __init__(
        self,
        *,
        input_shape: Shape = DEFAULT_INPUT_SHAPE,
        num_classes: int = 10,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c, _, _ = _check_shape(input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # 28x28 inputs end up 3x3 here, 32x32 inputs 4x4; pool both to 2x2.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(256 * 2 * 2, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# Convolution widths per VGG depth; "M" is a 2x2 max-pool. The fifth pool of the ImageNet
# variants is dropped: a 28x28 input would shrink to nothing, so adaptive pooling takes over.
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class VGG(nn.Module):
    """VGG-style network (3x3 convolutions, optional BatchNorm) for small images."""

    def __init__(
        self,
        *,
        input_shape: Shape = DEFAULT_INPUT_SHAPE,
        num_classes: int = 10,
        depth: int = 11,
        batch_norm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        channels, _, _ = _check_shape(input_shape)
        layers: list[nn.Module] = []
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            width = int(item)
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    """Two 3x3 conv/BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages of 64/128/256/512 channels."""

    def __init__(
        self,
        *,
        blocks: Sequence[int] = (2, 2, 2, 2),
        input_shape: Shape = DEFAULT_INPUT_SHAPE,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks must be four positive ints, got {blocks!r}")
        c, _, _ = _check_shape(input_shape)
        self.stem = nn.Sequential(
            nn.Conv2d(c, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = 64
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stride = 1 if index == 0 else 2
            stage: list[nn.Module] = []
            for block in range(count):
                stage.append(BasicBlock(in_channels, width, stride if block == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(*, input_shape: Shape = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> ResNet:
    """CIFAR-style ResNet-18 (about 11.17M parameters with 10 classes)."""
    return ResNet(blocks=(2, 2, 2, 2), input_shape=input_shape, num_classes=num_classes)


def resnet34(*, input_shape: Shape = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> ResNet:
    """CIFAR-style ResNet-34 (about 21.28M parameters with 10 classes)."""
    return ResNet(blocks=(3, 4, 6, 3), input_shape=input_shape, num_classes=num_classes)


class _DenseLayer(nn.Module):
    """Bottleneck layer: BN-ReLU-1x1 conv to ``4k`` channels, BN-ReLU-3x3 conv to ``k``."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        inner = 4 * growth_rate
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(nn.Module):
    """CIFAR-style DenseNet-BC: three dense blocks of bottleneck layers with compression.

    ``depth`` counts convolutions as in the DenseNet paper, so each dense block holds
    ``(depth - 4) // 6`` bottleneck layers; ``depth`` must be of the form ``6n + 4``. The
    default (depth 40, growth rate 12) has about 0.18M parameters.
    """

    def __init__(
        self,
        *,
        input_shape: Shape = DEFAULT_INPUT_SHAPE,
        num_classes: int = 10,
        depth: int = 40,
        growth_rate: int = 12,
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        c, _, _ = _check_shape(input_shape)
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth_rate
        modules: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(layers_per_block):
                modules.append(_DenseLayer(channels, growth_rate))
                channels += growth_rate
            if block < 2:
                out_channels = int(channels * compression)
                modules += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.Conv2d(channels, out_channels, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                channels = out_channels
        modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*modules)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ThreeC3D(nn.Module):
    """The DeepOBS ``3c3d`` CIFAR-10 network: three conv layers, then dense 512, 256, classes.

    Convolutions: 64 5x5 (valid), 96 3x3 (valid), 128 3x3 (same), each followed by ReLU and
    a 3x3 max-pool with stride 2 and ``same``-style padding. Both 32x32 and 28x28 inputs end
    at 3x3 before the dense layers; the adaptive pool keeps other sizes working too.
    """

    def __init__(self, *, input_shape: Shape = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> None:
        super().__init__()
        c, _, _ = _check_shape(input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 5),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 96, 3),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(96, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.AdaptiveMaxPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "FullyConnected": FullyConnected,
    "AlexNetMini": AlexNetMini,
    "VGG": VGG,
    "ResNet18": resnet18,
    "ResNet34": resnet34,
    "DenseNet": DenseNet,
    "3c3d": ThreeC3D,
}


#: Other names for models of :data:`MODELS`: the thesis's class names (its ``ResNet`` is the
#: ResNet-18) and this module's class names.
ALIASES: dict[str, str] = {
    "ResNet": "ResNet18",
    "FullyConnectedModel": "FullyConnected",
    "ThreeC3D": "3c3d",
}


def canonical_model_name(name: str) -> str | None:
    """The key of :data:`MODELS` that ``name`` (case-insensitive, or an alias) means, or
    None."""
    lookup = {key.lower(): key for key in MODELS}
    lookup.update({alias.lower(): key for alias, key in ALIASES.items()})
    return lookup.get(str(name).lower())


def get_model(
    name: str,
    input_shape: Shape = DEFAULT_INPUT_SHAPE,
    num_classes: int = 10,
    **kwargs: object,
) -> nn.Module:
    """Build the model registered as ``name`` (case-insensitive, or one of :data:`ALIASES`)
    in :data:`MODELS`.

    Extra keyword arguments are passed on to the model's constructor.
    """
    key = canonical_model_name(name)
    if key is None:
        raise ValueError(f"Unknown model {name!r}; available models: {', '.join(MODELS)}")
    return MODELS[key](input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)


INIT_SCHEMES = ("kaiming", "xavier", "default")
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def init_weights(model: nn.Module, scheme: str = "kaiming") -> nn.Module:
    """Re-initialise ``model`` in place and return it.

    ``"kaiming"`` draws conv/linear weights from a He normal distribution (ReLU gain, fan-in),
    ``"xavier"`` from a Glorot uniform distribution; both zero the biases and reset
    normalisation layers to weight 1, bias 0. ``"default"`` leaves PyTorch's initialisation.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(
            f"Unknown init scheme {scheme!r}; valid schemes: {', '.join(INIT_SCHEMES)}"
        )
    if scheme == "default":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _NORM_TYPES) and getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
