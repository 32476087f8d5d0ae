"""``HfQuantConfig``: what the user asks for, validated when it is built.

Fields that only matter while quantizing (the calibration data itself) never reach
``config.json``; what was used is recorded as provenance in ``calibration`` instead. What a saved
checkpoint holds is the *resolved* plan (every quantized layer and its scheme), so a reload never
depends on pattern matching or defaults.

Saved form (``format_version`` 2)::

    {"quant_method": "hfquant", "format_version": 2,
     "format": "int4", "group_size": 128, "sym": false,      # the default scheme's format fields
     "activations": null,                                      # its input mode (hfquant.activations)
     "rules": {...} | null, "method": "gptq", "gptq": {...},  # method options under the method's key
     "modules_to_not_convert": [...], "plan": {"schemes": {...}, "layers": {...}}, ...}

Version 1 (hfquant 0.1: ``bits``/``group_size``/``sym`` and flat method options, no plan) still
loads: its plan is resolved from its saved ``modules_to_not_convert``, its format is integer affine.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from hfquant.activations import get_activation_mode
from hfquant.algorithms import get_method
from hfquant.calibration.observers import DEFAULT_OBSERVER, check_observer
from hfquant.formats import FORMAT_FIELD, parse_spec
from hfquant.formats.affine import BITS
from hfquant.formats.base import FORMAT_NAMES
from hfquant.nn.kernels import KERNEL_MODES
from hfquant.plan import QuantPlan, ResolvedPlan, plan_from_rules
from hfquant.schemes import ACTIVATIONS_FIELD, LayerScheme, scheme_from_value
from hfquant.validation import require_choice, require_float, require_int, require_pattern

QUANT_METHOD = "hfquant"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_FORMAT = "int4"
_CALIBRATION_FIELDS = ("num_samples", "seqlen", "seed", "calibration")


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings for ``from_pretrained(..., quantization_config=HfQuantConfig(...))``.

    Args:
        format: the default weight format, a registered name (``int8``, ``int4``, ``int3``,
            ``int2``, ``ternary``, ``binary``, ``fp8`` = ``fp8-e4m3``, ``fp8-e5m2``, ``nf4``, ``fp4``,
            ``fp16``, ``bf16``; see :func:`hfquant.formats.format_names`); default ``int4``.
        bits: shorthand for ``format=f"int{bits}"`` (2, 3, 4, 8).
        group_size: input columns sharing one scale; -1 = one per output channel; ``None`` = the
            format's default (128 for int4/3/2, per channel for int8 and fp8, 64 for nf4/fp4).
        sym: integer formats: symmetric grid; ``None`` = symmetric at 8 bits, asymmetric below.
        activations: how the default scheme's layers quantize their input (:mod:`hfquant.activations`):
            ``None`` (weight-only), ``"int8-dynamic"`` (per-token int8 at run time) or ``"int8-static"``
            (per-tensor int8 scale calibrated on data, stored as ``input_scale``; needs data like a
            calibrated method, also with ``method="rtn"``), both with symmetric per-channel int8 weights;
            ``"fp8-dynamic"`` (per-token e4m3 at run time, with ``format="fp8"`` weights). Per layer: a
            rule's dict may carry an ``"activations"`` key.
        observer: how ``int8-static`` scales are chosen from the calibration inputs
            (:mod:`hfquant.calibration.observers`): ``"minmax"``, ``"mse"`` (default when a layer is static)
            or ``"percentile"``; only with a static input mode.
        observer_percentile: the percentile (in (0, 100]) of ``|x|`` that ``observer="percentile"``
            clips at; default 99.99; only with that observer.
        rules: ordered ``{pattern: format name | dict of format fields | None}``: per-layer schemes;
            the first matching rule wins, ``None`` keeps the layer in full precision (see
            :mod:`hfquant.plan` for the precedence). A pattern matching no layer is an error.
        method: a registered method: ``"rtn"`` (round-to-nearest while loading, no data) or
            ``"gptq"`` (calibrated).
        embeddings: the format of the token embedding and of the output head (``lm_head``): a spec
            string (``"int8"``, ``"int8-g128"``) or a dict of format fields, weight-only; ``None``
            (default) keeps both in full precision. A tied head stores no tensor of its own: it
            computes with the embedding's quantized table (:mod:`hfquant.nn.qembedding`). Rules and
            ``modules_to_not_convert`` still decide per layer, as for any layer.
        modules_to_not_convert: modules kept in full precision, as dotted-name patterns
            (``"re:<regex>"`` for a full-match regex). ``None`` keeps the output embeddings
            (``lm_head``) and tied weights in full precision (unless ``embeddings`` is given); an
            explicit list replaces that default.
        dataset: calibration text (calibrated methods only; see
            :func:`hfquant.calibration.data.load_text`), or int64 token ids ``(num_samples, seqlen)``;
            ``None`` = the bundled corpus. Never saved.
        tokenizer: tokenizer (or its path) for the calibration text; default: the model's own. Never saved.
        num_samples, seqlen, seed: how calibration batches are drawn (calibrated methods only).
        kernels: which matmul kernels the loaded model may use (:mod:`hfquant.nn.kernels`):
            ``"auto"``, ``"exact"`` or ``"off"``. Never saved; for a reloaded model call
            :func:`hfquant.prepare_for_inference`.
        target_bits: allocate formats per layer automatically: the average stored bits per weight of
            the quantized layers (codes, scales and zero points as stored). Each layer gets one of
            ``candidates``, chosen from its measured sensitivity on calibration data
            (:mod:`hfquant.sensitivity`, :mod:`hfquant.allocation`); needs data, like a calibrated method.
            ``config.json`` then holds the resolved plan: a reload needs no data.
        candidates: the formats ``target_bits`` chooses from (spec strings such as ``"int3-g128"``, or
            dicts of format fields); default :data:`DEFAULT_CANDIDATES`.
        smoothquant: SmoothQuant's migration strength alpha in [0, 1], or ``None`` (off): before the weights
            are quantized, per input channel ``s = max|x|^alpha / max|w|^(1-alpha)`` moves activation outliers
            into the weights, folded into the preceding norm or linear (:mod:`hfquant.algorithms.smoothquant`,
            mappings in :mod:`hfquant.mappings`), so the float model is unchanged. Needs calibration data,
            with any method but ``awq``.
        plan: the resolved per-layer plan; filled in when a model is quantized, read back on reload.
        **options: fields of the default format beyond the above (e.g. ``scale_rule`` of ternary),
            then method-specific options (see the method's options dataclass).
    """

    def __init__(
        self,
        format: str | dict[str, Any] | None = None,  # noqa: A002  (the user-facing name)
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        activations: str | None = None,
        observer: str | None = None,
        observer_percentile: float | None = None,
        rules: dict[str, Any] | None = None,
        embeddings: str | dict[str, Any] | None = None,
        method: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        kernels: str = "auto",
        target_bits: float | None = None,
        candidates: list[Any] | None = None,
        smoothquant: float | None = None,
        plan: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None,
        base_model: str | None = None,
        qat: bool = False,
        qat_learn_scales: bool = False,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **options: Any,
    ) -> None:
        if not isinstance(quant_method, str) or quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r} is not allowed; HfQuantConfig is {QUANT_METHOD!r}")
        if (isinstance(format_version, bool) or not isinstance(format_version, numbers.Integral)
                or format_version not in READABLE_VERSIONS):
            raise ValueError(f"format_version={format_version!r} is not supported by this hfquant; "
                             f"allowed: {READABLE_VERSIONS} (upgrade hfquant to load newer checkpoints)")
        self.quant_method = quant_method
        self.format_version = FORMAT_VERSION  # a version-1 checkpoint has the same tensors; it re-saves as 2
        registered = get_method(method)
        self.method = registered.name
        format_fields, method_options = self._split_options(format, bits, options)
        self.default_scheme = _with_activations(_default_scheme(format, bits, group_size, sym, format_fields),
                                                activations)
        rules = _normalise_rules(rules)
        self.embeddings = _embedding_scheme(embeddings)
        self.quant_plan: QuantPlan = plan_from_rules(self.default_scheme, rules, self.embeddings)
        self.rules = _checked_rules(rules, self.quant_plan)
        self.target_bits = None if target_bits is None else require_float("target_bits", target_bits, 0, 32,
                                                                            low_open=True)
        self.candidates = _candidate_schemes(candidates, self.target_bits is not None)
        if self.target_bits is not None and self.default_scheme.input is not None:
            raise ValueError(f"activations={activations!r} with target_bits: allowed only activations=None (the "
                             "allocation chooses among weight-only candidates)")
        if self.target_bits is not None and any(s is not None for _, s in self.quant_plan.rules):
            raise ValueError(f"rules={rules!r} with target_bits: allowed only rules that keep layers in full "
                             "precision (None); the formats of the others are chosen by the allocation")
        if self.embeddings is not None and self.target_bits is not None:
            raise ValueError(f"embeddings={embeddings!r} with target_bits: allowed only embeddings=None (the "
                             "allocation does not choose the embedding's format yet)")
        for scheme in (self.quant_plan.default, *(s for _, s in self.quant_plan.rules if s is not None),
                       *(self.candidates or ()), *([self.embeddings] if self.embeddings else [])):
            registered.check_format(scheme.weight)
        self.observer, self.observer_percentile = _check_observer(observer, observer_percentile,
                                                                  _calibrates_inputs(self.quant_plan))
        self.smoothquant = _check_smoothquant(smoothquant, self.method, self.target_bits)
        self.plan = None if plan is None else ResolvedPlan.from_dict(plan)
        self.options = registered.parse_options(method_options)
        if modules_to_not_convert is not None:
            if not isinstance(modules_to_not_convert, (list, tuple)):
                raise ValueError(f"modules_to_not_convert={modules_to_not_convert!r} is not allowed; "
                                 "expected None or a list of module names/patterns")
            modules_to_not_convert = [require_pattern("modules_to_not_convert", m) for m in modules_to_not_convert]
        self.modules_to_not_convert = modules_to_not_convert
        self.num_samples = require_int("num_samples", num_samples, 1)
        self.seqlen = require_int("seqlen", seqlen, 2)
        self.seed = require_int("seed", seed, 0)
        if dataset is not None and not self.calibrated:
            raise ValueError(f"dataset={dataset!r} was given but method={method!r} uses no calibration data")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.kernels = require_choice("kernels", kernels, KERNEL_MODES)
        self.calibration = _check_calibration(calibration)  # provenance, filled in when a calibrated method ran
        if base_model is not None and not isinstance(base_model, str):
            raise ValueError(f"base_model={base_model!r} is not allowed; expected None or a model name or path")
        self.base_model = base_model  # provenance, filled in when the model was quantized
        self.qat, self.qat_learn_scales = _check_qat(qat, qat_learn_scales, self)

    def _split_options(self, format: Any, bits: Any, options: dict[str, Any]) -> tuple[dict, dict]:  # noqa: A002
        """Keyword options -> (fields of the default format, method options); a saved method key is unpacked."""
        options = dict(options)
        saved = options.pop(self.method, None)
        if saved is not None:
            if not isinstance(saved, dict):
                raise ValueError(f"{self.method}={saved!r} is not allowed; expected a dict of {self.method} options")
            options = {**saved, **options}
        name = format.get(FORMAT_FIELD) if isinstance(format, dict) else format
        if name is None and bits is None:
            name = DEFAULT_FORMAT
        entry = FORMAT_NAMES.get(name) if isinstance(name, str) else None  # a bad name fails in _default_scheme
        fields = {f.name for f in dataclasses.fields(entry.cls)} if entry else set()
        return ({k: v for k, v in options.items() if k in fields},
                {k: v for k, v in options.items() if k not in fields})

    @property
    def calibrated(self) -> bool:
        """Whether quantizing needs calibration data (a calibrated method, an allocation to ``target_bits``,
        SmoothQuant's statistics, or a calibrated input mode such as ``int8-static``)."""
        return (get_method(self.method).calibrated or self.target_bits is not None or self.smoothquant is not None
                or _calibrates_inputs(self.quant_plan))

    @property
    def weight_format(self):  # noqa: ANN201  (WeightFormat)
        """The default scheme's weight format."""
        return self.default_scheme.weight

    def to_dict(self) -> dict[str, Any]:
        """What lands in ``config.json``: no calibration data; method options under the method's name."""
        out: dict[str, Any] = {"quant_method": self.quant_method, "format_version": self.format_version,
                               **self.default_scheme.weight.to_dict(),
                               "activations": None if self.default_scheme.input is None else self.default_scheme.input.name,
                               "method": self.method,
                               # pairs, not a mapping: config.json is written with sorted keys, and order is precedence
                               "rules": None if self.rules is None else [list(rule) for rule in self.rules.items()]}
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings.weight.to_dict()
        method_options = dataclasses.asdict(self.options)
        if method_options:
            out[self.method] = method_options
        if self.observer is not None:
            out.update(observer=self.observer, observer_percentile=self.observer_percentile)
        if self.target_bits is not None:
            out.update(target_bits=self.target_bits, candidates=[c.weight.to_dict() for c in self.candidates])
        if self.smoothquant is not None:
            out["smoothquant"] = self.smoothquant
        out.update(modules_to_not_convert=self.modules_to_not_convert,
                   plan=None if self.plan is None else self.plan.to_dict(), base_model=self.base_model)
        if self.calibrated:
            out.update({key: getattr(self, key) for key in _CALIBRATION_FIELDS})
        if self.qat:  # a float checkpoint saved during training: reloading it resumes QAT
            out.update(qat=True, qat_learn_scales=self.qat_learn_scales)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _default_scheme(format: Any, bits: Any, group_size: Any, sym: Any,  # noqa: A002
                    fields: dict[str, Any]) -> LayerScheme:
    """The default scheme from ``format`` (name or dict) or the ``bits`` shorthand, plus top-level fields."""
    if bits is not None:
        if format is not None:
            raise ValueError(f"bits={bits!r} and format={format!r} were both given; allowed: one of them "
                             "(bits=N is shorthand for format='intN')")
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):  # 4.0 == 4, but is not an int
            raise ValueError(f"bits={bits!r} is not allowed; expected one of {BITS} (an integer)")
        format = f"int{require_choice('bits', int(bits), BITS)}"
    value = dict(format) if isinstance(format, dict) else {FORMAT_FIELD: DEFAULT_FORMAT if format is None else format}
    for key, given in (("group_size", group_size), ("sym", sym), *fields.items()):
        if given is not None:
            value[key] = given
    return scheme_from_value(value, "format")


