"""A real torchvision ResNet-50 (a few SGD steps on random 64x64 images, CPU), watched by
Ikkuna with the TensorBoard, MLflow and W&B (offline) backends at once: the run behind the
README's pictures of depth x step heatmaps and its MLflow and W&B sections.

    pip install '.[all]' ./plugins/ikkuna-* torchvision
    python examples/resnet50_backends.py runs/resnet50      # about a minute on 2 cores
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

import ikkuna_core

STEPS = 30


def main(log_dir: Path) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    config = {
        "plugins": ["norms", "histograms", "mlflow", "wandb"],
        "backends": ["tensorboard", "mlflow", "wandb"],
        "backend_options": {
            "mlflow": {"experiment": "resnet50", "run_name": "sgd-0.05"},
            "wandb": {"project": "resnet50", "mode": "offline", "watch_names": True},
        },
        "log_dir": str(log_dir),
        "subscribers": [
            {"name": "norm", "topics": ["weight_gradients"]},
            {"name": "ratio", "topics": ["weight_updates", "weights"]},
            {"name": "histogram", "topics": ["weight_gradients"], "bins": 32},
        ],
    }
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config)
    assert exporter.loss_fn is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = exporter.loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        print(f"step {step:2d}  loss {loss.item():.4f}", flush=True)
    modules = {key: info.type for key, info in exporter.modules.items()}
    exporter.close()
    # what ikkuna report reads for the model's order and the title
    (log_dir / "run.json").write_text(json.dumps({
        "hparams": {"model": "torchvision resnet50", "dataset": "random 3x64x64",
                    "optimizer": "SGD", "lr": 0.05, "batch_size": 8, "seed": 0},
        "steps": STEPS, "epochs": 1, "modules": modules,
    }, indent=1) + "\n")
    print(f"{len(modules)} watched modules; logs in {log_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/resnet50"))
