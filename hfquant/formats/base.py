"""What every weight format is: a frozen record that declares its stored tensors and its rounding.

A format subclass declares itself in a few lines (see :mod:`hfquant.formats.affine` for the
pattern): the names it answers to (``names``), its code width (``code_bits``), the per-group
parameters it stores (``param_dtypes``), and three element-wise functions of tensors:

* :meth:`WeightFormat.choose_params` — per-row parameters of one group of columns;
* :meth:`WeightFormat.round` — codes of weights on a given grid;
* :meth:`WeightFormat.dequantize` — weights from codes and parameters, in a dtype.

A format whose decoding is affine in the code also defines ``affine(params) -> (scale, zero)``
(``w = (q - zero) · scale``); the integer kernels of :mod:`hfquant.nn.kernels` take exactly those.

Everything else is derived here, once for all formats: the stored tensors of a layer
(:meth:`specs`, so the module, the checkpoint check and the size accounting read one table),
round-to-nearest quantization (:meth:`quantize`), decoding of stored tensors (:meth:`decode`),
validation of loaded tensors (:meth:`check_stored`) and the saved form (:meth:`to_dict`).

Stored layout, the same for every format: ``weight`` holds the codes bit-packed into int32 words
(:mod:`hfquant.packing`), so its shape never equals ``nn.Linear``'s and a load without
``import hfquant`` fails loudly; each parameter ``p`` is stored as ``weight_<p>`` with shape
``(out_features, num_groups)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hfquant.packing import pack, packed_width, unpack_bytes
from hfquant.validation import require_int

Params = dict[str, torch.Tensor]
SCALE_DTYPE = torch.float16
SCALE_MIN = 2.0**-24  # smallest positive float16: a stored scale is never zero


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        return math.prod(self.shape) * _dtype_bits(self.dtype)


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


@dataclass(frozen=True)
class FormatName:
    """A registered format name: the class it builds, the fields it fixes, and defaults of the others."""

    cls: type[WeightFormat]
    fixed: Mapping[str, Any]
    defaults: Mapping[str, Any]


FORMAT_NAMES: dict[str, FormatName] = {}


@dataclass(frozen=True, kw_only=True)
class WeightFormat:
    """A weight format: grouping plus what a subclass declares. Instances are immutable values."""

    group_size: int = 128  # input columns per group; -1 = one group per output row

    names: ClassVar[dict[str, dict[str, Any]]] = {}  # format name -> fields it fixes
    defaults: ClassVar[dict[str, Any]] = {}  # defaults of the other fields, by format name: {name: {field: v}}
    spec_tokens: ClassVar[dict[str, dict[str, Any]]] = {}  # extra spec words, e.g. {"sym": {"sym": True}}
    grouped: ClassVar[bool] = True  # False: no per-group parameters (group_size is fixed at -1)
    elementwise: ClassVar[bool] = True  # rounding is per weight given the group's parameters (GPTQ can use it)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, fixed in cls.__dict__.get("names", {}).items():
            if name in FORMAT_NAMES:
                raise ValueError(f"format name {name!r} is registered twice")
            FORMAT_NAMES[name] = FormatName(cls, fixed, cls.defaults.get(name, {}))

    def __post_init__(self) -> None:
        if not self.grouped and not _per_channel(self.group_size):
            raise ValueError(f"group_size={self.group_size!r} is not allowed for format {self.format_name!r}, "
                             "which has no groups; allowed: leave it out")
        object.__setattr__(self, "group_size", -1 if _per_channel(self.group_size) else _group_size(self.group_size))

    # --- what a subclass declares -------------------------------------------------------------

    @property
    def code_bits(self) -> int:
        raise NotImplementedError

    @property
    def param_dtypes(self) -> dict[str, torch.dtype]:
        """Stored per-group parameters and their dtypes, e.g. ``{"scale": float16}``."""
        raise NotImplementedError

    def choose_params(self, w: torch.Tensor, clip: float = 1.0) -> Params:
        """Per-row parameters for the columns of ``w`` ``(rows, cols)``, as float32 ``(rows,)`` tensors.

        Values are exactly representable in :attr:`param_dtypes`. ``clip`` < 1 shrinks the covered
        range (used by range searches such as GPTQ's ``mse_clip``).
        """
        raise NotImplementedError

    def round(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Codes (an integer tensor) of ``w`` on the grid ``params`` (broadcast against ``w``)."""
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        """Weights of ``codes`` in ``dtype``; ``params`` broadcast against ``codes``."""
        raise NotImplementedError

    def check_params(self, params: Params) -> str | None:
        """A description of what is wrong with loaded parameters, or None. Default: finite, positive scales."""
        scale = params.get("scale")
        if scale is not None and not bool((torch.isfinite(scale.float()) & (scale.float() > 0)).all()):
            return "weight_scale has non-finite or non-positive values"
        return None

    @property
    def name(self) -> str:
        """The canonical spec string, e.g. ``int4-g128-asym``; :func:`hfquant.formats.parse_spec` inverts it."""
        return "-".join([self.format_name, *self._name_tokens()])

    def _name_tokens(self) -> list[str]:
        return [_group_token(self.group_size)] if self.grouped else []

    def describe(self) -> str:
        """One sentence for model cards."""
        return f"`{self.name}`"

    # --- packing: dense bit fields by default; a format may pack more densely --------------------

    def code_words(self, in_features: int) -> int:
        """int32 words per row that hold ``in_features`` codes."""
        return packed_width(in_features, self.code_bits)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``(rows, in)`` codes -> ``(rows, code_words(in))`` int32 words."""
        return pack(codes, self.code_bits)

    def unpack_codes(self, words: torch.Tensor) -> torch.Tensor:
        """Every code the words hold (padding included), inverse of :meth:`pack_codes`."""
        return unpack_bytes(words, self.code_bits)

    # --- derived, the same for every format -----------------------------------------------------

    @property
    def format_name(self) -> str:
        """The registered name whose fixed fields this instance has (the first, for aliases)."""
        for name, fixed in type(self).names.items():
            if all(getattr(self, k) == v for k, v in fixed.items()):
                return name
        raise ValueError(f"{self!r} matches none of its class's names {list(type(self).names)}")

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """Groups per row; the last one is shorter when ``group_size`` does not divide ``in_features``."""
        return math.ceil(in_features / self.group_width(in_features)) if self.grouped else 0

    def group_columns(self, in_features: int) -> list[slice]:
        """The column ranges of a row's groups, in order (a single one for formats without groups)."""
        width = self.group_width(in_features)
        return [slice(start, min(start + width, in_features)) for start in range(0, in_features, width)]

    def specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """The tensors a layer of this shape stores, by parameter name (``weight`` first)."""
        specs = {"weight": TensorSpec((out_features, self.code_words(in_features)), torch.int32)}
        groups = self.num_groups(in_features)
        for param, dtype in self.param_dtypes.items():
            specs[f"weight_{param}"] = TensorSpec((out_features, groups), dtype)
        return specs

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Bits a layer of this shape stores (codes with padding, and every parameter)."""
        return sum(spec.bits for spec in self.specs(out_features, in_features).values())

    def quantize(self, w: torch.Tensor,
                 choose_params: Callable[[torch.Tensor], Params] | None = None) -> QuantizedWeight:
        """Round-to-nearest quantization of an ``(out, in)`` weight.

        ``choose_params`` replaces :meth:`choose_params` for picking each group's grid (e.g. a range search).
        """
        check_weight(w)
        w = w.detach().float()
        choose = choose_params or self.choose_params
        params: dict[str, list[torch.Tensor]] = {p: [] for p in self.param_dtypes}
        codes = []
        for cols in self.group_columns(w.shape[1]):
            group = choose(w[:, cols])
            codes.append(self.round(w[:, cols], {k: v[:, None] for k, v in group.items()}))
            for k, v in group.items():
                params[k].append(v)
        return QuantizedWeight(torch.cat(codes, dim=1), self.stack_params(params), self)

    def stack_params(self, per_group: Mapping[str, list[torch.Tensor]]) -> Params:
        """``{param: [(rows,) per group]}`` -> the stored ``(rows, groups)`` tensors in their dtypes."""
        return {k: torch.stack(per_group[k], dim=1).to(dtype) for k, dtype in self.param_dtypes.items()}

    def decode(self, stored: Mapping[str, torch.Tensor], in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight of a layer's stored tensors, in ``dtype``.

        Per-group parameters broadcast over a ``(out, groups, group width)`` view of the codes
        instead of being repeated, so decoding costs one pass over the codes.
        """
        codes = self.unpack_codes(stored["weight"])
        rows = codes.shape[0]
        if not self.grouped:
            return self.dequantize(codes[:, :in_features], {}, dtype)
        groups, width = self.num_groups(in_features), self.group_width(in_features)
        span = groups * width  # the last group padded to full width
        codes = codes[:, :span] if codes.shape[1] >= span else torch.nn.functional.pad(codes, (0, span - codes.shape[1]))
        params = {k: v.unsqueeze(-1) for k, v in self.stored_params(stored).items()}
        weight = self.dequantize(codes.reshape(rows, groups, width), params, dtype)
        return weight.reshape(rows, span)[:, :in_features]

    def check_stored(self, stored: Mapping[str, torch.Tensor], in_features: int) -> str | None:
        """What is wrong with a loaded layer's tensors (dtype, shape, values), or None."""
        if "weight" not in stored:
            return "tensor 'weight' is missing"
        out_features = stored["weight"].shape[0]
        for key, spec in self.specs(out_features, in_features).items():
            tensor = stored.get(key)
            if tensor is None:
                return f"tensor {key!r} is missing"
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                return (f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, "
                        f"format {self.name} stores {str(spec.dtype).removeprefix('torch.')} {spec.shape}")
        if tensor_is_meta(stored["weight"]):
            return None
        return self.check_params(self.stored_params(stored))

    def stored_params(self, stored: Mapping[str, torch.Tensor]) -> Params:
        """``{param: (out, groups) tensor}`` out of a layer's stored tensors."""
        return {p: stored[f"weight_{p}"] for p in self.param_dtypes}

    def to_dict(self) -> dict[str, Any]:
        """``{"format": name, **fields}``: what :func:`hfquant.formats.make_format` takes back."""
        fixed = type(self).names[self.format_name]
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in fixed and (self.grouped or f.name != "group_size")}
        return {"format": self.format_name, **fields}


