"""File-system checks shared by the trainer and the report."""

from __future__ import annotations

import tempfile
from pathlib import Path


def probe_writable_dir(folder: Path) -> None:
    """Check that a file can be written in ``folder``: create it (and its missing parents),
    write and delete a temporary file there, then remove the folders this created, so the
    probe leaves nothing behind. Raises :class:`OSError` when it cannot."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    finally:
        for created in missing:
            try:
                created.rmdir()
            except OSError:
                break
