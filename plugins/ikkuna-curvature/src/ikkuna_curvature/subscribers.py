"""The subscribers of the ``curvature`` plugin: thin wiring around :mod:`ikkuna_curvature.ops`.

``condition_number`` is a step-level metric of the ``weights`` topic: all weights of a step
in one call, one batched float64 SVD per distinct shape. The three loss-curvature
subscribers are network-level: they receive the step's batch (``input_data``, the first
tensor argument of the model's forward, and ``input_labels``, the target passed to the loss)
in one synchronized bundle. Subscribers run at the end of the step, after
``optimizer.step()``, so they evaluate the watched parameters' loss Hessian (or per-example
gradients) at the **updated** parameters, on the batch that produced the update. Every
forward runs inside ``Exporter.silenced()`` and leaves training untouched (see ``ops``).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from ikkuna_core import (
    EVENT_TOPICS,
    Exporter,
    MessageBundle,
    StepBundle,
    Subscriber,
    SubscriberOptions,
    TensorOptions,
    select_modules,
)

from . import ops

__all__ = [
    "ConditionNumber",
    "ConditionNumberOptions",
    "GradientNoiseScale",
    "GradientNoiseScaleOptions",
    "HessianMaxEigenvalue",
    "HessianMaxEigenvalueOptions",
    "HessianTrace",
    "HessianTraceOptions",
]

#: Every curvature subscriber runs every 50th step unless told otherwise: each evaluation
#: costs several training steps (see the README's cost table).
DEFAULT_SUBSAMPLE = 50
_SUBSAMPLE = Field(
    default=DEFAULT_SUBSAMPLE, ge=1, description="only every n-th training step (default 50)"
)


# ---------------------------------------------------------------------- condition number
class ConditionNumberOptions(TensorOptions):
    subsample: int = _SUBSAMPLE


class ConditionNumber(Subscriber):
    """``sigma_max / sigma_min`` of each module's weight reshaped to ``(out, in*k...)``, from
    singular values in float64; ``inf`` for a rank-deficient matrix. Tensors with fewer
    than two dimensions (biases, normalisation scales) are skipped. Published as
    ``condition_number/<topic>`` per module.

    Step-level: all weights of a step are reduced together, one batched float64
    ``torch.linalg.svdvals`` per distinct shape (:func:`ikkuna_curvature.ops.condition_numbers`),
    and published as one vector per topic."""

    name = "condition_number"
    Options = ConditionNumberOptions
    default_topics: ClassVar[tuple[str, ...]] = ("weights",)
    sharded = "gather"  # singular values need the whole matrix: sharded weights are gathered
    options: ConditionNumberOptions

    def compute_step(self, step: StepBundle) -> None:
        for topic in step.topics:
            payloads = step[topic]
            matrices = [
                (key, t)
                for key, t in zip(payloads.keys, payloads.data, strict=True)
                if t is not None and t.dim() >= 2
            ]
            if matrices:
                values = ops.condition_numbers([t for _, t in matrices])
                self.publish_scalars(step, values, [key for key, _ in matrices], topic=topic)


# --------------------------------------------------------------------- the batch and loss
class _BatchOptions(SubscriberOptions):
    subsample: int = _SUBSAMPLE

    @field_validator("topics")
    @classmethod
    def _inputs_and_labels(cls, topics: list[str]) -> list[str]:
        if len(topics) != 2 or any(t in EVENT_TOPICS for t in topics):
            raise ValueError(
                "needs two tensor topics [inputs, labels] (default: "
                f"['input_data', 'input_labels']), got {topics}"
            )
        return topics


class _LossCurvature(Subscriber):
    """Network-level metrics of the loss at the step's batch, named after the subscriber
    (``hessian_trace``, ``hessian_trace/stderr``), not after their input topics."""

    default_topics: ClassVar[tuple[str, ...]] = ("input_data", "input_labels")
    synchronized = True
    output_kind = "network"
    suffixes: ClassVar[tuple[str, ...]] = ()
    _generator: torch.Generator | None = None  # per instance once made (_generator_on)

    def output_topic(self, suffix: str | None = None) -> str:
        base = self.options.publish_as or self.name
        return f"{base}/{suffix}" if suffix else base

    def output_topics(self) -> list[str]:
        return [self.output_topic(), *(self.output_topic(s) for s in self.suffixes)]

    def _generator_on(self, device: torch.device, seed: int) -> torch.Generator:
        """The subscriber's own random generator on ``device`` (seeded with ``seed`` when first
        made there), so its random vectors never touch training's random state."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def _problem(
        self, bundle: MessageBundle
    ) -> tuple[nn.Module, ops.LossFn, torch.Tensor, torch.Tensor, list[nn.Parameter]]:
        """The model, the loss, the step's batch and the watched trainable parameters."""
        exporter = self.exporter
        model, loss_fn = exporter.model, exporter.loss_fn
        if model is None or loss_fn is None:
            raise RuntimeError(
                f"{self.name} needs the model and its loss: ik.watch(model, loss_fn, ...) or "
                "ik.Exporter(model, loss_fn)"
            )
        inputs, labels = (bundle.tensor(t) for t in self.options.topics)
        return model, loss_fn, inputs, labels, watched_parameters(model, exporter)

    _warned: bool = False

    def warn_once(self, message: str) -> None:
        """A RuntimeWarning, the first time only (per subscriber)."""
        if not self._warned:
            self._warned = True
            warnings.warn(f"ikkuna: {self.name}: {message}", RuntimeWarning, stacklevel=2)


