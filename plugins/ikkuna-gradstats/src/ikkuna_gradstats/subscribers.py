"""Cockpit's gradient statistics as Ikkuna subscribers (definitions, normalisation and the step
each value belongs to as in cockpit-for-pytorch 1.0.2; ``g_n`` is sample n's gradient of a
mean-reduced batch loss, ``G = Σ_n g_n``, ``B`` the batch size, sums over every covered
parameter)."""

from __future__ import annotations

import copy
import weakref
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

import ikkuna_core as ik
from ikkuna_core import unwrap_model
from ikkuna_core.ops import Histograms

from .persample import (
    SUPPORTED,
    Directions,
    Layer,
    StepStats,
    per_sample_chunks,
    prepare_layer,
    projections,
    unsupported_reason,
)

__all__ = [
    "Alpha",
    "Distance",
    "EarlyStopping",
    "GradHist2d",
    "InnerTest",
    "MeanGSNR",
    "NormTest",
    "OrthoTest",
]

_PER_SAMPLE = ("inputs", "layer_gradients")


class PerSampleOptions(ik.SubscriberOptions):
    reduction: Literal["auto", "mean", "sum"] = Field(
        default="auto",
        description="the loss's reduction over the batch: 'auto' reads it from the loss "
        "module the Exporter watches (set_loss), and takes 'mean' for a plain function",
    )


class GSNROptions(PerSampleOptions):
    epsilon: float = Field(default=1e-5, gt=0, description="added to the variance, as Cockpit")


def _base(key: str | None) -> str:
    return (key or "").split("#", 1)[0]


class _Coverage:
    """Which watched modules' per-sample gradients are computed, checked once per model: a
    parameter that would be left out is an error naming it, never a partial statistic."""

    def __init__(self, exporter: ik.Exporter) -> None:
        model = exporter.model
        if model is None:
            raise RuntimeError("gradstats: the Exporter watches no model")
        inner = unwrap_model(model)
        self.modules: dict[str, nn.Module] = {}
        owner: dict[int, str] = {}
        problems: list[str] = []
        for name in exporter.modules:
            module = inner if name == "model" else inner.get_submodule(name)
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            reason = unsupported_reason(module)
            if reason is not None:
                problems.append(f"{name!r}: {reason}")
                continue
            if list(module.children()):
                problems.append(f"{name!r}: not a leaf module")
                continue
            for p in params:
                if id(p) in owner:
                    problems.append(f"{name!r}: its parameter is shared with {owner[id(p)]!r}")
                owner[id(p)] = name
            self.modules[name] = module
        if exporter.include is None:  # every parameter of the model must be covered
            for pname, p in inner.named_parameters():
                if p.requires_grad and id(p) not in owner and not any(
                    pname.startswith(f"{m}.") for m in exporter.modules
                ):
                    problems.append(f"parameter {pname!r}: in no watched module")
        for name, module in inner.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                problems.append(
                    f"{name or 'model'!r}: {type(module).__name__} in training mode couples the "
                    "samples of a batch, so per-sample gradients are not defined"
                )
                break
        if problems:
            raise ValueError(
                "gradstats: per-sample gradients cannot be computed for " + "; ".join(problems)
                + ". Supported: Linear, Conv2d (groups=1), transformers' Conv1D, LayerNorm, "
                "(B, ...) inputs; restrict the Exporter to them (include=[...]) to compute the "
                "statistics over their parameters only"
            )


