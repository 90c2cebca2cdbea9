"""Image classification datasets by name, and seeded data loaders.

``digits`` is scikit-learn's bundled 8x8 handwritten digits set, upscaled to 28x28; it needs
no files and works offline. ``MNIST``, ``FashionMNIST``, ``CIFAR10`` and ``CIFAR100`` come
from :mod:`torchvision.datasets` and are read from ``data_dir`` using torchvision's directory
layout; they are downloaded there only when asked (``download=True``, ``ikkuna train
--download``), and a failed download leaves no folder behind. Every dataset yields
``(image, label)`` pairs where the image is a normalised float32 ``C x H x W`` tensor and the
label an ``int``.

torchvision and scikit-learn are imported inside the functions that need them, so importing
this module stays cheap.

CIFAR checksums: torchvision verifies the MD5 of every CIFAR batch file (train *and* test)
before loading either split, so hand-made or partial copies in the right format are rejected
as "corrupted". When all files of the requested split are present but torchvision refuses
them, :func:`load_dataset` warns and reads the pickled batches directly instead (same format,
same pixel values and labels). MNIST-style datasets need no fallback: torchvision only checks
that the four uncompressed ``*-ubyte`` files exist.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._files import missing_folders

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetUnavailableError",
    "dataset_info",
    "load_dataset",
    "make_loaders",
]

DATASETS = ("digits", "MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")

_CHANNELS = {"digits": 1, "MNIST": 1, "FashionMNIST": 1, "CIFAR10": 3, "CIFAR100": 3}
_NATIVE_SIZE = {"digits": 28, "MNIST": 28, "FashionMNIST": 28, "CIFAR10": 32, "CIFAR100": 32}
_NUM_CLASSES = {"digits": 10, "MNIST": 10, "FashionMNIST": 10, "CIFAR10": 10, "CIFAR100": 100}

# Per-channel mean and standard deviation of the training sets (pixel values in [0, 1]).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8

# Files torchvision expects for the MNIST-style sets, under <data_dir>/<name>/raw/.
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# CIFAR layout: folder under data_dir, train files, test files, metadata file.
_CIFAR_LAYOUT = {
    "CIFAR10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
    ),
    "CIFAR100": ("cifar-100-python", ("train",), ("test",), "meta"),
}


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing and could not be downloaded."""


