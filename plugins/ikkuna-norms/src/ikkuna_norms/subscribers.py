"""The subscribers of the ``norms`` plugin.

Each one works on a whole step at once: all modules' payloads of a topic are reduced together
with the core's fused primitives (``ikkuna_core.ops``), a few kernel launches per topic and
step whatever the number of modules. Every value stays a tensor on the payload's device:
nothing here synchronises with the host. Low-precision payloads (float16, bfloat16) and
integer payloads are reduced in float32.

Sharded parameters (FSDP2, tensor parallelism): every subscriber here but
:class:`SpectralNorm` merges statistics of the local shards (``sharded = "merge"``): norms as
sums of ``|x|^p`` (maxima for ``p = inf``), moments as counts, sums and sums of squares — one
all-reduce per step for all of them, no parameter gathered. :class:`SpectralNorm` needs the
whole matrix and gathers it, at its own steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from ikkuna_core import StepBundle, Subscriber, TensorOptions, ops


def _merged_norms(
    subscriber: Subscriber, step: StepBundle, values: torch.Tensor, p: float,
    then: Callable[[torch.Tensor], None], topics: Sequence[str] | None = None,
) -> None:
    """``then(norms)`` with ``values`` (this rank's p-norms, one per payload of ``topics``)
    merged across the shards: ``|x|^p`` summed (the largest for ``p = inf``)."""
    if math.isinf(p):
        subscriber.merge_shards(step, values, then, topics=topics, op="max")
        return
    subscriber.merge_shards(step, values.double() ** p,
                            lambda total: then((total ** (1 / p)).float()), topics=topics)

__all__ = [
    "GlobalNorm",
    "GlobalNormOptions",
    "Mean",
    "MeanOptions",
    "Norm",
    "NormOptions",
    "Ratio",
    "RatioOptions",
    "SpectralNorm",
    "SpectralNormOptions",
    "Variance",
    "VarianceOptions",
]

# ----------------------------------------------------------------------------------- norm
class NormOptions(TensorOptions):
    p: float = Field(
        default=2.0,
        description="order of the norm: any p > 0, or 'inf' for the largest absolute value",
    )

    @field_validator("p", mode="before")
    @classmethod
    def _parse_p(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("inf", "+inf", "infinity", "+infinity"):
                return math.inf
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"p must be a number > 0 or 'inf', got {value!r}") from None
        return value

    @field_validator("p")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:  # also rejects nan
            raise ValueError(f"p must be > 0 or 'inf', got {value!r}")
        return value


class Norm(Subscriber):
    """p-norm of the whole tensor of each subscribed topic, per module: ``(sum |x|^p)^(1/p)``
    over every element (``p = inf``: the largest ``|x|``). Each topic is handled on its own
    and published as ``norm/<topic>``."""

    name = "norm"
    ddp_shareable = True  # one result per key, from that key's payload: DDP ranks split the keys
    Options = NormOptions
    default_topics: ClassVar[tuple[str, ...]] = ("weight_gradients",)
    sharded = "merge"
    options: NormOptions

    def compute_step(self, step: StepBundle) -> None:
        # every topic's tensors in one fused reduction, then one message per topic
        tensors = [step[topic].tensors() for topic in step.topics]
        values = ops.norms([t for group in tensors for t in group], self.options.p)
        sizes = [len(group) for group in tensors]

        def publish(values: torch.Tensor) -> None:
            for topic, topic_values in zip(step.topics, values.split(sizes), strict=True):
                self.publish_scalars(step, topic_values, topic=topic)

        if self.merging(step):
            _merged_norms(self, step, values, self.options.p, publish)
        else:
            publish(values)


# ----------------------------------------------------------------------------- global norm
class GlobalNormOptions(NormOptions):
    pass


class GlobalNorm(Subscriber):
    """The p-norm of all payloads of its topics together, one value per step, as
    ``torch.nn.utils.clip_grad_norm_`` computes it: the norm of the per-tensor norms. With the
    default topics it is the total gradient norm that gradient clipping compares with its
    threshold; a parameter shared by two modules (tied weights) is one tensor and counts once.
    Published as ``global_norm/<topics>`` (network level: the tag has no module)."""

    name = "global_norm"
    Options = GlobalNormOptions
    default_topics: ClassVar[tuple[str, ...]] = ("weight_gradients", "bias_gradients")
    output_kind = "network"
    sharded = "merge"
    options: GlobalNormOptions

    def compute_step(self, step: StepBundle) -> None:
        tensors = [t for topic in step.topics for t in step[topic].tensors()]
        per_tensor = ops.norms(tensors, self.options.p)

        def publish(per_tensor: torch.Tensor) -> None:
            total = torch.linalg.vector_norm(per_tensor, ord=self.options.p)
            self.publish_scalars(step, total.reshape(1), [None])

        if self.merging(step):
            _merged_norms(self, step, per_tensor, self.options.p, publish)
        else:
            publish(per_tensor)


# ------------------------------------------------------------------------------ mean/var
class MeanOptions(TensorOptions):
    pass


class Mean(Subscriber):
    """Mean of every element of each subscribed topic, per module (``mean/<topic>``)."""

    name = "mean"
    ddp_shareable = True  # one result per key, from that key's payload: DDP ranks split the keys
    Options = MeanOptions
    default_topics: ClassVar[tuple[str, ...]] = ("activations",)
    sharded = "merge"

    def compute_step(self, step: StepBundle) -> None:
        for topic in step.topics:
            if self.merging(step):
                _merged_moments(self, step, topic, lambda topic, mean, _: self.publish_scalars(
                    step, mean, topic=topic))
                continue
            means, _ = ops.moments(step[topic].tensors())
            self.publish_scalars(step, means, topic=topic)


def _merged_moments(
    subscriber: Subscriber, step: StepBundle, topic: str,
    then: Callable[[str, torch.Tensor, torch.Tensor], None], correction: int = 1,
) -> None:
    """``then(topic, means, variances)`` of ``topic``'s payloads merged across the shards
    (counts, sums and sums of squares summed)."""
    partials = ops.partial_moments(step[topic].tensors())
    subscriber.merge_shards(
        step, partials, lambda total: then(topic, *ops.merged_moments(total, correction)),
        topics=[topic],
    )


class VarianceOptions(TensorOptions):
    correction: int = Field(
        default=1,
        ge=0,
        description="difference between the number of elements and the divisor: "
        "1 = unbiased sample variance (torch/numpy ddof=1), 0 = population variance",
    )


class Variance(Subscriber):
    """Variance of every element of each subscribed topic, per module (``variance/<topic>``):
    ``sum (x - mean)^2 / (n - correction)``."""

    name = "variance"
    ddp_shareable = True  # one result per key, from that key's payload: DDP ranks split the keys
    Options = VarianceOptions
    default_topics: ClassVar[tuple[str, ...]] = ("activations",)
    sharded = "merge"
    options: VarianceOptions

    def compute_step(self, step: StepBundle) -> None:
        for topic in step.topics:
            if self.merging(step):
                _merged_moments(self, step, topic, lambda topic, _, var: self.publish_scalars(
                    step, var, topic=topic), self.options.correction)
                continue
            _, variances = ops.moments(step[topic].tensors(), self.options.correction)
            self.publish_scalars(step, variances, topic=topic)


# ---------------------------------------------------------------------------------- ratio
class RatioOptions(TensorOptions):
    eps: float = Field(
        default=0.0, ge=0.0, description="added to the denominator's norm (0: plain ratio)"
    )

    @field_validator("topics")
    @classmethod
    def _two_topics(cls, topics: list[str]) -> list[str]:
        if len(topics) != 2:
            raise ValueError(
                f"ratio needs exactly two topics (numerator, denominator), got {len(topics)}:"
                f" {topics}"
            )
        if topics[0] == topics[1]:
            raise ValueError(f"ratio needs two different topics, got {topics}")
        return topics


class Ratio(Subscriber):
    """``||a|| / (||b|| + eps)`` for two topics ``[a, b]`` of the same module and step (L2
    norms over all elements). With the default ``["weight_updates", "weights"]`` it is the
    update-to-weight ratio. The topics may be derived scalar topics, e.g.
    ``["norm/weight_updates", "norm/weights"]`` published by ``norm`` subscribers registered
    before this one (the norm of a scalar is its absolute value). Published as
    ``ratio/<a>/<b>``."""

    name = "ratio"
    Options = RatioOptions
    default_topics: ClassVar[tuple[str, ...]] = ("weight_updates", "weights")
    synchronized = True
    sharded = "merge"
    options: RatioOptions

    def compute_step(self, step: StepBundle) -> None:
        top, bottom = self.options.topics
        a, b = step[top].tensors(), step[bottom].tensors()
        values = ops.norms(a + b)  # one fused reduction

        def publish(values: torch.Tensor) -> None:
            num, den = values.split([len(a), len(b)])
            if self.options.eps:
                den = den + self.options.eps
            self.publish_scalars(step, num / den, topic=top)

        if self.merging(step):
            _merged_norms(self, step, values, 2.0, publish, topics=[top, bottom])
        else:
            publish(values)


# ------------------------------------------------------------------------- spectral norm
#: Squarings of the small Gram matrix in the Rayleigh-Ritz step: its eigenvalues are raised to
#: the power 2**_SQUARINGS, which bounds the relative error of the extracted value by about
#: ln(block) / 2**(_SQUARINGS + 1) whatever the gap between the top singular values.
_SQUARINGS = 12


class SpectralNormOptions(TensorOptions):
    iterations: int = Field(
        default=2, ge=1, description="power iterations per step, continuing from the last step"
    )
    warmup_iterations: int = Field(
        default=20,
        ge=1,
        description="power iterations the first time a module is seen (from random vectors)",
    )
    block: int = Field(
        default=8,
        ge=1,
        description="number of vectors iterated together (1: classic power iteration); "
        "capped at the smaller matrix dimension",
    )
    seed: int = Field(default=0, description="seed of the random starting vectors")


def _top_singular_value(r: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each small square matrix of a batch ``r`` (b, k, k) without
    an SVD (which would synchronise a CUDA device): the weighted Rayleigh quotient
    ``trace(G P) / trace(P)`` with ``G = r^T r`` and ``P`` = G to a high power, obtained by
    repeated normalised squaring."""
    g = torch.bmm(r.transpose(1, 2), r)  # bmm, not @: one op (matmul adds expand and views)
    p = g
    tiny = torch.finfo(p.dtype).tiny
    for _ in range(_SQUARINGS):
        p = torch.bmm(p, p)
        p = p / torch.linalg.matrix_norm(p).clamp_min(tiny)[:, None, None]
    top = (g * p).sum((1, 2)) / torch.diagonal(p, dim1=1, dim2=2).sum(1).clamp_min(tiny)
    return top.clamp_min(0).sqrt()


class SpectralNorm(Subscriber):
    """Largest singular value of each module's weight matrix by (block) power iteration.

    Tensors with more than two dimensions (convolution kernels ``(out, in, kh, kw)``) are
    reshaped to ``(out, in*kh*kw)``; tensors with fewer than two dimensions (biases,
    normalisation scales) are not matrices and are skipped.

    The iterated vectors are kept per (topic, module) between steps, so a step costs
    ``iterations`` products with ``W`` and ``W^T`` (no SVD); the first step of a module runs
    ``warmup_iterations``. ``block`` vectors are iterated together (subspace iteration, with
    QR re-orthonormalisation and a Rayleigh-Ritz estimate): a single vector converges at the
    rate sigma_2/sigma_1, which is close to 1 for freshly initialised layers (random
    matrices have clustered spectra) and lets the estimate lag when training lifts a new
    direction to the top; a block converges at sigma_(block+1)/sigma_1 for the same number
    of passes over ``W``. Published as ``spectral_norm/<topic>``.
    """

    name = "spectral_norm"
    ddp_shareable = True  # one result per key (vectors kept where computed): ranks split keys
    Options = SpectralNormOptions
    default_topics: ClassVar[tuple[str, ...]] = ("weights",)
    sharded = "gather"  # the whole matrix: sharded weights are gathered at its steps
    options: SpectralNormOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        #: the iterated vectors of each (topic, module): the batch they were iterated in
        #: and their row, so a key goes on from its own vectors whichever keys it is batched
        #: with next (a DDP rank computing a share of the keys after all of them, see
        #: ikkuna_core._bus.ddp); the same batch again is used as it is
        self._blocks: dict[tuple[str, str | None], tuple[torch.Tensor, int]] = {}

    def compute_step(self, step: StepBundle) -> None:
        for topic in step.topics:
            payloads = step[topic]
            keys, mats = [], []
            for key, w in zip(payloads.keys, payloads.tensors(), strict=True):
                if w.dim() >= 2:
                    keys.append(key)
                    mats.append(w.reshape(w.shape[0], -1))
            if not mats:
                continue
            device = mats[0].device
            # power iterations batched by matrix shape, then the small Rayleigh-Ritz problems
            # of all groups batched by block size
            blocks: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
            for idx in ops.group_by(mats, lambda m: (tuple(m.shape), m.device, m.dtype)).values():
                r = self._power_iteration(topic, [keys[i] for i in idx], [mats[i] for i in idx])
                found = blocks.setdefault(r.shape[-1], ([], []))
                found[0].extend(idx)
                found[1].append(r.to(device, torch.float32))
            sigma = torch.empty(len(mats), dtype=torch.float32, device=device)
            for idx, rs in blocks.values():
                values = _top_singular_value(torch.cat(rs))
                sigma[ops.constant(idx, torch.long, device)] = values
            self.publish_scalars(step, sigma, keys, topic=topic)

    def _power_iteration(
        self, topic: str, keys: list[str | None], mats: list[torch.Tensor]
    ) -> torch.Tensor:
        """Block power iteration on same-shaped matrices at once (batched matmuls and QRs),
        continuing from the vectors kept for these keys; returns the R factors (b, k, k) whose
        top singular values estimate the matrices'."""
        m = torch.stack(mats) if len(mats) > 1 else mats[0].unsqueeze(0)  # one: no copy
        if not m.is_floating_point() or m.element_size() < 4:
            m = m.float()
        k = min(self.options.block, m.shape[1], m.shape[2])
        kept = [self._blocks.get((topic, key)) for key in keys]
        iterations = self.options.iterations
        warm = all(v is not None and v[0].shape[1:] == (m.shape[1], k)
                   and v[0].device == m.device and v[0].dtype == m.dtype for v in kept)
        if warm:
            batch = kept[0][0]  # type: ignore[index]
            same = len(batch) == len(kept) and all(
                v[0] is batch and v[1] == i for i, v in enumerate(kept))  # type: ignore[index]
            u = batch if same else torch.stack([v[0][v[1]] for v in kept])  # type: ignore[index]
        else:
            generator = torch.Generator(device=m.device).manual_seed(self.options.seed)
            start = torch.randn(m.shape[1], k, generator=generator, device=m.device, dtype=m.dtype)
            u = torch.linalg.qr(start).Q.expand(m.shape[0], -1, -1)
            iterations = max(iterations, self.options.warmup_iterations)
        mt = m.transpose(1, 2)
        for _ in range(iterations):  # bmm, not @: one op each (matmul adds expand and views)
            v = torch.linalg.qr(torch.bmm(mt, u)).Q
            u, r = torch.linalg.qr(torch.bmm(m, v))
        for i, key in enumerate(keys):
            self._blocks[(topic, key)] = (u, i)
        return r

    def reset(self) -> None:
        """Forget the kept vectors (the next step of each module warms up again)."""
        self._blocks.clear()