class _Engine:
    """The step's per-sample statistics, computed once for all gradstats subscribers of a
    bus: the first that runs computes what any due one needs (and, when it is ``alpha``,
    its projections in the same pass); the prepared layers (unfolded inputs) are kept until
    the step's last gradstats subscriber has run."""

    def __init__(self) -> None:
        self.coverage: _Coverage | None = None
        self.step = -1
        self.stats: StepStats | None = None
        self.with_sgs = False
        self._layers: list[Layer] | None = None
        self._remaining = 0

    def layers(self, sub: _PerSample, step: ik.StepBundle) -> list[Layer]:
        """The step's prepared layers; counts ``sub`` as served."""
        if self.step != step.global_step:
            due = [s.subscriber for s in sub.bus.active(step.global_step)]
            self._remaining = sum(isinstance(s, _PerSample) for s in due)
            self._layers, self.stats, self.step = None, None, step.global_step
            self.with_sgs = any(isinstance(s, _PerSample) and s.needs_sgs for s in due)
        layers = self._layers
        if layers is None:
            layers = self._layers = self._prepare(sub, step)
        self._remaining -= 1
        if self._remaining <= 0:
            self._layers = None  # the caller holds them while it runs
        return layers

    def _prepare(self, sub: _PerSample, step: ik.StepBundle) -> list[Layer]:
        exporter = sub.exporter
        if self.coverage is None:
            self.coverage = _Coverage(exporter)
        modules = self.coverage.modules
        if getattr(exporter, "_forwards", 1) > 1:
            raise ValueError(
                "gradstats: this step accumulated gradients over several forwards; the "
                "per-sample statistics would be of the first micro-batch only. Use one "
                "forward per optimizer step at the steps gradstats runs (subsample)"
            )
        if "inputs" not in step.topics or "layer_gradients" not in step.topics:
            raise ValueError("gradstats: the step carries no inputs or layer_gradients")
        inputs: dict[str, list[torch.Tensor]] = {}
        grads: dict[str, list[torch.Tensor]] = {}
        for topic, found in (("inputs", inputs), ("layer_gradients", grads)):
            payloads = step[topic]
            for key, data in zip(payloads.keys, payloads.data, strict=True):
                name = _base(key)
                if name in modules and data is not None:
                    found.setdefault(name, []).append(data)
        layers = []
        scale = _scale(exporter, sub.options.reduction)  # type: ignore[attr-defined]
        for name, xs in inputs.items():
            ds = grads.get(name)
            if ds is None or len(ds) != len(xs):
                raise ValueError(
                    f"gradstats: module {name!r} has {len(xs)} inputs but "
                    f"{0 if ds is None else len(ds)} layer gradients in step "
                    f"{step.global_step}: every call's output must take part in the loss"
                )
            layers.append(prepare_layer(name, modules[name], xs, ds, scale))
        if not layers:
            raise ValueError("gradstats: no covered module ran in this step")
        return layers

    def step_stats(
        self, sub: _PerSample, step: ik.StepBundle, directions: tuple[Directions, ...] = ()
    ) -> tuple[StepStats, list[torch.Tensor]]:
        """The step's statistics, and the projections on ``directions``."""
        layers = self.layers(sub, step)
        stats = self.stats
        if stats is not None:
            return stats, [projections(layers, found) for found in directions]
        stats = self.stats = StepStats(layers, need_sgs=self.with_sgs, directions=directions)
        return stats, stats.proj


_ENGINES: weakref.WeakKeyDictionary[Any, _Engine] = weakref.WeakKeyDictionary()


def _engine(sub: ik.Subscriber) -> _Engine:
    found = _ENGINES.get(sub.bus)
    if found is None:
        found = _ENGINES[sub.bus] = _Engine()
    return found


def _scale(exporter: ik.Exporter, reduction: str) -> float | None:
    """1.0 for a mean-reduced loss, None (divide by the batch size) for a sum-reduced one."""
    if reduction == "auto":
        loss = exporter.loss_fn
        reduction = getattr(loss, "reduction", "mean") if isinstance(loss, nn.Module) else "mean"
    if reduction == "mean":
        return 1.0
    if reduction == "sum":
        return None
    raise ValueError(
        f"gradstats: the watched loss has reduction={reduction!r}; per-sample statistics need "
        "'mean' or 'sum' (set the subscriber's reduction option to say which)"
    )


def _flat_sum(tensors: list[torch.Tensor], fn: Any) -> tuple[torch.Tensor, int]:
    """Σ over all entries of ``fn`` applied to each tensor, and the number of entries."""
    total = torch.stack([fn(t).sum() for t in tensors]).sum()
    return total, sum(t.numel() for t in tensors)


