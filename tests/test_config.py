"""Run configuration from TOML, dicts and models; errors name the file, key and expectation;
``watch`` builds a whole run from it."""

from __future__ import annotations

import pytest
import torch
from pydantic import field_validator
from torch import nn

import ikkuna_core as ik

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TOML = """
[ikkuna]
plugins = []
backends = ["tensorboard"]
log_dir = "{log_dir}"
include = ["Linear"]

[[ikkuna.subscribers]]
name = "abs_max"
topics = ["weight_gradients"]
subsample = 2
"""


class AbsMaxOptions(ik.SubscriberOptions):
    power: float = 1.0

    @field_validator("power")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"power must be > 0, got {value!r}")
        return value


class AbsMax(ik.Subscriber):
    name = "abs_max"
    Options = AbsMaxOptions

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle[bundle.topics[0]].abs().max())


@pytest.fixture
def registry():
    reg = ik.load_plugins([])
    reg.subscribers["abs_max"] = (AbsMax, "test")
    return reg


def test_toml_round_trip_and_defaults(tmp_path):
    path = tmp_path / "ikkuna.toml"
    path.write_text(TOML.format(log_dir=tmp_path / "run"))
    cfg = ik.load_config(path)
    assert cfg.plugins == [] and cfg.backends == ["tensorboard"] and cfg.include == ["Linear"]
    assert cfg.subscribers[0].name == "abs_max"
    assert cfg.subscribers[0].options == {"topics": ["weight_gradients"], "subsample": 2}
    assert ik.load_config(None) == ik.IkkunaConfig()
    assert ik.load_config(cfg) is cfg
    assert ik.load_config({"depth": 2}).depth == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[ikkuna]\nflush_every = 0", r"ikkuna\.flush_every: Input should be greater than or"),
        ("[ikkuna]\nbackend = ['tb']",
         r"ikkuna\.backend: Extra inputs are not permitted \(did you mean 'backends'\?\); "
         r"valid keys: backend_options, backends, budget, compile_metrics, ddp_forward, depth, "
         r"flush_every, include"),
        ("[ikkuna]\non_error = 'ignore'", r"ikkuna\.on_error: Input should be 'raise' or 'warn'"),
        ("[ikkuna]\n[[ikkuna.subscribers]]\ntopics = []", r"ikkuna\.subscribers\[0\]\.name"),
        ("[ikkuna]\n[[ikkuna.subscribers]]\nname = 'norm'\ntopics = []",
         r"ikkuna\.subscribers\[0\]\.topics: an empty list subscribes to nothing; list "
         r"topics such as \['weight_gradients'\], or omit the key"),
        ("[ikkuna]\ndepth = 0", r"ikkuna\.depth: got 0; use -1 \(leaf modules\) or a level"),
        ("[ikkuna]\ndepth = '3'", r"ikkuna\.depth: Input should be a valid integer"),
        ("[ikkuna]\nlog_dir = ''", r"ikkuna\.log_dir: got '', which would write into the current"),
        ("[[ikkuna]]\ndepth = 1", r"ikkuna: expected one table \[ikkuna\], got an array of"),
        ("[training]\nx = 1", r"has no \[ikkuna\] table; tables found: \['training'\]"),
        ("[ikkuna\n", r"is not valid TOML"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ik.ConfigError, match=expected) as err:
        ik.load_config(path)
    assert str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(ik.ConfigError, match="does not exist"):
        ik.load_config("/nonexistent/ikkuna.toml")


