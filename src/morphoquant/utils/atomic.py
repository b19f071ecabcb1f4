"""Atomic file and directory writes.

A file is written to a temporary sibling, flushed and ``fsync``-ed, then moved over the target with
``os.replace`` (atomic on POSIX and Windows), and the parent directory is ``fsync``-ed so the rename itself
survives a crash. A reader therefore sees either the old file or the complete new one, never a torn write.

A directory is built in a temporary sibling (``.<name>.tmp-<random>``) and renamed into place when the
``with`` block exits without an exception; on an exception the temporary directory is removed and the
target is left untouched. Convention: the directory's manifest is written **last**, so a directory that
has one is complete (a reader that finds no manifest must treat the directory as foreign or unfinished).

Replacing an existing directory (``overwrite=True``) is two renames (old → ``.<name>.old-<random>``, new →
target) followed by removing the old copy; between the two renames the target briefly does not exist, but
it is never half written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir",
           "fsync_file", "fsync_tree"]


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry table (makes renames/creations inside it durable). No-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:       # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:       # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """``fsync`` every file and directory below ``root`` (files first, then their directories)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for f in filenames:
            fsync_file(Path(dirpath) / f)
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """JSON-encode ``obj`` (strictly: NaN/inf are refused) and write it atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    return atomic_write_text(path, text + "\n")


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` when the block succeeds.

    >>> with atomic_directory("out/model") as tmp:      # doctest: +SKIP
    ...     (tmp / "weights.bin").write_bytes(b"...")
    ...     (tmp / "manifest.json").write_text("{}")    # last: marks the directory complete

    Raises ``FileExistsError`` up front when ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            if not overwrite:     # appeared while we were writing
                raise FileExistsError(f"{target} appeared while it was being written; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