class _PerSample(ik.Subscriber):
    """One network value per step from the per-sample gradients of every covered layer."""

    Options = PerSampleOptions
    default_topics = _PER_SAMPLE
    output_kind = "network"
    needs_sgs = False

    def wants_module(self, module: ik.ModuleInfo) -> bool:
        return module.type in SUPPORTED  # the others' inputs and gradients are not kept

    def output_topic(self, suffix: str | None = None) -> str:
        base = self.options.publish_as or self.name
        return f"{base}/{suffix}" if suffix else base

    def compute_step(self, step: ik.StepBundle) -> None:
        stats, _ = _engine(self).step_stats(self, step)
        value = self.value(stats)
        self.publish_scalars(step, value.reshape(1), keys=[None])

    def value(self, stats: StepStats) -> torch.Tensor:
        raise NotImplementedError


def _grad_l2(stats: StepStats) -> torch.Tensor:
    return torch.stack([g.square().sum() for g in stats.grads.values()]).sum()


class NormTest(_PerSample):
    """Byrd et al.'s norm test: the largest θ for which it passes,
    ``sqrt(Var₁ / B / |G|²)``, ``Var₁ = (B² Σ_n |g_n|² - B |G|²) / (B - 1)``."""

    name = "norm_test"

    def value(self, stats: StepStats) -> torch.Tensor:
        b = stats.batch
        grad_l2 = _grad_l2(stats)
        var_l1 = (b**2 * stats.l2.sum() - b * grad_l2) / (b - 1)
        return (var_l1 / b / grad_l2).sqrt()


class InnerTest(_PerSample):
    """Bollapragada et al.'s inner-product test: ``sqrt(Var / B / |G|⁴)`` with the sample
    variance of the projections ``B <g_n, G>``."""

    name = "inner_test"

    def value(self, stats: StepStats) -> torch.Tensor:
        b = stats.batch
        grad_l2 = _grad_l2(stats)
        proj = b * stats.dot
        var = (proj.square().sum() - b * grad_l2.square()) / (b - 1)
        return (var / b / grad_l2.square()).sqrt()


class OrthoTest(_PerSample):
    """Bollapragada et al.'s orthogonality test: the largest nu for which it passes."""

    name = "ortho_test"

    def value(self, stats: StepStats) -> torch.Tensor:
        b = stats.batch
        grad_l2 = _grad_l2(stats)
        proj = b * stats.dot
        var = (b**2 * stats.l2.sum() - (proj.square() / grad_l2).sum()) / (b - 1)
        return (var / b / grad_l2).sqrt()


class MeanGSNR(_PerSample):
    """Gradient signal-to-noise ratio per parameter entry, ``G² / (B Σ_n g_n² - G² + ε)``,
    averaged over all entries."""

    name = "mean_gsnr"
    Options = GSNROptions
    needs_sgs = True

    def value(self, stats: StepStats) -> torch.Tensor:
        b, eps = stats.batch, self.options.epsilon  # type: ignore[attr-defined]
        keys = list(stats.grads)
        total, count = _flat_sum(
            [stats.grads[k].square() / (b * stats.sgs[k] - stats.grads[k].square() + eps)
             for k in keys], lambda t: t)
        return total / count


class EarlyStopping(_PerSample):
    """Mahsereci et al.'s evidence-based criterion, ``1 - B · mean(G² / (Var + ε))`` with the
    per-entry variance ``(B² Σ_n g_n² - B G²) / (B - 1)``; positive: stop. Defined (and in
    Cockpit only allowed) for SGD without momentum."""

    name = "early_stopping"
    Options = GSNROptions
    needs_sgs = True

    def value(self, stats: StepStats) -> torch.Tensor:
        b, eps = stats.batch, self.options.epsilon  # type: ignore[attr-defined]
        parts = []
        for k, g in stats.grads.items():
            var = (b**2 * stats.sgs[k] - b * g.square()) / (b - 1)
            parts.append(g.square() / (var + eps))
        total, count = _flat_sum(parts, lambda t: t)
        return 1 - b * total / count


