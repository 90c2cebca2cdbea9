"""Tests for ikkuna_train.data: digits, torchvision-format files, errors and seeded loaders."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from ikkuna_train.data import (
    DATASETS,
    DatasetInfo,
    DatasetUnavailableError,
    dataset_info,
    load_dataset,
    make_loaders,
)

# Published per-channel statistics the loaders normalise with.
STATS = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def unnormalize(image: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in STATS[name])
    return image * std + mean


def stack(dataset) -> tuple[torch.Tensor, list[int]]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), [int(y) for _, y in items]


# --------------------------------------------------------------------------- names / info


def test_dataset_info_and_case_insensitive_names() -> None:
    assert DATASETS == ("digits", "MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")
    assert dataset_info("DIGITS") == DatasetInfo("digits", (1, 28, 28), 10)
    assert dataset_info("fashionmnist") == DatasetInfo("FashionMNIST", (1, 28, 28), 10)
    assert dataset_info("cifar10") == DatasetInfo("CIFAR10", (3, 32, 32), 10)
    assert dataset_info("Cifar100") == DatasetInfo("CIFAR100", (3, 32, 32), 100)
    assert dataset_info("mnist", image_size=32).input_shape == (1, 32, 32)
    with pytest.raises(AttributeError):
        dataset_info("mnist").num_classes = 3  # frozen


def test_unknown_dataset_lists_available() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet", train=True)
    for name in ("'imagenet'", *DATASETS):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="CIFAR100"):
        dataset_info("svhn")


def test_import_is_lazy() -> None:
    code = (
        "import sys, ikkuna_train.data; "
        "print(sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src},
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- digits


def test_digits_split_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    train = load_dataset("digits", train=True)
    test = load_dataset("Digits", train=False)
    assert len(train) + len(test) == 1797
    assert len(train) == int(1797 * 0.8)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape[1:] == (1, 28, 28) and x_train.dtype == torch.float32
    assert set(y_train.tolist()) == set(range(10))

    bunch = load_digits()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    n_train = len(train)
    assert y_train.tolist() == bunch.target[order[:n_train].numpy()].tolist()
    assert y_test.tolist() == bunch.target[order[n_train:].numpy()].tolist()

    # Images: [0, 1]-scaled sklearn pixels upsampled to 28x28, standardised with train stats.
    raw = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16
    up = torch.nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    mean, std = up[order[:n_train]].mean(), up[order[:n_train]].std()
    torch.testing.assert_close(x_train, (up[order[:n_train]] - mean) / std)
    torch.testing.assert_close(x_test, (up[order[n_train:]] - mean) / std)
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4

    # Without relying on the permutation: pooled back to 8x8, every training image's nearest
    # sklearn digit (after per-image standardisation) carries the same label.
    def standardise(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)

    down = torch.nn.functional.adaptive_avg_pool2d(x_train, 8)
    nearest = torch.cdist(standardise(down), standardise(raw)).argmin(1)
    assert torch.equal(torch.as_tensor(bunch.target)[nearest], y_train)


def test_digits_is_deterministic_and_resizable() -> None:
    a, b = load_dataset("digits", train=True), load_dataset("digits", train=True)
    assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors, strict=True))
    big = load_dataset("digits", train=False, image_size=32)
    assert big[0][0].shape == (1, 32, 32)


# --------------------------------------------------------------------------- MNIST format


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file: big-endian magic (0x08 = ubyte, then ndim), dimension sizes, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str, rng: np.random.Generator) -> dict[bool, tuple]:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    written = {}
    for train, prefix, n in ((True, "train", 5), (False, "t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[train] = (images, labels)
    return written


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_mnist_format_roundtrip(tmp_path: Path, name: str) -> None:
    written = write_mnist(tmp_path, name, np.random.default_rng(1))
    for train in (True, False):
        dataset = load_dataset(name.lower(), train=train, data_dir=tmp_path, download=False)
        images, labels = stack(dataset)
        expected_images, expected_labels = written[train]
        assert images.shape == (len(expected_labels), 1, 28, 28)
        assert images.dtype == torch.float32
        assert labels == expected_labels.tolist()
        expected = torch.from_numpy(expected_images).float().unsqueeze(1) / 255
        torch.testing.assert_close(unnormalize(images, name), expected, atol=1e-5, rtol=0)


def test_mnist_resize(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", np.random.default_rng(2))
    dataset = load_dataset("MNIST", train=True, data_dir=tmp_path, download=False, image_size=32)
    assert dataset[0][0].shape == (1, 32, 32)


# --------------------------------------------------------------------------- CIFAR format


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def write_cifar10(root: Path, rng: np.random.Generator, with_test: bool = True) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {True: [], False: []}
    files = [(f"data_batch_{i}", True) for i in range(1, 6)]
    files += [("test_batch", False)] if with_test else []
    for file_name, train in files:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2).tolist()
        write_pickle(folder / file_name, {"data": data, "labels": labels})
        written[train].append((data, labels))
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return {
        train: (np.concatenate([d for d, _ in parts]), [lab for _, labs in parts for lab in labs])
        for train, parts in written.items()
        if parts
    }


def write_cifar100(root: Path, rng: np.random.Generator) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for file_name, train, n in (("train", True, 4), ("test", False, 3)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        coarse = [f // 5 for f in fine]
        write_pickle(
            folder / file_name, {"data": data, "fine_labels": fine, "coarse_labels": coarse}
        )
        written[train] = (data, fine)
    write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return written


def check_cifar(dataset, name: str, data: np.ndarray, labels: list[int]) -> None:
    images, got_labels = stack(dataset)
    assert got_labels == labels
    assert images.shape == (len(labels), 3, 32, 32) and images.dtype == torch.float32
    expected = torch.from_numpy(data).float().view(-1, 3, 32, 32) / 255
    torch.testing.assert_close(unnormalize(images, name), expected, atol=1e-5, rtol=0)


def test_torchvision_rejects_handmade_cifar(tmp_path: Path) -> None:
    """The reason for the fallback: torchvision checks MD5 sums of every CIFAR batch."""
    import torchvision

    write_cifar10(tmp_path, np.random.default_rng(3))
    with pytest.raises(RuntimeError, match="corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)


def test_cifar10_roundtrip_via_fallback(tmp_path: Path, monkeypatch) -> None:
    import torchvision

    written = write_cifar10(tmp_path, np.random.default_rng(4))

    def no_network(self) -> None:
        raise AssertionError("must not download when files are present")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    for train in (True, False):
        with pytest.warns(UserWarning, match="MD5"):
            dataset = load_dataset("cifar10", train=train, data_dir=tmp_path, download=True)
        check_cifar(dataset, "CIFAR10", *written[train])


def test_cifar100_roundtrip_and_resize(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path, np.random.default_rng(5))
    for train in (True, False):
        with pytest.warns(UserWarning, match="MD5"):
            dataset = load_dataset("CIFAR100", train=train, data_dir=tmp_path, download=False)
        check_cifar(dataset, "CIFAR100", *written[train])
    with pytest.warns(UserWarning):
        small = load_dataset("cifar100", train=False, data_dir=tmp_path, image_size=28)
    assert small[0][0].shape == (3, 28, 28)


def test_cifar10_partial_copy(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, np.random.default_rng(6), with_test=False)
    with pytest.warns(UserWarning):
        train = load_dataset("CIFAR10", train=True, data_dir=tmp_path, download=False)
    check_cifar(train, "CIFAR10", *written[True])
    with pytest.raises(DatasetUnavailableError, match="test_batch"):
        load_dataset("CIFAR10", train=False, data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("MNIST", ("MNIST", "raw")),
        ("FashionMNIST", ("FashionMNIST", "raw")),
        ("CIFAR10", ("cifar-10-batches-py",)),
        ("CIFAR100", ("cifar-100-python",)),
    ],
)
def test_missing_files_without_download(tmp_path: Path, name: str, folder: tuple) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, train=True, data_dir=tmp_path, download=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert name in message
    assert str(tmp_path.joinpath(*folder)) in message
    assert "digits" in message and "--download" in message and "download=True" in message
    assert not tmp_path.joinpath(*folder).exists()  # nothing made while finding out


def test_mnist_missing_single_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", np.random.default_rng(7))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetUnavailableError, match="t10k-labels-idx1-ubyte"):
        load_dataset("MNIST", train=True, data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("MNIST", RuntimeError("Error downloading train-images-idx3-ubyte.gz")),
        ("FashionMNIST", URLError("[Errno -2] Name or service not known")),
        ("CIFAR10", URLError("[Errno -3] Temporary failure in name resolution")),
        ("CIFAR100", OSError("Network is unreachable")),
    ],
)
def test_failed_download_is_reported(tmp_path: Path, monkeypatch, name: str, error) -> None:
    """Simulate an offline machine the way torchvision's downloads fail there."""
    import torchvision

    calls = []

    def failing_download(self) -> None:
        calls.append(self.root)
        raise error

    monkeypatch.setattr(getattr(torchvision.datasets, name), "download", failing_download)
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, train=False, data_dir=tmp_path / "d", download=True)
    assert calls == [str(tmp_path / "d")]
    assert info.value.__cause__ is error
    message = str(info.value)
    assert "download failed" in message and str(error) in message
    assert str(tmp_path / "d") in message and "digits" in message


