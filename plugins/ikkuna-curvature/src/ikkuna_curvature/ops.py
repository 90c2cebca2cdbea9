"""The maths of the ``curvature`` plugin as plain functions of tensors and modules.

Nothing here knows about the bus: the subscribers in :mod:`ikkuna_curvature.subscribers`
only pick the batch and the parameters and call these. Every function that runs the model
leaves training exactly as it found it: parameters and ``p.grad`` (derivatives are taken with
``torch.autograd.grad`` / ``torch.func``, never ``.backward()``), buffers such as batch-norm
running statistics (the forward runs on copies, through ``torch.func.functional_call``), the
random number generators of the CPU and of the model's accelerator (saved before, restored
after), and the train/eval mode of every module (never changed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ikkuna_core import ops as core_ops

__all__ = [
    "EigenResult",
    "HessianOperator",
    "NoiseScale",
    "PerExampleGradientsUnavailable",
    "TraceResult",
    "condition_numbers",
    "gradient_noise_scale",
    "hessian_max_eigenvalue",
    "hessian_operator",
    "hutchinson_trace",
    "lanczos_max_eigenpair",
    "preserved_rng",
]

LossFn = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------ condition numbers
def condition_numbers(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sigma_max / sigma_min`` of each weight reshaped to ``(out, in·k…)``, from singular
    values in float64 (one batched ``torch.linalg.svdvals`` per distinct shape and device).

    A rank-deficient matrix (``sigma_min <= sigma_max · max(rows, cols) · eps(float64)``, the rank
    tolerance of ``torch.linalg.matrix_rank``; a zero matrix included) gets ``inf``.
    Returns a float64 vector, one entry per weight, on the first weight's device.
    """
    if not weights:
        return torch.empty(0, dtype=torch.float64)
    for i, w in enumerate(weights):
        if w.dim() < 2:
            raise ValueError(
                f"condition_numbers: weight {i} has shape {tuple(w.shape)}; a condition number "
                "needs a matrix (at least 2 dimensions, reshaped to (out, in*k...))"
            )
    device = weights[0].device
    groups = core_ops.group_by(weights, lambda w: (tuple(w.shape), w.device))
    eps = torch.finfo(torch.float64).eps
    out = torch.empty(len(weights), dtype=torch.float64, device=device)
    for index in groups.values():
        shape = weights[index[0]].shape
        rows, cols = shape[0], math.prod(shape[1:])
        stacked = torch.stack(
            [weights[i].detach().reshape(rows, cols).to(torch.float64) for i in index]
        )
        s = torch.linalg.svdvals(stacked)  # (group, min(rows, cols)), descending
        top, bottom = s[:, 0], s[:, -1]
        full_rank = bottom > top * (max(rows, cols) * eps)
        cond = torch.where(full_rank, top / torch.where(full_rank, bottom, 1.0), math.inf)
        out[core_ops.constant(index, torch.long, device)] = cond.to(device)
    return out


# ------------------------------------------------------------------------- state preserving
def _devices(tensors: Iterable[torch.Tensor]) -> set[torch.device]:
    return {t.device for t in tensors}


@contextmanager
def preserved_rng(devices: Iterable[torch.device]) -> Iterator[None]:
    """Save the CPU random state and that of every accelerator device in ``devices``, and
    restore them on exit: random numbers drawn inside (dropout masks) are invisible to the
    training that follows."""
    by_type: dict[str, set[int]] = {}
    for device in devices:
        if device.type in ("cpu", "meta"):
            continue
        module: Any = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        by_type.setdefault(device.type, set()).add(index)
    with ExitStack() as stack:
        if not by_type:
            stack.enter_context(torch.random.fork_rng(devices=[], device_type="cpu"))
        for device_type, indices in by_type.items():
            stack.enter_context(
                torch.random.fork_rng(devices=sorted(indices), device_type=device_type)
            )
        yield


def _buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer, for ``functional_call``: a train-mode batch norm updates its
    running statistics (and ``num_batches_tracked``) in the copies, not in the model."""
    return {name: b.clone() for name, b in model.named_buffers()}


def _forward_loss(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The loss of one forward on copies of the buffers (a non-scalar loss is averaged)."""
    output = functional_call(model, _buffer_copies(model), (inputs,))
    loss = loss_fn(output, labels)
    return loss if loss.dim() == 0 else loss.mean()


