"""``ikkuna report``: one PNG dashboard from a finished run's TensorBoard logs.

The event files are read with TensorBoard's ``EventAccumulator`` (every event, no
reservoir sampling). Panels, in order:

1. **Loss**: every scalar tag containing ``loss`` (raw values faint, a smoothed line on top),
2. **Accuracy**: every scalar tag containing ``accuracy``,
3. one panel per per-layer metric (``norm/weight_gradients``, ``ratio/weight_updates/weights``,
   ...) with one line per layer, coloured along a colormap in model order; past 12 layers,
   a depth x step heatmap instead (layers in forward order down, steps across, a log colour
   scale when the values span decades),
4. "colorful dimension" images of histogram tags (training step on x, value on y,
   colour = log count), so a glance shows distributions drifting, saturating or dying; at
   most :data:`MAX_HISTOGRAM_PANELS`, shared among the histogram topics and spread evenly
   over each one's modules in model order (first to last layer).

Tags are ``<topic>`` or ``<topic>/<key>``; tags that share everything up to their last
``/`` form one panel whose lines are the keys. The dashboard is written as PNG, JPEG, PDF or
SVG, after the output's suffix.

matplotlib and tensorboard are imported only when a report is made.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ikkuna_core.backends.heatmap import HEATMAP_MODULES, StepGrid, heatmap_figure
from ikkuna_core.backends.matplotlib import colorful_dimension, series_color

from ._files import probe_writable_dir

__all__ = [
    "FORMATS",
    "ReportError",
    "RunLogs",
    "check_output",
    "find_run_dir",
    "load_run",
    "make_report",
    "render_dashboard",
]

EVENT_GLOB = "events.out.tfevents.*"
#: At most this many histogram images are drawn; the rest are named in the footer.
MAX_HISTOGRAM_PANELS = 12
#: Output suffixes and the image format written for each.
FORMATS: dict[str, str] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".pdf": "pdf",
    ".svg": "svg",
}
_COLUMNS = 3
#: Step columns of a dashboard heatmap (neighbouring steps are averaged past this).
_HEATMAP_COLUMNS = 300


class ReportError(ValueError):
    """The log directory is missing, empty, or holds nothing a dashboard can show."""


@dataclass
class Histogram:
    step: int
    edges: np.ndarray  # length = len(counts) + 1
    counts: np.ndarray


@dataclass
class RunLogs:
    """Everything read back from one run directory."""

    log_dir: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # run.json written by the Trainer

    def scalar(self, tag: str) -> list[tuple[int, float]]:
        try:
            return self.scalars[tag]
        except KeyError:
            raise KeyError(f"no scalar {tag!r}; tags: {sorted(self.scalars)}") from None


def _has_events(path: Path) -> bool:
    return any(p.is_file() for p in path.glob(EVENT_GLOB))


def find_run_dir(log_dir: str | Path) -> Path:
    """The directory holding the run's event files: ``log_dir`` itself, or its only
    sub-directory that holds event files. Raises :class:`ReportError` otherwise."""
    path = Path(log_dir)
    if not path.exists():
        raise ReportError(f"log directory {path} does not exist")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; pass the log directory of a run")
    if _has_events(path):
        return path
    runs = sorted({p.parent for p in path.rglob(EVENT_GLOB) if p.is_file()})
    if len(runs) == 1:
        return runs[0]
    if runs:
        shown = ", ".join(str(r) for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
        raise ReportError(f"{path} holds {len(runs)} runs; pass one of them: {shown}")
    raise ReportError(
        f"no TensorBoard event files ({EVENT_GLOB}) in {path}; train with the tensorboard "
        "backend first (ikkuna train -v tb or -v both)"
    )


def load_run(log_dir: str | Path) -> RunLogs:
    """Read every scalar and histogram of a run (and its ``run.json``, if any)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = find_run_dir(log_dir)
    acc = EventAccumulator(
        str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    logs = RunLogs(log_dir=run_dir)
    for tag in tags.get("scalars", []):
        logs.scalars[tag] = _dedup((e.step, float(e.value)) for e in acc.Scalars(tag))
    for tag in tags.get("histograms", []):
        series = []
        for event in acc.Histograms(tag):
            h = event.histogram_value
            limits = np.asarray(h.bucket_limit, dtype=np.float64)
            counts = np.asarray(h.bucket, dtype=np.float64)
            if len(limits) == 0:
                continue
            limits = np.clip(limits, float(h.min), max(float(h.max), float(h.min)))
            if len(limits) >= 2:  # equal-width bins: the first one starts one width lower
                left = min(float(limits[0] - (limits[1] - limits[0])), float(h.min))
            else:
                left = min(float(h.min), float(limits[0]))
            series.append(Histogram(event.step, np.concatenate([[left], limits]), counts))
        if series:
            logs.histograms[tag] = sorted(series, key=lambda s: s.step)
    meta = run_dir / "run.json"
    if meta.is_file():
        try:
            logs.meta = json.loads(meta.read_text())
        except (OSError, ValueError):
            logs.meta = {}
    if not logs.scalars and not logs.histograms:
        raise ReportError(f"the event files in {run_dir} hold no scalars or histograms")
    return logs


def _dedup(points: Any) -> list[tuple[int, float]]:
    """Sorted by step; a step written twice (a restarted run) keeps its last value."""
    by_step: dict[int, float] = {}
    for step, value in points:
        by_step[int(step)] = value
    return sorted(by_step.items())


# ------------------------------------------------------------------------- grouping


def _natural(key: str) -> list[Any]:
    """Sort key that orders ``net.2`` before ``net.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _split(tags: Sequence[str]) -> dict[str, dict[str, str]]:
    """Group tags into panels: {panel title: {line label: tag}}. ``<topic>/<key>`` tags
    share the panel ``<topic>`` with one line per key (in model order); a tag without ``/``
    is a panel of its own."""
    panels: dict[str, dict[str, str]] = {}
    for tag in sorted(tags, key=_natural):
        title, _, label = tag.rpartition("/")
        panels.setdefault(title or tag, {})[label] = tag
    return panels


@dataclass
class _Panel:
    title: str
    lines: dict[str, str]  # label -> tag
    kind: str  # "loss", "accuracy", "layers"


def _scalar_panels(tags: Sequence[str]) -> list[_Panel]:
    loss = sorted(t for t in tags if "loss" in t.lower())
    accuracy = sorted(t for t in tags if "accuracy" in t.lower() and t not in loss)
    rest = [t for t in tags if t not in loss and t not in accuracy]
    panels = []
    if loss:
        panels.append(_Panel("Loss", {t: t for t in loss}, "loss"))
    if accuracy:
        panels.append(_Panel("Accuracy", {t: t for t in accuracy}, "accuracy"))
    for title, lines in sorted(_split(rest).items()):
        panels.append(_Panel(title, lines, "layers"))
    return panels


# ------------------------------------------------------------------------ rendering


def _smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased. The default weight keeps the
    lag near 2% of the run, so the smoothed line does not trail behind a short run."""
    if weight is None:
        lag = 0.02 * len(values)
        weight = min(lag / (1 + lag), 0.95)
    out = np.empty_like(values)
    last, norm = 0.0, 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def _title(logs: RunLogs) -> tuple[str, str]:
    meta = logs.meta
    hp = meta.get("hparams", {})
    if not hp:
        return f"Ikkuna run {logs.log_dir}", ""
    head = f"{hp.get('model', '?')} on {hp.get('dataset', '?')}"
    bits = [
        f"{_count(meta.get('steps'), 'step')}, {_count(meta.get('epochs'), 'epoch')}",
        f"{hp.get('optimizer', '?')} lr={hp.get('lr', '?')}",
        f"batch {hp.get('batch_size', '?')}",
        f"seed {hp.get('seed', '?')}",
    ]
    if isinstance(meta.get("test_accuracy"), (int, float)):
        bits.append(
            f"final accuracy train {meta.get('train_accuracy', float('nan')):.3f} / "
            f"test {meta['test_accuracy']:.3f}"
        )
    return head, "   ·   ".join(bits)


def _count(n: Any, word: str) -> str:
    """``1 step``, ``12 steps``, ``? steps``."""
    return f"{n} {word}" if n == 1 else f"{'?' if n is None else n} {word}s"


def _module_order(logs: RunLogs) -> dict[str, int]:
    modules = logs.meta.get("modules")
    return {key: i for i, key in enumerate(modules)} if isinstance(modules, dict) else {}


def pick_histograms(logs: RunLogs, limit: int = MAX_HISTOGRAM_PANELS) -> list[str]:
    """At most ``limit`` histogram tags: the slots shared evenly among the histogram topics,
    each topic's spread evenly over its modules in model order, first and last included
    (a model's depth, not the first names in alphabetical order)."""
    order = _module_order(logs)
    topics: dict[str, list[str]] = {}
    for tag in logs.histograms:
        topics.setdefault(tag.rpartition("/")[0], []).append(tag)
    for tags in topics.values():
        tags.sort(key=lambda t: (order.get(t.rpartition("/")[2], len(order)), _natural(t)))
    names = sorted(topics, key=_natural)
    quota = dict.fromkeys(names, 0)
    left = min(limit, len(logs.histograms))
    while left:
        for name in names:
            if left and quota[name] < len(topics[name]):
                quota[name] += 1
                left -= 1
    chosen = []
    for name in names:
        tags, k = topics[name], quota[name]
        if k:
            spread = {round(j * (len(tags) - 1) / max(k - 1, 1)) for j in range(k)}
            chosen += [tags[i] for i in sorted(spread)]
    return chosen


def check_output(out: str | Path) -> Path:
    """Check, before anything is drawn, that the dashboard can be written to ``out``: a
    known suffix (:data:`FORMATS`) and a writable directory. Raises :class:`ReportError`;
    leaves nothing behind."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise ReportError(
            f"cannot write a dashboard to {path}: unknown image type "
            f"{path.suffix or '(no suffix)'!r}; end the name in one of {', '.join(FORMATS)}"
        )
    if path.is_dir():
        raise ReportError(
            f"{path} is a directory; give the file to write, e.g. {path / 'dashboard.png'}"
        )
    try:
        probe_writable_dir(path.parent)
    except OSError as exc:
        raise ReportError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path


def render_dashboard(logs: RunLogs, out: str | Path, *, dpi: int = 100) -> Path:
    """Draw the dashboard of ``logs`` into ``out`` (written atomically), as PNG, JPEG, PDF
    or SVG after its suffix."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = check_output(out)
    panels = _scalar_panels(list(logs.scalars))
    shown_hists = pick_histograms(logs)
    n = len(panels) + len(shown_hists)
    cols = min(_COLUMNS, max(n, 1))
    rows = max(math.ceil(n / cols), 1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.4 * cols, 3.6 * rows + 1.1), dpi=dpi, squeeze=False
    )
    flat = list(axes.flat)
    modules = logs.meta.get("modules")
    types: dict[str, str] = modules if isinstance(modules, dict) else {}

    def named(key: str) -> str:
        return f"{key} ({types[key]})" if key in types else key

    order = list(types)
    for ax, panel in zip(flat, panels, strict=False):
        if panel.kind == "layers" and len(panel.lines) > HEATMAP_MODULES:
            _draw_heatmap(ax, panel, logs, types, order)  # one heatmap, not many curves
        else:
            _draw_scalars(fig, ax, panel, logs, named)
    for ax, tag in zip(flat[len(panels) :], shown_hists, strict=False):
        _draw_histograms(ax, tag, logs, named)
    for ax in flat[n:]:
        ax.axis("off")
    if n == 0:
        flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    _annotate(fig, logs, len(logs.histograms) - len(shown_hists))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format=FORMATS[path.suffix.lower()], facecolor="white")
    plt.close(fig)
    tmp.replace(path)
    return path