def tensor_is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


def check_weight(w: torch.Tensor) -> None:
    """A 2-D float weight with only finite values."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weight has {bad} non-finite value(s) (inf/NaN); a corrupted float model cannot be "
                         "quantized faithfully")


def _per_channel(group_size: Any) -> bool:
    """Whether ``group_size`` is the integer -1 (one group per output row); never compares arrays."""
    return isinstance(group_size, numbers.Integral) and not isinstance(group_size, bool) and group_size == -1


def _group_size(value: Any) -> int:
    try:
        return require_int("group_size", value, 1)
    except ValueError as error:
        raise ValueError(f"{error} or -1 (one group per output channel)") from None


def _group_token(group_size: int) -> str:
    return "gc" if group_size == -1 else f"g{group_size}"


def round_up_to(dtype: torch.dtype, values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded up to the next value ``dtype`` holds (so a grid still spans its range), as float32."""
    stored = values.to(dtype)
    too_small = stored.float() < values
    stored = torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)
    return stored.float()


def stored_scale(scale: torch.Tensor, dtype: torch.dtype = SCALE_DTYPE) -> torch.Tensor:
    """A positive scale as stored, in float32: zero scales (all-zero groups) become 1, then clamped and rounded up."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return round_up_to(dtype, scale.clamp(SCALE_MIN, torch.finfo(dtype).max))


@dataclass
class QuantizedWeight:
    """Unpacked codes plus per-group parameters; :meth:`stored` gives what a module stores."""

    codes: torch.Tensor  # (out, in) integer codes
    params: Params  # {param: (out, groups)} in the format's stored dtypes
    fmt: WeightFormat

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors a quantized layer stores, keyed by their parameter names."""
        tensors = {"weight": self.fmt.pack_codes(self.codes)}
        tensors.update({f"weight_{k}": v for k, v in self.params.items()})
        return tensors

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.decode(self.stored(), self.codes.shape[1], dtype)
