"""Train ikkuna-train's MLP on scikit-learn's digits (SGD, lr 0.1, batch 64) with every
gradstats subscriber and print their values every 25 steps: the figures of the README.
Run: python plugins/ikkuna-gradstats/examples/digits.py"""

from __future__ import annotations

import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend
from ikkuna_train.data import load_dataset
from ikkuna_train.models import get_model

STEPS = 101
NAMES = ["norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping", "alpha"]

torch.manual_seed(0)
images, labels = load_dataset("digits", train=True).tensors  # type: ignore[attr-defined]
model = get_model("FullyConnected", input_shape=(1, 28, 28), num_classes=10)
exporter = ik.watch(model, nn.CrossEntropyLoss(), {
    "plugins": ["gradstats"], "backends": [], "on_error": "raise",
    "subscribers": [{"name": n} for n in [*NAMES, "distance"]],
})
memory = exporter.bus.add_backend(MemoryBackend())
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
order = torch.randperm(len(labels))
for step in range(STEPS):
    idx = order[(step * 64) % (len(labels) - 64):][:64]
    optimizer.zero_grad()
    exporter.loss_fn(model(images[idx]), labels[idx]).backward()
    optimizer.step()
exporter.close()
last = sorted(t for t in memory.tags() if t.startswith("distance/weights/"))[-1]
print("| step | " + " | ".join(f"`{n}`" for n in NAMES) + f" | `{last}` |")
print("|---:|" + "---:|" * (len(NAMES) + 1))
for step in range(0, STEPS - 1, 25):
    values = [memory.scalar(n, step) for n in [*NAMES, last]]
    print(f"| {step} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