DEFAULT_CANDIDATES = ("int2-g64", "int3-g128", "int4-g128", "int8")


def _candidate_schemes(candidates: Any, budgeted: bool) -> tuple[LayerScheme, ...] | None:
    """The candidate schemes of an allocation; ``None`` without ``target_bits``."""
    if candidates is None:
        candidates = DEFAULT_CANDIDATES if budgeted else None
    elif not budgeted:
        raise ValueError(f"candidates={candidates!r} was given without target_bits; allowed: candidates only "
                         "with target_bits (the formats the allocation chooses from)")
    if candidates is None:
        return None
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise ValueError(f"candidates={candidates!r} is not allowed; expected a non-empty list of format specs "
                         "(e.g. 'int3-g128') or dicts of format fields")
    schemes = []
    for index, value in enumerate(candidates):
        field = f"candidates[{index}]"
        if isinstance(value, str):
            try:
                schemes.append(LayerScheme(parse_spec(value)))
            except ValueError as error:
                raise ValueError(f"{field}: {error}") from None
        else:
            schemes.append(scheme_from_value(value, field))
    names = [s.name for s in schemes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"candidates={candidates!r}: {repeated} given more than once; allowed: each format once")
    return tuple(schemes)


def _embedding_scheme(embeddings: Any) -> LayerScheme | None:
    """The weight-only scheme of the token embedding and output head, or ``None`` (full precision)."""
    if embeddings is None:
        return None
    if isinstance(embeddings, str):
        try:
            return LayerScheme(parse_spec(embeddings))
        except ValueError as error:
            raise ValueError(f"embeddings: {error}") from None
    if isinstance(embeddings, dict) and ACTIVATIONS_FIELD in embeddings:
        raise ValueError(f"embeddings={embeddings!r} is not allowed; an embedding lookup has no input to quantize: "
                         f"allowed: a weight-only format (no {ACTIVATIONS_FIELD!r} key)")
    return scheme_from_value(embeddings, "embeddings")


