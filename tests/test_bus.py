"""MessageBus routing, synchronised bundles, derived topics, subsampling and error policy."""

from __future__ import annotations

import pytest
import torch

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

INFO = ik.ModuleInfo(name="fc", type="Linear")


def module_msg(topic: str, step: int, value: float, key: str = "fc") -> ik.ModuleMessage:
    info = INFO if key == "fc" else ik.ModuleInfo(name=key, type="Linear")
    return ik.ModuleMessage(topic=topic, global_step=step, epoch=0, batch_index=step,
                            module=info, data=torch.tensor([value]))


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


def test_synchronized_bundle_is_complete_and_stale_ones_are_dropped():
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(SyncCollect(topics=["weights", "weight_updates"]))
    subscription = bus.subscriptions[0]
    bus.publish(module_msg("weights", 0, 1.0))
    assert sub.bundles == [] and subscription.pending == 1
    bus.step_finished(0)  # the step ends without weight_updates: dropped, never delivered
    assert subscription.pending == 0
    bus.publish(module_msg("weight_updates", 1, 2.0))
    bus.publish(module_msg("weights", 1, 3.0, key="other"))
    bus.publish(module_msg("weights", 1, 4.0))
    assert len(sub.bundles) == 1
    bundle = sub.bundles[0]
    assert bundle.topics == ("weights", "weight_updates")  # subscription order
    assert bundle.key == "fc" and bundle.global_step == 1 and bundle.module == INFO
    assert bundle["weights"].item() == 4.0 and bundle["weight_updates"].item() == 2.0
    with pytest.raises(KeyError, match="holds"):
        bundle["activations"]
    bus.step_finished(1)
    assert subscription.pending == 0


def test_waiting_payloads_are_cloned_against_inplace_changes():
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(SyncCollect(topics=["activations", "layer_gradients"]))
    act = torch.tensor([-1.0, 2.0])
    bus.publish(module_msg("activations", 0, 0.0).model_copy(update={"data": act}))
    act.clamp_(min=0)  # an in-place ReLU after the module
    bus.publish(module_msg("layer_gradients", 0, 5.0))
    assert sub.bundles[0]["activations"].tolist() == [-1.0, 2.0]


def test_single_topic_subscriptions_and_subsample():
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(Collect(topics=["weights", "biases"], subsample=2))
    for step in range(5):
        bus.publish(module_msg("weights", step, step))
        bus.publish(module_msg("biases", step, step))
    assert [(b.topics, b.global_step) for b in sub.bundles] == [
        (("weights",), 0), (("biases",), 0), (("weights",), 2), (("biases",), 2),
        (("weights",), 4), (("biases",), 4),
    ]
    assert bus.wanted_topics(3) == frozenset()
    assert bus.wanted_topics(4) == {"weights", "biases"}


class Double(ik.Subscriber):
    name = "double"

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle[bundle.topics[0]].sum() * 2)


def test_derived_topics_reach_other_subscribers_and_backends():
    bus = ik.MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Double(topics=["weights"]))
    assert "double/weights" in bus.topics
    chained = bus.register_subscriber(Double(topics=["double/weights"], publish_as="quad"))
    collect = bus.register_subscriber(Collect(topics=["quad"]))
    bus.publish(module_msg("weights", 0, 1.5))
    assert collect.bundles[0]["quad"].item() == 6.0
    assert collect.bundles[0].key == "fc"
    bus.step_finished(0)
    assert backend.scalar("double/weights/fc", 0) == 3.0
    assert backend.scalar("quad/fc", 0) == 6.0
    assert chained.output_topics() == ["quad"]


class Broken(ik.Subscriber):
    name = "broken"

    def compute(self, bundle):
        raise ZeroDivisionError("oops")


def test_error_policy_raise_or_warn_and_disable():
    bus = ik.MessageBus(on_error="raise")
    bus.register_subscriber(Broken(topics=["weights"]))
    with pytest.raises(ZeroDivisionError):
        bus.publish(module_msg("weights", 0, 1.0))

    bus = ik.MessageBus(on_error="warn")
    broken = bus.register_subscriber(Broken(topics=["weights"]))
    ok = bus.register_subscriber(Collect(topics=["weights"]))
    with pytest.warns(RuntimeWarning, match="'broken' raised ZeroDivisionError: oops"):
        bus.publish(module_msg("weights", 0, 1.0))
    bus.publish(module_msg("weights", 1, 1.0))
    assert not broken.enabled and len(ok.bundles) == 2