# --------------------------------------------------------------------------- loaders


def first_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    train_loader, _, _ = make_loaders("digits", batch_size=16, seed=seed)
    return next(iter(train_loader))


def test_make_loaders_reproducible_order() -> None:
    x1, y1 = first_batch(seed=1)
    x2, y2 = first_batch(seed=1)
    x3, _ = first_batch(seed=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_make_loaders_contents() -> None:
    train_loader, test_loader, info = make_loaders("Digits", batch_size=100, seed=0, image_size=32)
    assert info == DatasetInfo("digits", (1, 32, 32), 10)
    assert train_loader.batch_size == 100
    x, y = next(iter(train_loader))
    assert x.shape == (100, 1, 32, 32) and y.dtype == torch.long
    # Test loader keeps dataset order; the train loader covers every sample exactly once.
    test_set = load_dataset("digits", train=False, image_size=32)
    torch.testing.assert_close(next(iter(test_loader))[1], test_set.tensors[1][:100])
    seen = torch.cat([batch_y for _, batch_y in train_loader])
    expected = load_dataset("digits", train=True, image_size=32).tensors[1]
    assert torch.equal(torch.sort(seen).values, torch.sort(expected).values)


def test_make_loaders_mnist_files(tmp_path: Path) -> None:
    written = write_mnist(tmp_path, "MNIST", np.random.default_rng(8))
    train_loader, test_loader, info = make_loaders(
        "mnist", batch_size=2, data_dir=tmp_path, download=False, seed=0
    )
    assert info == DatasetInfo("MNIST", (1, 28, 28), 10)
    labels = torch.cat([y for _, y in test_loader]).tolist()
    assert labels == written[False][1].tolist()
    assert sorted(torch.cat([y for _, y in train_loader]).tolist()) == sorted(written[True][1])


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10"])
def test_a_failed_download_leaves_nothing_behind(tmp_path: Path, monkeypatch, name: str) -> None:
    """torchvision's own download code runs and fails the way it does offline; the folders
    and partial files it made are removed, what was there stays."""
    import urllib.request

    attempts = []

    def offline(request, *args, **kwargs):
        attempts.append(getattr(request, "full_url", request))
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.txt").write_text("kept")
    with pytest.raises(DatasetUnavailableError, match="download failed"):
        load_dataset(name, train=True, data_dir=data, download=True)
    assert attempts  # torchvision did try the network
    assert sorted(p.name for p in data.rglob("*")) == ["mine.txt"]
    with pytest.raises(DatasetUnavailableError, match="download failed"):
        load_dataset(name, train=True, data_dir=tmp_path / "new", download=True)
    assert not (tmp_path / "new").exists()
