"""Ikkuna around an existing PyTorch training loop: five lines, marked ``# ikkuna (n/5)``.

    python examples/plain_pytorch.py [--epochs 3] [--log-dir runs/plain]
    tensorboard --logdir runs/plain

The loop below is ordinary PyTorch (a small MLP on scikit-learn's bundled digits, offline,
loaded with ikkuna-train's data helpers). What Ikkuna watches comes from
``examples/ikkuna.toml``; the subscribers that need held-out data get this script's own test
loader through a ``RunContext``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import ikkuna_core  # ikkuna (1/5)
from ikkuna_train.data import make_loaders

CONFIG = Path(__file__).with_name("ikkuna.toml")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--log-dir", default="runs/plain")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train_loader, test_loader, info = make_loaders("digits", batch_size=64, seed=0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, info.num_classes)
    )
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    # Your run configuration with this script's log directory, and what the run provides.
    config = ikkuna_core.load_config(CONFIG).model_dump()
    config["log_dir"] = args.log_dir
    context = ikkuna_core.RunContext(test_loader=test_loader)

    exporter = ikkuna_core.watch(model, loss_fn, config, context=context)  # ikkuna (2/5)
    loss_fn = exporter.loss_fn  # ikkuna (3/5): the watched loss (the same module here)

    step = 0
    for _epoch in range(args.epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        exporter.epoch_finished()  # ikkuna (4/5)
        if args.max_steps is not None and step >= args.max_steps:
            break
    exporter.close()  # ikkuna (5/5): flush and close the backends, remove the hooks

    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    accuracy = correct / len(test_loader.dataset)  # type: ignore[arg-type]
    print(
        f"test accuracy {accuracy:.4f}; logs in {args.log_dir}: tensorboard --logdir {args.log_dir}"
    )
    return accuracy


if __name__ == "__main__":
    main()
