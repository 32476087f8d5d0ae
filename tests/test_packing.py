import pytest
import torch

from hfquant.packing import WORD_BITS, pack, pack_bytes, pack_words, packed_width, unit_layout, unpack, unpack_bytes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("num_codes", [1, 7, 32, 33, 96, 576, 1000])
def test_pack_unpack_is_exact(bits: int, num_codes: int) -> None:
    codes = torch.randint(0, 2**bits, (6, num_codes), generator=torch.Generator().manual_seed(bits * num_codes))
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (6, packed_width(num_codes, bits))
    assert torch.equal(unpack(words, bits, num_codes).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_a_plain_bitstream(bits: int) -> None:
    """Code j occupies bits [bits*j, bits*(j+1)) of the row's little-endian stream of 32-bit words."""
    codes = torch.randint(0, 2**bits, (1, 64), generator=torch.Generator().manual_seed(0))
    stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes[0])  # bit k of the stream at index k
    stream += "0" * (-len(stream) % 32)
    expected = [int(stream[k:k + 32][::-1], 2) for k in range(0, len(stream), 32)]
    got = [int(w) & 0xFFFFFFFF for w in pack(codes, bits)[0]]
    assert got == expected


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("num_codes", [1, 7, 33, 576])
def test_unpack_bytes_matches_unpack(bits: int, num_codes: int) -> None:
    """The byte-wise unpacker (what formats decode with) gives every code of the generic one, padding included."""
    codes = torch.randint(0, 2**bits, (5, num_codes), generator=torch.Generator().manual_seed(bits + num_codes))
    words = pack(codes, bits)
    fast = unpack_bytes(words, bits)
    generic = unpack(words, bits, words.shape[-1] * WORD_BITS // bits)
    assert fast.dtype == generic.dtype == (torch.int16 if bits == 16 else torch.uint8)
    assert torch.equal(fast, generic)
    assert torch.equal(fast[:, :num_codes].long() & (2**bits - 1), codes)
    assert torch.all(fast[:, num_codes:] == 0)


def test_density() -> None:
    assert {b: unit_layout(b) for b in (2, 3, 4, 8)} == {2: (16, 1), 3: (32, 3), 4: (8, 1), 8: (4, 1)}
    for bits in (2, 3, 4, 8):  # exactly `bits` bits per code when the row is whole units
        assert packed_width(4096, bits) * 32 == 4096 * bits


def test_unpack_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="num_codes=64"):
        unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 64)


def test_pack_rejects_float_codes() -> None:
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(2, 8), 4)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("num_codes", [1, 7, 33, 96, 577])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_byte_packer_matches_the_generic_one(bits: int, num_codes: int, dtype: torch.dtype) -> None:
    codes = torch.randint(0, 2**bits, (2, 3, num_codes), generator=torch.Generator().manual_seed(bits * num_codes))
    fast, generic = pack_bytes(codes.to(dtype), bits), pack_words(codes, bits)
    assert fast.dtype == generic.dtype == torch.int32
    assert torch.equal(fast, generic)