def _trainable(parameters: Iterable[torch.Tensor] | None, model: nn.Module) -> list[torch.Tensor]:
    chosen = list(model.parameters() if parameters is None else parameters)
    seen: set[int] = set()
    out = []
    for p in chosen:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("no trainable parameter (requires_grad=True) to differentiate")
    return out


# ------------------------------------------------------------------------ Hessian operator
class HessianOperator:
    """Hessian-vector products ``v -> H v`` of one loss at fixed parameters, on flat vectors
    (the parameters flattened and concatenated in order).

    The gradient is computed once with ``create_graph=True`` and each product is one more
    backward through it (double backward). So the forward, and with it every dropout mask and
    batch statistic, is the same for every product: the operator is one symmetric matrix.
    Parameters the loss does not depend on, or depends on linearly, have zero rows and
    columns.
    """

    def __init__(
        self, parameters: list[torch.Tensor], gradients: Sequence[torch.Tensor | None]
    ) -> None:
        self.parameters = parameters
        self.sizes = [p.numel() for p in parameters]
        self.numel = sum(self.sizes)
        self.device = parameters[0].device
        dtype = torch.float32
        for p in parameters:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        # Only gradients that still depend on the parameters contribute to H v.
        self._live = [
            (i, g) for i, g in enumerate(gradients) if g is not None and g.requires_grad
        ]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.numel,):
            raise ValueError(
                f"expected a flat vector of {self.numel} entries, got {tuple(v.shape)}"
            )
        if not self._live:
            return torch.zeros_like(v)
        chunks = torch.split(v, self.sizes)
        products = torch.autograd.grad(
            [g for _, g in self._live],
            self.parameters,
            grad_outputs=[
                chunks[i].view_as(self.parameters[i]).to(self.parameters[i].dtype)
                for i, _ in self._live
            ],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return torch.cat([h.reshape(-1).to(self.dtype) for h in products])


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    parameters: Iterable[torch.Tensor] | None = None,
) -> HessianOperator:
    """The Hessian of ``loss_fn(model(inputs), labels)`` with respect to ``parameters``
    (default: every trainable parameter) at their current values, as an operator.

    The model runs in its current mode; buffers are copied and the random state is restored
    afterwards (see the module docstring).
    """
    params = _trainable(parameters, model)
    devices = _devices(params) | {inputs.device}
    with preserved_rng(devices), torch.enable_grad():
        loss = _forward_loss(model, loss_fn, inputs, labels)
        gradients = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return HessianOperator(params, gradients)


# -------------------------------------------------------------------------------- Lanczos
class EigenResult(NamedTuple):
    """The largest eigenvalue found, its unit eigenvector, the Lanczos iterations (Hessian-
    vector products) it took, the relative residual ``‖H y - θ y‖ / |θ|`` and whether that
    residual reached the tolerance."""

    eigenvalue: torch.Tensor
    eigenvector: torch.Tensor
    iterations: int
    residual: torch.Tensor
    converged: bool


