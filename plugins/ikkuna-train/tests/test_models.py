"""Tests for the demonstration models in ikkuna_train.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ikkuna_train.models import (
    MODELS,
    DenseNet,
    FullyConnected,
    ResNet,
    get_model,
    init_weights,
    resnet18,
    resnet34,
)

NAMES = list(MODELS)
SHAPES = [(1, 28, 28), (3, 32, 32)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert NAMES == [
        "FullyConnected",
        "AlexNetMini",
        "VGG",
        "ResNet18",
        "ResNet34",
        "DenseNet",
        "3c3d",
    ]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_forward_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = get_model(name, input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_sgd_step_changes_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = get_model(name, input_shape=shape, num_classes=10).train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p, before[k])]
    assert unchanged == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_get_model_is_case_insensitive() -> None:
    assert isinstance(get_model("fullyconnected"), FullyConnected)
    assert isinstance(get_model("DENSENET", input_shape=(1, 28, 28)), DenseNet)
    assert type(get_model("3C3D")).__name__ == "ThreeC3D"
    model = get_model("resnet18", num_classes=3)
    assert isinstance(model, ResNet)
    assert model.fc.out_features == 3


def test_get_model_passes_model_options() -> None:
    model = get_model("FullyConnected", input_shape=(1, 28, 28), hidden=(32,))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 32), (32, 10)]


def test_get_model_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError) as info:
        get_model("LeNet")
    message = str(info.value)
    assert "'LeNet'" in message
    for name in NAMES:
        assert name in message


def test_fully_connected_layout() -> None:
    model = FullyConnected(input_shape=(3, 32, 32), num_classes=5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (3072, 256),
        (256, 128),
        (128, 5),
    ]


def test_resnet18_size_and_inplace_relu() -> None:
    model = resnet18(num_classes=10)
    # CIFAR ResNet-18 (3x3 stem, 64..512 channels, 10 classes) has 11,173,962 parameters.
    assert 11_100_000 < n_params(model) < 11_250_000
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8
    for block in blocks:
        relus = [m for m in block.modules() if isinstance(m, nn.ReLU)]
        assert relus and all(r.inplace for r in relus)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.stem[0].kernel_size == (3, 3)


def test_resnet34_has_more_blocks() -> None:
    model = resnet34()
    assert sum(type(m).__name__ == "BasicBlock" for m in model.modules()) == 16
    assert 21_000_000 < n_params(model) < 21_500_000


def test_densenet_depth_validation() -> None:
    with pytest.raises(ValueError, match="6n \\+ 4"):
        DenseNet(depth=41)
    small = DenseNet(depth=16, input_shape=(1, 28, 28))
    assert n_params(small) < n_params(DenseNet())


def test_three_c3d_layers() -> None:
    model = get_model("3c3d", input_shape=(3, 32, 32), num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [
        (64, (5, 5)),
        (96, (3, 3)),
        (128, (3, 3)),
    ]
    linears = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [512, 256, 10]


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
@pytest.mark.parametrize("name", ["VGG", "DenseNet", "3c3d"])
def test_init_weights_resets_biases_and_norms(name: str, scheme: str) -> None:
    torch.manual_seed(0)
    model = get_model(name)
    with torch.no_grad():  # make sure the reset is observable
        for p in model.parameters():
            p.add_(0.5)
    assert init_weights(model, scheme) is model
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    for m in layers:
        if m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert layers and (norms or name == "3c3d")


def test_init_weights_scales() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(2000, 1000)
    init_weights(layer, "kaiming")
    # He normal with fan-in 2000: std = sqrt(2 / 2000)
    assert layer.weight.std().item() == pytest.approx((2 / 2000) ** 0.5, rel=0.02)
    init_weights(layer, "xavier")
    # Glorot uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), std = a / sqrt(3)
    bound = (6 / 3000) ** 0.5
    assert layer.weight.abs().max().item() <= bound
    assert layer.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)


def test_init_weights_default_and_unknown() -> None:
    model = FullyConnected()
    before = [p.detach().clone() for p in model.parameters()]
    init_weights(model, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError) as info:
        init_weights(model, "orthogonal")
    for scheme in ("orthogonal", "kaiming", "xavier", "default"):
        assert scheme in str(info.value)