def _draw_heatmap(
    ax: Any, panel: _Panel, logs: RunLogs, types: dict[str, str], order: list[str]
) -> None:
    """A layers panel of many modules as one depth x step heatmap."""
    grid = StepGrid(max_columns=_HEATMAP_COLUMNS)
    for label, tag in panel.lines.items():
        for step, value in logs.scalars[tag]:
            grid.add(label, step, value)
    keys, edges, values = grid.matrix(order)
    heatmap_figure(panel.title, keys, edges, values, module_types=types, ax=ax, max_labels=16)


def _draw_scalars(fig: Any, ax: Any, panel: _Panel, logs: RunLogs, named: Any) -> None:
    """One scalar panel: a line per tag (stars for final values, a smoothed loss), its
    title, scale and legend (a colour bar for many layers)."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    labels = list(panel.lines)
    many = len(labels)
    for i, label in enumerate(labels):
        tag = panel.lines[label]
        points = logs.scalars[tag]
        steps = np.array([p[0] for p in points])
        values = np.array([p[1] for p in points], dtype=np.float64)
        color = series_color(tag, i, many, panel.kind == "layers")
        if panel.kind != "layers" and tag.startswith("final/"):
            ax.plot(steps, values, linestyle="none", marker="*", markersize=11, color=color,
                    markeredgecolor="black", markeredgewidth=0.5, label=label, zorder=3)
        elif panel.kind == "loss" and len(points) > 20:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values), color=color, linewidth=1.6, label=label)
        else:
            marker = "o" if len(points) <= 12 else None
            dashed = panel.kind != "layers" and tag.startswith("epoch/")
            ax.plot(steps, values, color=color, linewidth=1.4, label=named(label),
                    marker=marker, markersize=3, linestyle="--" if dashed else "-")
    ax.set_title(panel.title, fontsize=11, fontweight="bold")
    ax.set_xlabel("training step", fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    if panel.kind == "accuracy":
        top = max((v for t in panel.lines.values() for _, v in logs.scalars[t]), default=1)
        if top <= 1.0:
            ax.set_ylim(0, 1.02)
    if panel.kind == "loss" and _positive(logs, panel) and _spread(logs, panel) > 30:
        ax.set_yscale("log")
    if many <= 12:
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    else:
        cmap = colormaps["viridis"]
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, (many - 1) / 0.9))
        bar = fig.colorbar(sm, ax=ax, pad=0.01)
        bar.set_label("layer (model order)", fontsize=7)
        bar.ax.tick_params(labelsize=6)


def _draw_histograms(ax: Any, tag: str, logs: RunLogs, named: Any) -> None:
    """One histogram tag as a "colorful dimension" image over the steps."""
    hists = logs.histograms[tag]
    image, lo, hi = colorful_dimension(hists)
    first, last = hists[0].step, hists[-1].step
    ax.imshow(np.log1p(image * 1000.0), aspect="auto", origin="lower",
              extent=(first, last + 1, lo, hi), cmap="magma", interpolation="nearest")
    topic, _, key = tag.rpartition("/")
    ax.set_title(f"{topic}\n{named(key)}" if topic else tag, fontsize=9, fontweight="bold")
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("value", fontsize=8)
    ax.tick_params(labelsize=7)


def _annotate(fig: Any, logs: RunLogs, hidden_hists: int) -> None:
    """The title, the run's line under it, the footer, and the layout."""
    head, sub = _title(logs)
    height = fig.get_figheight()
    fig.text(0.5, 1 - 0.12 / height, head, ha="center", va="top", fontsize=15, fontweight="bold")
    if sub:
        fig.text(0.5, 1 - 0.5 / height, sub, ha="center", va="top", fontsize=9, color="0.25")
    footer = f"log dir: {logs.log_dir}"
    if hidden_hists > 0:
        footer += f"   ·   {hidden_hists} more histograms in TensorBoard"
    fig.text(0.5, 0.06 / height, footer, ha="center", va="bottom", fontsize=8, color="0.4")
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1 - 0.8 / height), h_pad=1.5)


def _positive(logs: RunLogs, panel: _Panel) -> bool:
    return all(v > 0 for t in panel.lines.values() for _, v in logs.scalars[t])


def _spread(logs: RunLogs, panel: _Panel) -> float:
    values = [v for t in panel.lines.values() for _, v in logs.scalars[t]]
    return max(values) / min(values) if values and min(values) > 0 else 1.0


def make_report(log_dir: str | Path, out: str | Path | None = None) -> Path:
    """Read the run in ``log_dir`` and write its dashboard to ``out`` (default
    ``<run dir>/dashboard.png``); returns the path written. Whether the dashboard can be
    written is checked before any log is read."""
    if out is not None:
        target = check_output(out)
        run_dir = find_run_dir(log_dir)
    else:
        run_dir = find_run_dir(log_dir)
        target = check_output(run_dir / "dashboard.png")
    return render_dashboard(load_run(run_dir), target)