def watched_parameters(model: nn.Module, exporter: Exporter) -> list[nn.Parameter]:
    """The trainable parameters of the modules the exporter watches (its ``depth`` and
    ``include``), their submodules' included, each once, in module order."""
    seen: set[int] = set()
    params = []
    for _, module in select_modules(model, exporter.depth, exporter.include):
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError(
            "the watched modules have no trainable parameter; watch more of the model "
            "(depth / include of the run configuration)"
        )
    return params


# ------------------------------------------------------------------ hessian max eigenvalue
class HessianMaxEigenvalueOptions(_BatchOptions):
    max_iterations: int = Field(
        default=20,
        ge=2,
        description="Lanczos iterations (Hessian-vector products) per evaluation, at most; "
        "at least 2: one product is only the Rayleigh quotient of the start vector, which "
        "restarting from its own Ritz vector would never improve",
    )
    tolerance: float = Field(
        default=1e-2,
        gt=0,
        description="stop when the relative residual |H y - theta y| / |theta| is at most "
        "this: then theta is within tolerance * |theta| of an eigenvalue",
    )
    seed: int = Field(default=0, description="seed of the first starting vector")


class HessianMaxEigenvalue(_LossCurvature):
    """The largest eigenvalue of the loss Hessian with respect to the watched parameters on
    the step's batch, by Lanczos iteration on Hessian-vector products (double backward),
    warm-started from the previous evaluation's eigenvector. Publishes
    ``hessian_max_eigenvalue``, ``…/iterations`` (products used) and ``…/residual`` (the
    relative residual); warns once when the tolerance was not reached."""

    name = "hessian_max_eigenvalue"
    Options = HessianMaxEigenvalueOptions
    suffixes: ClassVar[tuple[str, ...]] = ("iterations", "residual")
    options: HessianMaxEigenvalueOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._vector: torch.Tensor | None = None

    def compute(self, bundle: MessageBundle) -> None:
        model, loss_fn, inputs, labels, params = self._problem(bundle)
        generator = self._generator_on(params[0].device, self.options.seed)
        with self.exporter.silenced():
            result = ops.hessian_max_eigenvalue(
                model,
                loss_fn,
                inputs,
                labels,
                parameters=params,
                start=self._vector,
                max_iterations=self.options.max_iterations,
                tolerance=self.options.tolerance,
                generator=generator,
            )
        self._vector = result.eigenvector
        if not result.converged:
            self.warn_once(
                f"Lanczos did not converge at step {bundle.global_step}: relative residual "
                f"{float(result.residual):.2e} > tolerance {self.options.tolerance:g} after "
                f"max_iterations = {self.options.max_iterations}; the published value is a "
                "lower bound. Raise max_iterations or tolerance (this warning is shown once; "
                "hessian_max_eigenvalue/residual has every step's residual)"
            )
        self.publish_scalar(bundle, result.eigenvalue)
        self.publish_scalar(bundle, torch.tensor(float(result.iterations)), suffix="iterations")
        self.publish_scalar(bundle, result.residual, suffix="residual")

    def reset(self) -> None:
        """Forget the kept eigenvector (the next evaluation starts from a random vector)."""
        self._vector = None