@dataclass(frozen=True)
class DatasetInfo:
    """Name (canonical spelling), per-sample input shape ``(C, H, W)`` and class count."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int


def _canonical(name: str) -> str:
    for known in DATASETS:
        if known.lower() == name.lower():
            return known
    raise ValueError(f"Unknown dataset {name!r}; available datasets: {', '.join(DATASETS)}")


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """Describe dataset ``name`` (case-insensitive) as :func:`load_dataset` would return it."""
    key = _canonical(name)
    size = image_size or _NATIVE_SIZE[key]
    return DatasetInfo(key, (_CHANNELS[key], size, size), _NUM_CLASSES[key])


def expected_location(name: str, data_dir: str | Path = "data") -> Path:
    """Directory in which torchvision looks for the files of dataset ``name``."""
    key = _canonical(name)
    if key in _CIFAR_LAYOUT:
        return Path(data_dir) / _CIFAR_LAYOUT[key][0]
    if key == "digits":
        raise ValueError("'digits' is bundled with scikit-learn and has no data directory")
    return Path(data_dir) / key / "raw"


def load_dataset(
    name: str,
    *,
    train: bool,
    data_dir: str | Path = "data",
    download: bool = False,
    image_size: int | None = None,
) -> Dataset:
    """Load the train or test split of dataset ``name`` (case-insensitive).

    ``image_size`` resizes images to ``image_size x image_size`` (bilinear); by default
    ``digits`` and the MNIST-style sets are 28x28 and CIFAR 32x32. Raises
    :class:`DatasetUnavailableError` when torchvision's files are missing and downloading is
    disabled or fails (a failed download removes the folders it created).
    """
    key = _canonical(name)
    if key == "digits":
        return _load_digits(train=train, image_size=image_size or 28)
    return _load_torchvision(
        key, train=train, data_dir=Path(data_dir), download=download, image_size=image_size
    )


def _load_digits(*, train: bool, image_size: int) -> TensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_train = int(len(labels) * DIGITS_TRAIN_FRACTION)
    train_idx = order[:n_train]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    idx = train_idx if train else order[n_train:]
    return TensorDataset((images[idx] - mean) / std, labels[idx])


def _transform(key: str, image_size: int | None, *, from_pil: bool) -> Callable[[Any], Any]:
    from torchvision import transforms

    steps: list[Callable[[Any], Any]] = [transforms.ToTensor()] if from_pil else []
    if image_size is not None and image_size != _NATIVE_SIZE[key]:
        steps.append(transforms.Resize((image_size, image_size), antialias=True))
    steps.append(transforms.Normalize(*NORMALIZATION[key]))
    return transforms.Compose(steps)


def _required_files(key: str, train: bool) -> list[str]:
    if key in _CIFAR_LAYOUT:
        _, train_files, test_files, _ = _CIFAR_LAYOUT[key]
        return list(train_files if train else test_files)
    return list(_MNIST_FILES)


def _unavailable(key: str, data_dir: Path, train: bool, reason: str) -> DatasetUnavailableError:
    location = expected_location(key, data_dir)
    files = ", ".join(_required_files(key, train))
    return DatasetUnavailableError(
        f"Dataset {key} is not available: {reason}. torchvision expects its files in "
        f"{location}{os.sep} ({files}). Download them (ikkuna train --download; in Python "
        f"download=True) while online, copy them there, or use `--dataset digits`, which "
        f"works offline."
    )


def _load_torchvision(
    key: str, *, train: bool, data_dir: Path, download: bool, image_size: int | None
) -> Dataset:
    from torchvision import datasets

    cls = getattr(datasets, key)
    transform = _transform(key, image_size, from_pil=True)
    location = expected_location(key, data_dir)
    present = all((location / f).is_file() for f in _required_files(key, train))
    if key not in _CIFAR_LAYOUT:  # torchvision still reads MNIST's legacy processed/*.pt cache
        legacy = location.parent / "processed"
        present = present or all((legacy / f).is_file() for f in ("training.pt", "test.pt"))

    if not present:
        if not download:
            raise _unavailable(key, data_dir, train, "its files are missing")
        before = set(data_dir.iterdir()) if data_dir.is_dir() else set()
        created = missing_folders(location)[::-1]  # outermost first
        try:
            return cls(root=str(data_dir), train=train, download=True, transform=transform)
        except (URLError, OSError, RuntimeError) as err:
            # Remove what this attempt made: its folders and partial archives.
            new = set(data_dir.iterdir()) - before if data_dir.is_dir() else set()
            for path in [*created, *new]:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise _unavailable(key, data_dir, train, f"download failed ({err})") from err

    # Files are present: never hit the network, let torchvision verify them.
    try:
        return cls(root=str(data_dir), train=train, download=False, transform=transform)
    except RuntimeError as err:
        if key not in _CIFAR_LAYOUT:
            raise _unavailable(key, data_dir, train, f"unreadable files ({err})") from err
        warnings.warn(
            f"torchvision rejected the {key} files in {location} ({err}): their MD5 checksums "
            "differ from the official release or the other split is missing. Reading the "
            "pickled batches directly instead.",
            stacklevel=3,
        )
    return _read_cifar_batches(key, location, train=train, image_size=image_size)


class _UInt8ImageDataset(Dataset):
    """``uint8`` images ``N x C x H x W`` scaled to [0, 1] and transformed on access."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[Any], Any]
    ) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32).div_(255.0)
        return self.transform(image), int(self.labels[index])


def _read_cifar_batches(
    key: str, location: Path, *, train: bool, image_size: int | None
) -> _UInt8ImageDataset:
    """Read CIFAR pickled batches (``data``: N x 3072 uint8 rows, ``labels``/``fine_labels``)."""
    import numpy as np

    arrays, labels = [], []
    for file_name in _required_files(key, train):
        with open(location / file_name, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        arrays.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    images = torch.from_numpy(np.concatenate(arrays).reshape(-1, 3, 32, 32))
    return _UInt8ImageDataset(
        images,
        torch.as_tensor(labels, dtype=torch.long),
        _transform(key, image_size, from_pil=False),
    )


def make_loaders(
    name: str,
    *,
    batch_size: int,
    data_dir: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Train and test loaders plus :class:`DatasetInfo` for dataset ``name``.

    The training loader shuffles with a ``torch.Generator`` seeded by ``seed``, so the order of
    batches is reproducible; the test loader keeps the dataset order.
    """
    info = dataset_info(name, image_size)
    kwargs: dict[str, Any] = {"data_dir": data_dir, "download": download, "image_size": image_size}
    train_set = load_dataset(info.name, train=True, **kwargs)
    test_set = load_dataset(info.name, train=False, **kwargs)
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )
    test_loader = DataLoader(
        test_set, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    return train_loader, test_loader, info
