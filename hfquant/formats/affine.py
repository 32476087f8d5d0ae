"""Integer affine grids (``int8``, ``int4``, ``int3``, ``int2``): ``w ≈ (q - zero) · scale``.

The format of hfquant's first checkpoints, byte for byte: codes ``0 .. 2**bits - 1``, one float16
``scale`` and (asymmetric only) one uint8 ``zero`` per (row, group); the GPTQ reference's grid
conventions, so checkpoints map onto its kernels:

* symmetric: ``scale = 2 · max|w| / (2**bits - 1)``, ``zero = 2**(bits - 1)`` (not stored);
* asymmetric: ``[min(w, 0), max(w, 0)]`` split into ``2**bits - 1`` steps, integer ``zero`` stored.

Every weight is within ``scale / 2`` of its dequantized value when symmetric; asymmetric grids can
be off by up to ``scale`` at the ends of a group's range (the rounded zero point shifts the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfquant.formats.base import SCALE_DTYPE, Params, WeightFormat, stored_scale
from hfquant.validation import require_bool, require_choice, require_int

ZERO_DTYPE = torch.uint8
BITS = (2, 3, 4, 8)


@dataclass(frozen=True, kw_only=True)
class IntAffine(WeightFormat):
    """An integer grid of ``bits`` bits; ``sym=None`` means symmetric at 8 bits, asymmetric below."""

    bits: int = 4
    sym: bool | None = None

    names = {f"int{b}": {"bits": b} for b in BITS}
    defaults = {"int8": {"group_size": -1}}
    spec_tokens = {"sym": {"sym": True}, "asym": {"sym": False}}

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", require_choice("bits", require_int("bits", self.bits, 0), BITS))
        if self.sym is None:
            object.__setattr__(self, "sym", self.bits == 8)
        require_bool("sym", self.sym)
        super().__post_init__()

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def maxq(self) -> int:
        """Largest code."""
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of the symmetric grid."""
        return 2 ** (self.bits - 1)

    @property
    def param_dtypes(self) -> dict[str, torch.dtype]:
        return {"scale": SCALE_DTYPE} if self.sym else {"scale": SCALE_DTYPE, "zero": ZERO_DTYPE}

    def choose_params(self, w: torch.Tensor, clip: float = 1.0) -> Params:
        w = w.float()
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        if clip != 1.0:
            lo, hi = clip * lo, clip * hi
        if self.sym:
            scale = stored_scale(2 * torch.maximum(-lo, hi) / self.maxq)
            return {"scale": scale}
        scale = stored_scale((hi - lo) / self.maxq)
        return {"scale": scale, "zero": torch.round(-lo / scale).clamp(0, self.maxq)}

    def _zero(self, params: Params) -> torch.Tensor | int:
        return params["zero"] if "zero" in params else self.sym_zero

    def round(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.clamp(torch.round(w.float() / params["scale"]) + self._zero(params), 0, self.maxq).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        weight = codes.to(dtype)
        zero = self._zero(params)
        weight.sub_(zero if isinstance(zero, int) else zero.to(dtype))
        return weight.mul_(params["scale"].to(dtype))

    def affine(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` such that ``w = (q - zero) · scale``: the view the integer kernels take."""
        scale = params["scale"]
        zero = params["zero"].float() if "zero" in params else torch.full(scale.shape, float(self.sym_zero),
                                                                          device=scale.device)
        return scale.float(), zero

    def check_params(self, params: Params) -> str | None:
        zero = params.get("zero")
        if zero is not None and zero.numel() and int(zero.max()) > self.maxq:
            return f"weight_zero has values above the largest code {self.maxq}"
        return super().check_params(params)

    def _name_tokens(self) -> list[str]:
        return [*super()._name_tokens(), "sym" if self.sym else "asym"]

    def describe(self) -> str:
        zero = "symmetric grid, no zero points" if self.sym else "uint8 zero points"
        return f"`{self.name}`: {self.bits}-bit integer codes with float16 scales ({zero})"
