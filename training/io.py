"""Crash-safe file writes: a temporary file in the same directory, fsynced, moved in place."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (renames into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush the contents of the file at ``path`` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directory itself (before renaming it)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_directory(directory)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def atomic_write_text(path: Path, data: str) -> None:
    """:func:`atomic_write_bytes` of ``data`` encoded as UTF-8."""
    atomic_write_bytes(path, data.encode("utf-8"))


def local_path(uri: str) -> Path | None:
    """The file a ``file://`` URI names on this host, or None for any other scheme or a
    ``file://`` URI naming another host."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parsed.path))
