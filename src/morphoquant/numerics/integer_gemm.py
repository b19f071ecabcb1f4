"""The integer linear product shared by the fake-quant path and the integer runtime.

For integer activation codes ``x_q[N, C]`` (zero point ``z_x``), integer weight codes ``W_q[O, C]`` with scale
``s_w`` per output row and per group ``g`` of input channels, and an activation scale ``s_x`` per row (token or
tensor; 1 when per-channel scales were folded into the weight)::

    acc_g[n, o] = Σ_{c∈g} x_q[n, c] · W_q[o, c]  −  Σ_{c∈g} z_x[n|c] · W_q[o, c]          (exact integers)
    y[n, o]     = s_x[n] · Σ_g s_w[o, g] · acc_g[n, o]  +  b[o]

The zero-point term is an integer correction per output (per-channel ``z_x``: a constant vector, i.e. a bias;
per-token ``z_x``: ``z_x[n] · rowsum_g(W_q)[o]``). ``acc_g`` is an exact integer both when computed by an
int8 × int8 → int32 kernel (``torch._int_mm``) and by an fp32 matmul of integer-valued tensors as long as
``|acc_g| < 2^24`` (always true for 4-bit × 4-bit with ≤ 2^18 channels per group). The two paths then apply the
same fp32 scaling in the same order, so they agree bit for bit: that is what makes evaluated = deployed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def float_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in fp32 (exact for integer-valued inputs while sums stay below 2^24)."""
    return a.float() @ b.float().T


def integer_linear(x_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, *,
                   x_zero: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                   group_size: int | None = None, bias: torch.Tensor | None = None,
                   matmul: Matmul = float_matmul) -> torch.Tensor:
    """Scaled integer product (module docstring).

    Args:
        x_q: ``[N, C]`` integer activation codes (any dtype holding integers).
        w_q: ``[O, C]`` integer weight codes (symmetric: zero point 0).
        w_scale: ``[O, 1]``, ``[1, 1]`` or grouped ``[O, G, 1]`` fp32 weight scales.
        x_zero: ``None``, per-token ``[N, 1]``, per-tensor ``[1]`` or per-channel ``[C]`` activation zero point.
        x_scale: ``None`` (folded), per-token ``[N, 1]`` or per-tensor ``[1]`` activation scale.
        group_size: size of the weight groups along C when ``w_scale`` is grouped.
        matmul: ``(a[N,K], b[O,K]) -> a @ b.T`` as fp32; integer kernels plug in here.
    """
    c = x_q.shape[-1]
    grouped = w_scale.dim() == 3
    if grouped:
        g = group_size
        bounds = [(a, min(a + g, c)) for a in range(0, c, g)]
        scales = [w_scale[:, i, 0] for i in range(len(bounds))]
    else:
        bounds = [(0, c)]
        scales = [w_scale.reshape(-1)]
    y = None
    for (a, b_), s_w in zip(bounds, scales):
        acc = matmul(x_q[:, a:b_], w_q[:, a:b_])
        if x_zero is not None:
            acc = acc - zero_point_correction(x_zero, w_q, a, b_)
        part = acc * s_w
        y = part if y is None else y + part
    if x_scale is not None:
        y = y * x_scale.reshape(-1, 1) if x_scale.numel() > 1 else y * x_scale.reshape(())
    if bias is not None:
        y = y + bias
    return y


def zero_point_correction(x_zero: torch.Tensor, w_q: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Integer term ``Σ_{c∈[a,b)} z_x · W_q[o, c]`` — a per-output constant for per-channel or per-tensor zero
    points (a bias), an outer product ``z_x[n] · rowsum(W_q)[o]`` for per-token ones."""
    w = w_q[:, a:b].float()
    if x_zero.dim() == 1 and x_zero.numel() == w_q.shape[1] and w_q.shape[1] > 1:   # per channel
        return (w @ x_zero[a:b].float()).reshape(1, -1)
    if x_zero.numel() == 1:                                                           # per tensor
        return (w.sum(1) * x_zero.float().reshape(())).reshape(1, -1)
    return x_zero.float().reshape(-1, 1) * w.sum(1).reshape(1, -1)                   # per token
