"""Nothing lost when a run ends without ``close()``: open Exporters are closed (flushed) at
interpreter exit — after an uncaught exception or ``sys.exit`` too — and on SIGTERM, which
schedulers (SLURM, Kubernetes) send before they kill a job.

The Exporters are held weakly. The SIGTERM handler is installed only from the main thread
(where Python runs signal handlers), chains to the handler it replaced (a user's handler
still runs; the default one still terminates the process with the signal's status) and is
removed again when the last open Exporter closes, unless someone replaced it meanwhile."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import warnings
import weakref
from types import FrameType
from typing import Any, Protocol

__all__ = ["close_open_exporters", "opened", "closed"]


class _Closable(Protocol):
    def close(self) -> None: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()
_pid = os.getpid()  # a forked child (a DataLoader worker) must not close its parent's files
_previous: Any = None  # the SIGTERM handler ours replaced, while ours is installed
_installed = False
_lock = threading.RLock()  # re-entrant: the handler may run while the main thread holds it


def opened(exporter: _Closable) -> None:
    """Track a new Exporter until it closes; install the SIGTERM handler if needed."""
    global _installed, _previous, _pid
    with _lock:
        if os.getpid() != _pid:  # made in a forked child: the parent's Exporters are not its
            _open.clear()
            _pid = os.getpid()
        _open.add(exporter)
        if _installed or threading.current_thread() is not threading.main_thread():
            return
        try:
            _previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # e.g. a sub-interpreter: atexit still covers exits
            return
        _installed = True


def closed(exporter: _Closable) -> None:
    """Forget a closed Exporter; with none left open, put the replaced handler back."""
    global _installed, _previous
    with _lock:
        _open.discard(exporter)
        if _open or not _installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # restored when a later close runs in the main thread, or never needed
        try:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # not replaced since
                signal.signal(signal.SIGTERM, _restorable(_previous))
        except (ValueError, OSError):
            return
        _installed, _previous = False, None


def close_open_exporters() -> None:
    """Close every Exporter still open; a failing close is reported as a warning and does
    not stop the others. In a forked child, nothing: the Exporters are its parent's."""
    if os.getpid() != _pid:
        return
    for exporter in list(_open):
        try:
            exporter.close()
        except Exception as exc:  # noqa: BLE001 - the others must still be closed
            warnings.warn(
                f"ikkuna: closing an Exporter at exit failed: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )


def _restorable(handler: Any) -> Any:
    # signal.getsignal returns None for a handler not installed from Python
    return signal.SIG_DFL if handler is None else handler


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Flush and close every open Exporter, then what SIGTERM would have done without us."""
    global _installed, _previous
    previous = _restorable(_previous)
    close_open_exporters()
    with _lock:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, previous)
        _installed, _previous = False, None
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        sys.stderr.flush()
        os.kill(os.getpid(), signum)  # the default action, now that it is restored
    # SIG_IGN: the signal stays ignored


atexit.register(close_open_exporters)
