"""Ternary and binary against BitNet's formulas.

* ternary (BitNet b1.58): ``scale = mean|w|`` (or ``max|w|``), ``t = clamp(round(w / scale), -1, 1)``,
  code ``t + 1``; binary (BitNet): ``scale = mean|w|``, ``+1`` where ``w > 0``, else ``-1``, code ``(w > 0)``.
  Scales are the smallest float16 >= the rule's value (``2**-24`` for an all-zero group).

Error bound checked: the codes are the nearest table value of ``w / scale`` (so within ``scale / 2``
inside the table's range for ternary), and ``affine(params)`` reproduces ``dequantize`` exactly.
"""

import pytest
import torch

from hfquant.formats import format_from_dict, make_format, parse_spec

F16_POSITIVE = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
SHAPES = [((1, 37), 128), ((6, 100), 32), ((3, 130), 64), ((2, 50), 8)]


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def float16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest positive float16 >= x, as float32."""
    return F16_POSITIVE[torch.searchsorted(F16_POSITIVE, x)]


def bitnet_ternary(w: torch.Tensor, group: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = [], []
    for part in w.split(group, dim=1):
        scale = float16_up(part.abs().mean(dim=1) if rule == "absmean" else part.abs().amax(dim=1))
        codes.append(torch.clamp(torch.round(part / scale[:, None]), -1, 1).long() + 1)
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def bitnet_binary(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    scales = torch.stack([float16_up(part.abs().mean(dim=1)) for part in w.split(group, dim=1)], dim=1)
    return (w > 0).long(), scales


def _expand(scales: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    return scales.repeat_interleave(group, dim=1)[:, :cols]


@pytest.mark.parametrize("rule", ["absmean", "absmax"])
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_ternary_matches_bitnet(rule: str, shape: tuple[int, int], group: int) -> None:
    fmt = make_format("ternary", group_size=group, scale_rule=rule)
    w = _weight(*shape, seed=shape[1])
    codes, scales = bitnet_ternary(w, group, rule)
    qw = fmt.quantize(w)
    assert torch.equal(qw.codes.long(), codes)
    assert qw.params["scale"].dtype == torch.float16 and torch.equal(qw.params["scale"].float(), scales)
    assert torch.equal(qw.dequantize(), (codes - 1).float() * _expand(scales, group, shape[1]))


@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_binary_matches_bitnet_sign(shape: tuple[int, int], group: int) -> None:
    fmt = make_format("binary", group_size=group)
    w = _weight(*shape, seed=shape[1])
    w[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    codes, scales = bitnet_binary(w, group)
    qw = fmt.quantize(w)
    assert torch.equal(qw.codes.long(), codes) and qw.codes[0, :3].tolist() == [0, 0, 1]
    assert torch.equal(qw.params["scale"].float(), scales)
    assert torch.equal(qw.dequantize(), (2 * codes - 1).float() * _expand(scales, group, shape[1]))


@pytest.mark.parametrize(("x", "expected"), [(0.5, 0), (-0.5, 0), (0.5000001, 1), (1.5, 1), (-1.5, -1),
                                             (-1e9, -1), (0.0, 0), (-0.0, 0)])
def test_ternary_ties_as_torch_round(x: float, expected: int) -> None:
    fmt = make_format("ternary")
    assert int(fmt.round(torch.tensor([x]), {"scale": torch.ones(1)})) - 1 == expected


@pytest.mark.parametrize("name", ["ternary", "binary"])
def test_codes_are_the_nearest_table_value(name: str) -> None:
    fmt = make_format(name, group_size=16)
    w = _weight(8, 64, seed=4) * 3
    qw = fmt.quantize(w)
    x = w / _expand(qw.params["scale"].float(), 16, 64)
    table = torch.tensor(fmt.table)
    dist = (x[..., None] - table).abs()
    assert torch.equal(dist.gather(-1, qw.codes.long()[..., None])[..., 0], dist.amin(-1))


@pytest.mark.parametrize(("name", "zero", "step"), [("ternary", 1.0, 1.0), ("binary", 0.5, 2.0)])
def test_affine_reproduces_dequantize_exactly(name: str, zero: float, step: float) -> None:
    fmt = make_format(name, group_size=16)
    qw = fmt.quantize(_weight(5, 48, seed=5) * torch.logspace(-6, 3, 5)[:, None])
    scale, zeros = fmt.affine(qw.params)
    assert scale.dtype == zeros.dtype == torch.float32 and scale.shape == zeros.shape == qw.params["scale"].shape
    assert bool((zeros == zero).all()) and torch.equal(scale, qw.params["scale"].float() * step)
    for code in range(len(fmt.table)):  # every code the table uses, on every group's scale
        codes = torch.full(qw.params["scale"].shape, code, dtype=torch.uint8)
        assert torch.equal((codes - zeros) * scale, fmt.dequantize(codes, qw.params, torch.float32))
    width = scale.repeat_interleave(16, dim=1)
    assert torch.equal((qw.codes - zeros.repeat_interleave(16, dim=1)) * width, qw.dequantize())


def test_ternary_unused_code_decodes_as_the_kernels_decode_it() -> None:
    """Code 3 is never produced; a corrupted one decodes affinely to ``2 · scale`` on every path."""
    fmt = make_format("ternary")
    assert fmt.code_bits == 2 and fmt.num_codes == 3
    scale = {"scale": torch.full((1,), 0.5)}
    assert fmt.dequantize(torch.tensor([3], dtype=torch.uint8), scale, torch.float32).tolist() == [1.0]


@pytest.mark.parametrize(("name", "expected"), [("ternary", 0.0), ("binary", -(2.0**-24))])
def test_all_zero_groups(name: str, expected: float) -> None:
    fmt = make_format(name, group_size=16)
    w = _weight(3, 40)
    w[0] = 0
    w[1, 16:32] = 0
    qw = fmt.quantize(w)
    assert bool((qw.params["scale"][0] == 2**-24).all()) and qw.params["scale"][1, 1] == 2**-24
    deq = qw.dequantize()
    assert bool((deq[0] == expected).all()) and bool((deq[1, 16:32] == expected).all())
    assert fmt.check_stored(qw.stored(), 40) is None


def test_names_and_saved_form() -> None:
    ternary, binary = make_format("ternary"), make_format("binary")
    assert ternary.name == "ternary-g128-absmean" and ternary.code_bits == 2
    assert binary.name == "binary-g128" and binary.code_bits == 1 and binary.scale_rule == "absmean"
    assert ternary.to_dict() == {"format": "ternary", "group_size": 128, "scale_rule": "absmean", "packing": "2bit"}
    assert binary.to_dict() == {"format": "binary", "group_size": 128}
    assert parse_spec("ternary-absmax") == make_format("ternary", scale_rule="absmax")
    for spec in ["ternary-g128-absmean", "ternary-g64-absmax", "ternary-gc-absmean", "ternary-g128-absmean-base3",
                 "binary-g128", "binary-gc"]:
        fmt = parse_spec(spec)
        assert fmt.name == spec and parse_spec(fmt.name) == fmt and format_from_dict(fmt.to_dict()) == fmt
    assert ternary.stored_bits(4, 256) == 4 * 256 * 2 + 4 * 2 * 16
    assert binary.stored_bits(4, 256) == 4 * 256 + 4 * 2 * 16


def test_bad_fields_name_the_field() -> None:
    from hfquant.formats.ternary import Ternary

    with pytest.raises(ValueError, match="scale_rule='absmin'"):
        Ternary(scale_rule="absmin")
    with pytest.raises(ValueError, match="codebook='nf4'"):
        Ternary(codebook="nf4")
    with pytest.raises(ValueError, match="packing='base4'"):
        make_format("ternary", packing="base4")
    with pytest.raises(ValueError, match="group_size=True"):
        make_format("ternary", group_size=True)
    with pytest.raises(ValueError, match=r"does not take \['scale_rule'\]"):
        make_format("binary", scale_rule="absmax")
    with pytest.raises(ValueError, match="'absmax' is not a word"):
        parse_spec("binary-g128-absmax")
    with pytest.raises(ValueError, match="'sym' is not a word"):
        parse_spec("ternary-sym")


@pytest.mark.parametrize("n", [1, 5, 19, 20, 21, 37, 100])
def test_base3_packing_is_exact_and_dense(n: int) -> None:
    from hfquant.formats.ternary import pack_trits, unpack_trits

    codes = torch.randint(0, 3, (3, n), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    words = pack_trits(codes)
    assert words.dtype == torch.int32 and words.shape == (3, -(-n // 20))
    assert torch.equal(unpack_trits(words)[:, :n], codes) and not unpack_trits(words)[:, n:].any()
    fmt = make_format("ternary", packing="base3")
    assert fmt.code_words(n) == words.shape[1] and fmt.stored_bits(3, 4000) == 3 * (4000 * 8 // 5 + 32 * 16)


def test_base3_layout_is_five_digits_per_byte_little_endian() -> None:
    from hfquant.formats.ternary import pack_trits

    codes = torch.tensor([[2, 1, 0, 0, 1] + [0] * 5 + [2] * 5 + [1, 0, 0, 0, 0]])
    byte = [2 + 3 + 81, 0, 242, 1]
    assert int(pack_trits(codes)[0, 0]) & 0xFFFFFFFF == byte[0] | byte[1] << 8 | byte[2] << 16 | byte[3] << 24


def test_base3_stores_the_same_weights_in_fewer_bits() -> None:
    w = _weight(5, 130, seed=7)
    dense, plain = parse_spec("ternary-g32-base3"), parse_spec("ternary-g32")
    qd, qp = dense.quantize(w), plain.quantize(w)
    assert torch.equal(qd.codes, qp.codes) and torch.equal(qd.dequantize(), qp.dequantize())
    assert qd.stored()["weight"].shape == (5, 7) and qp.stored()["weight"].shape == (5, 9)
    assert dense.check_stored(qd.stored(), 130) is None
    assert "weight" in dense.check_stored(qp.stored(), 130)  # a 2-bit layout is not a base-3 one
