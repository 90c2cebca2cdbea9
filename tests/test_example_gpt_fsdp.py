"""examples/gpt_fsdp.py, run for real: a small GPT on two ``gloo`` ranks (127.0.0.1, CPU)
with FSDP2, checkpointed blocks and torch.compile (``aot_eager``), watched by Ikkuna with
norms and histograms; what its TensorBoard log holds (read back by TensorBoard's
``EventAccumulator``) is compared with a single-process run of the same model from the same
seed on the whole global batch, without FSDP, compile or checkpointing, computed here with
plain torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import ikkuna_core as ik

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt_fsdp.py"
# the first step compiles; the others must not (the capture's first step differs from theirs)
STEPS = 3
BATCH = 8
LR = 3e-3
BINS = 32  # the example's
PARAM_TOPICS = ("weights", "weight_gradients", "weight_updates")


def _example() -> ModuleType:
    """The example script as a module (registered: its dataclass looks its module up)."""
    name = "gpt_fsdp_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _event_log(log_dir: Path) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], Any]]:
    """Every scalar and histogram of the TensorBoard log in ``log_dir``, by (tag, step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    hists = {(tag, e.step): e.histogram_value
             for tag in acc.Tags()["histograms"] for e in acc.Histograms(tag)}
    return scalars, hists


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The example on two spawned ranks; its log read back."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    log_dir = tmp_path_factory.mktemp("gpt_fsdp")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if os.environ.get("PYTHONPATH"):  # the ranks import the ikkuna_core this test imports
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cmd = [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--ranks", "2",
           "--backend", "aot_eager", "--batch-size", str(BATCH), "--lr", str(LR),
           "--log-dir", str(log_dir), "--overwrite"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    scalars, hists = _event_log(log_dir)
    summary = json.loads((log_dir / "summary.json").read_text())
    return {"scalars": scalars, "histograms": hists, "summary": summary}


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """The same model and data in this process: the whole global batch, no FSDP, no compile,
    no checkpointing, no Ikkuna; per step the weights after it, the gradients, the updates,
    and the activation norms of rank 0's half of the batch (the weights before the step)."""
    ex = _example()
    cfg = ex.GPTConfig()
    model = ex.build_model(cfg, seed=0)
    probe = ex.build_model(cfg, seed=0)
    optimizer = ex.make_optimizer(model, LR)
    steps = []
    for step in range(STEPS):
        x, y = ex.global_batch(cfg, 0, step, BATCH)
        probe.load_state_dict(model.state_dict())
        acts = _activation_norms(probe, x.chunk(2)[0])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad(set_to_none=True)
        loss = ex.lm_loss(model(x), y)
        loss.backward()
        optimizer.step()
        steps.append({
            "loss": float(loss.detach()), "activations": acts,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "weight_gradients": {n: p.grad.clone() for n, p in model.named_parameters()},
            "weight_updates": {n: p.detach() - before[n] for n, p in model.named_parameters()},
        })
    return {"steps": steps, "keys": [n[: -len(".weight")] for n, _ in model.named_parameters()
                                     if n.endswith(".weight")]}


def _activation_norms(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The norm of each leaf module's output in a forward of ``x``."""
    norms: dict[str, float] = {}

    def keep(name: str) -> Any:
        return lambda _module, _args, out: norms.__setitem__(name, _norm(out))

    handles = [m.register_forward_hook(keep(name)) for name, m in model.named_modules()
               if not list(m.children())]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return norms


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().double()))


def test_the_published_norms_equal_the_single_process_run(two_ranks, single):
    scalars = two_ranks["scalars"]
    keys = single["keys"]
    assert len(keys) == 2 + 4 * 6 + 2  # embeddings, 6 per block, ln_f and head
    for step, ref in enumerate(single["steps"]):
        for topic in PARAM_TOPICS:
            for key in keys:
                got = scalars[(f"norm/{topic}/{key}", step)]
                want = _norm(ref[topic][f"{key}.weight"])
                assert got == pytest.approx(want, rel=1e-4), (topic, key, step)
        # each rank's activations are of its own half of the batch: rank 0's are published
        for key, want in ref["activations"].items():
            assert scalars[(f"norm/activations/{key}", step)] == pytest.approx(want, rel=1e-4), \
                (key, step)
    # the loss averaged over the ranks is the mean over the global batch
    assert two_ranks["summary"]["losses"] == pytest.approx(
        [s["loss"] for s in single["steps"]], rel=1e-4)


def _assert_same_counts(got: list[float], full: torch.Tensor, bins: int) -> None:
    """The counts of ``full``'s histogram (the single-process tensor, its own min..max edges),
    but for entries that lie at a bin edge within float noise (1e-4 of the range): the two
    runs sum in different orders, so such an entry may fall on either side of the edge. At
    every inner edge the cumulative counts may differ by those entries only."""
    want = ik.ops.histograms([full], bins=bins)
    edges = want.edges[0, 1:-1].double()
    values = full.detach().double().flatten()
    noise = 1e-4 * float(values.max() - values.min())
    near = ((values[:, None] - edges[None, :]).abs() <= noise).sum(dim=0)
    cum_got = torch.tensor(got, dtype=torch.float64).cumsum(0)[:-1]
    cum_want = want.counts[0].double().cumsum(0)[:-1]
    assert sum(got) == values.numel()
    assert ((cum_got - cum_want).abs() <= near).all(), (got, want.counts[0].tolist())


def test_the_published_histograms_count_what_the_single_process_run_holds(two_ranks, single):
    hists = two_ranks["histograms"]
    exact = 0
    for step, ref in enumerate(single["steps"]):
        for topic in PARAM_TOPICS:
            for key in single["keys"]:
                got = hists[(f"histogram/{topic}/{key}", step)]
                full = ref[topic][f"{key}.weight"]
                _assert_same_counts(list(got.bucket), full, bins=BINS)
                exact += list(got.bucket) == ik.ops.histograms([full], bins=BINS).counts[0].tolist()
                assert got.num == full.numel()
                assert (got.min, got.max) == pytest.approx(
                    (float(full.min()), float(full.max())), rel=1e-4, abs=1e-7)
                assert got.sum_squares == pytest.approx(_norm(full) ** 2, rel=1e-4)
    # nearly every histogram is exactly the single-process one
    assert exact >= 0.95 * STEPS * len(PARAM_TOPICS) * len(single["keys"])


def test_the_tags_are_the_plain_models_and_the_compiled_blocks_did_not_recompile(two_ranks,
                                                                                 single):
    tags = {tag for tag, _ in two_ranks["scalars"]} | {tag for tag, _ in two_ranks["histograms"]}
    assert not any("#" in tag for tag in tags)  # the recomputation published no second call
    assert not any("_orig_mod" in tag or "_fsdp" in tag for tag in tags)
    expected = {f"{kind}/{topic}/{key}" for kind in ("norm", "histogram")
                for topic in PARAM_TOPICS for key in single["keys"]}
    expected |= {f"norm/activations/{key}" for key in single["steps"][0]["activations"]}
    assert tags == expected
    compiler = two_ranks["summary"]["compiler"]
    assert compiler["graph_breaks"] == {}
    # the 4 watched blocks share one graph, as unwatched ones do (see the example), compiled
    # at the first step, never again
    assert compiler["graphs_after_each_step"] == [1] * STEPS
