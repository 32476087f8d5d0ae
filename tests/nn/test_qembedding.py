"""QuantEmbedding against its reference (decode the whole table, then ``F.embedding``), for every format.

Parametrised over the format registry like ``tests/formats/test_registry.py``: every registered
name at its defaults and with 16-column groups. A lookup gathers the looked-up rows' codes and
parameters and decodes only those; it must equal the reference bit for bit, for odd table shapes,
repeated ids, the first and last rows, and in float32 and bfloat16. A tied head (a QuantLinear
holding the embedding's tensor objects) computes the reference linear of the same table.
"""

import pytest
import torch
import torch.nn.functional as F

from hfquant.formats import make_format
from hfquant.formats.base import WeightFormat
from hfquant.nn.qembedding import QuantEmbedding, lookup, reference_lookup, shares_table, tie_head
from hfquant.nn.qlinear import QuantLinear
from hfquant.schemes import LayerScheme
from format_cases import registered_format_variants


FORMATS = registered_format_variants()
SHAPES = [(37, 40), (5, 130), (64, 16)]  # (num_embeddings, embedding_dim): odd sizes, a short last group


def _table(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-2, 1, cols)


def _embedding(fmt: WeightFormat, rows: int, cols: int) -> QuantEmbedding:
    embedding = QuantEmbedding(rows, cols, LayerScheme(fmt))
    embedding.load_quantized(fmt.quantize(_table(rows, cols)))
    return embedding


def _ids(rows: int) -> torch.Tensor:
    ids = torch.randint(0, rows, (3, 7), generator=torch.Generator().manual_seed(1))
    ids[0, 0], ids[0, 1], ids[1, 2] = 0, rows - 1, ids[2, 3]  # first and last rows, a repeated id
    return ids


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(("rows", "cols"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_equals_reference_bit_exactly(fmt: WeightFormat, rows: int, cols: int, dtype: torch.dtype) -> None:
    embedding = _embedding(fmt, rows, cols)
    ids = _ids(rows)
    got = lookup(embedding.stored(), fmt, ids, cols, dtype)
    want = reference_lookup(embedding.stored(), fmt, ids, cols, dtype)
    assert got.shape == (*ids.shape, cols) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(embedding.to(dtype)(ids), want)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_tied_head_computes_with_the_embedding_table(fmt: WeightFormat) -> None:
    rows, cols = 37, 40
    embedding = _embedding(fmt, rows, cols)
    head = QuantLinear(cols, rows, LayerScheme(fmt), bias=False)
    tie_head(head, embedding)
    assert shares_table(head, embedding)
    assert all(getattr(head, name) is getattr(embedding, name) for name in embedding.specs)
    x = torch.randn(2, 5, cols, generator=torch.Generator().manual_seed(2))
    assert torch.equal(head(x), F.linear(x, embedding.dequantized_weight()))


def test_a_head_of_another_scheme_or_shape_is_not_tied() -> None:
    embedding = _embedding(make_format("int8"), 37, 40)
    with pytest.raises(ValueError, match="tied output head must have its embedding's scheme and shape"):
        tie_head(QuantLinear(40, 37, LayerScheme(make_format("int4")), bias=False), embedding)
    with pytest.raises(ValueError, match="tied output head"):
        tie_head(QuantLinear(40, 36, LayerScheme(make_format("int8")), bias=False), embedding)


def test_cast_moves_the_output_dtype_not_the_stored_dtypes() -> None:
    embedding = _embedding(make_format("int4"), 37, 40)
    dtypes = {name: t.dtype for name, t in embedding.stored().items()}
    embedding.to(torch.bfloat16)
    assert embedding.dtype == torch.bfloat16 and embedding(_ids(37)).dtype == torch.bfloat16
    assert {name: t.dtype for name, t in embedding.stored().items()} == dtypes
    assert "dtype_anchor" in embedding.state_dict() and embedding.dtype_anchor.numel() == 0


def test_an_input_mode_is_refused() -> None:
    from hfquant.activations import get_activation_mode

    scheme = LayerScheme(make_format("int8", group_size=-1, sym=True), get_activation_mode("int8-dynamic"))
    with pytest.raises(ValueError, match="not allowed for an embedding"):
        QuantEmbedding(8, 16, scheme)