def _before_update(step: ik.StepBundle, values: str, updates: str) -> dict[str, torch.Tensor]:
    """Per key, the parameter before the step's update (``values`` - ``updates``): what
    Cockpit reads after the backward, before ``optimizer.step()``."""
    if values not in step.topics or updates not in step.topics:
        return {}
    upd = dict(zip(step[updates].keys, step[updates].data, strict=True))
    out = {}
    for key, value in zip(step[values].keys, step[values].data, strict=True):
        u = upd.get(key)
        if value is not None and u is not None and key is not None:
            out[key] = value - u
    return out


class Distance(ik.Subscriber):
    """L2 distance of each parameter from its value at the first step, read before the
    step's update (as Cockpit reads it); one value per module and topic (``distance/weights``,
    ``distance/biases``)."""

    name = "distance"
    default_topics = ("weights", "weight_updates", "biases", "bias_updates")

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._initial: dict[tuple[str, str], torch.Tensor] = {}

    def output_topics(self) -> list[str]:
        return [self._topic_for(t) for t in ("weights", "biases") if t in self.options.topics]

    def compute_step(self, step: ik.StepBundle) -> None:
        for values, updates in (("weights", "weight_updates"), ("biases", "bias_updates")):
            before = _before_update(step, values, updates)
            if not before:
                continue
            keys = list(before)
            for key in keys:
                if (values, key) not in self._initial:
                    self._initial[(values, key)] = before[key].clone()
            diffs = [before[k] - self._initial[(values, k)] for k in keys]
            self.publish_scalars(step, ik.ops.norms(diffs), keys=keys, topic=values)


class Hist2dOptions(PerSampleOptions):
    bins: tuple[int, int] = Field(default=(40, 50), description="(gradient, parameter) bins")
    range: tuple[tuple[float, float], tuple[float, float]] = Field(
        default=((-1.0, 1.0), (-2.0, 2.0)),
        description="((gradient low, high), (parameter low, high)); values outside are "
        "clamped into the edge bins, as Cockpit does",
    )


