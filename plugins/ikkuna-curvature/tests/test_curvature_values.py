"""Correctness of the curvature plugin against independent computations: an explicit Hessian
(``torch.autograd.functional.hessian`` in float64 -> ``torch.linalg.eigvalsh``),
``torch.linalg.cond``, and per-example gradients from a plain Python loop of single-example
backward passes. Models: a small MLP and a small CNN."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend
from ikkuna_curvature import (
    ConditionNumber,
    GradientNoiseScale,
    HessianMaxEigenvalue,
    HessianTrace,
    ops,
)

N = 24  # examples per batch

#: the conftest fixture's reference: explicit_hessian(model, x, y, parameters=None)
HessianFn = Callable[..., torch.Tensor]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (6,)),
    "cnn": (cnn, (1, 7, 7)),
}


def problem(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, shape = MODELS[kind]
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, *shape, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def top_eigenvalue(h: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(h)[-1])


def run(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, subscribers: list[ik.Subscriber],
    steps: int = 2, lr: float = 0.3, **exporter_options: object,
) -> tuple[MemoryBackend, list[dict[str, torch.Tensor]]]:
    """Train ``steps`` SGD steps on ``(x, y)`` with the subscribers watching. Returns the
    backend and the parameters after each step: subscribers run at the end of the step,
    after ``optimizer.step()``, so step ``s``'s values belong to ``parameters[s]``."""
    bus = ik.MessageBus(on_error="raise")
    exporter = ik.Exporter(bus=bus, **exporter_options)  # type: ignore[arg-type]
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    for s in subscribers:
        bus.register_subscriber(s)
    backend = MemoryBackend()
    bus.add_backend(backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    after = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    exporter.close()
    return backend, after


# -------------------------------------------------------------------- top eigenvalue
@pytest.mark.parametrize(("kind", "lr"), [("mlp", 0.3), ("cnn", 1.0)])
def test_max_eigenvalue_matches_the_explicit_hessian_after_each_update(
    kind: str, lr: float, explicit_hessian: HessianFn
) -> None:
    model, x, y = problem(kind)
    before = top_eigenvalue(explicit_hessian(model, x, y))
    backend, after = run(model, x, y, [HessianMaxEigenvalue(subsample=1)], steps=3, lr=lr)
    tops = [top_eigenvalue(explicit_hessian(model, x, y, p)) for p in after]
    for step, top in enumerate(tops):  # step 0 cold, then warm-started from the last vector
        assert backend.scalar("hessian_max_eigenvalue", step) == pytest.approx(top, rel=1e-2)
        assert backend.scalar("hessian_max_eigenvalue/residual", step) <= 1e-2  # the default
        assert 1 <= backend.scalar("hessian_max_eigenvalue/iterations", step) <= 20
    # the updates move the top eigenvalue by more than the tolerance: the values above are
    # those of the parameters after each update, not before it
    assert max(abs(a / b - 1) for a, b in zip(tops, [before, *tops[:-1]], strict=False)) > 0.03


def test_a_warm_start_saves_iterations_and_a_tight_tolerance_holds(
    explicit_hessian: HessianFn,
) -> None:
    model, x, y = problem("cnn")
    top = top_eigenvalue(explicit_hessian(model, x, y))
    sub = HessianMaxEigenvalue(subsample=1, max_iterations=60, tolerance=1e-5)
    backend, _ = run(model, x, y, [sub], steps=2, lr=0.0)  # the same Hessian twice
    for step in (0, 1):
        assert backend.scalar("hessian_max_eigenvalue", step) == pytest.approx(top, rel=1e-6)
        assert backend.scalar("hessian_max_eigenvalue/residual", step) <= 1e-5
    cold = backend.scalar("hessian_max_eigenvalue/iterations", 0)
    warm = backend.scalar("hessian_max_eigenvalue/iterations", 1)
    assert 1 <= warm < cold <= 60


def test_a_budget_per_evaluation_continues_across_evaluations(
    explicit_hessian: HessianFn,
) -> None:
    """max_iterations = 2 products per evaluation: each evaluation starts from the last one's
    vector, so on a fixed Hessian the value climbs to the top eigenvalue over evaluations,
    and every evaluation publishes its true residual on the way."""
    model, x, y = problem("mlp")
    h = explicit_hessian(model, x, y)
    top = top_eigenvalue(h)
    sub = HessianMaxEigenvalue(subsample=1, max_iterations=2)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        backend, _ = run(model, x, y, [sub], steps=12, lr=0.0)
    values = [backend.scalar("hessian_max_eigenvalue", s) for s in range(12)]
    residuals = [backend.scalar("hessian_max_eigenvalue/residual", s) for s in range(12)]
    assert values[0] < 0.9 * top  # two products from a random vector: far off
    assert all(v <= top * (1 + 1e-6) for v in values)  # Rayleigh quotients: lower bounds
    assert values[-1] == pytest.approx(top, rel=1e-2)
    assert residuals[-1] <= 1e-2 < residuals[0]


@pytest.mark.parametrize(("include", "depth"), [((nn.Linear,), -1), (None, 1)])
def test_the_hessian_is_taken_over_the_watched_parameters(
    include: tuple[type[nn.Module], ...] | None, depth: int, explicit_hessian: HessianFn
) -> None:
    model, x, y = problem("cnn")
    if include is None:
        # depth 1 of a nested model: the convolutions' block is one watched module whose
        # parameters are its submodules': every parameter is watched
        model = nn.Sequential(nn.Sequential(*model[:4]), *model[4:])
    backend, after = run(
        model, x, y, [HessianMaxEigenvalue(subsample=1, tolerance=1e-3)], steps=1,
        include=include, depth=depth,
    )
    h = explicit_hessian(model, x, y, after[0])
    block = h
    if include is not None:  # only the Linear layer's weight and bias: that block
        sizes = [p.numel() for p in model.parameters()]
        start = sum(sizes[:-2])
        block = h[start:, start:]
    top = top_eigenvalue(block)
    assert backend.scalar("hessian_max_eigenvalue", 0) == pytest.approx(top, rel=1e-2)
    if include is not None:
        assert top < top_eigenvalue(h) * 0.99  # a different number


def test_lanczos_on_a_known_spectrum_reports_its_true_residual() -> None:
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    values = torch.linspace(-5.0, 2.0, 80, dtype=torch.float64)  # |min| > max: not power
    a = q @ torch.diag(values) @ q.T
    start = torch.randn(80, generator=g, dtype=torch.float64)
    result = ops.lanczos_max_eigenpair(lambda v: a @ v, start, tolerance=1e-8, max_iterations=80)
    assert result.converged
    assert float(result.eigenvalue) == pytest.approx(2.0, rel=1e-8)
    y = result.eigenvector
    assert float(torch.linalg.vector_norm(y)) == pytest.approx(1.0)
    true_residual = float(torch.linalg.vector_norm(a @ y - result.eigenvalue * y)) / 2.0
    assert true_residual <= 1e-8
    assert float(result.residual) == pytest.approx(true_residual, rel=0.1, abs=1e-12)

    short = ops.lanczos_max_eigenpair(lambda v: a @ v, start, tolerance=1e-8, max_iterations=3)
    assert not short.converged and short.iterations == 3
    assert float(short.eigenvalue) <= 2.0  # a Rayleigh quotient: a lower bound
    true_short = float(torch.linalg.vector_norm(a @ short.eigenvector - short.eigenvalue
                                                * short.eigenvector)) / abs(float(short.eigenvalue))
    assert float(short.residual) == pytest.approx(true_short, rel=1e-6)


def test_not_converging_warns_once_naming_the_options() -> None:
    model, x, y = problem("cnn")
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        backend, _ = run(
            model, x, y, [HessianMaxEigenvalue(subsample=1, max_iterations=2)], steps=3
        )
    messages = [str(w.message) for w in caught if "did not converge" in str(w.message)]
    assert len(messages) == 1
    assert "max_iterations = 2" in messages[0] and "tolerance 0.01" in messages[0]
    assert [backend.scalar("hessian_max_eigenvalue/iterations", s) for s in range(3)] == [2] * 3
    assert all(backend.scalar("hessian_max_eigenvalue/residual", s) > 1e-2 for s in range(3))


# ------------------------------------------------------------------------------ trace
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_trace_within_the_hutchinson_error_and_reproducible(
    kind: str, explicit_hessian: HessianFn
) -> None:
    model, x, y = problem(kind)
    probes, seed = 30, 7
    backend, after = run(
        model, x, y, [HessianTrace(subsample=1, probes=probes, seed=seed)], steps=1
    )
    h = explicit_hessian(model, x, y, after[0])
    estimate = backend.scalar("hessian_trace", 0)
    # Rademacher probes: Var(z'Hz) = 2 (||H||_F^2 - sum_i H_ii^2), so the estimator's
    # standard error at m probes is sqrt(that / m); a fixed seed must land within 3 of them.
    sigma = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / probes)
    assert abs(estimate - float(h.trace())) <= 3 * sigma
    # the same probes drawn here and applied to the explicit Hessian give the same estimate
    g = torch.Generator().manual_seed(seed)
    n = h.shape[0]
    zs = [torch.randint(0, 2, (n,), generator=g).double() * 2 - 1 for _ in range(probes)]
    samples = torch.stack([z @ h @ z for z in zs])
    assert estimate == pytest.approx(float(samples.mean()), rel=1e-4)
    assert backend.scalar("hessian_trace/stderr", 0) == pytest.approx(
        float(samples.std() / math.sqrt(probes)), rel=1e-3
    )


