import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morphoquant.numerics.hadamard import (
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    paley_hadamard,
    random_hadamard_matrix,
    sylvester_hadamard,
)


def test_fwht_is_sylvester_product():
    h4 = torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    assert torch.equal(sylvester_hadamard(4), h4)
    x = torch.randn(3, 16)
    assert torch.allclose(fwht(x), x @ sylvester_hadamard(16) / 4, atol=1e-6)
    with pytest.raises(ValueError):
        fwht(torch.randn(12))


@pytest.mark.parametrize("n", [12, 20, 28, 36, 76, 148])
def test_paley_matrices_are_hadamard(n):
    h = paley_hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n))


def test_paley_absent_for_orders_without_construction():
    assert paley_hadamard(172) is None       # 171 and 85 are not primes
    assert paley_hadamard(10) is None        # not a multiple of 4


@pytest.mark.parametrize("n,p,b,kind", [(64, 64, 1, "sylvester"), (576, 16, 36, "paley"), (896, 32, 28, "paley"),
                                        (1536, 128, 12, "paley"), (4864, 64, 76, "paley"),
                                        (11008, 256, 43, "random-orthogonal"), (48, 4, 12, "paley")])
def test_factorisation_of_model_widths(n, p, b, kind):
    f = hadamard_factor(n)
    assert (f.p, f.b, f.kind) == (p, b, kind)
    assert torch.allclose(f.block @ f.block.T, torch.eye(b), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 48, 80, 576, 896])
def test_dense_hadamard_is_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-5)
    if hadamard_factor(n).kind != "random-orthogonal":     # a true Hadamard: entries ±1/√n
        assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-6)


def test_transform_matches_dense_and_keeps_dtype():
    x = torch.randn(2, 5, 576, dtype=torch.float64)
    y = hadamard_transform(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert torch.allclose(y.float(), x.float() @ hadamard_matrix(576), atol=1e-4)


def test_random_hadamard_orthogonal_and_seeded():
    q1, q2, q1b = random_hadamard_matrix(96, 1), random_hadamard_matrix(96, 2), random_hadamard_matrix(96, 1)
    assert torch.allclose(q1 @ q1.T, torch.eye(96), atol=1e-5)
    assert torch.equal(q1, q1b) and not torch.equal(q1, q2)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40).map(lambda k: 4 * k), st.integers(0, 2 ** 16))
def test_transform_preserves_norms(n, seed):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed))
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)


def test_fallback_factor_transform_is_orthogonal_on_vectors():
    x = torch.randn(2, 11008)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)
    assert torch.allclose((x[0] * x[1]).sum(), (y[0] * y[1]).sum(), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("n", [64, 576, 896, 2752, 80])   # sylvester, paley, random-orthogonal (2752 = 64·43)
def test_inverse_transform_undoes_and_matches_dense_transpose(n):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    f = hadamard_factor(n, seed=3)
    y = hadamard_transform(x, f)
    assert torch.allclose(hadamard_transform(y, f, inverse=True), x, atol=1e-4)
    assert torch.allclose(hadamard_transform(x, f, inverse=True), x @ hadamard_matrix(n, f).T, atol=1e-4)
