"""Tests for ikkuna_train.report: reading TensorBoard logs back and drawing the dashboard.

The logs here are written directly with ``SummaryWriter``, independent of the Trainer, so
every value the report reads back is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ikkuna_core.backends.matplotlib import colorful_dimension
from ikkuna_train.report import (
    MAX_HISTOGRAM_PANELS,
    ReportError,
    _scalar_panels,
    find_run_dir,
    load_run,
    make_report,
    render_dashboard,
)

LAYERS = ["net.1", "net.3", "net.5"]
STEPS = 30


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def write_run(log_dir: Path, *, histograms: int = 3, meta: bool = True) -> dict:
    """A run with a loss, two accuracies, a per-layer norm and activation histograms."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(0)
    expected: dict = {"scalars": {}, "hist_counts": {}}
    writer = SummaryWriter(log_dir=str(log_dir))
    for step in range(STEPS):
        values = {
            "loss/loss": 2.0 * np.exp(-step / 10) + 0.05 * rng.random(),
            "train_accuracy": min(1.0, step / STEPS + 0.1),
            "test_accuracy": min(1.0, step / STEPS),
        }
        for i, layer in enumerate(LAYERS):
            values[f"norm/weight_gradients/{layer}"] = (i + 1) * np.exp(-step / 20)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
            expected["scalars"].setdefault(tag, []).append((step, float(np.float32(value))))
        for h in range(histograms):
            data = rng.normal(loc=step / 10, scale=1 + h, size=500)
            writer.add_histogram(f"histogram/activations/layer.{h}", data, step, bins=32)
            expected["hist_counts"].setdefault(f"histogram/activations/layer.{h}", []).append(500)
    writer.close()
    if meta:
        (log_dir / "run.json").write_text(
            json.dumps(
                {
                    "hparams": {
                        "model": "FullyConnected",
                        "dataset": "digits",
                        "optimizer": "Adam",
                        "lr": 0.001,
                        "batch_size": 128,
                        "seed": 0,
                    },
                    "steps": STEPS,
                    "epochs": 1,
                    "train_accuracy": 0.9,
                    "test_accuracy": 0.8,
                    "modules": {"net.1": "Linear", "net.3": "Linear", "net.5": "Linear"},
                }
            )
        )
    return expected


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("run")
    return path, write_run(path)


def test_load_run_reads_back_every_value(run_dir: tuple[Path, dict]) -> None:
    path, expected = run_dir
    logs = load_run(path)
    assert set(logs.scalars) == set(expected["scalars"])
    for tag, points in expected["scalars"].items():
        got = logs.scalar(tag)
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)
    assert sorted(logs.histograms) == sorted(expected["hist_counts"])
    for tag, counts in expected["hist_counts"].items():
        series = logs.histograms[tag]
        assert [h.step for h in series] == list(range(STEPS))
        assert [h.counts.sum() for h in series] == pytest.approx(counts)
        assert all(len(h.edges) == len(h.counts) + 1 for h in series)
        assert all(np.all(np.diff(h.edges) >= 0) for h in series)
    assert logs.meta["hparams"]["model"] == "FullyConnected"


def test_dashboard_is_a_sensible_png(run_dir: tuple[Path, dict], tmp_path: Path) -> None:
    import matplotlib.image

    path, _ = run_dir
    out = make_report(path, tmp_path / "sub" / "dash.png")
    assert out == tmp_path / "sub" / "dash.png"
    width, height = png_size(out)
    # Loss, Accuracy, norm/weight_gradients + 3 histogram images: 6 panels, 3 columns, 2 rows.
    assert (width, height) == (3 * 540, round((2 * 3.6 + 1.1) * 100))
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not a blank image
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 200  # colormaps, not 2 colours
    assert not list(out.parent.glob("*.tmp"))


def test_default_output_is_in_the_run_dir(tmp_path: Path) -> None:
    write_run(tmp_path, histograms=0, meta=False)
    out = make_report(tmp_path)
    assert out == tmp_path / "dashboard.png"
    assert png_size(out)[0] == 3 * 540