# ------------------------------------------------------------------- condition number
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_condition_number_equals_torch_linalg_cond_during_training(kind: str) -> None:
    model, x, y = problem(kind)
    backend, _ = run(model, x, y, [ConditionNumber(subsample=1)], steps=1, lr=0.5)
    weighted = [(k, m) for k, m in model.named_children() if hasattr(m, "weight")]
    assert len(weighted) == 3
    for key, module in weighted:  # the weights after the step's update
        w = module.weight.detach().double()
        expected = float(torch.linalg.cond(w.reshape(w.shape[0], -1)))
        assert backend.scalar(f"condition_number/weights/{key}", 0) == pytest.approx(
            expected, rel=1e-9
        )
    assert backend.tags() == {f"condition_number/weights/{k}" for k, _ in weighted}


def test_condition_numbers_batched_rank_deficient_and_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 2, 2, generator=g)
    b = torch.randn(7, 4, generator=g)
    c = torch.randn(5, 3, 2, 2, generator=g)
    deficient = torch.randn(6, 4, generator=g)
    deficient[:, 3] = 2 * deficient[:, 1]  # rank 3 < 4
    zero = torch.zeros(3, 3)
    got = ops.condition_numbers([a, b, c, deficient, zero])
    assert got.dtype == torch.float64
    for i, w in enumerate([a, b, c]):
        expected = torch.linalg.cond(w.double().reshape(w.shape[0], -1))
        assert float(got[i]) == pytest.approx(float(expected), rel=1e-10)
    assert torch.linalg.matrix_rank(deficient.double()) == 3
    assert math.isinf(float(got[3])) and math.isinf(float(got[4]))
    with pytest.raises(ValueError, match=r"weight 0 has shape \(4,\); a condition number needs"):
        ops.condition_numbers([torch.ones(4)])


