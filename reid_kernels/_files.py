"""File-system helpers shared by the library and the training application."""
from __future__ import annotations

import os


def fsync_folder(folder: str) -> None:
    """``fsync`` a folder, so a rename or a new file inside it is on disk (a no-op where folders
    cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