def test_panels_group_tags_by_topic() -> None:
    tags = [
        "loss/loss",
        "epoch/loss/train",
        "epoch/loss/test",
        "train_accuracy",
        "epoch/accuracy/test",
        "norm/weights/net.10",
        "norm/weights/net.2",
        "norm/weights/fc",
        "spectral_norm/weights/net.1",
        "dead_fraction/activations/net.2",
        "dead_fraction/activations/net.4",
    ]
    panels = {p.title: p for p in _scalar_panels(tags)}
    assert list(panels)[:2] == ["Loss", "Accuracy"]
    assert set(panels["Loss"].lines.values()) == {
        "loss/loss",
        "epoch/loss/train",
        "epoch/loss/test",
    }
    assert set(panels["Accuracy"].lines.values()) == {"train_accuracy", "epoch/accuracy/test"}
    # layers in model order: net.2 before net.10
    assert list(panels["norm/weights"].lines) == ["fc", "net.2", "net.10"]
    assert panels["spectral_norm/weights"].lines == {"net.1": "spectral_norm/weights/net.1"}
    assert list(panels["dead_fraction/activations"].lines) == ["net.2", "net.4"]


def test_histogram_panels_are_capped(tmp_path: Path) -> None:
    write_run(tmp_path, histograms=MAX_HISTOGRAM_PANELS + 2, meta=False)
    logs = load_run(tmp_path)
    out = render_dashboard(logs, tmp_path / "d.png", dpi=40)
    width, height = png_size(out)
    panels = 3 + MAX_HISTOGRAM_PANELS
    rows = -(-panels // 3)
    assert (width, height) == (3 * 216, round((rows * 3.6 + 1.1) * 40))


def test_colorful_dimension_keeps_each_steps_mass() -> None:
    from ikkuna_train.report import Histogram

    hists = [
        Histogram(0, np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0])),
        Histogram(1, np.array([-2.0, 0.0, 2.0, 4.0]), np.array([0.0, 5.0, 5.0])),
    ]
    image, lo, hi = colorful_dimension(hists)
    assert (lo, hi) == (-2.0, 4.0)
    assert image.shape == (64, 2)
    assert image.sum(axis=0) == pytest.approx([1.0, 1.0])
    # mass spread evenly over each source bin: 3/4 of step 0 lies in [0, 1]
    grid = np.linspace(-2, 4, 65)
    inside = (grid[:-1] >= 0) & (grid[1:] <= 1 + 1e-9)
    assert image[inside, 0].sum() == pytest.approx(0.75 * 0.9375)  # [0.0625, 1] of [0, 1]
    # a constant tensor (all-zero biases): every bin has zero width, the mass is a point
    flat, lo, hi = colorful_dimension([Histogram(0, np.zeros(4), np.array([0.0, 0.0, 7.0]))])
    assert flat.sum() == pytest.approx(1.0)
    assert hi > lo
    # step 0's mass lies in [0, 2]: rows of the common grid below 0 are empty
    assert image[grid[1:] <= 0, 0].sum() == 0