def lanczos_max_eigenpair(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    *,
    max_iterations: int = 20,
    tolerance: float = 1e-2,
) -> EigenResult:
    """The algebraically largest eigenpair of the symmetric operator ``matvec`` by Lanczos
    iteration with full reorthogonalisation, from ``start`` (a warm start: the previous
    eigenvector).

    Stops when the Ritz pair's relative residual ``β_k |s_k| / |θ|`` (exact for the computed
    Krylov basis) is at most ``tolerance``; then the Ritz value is within ``tolerance·|θ|``
    of an eigenvalue. The Ritz value never exceeds the largest eigenvalue (it is a Rayleigh
    quotient), so an unconverged result is a lower bound. Each iteration is one product, two
    matrix-vector products with the basis (classical Gram-Schmidt; a second pass when the
    first cancelled most of the vector) and one host read of three numbers (the small
    tridiagonal matrix is solved on the host).
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    norm = float(torch.linalg.vector_norm(start))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("the start vector must be finite and non-zero")
    # The basis as the rows of one preallocated matrix: reorthogonalising against it is two
    # matrix-vector products, not one pass (and one fresh vector) per basis vector.
    basis = torch.empty(
        (max_iterations, start.numel()), dtype=start.dtype, device=start.device
    )
    basis[0] = start.reshape(-1) / norm
    alphas: list[float] = []
    betas: list[float] = []
    theta, residual, ritz = 0.0, math.inf, torch.ones(1, dtype=torch.float64)
    converged = False
    iterations = 0
    for j in range(max_iterations):
        q = basis[j]
        w = matvec(q)
        iterations = j + 1
        alpha_t = torch.dot(w, q)
        w = torch.addcmul(w, q, alpha_t, value=-1)  # a new vector: matvec's stays untouched
        if j > 0:
            w.sub_(basis[j - 1], alpha=betas[-1])
        before = torch.linalg.vector_norm(w)
        done = basis[: j + 1]
        w.addmv_(done.T, done @ w, alpha=-1)  # full reorthogonalisation, in place
        beta_t = torch.linalg.vector_norm(w)
        alpha, norm_before, beta = torch.stack([alpha_t, before, beta_t]).tolist()
        if not all(math.isfinite(x) for x in (alpha, norm_before, beta)):
            raise FloatingPointError(
                "the Hessian-vector product is not finite (nan/inf in the loss curvature)"
            )
        if beta < 0.7 * norm_before:  # cancellation: orthogonalise once more
            w.addmv_(done.T, done @ w, alpha=-1)
            beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if len(betas):
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(t)
        theta = float(values[-1])
        ritz = vectors[:, -1]
        scale = max(abs(theta), torch.finfo(w.dtype).tiny)
        residual = beta * abs(float(ritz[-1])) / scale
        # beta ~ 0: the Krylov space is invariant, its Ritz values are exact eigenvalues.
        invariant = beta <= torch.finfo(w.dtype).eps * max(abs(a) for a in alphas) * 10
        if residual <= tolerance or invariant:
            converged = True
            break
        if j + 1 < max_iterations:
            betas.append(beta)
            torch.div(w, beta, out=basis[j + 1])
    coefficients = ritz.to(device=start.device, dtype=basis.dtype)
    y = basis[: len(coefficients)].T @ coefficients
    y = y / torch.linalg.vector_norm(y)
    return EigenResult(
        eigenvalue=torch.tensor(theta, dtype=torch.float64),
        eigenvector=y,
        iterations=iterations,
        residual=torch.tensor(residual, dtype=torch.float64),
        converged=converged,
    )


#: Weight of the random vector mixed into a warm start (relative to the previous vector).
_WARM_NOISE = 1e-2


def hessian_max_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    parameters: Iterable[torch.Tensor] | None = None,
    start: torch.Tensor | None = None,
    max_iterations: int = 20,
    tolerance: float = 1e-2,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The largest eigenvalue of the loss Hessian with respect to ``parameters`` (default:
    all trainable ones) at their current values on one batch, by Lanczos on Hessian-vector
    products (:func:`lanczos_max_eigenpair`). ``start``: a flat vector to start from (the
    previous result's eigenvector); otherwise a Gaussian vector drawn from ``generator``."""
    operator = hessian_operator(model, loss_fn, inputs, labels, parameters)
    noise = torch.randn(
        operator.numel, generator=generator, device=operator.device, dtype=operator.dtype
    )
    if start is None or start.shape != (operator.numel,):
        start = noise
    else:
        # A little noise keeps a warm start out of any invariant subspace of the new Hessian.
        start = start.to(device=operator.device, dtype=operator.dtype)
        start = start / torch.linalg.vector_norm(start) + _WARM_NOISE * (
            noise / torch.linalg.vector_norm(noise)
        )
    return lanczos_max_eigenpair(
        operator, start, max_iterations=max_iterations, tolerance=tolerance
    )


# ------------------------------------------------------------------------------ Hutchinson
class TraceResult(NamedTuple):
    """Hutchinson's estimate of the trace and its standard error (the sample standard
    deviation of the probes' ``zᵀHz`` over √probes; nan for a single probe)."""

    trace: torch.Tensor
    stderr: torch.Tensor


