"""GPTQ v1 bit-stream packing: exact round trips, the published golden words, and an independent
reading of the 3-bit layout written out by hand from the format description."""

import pytest
import torch

from compress.quant import pack_codes, unpack_codes
from compress.quant.uniform import to_gptq_tensors
from compress.quant import QuantConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 32), (64, 96), (70, 45), (1, 7), (200, 1)])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_exact(bits, shape, dim):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_codes(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == -(-shape[dim] // 32) * bits
    assert torch.equal(unpack_codes(packed, bits, shape[dim], dim=dim), codes)


# Golden qzeros words of symmetric GPTQ v1 (stored zero = 2^(b-1) - 1), from the format brief
GOLDEN_SYM_QZEROS = {
    2: [0x55555555],
    3: [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D],
    4: [0x77777777],
    8: [0x7F7F7F7F],
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_golden_symmetric_qzeros_words(bits):
    config = QuantConfig.uniform(bits, 32, sym=True)
    codes = torch.zeros(64, 32, dtype=torch.uint8)  # N=64 outputs, K=32 inputs: one group
    zero = torch.full((64, 1), 2 ** (bits - 1), dtype=torch.int32)
    scale = torch.ones(64, 1, dtype=torch.float16)
    qzeros = to_gptq_tensors(codes, scale, zero, config)["qzeros"]
    words = [w & 0xFFFFFFFF for w in qzeros[0].tolist()]
    golden = GOLDEN_SYM_QZEROS[bits]
    assert words == golden * (len(words) // len(golden))


def test_three_bit_layout_matches_the_10_1_10_1_10_description():
    """Word A: codes 0-9 at shifts 0..27, bits 0-1 of code 10 at 30-31; word B: bit 2 of code 10 at
    bit 0, codes 11-20 at shifts 1..28, bit 0 of code 21 at 31; word C: bits 1-2 of code 21 at 0-1,
    codes 22-31 at shifts 2..29."""
    codes = torch.randint(0, 8, (32,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    a, b, c = [w & 0xFFFFFFFF for w in pack_codes(codes, 3).tolist()]
    q = codes.tolist()
    expect_a = sum(q[i] << (3 * i) for i in range(10)) | ((q[10] & 0b11) << 30)
    expect_b = (q[10] >> 2) | sum(q[11 + i] << (1 + 3 * i) for i in range(10)) | ((q[21] & 1) << 31)
    expect_c = (q[21] >> 1) | sum(q[22 + i] << (2 + 3 * i) for i in range(10))
    assert (a, b, c) == (expect_a, expect_b, expect_c)


def test_bad_bits_and_short_input():
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(32, dtype=torch.int32), 5)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.int32), 4, 64)
