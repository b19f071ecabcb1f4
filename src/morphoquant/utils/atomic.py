"""Atomic file and directory writes.

A file is written to a temporary sibling, flushed and ``fsync``-ed, then moved over the target with
``os.replace`` (atomic on POSIX and Windows), and the parent directory is ``fsync``-ed so the rename itself
survives a crash. A reader therefore sees either the old file or the complete new one, never a torn write.

A directory is built in a temporary sibling (``.<name>.tmp-<random>``) and renamed into place when the
``with`` block exits without an exception; on an exception the temporary directory is removed and the
target is left untouched. Convention: the directory's manifest is written **last**, so a directory that
has one is complete (a reader that finds no manifest must treat the directory as foreign or unfinished).

A write that fails because the disk is full, the file system is read-only or the file is too large raises
:class:`OutputWriteError` (an ``OSError``): one line naming the file, the cause and the fix, after the temporary
file or directory has been removed. The libraries underneath do not all report such a failure as an
``OSError``: safetensors raises ``SafetensorError("... No space left on device (os error 28)")`` and
``torch.save`` raises ``RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos ...")`` with the
``errno`` lost; :func:`write_error` recognises both (for the latter, by finding the file system full).

Replacing an existing directory (``overwrite=True``) is two renames (old → ``.<name>.old-<random>``, new →
target) followed by removing the old copy; between the two renames the target briefly does not exist, but
it is never half written.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputWriteError", "atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "atomic_write_with", "fsync_dir", "fsync_file", "fsync_tree", "write_error"]

# errno values that mean "this output location cannot take the write" (not a bug, not bad input data)
OUTPUT_FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
# torch.save's C++ writer hides the errno; these are its messages for a short write
_TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "inline_container")
_FULL_BELOW_BYTES = 1 << 20      # a file system with less free space than this after a failed write is "full"


class OutputWriteError(OSError):
    """An output could not be written (disk full, read-only file system, file too large ...).

    ``str(e)`` is one line: ``"<cause>: <fix>"``; ``e.path`` is the file or directory being written.
    """

    def __init__(self, code: int, path: str | Path, cause: str, fix: str):
        super().__init__(code, f"{cause}: {fix}")
        self.path, self.cause, self.fix = Path(path), cause, fix

    def __str__(self) -> str:
        return self.strerror


def _existing_dir(path: Path) -> Path:
    p = path if path.is_dir() else path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(_existing_dir(path))
    except (OSError, AttributeError):      # pragma: no cover - no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind ``exc`` or one of its causes (also parsed from safetensors' "os error N")."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = _OS_ERROR_CODE.search(str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def write_error(exc: BaseException, path: str | Path) -> OutputWriteError | None:
    """:class:`OutputWriteError` for ``exc`` raised while writing ``path``, or ``None`` when ``exc`` is not an
    output fault (e.g. a value that cannot be serialised: let it propagate unchanged).

    Output faults: an errno in ``ENOSPC, EDQUOT, EFBIG, EROFS`` (on ``exc`` or its causes, or written as
    ``"os error N"``), or torch's errno-less short-write ``RuntimeError`` on a file system found full.
    """
    if isinstance(exc, OutputWriteError):
        return exc
    path = Path(path)
    code = _errno_of(exc)
    if code is None and any(s in str(exc) for s in _TORCH_SHORT_WRITE):
        free = _free_bytes(path)
        code = errno.ENOSPC if free is not None and free < _FULL_BELOW_BYTES else errno.EIO
    where = _existing_dir(path)
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
        return OutputWriteError(code, path, f"{what} holding {where} (while writing {path.name})",
                                "free some space there or choose another output directory")
    if code == errno.EROFS:
        return OutputWriteError(code, path, f"the file system holding {where} is read-only (while writing "
                                f"{path.name})", "choose another output directory")
    if code == errno.EFBIG:
        return OutputWriteError(code, path, f"{path} would exceed the maximum file size (ulimit -f or the file "
                                "system's limit)", "raise the limit or choose another output directory")
    if code == errno.EIO and not isinstance(exc, OSError):
        return OutputWriteError(code, path, f"could not write {path} ({exc})",
                                "check the output disk or choose another output directory")
    return None


def atomic_write_with(path: str | Path, write) -> Path:
    """Atomically create ``path`` with ``write(f)`` on a binary file object (temp sibling, fsync, rename).

    On any failure the temporary file is removed; output faults are raised as :class:`OutputWriteError`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        err = write_error(e, path) if isinstance(e, Exception) else None
        if err is not None and err is not e:
            raise err from e
        raise
    return path


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
    return atomic_write_with(path, lambda f: f.write(data))


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        err = write_error(e, target)
        if err is not None:
            raise err from e
        raise
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors and torch report a full disk without an OSError: write_error recognises them too
        err = write_error(e, target) if isinstance(e, Exception) else None
        if err is not None and err is not e:
            raise err from e
        raise