def test_flush_moves_values_once_and_respects_flush_every():
    bus = ik.MessageBus(on_error="raise", flush_every=3)
    backend = bus.add_backend(MemoryBackend())
    bus.register_subscriber(Double(topics=["weights"]))
    for step in range(4):
        bus.publish(module_msg("weights", step, step))
        bus.step_finished(step)
    assert [r.step for r in backend.scalars] == [0, 1, 2]
    bus.close()
    assert [r.value for r in backend.scalars] == [0.0, 2.0, 4.0, 6.0] and backend.closed


def test_subscriber_options_are_validated():
    with pytest.raises(ValueError, match="subsample"):
        Collect(topics=["weights"], subsample=0)
    with pytest.raises(ValueError, match="colour"):
        Collect(topics=["weights"], colour="red")

    class Nameless(ik.Subscriber):
        pass

    with pytest.raises(TypeError, match="name"):
        Nameless()


def test_histogram_on_device_counts_finite_values():
    values = torch.tensor([0.0, 0.5, 1.0, float("nan"), float("inf"), 0.25])
    h = ik.histogram_on_device(values, bins=4, range=(0.0, 1.0))
    assert h["data"].tolist() == [1.0, 1.0, 1.0, 1.0]  # torch.histc([0,.25,.5,1], 4, 0, 1)
    assert torch.equal(h["data"].float(), torch.histc(torch.tensor([0, .5, 1, .25]), 4, 0, 1))
    assert h["nonfinite"].item() == 2 and h["num"].item() == 4
    assert h["sum"].item() == 1.75 and h["min"].item() == 0.0 and h["max"].item() == 1.0
    auto = ik.histogram_on_device(torch.tensor([-2.0, 2.0, 0.0]), bins=2)
    assert auto["edges"].tolist() == [-2.0, 0.0, 2.0] and auto["data"].tolist() == [1.0, 2.0]


def test_background_worker_gives_the_same_results_and_reraises(recorder_cls):
    from torch import nn

    def run(background: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
        bus = ik.MessageBus(on_error="raise", background=background)
        backend = bus.add_backend(MemoryBackend())
        exporter = ik.Exporter(bus=bus)
        exporter.set_model(model)
        bus.register_subscriber(Double(topics=["activations", "weight_updates"]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        exporter.close()
        return [r.value for r in sorted(backend.scalars, key=lambda r: (r.step, r.tag))]

    assert run(background=True) == run(background=False)

    bus = ik.MessageBus(on_error="raise", background=True)
    bus.register_subscriber(Broken(topics=["weights"]))
    bus.publish(module_msg("weights", 0, 1.0))
    with pytest.raises(ZeroDivisionError):
        bus.step_finished(0)
    bus.close()


def test_tensor_options_reject_event_topics_and_bundle_tensor_detaches():
    class Tensorish(Collect):
        name = "tensorish"
        Options = ik.TensorOptions

    with pytest.raises(ValueError, match=r"topics \['batch_finished'\] carry no tensor payload"):
        Tensorish(topics=["weights", "batch_finished"])
    bus = ik.MessageBus(on_error="raise")
    sub = bus.register_subscriber(Tensorish(topics=["weights"]))
    data = torch.ones(2, requires_grad=True) * 3
    bus.publish(module_msg("weights", 0, 0.0).model_copy(update={"data": data}))
    tensor = sub.bundles[0].tensor("weights")
    assert tensor.tolist() == [3.0, 3.0] and not tensor.requires_grad
    event = ik.MessageBundle(key=None, global_step=0, epoch=0, batch_index=0, messages={
        "batch_started": ik.NetworkMessage(topic="batch_started", global_step=0, epoch=0,
                                           batch_index=0)})
    with pytest.raises(ValueError, match="'batch_started' carries no tensor payload"):
        event.tensor("batch_started")