def test_watch_builds_the_run_from_toml(tmp_path, registry):
    path = tmp_path / "ikkuna.toml"
    path.write_text(TOML.format(log_dir=tmp_path / "run"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    exporter = ik.watch(model, nn.CrossEntropyLoss(), config=path, registry=registry)
    assert list(exporter.modules) == ["0", "2"]  # include = ["Linear"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    expected = {}
    for step in range(3):
        opt.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        expected[step] = model[2].weight.grad.abs().max().item()
        opt.step()
    exporter.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    events = acc.Scalars("abs_max/weight_gradients/2")
    assert [e.step for e in events] == [0, 2]  # subsample = 2
    for e in events:
        assert e.value == pytest.approx(expected[e.step])


def test_flush_every_from_the_configuration_reaches_the_bus(tmp_path, registry):
    """``flush_every = 3``: the backend receives records only after every third step (then
    those of the three steps), and the rest at close."""
    from ikkuna_core.testing import MemoryBackend

    registry.backends["memory"] = (MemoryBackend, "test")
    path = tmp_path / "ikkuna.toml"
    path.write_text(
        f'[ikkuna]\nbackends = ["memory"]\nlog_dir = "{(tmp_path / "run").as_posix()}"\n'
        'flush_every = 3\n[[ikkuna.subscribers]]\nname = "abs_max"\n'
        'topics = ["weight_gradients"]\n'
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to("cpu")
    exporter = ik.watch(model, nn.CrossEntropyLoss(), config=path, registry=registry)
    (memory,) = exporter.bus.backends
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    expected, received = {}, []
    for step in range(7):
        opt.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        expected[step] = float(model[2].weight.grad.abs().max())
        opt.step()
        received.append(sorted({r.step for r in memory.scalars}))
    assert received == [[], [], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4, 5],
                        [0, 1, 2, 3, 4, 5]]
    exporter.close()
    written = {r.step: r.value for r in memory.scalars if r.tag == "abs_max/weight_gradients/2"}
    assert written == pytest.approx(expected)
    assert memory.closed


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"subscribers": [{"name": "abs_mx"}]},
         r"subscribers\[0\]\.name: unknown subscriber 'abs_mx'; available: abs_max"),
        ({"subscribers": [{"name": "abs_max", "topics": ["weight"]}]},
         r"subscribers\[0\]\.topics: unknown topic 'weight'; known topics: .*weights"),
        ({"subscribers": [{"name": "abs_max", "subsample": -1}]},
         r"ikkuna\.subscribers\[0\]\.subsample: Input should be greater than or equal to 1 "
         r"\(got -1; subscriber 'abs_max'\)"),
        ({"subscribers": [{"name": "abs_max", "subsampel": 2}]},
         r"ikkuna\.subscribers\[0\]\.subsampel: unknown option of subscriber 'abs_max'; "
         r"valid options: power, publish_as, subsample, topics"),
        ({"subscribers": [{"name": "abs_max", "power": -2.0}]},  # the value said once
         r"ikkuna\.subscribers\[0\]\.power: power must be > 0, got -2\.0 "
         r"\(subscriber 'abs_max'\)$"),
        ({"subscribers": [{"name": "abs_max", "topics": ["weights"], "publish_as": "loss"}]},
         r"ikkuna\.subscribers\[0\]\.publish_as: 'loss' is already a topic \(the loss value"),
        ({"subscribers": [{"name": "abs_max", "topics": ["weights"], "publish_as": "weights"}]},
         r"ikkuna\.subscribers\[0\]\.publish_as: 'weights' is one of the subscriber's own "
         r"input topics \['weights'\], so its results would feed back into it forever"),
        ({"include": ["Conv2d"]}, r"ikkuna\.include: no module of Linear matches"),
        ({"backends": ["matplotlib"], "backend_options": {"matplotlib": {"plot_every": 0}}},
         r"ikkuna\.backend_options\.matplotlib\.plot_every: Input should be greater than or "
         r"equal to 1 \(got 0\)"),
        ({"backends": ["tensorbored"]},
         r"backends\[0\]: unknown backend 'tensorbored'; available: matplotlib, tensorboard"),
        ({"include": ["Conv9d"]}, r"include: 'Conv9d' is not a torch.nn module class"),
        ({"backends": ["matplotlib"], "backend_options": {"matplotlib": {"plot_evry": 5}}},
         r"backend_options\.matplotlib: got an unexpected keyword argument 'plot_evry'"),
        ({"backend_options": {"matplotlib": {"plot_every": 5}}},
         r"backend_options: \['matplotlib'\] are not in ikkuna.backends \['tensorboard'\]"),
    ],
)
def test_watch_errors_leave_nothing_behind(tmp_path, registry, config, expected):
    model = nn.Linear(2, 2)
    config = {**config, "log_dir": str(tmp_path / "run")}
    with pytest.raises(ik.ConfigError, match=expected):
        ik.watch(model, config=config, registry=registry)
    assert not (tmp_path / "run").exists()
    assert not model._forward_pre_hooks


def test_unknown_plugin_name_lists_installed():
    with pytest.raises(ik.ConfigError, match=r"ikkuna\.plugins: unknown plugin.*'no_such_plugin'"):
        ik.watch(nn.Linear(2, 2), config={"plugins": ["no_such_plugin"]})
    # still a PluginError for callers that caught one before
    with pytest.raises(ik.PluginError, match="unknown plugin"):
        ik.watch(nn.Linear(2, 2), config={"plugins": ["no_such_plugin"]})


def test_a_list_instead_of_a_configuration():
    with pytest.raises(ik.ConfigError, match=r"ikkuna: the configuration must be a TOML path, "
                       r"a mapping .* got list \['norm'\]"):
        ik.load_config(["norm"])  # type: ignore[arg-type]


def test_subscriber_topics_round_trip_through_options():
    cfg = ik.load_config({"subscribers": [{"name": "norm"}, {"name": "norm", "topics": ["a"]}]})
    assert cfg.subscribers[0].options == {}  # omitted: the subscriber's default topics
    assert cfg.subscribers[1].options == {"topics": ["a"]}


def _three_steps(exporter, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        opt.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        opt.step()
    exporter.close()


def test_watch_into_a_directory_holding_a_run_is_refused_unless_overwrite(tmp_path, registry):
    """As ``ikkuna train`` (issue 16): a second run in one log_dir would mix with the first
    (TensorBoard showed 6 points for 3 steps); ``overwrite=True`` replaces it."""
    config = {"plugins": [], "backends": ["tensorboard", "matplotlib"],
              "log_dir": str(tmp_path / "run"),
              "subscribers": [{"name": "abs_max", "topics": ["weight_gradients"]}]}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    _three_steps(ik.watch(model, nn.CrossEntropyLoss(), config, registry=registry), model)
    first = sorted((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(first) == 1
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ik.ConfigError, match=r"ikkuna.log_dir: .*already holds a run \(events"
                       r".*overwrite=True"):
        ik.watch(model, nn.CrossEntropyLoss(), config, registry=registry)
    assert sorted((tmp_path / "run").glob("events.out.tfevents.*")) == first  # nothing written
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # nothing attached

    _three_steps(ik.watch(model, nn.CrossEntropyLoss(), config, registry=registry,
                          overwrite=True), model)
    files = sorted((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files != first  # the earlier run replaced
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("abs_max/weight_gradients/2")] == [0, 1, 2]  # not 6
