"""Bit packing of integer codes along the last axis.

``pack_int4``: two 4-bit values per byte, element ``2j`` in the low nibble and ``2j+1`` in the high nibble;
``pack_int2``: four 2-bit values per byte, element ``4j+k`` in bits ``2k..2k+1``. Signed values are stored in
two's complement of their width (int4 −8..7 ↔ nibble 8..15). A last axis that is not a multiple of the
values-per-byte is zero-padded; ``unpack_*`` takes the original length ``n`` to drop the padding.
Widths 3, 5, 6, 7 and 8 are stored one value per byte (``pack_int8``).
"""
from __future__ import annotations

import torch


def _check_range(q: torch.Tensor, bits: int, signed: bool) -> None:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"values outside the {'signed' if signed else 'unsigned'} {bits}-bit range "
                         f"[{lo}, {hi}]: min {int(q.min())}, max {int(q.max())}")


def _pack(q: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    _check_range(q, bits, signed)
    per_byte = 8 // bits
    n = q.shape[-1]
    pad = (-n) % per_byte
    u = (q.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], u.shape[-1] // per_byte, per_byte)
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8)
    for k in range(per_byte):
        out |= u[..., k] << (bits * k)
    return out


def _unpack(p: torch.Tensor, bits: int, n: int, signed: bool) -> torch.Tensor:
    if p.dtype != torch.uint8:
        raise ValueError(f"packed tensors are uint8, got {p.dtype}")
    per_byte = 8 // bits
    if not (p.shape[-1] - 1) * per_byte < n <= p.shape[-1] * per_byte:
        raise ValueError(f"cannot unpack {n} values from a last axis of {p.shape[-1]} bytes ({per_byte} per byte)")
    mask = (1 << bits) - 1
    parts = [((p >> (bits * k)) & mask) for k in range(per_byte)]
    u = torch.stack(parts, -1).reshape(*p.shape[:-1], p.shape[-1] * per_byte)[..., :n].to(torch.int16)
    if signed:
        u = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return u.to(torch.int8 if signed else torch.uint8)


def pack_int4(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """int4 codes (−8..7, or 0..15 unsigned) → uint8, two per byte."""
    return _pack(q, 4, signed)


def unpack_int4(p: torch.Tensor, n: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`; returns int8 (signed) or uint8 codes with last axis ``n``."""
    return _unpack(p, 4, n, signed)


def pack_int2(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """int2 codes (−2..1, or 0..3 unsigned) → uint8, four per byte."""
    return _pack(q, 2, signed)


def unpack_int2(p: torch.Tensor, n: int, signed: bool = True) -> torch.Tensor:
    return _unpack(p, 2, n, signed)


def pack_int8(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """One value per byte (any width ≤ 8), stored as uint8 bit patterns."""
    _check_range(q, 8, signed)
    return q.to(torch.int16).bitwise_and(0xFF).to(torch.uint8)


def unpack_int8(p: torch.Tensor, n: int | None = None, signed: bool = True) -> torch.Tensor:
    if p.dtype != torch.uint8:
        raise ValueError(f"packed tensors are uint8, got {p.dtype}")
    return p.view(torch.int8) if signed else p


def pack_codes(q: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack with the densest layout for ``bits``: 2 → four a byte, 4 → two a byte, else one a byte."""
    if bits == 2:
        return pack_int2(q, signed)
    if bits == 4:
        return pack_int4(q, signed)
    return pack_int8(q, signed)


def unpack_codes(p: torch.Tensor, bits: int, n: int, signed: bool) -> torch.Tensor:
    if bits == 2:
        return unpack_int2(p, n, signed)
    if bits == 4:
        return unpack_int4(p, n, signed)
    return unpack_int8(p, n, signed)
