"""What does watching a model with Ikkuna cost? Times training steps of the same model, batch
and seed with and without Ikkuna, next to hand-written TensorBoard code and Cockpit doing
comparable work, and reports the median step time, its ratio to plain training measured in
the same run, and the peak memory of every variant.

    python benchmarks/overhead.py                      # 3c3d, ResNet-18 and the MLP (minutes)
    python benchmarks/overhead.py --problems mlp --quick
    python benchmarks/overhead.py --soak               # 2,000 MLP steps per backend: flat?
    python benchmarks/overhead.py --ops                # aten ops Ikkuna adds per step
    python benchmarks/overhead.py --device cuda --problems resnet50,resnet18   # on a GPU

Method (see benchmarks/README.md):

- every variant runs in its own worker process, so no variant's hooks, threads or memory
  touch another's, and each worker's peak memory is that variant's peak memory;
- the workers take turns: warm-up steps for each, then ``rounds`` rounds in which each variant
  runs ``steps`` consecutive steps (the order rotates every round), only one running at a time;
- a step is timed inside its worker: zero_grad, forward, loss, backward, optimizer step and the
  variant's own logging code (for Ikkuna, everything its hooks and backends do, including the
  TensorBoard write at the end of the step); on CUDA the device is synchronised around it;
- the step time of a variant is the median of its steps; a variant whose work repeats every
  ``period`` steps (``subsample=10``) gets the mean over the phases of the per-phase medians,
  so the one step in ten that does the work is counted, not discarded as an outlier;
- the ratio is that step time over plain training's, with a bootstrap 90% interval;
- every worker also counts the aten operators one step dispatches (``TorchDispatchMode``,
  outside the timed steps): the variant's count minus plain training's is the work Ikkuna (or
  the reference code) adds, a proxy for its kernel launches that does not depend on the
  machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
PROTOCOL = "@@BENCH "
SEED = 0


# --------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    name: str
    model: str  # an ikkuna_train.models name, or "torchvision:<name>"
    input_shape: tuple[int, int, int]
    batch_size: int
    data: str  # "random" (fixed random batches, no download) or "digits"
    warmup: int  # default warm-up steps per variant
    steps: int  # default consecutive steps per variant and round
    rounds: int  # default rounds
    num_classes: int = 10
    autocast: str | None = None  # e.g. "bfloat16": forward and loss under torch.autocast

    def describe(self) -> str:
        c, h, w = self.input_shape
        data = (
            f"random {c}x{h}x{w} batches" if self.data == "random"
            else "sklearn digits (28x28)"
        )
        amp = f", {self.autocast} autocast" if self.autocast else ""
        return f"{self.model}, batch {self.batch_size}, {data}{amp}"


PROBLEMS: dict[str, Problem] = {
    # Short turns (1-2 steps of ResNet/3c3d) so that a busy spell of a shared machine hits
    # every variant alike; steps x rounds >= 10 so that subsample=10 work is measured.
    "3c3d": Problem("3c3d", "3c3d", (3, 32, 32), 128, "random", warmup=2, steps=2, rounds=8),
    "resnet18": Problem(
        "resnet18", "ResNet18", (3, 32, 32), 32, "random", warmup=2, steps=1, rounds=12
    ),
    "mlp": Problem("mlp", "FullyConnected", (1, 28, 28), 128, "digits", 10, 10, 12),
    # The realistic GPU problem: ImageNet-sized ResNet-50 in bf16 autocast (minutes per step
    # on a CPU: run it with --device cuda).
    "resnet50": Problem(
        "resnet50", "torchvision:resnet50", (3, 224, 224), 64, "random", warmup=5, steps=4,
        rounds=8, num_classes=1000, autocast="bfloat16",
    ),
}
QUICK = {"warmup": 1, "steps": 2, "rounds": 1}

# --------------------------------------------------------------------------- variants
NORMS = {"name": "norm", "topics": ["weight_gradients", "weights", "weight_updates"]}
HISTOGRAMS = {"name": "histogram", "topics": ["activations", "weight_gradients"]}
ACCURACY = {"name": "train_accuracy"}
LOSS = {"name": "loss"}
ALL = [NORMS, HISTOGRAMS, ACCURACY, LOSS]
#: The default subscriber set of ``ikkuna train`` (examples/ikkuna.toml), with the held-out
#: set replaced by the benchmark's own batches.
QUICKSTART = [
    {"name": "loss"},
    {"name": "train_accuracy"},
    {"name": "test_accuracy", "subsample": 10},
    {"name": "norm", "topics": ["weight_gradients"]},
    {"name": "spectral_norm", "topics": ["weights"]},
    {"name": "ratio", "topics": ["weight_updates", "weights"]},
    {"name": "histogram", "topics": ["activations"]},
    {"name": "dead_fraction"},
]

#: Ikkuna's counterpart of Cockpit's "economy" configuration: Alpha, Distance, InnerTest,
#: NormTest, OrthoTest (gradstats), GradNorm and UpdateSize (norm), Loss (loss). Cockpit's
#: GradHist1d (a histogram of individual gradients) has no counterpart and is not run here.
GRADSTATS = [
    {"name": "alpha"},  # first: its projections share the others' pass over the layers
    {"name": "norm_test"},
    {"name": "inner_test"},
    {"name": "ortho_test"},
    {"name": "distance"},
    {"name": "norm", "topics": ["weight_gradients", "weight_updates"]},
    {"name": "loss"},
]
#: The panels ``wandb.watch(model, log="all")`` fills: a histogram of every parameter and of
#: its gradient (64 bins), published by the W&B backend under wandb.watch's names.
WANDB_WATCH = {
    "name": "histogram",
    "topics": ["weights", "biases", "weight_gradients", "bias_gradients"],
    "bins": 64,
}
WANDB_OPTIONS = {"mode": "offline", "project": "ikkuna-bench", "watch_names": True}

#: Ikkuna variants: (plugins to enable, subscriber entries, other keys of the configuration).
#: ``spikes`` in the health variants: its warm-up (20 steps by default) shortened so that the
#: steps counted and timed are its steady state, the spike check read by the host every
#: step; its threshold keeps the reports of a fresh model's first steps out of the
#: measurement
SPIKES = {"name": "spikes", "warmup": 1, "threshold": 1000.0}
IKKUNA_VARIANTS: dict[str, tuple[list[str], list[dict[str, Any]], dict[str, Any]]] = {
    "exporter": ([], [], {}),
    "norms": (["norms"], [NORMS], {}),
    "histograms": (["histograms"], [HISTOGRAMS], {}),
    "all": (["norms", "histograms", "accuracy"], ALL, {}),
    "all-sub10": (["norms", "histograms", "accuracy"], [{**s, "subsample": 10} for s in ALL], {}),
    "quickstart": (["norms", "histograms", "accuracy"], QUICKSTART, {}),
    "curvature": (["curvature"], [{"name": "hessian_max_eigenvalue", "subsample": 50}], {}),
    "gradstats": (["gradstats", "norms", "accuracy"], GRADSTATS, {}),
    "ikkuna-wandb": (
        ["histograms", "accuracy", "wandb"],
        [WANDB_WATCH, LOSS],
        {"backends": ["wandb"], "backend_options": {"wandb": WANDB_OPTIONS}},
    ),
    "health": (["health"], [{"name": "nonfinite"}, SPIKES], {}),
    # the part of 'health' that no module hook does: what a step would cost if the forward
    # and backward were checked only by replaying a step found non-finite
    "health-params": (["health"], [
        {"name": "nonfinite", "topics": ["input_data", "network_output", "loss",
                                         "weight_gradients", "bias_gradients", "weights",
                                         "biases"]}, SPIKES], {}),
    "all-budget": (["norms", "histograms", "accuracy"], ALL, {"budget": 0.02}),
    "all-compiled": (["norms", "histograms", "accuracy"], ALL, {"compile_metrics": True}),
    "quickstart-budget": (["norms", "histograms", "accuracy"], QUICKSTART, {"budget": 0.02}),
}


def ikkuna_config(
    variant: str, log_dir: Path, histogram_max_samples: int | None = None
) -> dict[str, Any]:
    """The run configuration (the ``[ikkuna]`` table) of an Ikkuna variant."""
    plugins, subscribers, extra = IKKUNA_VARIANTS[variant]
    if histogram_max_samples is not None:
        subscribers = [
            {**s, "max_samples": histogram_max_samples} if s["name"] == "histogram" else s
            for s in subscribers
        ]
    return {
        "plugins": plugins,
        "backends": ["tensorboard"],
        "log_dir": str(log_dir),
        "subscribers": subscribers,
        "on_error": "raise",
        **extra,
    }


VARIANTS: dict[str, str] = {
    "plain": "plain training: zero_grad, forward, loss, backward, SGD step",
    "plain-again": "plain again, in its own worker: an A/A control, its ratio is the noise floor",
    "exporter": "ikkuna watch() attached, no subscriber (TensorBoard backend open)",
    "norms": "ikkuna: norm (L2) of weight_gradients, weights, weight_updates -> TensorBoard",
    "histograms": "ikkuna: histogram (64 bins) of activations and weight_gradients -> TensorBoard",
    "all": "ikkuna: norms + histograms as above + train_accuracy + loss, every step",
    "all-sub10": "ikkuna: as 'all', subsample=10 on every subscriber",
    "quickstart": "ikkuna: the subscribers of `ikkuna train` (loss, accuracies, norm, "
    "spectral_norm, ratio, histogram, dead_fraction) -> TensorBoard",
    "fused": "hand-fused lower bound of 'all': foreach norms of every weight's gradient, value "
    "and update + all activation and weight-gradient histograms as one segmented computation "
    "(16,384-entry samples) + loss and accuracy, one host copy per step, nothing written",
    "all-budget": "ikkuna: as 'all', with budget = 0.02: Ikkuna chooses the cadences from the "
    "measured costs (the first decisions fall into the first steps)",
    "quickstart-budget": "ikkuna: as 'quickstart', with budget = 0.02",
    "all-compiled": "ikkuna: as 'all', with compile_metrics = true (histograms as one "
    "torch.compile-d graph; the first step compiles)",
    "curvature": "ikkuna: hessian_max_eigenvalue (Lanczos to its default tolerance, warm-"
    "started) every 50 steps; the first, cold evaluation falls into the warm-up",
    "health": "ikkuna-health: nonfinite (where a NaN/inf began) + spikes (loss, gradient and "
    "update norms), every step",
    "health-params": "ikkuna-health: as 'health', with nonfinite on the network and parameter "
    "topics only (no module hook): the floor of a step localised only when replayed",
    "detect-anomaly": "plain training under torch.autograd.set_detect_anomaly(True): the "
    "reference for finding where a NaN began",
    "tb-norms": "hand-written SummaryWriter: add_scalar of grad/weight/update norms per weight",
    "tb-all": "hand-written: tb-norms + add_histogram of weight grads and leaf activations"
    " + loss + train accuracy",
    "cockpit-norms": "Cockpit: GradNorm, UpdateSize, Distance every step",
    "cockpit-all": "Cockpit: GradNorm, UpdateSize, Distance, GradHist1d every step",
    "gradstats": "ikkuna: norm_test, inner_test, ortho_test, alpha, distance (gradstats) + "
    "norm of weight_gradients, weight_updates + loss, every step -> TensorBoard",
    "cockpit-economy": "Cockpit's economy configuration (Alpha, Distance, GradHist1d, "
    "GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize) on every parameter, every "
    "step",
    "wandb-watch": "W&B: wandb.watch(model, log='all', log_freq=1) + run.log(loss) every "
    "step, offline run",
    "ikkuna-wandb": "ikkuna: histograms of every parameter and gradient + loss -> the W&B "
    "backend (watch_names: wandb.watch's panels), offline run",
}
#: Run by default; the others only when named in --variants.
DEFAULT_VARIANTS = [v for v in VARIANTS
                    if v not in ("curvature", "wandb-watch", "ikkuna-wandb", "all-compiled",
                                 "health-params")]
#: A budget's cadences are subsample * 2**j: 64 phases hold every cadence up to 64 steps.
PERIOD = {"all-sub10": 10, "quickstart": 10, "curvature": 50, "all-budget": 64,
          "quickstart-budget": 64}

#: (ikkuna variant, reference variant) pairs doing comparable work.
COMPARISONS = [
    ("norms", "tb-norms"),
    ("all", "tb-all"),
    ("norms", "cockpit-norms"),
    ("all", "cockpit-all"),
    ("gradstats", "cockpit-economy"),
    ("ikkuna-wandb", "wandb-watch"),
]
#: (device type, problem or None for every problem, variant, largest ratio to plain).
TARGETS = [
    (None, None, "exporter", 1.01),
    ("cpu", "resnet18", "all", 1.05),
    ("cpu", "resnet18", "all-sub10", 1.01),
    ("cuda", "resnet50", "all", 1.25),
    ("cuda", "resnet50", "norms", 1.03),
    ("cuda", "resnet50", "all-sub10", 1.03),
    ("cuda", "resnet18", "all", 1.5),
    ("cpu", "resnet18", "health", 1.03),
    (None, "resnet18", "curvature", 1.05),  # amortised over its 50-step period
]
#: Ikkuna's own aten ops per step (variant minus plain), CIFAR ResNet-18 batch 8 on the CPU.
OP_TARGETS = {"exporter": 0, "norms": 100, "all": 200, "health": 40}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- data, model
def make_batches(
    problem: Problem, device: torch.device, count: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed batches, identical in every worker (seeded)."""
    gen = torch.Generator().manual_seed(SEED)
    if problem.data == "digits":
        from ikkuna_train.data import load_dataset

        dataset = load_dataset("digits", train=True)
        images, labels = dataset.tensors  # type: ignore[attr-defined]
        order = torch.randperm(len(labels), generator=gen)
        n = len(labels) // problem.batch_size
        chunks = order[: n * problem.batch_size].reshape(n, problem.batch_size)
        batches = [(images[idx], labels[idx]) for idx in chunks]
    else:
        shape = (problem.batch_size, *problem.input_shape)
        batches = [
            (
                torch.randn(shape, generator=gen),
                torch.randint(0, problem.num_classes, (problem.batch_size,), generator=gen),
            )
            for _ in range(count)
        ]
    return [(x.to(device), y.to(device)) for x, y in batches]