def test_missing_empty_and_ambiguous_log_dirs(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        make_report(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        make_report(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=r"no TensorBoard event files .*ikkuna train"):
        make_report(empty)
    assert not list(empty.iterdir())  # nothing written

    parent = tmp_path / "runs"
    write_run(parent / "a", histograms=0, meta=False)
    assert find_run_dir(parent) == parent / "a"  # the only run below is found
    write_run(parent / "b", histograms=0, meta=False)
    with pytest.raises(ReportError, match=r"holds 2 runs; pass one of them"):
        make_report(parent)


def test_event_file_without_metrics(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_text("note", "hello", 0)
    writer.close()
    with pytest.raises(ReportError, match="hold no scalars or histograms"):
        make_report(tmp_path)


def _logs_with_histograms(tags: list[str], modules: list[str] | None = None):
    from ikkuna_train.report import Histogram, RunLogs

    one = [Histogram(0, np.array([0.0, 1.0]), np.array([1.0]))]
    meta = {"modules": dict.fromkeys(modules, "Conv2d")} if modules else {}
    return RunLogs(log_dir=Path("."), histograms=dict.fromkeys(tags, one), meta=meta)


def test_histogram_panels_spread_over_the_models_depth() -> None:
    from ikkuna_train.report import pick_histograms

    # 30 modules in model order; alphabetically "layer10" would come before "layer2"
    modules = [f"layer{i}" for i in range(30)]
    logs = _logs_with_histograms([f"histogram/activations/{m}" for m in sorted(modules)],
                                 modules)
    chosen = [t.rsplit("/", 1)[1] for t in pick_histograms(logs, limit=6)]
    assert chosen == ["layer0", "layer6", "layer12", "layer17", "layer23", "layer29"]

    # two topics share the slots; a topic with fewer modules than its share gives the rest
    tags = [f"histogram/activations/{m}" for m in modules] + ["histogram/weights/layer0"]
    chosen = pick_histograms(_logs_with_histograms(tags, modules), limit=4)
    assert chosen == [
        "histogram/activations/layer0",
        "histogram/activations/layer14",
        "histogram/activations/layer29",
        "histogram/weights/layer0",
    ]
    # without run.json, natural order (net.2 before net.10)
    logs = _logs_with_histograms([f"h/a/net.{i}" for i in (10, 2, 1)])
    assert pick_histograms(logs, limit=2) == ["h/a/net.1", "h/a/net.10"]


def test_title_counts_steps_and_epochs_in_words(tmp_path: Path) -> None:
    from ikkuna_train.report import RunLogs, _title

    meta = {"hparams": {"model": "VGG", "dataset": "MNIST"}, "steps": 1, "epochs": 1}
    assert _title(RunLogs(log_dir=tmp_path, meta=meta))[1].startswith("1 step, 1 epoch   ")
    meta = {**meta, "steps": 12, "epochs": 2}
    assert _title(RunLogs(log_dir=tmp_path, meta=meta))[1].startswith("12 steps, 2 epochs   ")


def test_report_formats_follow_the_suffix(tmp_path: Path) -> None:
    from PIL import Image

    write_run(tmp_path / "run")
    out = make_report(tmp_path / "run", tmp_path / "dash.jpeg")
    with Image.open(out) as image:
        assert image.format == "JPEG"
    assert make_report(tmp_path / "run", tmp_path / "dash.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ReportError, match=r"unknown image type '.gif'; end the name in one of"):
        make_report(tmp_path / "run", tmp_path / "dash.gif")
    assert not (tmp_path / "dash.gif").exists()


def test_past_twelve_layers_a_metric_is_one_heatmap_in_model_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.axes import Axes
    from torch.utils.tensorboard import SummaryWriter

    layers = [f"blocks.{i}" for i in range(20)]  # model order; alphabetical would differ
    writer = SummaryWriter(log_dir=str(tmp_path))
    want = np.zeros((20, 5))
    for step in range(5):
        for i, layer in enumerate(layers):
            value = np.float32(10.0 ** (-i / 4) * (step + 1))  # spans five decades
            writer.add_scalar(f"norm/weight_gradients/{layer}", value, step)
            want[i, step] = value
        writer.add_scalar("loss/loss", 1.0 / (step + 1), step)
    writer.close()
    (tmp_path / "run.json").write_text(json.dumps({"modules": dict.fromkeys(layers, "Conv2d")}))
    meshes: list[tuple[Axes, np.ndarray, object]] = []
    original = Axes.pcolormesh

    def spy(ax: Axes, *args: object, **kwargs: object) -> object:
        mesh = original(ax, *args, **kwargs)
        meshes.append((ax, np.ma.filled(np.ma.asarray(args[2]), np.nan),
                       kwargs.get("norm")))
        return mesh

    monkeypatch.setattr(Axes, "pcolormesh", spy)
    out = make_report(tmp_path, tmp_path / "dash.png")
    assert png_size(out)[0] == 2 * 540  # Loss and the heatmap: two panels
    ((ax, values, norm),) = [m for m in meshes if m[0].get_title()]  # not the colour bar's
    assert ax.get_title() == "norm/weight_gradients"
    assert values == pytest.approx(want, rel=1e-6)  # rows: blocks.0 .. blocks.19, in order
    assert type(norm).__name__ == "LogNorm"
