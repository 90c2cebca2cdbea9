"""The matplotlib backend's live window (``show = true``) on a real X server: Xvfb, started
here on a free display; the window is photographed with ``xwd`` after two redraws. Without
a display, ``show = true`` is a warning and the files are written as before."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r"""
import sys
import numpy as np
from ikkuna_core.backends import ScalarRecord
from ikkuna_core.backends.matplotlib import MatplotlibBackend

backend = MatplotlibBackend(sys.argv[1], plot_every=2, show=True)
print("window", backend._window is not None, flush=True)

def train(first, last):  # what the bus does each step: the step's records, then a flush
    for step in range(first, last):
        backend.write_scalars([
            ScalarRecord("norm/weights", key, f"norm/weights/{key}", step,
                         float(np.sin(step / 2 + i) * (1 + step)))
            for i, key in enumerate(("0", "2", "4"))
        ] + [ScalarRecord("loss", None, "loss", step, 1.0 / (1 + step))])
        backend.flush()

train(0, 3)  # drawn at step 2
print("drawn", flush=True)
sys.stdin.readline()
train(3, 12)  # drawn again at 4, 6, 8, 10
print("drawn", flush=True)
sys.stdin.readline()
backend.close()
print("closed", flush=True)
"""


def read_xwd(data: bytes) -> np.ndarray:
    """An XWD screenshot (``xwd -root``, ZPixmap, 24/32 bits per pixel) as an RGB array."""
    fields = struct.unpack(">25I", data[:100])
    header_size, pixmap_format, width, height = fields[0], fields[2], fields[4], fields[5]
    bits_per_pixel, bytes_per_line, ncolors, byte_order = fields[11], fields[12], fields[19], \
        fields[7]
    assert pixmap_format == 2 and bits_per_pixel == 32, fields  # ZPixmap, 32 bpp
    start = header_size + 12 * ncolors
    rows = np.frombuffer(data[start : start + bytes_per_line * height], dtype=np.uint8)
    pixels = rows.reshape(height, bytes_per_line)[:, : 4 * width].reshape(height, width, 4)
    # masks 0xff0000, 0xff00, 0xff: in memory B, G, R, x (LSB first) or x, R, G, B (MSB first)
    return pixels[..., 2::-1] if byte_order == 0 else pixels[..., 1:]


@pytest.fixture
def xvfb() -> str:
    if shutil.which("Xvfb") is None or shutil.which("xwd") is None:
        pytest.skip("Xvfb and xwd are not installed (apt-get install xvfb x11-apps; "
                    ".ci/run installs them)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as answer:
            display = answer.readline().strip()  # the free display Xvfb chose
        assert display, "Xvfb did not report a display"
        yield f":{display}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def _screenshot(display: str) -> np.ndarray:
    done = subprocess.run(["xwd", "-root", "-silent", "-display", display],
                          capture_output=True, timeout=30, check=True)
    return read_xwd(done.stdout)


def test_the_window_shows_the_metrics_and_redraws(tmp_path: Path, xvfb: str) -> None:
    env = {**os.environ, "DISPLAY": xvfb, "MPLBACKEND": ""}
    env.pop("MPLBACKEND")
    env.pop("WAYLAND_DISPLAY", None)
    run = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert run.stdout is not None and run.stdin is not None
        first_line = run.stdout.readline()
        assert first_line == "window True\n", first_line + run.stderr.read()
        assert run.stdout.readline() == "drawn\n"
        first = _screenshot(xvfb)
        run.stdin.write("\n")
        run.stdin.flush()
        assert run.stdout.readline() == "drawn\n"
        second = _screenshot(xvfb)
        run.stdin.write("\n")
        run.stdin.flush()
        assert run.stdout.readline() == "closed\n"
        assert run.wait(timeout=30) == 0
    finally:
        if run.poll() is None:
            run.kill()
    # Xvfb's root window is black: the figure is white with coloured lines and text
    for shot in (first, second):
        white = (shot > 240).all(axis=-1).mean()
        coloured = (shot.max(axis=-1).astype(int) - shot.min(axis=-1) > 60).mean()
        assert white > 0.2, white
        assert coloured > 0.001, coloured
    changed = (np.abs(first.astype(int) - second).max(axis=-1) > 30).mean()
    assert changed > 0.005, changed  # the second redraw shows more steps
    assert (tmp_path / "run" / "figures" / "norm__weights.png").is_file()  # files as ever


def test_without_a_display_show_is_a_warning_and_files_are_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env, input="\n\n",
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["window False", "drawn", "drawn", "closed"]
    assert "show = true, but no display ($DISPLAY is not set); the figures are written to " \
        "files only" in done.stderr
    assert (tmp_path / "run" / "figures" / "norm__weights.png").is_file()
