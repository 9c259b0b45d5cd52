import pytest
import torch

from nibble.formats.packing import pack_bits, packed_width, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 5, 64)])
def test_pack_round_trips_exactly(bits, shape):
    values = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    words = pack_bits(values, bits)
    assert words.dtype == torch.int32
    assert words.shape[-1] == packed_width(shape[-1], bits) == shape[-1] * bits // 32
    assert torch.equal(unpack_bits(words, bits), values)


def test_four_bit_layout_is_little_endian_nibbles():
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15] * 4])
    assert pack_bits(values, 4)[0, 0].item() & 0xFFFFFFFF == 0xF7654321


def test_out_of_range_and_bad_length_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.full((1, 32), 4), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bits(torch.zeros(1, 30, dtype=torch.int64), 2)