class GradHist2d(_PerSample):
    """Joint histogram of individual gradient entries (``B g_n``, all samples and entries)
    and the parameter's value before the update, as Cockpit's ``GradHist2d``: the 2-d counts
    (gradient bins x parameter bins) are :attr:`last`; published as one gradient histogram
    per parameter bin (key ``param[lo,hi)``). It needs every per-sample gradient entry,
    formed a chunk of samples at a time."""

    name = "grad_hist_2d"
    Options = Hist2dOptions
    default_topics = (*_PER_SAMPLE, "weights", "weight_updates", "biases", "bias_updates")

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def compute_step(self, step: ik.StepBundle) -> None:
        opts: Any = self.options
        layers = _engine(self).layers(self, step)
        params = {("weight", k): v for k, v in _before_update(step, "weights",
                                                              "weight_updates").items()}
        params.update({("bias", k): v for k, v in _before_update(step, "biases",
                                                                  "bias_updates").items()})
        (xlo, xhi), (ylo, yhi) = opts.range
        xbins, ybins = opts.bins
        xw, yw = (xhi - xlo) / xbins, (yhi - ylo) / ybins
        n = xbins * ybins
        counts = gsum = gsq = lo = hi = None
        for layer in layers:
            b = layer.batch
            for pname in ("weight", "bias"):
                if pname == "bias" and not layer.has_bias:
                    continue
                value = params.get((pname, layer.name))
                if value is None:
                    raise ValueError(
                        f"grad_hist_2d: no {pname} value or update of {layer.name!r} at step "
                        f"{step.global_step} (is it in the optimizer?)"
                    )
                pidx = ((value.clamp(ylo + yw / 2, yhi - yw / 2) - ylo) / yw).long()
                for g in per_sample_chunks(layer, pname):
                    g = (b * g).reshape(g.shape[0], -1)
                    gidx = ((g.clamp(xlo + xw / 2, xhi - xw / 2) - xlo) / xw).long()
                    idx = (ybins * gidx + pidx.reshape(1, -1)).reshape(-1)
                    c = torch.bincount(idx, minlength=n)
                    s = torch.zeros(n, dtype=torch.float64, device=g.device)
                    s.index_add_(0, idx, g.reshape(-1).double())
                    q = torch.zeros(n, dtype=torch.float64, device=g.device)
                    q.index_add_(0, idx, g.reshape(-1).double().square())
                    # the smallest and largest (clamped) gradient in each parameter bin
                    prow = pidx.reshape(1, -1).expand_as(g).reshape(-1)
                    flat = g.clamp(xlo, xhi).reshape(-1).double()
                    mn = torch.full((ybins,), xhi, dtype=torch.float64, device=g.device)
                    mx = torch.full((ybins,), xlo, dtype=torch.float64, device=g.device)
                    mn.scatter_reduce_(0, prow, flat, "amin")
                    mx.scatter_reduce_(0, prow, flat, "amax")
                    counts = c if counts is None else counts + c
                    gsum = s if gsum is None else gsum + s
                    gsq = q if gsq is None else gsq + q
                    lo = mn if lo is None else torch.minimum(lo, mn)
                    hi = mx if hi is None else torch.maximum(hi, mx)
        assert counts is not None and gsum is not None and gsq is not None
        assert lo is not None and hi is not None
        hist = counts.reshape(xbins, ybins)
        gedges = torch.linspace(xlo, xhi, xbins + 1, dtype=torch.float64, device=counts.device)
        pedges = torch.linspace(ylo, yhi, ybins + 1, dtype=torch.float64)
        self.last = (hist, gedges, pedges.to(counts.device))
        rows = hist.t()  # (parameter bins, gradient bins)
        num = rows.sum(1)
        zero = torch.zeros(ybins, dtype=torch.float64, device=counts.device)
        empty = num == 0
        hists = Histograms(
            counts=rows, edges=gedges.repeat(ybins, 1),
            min=torch.where(empty, zero, lo), max=torch.where(empty, zero, hi),
            num=num.double(), sum=gsum.reshape(xbins, ybins).sum(0),
            sum_squares=gsq.reshape(xbins, ybins).sum(0), nonfinite=zero,
        )
        e = [ylo + j * yw for j in range(ybins + 1)]
        keys = [f"param[{e[j]:.3g},{e[j + 1]:.3g})" for j in range(ybins)]
        self.publish_histograms(step, hists, keys=keys, topic="inputs")


class AlphaOptions(PerSampleOptions):
    pass