def make_model(problem: Problem, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    if problem.model.startswith("torchvision:"):
        import torchvision

        factory = getattr(torchvision.models, problem.model.split(":", 1)[1])
        model = factory(num_classes=problem.num_classes)
    else:
        from ikkuna_train.models import get_model

        model = get_model(
            problem.model, input_shape=problem.input_shape, num_classes=problem.num_classes
        )
    return model.to(device).train()


def weight_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters Ikkuna's weight topics cover (every non-bias parameter here)."""
    return [(n, p) for n, p in model.named_parameters() if not n.endswith("bias")]


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _import_cockpit() -> Any:
    """Import cockpit; cockpit-for-pytorch 1.0.2 imports ``pkg_resources``, which setuptools
    >= 81 no longer ships, for its ``__version__`` only: stand in for it if it is missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import importlib.metadata as md

        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = md.PackageNotFoundError  # type: ignore[attr-defined]
        shim.get_distribution = md.distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    import cockpit

    return cockpit


class _OpCounter:
    """Counts the aten operators dispatched while it is active (a ``TorchDispatchMode``),
    and the bytes of the tensors the ones that are not views take as arguments (what they
    read: a deterministic measure of memory traffic)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                counter.count += 1
                if not func.is_view:
                    counter.bytes += sum(t.numel() * t.element_size()
                                         for t in tree_leaves((args, kwargs))
                                         if isinstance(t, torch.Tensor))
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.bytes = 0
        self._mode = Mode()

    def __enter__(self) -> _OpCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


class _Fused:
    """The hand-fused lower bound of the 'all' variant, in plain torch: norms of every
    weight's gradient, value and update with ``torch._foreach_norm``; histograms (64 bins) of
    every leaf's activation (a 16,384-entry sample taken in a forward hook) and every weight's
    gradient (likewise sampled) as one segmented computation with one scatter; loss and
    accuracy; everything copied to the host once per step. Nothing is written."""

    K = 16384
    BINS = 64

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for _, p in weight_parameters(model)]
        self.before = [torch.empty_like(p) for p in self.params]
        self.samples: list[torch.Tensor] = []
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}
        for _, module in leaf_modules(model):
            module.register_forward_hook(self._hook)

    def _sample(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.numel(), t.device)
        idx = self._index.get(key)
        if idx is None:
            n = t.numel()
            idx = self._index[key] = (
                torch.randperm(n)[: self.K].sort().values if n > self.K else torch.arange(n)
            ).to(t.device)
        return torch.take(t, idx)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and module.training:
            with torch.no_grad():
                self.samples.append(self._sample(output))

    @torch.no_grad()
    def before_step(self) -> None:
        torch._foreach_copy_(self.before, self.params)

    @torch.no_grad()
    def after_step(self, output: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        grads = [p.grad for p in self.params]
        updates = torch._foreach_sub(self.params, self.before)
        norms = torch.stack(
            [torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
             for ts in (grads, self.params, updates)]
        ).reshape(-1)
        samples = self.samples + [self._sample(g) for g in grads]
        self.samples = []
        lengths = torch.tensor([t.numel() for t in samples], device=norms.device)
        flat = torch.cat(samples).float()
        seg = torch.repeat_interleave(torch.arange(len(samples), device=flat.device), lengths)
        lo = torch.segment_reduce(flat, "min", lengths=lengths)
        hi = torch.segment_reduce(flat, "max", lengths=lengths)
        scale = self.BINS / (hi - lo).clamp_min(1e-12)
        bins = ((flat - lo[seg]) * scale[seg]).long().clamp_(0, self.BINS - 1)
        counts = torch.zeros(len(samples) * self.BINS, device=flat.device)
        counts.index_add_(0, seg * self.BINS + bins, torch.ones_like(flat))
        accuracy = (output.argmax(1) == y).float().mean()
        packed = torch.cat([norms, lo, hi, counts, loss.detach().float().reshape(1),
                            accuracy.reshape(1)])
        packed.cpu()


class SkipVariant(Exception):
    """The variant cannot run here (a plugin or Cockpit missing, a model BackPACK refuses)."""


# ------------------------------------------------------------------------ one variant
class Runner:
    """One variant of one problem: builds everything, then times one training step at a time."""

    def __init__(
        self,
        problem: Problem,
        variant: str,
        device: torch.device,
        log_dir: Path,
        *,
        histogram_max_samples: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        self.problem = problem
        self.variant = variant
        self.device = device
        self.log_dir = log_dir
        self.histogram_max_samples = histogram_max_samples
        self.bytes_read = 0  # by the ops of the step count_ops counted
        self.batches = make_batches(problem, device)
        self.model = make_model(problem, device)
        self.loss_fn: nn.Module = nn.CrossEntropyLoss()
        self.exporter: Any = None
        self.writer: Any = None
        self.cockpit: Any = None
        self.wandb_run: Any = None
        self.step_index = 0
        self._closers: list[Callable[[], None]] = []
        self._activations: dict[str, torch.Tensor] = {}
        self._fused: _Fused | None = None
        if variant in IKKUNA_VARIANTS:
            self._setup_ikkuna()
        elif variant.startswith("tb-"):
            self._setup_tensorboard()
        elif variant.startswith("cockpit-"):
            self._setup_cockpit()
        elif variant == "wandb-watch":
            self._setup_wandb_watch()
        elif variant == "fused":
            self._fused = _Fused(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self._step: Callable[[torch.Tensor, torch.Tensor], None] = {
            "tb": self._step_tensorboard,
            "cockpit": self._step_cockpit,
            "fused": self._step_fused,
            "wandb": self._step_wandb,
            "detect": self._step_detect_anomaly,
        }.get(variant.split("-")[0], self._step_plain)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.problem.autocast is None:
            return contextlib.nullcontext()
        dtype = getattr(torch, self.problem.autocast)
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ set-up
    def _setup_ikkuna(self) -> None:
        from ikkuna_core import PluginError, watch

        if self.variant == "gradstats" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        ):  # gradstats refuses them, with that message
            raise SkipVariant("per-sample gradients are not defined with BatchNorm in training")
        os.environ.setdefault("WANDB_SILENT", "true")
        config = ikkuna_config(self.variant, self.log_dir, self.histogram_max_samples)
        config["subscribers"] = [  # test accuracy on two of the benchmark's own batches
            {**s, "loader": self.batches[:2]} if s["name"] == "test_accuracy" else s
            for s in config["subscribers"]
        ]
        try:
            self.exporter = watch(self.model, self.loss_fn, config)
        except PluginError as exc:
            raise SkipVariant(f"plugin missing: {exc}") from None
        self._closers.append(self.exporter.close)

    def _setup_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._closers.append(self.writer.close)
        if self.variant == "tb-all":
            # The usual way to get activations: forward hooks that keep each leaf's output.
            for name, module in leaf_modules(self.model):
                module.register_forward_hook(self._keep_activation(name))

    def _keep_activation(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._activations[name] = output.detach()

        return hook

    def _setup_wandb_watch(self) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise SkipVariant(f"wandb is not installed: {exc}") from None
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(mode="offline", project="ikkuna-bench", dir=str(self.log_dir))
        wandb.watch(self.model, log="all", log_freq=1)
        self._closers.append(self.wandb_run.finish)

    def _setup_cockpit(self) -> None:
        try:
            cockpit = _import_cockpit()
            from backpack import extend
            from cockpit import quantities
            from cockpit.utils.schedules import linear
        except ImportError as exc:
            raise SkipVariant(f"cockpit-for-pytorch is not installed: {exc}") from None
        # BackPACK's module hooks reject in-place ops on module outputs: use out-of-place ReLU
        # in Cockpit's copy of the model (same function, one more activation buffer each).
        for module in self.model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.model = extend(self.model)
        self.loss_fn = extend(self.loss_fn)
        every = linear(1)
        if self.variant == "cockpit-economy":
            from cockpit.utils.configuration import configuration

            self._individual_loss = nn.CrossEntropyLoss(reduction="none")
            self.cockpit = cockpit.Cockpit(
                list(self.model.parameters()), quantities=configuration("economy", every)
            )
            return
        chosen = [
            quantities.GradNorm(every),
            quantities.UpdateSize(every),
            quantities.Distance(every),
        ]
        if self.variant == "cockpit-all":
            chosen.append(quantities.GradHist1d(every))
        params = [p for _, p in weight_parameters(self.model)]
        self.cockpit = cockpit.Cockpit(params, quantities=chosen)

    # ------------------------------------------------------------------ steps
    def _step_plain(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # Ikkuna variants run exactly this: the hooks do the rest.
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()

    def _step_detect_anomaly(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # the step of _step_plain, forward and backward under autograd's anomaly mode (a
        # context, so that it never leaks into another variant counted in this process)
        with torch.autograd.set_detect_anomaly(True):
            self._step_plain(x, y)

    def _step_fused(self, x: torch.Tensor, y: torch.Tensor) -> None:
        fused = self._fused
        assert fused is not None
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.model(x)
            loss = self.loss_fn(output, y)
        loss.backward()
        fused.before_step()
        self.optimizer.step()
        fused.after_step(output, y, loss)

    def _step_tensorboard(self, x: torch.Tensor, y: torch.Tensor) -> None:
        writer, step = self.writer, self.step_index
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.model(x)
            loss = self.loss_fn(output, y)
        loss.backward()
        params = weight_parameters(self.model)
        before = [p.detach().clone() for _, p in params]
        self.optimizer.step()
        with torch.no_grad():
            for (name, p), old in zip(params, before, strict=True):
                writer.add_scalar(f"grad_norm/{name}", p.grad.norm().item(), step)
                writer.add_scalar(f"weight_norm/{name}", p.norm().item(), step)
                writer.add_scalar(f"update_norm/{name}", (p - old).norm().item(), step)
                if self.variant == "tb-all":
                    writer.add_histogram(f"grad/{name}", p.grad, step)
            if self.variant == "tb-all":
                for name, act in self._activations.items():
                    writer.add_histogram(f"activation/{name}", act, step)
                self._activations.clear()
                writer.add_scalar("loss", loss.item(), step)
                accuracy = (output.argmax(dim=1) == y).float().mean().item()
                writer.add_scalar("train_accuracy", accuracy, step)

    def _step_wandb(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(self.model(x), y)
        loss.backward()  # wandb.watch's hooks take the gradients' histograms here
        self.optimizer.step()
        # what a W&B user writes; it also sends the histograms wandb.watch has gathered
        self.wandb_run.log({"loss": loss.item()}, step=self.step_index)

    def _step_cockpit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self.step_index
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.model(x)
            loss = self.loss_fn(output, y)
        info = {"batch_size": x.shape[0], "loss": loss, "optimizer": self.optimizer}
        if self.variant == "cockpit-economy":  # Alpha needs the per-sample losses
            info["individual_losses"] = self._individual_loss(output, y)
        with self.cockpit(step, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(step))
        self.optimizer.step()

    def step(self) -> tuple[float, float]:
        """Run one training step; its wall time and the CPU time of this process (all
        threads) in seconds."""
        x, y = self.batches[self.step_index % len(self.batches)]
        _sync(self.device)
        cpu = time.process_time()
        start = time.perf_counter()
        self._step(x, y)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        self.step_index += 1
        return elapsed, cpu

    def count_ops(self) -> int:
        """aten operators one training step dispatches (forward, backward, the variant's own
        work); not timed. The bytes they read: ``self.bytes_read``."""
        with _OpCounter() as counter:
            self.step()
        self.bytes_read = counter.bytes
        return counter.count

    def run(self, n: int) -> dict[str, list[Any]]:
        steps, times, cpu_times = [], [], []
        for _ in range(n):
            steps.append(self.step_index)
            wall, cpu = self.step()
            times.append(wall)
            cpu_times.append(cpu)
        return {"steps": steps, "times": times, "cpu_times": cpu_times}

    # ---------------------------------------------------------------- memory, close
    def memory(self) -> dict[str, Any]:
        params = list(self.model.parameters())
        out: dict[str, Any] = {
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": current_rss_bytes(),
            "param_bytes": tensor_bytes(params),
            "weight_param_bytes": tensor_bytes(p for _, p in weight_parameters(self.model)),
        }
        if self.exporter is not None:
            out["snapshot_bytes"] = tensor_bytes(self.exporter.snapshots)
        if self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best we have
        return peak_rss_bytes()


# ------------------------------------------------------------------------ worker side
def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(payload) + "\n")
    sys.stdout.flush()


def worker_main(spec: dict[str, Any]) -> None:
    """A worker process: build one variant, then obey ``run``/``memory``/``close`` commands
    read line by line from stdin; answers are ``@@BENCH``-prefixed JSON lines on stdout."""
    os.environ.pop("IKKUNA_PLUGINS", None)  # the benchmark enables exactly the plugins it needs
    device = torch.device(spec["device"])
    problem = PROBLEMS[spec["problem"]]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    start = time.perf_counter()
    try:
        runner = Runner(
            problem,
            spec["variant"],
            device,
            Path(spec["log_dir"]),
            histogram_max_samples=spec.get("histogram_max_samples"),
        )
    except SkipVariant as exc:
        _reply({"status": "skipped", "reason": str(exc)})
        return
    except Exception as exc:
        _reply({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
        raise
    _reply(
        {
            "status": "ready",
            "setup_s": time.perf_counter() - start,
            "ready_rss_bytes": current_rss_bytes(),
            "hooks": None if runner.exporter is None else runner.exporter.hook_count,
            "torch_threads": torch.get_num_threads(),
        }
    )
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "run":
                _reply({"status": "ok", **runner.run(int(command["n"]))})
            elif command["cmd"] == "memory":
                _reply({"status": "ok", **runner.memory()})
            elif command["cmd"] == "ops":
                step = runner.step_index
                _reply({"status": "ok", "ops": runner.count_ops(), "ops_step": step})
            elif command["cmd"] == "close":
                runner.close()
                _reply({"status": "ok"})
                return
        except Exception as exc:
            _reply({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})
            raise


# ------------------------------------------------------------------------ parent side
class Worker:
    """The parent's handle on one worker process."""

    def __init__(
        self,
        problem: str,
        variant: str,
        work_dir: Path,
        python: str,
        options: dict[str, Any],
        replica: int = 0,
    ) -> None:
        self.variant = variant
        self.replica = replica
        self.status = "starting"
        self.reason = ""
        self.info: dict[str, Any] = {}
        self.stderr_path = work_dir / f"{problem}-{variant}-{replica}.stderr"
        spec = {
            "problem": problem,
            "variant": variant,
            "log_dir": str(work_dir / f"{problem}-{variant}-{replica}"),
            **options,
        }
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])  # type: ignore[no-any-return]
        self.proc.wait()
        raise RuntimeError(
            f"worker {self.variant!r} exited ({self.proc.returncode}): {self.stderr_tail()}"
        )

    def stderr_tail(self, lines: int = 6) -> str:
        self._stderr.flush()
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def wait_ready(self) -> None:
        try:
            answer = self._read()
        except RuntimeError as exc:
            self.status, self.reason = "error", str(exc)
            return
        self.status = answer.pop("status")
        if self.status == "ready":
            self.info = answer
        else:
            self.reason = answer.get("reason", "")
            if self.status == "error":
                self.reason += " | " + self.stderr_tail()
            self.proc.wait()

    def ask(self, **command: Any) -> dict[str, Any]:
        if self.status != "ready":
            raise RuntimeError(f"worker {self.variant!r} is {self.status}")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
            answer = self._read()
        except (RuntimeError, OSError) as exc:
            self.status, self.reason = "error", str(exc)
            raise RuntimeError(self.reason) from None
        if answer.get("status") == "error":
            self.status = "error"
            self.reason = answer.get("reason", "") + " | " + self.stderr_tail()
            raise RuntimeError(self.reason)
        return answer

    def finish(self) -> None:
        with contextlib.suppress(RuntimeError):
            if self.status == "ready":
                self.ask(cmd="close")
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def run_problem(
    problem: Problem,
    variants: Sequence[str],
    *,
    warmup: int,
    steps: int,
    rounds: int,
    work_dir: Path,
    options: dict[str, Any],
    replicas: int = 1,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Time every variant of ``problem``, interleaved; the raw per-step results.
    ``options`` go to every worker: ``device``, ``threads``, ``histogram_max_samples``.
    With ``replicas`` > 1 each variant runs in that many worker processes, each taking its
    own turns, and their steps are pooled."""
    n = len(variants) * replicas
    log(f"[{problem.name}] starting {n} workers ({problem.describe()})")
    started = time.perf_counter()
    workers = [
        Worker(problem.name, v, work_dir, python, options, k)
        for k in range(replicas)
        for v in variants
    ]
    try:
        for w in workers:
            w.wait_ready()
            if w.status != "ready":
                log(f"[{problem.name}] {w.variant}: {w.status}: {w.reason}")
        live = [w for w in workers if w.status == "ready"]
        samples: dict[str, dict[str, list[Any]]] = {
            w.variant: {"steps": [], "times": [], "cpu_times": [], "rounds": [], "replicas": []}
            for w in live
        }
        loadavg: list[float] = []
        log(f"[{problem.name}] warm-up: {warmup} step(s) per variant, then one counted step")
        ops: dict[str, dict[str, Any]] = {}
        for w in live:
            with contextlib.suppress(RuntimeError):
                w.ask(cmd="run", n=warmup)
                ops.setdefault(w.variant, w.ask(cmd="ops"))
        for r in range(rounds):
            # A new order every round: no variant always runs after the same one (a heavy
            # neighbour leaves cold caches and a fragmented page cache behind).
            order = random.Random(SEED + r).sample(live, len(live))
            for w in order:
                if w.status != "ready":
                    continue
                try:
                    answer = w.ask(cmd="run", n=steps)
                except RuntimeError as exc:
                    log(f"[{problem.name}] {w.variant} failed: {exc}")
                    continue
                got = samples[w.variant]
                got["steps"] += answer["steps"]
                got["times"] += answer["times"]
                got["cpu_times"] += answer["cpu_times"]
                got["rounds"] += [r] * len(answer["times"])
                got["replicas"] += [w.replica] * len(answer["times"])
            plain = samples.get("plain", {}).get("times", [])
            note = f", plain median {statistics.median(plain) * 1e3:.1f} ms" if plain else ""
            if hasattr(os, "getloadavg"):
                loadavg.append(os.getloadavg()[0])
                note += f", load {loadavg[-1]:.1f}"
            log(f"[{problem.name}] round {r + 1}/{rounds} done{note}")
        memory: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for w in live:
            with contextlib.suppress(RuntimeError):
                memory[w.variant].append(w.ask(cmd="memory"))
    finally:
        for w in workers:
            w.finish()
    results: dict[str, Any] = {"_loadavg_per_round": loadavg}
    for variant in variants:
        group = [w for w in workers if w.variant == variant]
        bad = [w for w in group if w.status != "ready"]
        entry: dict[str, Any] = {"status": bad[0].status if bad else "ok"}
        if bad:
            entry["reason"] = bad[0].reason
        if variant in ops:
            entry["ops"] = ops[variant]["ops"]
            entry["ops_step"] = ops[variant]["ops_step"]
        if variant in samples:
            entry.update(samples[variant])
            mems = memory.get(variant, [])
            if mems:
                entry.update(mems[0])
                # the largest peak of the variant's processes
                for key in ("peak_rss_bytes", "cuda_peak_allocated_bytes"):
                    if key in mems[0]:
                        entry[key] = max(m[key] for m in mems)
                        entry[f"{key}_replicas"] = [m[key] for m in mems]
            info = group[0].info
            entry["ready_rss_bytes"] = info.get("ready_rss_bytes")
            entry["setup_s"] = info.get("setup_s")
            entry["hooks"] = info.get("hooks")
            entry["torch_threads"] = info.get("torch_threads")
            entry["log_files"] = sum(
                1 for _ in work_dir.glob(f"{problem.name}-{variant}-*/**/events.*")
            )
        results[variant] = entry
    log(f"[{problem.name}] done in {time.perf_counter() - started:.0f} s")
    return results


# -------------------------------------------------------------------------- statistics
def _phase_groups(times: Sequence[float], steps: Sequence[int], period: int) -> list[np.ndarray]:
    groups: dict[int, list[float]] = defaultdict(list)
    for t, s in zip(times, steps, strict=True):
        groups[s % period].append(t)
    return [np.asarray(groups[k]) for k in sorted(groups)]


def step_time(groups: Sequence[np.ndarray]) -> float:
    """Mean over phases of the per-phase median (the plain median when period is 1)."""
    return float(np.mean([np.median(g) for g in groups]))


def bootstrap_ratio(
    num: Sequence[np.ndarray], den: Sequence[np.ndarray], n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """90% bootstrap interval of step_time(num) / step_time(den), resampling steps."""
    rng = np.random.default_rng(seed)

    def resample(groups: Sequence[np.ndarray]) -> np.ndarray:
        meds = [np.median(rng.choice(g, size=(n, len(g))), axis=1) for g in groups]
        return np.mean(meds, axis=0)

    ratios = resample(num) / resample(den)
    lo, hi = np.percentile(ratios, [5, 95])
    return float(lo), float(hi)


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Add step times, ratios to plain (with intervals) and memory deltas to raw results."""
    out: dict[str, Any] = {}
    plain = raw.get("plain", {})
    plain_groups = _phase_groups(plain["times"], plain["steps"], 1) if plain.get("times") else None
    plain_time = step_time(plain_groups) if plain_groups else None
    plain_cpu = (
        step_time(_phase_groups(plain["cpu_times"], plain["steps"], 1))
        if plain.get("cpu_times")
        else None
    )
    for variant, entry in raw.items():
        if variant.startswith("_"):
            continue
        entry = dict(entry)
        if "ops" in entry and "ops" in plain:
            entry["ops_added"] = entry["ops"] - plain["ops"]
        times = entry.get("times") or []
        if entry.get("status") == "ok" and times:
            period = PERIOD.get(variant, 1)
            groups = _phase_groups(times, entry["steps"], period)
            t = step_time(groups)
            arr = np.asarray(times)
            q1, q3 = np.percentile(arr, [25, 75])
            entry.update(
                period=period,
                phases_measured=len(groups),
                n_steps=len(times),
                step_ms=t * 1e3,
                median_ms=float(np.median(arr)) * 1e3,
                mean_ms=float(arr.mean()) * 1e3,
                iqr_rel=float((q3 - q1) / np.median(arr)),
            )
            if len(set(entry.get("replicas", []))) > 1:
                by_replica: dict[int, list[float]] = defaultdict(list)
                for k, one in zip(entry["replicas"], times, strict=True):
                    by_replica[k].append(one)
                entry["replica_median_ms"] = [
                    float(np.median(v)) * 1e3 for _, v in sorted(by_replica.items())
                ]
            if plain_time and plain_groups:
                entry["ratio"] = t / plain_time
                entry["ratio_ci90"] = list(bootstrap_ratio(groups, plain_groups))
            if entry.get("cpu_times"):
                cpu = step_time(_phase_groups(entry["cpu_times"], entry["steps"], period))
                entry["cpu_step_ms"] = cpu * 1e3
                if plain_cpu:
                    entry["cpu_ratio"] = cpu / plain_cpu
            if "peak_rss_bytes" in entry and "peak_rss_bytes" in plain:
                entry["peak_rss_delta_bytes"] = entry["peak_rss_bytes"] - plain["peak_rss_bytes"]
            if "cuda_peak_allocated_bytes" in entry and "cuda_peak_allocated_bytes" in plain:
                entry["cuda_peak_delta_bytes"] = (
                    entry["cuda_peak_allocated_bytes"] - plain["cuda_peak_allocated_bytes"]
                )
        out[variant] = entry
    return out


def comparisons(problems: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, result in problems.items():
        variants = result["variants"]
        for ours, ref in COMPARISONS:
            a, b = variants.get(ours, {}), variants.get(ref, {})
            if "step_ms" in a and "step_ms" in b:
                rows.append(
                    {
                        "problem": name,
                        "ikkuna": ours,
                        "reference": ref,
                        "ikkuna_ms": a["step_ms"],
                        "reference_ms": b["step_ms"],
                        "ikkuna_over_reference": a["step_ms"] / b["step_ms"],
                        "faster": a["step_ms"] < b["step_ms"],
                    }
                )
    return rows


def check_targets(problems: dict[str, Any], device: str = "cpu") -> list[dict[str, Any]]:
    rows = []
    kind = torch.device(device).type
    for name, result in problems.items():
        for on, where, variant, limit in TARGETS:
            if where not in (None, name) or on not in (None, kind):
                continue
            entry = result["variants"].get(variant, {})
            if "ratio" not in entry:
                continue
            lo, hi = entry["ratio_ci90"]
            verdict = "met" if hi <= limit else "missed" if lo > limit else "inconclusive"
            rows.append(
                {
                    "problem": name,
                    "variant": variant,
                    "target": limit,
                    "ratio": entry["ratio"],
                    "ratio_ci90": [lo, hi],
                    "verdict": verdict,
                }
            )
    for row in comparisons(problems):
        rows.append(
            {
                "problem": row["problem"],
                "variant": f"{row['ikkuna']} vs {row['reference']}",
                "target": 1.0,
                "ratio": row["ikkuna_over_reference"],
                "verdict": "met" if row["faster"] else "missed",
            }
        )
    return rows


# --------------------------------------------------------------------------- reporting
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def markdown(result: dict[str, Any]) -> str:
    cuda = result["machine"]["device"].startswith("cuda")
    head = ("| problem | variant | ms/step | ratio to plain (90% CI) | aten ops added |"
            " peak RSS MB (delta) |")
    rule = "|---|---|---:|---|---:|---:|"
    if not cuda:
        head += " CPU-time ratio |"
        rule += "---:|"
    if cuda:
        head += " CUDA peak MB (delta) |"
        rule += "---:|"
    lines = [head, rule]
    for name, problem in result["problems"].items():
        for variant, e in problem["variants"].items():
            if "step_ms" not in e:
                reason = e.get("reason", e.get("status", ""))
                lines.append(f"| {name} | {variant} | {e.get('status')}: {reason[:90]} | | | |")
                continue
            ratio = f"{e['ratio']:.3f} ({e['ratio_ci90'][0]:.3f}-{e['ratio_ci90'][1]:.3f})"
            ms = f"{e['step_ms']:.2f}" if e["step_ms"] < 10 else f"{e['step_ms']:.1f}"
            delta = e.get("peak_rss_delta_bytes")
            rss = _mb(e.get("peak_rss_bytes"))
            if delta is not None and variant != "plain":
                rss += f" ({delta / 2**20:+.0f})"
            added = "-" if e.get("ops_added") is None else e["ops_added"]
            row = f"| {name} | {variant} | {ms} | {ratio} | {added} | {rss} |"
            if not cuda:
                row += f" {e['cpu_ratio']:.3f} |" if "cpu_ratio" in e else " - |"
            if cuda:
                cdelta = e.get("cuda_peak_delta_bytes")
                cell = _mb(e.get("cuda_peak_allocated_bytes"))
                if cdelta is not None and variant != "plain":
                    cell += f" ({cdelta / 2**20:+.0f})"
                row += f" {cell} |"
            lines.append(row)
    out = ["\n".join(lines)]
    if result.get("comparisons"):
        out.append(
            "| problem | ikkuna | reference | ikkuna ms | reference ms | ikkuna/reference |\n"
            "|---|---|---|---:|---:|---:|\n"
            + "\n".join(
                f"| {c['problem']} | {c['ikkuna']} | {c['reference']} | {c['ikkuna_ms']:.2f} "
                f"| {c['reference_ms']:.2f} | {c['ikkuna_over_reference']:.3f} |"
                for c in result["comparisons"]
            )
        )
    if result.get("targets"):
        out.append(
            "| target | problem | ratio | limit | verdict |\n|---|---|---:|---:|---|\n"
            + "\n".join(
                f"| {t['variant']} | {t['problem']} | {t['ratio']:.3f} | {t['target']} "
                f"| {t['verdict']} |"
                for t in result["targets"]
            )
        )
    return "\n\n".join(out)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    versions = {}
    for dist in (
        "ikkuna-core",
        "ikkuna-norms",
        "ikkuna-histograms",
        "ikkuna-accuracy",
        "cockpit-for-pytorch",
        "backpack-for-pytorch",
        "tensorboard",
    ):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001 - not installed
            versions[dist] = None
    info["packages"] = versions
    info["git"] = _git_state()
    return info


def _git_state() -> dict[str, Any] | None:
    """The commit of the checkout the benchmark ran from, and whether it had local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def machine_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else ''}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out(device: torch.device, suffix: str = "") -> Path:
    return RESULTS_DIR / f"{machine_slug(device)}-{dt.date.today().isoformat()}{suffix}.json"


# --------------------------------------------------------------------------------- soak
SOAK_BACKENDS = ("tensorboard", "matplotlib")
SOAK_VARIANTS = ("all", "everything")


def soak(
    steps: int = 2000,
    every: int = 100,
    device: torch.device | None = None,
    backend: str = "tensorboard",
    variant: str = "all",
) -> dict[str, Any]:
    """Train the MLP on digits for ``steps`` steps with the three plugins every step
    (``variant = "all"``) or the *everything* configuration (every subscriber of every
    installed plugin on every topic it accepts: :func:`ikkuna_core.testing.everything`),
    writing to ``backend`` alone (its default options: matplotlib redraws every 500 steps),
    and sample memory every ``every`` steps: RSS, live tensors (gc), CUDA allocation."""
    from ikkuna_core import PluginError, RunContext, watch
    from ikkuna_core.testing import everything

    os.environ.pop("IKKUNA_PLUGINS", None)
    device = device or torch.device("cpu")
    problem = PROBLEMS["mlp"]
    work = Path(tempfile.mkdtemp(prefix="ikkuna-soak-"))
    try:
        # plain training with the `all` configuration attached, but to `backend`
        runner = Runner(problem, "plain", device, work / backend)
        config = {**ikkuna_config("all", runner.log_dir), "backends": [backend]}
        subscribers: list[dict[str, Any]] = ALL
        if variant == "everything":
            x, y = runner.batches[0]
            context = RunContext(test_loader=runner.batches[:2], train_loader=runner.batches)
            subscribers = everything(runner.model, x, y, context=context)
            config = {**config, "plugins": None, "subscribers": subscribers,
                      "on_error": "warn"}  # NaN variances of one value warn, nothing fails
        elif variant != "all":
            raise ValueError(f"soak variant {variant!r}: choose from {', '.join(SOAK_VARIANTS)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                runner.exporter = watch(runner.model, runner.loss_fn, config,
                                        context=context if variant == "everything" else None)
        except PluginError as exc:
            raise SkipVariant(f"plugin missing: {exc}") from None
        runner._closers.append(runner.exporter.close)
        samples = []

        def sample() -> None:
            gc.collect()
            with warnings.catch_warnings():  # isinstance() wakes deprecated lazy attributes
                warnings.simplefilter("ignore")
                tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
            row = {
                "step": runner.step_index,
                "rss_bytes": current_rss_bytes(),
                "peak_rss_bytes": peak_rss_bytes(),
                "live_tensors": tensors,
            }
            if device.type == "cuda":
                row["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
            samples.append(row)

        times = []
        sample()
        for i in range(steps):
            times.append(runner.step()[0])
            if (i + 1) % every == 0 or i + 1 == steps:
                sample()
                log(
                    f"[soak {backend}] step {i + 1}/{steps}: "
                    f"rss {samples[-1]['rss_bytes'] / 2**20:.1f} MB"
                    f", {samples[-1]['live_tensors']} live tensors"
                )
        memory = runner.memory()
        runner.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Slope after a warm-up tenth (allocator pools, TensorBoard queues fill first).
    tail = [s for s in samples if s["step"] >= steps // 10] or samples

    def slope(key: str) -> float | None:
        pts = [(s["step"], s[key]) for s in tail if key in s]
        if len(pts) < 2:
            return None
        x, y = np.asarray(pts, dtype=float).T
        return float(np.polyfit(x, y, 1)[0] * 1000)  # per 1,000 steps

    rss_slope = slope("rss_bytes")
    return {
        "problem": problem.describe(),
        "variant": variant,
        "backend": backend,
        "subscribers": subscribers,
        "steps": steps,
        "sample_every": every,
        "median_step_ms": float(np.median(times)) * 1e3,
        "samples": samples,
        "slope_rss_bytes_per_1000_steps": rss_slope,
        "slope_rss_mib_per_1000_steps": None if rss_slope is None else rss_slope / 2**20,
        "slope_live_tensors_per_1000_steps": slope("live_tensors"),
        "slope_cuda_allocated_bytes_per_1000_steps": slope("cuda_allocated_bytes"),
        "slope_from_step": tail[0]["step"],
        "snapshot_bytes": memory.get("snapshot_bytes"),
        "param_bytes": memory["param_bytes"],
        "weight_param_bytes": memory["weight_param_bytes"],
        "snapshot_over_params": (memory.get("snapshot_bytes") or 0) / memory["param_bytes"],
    }


def soak_markdown(s: dict[str, Any]) -> str:
    lines = [
        "| step | RSS MB | live tensors |"
        + (" CUDA alloc MB |" if "cuda_allocated_bytes" in s["samples"][0] else "")
    ]
    lines.append(
        "|---:|---:|---:|" + ("---:|" if "cuda_allocated_bytes" in s["samples"][0] else "")
    )
    for row in s["samples"]:
        line = f"| {row['step']} | {row['rss_bytes'] / 2**20:.1f} | {row['live_tensors']} |"
        if "cuda_allocated_bytes" in row:
            line += f" {row['cuda_allocated_bytes'] / 2**20:.2f} |"
        lines.append(line)
    rss = s["slope_rss_bytes_per_1000_steps"]
    lines.append("")
    lines.append(
        f"slope from step {s['slope_from_step']}: RSS {rss / 2**10:+.1f} KiB/1000 steps, "
        f"live tensors {s['slope_live_tensors_per_1000_steps']:+.2f}/1000 steps"
        + (
            f", CUDA allocated {s['slope_cuda_allocated_bytes_per_1000_steps'] / 2**10:+.1f}"
            " KiB/1000 steps"
            if s.get("slope_cuda_allocated_bytes_per_1000_steps") is not None
            else ""
        )
    )
    lines.append(
        f"parameter snapshot: {s['snapshot_bytes']} bytes = {s['snapshot_over_params']:.3f} x "
        f"the parameters ({s['param_bytes']} bytes; weights only: {s['weight_param_bytes']})"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ op counts
def count_ops(
    problem: str = "resnet18",
    variants: Sequence[str] = ("exporter", "norms", "all"),
    batch_size: int | None = 8,
    device: str = "cpu",
    warmup: int = 2,
) -> dict[str, Any]:
    """aten operators one training step dispatches, per variant, counted in this process
    after ``warmup`` steps; ``added`` is the variant's count minus plain training's: the
    operators Ikkuna (or the reference code) dispatches. Deterministic on any machine."""
    import dataclasses

    os.environ.pop("IKKUNA_PLUGINS", None)
    spec = PROBLEMS[problem]
    if batch_size is not None:
        spec = dataclasses.replace(spec, batch_size=batch_size)
    counts: dict[str, int] = {}
    read: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ikkuna-ops-") as tmp:
        for variant in ("plain", *variants):
            runner = Runner(spec, variant, torch.device(device), Path(tmp) / variant)
            try:
                runner.run(warmup)
                counts[variant] = runner.count_ops()
                read[variant] = runner.bytes_read
            finally:
                runner.close()
    plain = counts["plain"]
    return {
        "problem": spec.describe(),
        "device": device,
        "plain": plain,
        "plain_mb_read": read["plain"] / 1e6,
        "added": {v: counts[v] - plain for v in variants},
        "mb_read_added": {v: (read[v] - read["plain"]) / 1e6 for v in variants},
        "targets": {v: OP_TARGETS[v] for v in variants if v in OP_TARGETS},
    }


def ops_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"aten ops per step, {result['problem']} on {result['device']}: plain training "
        f"dispatches {result['plain']}, reading {result['plain_mb_read']:.1f} MB",
        "",
        "| variant | ops added | target | verdict | MB read added |",
        "|---|---:|---:|---|---:|",
    ]
    for variant, added in result["added"].items():
        target = result["targets"].get(variant)
        verdict = "-" if target is None else "met" if added <= target else "missed"
        lines.append(f"| {variant} | {added} | {'-' if target is None else target} | {verdict} "
                     f"| {result['mb_read_added'][variant]:+.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Step-time and memory overhead of Ikkuna against plain training, "
        "hand-written TensorBoard code and Cockpit.",
    )
    parser.add_argument(
        "--problems",
        default="3c3d,resnet18,mlp",
        help=f"comma-separated, from {', '.join(PROBLEMS)}",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated, from " + ", ".join(VARIANTS) + " (default: all but curvature, "
        "whose evaluation every 50 steps needs --steps x --rounds >= 50 to be timed)",
    )
    parser.add_argument("--steps", type=int, help="consecutive steps per variant and round")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved variants")
    parser.add_argument("--warmup", type=int, help="warm-up steps per variant (not timed)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="worker processes per variant, pooled (averages out per-process bias)",
    )
    parser.add_argument(
        "--histogram-max-samples",
        type=int,
        help="max_samples option of the histogram subscribers (default: the plugin's default)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK} unless given explicitly"
    )
    parser.add_argument(
        "--soak",
        action="store_true",
        help="instead: memory over --soak-steps MLP steps with the three plugins, once per "
        "backend in --soak-backends",
    )
    parser.add_argument(
        "--ops",
        action="store_true",
        help="instead: count the aten ops each variant adds to a training step (CIFAR "
        "ResNet-18, batch 8, unless --problems/--batch-size say otherwise)",
    )
    parser.add_argument("--batch-size", type=int, help="with --ops: the batch size (default 8)")
    parser.add_argument(
        "--soak-variant",
        default="all",
        choices=SOAK_VARIANTS,
        help="with --soak: the three plugins (all), or every subscriber of every installed "
        "plugin on every topic it accepts (everything)",
    )
    parser.add_argument("--soak-steps", type=int, default=2000)
    parser.add_argument("--soak-every", type=int, default=100)
    parser.add_argument(
        "--soak-backends",
        default=",".join(SOAK_BACKENDS),
        help=f"comma-separated, from {', '.join(SOAK_BACKENDS)} (default: both)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _pick(name: str, value: int | None, problem: Problem, quick: bool) -> int:
    if value is not None:
        return value
    return QUICK[name] if quick else getattr(problem, name)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.ops:
        chosen = [v for v in args.variants.split(",") if v and v != "plain"]
        if args.variants == ",".join(DEFAULT_VARIANTS):
            chosen = ["exporter", "norms", "histograms", "all", "all-sub10", "quickstart", "fused",
                      "health", "detect-anomaly"]
        name = args.problems.split(",")[0] if args.problems != "3c3d,resnet18,mlp" else "resnet18"
        ops = count_ops(name, chosen, args.batch_size or 8, args.device)
        result = {
            "machine": machine_info(device),
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/overhead.py", *sys.argv[1:]]),
            "ops": ops,
        }
        out = args.out or default_out(device, "-ops")
        _write(out, result)
        print(ops_markdown(ops))
        log(f"wrote {out}")
        return result
    if args.soak:
        backends = [b.strip() for b in args.soak_backends.split(",") if b.strip()]
        unknown = sorted(set(backends) - set(SOAK_BACKENDS))
        if unknown or not backends:
            raise SystemExit(f"--soak-backends: choose from {', '.join(SOAK_BACKENDS)}")
        result = {
            "machine": machine_info(device),
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/overhead.py", *sys.argv[1:]]),
            "soak": {
                b: soak(args.soak_steps, args.soak_every, device, b, args.soak_variant)
                for b in backends
            },
        }
        out = args.out or default_out(device, "-soak")
        _write(out, result)
        for backend, one in result["soak"].items():
            print(f"### {backend}\n\n{soak_markdown(one)}\n")
        for backend, one in result["soak"].items():
            print(
                f"{backend}: RSS {one['slope_rss_mib_per_1000_steps']:+.2f} MiB per 1,000 steps "
                f"(from step {one['slope_from_step']} of {one['steps']}, median step "
                f"{one['median_step_ms']:.1f} ms)"
            )
        log(f"wrote {out}")
        return result

    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for p in problems:
        if p not in PROBLEMS:
            raise SystemExit(f"unknown problem {p!r}; known: {', '.join(PROBLEMS)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if "plain" not in variants:
        variants.insert(0, "plain")
    result: dict[str, Any] = {
        "machine": machine_info(device),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/overhead.py", *sys.argv[1:]])
        if argv is None
        else " ".join(["python", "benchmarks/overhead.py", *argv]),
        "variants": {v: VARIANTS[v] for v in variants},
        "problems": {},
    }
    options = {
        "device": args.device,
        "threads": args.threads,
        "histogram_max_samples": args.histogram_max_samples,
    }
    result["options"] = {**options, "replicas": args.replicas}
    started = time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(prefix="ikkuna-bench-"))
    try:
        for name in problems:
            problem = PROBLEMS[name]
            settings = {
                k: _pick(k, getattr(args, k), problem, args.quick)
                for k in ("warmup", "steps", "rounds")
            }
            raw = run_problem(
                problem,
                variants,
                work_dir=work_dir,
                options=options,
                replicas=args.replicas,
                **settings,
            )
            summary = summarise(raw)
            plain = summary.get("plain", {})
            result["problems"][name] = {
                "description": problem.describe(),
                "model": problem.model,
                "batch_size": problem.batch_size,
                "input_shape": list(problem.input_shape),
                "data": problem.data,
                **settings,
                "param_bytes": plain.get("param_bytes"),
                "noise": {
                    "plain_iqr_over_median": plain.get("iqr_rel"),
                    "plain_round_medians_ms": _round_medians(plain),
                    "loadavg_per_round": raw.get("_loadavg_per_round"),
                },
                "variants": summary,
            }
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["duration_s"] = time.perf_counter() - started
    result["comparisons"] = comparisons(result["problems"])
    result["targets"] = check_targets(result["problems"], args.device)
    out = args.out or default_out(device)
    _write(out, result)
    print(markdown(result))
    log(f"wrote {out} ({result['duration_s']:.0f} s)")
    return result


def _round_medians(entry: dict[str, Any]) -> list[float]:
    by_round: dict[int, list[float]] = defaultdict(list)
    for r, t in zip(entry.get("rounds", []), entry.get("times", []), strict=True):
        by_round[r].append(t)
    return [float(np.median(v)) * 1e3 for _, v in sorted(by_round.items())]


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