# ------------------------------------------------------------------------- hessian trace
class HessianTraceOptions(_BatchOptions):
    probes: int = Field(
        default=10, ge=1, description="Rademacher probes (Hessian-vector products) per step"
    )
    seed: int = Field(default=0, description="seed of the probes' generator")


class HessianTrace(_LossCurvature):
    """Hutchinson's estimate of the trace of the loss Hessian with respect to the watched
    parameters on the step's batch (``hessian_trace``) and its standard error
    (``hessian_trace/stderr``, from the probes' spread; needs probes >= 2)."""

    name = "hessian_trace"
    Options = HessianTraceOptions
    suffixes: ClassVar[tuple[str, ...]] = ("stderr",)
    options: HessianTraceOptions

    def compute(self, bundle: MessageBundle) -> None:
        model, loss_fn, inputs, labels, params = self._problem(bundle)
        generator = self._generator_on(params[0].device, self.options.seed)
        with self.exporter.silenced():
            operator = ops.hessian_operator(model, loss_fn, inputs, labels, params)
            result = ops.hutchinson_trace(
                operator,
                operator.numel,
                probes=self.options.probes,
                generator=generator,
                device=operator.device,
                dtype=operator.dtype,
            )
        self.publish_scalar(bundle, result.trace)
        if self.options.probes > 1:
            self.publish_scalar(bundle, result.stderr, suffix="stderr")


# ------------------------------------------------------------------- gradient noise scale
class GradientNoiseScaleOptions(_BatchOptions):
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="examples differentiated at once (memory: chunk_size gradients); "
        "None: the whole batch",
    )


class GradientNoiseScale(_LossCurvature):
    """The simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` of the step's batch from
    per-example gradients (``torch.func.vmap``), with its parts ``…/trace_covariance`` and
    ``…/gradient_norm_squared``. On a model where per-example gradients do not exist or vmap
    cannot run (batch norm in train mode, …) it says why once and disables itself."""

    name = "gradient_noise_scale"
    Options = GradientNoiseScaleOptions
    suffixes: ClassVar[tuple[str, ...]] = ("trace_covariance", "gradient_norm_squared")
    options: GradientNoiseScaleOptions

    def compute(self, bundle: MessageBundle) -> None:
        model, loss_fn, inputs, labels, params = self._problem(bundle)
        if inputs.dim() == 0 or inputs.shape[0] < 2:
            return  # a batch of one example (an epoch's last, say) has no spread
        try:
            with self.exporter.silenced():
                result = ops.gradient_noise_scale(
                    model,
                    loss_fn,
                    inputs,
                    labels,
                    parameters=params,
                    chunk_size=self.options.chunk_size,
                )
        except ops.PerExampleGradientsUnavailable as exc:
            self.enabled = False
            self.warn_once(
                f"{exc}. It is disabled for the rest of the run; training is not affected. "
                "Use it on a model without train-mode batch norm (GroupNorm/LayerNorm, or "
                "batch norm in eval mode) whose layers torch.func.vmap supports, or remove "
                "this subscriber"
            )
            return
        self.publish_scalar(bundle, result.noise_scale)
        self.publish_scalar(bundle, result.trace_covariance, suffix="trace_covariance")
        self.publish_scalar(
            bundle, result.gradient_norm_squared, suffix="gradient_norm_squared"
        )
