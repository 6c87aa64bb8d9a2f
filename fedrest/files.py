"""Durable files: the one atomic writer (temporary file, fsync, ``os.replace``, directory fsync).

Every file that a later start of the coordinator reads (global models, checkpoints, updates, credential
digests, generated tokens) is written here: :func:`write_temporary` puts the bytes on disk under a hidden
name, :func:`replace_durably` renames them into place and flushes the directory, and
:func:`atomic_write_bytes` does both at once. A reader sees the old file or the whole new one, never a part,
and a file acknowledged after :func:`replace_durably` survives a crash or a power loss. The two halves are
apart because the update spool writes outside the federation's lock and renames inside it.

Temporaries are named ``.<name>.<random>.tmp`` (mode 0600) in the target's directory, so that
:func:`remove_stale_temporaries` can clear what an interrupted write left behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from fedrest import failpoints


def write_temporary(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (mode 0600) and fsync it; returns its path.

    The directory of ``path`` is created when missing. On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """``os.replace(tmp, path)``, then fsync the directory so that the rename itself is on disk."""
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    :func:`write_temporary`, then :func:`replace_durably`; the temporary file is removed if the rename fails.
    """
    tmp = write_temporary(path, data)
    try:
        failpoints.hit("atomic_write.before_replace")
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file) to disk, where the platform allows it."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temporaries(directories: Iterable[Path]) -> None:
    """Delete the ``.*.tmp`` files that an interrupted write left in ``directories`` and their sub-folders
    (one level down); they were never renamed into place, so nothing refers to them."""
    for directory in directories:
        if directory.is_dir():
            for leftover in list(directory.glob(".*.tmp")) + list(directory.glob("*/.*.tmp")):
                leftover.unlink(missing_ok=True)
