"""``HfQuantConfig``: what the user asks for, validated when it is built.

Fields that only matter while quantizing (the calibration data itself) never reach
``config.json``; what was used is recorded as provenance in ``calibration`` instead.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from hfquant.algorithms import get_method
from hfquant.formats import SUPPORTED_BITS, WeightFormat
from hfquant.nn.kernels import check_mode

QUANT_METHOD = "hfquant"
FORMAT_VERSION = 1
_LOAD_TIME_ONLY = ("dataset", "tokenizer", "kernels")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= {minimum}")


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings for ``from_pretrained(..., quantization_config=HfQuantConfig(...))``.

    Args:
        bits: code width of the weights, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale; -1 = one scale per output channel.
        sym: symmetric grid; ``None`` picks symmetric at 8 bits and asymmetric below.
        method: ``"rtn"`` (round-to-nearest while loading, no data) or ``"gptq"`` (calibrated).
        modules_to_not_convert: modules kept in full precision, as dotted-name patterns
            (see :func:`hfquant.plan.name_matches`; ``"re:<regex>"`` for a full-match regex).
            ``None`` keeps the output embeddings (``lm_head``) and tied weights in full precision.
        dataset: calibration text (calibrated methods only; see
            :func:`hfquant.calibration.data.load_text`), or int64 token ids ``(num_samples, seqlen)``;
            ``None`` = the bundled corpus. Never saved.
        tokenizer: tokenizer (or its path) for the calibration text; default: the model's own. Never saved.
        num_samples, seqlen, seed: how calibration batches are drawn (calibrated methods only).
        kernels: which matmul kernels the loaded model may use (:mod:`hfquant.nn.kernels`):
            ``"auto"`` the fastest (float32 activations may compute in bfloat16 inside a kernel),
            ``"exact"`` only kernels computing in the activation dtype, ``"off"`` the dequantize +
            matmul reference path only. Never saved; for a reloaded model call
            :func:`hfquant.prepare_for_inference`.
        **options: method-specific options (see the method's options dataclass).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool | None = None,
        method: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        kernels: str = "auto",
        calibration: dict[str, Any] | None = None,
        base_model: str | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **options: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r} is not allowed; HfQuantConfig is {QUANT_METHOD!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"format_version={format_version!r} is not supported by this hfquant; "
                             f"allowed: {FORMAT_VERSION} (upgrade hfquant to load newer checkpoints)")
        if sym is not None and not isinstance(sym, bool):
            raise ValueError(f"sym={sym!r} is not allowed; expected True, False or None (auto)")
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not allowed; expected one of {SUPPORTED_BITS}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
            raise ValueError(f"group_size={group_size!r} is not allowed; expected -1 (per channel) or an integer >= 1")
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, (list, tuple))
            or not all(isinstance(m, str) and m for m in modules_to_not_convert)
        ):
            raise ValueError(f"modules_to_not_convert={modules_to_not_convert!r} is not allowed; "
                             "expected None or a list of non-empty module names/patterns")
        check_mode(kernels)
        if not isinstance(method, str):
            raise ValueError(f"method={method!r} is not allowed; expected a method name string")
        self.quant_method = quant_method
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.sym = bits == 8 if sym is None else sym
        self.method = method
        self.options = get_method(method).parse_options(options)
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        _require_int("num_samples", num_samples, 1)
        _require_int("seqlen", seqlen, 2)
        _require_int("seed", seed, 0)
        self.num_samples = num_samples
        self.seqlen = seqlen
        self.seed = seed
        if dataset is not None and not self.calibrated:
            raise ValueError(f"dataset={dataset!r} was given but method={method!r} uses no calibration data")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.kernels = kernels
        self.calibration = calibration  # provenance, filled in when a calibrated method ran
        self.base_model = base_model  # provenance, filled in when the model was quantized

    @property
    def calibrated(self) -> bool:
        return get_method(self.method).calibrated

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(bits=self.bits, group_size=self.group_size, sym=self.sym)

    def to_dict(self) -> dict[str, Any]:
        """What lands in ``config.json``: no calibration data, options flattened."""
        out = {k: v for k, v in self.__dict__.items() if k not in _LOAD_TIME_ONLY and k != "options"}
        out.update(vars(self.options))
        if not self.calibrated:
            for key in ("num_samples", "seqlen", "seed", "calibration"):
                out.pop(key)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
