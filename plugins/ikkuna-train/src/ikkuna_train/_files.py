"""File-system checks shared by the trainer and the report."""

from __future__ import annotations

import tempfile
from pathlib import Path


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    return missing


def probe_writable_dir(folder: Path) -> None:
    """Check that a file can be written in ``folder``: create it (and its missing parents),
    write and delete a temporary file there, then remove the folders this created, so the
    probe leaves nothing behind. Raises :class:`OSError` when it cannot."""
    missing = missing_folders(folder)
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