# --------------------------------------------------------------- gradient noise scale
def loop_noise_scale(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float, float]:
    """B_simple from per-example gradients of a Python loop (one backward per example)."""
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    grads = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        grads.append(torch.cat([t.reshape(-1) for t in g]).double())
    per = torch.stack(grads)
    b = per.shape[0]
    mean = per.mean(0)
    trace_cov = float(((per - mean) ** 2).sum() / (b - 1))
    g_sq = float(mean @ mean) - trace_cov / b
    return trace_cov / g_sq, trace_cov, g_sq


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_noise_scale_equals_a_per_example_loop(kind: str, chunk_size: int | None) -> None:
    model, x, y = problem(kind)
    y = (x.reshape(N, -1)[:, :3].sum(1) > 0).long()  # learnable labels: |G|^2 > 0
    sub = GradientNoiseScale(subsample=1, chunk_size=chunk_size)
    backend, _ = run(model, x, y, [sub], steps=1)
    expected, trace_cov, g_sq = loop_noise_scale(model, x, y)  # after the step's update
    assert g_sq > 0
    assert backend.scalar("gradient_noise_scale", 0) == pytest.approx(expected, rel=1e-4)
    assert backend.scalar("gradient_noise_scale/trace_covariance", 0) == pytest.approx(
        trace_cov, rel=1e-4
    )
    assert backend.scalar("gradient_noise_scale/gradient_norm_squared", 0) == pytest.approx(
        g_sq, rel=1e-4
    )