def _with_activations(scheme: LayerScheme, activations: Any) -> LayerScheme:
    """The default scheme with its input mode; errors name ``activations``."""
    mode = get_activation_mode(activations, "activations")
    if mode is None:
        return scheme
    mode.check_weight(scheme.weight, "activations")
    return dataclasses.replace(scheme, input=mode)


def _calibrates_inputs(plan: QuantPlan) -> bool:
    """Whether a scheme of the plan has an input mode calibrated on data (``int8-static``)."""
    schemes = (plan.default, *(s for _, s in plan.rules if s is not None))
    return any(s.input is not None and s.input.calibrated for s in schemes)


def _check_observer(observer: Any, percentile: Any, calibrates_inputs: bool) -> tuple[str | None, float | None]:
    """The observer fields: only with a calibrated input mode (default observer there); errors name them."""
    if not calibrates_inputs:
        for field, value in (("observer", observer), ("observer_percentile", percentile)):
            if value is not None:
                raise ValueError(f"{field}={value!r} is not allowed without a calibrated input mode; allowed: "
                                 "None, or a value with activations='int8-static' (or a rule setting it)")
        return None, None
    return check_observer(DEFAULT_OBSERVER if observer is None else observer, percentile)


def _normalise_rules(rules: Any) -> dict[str, Any] | None:
    """Rules as an ordered dict (a list of ``[pattern, value]`` pairs is accepted too, each pattern once)."""
    if rules is None:
        return None
    if isinstance(rules, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in rules):
        patterns = [require_pattern("rules", pattern) for pattern, _ in rules]
        repeated = sorted({p for p in patterns if patterns.count(p) > 1})
        if repeated:
            raise ValueError(f"rules: pattern(s) {repeated} are given more than once; allowed: each pattern once "
                             "(the first matching rule wins)")
        rules = dict(rules)
    if not isinstance(rules, dict):
        raise ValueError(f"rules={rules!r} is not allowed; expected an ordered mapping "
                         "{pattern: format name | dict of format fields | None}")
    return dict(rules)


