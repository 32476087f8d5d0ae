"""A frozen token embedding whose table is stored like a :class:`~hfquant.nn.qlinear.QuantLinear` weight.

An ``nn.Embedding(V, D)`` table is ``(V, D)``: the ``(out, in)`` weight of a linear layer with
``out = V`` rows (tokens) and ``in = D`` columns, grouped along ``D``. It is stored with exactly
the tensors a :class:`QuantLinear` of that shape stores (:meth:`WeightFormat.specs`: ``weight``,
int32 words of packed codes, and ``weight_<param>`` per group), so a tied output head can be a
:class:`QuantLinear` holding the *same* tensor objects: one stored table serves the lookup and
the output projection (:func:`tie_head`).

Every stored tensor has one row per token, so a lookup gathers the rows of the looked-up ids
(codes and parameters) and decodes only those (:meth:`QuantEmbedding.forward`): bit-exactly the
reference, decoding the whole table and then ``F.embedding`` (tested for every registered format).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfquant.formats import QuantizedWeight, WeightFormat
from hfquant.nn.qlinear import QuantLinear, apply_keeping_dtypes
from hfquant.schemes import LayerScheme


def lookup(stored: dict[str, torch.Tensor], fmt: WeightFormat, ids: torch.Tensor, embedding_dim: int,
           dtype: torch.dtype) -> torch.Tensor:
    """The rows ``ids`` of the table ``stored``, decoded in ``dtype``: ``(*ids.shape, embedding_dim)``."""
    flat = ids.reshape(-1)
    rows = {name: tensor.index_select(0, flat) for name, tensor in stored.items()}
    return fmt.decode(rows, embedding_dim, dtype).reshape(*ids.shape, embedding_dim)


def reference_lookup(stored: dict[str, torch.Tensor], fmt: WeightFormat, ids: torch.Tensor, embedding_dim: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The oracle of :func:`lookup`: decode the whole table, then ``F.embedding``."""
    return F.embedding(ids, fmt.decode(stored, embedding_dim, dtype))


class QuantEmbedding(nn.Module):
    """``table[ids]`` for a quantized ``(num_embeddings, embedding_dim)`` table in its scheme's stored layout.

    :attr:`dtype` is the dtype of the looked-up vectors (the model's float dtype); casting the
    module (``.to(bfloat16)``) changes it, while the stored tensors keep their dtypes, as in
    :class:`QuantLinear`. It is held by ``dtype_anchor``, an empty ``(0,)`` parameter of that dtype
    registered first (and saved, 0 bytes): transformers takes a model's dtype from its first
    floating-point parameter, which would otherwise be this table's float16 scales (a float32
    model would then save, reload and build its caches as float16).
    """

    transposed_source = False  # an embedding table is stored (rows, columns) like nn.Linear's weight

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: LayerScheme,
                 padding_idx: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if scheme.input is not None:
            raise ValueError(f"scheme {scheme.name!r} is not allowed for an embedding, which has no input "
                             "activations to quantize; allowed: a weight-only scheme")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.scheme = scheme
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=dtype or torch.get_default_dtype(), device=device),
                                         requires_grad=False)
        self.specs = scheme.weight.specs(num_embeddings, embedding_dim)
        for name, spec in self.specs.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(spec.shape, dtype=spec.dtype, device=device),
                                                       requires_grad=False))

    @property
    def fmt(self) -> WeightFormat:
        return self.scheme.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_anchor.dtype

    @property
    def in_features(self) -> int:
        """Columns of the table as a linear weight (what :class:`QuantLinear` calls ``in_features``)."""
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the table, keyed like :meth:`QuantizedWeight.stored`."""
        return {name: getattr(self, name) for name in self.specs}

    def load_quantized(self, quantized: QuantizedWeight) -> None:
        """Copy a quantized ``(num_embeddings, embedding_dim)`` table in."""
        for name, tensor in quantized.stored().items():
            getattr(self, name).data.copy_(tensor)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole ``(num_embeddings, embedding_dim)`` float table."""
        return self.fmt.decode(self.stored(), self.embedding_dim, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.stored(), self.fmt, ids, self.embedding_dim, self.dtype)

    def _apply(self, fn, recurse: bool = True):  # same signature as nn.Module._apply
        """``.to()``/``.half()``: stored tensors move but keep their dtype; ``dtype_anchor`` follows a cast."""
        return apply_keeping_dtypes(self, fn, recurse, tuple(self.specs))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}")


def tie_head(head: QuantLinear, embedding: QuantEmbedding) -> None:
    """Make ``head`` compute with ``embedding``'s stored tensors (the same objects: one stored table).

    ``ValueError`` when the two do not store the same table (scheme or shape differ).
    """
    if (head.scheme != embedding.scheme or head.in_features != embedding.embedding_dim
            or head.out_features != embedding.num_embeddings):
        raise ValueError(f"a tied output head must have its embedding's scheme and shape; the head is "
                         f"{head.scheme.name} ({head.out_features}, {head.in_features}), the embedding "
                         f"{embedding.scheme.name} ({embedding.num_embeddings}, {embedding.embedding_dim})")
    request = head._kernel_request
    head.release_kernel()
    for name in head.specs:
        setattr(head, name, getattr(embedding, name))
    if request is not None:
        head.prepare_kernel(*request)


def shares_table(head: QuantLinear, embedding: QuantEmbedding) -> bool:
    """Whether ``head`` computes with the very tensors ``embedding`` stores."""
    return all(getattr(head, name) is getattr(embedding, name) for name in embedding.specs)