def test_noise_scale_on_train_mode_batch_norm_says_why_and_disables_itself() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(N, 6), torch.randint(0, 3, (N,))
    sub = GradientNoiseScale(subsample=1)
    with pytest.warns(RuntimeWarning) as caught:
        backend, _ = run(model, x, y, [sub, HessianTrace(subsample=1, probes=2)], steps=3)
    messages = [str(w.message) for w in caught if "gradient_noise_scale" in str(w.message)]
    assert len(messages) == 1
    assert "'1' (BatchNorm1d)" in messages[0] and "couples the examples" in messages[0]
    assert "GroupNorm/LayerNorm" in messages[0] and "training is not affected" in messages[0]
    assert not sub.enabled
    assert not any(t.startswith("gradient_noise_scale") for t in backend.tags())
    assert [backend.scalar("hessian_trace", s) for s in range(3)]  # training went on
    # in eval mode batch norm is a fixed affine map: per-example gradients exist
    model.eval()
    value = ops.gradient_noise_scale(model, nn.CrossEntropyLoss(), x, y)
    assert torch.isfinite(value.trace_covariance)


# ------------------------------------------------------------------------- options
def test_options_defaults_and_errors() -> None:
    for cls in (ConditionNumber, HessianMaxEigenvalue, HessianTrace, GradientNoiseScale):
        assert cls().options.subsample == 50
    assert HessianMaxEigenvalue().options.topics == ["input_data", "input_labels"]
    assert HessianMaxEigenvalue().output_topics() == [
        "hessian_max_eigenvalue",
        "hessian_max_eigenvalue/iterations",
        "hessian_max_eigenvalue/residual",
    ]
    with pytest.raises(ValueError, match=r"two tensor topics \[inputs, labels\]"):
        HessianTrace(topics=["input_data"])
    with pytest.raises(ValueError, match="probes"):
        HessianTrace(probes=0)
    with pytest.raises(ValueError, match=r"max_iterations: .*greater than or equal to 2"):
        HessianMaxEigenvalue(max_iterations=1)
    assert HessianMaxEigenvalue().options.tolerance == 1e-2
    with pytest.raises(ValueError, match="batch_started"):
        ConditionNumber(topics=["batch_started"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_values_are_the_cpu_ones(explicit_hessian: HessianFn) -> None:
    model, x, y = problem("cnn")
    y = (x.reshape(N, -1)[:, :3].sum(1) > 0).long()
    reference = copy.deepcopy(model)
    subscribers = [
        ConditionNumber(subsample=1), HessianMaxEigenvalue(subsample=1, tolerance=1e-3),
        HessianTrace(subsample=1, probes=30), GradientNoiseScale(subsample=1),
    ]
    backend, after = run(model.cuda(), x.cuda(), y.cuda(), subscribers, steps=2)
    for step in (0, 1):  # references on the CPU, at the parameters after each update
        params = {n: p.cpu() for n, p in after[step].items()}
        reference.load_state_dict(params)
        h = explicit_hessian(reference, x, y)
        sigma = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / 30)
        assert backend.scalar("hessian_max_eigenvalue", step) == pytest.approx(
            top_eigenvalue(h), rel=1e-2
        )
        assert abs(backend.scalar("hessian_trace", step) - float(h.trace())) <= 3 * sigma
        noise, _, _ = loop_noise_scale(reference, x, y)
        assert backend.scalar("gradient_noise_scale", step) == pytest.approx(noise, rel=1e-3)
        w = params["0.weight"].double()
        assert backend.scalar("condition_number/weights/0", step) == pytest.approx(
            float(torch.linalg.cond(w.reshape(w.shape[0], -1))), rel=1e-6
        )


class _Branching(nn.Module):
    """Python control flow on a tensor value: vmap cannot batch it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


def test_noise_scale_where_vmap_fails_says_why_and_disables_itself() -> None:
    torch.manual_seed(0)
    model = _Branching()
    x, y = torch.randn(N, 6), torch.randint(0, 3, (N,))
    sub = GradientNoiseScale(subsample=1)
    with pytest.warns(RuntimeWarning, match="torch.func.vmap cannot compute") as caught:
        backend, _ = run(model, x, y, [sub, ConditionNumber(subsample=1)], steps=2)
    assert len([w for w in caught if "gradient_noise_scale" in str(w.message)]) == 1
    assert not sub.enabled
    assert backend.tags() == {"condition_number/weights/linear"}


def test_noise_scale_skips_a_batch_of_one_example() -> None:
    model, x, y = problem("mlp")
    sub = GradientNoiseScale(subsample=1)
    backend, _ = run(model, x[:1], y[:1], [sub, HessianTrace(subsample=1, probes=2)], steps=2)
    assert sub.enabled
    assert {t for t in backend.tags() if t.startswith("gradient_noise_scale")} == set()
    assert [backend.scalar("hessian_trace", s) for s in (0, 1)]