def _checked_rules(rules: dict[str, Any] | None, plan: QuantPlan) -> dict[str, Any] | None:
    """The rules as given, each value in its checked Python form (numpy scalars would not serialise)."""
    if rules is None:
        return None
    checked = {}
    for (pattern, value), (_, scheme) in zip(rules.items(), plan.rules):
        if isinstance(value, dict):
            value = {key: str(value[key]) if key == FORMAT_FIELD
                     else (scheme.input and scheme.input.name) if key == ACTIVATIONS_FIELD
                     else getattr(scheme.weight, key) for key in value}
        checked[str(pattern)] = str(value) if isinstance(value, str) else value
    return checked


def _check_qat(qat: Any, learn_scales: Any, config: HfQuantConfig) -> tuple[bool, bool]:
    """``qat`` / ``qat_learn_scales`` checked against each other, the method and the plan's formats."""
    for field, value in (("qat", qat), ("qat_learn_scales", learn_scales)):
        if not isinstance(value, bool):
            raise ValueError(f"{field}={value!r} is not allowed; expected True or False")
    if learn_scales and not qat:
        raise ValueError("qat_learn_scales=True is not allowed with qat=False; allowed: set qat=True too")
    if qat and config.embeddings is not None:
        raise ValueError(f"qat=True is not allowed with embeddings={config.embeddings.name!r}; allowed: "
                         "embeddings=None (fake-quantized embeddings are not implemented yet)")
    schemes = (config.quant_plan.default, *(s for _, s in config.quant_plan.rules if s is not None))
    if qat and any(scheme.input is not None for scheme in schemes):
        raise ValueError("qat=True is not allowed with activation quantization (activations=...); allowed: "
                         "weight-only schemes (fake-quantized activations are not implemented yet)")
    if qat and config.calibrated:
        raise ValueError(f"qat=True is not allowed with method={config.method!r}"
                         f"{' and target_bits' if config.target_bits is not None else ''}"
                         f"{' and smoothquant' if config.smoothquant is not None else ''}; allowed: a data-free "
                         "method (rtn) and no target_bits: QAT trains the weights the grid is chosen from")
    if learn_scales:
        plan = config.quant_plan
        for scheme in (plan.default, *(s for _, s in plan.rules if s is not None)):
            if "scale" not in scheme.weight.param_dtypes:
                raise ValueError(f"qat_learn_scales=True is not allowed for format {scheme.weight.name!r}, "
                                 "which stores no scale; allowed: formats with a per-group scale")
    return qat, learn_scales


def _check_smoothquant(alpha: Any, method: str, target_bits: float | None) -> float | None:
    """SmoothQuant's alpha in [0, 1] or ``None``; refused with the methods and fields it does not compose with."""
    if alpha is None:
        return None
    alpha = require_float("smoothquant", alpha, 0.0, 1.0)
    if get_method(method).transform is not None:
        raise ValueError(f"smoothquant={alpha} is not allowed with method={method!r}, which rescales the same "
                         "channels itself; allowed: smoothquant=None, or a method without a block transform")
    if target_bits is not None:
        raise ValueError(f"smoothquant={alpha} is not allowed with target_bits (the allocation measures the "
                         "unsmoothed layers); allowed: smoothquant=None or target_bits=None")
    return alpha


def _check_calibration(calibration: Any) -> dict[str, Any] | None:
    """Provenance as saved in ``config.json``: ``None`` or a JSON-serialisable dict."""
    if calibration is None:
        return None
    if isinstance(calibration, dict):
        try:
            json.dumps(calibration, allow_nan=False)
            return calibration
        except (TypeError, ValueError):
            pass
    raise ValueError(f"calibration={calibration!r} is not allowed; expected None or a JSON-serialisable dict "
                     "(provenance that hfquant fills in)")