class Alpha(_PerSample):
    """Where the step landed on the local quadratic along the update: Cockpit's ``Alpha``.
    A quadratic is fitted to the losses and projected gradients (with their per-sample
    variances) at the start and end of step s's update ``u_s``;
    ``alpha = 2 t / alpha_bar - 1`` with ``t = |u_s|`` and ``alpha_bar`` the quadratic's
    minimiser (-1: the fit is not convex). The value belongs to step s and is known at the
    end of step s + 1, so it is published then under step s. Registered before the other
    gradstats subscribers, it shares their pass over the layers (else it makes its own).
    Needs consecutive steps: ``subsample`` must be 1."""

    name = "alpha"
    Options = AlphaOptions
    default_topics = (*_PER_SAMPLE, "weight_updates", "bias_updates", "loss", "network_output",
                      "input_labels")

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        if self.options.subsample != 1:
            raise ValueError(
                f"alpha needs consecutive steps (the start and end of each update): "
                f"subsample must be 1, got {self.options.subsample}"
            )
        self._start: dict[str, Any] | None = None
        self._loss_none: nn.Module | None = None

    def _individual_losses(self, step: ik.StepBundle, reduction: str) -> torch.Tensor:
        loss = self.exporter.loss_fn
        if not isinstance(loss, nn.Module) or not hasattr(loss, "reduction"):
            raise ValueError(
                "alpha needs the per-sample losses: watch a torch.nn loss module "
                "(exporter.set_loss(nn.CrossEntropyLoss()))"
            )
        if self._loss_none is None:
            self._loss_none = copy.copy(loss)
            self._loss_none.reduction = "none"
        output = step["network_output"].data[0]
        target = step["input_labels"].data[0]
        per = self._loss_none(output, target)
        per = per.reshape(per.shape[0], -1)
        return per.sum(1) if reduction == "sum" else per.mean(1)

    def compute_step(self, step: ik.StepBundle) -> None:
        opts: Any = self.options
        reduction = opts.reduction
        if reduction == "auto":
            reduction = getattr(self.exporter.loss_fn, "reduction", "mean")
        updates: dict[tuple[str, str], torch.Tensor] = {}
        for topic, pname in (("weight_updates", "weight"), ("bias_updates", "bias")):
            if topic in step.topics:
                for key, u in zip(step[topic].keys, step[topic].data, strict=True):
                    if u is not None and key is not None:
                        updates[(key, pname)] = u
        engine = _engine(self)
        if engine.coverage is None:
            engine.coverage = _Coverage(self.exporter)
        covered = {(name, p) for name, module in engine.coverage.modules.items()
                   for p in ("weight", "bias") if getattr(module, p, None) is not None}
        missing = sorted(covered - set(updates))
        if missing:
            raise ValueError(f"alpha: no update of {missing} at step {step.global_step}")
        directions = {k: updates[k] for k in sorted(covered)}
        start = self._start
        after = start is not None and start["step"] == step.global_step - 1
        found = (start["u"], directions) if after else (directions,)
        stats, projected = engine.step_stats(self, step, found)  # type: ignore[arg-type]
        b = stats.batch
        individual = self._individual_losses(step, reduction)
        loss = individual.mean()
        var_f = individual.var()
        t = torch.stack([u.double().square().sum() for u in directions.values()]).sum().sqrt()
        if after:
            assert start is not None
            proj = b * projected[0].double() / start["t"]
            alpha = _alpha(start["t"], [start["f"], loss.double()],
                           [start["df"], proj.mean()], [start["var_f"], var_f.double()],
                           [start["var_df"], proj.var()])
            self.publish_scalars(step, alpha.reshape(1).float(), keys=[None], at=start["at"])
        proj = b * projected[-1].double() / t
        self._start = {
            "step": step.global_step, "t": t,
            # the stamp only: the step's bundle would keep all its payloads alive
            "at": ik.StepBundle(global_step=step.global_step, epoch=step.epoch,
                                batch_index=step.batch_index, payloads={}), "f": loss.double(),
            "var_f": var_f.double(), "df": proj.mean(), "var_df": proj.var(),
            "u": {k: v.clone() for k, v in directions.items()},
        }


def _alpha(t: torch.Tensor, fs: list[torch.Tensor], dfs: list[torch.Tensor],
           var_fs: list[torch.Tensor], var_dfs: list[torch.Tensor]) -> torch.Tensor:
    """Cockpit's ``_fit_quadratic`` and ``_get_alpha`` on the device: a variance of 0 is
    replaced by 1e-10, a singular fit gives -1 when t = 0 (else NaN)."""
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    phi = torch.stack([
        torch.stack([one, zero, zero]), torch.stack([one, t, t * t]),
        torch.stack([zero, one, zero]), torch.stack([zero, one, 2 * t]),
    ]).t()  # (3, 4)
    var = torch.stack([*var_fs, *var_dfs])
    var = torch.where(var == 0, torch.full_like(var, 1e-10), var)
    lam = torch.diag(1 / var)
    y = torch.stack([*fs, *dfs])
    inv, info = torch.linalg.inv_ex(phi @ lam @ phi.t())
    mu = inv @ phi @ lam @ y
    alpha = torch.where(mu[2] < 0, -one, 2 * t / (-mu[1] / mu[2]) - 1)
    failed = torch.where(t == 0, -one, torch.full_like(t, float("nan")))
    return torch.where(info != 0, failed, alpha)
