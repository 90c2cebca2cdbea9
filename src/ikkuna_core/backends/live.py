"""The live window of the matplotlib backend (``show = true``): one figure on screen, a
panel per scalar metric, redrawn when the backend draws (every ``plot_every`` steps)
without blocking training: a redraw is one ``draw`` and one pass of the GUI's event loop,
never ``plt.show()`` or ``plt.pause()``.

It needs a GUI backend of matplotlib (TkAgg, which comes with Python's tkinter, or QtAgg)
and a display; without one, :func:`open_window` says so in a warning and returns None, and
the backend writes its files as before.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["LiveWindow", "open_window"]

#: GUI backends tried, in order, when matplotlib's own is not interactive.
GUI_BACKENDS = ("TkAgg", "QtAgg")
#: At most this many panels; the other metrics stay in the files.
MAX_PANELS = 9


def _no_display() -> str | None:
    """Why no window can open here, or None when a display may be there."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display ($DISPLAY is not set)"
    return None


def open_window(title: str = "ikkuna") -> LiveWindow | None:
    """Switch matplotlib to a GUI backend and open the live window; None, with a
    RuntimeWarning naming why, when no GUI backend or display is available."""
    import matplotlib

    reason = _no_display()
    if reason is None:
        current = matplotlib.get_backend()
        interactive = current.lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template")
        errors = []
        for name in ([current] if interactive else []) + [b for b in GUI_BACKENDS if b != current]:
            try:
                matplotlib.use(name, force=True)
                import matplotlib.pyplot as plt

                return LiveWindow(plt, title)
            except Exception as exc:  # noqa: BLE001 - ImportError, TclError, Qt's errors
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        reason = "no GUI backend of matplotlib works (" + "; ".join(errors) + ")"
    matplotlib.use("Agg", force=True)
    warnings.warn(
        f"ikkuna: matplotlib backend: show = true, but {reason}; the figures are written to "
        "files only. A window needs a display and tkinter (python3-tk) or PyQt",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


class LiveWindow:
    """One on-screen figure, redrawn by :meth:`update`."""

    def __init__(self, plt: Any, title: str) -> None:
        self._plt = plt
        self.figure = plt.figure(title, figsize=(10, 6.5), dpi=90)
        self.figure.canvas.manager.set_window_title(title)
        self.figure.text(0.5, 0.5, "waiting for the first metrics ...", ha="center")
        self.figure.show()
        self._pump()

    @property
    def is_open(self) -> bool:
        return bool(self._plt.fignum_exists(self.figure.number))

    def update(
        self,
        topics: Sequence[str],
        draw: Callable[[Any, str], None],
        step: int,
    ) -> None:
        """Redraw: one panel per topic (the first :data:`MAX_PANELS`), each drawn by
        ``draw(ax, topic)``. Nothing happens once the user has closed the window."""
        if not self.is_open:
            return
        fig = self.figure
        fig.clear()
        shown = list(topics)[:MAX_PANELS]
        if shown:
            cols = min(3, len(shown))
            rows = math.ceil(len(shown) / cols)
            for i, topic in enumerate(shown):
                draw(fig.add_subplot(rows, cols, i + 1), topic)
        fig.suptitle(f"ikkuna: step {step}", fontsize=11)
        fig.tight_layout()
        fig.canvas.draw_idle()
        self._pump()

    def _pump(self) -> None:
        """Let the GUI draw and handle its events once, without waiting."""
        canvas = self.figure.canvas
        canvas.draw()
        canvas.flush_events()

    def close(self) -> None:
        if self.is_open:
            self._plt.close(self.figure)


def draw_lines(
    ax: Any, title: str, lines: Sequence[tuple[str, np.ndarray, np.ndarray, Any]]
) -> None:
    """A compact panel: ``lines`` of (label, steps, values, colour)."""
    for label, steps, values, color in lines:
        ax.plot(steps, values, color=color, linewidth=1.1, label=label,
                marker="o" if len(steps) <= 30 else None, ms=3)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if 1 < len(lines) <= 6:
        ax.legend(fontsize=6, loc="best")
