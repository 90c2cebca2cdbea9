"""MessageBus: step delivery, synchronised topics, derived topics, subsampling, flushing and
the error policy for subscribers and backends."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend


def info(key: str) -> ik.ModuleInfo:
    return ik.ModuleInfo(name=key, type="Linear")


def payloads(topic: str, values: dict[str, torch.Tensor | float]) -> ik.TopicPayloads:
    return ik.TopicPayloads(
        topic=topic,
        keys=list(values),
        modules=[info(k) for k in values],
        data=[v if isinstance(v, torch.Tensor) else torch.tensor([float(v)])
              for v in values.values()],
    )


def step(bus: ik.MessageBus, n: int, **topics: dict[str, torch.Tensor | float]) -> None:
    bus.deliver((n, 0, n), {t: payloads(t, v) for t, v in topics.items()})


class Collect(ik.Subscriber):
    name = "collect"

    def __init__(self, **options):
        super().__init__(**options)
        self.bundles: list[ik.MessageBundle] = []

    def compute(self, bundle):
        self.bundles.append(bundle)


class SyncCollect(Collect):
    name = "sync_collect"
    synchronized = True


def test_unknown_topic_lists_known_ones():
    bus = ik.MessageBus()
    with pytest.raises(ik.UnknownTopicError) as err:
        bus.register_subscriber(Collect(topics=["weight_gradient"]))
    msg = str(err.value)
    assert "'weight_gradient'" in msg and "weight_gradients" in msg and "activations" in msg


def test_topic_tables_are_per_bus():
    a, b = ik.MessageBus(), ik.MessageBus()
    a.register_topic("curvature", "module", "plugin topic")
    assert "curvature" in a.topics and "curvature" not in b.topics
    with pytest.raises(ValueError, match="already registered as a module"):
        a.register_topic("curvature", "network")


def test_synchronized_bundles_hold_the_keys_common_to_all_topics():
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(SyncCollect(topics=["weights", "weight_updates"]))
    step(bus, 0, weights={"fc": 1.0})  # no weight_updates at this step: nothing delivered
    assert sub.bundles == []
    step(bus, 1, weights={"other": 3.0, "fc": 4.0}, weight_updates={"fc": 2.0, "gone": 5.0})
    assert len(sub.bundles) == 1
    bundle = sub.bundles[0]
    assert bundle.topics == ("weights", "weight_updates")  # subscription order
    assert bundle.key == "fc" and bundle.global_step == 1 and bundle.module == info("fc")
    assert bundle["weights"].item() == 4.0 and bundle["weight_updates"].item() == 2.0
    with pytest.raises(KeyError, match="holds"):
        bundle["activations"]


def test_a_synchronized_subscriber_that_never_completes_is_reported_once():
    bus = ik.MessageBus(on_error="raise")
    bus.register_subscriber(SyncCollect(topics=["weights", "weight_updates"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(6):
            step(bus, n, weights={"fc": 1.0})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "'sync_collect'" in messages[0] and "['weight_updates'] had no payload" in messages[0]
    assert "in 3 steps up to step 2" in messages[0]


def test_single_topic_subscriptions_and_subsample():
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(Collect(topics=["weights", "biases"], subsample=2))
    for n in range(5):
        step(bus, n, weights={"fc": n, "fc2": -n}, biases={"fc": n})
    assert [(b.topics, b.key, b.global_step) for b in sub.bundles] == [
        item for n in (0, 2, 4)
        for item in ((("weights",), "fc", n), (("weights",), "fc2", n), (("biases",), "fc", n))
    ]
    assert bus.wanted_topics(3) == frozenset()
    assert bus.wanted_topics(4) == {"weights", "biases"}


class Double(ik.Subscriber):
    name = "double"

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle[bundle.topics[0]].sum() * 2)


def test_derived_topics_reach_later_subscribers_and_backends():
    bus = ik.MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Double(topics=["weights"]))
    assert "double/weights" in bus.topics
    chained = bus.register_subscriber(Double(topics=["double/weights"], publish_as="quad"))
    collect = bus.register_subscriber(Collect(topics=["quad"]))
    step(bus, 0, weights={"fc": 1.5, "fc2": 2.0})
    assert [(b.key, b["quad"].item()) for b in collect.bundles] == [("fc", 6.0), ("fc2", 8.0)]
    assert collect.bundles[0].module == info("fc")
    assert backend.scalar("double/weights/fc", 0) == 3.0
    assert backend.scalar("quad/fc2", 0) == 8.0
    assert chained.output_topics() == ["quad"]


class StepNorms(ik.Subscriber):
    """A step-level subscriber: one call per step, one vector of values."""

    name = "step_norms"

    def __init__(self, **options):
        super().__init__(**options)
        self.calls: list[tuple[int, list[str | None]]] = []

    def compute_step(self, step):
        payloads = step[step.topics[0]]
        self.calls.append((step.global_step, payloads.keys))
        self.publish_scalars(step, ik.ops.norms(payloads.tensors()))


def test_step_level_subscribers_get_every_module_at_once():
    bus = ik.MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    sub = bus.register_subscriber(StepNorms(topics=["weights"]))
    collect = bus.register_subscriber(Collect(topics=["step_norms/weights"]))
    w = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[1.0, 2.0], [2.0, 4.0]])}
    step(bus, 0, weights=w)
    assert sub.calls == [(0, ["a", "b"])]
    assert backend.scalar("step_norms/weights/a", 0) == pytest.approx(5.0)
    assert backend.scalar("step_norms/weights/b", 0) == pytest.approx(5.0)
    # one message for the whole topic: the values travel as one tensor
    assert [b.key for b in collect.bundles] == ["a", "b"]


def test_subscribers_of_one_step_share_the_norms_of_the_same_payloads(monkeypatch):
    """Two subscribers reading the norms of the same payloads in one step: one reduction
    of them (the elements ``_foreach_norm`` reads, counted), each value the norm computed
    here; a p of its own, another step: reduced again. Outside a step nothing is shared."""
    reads: list[int] = []
    foreach_norm = torch._foreach_norm

    def counted(tensors, *args, **kwargs):
        reads.append(sum(t.numel() for t in tensors))
        return foreach_norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counted)

    class Norms(StepNorms):
        def __init__(self, p: float = 2.0, **options):
            super().__init__(**options)
            self.p, self.values = p, []

        def compute_step(self, step):
            self.values.append(ik.ops.norms(step["weights"].tensors(), p=self.p).tolist())

    bus = ik.MessageBus(on_error="raise")
    first = bus.register_subscriber(Norms(topics=["weights"]))
    second = bus.register_subscriber(Norms(topics=["weights"], publish_as="again"))
    third = bus.register_subscriber(Norms(p=1.0, topics=["weights"], publish_as="l1"))
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(30, generator=g), "b": torch.randn(4, 5, generator=g)}
    step(bus, 0, weights=w)
    assert reads == [50, 50]  # the L2 norms once, the L1 norms once
    want = [float(torch.linalg.vector_norm(t.double())) for t in w.values()]
    assert first.values[0] == pytest.approx(want, rel=1e-6)
    assert second.values[0] == first.values[0]
    assert third.values[0] == pytest.approx([float(t.abs().sum()) for t in w.values()],
                                            rel=1e-6)
    w["a"].mul_(2.0)  # changed between steps: the next step reduces it again
    step(bus, 1, weights=w)
    assert reads == [50, 50, 50, 50]
    assert second.values[1][0] == pytest.approx(2 * want[0], rel=1e-6)
    ik.ops.norms(list(w.values()))
    ik.ops.norms(list(w.values()))
    assert reads[4:] == [50, 50]


def test_publishing_outside_a_step_is_an_error():
    bus = ik.MessageBus()
    sub = bus.register_subscriber(Double(topics=["weights"]))
    message = ik.ModuleMessage(topic="weights", global_step=0, epoch=0, batch_index=0,
                               module=info("fc"), data=torch.ones(1))
    bundle = ik.MessageBundle(key="fc", global_step=0, epoch=0, batch_index=0,
                              messages={"weights": message})
    with pytest.raises(RuntimeError, match="outside its compute"):
        sub.publish_scalar(bundle, 1.0)


class Broken(ik.Subscriber):
    name = "broken"

    def compute(self, bundle):
        raise ZeroDivisionError("oops")


def test_error_policy_raise_names_the_subscriber_topic_and_step():
    bus = ik.MessageBus(on_error="raise")
    bus.register_subscriber(Broken(topics=["weights"]))
    with pytest.raises(ik.SubscriberError) as err:
        step(bus, 7, weights={"fc": 1.0})
    assert str(err.value) == (
        "subscriber 'broken' failed at step 7 on topic 'weights': ZeroDivisionError: oops"
    )
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_error_policy_warn_disables_the_subscriber():
    bus = ik.MessageBus(on_error="warn")
    broken = bus.register_subscriber(Broken(topics=["weights"]))
    ok = bus.register_subscriber(Collect(topics=["weights"]))
    with pytest.warns(RuntimeWarning, match="'broken' failed at step 0 on topic 'weights'"):
        step(bus, 0, weights={"fc": 1.0})
    step(bus, 1, weights={"fc": 1.0})
    assert not broken.enabled and len(ok.bundles) == 2


def test_flush_moves_values_once_and_respects_flush_every():
    bus = ik.MessageBus(on_error="raise", flush_every=3)
    backend = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Double(topics=["weights"]))
    for n in range(4):
        step(bus, n, weights={"fc": n})
    assert [r.step for r in backend.scalars] == [0, 1, 2]
    bus.close()
    assert [r.value for r in backend.scalars] == [0.0, 2.0, 4.0, 6.0] and backend.closed


class FailingBackend(MemoryBackend):
    name = "failing"

    def write_scalars(self, records):
        raise OSError(28, "No space left on device")

    def close(self):
        raise OSError("cannot close")


def test_a_failing_backend_is_named_and_the_others_get_their_records():
    bus = ik.MessageBus(on_error="raise")
    first = bus.add_backend(MemoryBackend())
    bus.add_backend(FailingBackend())
    last = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Double(topics=["weights"]))
    with pytest.raises(ik.BackendError, match="backend 'failing' .*No space left on device"):
        step(bus, 0, weights={"fc": 1.0})
    assert first.scalar("double/weights/fc", 0) == last.scalar("double/weights/fc", 0) == 2.0

    bus = ik.MessageBus(on_error="warn")
    failing = bus.add_backend(FailingBackend())
    good = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Double(topics=["weights"]))
    with pytest.warns(RuntimeWarning, match="backend 'failing'"):
        step(bus, 0, weights={"fc": 1.0})
    step(bus, 1, weights={"fc": 2.0})
    assert failing not in bus.backends and [r.value for r in good.scalars] == [2.0, 4.0]


def test_close_closes_every_backend_and_reports_failures_together():
    bus = ik.MessageBus()
    a = bus.add_backend(MemoryBackend())
    bus.add_backend(FailingBackend())
    b = bus.add_backend(MemoryBackend())
    with pytest.raises(ExceptionGroup, match=r"backends\[1\] 'failing' raised OSError"):
        bus.close()
    assert a.closed and b.closed


class Hist(ik.Subscriber):
    name = "hist"

    def compute(self, bundle):
        self.publish_histogram(bundle, bundle.tensor(bundle.topics[0]), bins=4)


def test_nonfinite_values_are_written_as_a_scalar_and_warned_once_per_tag():
    bus = ik.MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Hist(topics=["activations"]))
    bad = torch.tensor([0.0, 1.0, float("nan"), 2.0])
    allbad = torch.full((3,), float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(3):
            step(bus, n, activations={"a": bad, "b": allbad})
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "hist/activations/a at step 0: 1 non-finite value(s) (NaN/inf) among 4" in messages[0]
    assert "hist/activations/b at step 0: 3 non-finite" in messages[1]
    assert backend.scalar("hist/activations/a/nonfinite", 2) == 1
    assert backend.scalar("hist/activations/b/nonfinite", 2) == 3
    h = backend.histogram("hist/activations/b", 1)  # all non-finite: written, empty bins
    assert h.num == 0 and h.counts.sum() == 0 and h.nonfinite == 3
    h = backend.histogram("hist/activations/a", 1)
    assert h.num == 3 and h.counts.tolist() == np.histogram([0, 1, 2], bins=4)[0].tolist()


def test_subscriber_options_are_validated():
    with pytest.raises(ValueError, match="subsample"):
        Collect(topics=["weights"], subsample=0)
    with pytest.raises(ValueError, match="colour"):
        Collect(topics=["weights"], colour="red")
    with pytest.raises(ValueError, match="topics: it needs at least one topic"):
        Collect(topics=[])

    class Nameless(ik.Subscriber):
        pass

    with pytest.raises(TypeError, match="name"):
        Nameless()


def test_publish_as_may_not_shadow_a_topic():
    bus = ik.MessageBus()
    with pytest.raises(ValueError, match="already a topic of this bus"):
        bus.register_subscriber(Double(topics=["weights"], publish_as="loss"))
    with pytest.raises(ValueError, match="its own input topic 'weights'"):
        bus.register_subscriber(Double(topics=["weights"], publish_as="weights"))


def test_tensor_options_reject_event_topics_and_bundle_tensor_detaches():
    class Tensorish(Collect):
        name = "tensorish"
        Options = ik.TensorOptions

    with pytest.raises(ValueError, match=r"topics \['batch_finished'\] carry no tensor payload"):
        Tensorish(topics=["weights", "batch_finished"])
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(Tensorish(topics=["weights"]))
    data = torch.ones(2, requires_grad=True) * 3
    step(bus, 0, weights={"fc": data})
    tensor = sub.bundles[0].tensor("weights")
    assert tensor.tolist() == [3.0, 3.0] and not tensor.requires_grad
    event = ik.MessageBundle(key=None, global_step=0, epoch=0, batch_index=0, messages={
        "batch_started": ik.NetworkMessage(topic="batch_started", global_step=0, epoch=0,
                                           batch_index=0)})
    with pytest.raises(ValueError, match="'batch_started' carries no tensor payload"):
        event.tensor("batch_started")


class Scalar(ik.Subscriber):
    name = "sc"

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle.tensor(bundle.topics[0]).sum())


def test_a_nonfinite_scalar_is_warned_as_what_it_is():
    """A NaN scalar has no bins and no '<tag>/nonfinite' companion: the warning says the value
    (issue 16: it claimed a count in a tag that is never written)."""
    bus = ik.MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Scalar(topics=["activations"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(bus, 0, activations={"a": torch.tensor([1.0, float("nan")])})
    messages = [str(w.message) for w in caught]
    assert messages == ["ikkuna: sc/activations/a at step 0: the value is nan (written as it is)"]
    assert math.isnan(backend.scalar("sc/activations/a", 0))
    assert backend.tags() == {"sc/activations/a"}  # no 'nonfinite' tag, as the warning says


class SumOf(ik.Subscriber):
    name = "sum_of"

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle.tensor(bundle.topics[0]).sum())


class MaxOf(ik.Subscriber):
    name = "max_of"

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle.tensor(bundle.topics[0]).max())


class HistOf(ik.Subscriber):
    name = "hist_of"

    def compute(self, bundle):
        self.publish_histogram(bundle, bundle.tensor(bundle.topics[0]), bins=3)


def test_results_of_equal_size_reach_their_own_tags_through_the_host_transfer():
    """Two topics (and two histogram topics) with the same number of values each: every
    record holds its own values, computed here from the payloads (issue 16: two equal-sized
    topics swapped in the transfer passed, only a length check could have fired)."""
    bus = ik.MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    for sub in (SumOf(topics=["weights"]), MaxOf(topics=["weights"]),
                HistOf(topics=["weights"]), HistOf(topics=["biases"])):
        bus.register_subscriber(sub)
    weights = {"a": torch.tensor([1.0, 2.0, 7.0]), "b": torch.tensor([-3.0, 0.5, 4.0])}
    biases = {"a": torch.tensor([10.0, 20.0, 60.0]), "b": torch.tensor([0.0, 0.0, 9.0])}
    step(bus, 0, weights=weights, biases=biases)
    bus.flush()
    for key, w in weights.items():
        assert backend.scalar(f"sum_of/weights/{key}", 0) == float(w.sum())
        assert backend.scalar(f"max_of/weights/{key}", 0) == float(w.max())
    for topic, values in (("weights", weights), ("biases", biases)):
        for key, v in values.items():
            h = backend.histogram(f"hist_of/{topic}/{key}", 0)
            counts, edges = np.histogram(v.numpy(), bins=3)
            assert h.counts.tolist() == counts.tolist(), (topic, key)
            assert h.edges == pytest.approx(edges)
            assert (h.min, h.max, h.sum) == pytest.approx(
                (float(v.min()), float(v.max()), float(v.sum())))


def test_a_fixed_range_histogram_does_not_bin_nonfinite_values():
    """With ``range``, NaN and inf are counted as non-finite, never in a bin (rows of equal
    length, so no padding hides a bug)."""
    nan, inf = float("nan"), float("inf")
    rows = [torch.tensor([0.5, nan, inf, -inf, -0.5, 0.25]),
            torch.tensor([nan, nan, nan, 0.1, 0.2, 0.9])]
    h = ik.ops.histograms(rows, bins=4, range=(-1.0, 1.0))
    for i, row in enumerate(rows):
        finite = row[torch.isfinite(row)].numpy()
        counts, edges = np.histogram(finite, bins=4, range=(-1.0, 1.0))
        assert h.counts[i].tolist() == counts.tolist(), i
        assert h.edges[i].tolist() == pytest.approx(edges.tolist())
        assert int(h.nonfinite[i]) == int((~torch.isfinite(row)).sum())
        assert int(h.num[i]) == len(finite)
