import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morphoquant.numerics import pack_codes, pack_int4, unpack_codes, unpack_int4


def test_pack_int4_hand_computed():
    q = torch.tensor([[1, -1, 7, -8, 3]], dtype=torch.int8)
    p = pack_int4(q)
    # low nibble first; -1 -> 0xF, -8 -> 0x8; odd length padded with 0
    assert p.tolist() == [[0xF1, 0x87, 0x03]]
    assert torch.equal(unpack_int4(p, 5), q)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), rows=st.integers(0, 5), cols=st.integers(1, 33),
       seed=st.integers(0, 10_000))
def test_pack_unpack_identity(bits, signed, rows, cols, seed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (rows, cols), generator=g).to(torch.int16)
    p = pack_codes(q, bits, signed)
    assert p.dtype == torch.uint8
    per_byte = {2: 4, 4: 2}.get(bits, 1)
    assert p.shape[-1] == -(-cols // per_byte)
    assert torch.equal(unpack_codes(p, bits, cols, signed).to(torch.int16), q)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="range"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(ValueError, match="unpack"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 9)