def hutchinson_trace(
    matvec: Callable[[torch.Tensor], torch.Tensor] | HessianOperator,
    numel: int,
    *,
    probes: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TraceResult:
    """``tr(H) ≈ (1/m) Σ zᵢᵀ H zᵢ`` with ``m = probes`` Rademacher vectors ``zᵢ`` (±1 entries)
    drawn from ``generator``. Unbiased; the variance of one probe is
    ``2 (‖H‖_F² - Σᵢ Hᵢᵢ²)``, so the standard error is ``√(2 (‖H‖_F² - Σ Hᵢᵢ²) / m)``. No host
    synchronisation."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    values = []
    for _ in range(probes):
        z = torch.randint(0, 2, (numel,), generator=generator, device=device).to(dtype) * 2 - 1
        values.append(torch.dot(z, matvec(z)).to(torch.float64))
    samples = torch.stack(values)
    stderr = (
        samples.std(correction=1) / math.sqrt(probes)
        if probes > 1
        else torch.full((), math.nan, dtype=torch.float64, device=samples.device)
    )
    return TraceResult(trace=samples.mean(), stderr=stderr)


# ---------------------------------------------------------------------- gradient noise scale
class NoiseScale(NamedTuple):
    """``B_simple = tr(Σ) / |G|²`` and its two parts, from ``B`` per-example gradients
    ``gᵢ`` with mean ``ḡ``: ``tr(Σ) = Σᵢ ‖gᵢ - ḡ‖² / (B - 1)`` and
    ``|G|² = ‖ḡ‖² - tr(Σ) / B`` (both unbiased; McCandlish et al. 2018, appendix A.1)."""

    noise_scale: torch.Tensor
    trace_covariance: torch.Tensor
    gradient_norm_squared: torch.Tensor


class PerExampleGradientsUnavailable(RuntimeError):
    """The model cannot produce per-example gradients with ``torch.func.vmap``."""


def _coupling_modules(model: nn.Module) -> list[str]:
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return [
        f"'{name or 'model'}' ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, batch_norms) and m.training
    ]


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    parameters: Iterable[torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> NoiseScale:
    """The simple gradient noise scale of one batch from per-example gradients computed with
    ``torch.func.vmap(torch.func.grad(...))`` over ``functional_call`` (each example's loss is
    ``loss_fn`` of the model on a batch of that one example). ``chunk_size`` examples are
    differentiated at a time (default: all), bounding the memory to ``chunk_size`` gradients.

    Raises :class:`PerExampleGradientsUnavailable` for models where examples are coupled
    (batch norm in train mode) or that ``vmap`` cannot run."""
    batch = inputs.shape[0] if inputs.dim() else 0
    if batch < 2:
        raise ValueError(f"the noise scale needs a batch of at least 2 examples, got {batch}")
    if labels.shape[:1] != inputs.shape[:1]:
        raise ValueError(
            f"inputs ({tuple(inputs.shape)}) and labels ({tuple(labels.shape)}) must have the "
            "same number of examples (first dimension)"
        )
    coupled = _coupling_modules(model)
    if coupled:
        raise PerExampleGradientsUnavailable(
            f"batch norm in train mode ({', '.join(coupled[:3])}"
            f"{', ...' if len(coupled) > 3 else ''}) couples the examples of a batch, so "
            "per-example gradients do not exist"
        )
    params = _trainable(parameters, model)
    ids = {id(p) for p in params}
    watched: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        (watched if id(p) in ids else rest)[n] = p.detach()
    if len(watched) != len(params):
        raise ValueError("parameters must be parameters of the model")
    rest.update(_buffer_copies(model))

    def example_loss(
        w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        output = functional_call(model, (w, rest), (x.unsqueeze(0),))
        loss = loss_fn(output, y.unsqueeze(0))
        return loss if loss.dim() == 0 else loss.mean()

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")
    step = batch if chunk_size is None else max(1, chunk_size)
    squares = torch.zeros((), dtype=torch.float64, device=inputs.device)
    total: dict[str, torch.Tensor] = {}
    devices = _devices(watched.values()) | {inputs.device}
    try:
        with preserved_rng(devices), torch.enable_grad():
            for lo in range(0, batch, step):
                grads = per_example(watched, inputs[lo : lo + step], labels[lo : lo + step])
                for n, g in grads.items():
                    flat = g.reshape(g.shape[0], -1)
                    norms = torch.linalg.vector_norm(flat, dim=1).to(torch.float64)
                    squares = squares + (norms**2).sum().to(squares.device)
                    s = flat.sum(0)
                    total[n] = s if n not in total else total[n] + s
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise PerExampleGradientsUnavailable(
            f"torch.func.vmap cannot compute per-example gradients of this model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    mean_sq = squares / batch
    mean_norm_sq = sum(
        ((t.to(torch.float64) / batch) ** 2).sum().to(squares.device) for t in total.values()
    )
    assert isinstance(mean_norm_sq, torch.Tensor)
    trace_cov = (mean_sq - mean_norm_sq) * (batch / (batch - 1))
    g_sq = mean_norm_sq - trace_cov / batch
    return NoiseScale(
        noise_scale=trace_cov / g_sq,
        trace_covariance=trace_cov,
        gradient_norm_squared=g_sq,
    )
