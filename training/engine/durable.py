"""Durable file writes: a reader sees the old file or the new one, never a half-written one,
even after a power cut.

Write to a temporary file in the same folder, ``fsync`` it, rename it over the target
(``os.replace`` is atomic on POSIX), then ``fsync`` the folder so the rename itself is on disk.
Without the two ``fsync`` calls the rename survives a crashed process but not a kernel panic or
a power cut on a file system that reorders writes (ext4 with ``data=writeback``, XFS): the new
name can reach the disk before the new data, leaving an empty or partial file under it.

Everything in the training application that writes a file a later run reads back (checkpoints,
``history.json``, ``config.yaml``, retrieval index shards) goes through :func:`atomic_write`.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from reid_kernels._files import fsync_folder  # noqa: F401 (re-exported)


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's content (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to the temporary path ``tmp``; it is then made durable and
    renamed to ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write` of a text file (UTF-8)."""
    def write(tmp: str) -> None:
        with open(tmp, "wt", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
