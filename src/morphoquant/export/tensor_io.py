"""safetensors files: written with the ``safetensors`` library, read back by a strict parser of our own.

The reader never trusts the file: the 8-byte header length, the JSON header, every dtype, shape and byte
range are checked before a tensor is built, so a truncated, tampered or random file raises
:class:`~morphoquant.export.errors.CorruptCheckpointError` (never a crash or a silently short tensor).

File layout (the safetensors specification): ``u64 little-endian N`` | ``N bytes of UTF-8 JSON`` | data.
The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the start of the data section) plus an optional ``"__metadata__"`` string→string map.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from pathlib import Path

import torch

from .errors import CorruptCheckpointError

__all__ = ["DTYPE_TO_ST", "ST_TO_DTYPE", "read_header", "read_safetensors", "sha256_file", "sha256_tensor",
           "tensor_nbytes", "write_safetensors"]

ST_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_ST = {v: k for k, v in ST_TO_DTYPE.items()}
_MAX_HEADER = 100 * 1024 * 1024     # the safetensors library's own limit


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes safetensors stores for ``t`` (a zero-copy view when possible)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(_raw_bytes(t)).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                      ) -> None:
    """Write ``tensors`` (contiguous CPU copies; shared storage is not allowed) and ``fsync`` the file."""
    from safetensors.torch import save_file

    for name, t in tensors.items():
        if t.dtype not in DTYPE_TO_ST:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        _sort_metadata_in_place(path, metadata)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sort_metadata_in_place(path: str | Path, metadata: dict[str, str]) -> None:
    """safetensors writes ``__metadata__`` in hash-map order (it changes from run to run); rewrite that
    object with sorted keys — same bytes, same length — so identical inputs give identical files."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n).decode("utf-8")
        start = header.index('"__metadata__":{') + len('"__metadata__":')
        end = header.index("}", start) + 1
        try:
            fixed = json.dumps(dict(sorted(json.loads(header[start:end]).items())), separators=(",", ":"))
        except ValueError:                  # a "}" inside a value: keep the file as written
            return
        if len(fixed) != end - start:       # unexpected formatting: leave the file as written
            return
        f.seek(8 + start)
        f.write(fixed.encode("utf-8"))


def _parse_header(buf, size: int, where: str) -> tuple[dict, dict, int]:
    if size < 8:
        raise CorruptCheckpointError(f"{where}: {size} bytes is too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n == 0 or n > _MAX_HEADER or 8 + n > size:
        raise CorruptCheckpointError(f"{where}: header length {n} does not fit a {size}-byte file "
                                     "(truncated or not a safetensors file)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptCheckpointError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, dict] = {}
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CorruptCheckpointError(f"{where}: malformed header entry for tensor {name!r}")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in ST_TO_DTYPE:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} has unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40 for d in shape)):
            raise CorruptCheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CorruptCheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offs!r}")
        begin, end = offs
        nbytes = math.prod(shape) * _itemsize(ST_TO_DTYPE[dt])
        if not 0 <= begin <= end or end - begin != nbytes:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} spans bytes [{begin}, {end}) but its dtype "
                                         f"{dt} and shape {shape} need {nbytes} bytes")
        if end > data_len:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} ends at byte {end} of a {data_len}-byte data "
                                         "section (the file is truncated)")
        entries[name] = {"dtype": dt, "shape": shape, "begin": data_start + begin, "end": data_start + end}
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CorruptCheckpointError(f"{where}: tensors {n0!r} and {n1!r} overlap in the file")
    return entries, meta, data_start


def read_header(path: str | Path) -> tuple[dict, dict]:
    """``(entries, metadata)`` of a safetensors file without reading its data; entries map name →
    ``{"dtype", "shape", "begin", "end"}`` (absolute byte offsets)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 8 + n <= size and n <= _MAX_HEADER:
                head += f.read(n)
    entries, meta, _ = _parse_header(head, size, str(path))
    return entries, meta


def read_safetensors(path: str | Path, *, with_sha256: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Strictly parse and load a safetensors file.

    Returns ``(tensors, metadata, sha256_by_tensor)`` (the last is empty unless ``with_sha256``). Raises
    :class:`CorruptCheckpointError` on any inconsistency.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot read ({e})") from None
    if size == 0:
        raise CorruptCheckpointError(f"{path}: empty file (truncated)")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 8 + n <= size and n <= _MAX_HEADER:
                head += f.read(n)
        entries, meta, _ = _parse_header(head, size, str(path))
        tensors: dict[str, torch.Tensor] = {}
        shas: dict[str, str] = {}
        for name, e in sorted(entries.items(), key=lambda kv: kv[1]["begin"]):
            buf = bytearray(e["end"] - e["begin"])
            f.seek(e["begin"])
            if f.readinto(buf) != len(buf):
                raise CorruptCheckpointError(f"{path}: short read of tensor {name!r} (truncated)")
            if with_sha256:
                shas[name] = hashlib.sha256(buf).hexdigest()
            dtype = ST_TO_DTYPE[e["dtype"]]
            if not buf:
                t = torch.empty(e["shape"], dtype=dtype)
            else:
                t = torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])
            tensors[name] = t
    return tensors, meta, shas
