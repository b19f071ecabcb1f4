"""Orthonormal Hadamard transforms of any width used by rotation methods (QuaRot-style), in pure torch.

A Hadamard matrix ``H ∈ {±1}^{n×n}`` has ``H Hᵀ = n I``; ``H / √n`` is orthogonal. We use it to *mix* channels:
``x ↦ x · H/√n`` spreads one large channel over all ``n`` channels (incoherence), so per-token scales stop being
set by a few outlier channels, while ``‖x‖`` and every inner product are preserved.

**Power of two** ``n = 2^k`` (Sylvester, ``H_{2m} = [[H_m, H_m], [H_m, −H_m]]``): the fast Walsh–Hadamard
transform computes ``x · H`` with ``k`` butterfly stages of ``(a, b) ↦ (a + b, a − b)``, ``O(n log n)``.

**Other widths** ``n = 2^k · m`` (``m`` odd; e.g. 576 = 2^6·9, 896 = 2^7·7, 1536 = 2^9·3, 4864 = 2^8·19):
``n = p · b`` with ``p`` a power of two and ``b = 2^j · m`` the order of a *known* Hadamard matrix ``B``, and

    H_n = H_p ⊗ B,       x · (H_p ⊗ B) = reshape( H_pᵀ · X · B ),   X = reshape(x, [p, b])

(index ``i·b + j`` ↦ ``(i, j)``): a fast transform over the ``p`` axis, then a small dense product over the ``b``
axis (``O(n (log p + b))``). ``B`` comes from the **Paley constructions** (``q`` prime):

* Paley I, ``q ≡ 3 (mod 4)``: order ``q + 1``. Jacobsthal ``Q_{ij} = χ(j − i)`` (``χ`` = quadratic character
  mod ``q``), ``S = [[0, 1ᵀ], [−1, Q]]``, ``B = I + S``;
* Paley II, ``q ≡ 1 (mod 4)``: order ``2(q + 1)``. ``C = [[0, 1ᵀ], [1, Q]]`` (symmetric conference matrix),
  ``B = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]``.

That covers 12 (q=11), 20 (q=19), 28 (q=13, II), 36 (q=17, II), 76 (q=37, II), 148 (q=73, II) and more; the
smallest such ``b ≤ max_block`` is used. **Fallback** (documented, e.g. 11008 = 2^8·43, no Paley order 43·2^j
≤ 512): ``B`` is a seeded random orthogonal ``m × m`` matrix (QR of a Gaussian matrix, sign-fixed); the product
is still orthogonal and mixes channels, only not with ±1/√n entries.

A **random Hadamard** matrix is ``Q = D · H_n / √n`` with ``D = diag(±1)`` random signs (QuaRot): orthogonal,
and different for every seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

__all__ = ["HadamardFactor", "fwht", "hadamard_factor", "hadamard_matrix", "hadamard_transform", "is_pow2",
           "paley_hadamard", "random_hadamard_matrix", "random_signs", "sylvester_hadamard"]


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``x · H_n`` along the last axis (Sylvester order), ``n`` a power of two; ``/ √n`` when ``normalize``."""
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two width, got {n}; use hadamard_transform for other widths")
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(shape)
    return y / math.sqrt(n) if normalize else y


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix of order ``n = 2^k`` (fp32)."""
    return fwht(torch.eye(n), normalize=False)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    r = math.isqrt(q)
    return all(q % d for d in range(3, r + 1, 2))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).reshape(1, -1) - torch.arange(q).reshape(-1, 1)) % q      # j - i
    return chi[idx]


@cache
def _paley(n: int) -> torch.Tensor | None:
    if n % 4 != 0:
        return None
    q = n - 1
    if _is_prime(q) and q % 4 == 3:                      # Paley I
        jac = _jacobsthal(q)
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        return (torch.eye(n, dtype=torch.float64) + s).float()
    q = n // 2 - 1
    if _is_prime(q) and q % 4 == 1:                      # Paley II
        jac = _jacobsthal(q)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = jac
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return (torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)).float()
    return None


def paley_hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` by Paley I or II, or ``None`` when neither construction applies."""
    h = _paley(n)
    return None if h is None else h.clone()


@dataclass(frozen=True)
class HadamardFactor:
    """``H_n = H_p ⊗ B / √n`` factorisation of an orthonormal transform of width ``n = p · b``.

    ``block`` is the orthonormal ``[b, b]`` factor (``B / √b``, or a random orthogonal matrix when
    ``kind == "random-orthogonal"``); ``p`` is a power of two.
    """

    n: int
    p: int
    block: torch.Tensor
    kind: str      # "sylvester" | "paley" | "random-orthogonal"

    @property
    def b(self) -> int:
        return self.block.shape[0]


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).reshape(1, -1)
    return q.float()


def hadamard_factor(n: int, max_block: int = 512, seed: int = 0) -> HadamardFactor:
    """Factorisation of width ``n`` (module docstring): Sylvester, Paley ⊗ Sylvester, or the random-orthogonal
    fallback for the odd part (seeded by ``seed``)."""
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    if is_pow2(n):
        return HadamardFactor(n, n, torch.ones(1, 1), "sylvester")
    k = (n & -n).bit_length() - 1                          # n = 2^k · m
    m = n >> k
    for j in range(2, k + 1):
        b = m << j
        if b > max_block:
            break
        h = _paley(b)
        if h is not None:
            return HadamardFactor(n, n // b, h / math.sqrt(b), "paley")
    return HadamardFactor(n, 1 << k, _random_orthogonal(m, seed), "random-orthogonal")


def hadamard_transform(x: torch.Tensor, factor: HadamardFactor | None = None, inverse: bool = False) -> torch.Tensor:
    """``x · H_n`` (orthonormal) along the last axis for any width (fp32 compute, input dtype returned); with
    ``inverse``, ``x · H_nᵀ = x · H_n⁻¹`` (``H_nᵀ = H_p ⊗ Bᵀ``: the Sylvester factor is symmetric)."""
    n = x.shape[-1]
    factor = factor or hadamard_factor(n)
    if factor.n != n:
        raise ValueError(f"Hadamard factor of width {factor.n} applied to width {n}")
    dtype = x.dtype
    y = x.float()
    if factor.b == 1:
        return fwht(y).to(dtype)
    shape = y.shape
    y = y.reshape(-1, factor.p, factor.b)
    if factor.p > 1:
        y = fwht(y.transpose(1, 2)).transpose(1, 2)        # H_pᵀ X (Sylvester H_p is symmetric)
    y = y @ (factor.block.T if inverse else factor.block).to(y.device)
    return y.reshape(shape).to(dtype)


def hadamard_matrix(n: int, factor: HadamardFactor | None = None) -> torch.Tensor:
    """The dense orthonormal ``[n, n]`` matrix of :func:`hadamard_transform`."""
    return hadamard_transform(torch.eye(n), factor)


def random_signs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1


def random_hadamard_matrix(n: int, seed: int = 0, factor: HadamardFactor | None = None) -> torch.Tensor:
    """Dense ``Q = diag(signs) · H_n`` (orthonormal); ``x · Q = hadamard_transform(x ⊙ signs)``."""
    return random_signs(n, seed).reshape(-1, 1) * hadamard_matrix(n, factor)
