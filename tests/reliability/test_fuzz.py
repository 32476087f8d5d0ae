"""Property-based fuzz of every ``HfQuantConfig`` field and method option (hypothesis, derandomized).

The property: any input either raises ``ValueError`` naming the offending field, or builds a config
that survives ``config.json`` unchanged, and (for every data-free method: ``rtn``, ``hqq``) quantizes a tiny
Llama that saves and reloads with plain ``from_pretrained`` to exactly the same logits. Any other exception
(``TypeError``, ``KeyError``, ``re.error``, numpy's ambiguous truth value, ...) is a bug.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hfquant
from hfquant import HfQuantConfig
from hfquant.algorithms import get_method, method_names
from hfquant.formats import format_names

IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 8, 1]])
CONFIG_ONLY = settings(max_examples=1000, deadline=None, derandomize=True, database=None)
QUANTIZE = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# --- values: adversarial pools mixed into every field -----------------------------------------------

NUMPY = st.one_of(st.integers(-2**40, 2**40).map(np.int64), st.integers(-300, 300).map(np.int32),
                  st.floats(width=32).map(np.float32), st.booleans().map(np.bool_),
                  st.sampled_from(["int4", "rtn", "auto", "lm_head"]).map(np.str_), st.just(np.array([1, 2])),
                  st.just(np.array(4)))
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([2**31, 2**63, -2**31 - 1]),
                 st.floats(), st.text(max_size=6), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.tuples(st.integers()), NUMPY,
                 st.just(torch.tensor([1, 2])))
INTS = st.one_of(st.integers(-4, 300), st.integers(-2**70, 2**70), st.integers(-4, 300).map(np.int64))


def mixed(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``valid`` values, often adversarial ones."""
    return st.one_of(valid, valid, JUNK)


NAMES = st.one_of(st.sampled_from(format_names()), st.sampled_from(["int5", "INT4", "fp32", "int4-g128", " int4"]))
GROUP_SIZE = mixed(st.one_of(st.sampled_from([-1, 16, 32, 64, 128, None]), INTS))
SYM = mixed(st.sampled_from([True, False, None]))
SCALE_RULE = mixed(st.sampled_from(["absmean", "absmax", "median"]))
ACTIVATIONS = mixed(st.sampled_from([None, "int8-dynamic", "int8-static", "fp8-dynamic", "INT8-DYNAMIC"]))
FORMAT_DICT = st.fixed_dictionaries({"format": mixed(NAMES)}, optional={
    "group_size": GROUP_SIZE, "sym": SYM, "scale_rule": SCALE_RULE, "bits": mixed(st.sampled_from([2, 3, 4, 8])),
    "activations": ACTIVATIONS})
FORMAT = mixed(st.one_of(NAMES, FORMAT_DICT))

LLAMA_PATTERNS = ["mlp.down_proj", "embed_tokens", "self_attn.q_proj", "lm_head", "model.layers.0", "re:.*\\.1\\..*",
                  "re:model\\.layers\\.\\d+\\.mlp\\.(up|gate)_proj"]
BAD_PATTERNS = ["re:(", "re:[", "re:*", "", "re:", "no_such_layer", "proj"]
PATTERN = st.one_of(st.sampled_from(LLAMA_PATTERNS), st.sampled_from(LLAMA_PATTERNS),
                    st.sampled_from(BAD_PATTERNS), st.text(max_size=5).map(lambda t: "re:" + t), JUNK)
HASHABLE_PATTERN = PATTERN.filter(lambda p: not isinstance(p, (list, dict, np.ndarray)))
RULE_VALUE = st.one_of(st.none(), NAMES, FORMAT_DICT, JUNK)
RULES = mixed(st.one_of(st.none(), st.dictionaries(HASHABLE_PATTERN, RULE_VALUE, max_size=3),
                        st.lists(st.tuples(PATTERN, RULE_VALUE).map(list), max_size=3),
                        st.lists(st.lists(PATTERN, max_size=3), max_size=2)))
MODULES = mixed(st.one_of(st.none(), st.lists(PATTERN, max_size=3), st.tuples(PATTERN)))
EMBEDDINGS = mixed(st.one_of(st.none(), NAMES, FORMAT_DICT, st.sampled_from(["int8-g128", "int8-gc", "int4-g64-sym",
                                                                              "int8-g0", "int8-x"])))

SCHEME = {"int4-g32-asym": {"weight": {"format": "int4", "group_size": 32, "sym": False}}}
PLAN = {"schemes": SCHEME, "layers": {"model.layers.0.mlp.up_proj": "int4-g32-asym"}}
PLANS = mixed(st.one_of(
    st.none(), st.just(PLAN),
    st.fixed_dictionaries({"schemes": mixed(st.just(SCHEME)), "layers": mixed(st.dictionaries(
        HASHABLE_PATTERN, mixed(st.sampled_from(["int4-g32-asym", "int8-gc-sym"])), max_size=2))}),
    st.fixed_dictionaries({"schemes": st.dictionaries(st.sampled_from(["int4-g32-asym", "int4-g64-asym"]),
                                                      mixed(st.fixed_dictionaries({"weight": FORMAT_DICT}, optional={"input": ACTIVATIONS})),
                                                      max_size=2), "layers": st.just({})})))

HQQ_FIELDS: dict[str, st.SearchStrategy] = {
    "iterations": mixed(st.one_of(st.sampled_from([0, 1, 5]), INTS)),
    "lp_norm": mixed(st.one_of(st.floats(), st.sampled_from([0.7, 1.0, 0, 1.5]))),
    "beta": mixed(st.one_of(st.floats(), st.sampled_from([10.0, 0.0, 1e13]))),
    "kappa": mixed(st.one_of(st.floats(), st.sampled_from([1.01, 0.5, 1.0]))),
}
GPTQ_FIELDS: dict[str, st.SearchStrategy] = {
    "damp_percent": mixed(st.one_of(st.floats(), st.sampled_from([0.01, 0.1, 1, 0, 1.5]),
                                    st.floats(0, 1).map(np.float64))),
    "block_size": mixed(INTS),
    "act_order": mixed(st.booleans()),
    "static_groups": mixed(st.sampled_from([True, False, None])),
    "mse_clip": mixed(st.booleans()),
}
AWQ_FIELDS: dict[str, st.SearchStrategy] = {
    "grid": mixed(st.one_of(st.sampled_from([1, 20, 0]), INTS)),
    "clip": mixed(st.booleans()),
    "clip_grid": mixed(st.one_of(st.sampled_from([1, 20, 0]), INTS)),
    "max_shrink": mixed(st.one_of(st.floats(), st.sampled_from([0.0, 0.5, 1.0, -0.1]))),
    "solver": mixed(st.sampled_from(["rtn", "gptq", "hqq", "GPTQ"])),
}
FIELDS: dict[str, st.SearchStrategy] = {
    "format": FORMAT,
    "bits": mixed(st.one_of(st.sampled_from([2, 3, 4, 8]), INTS)),
    "group_size": GROUP_SIZE,
    "sym": SYM,
    "rules": RULES,
    "embeddings": EMBEDDINGS,
    "method": mixed(st.sampled_from(["rtn", "gptq", "hqq", "awq", "RTN"])),
    "modules_to_not_convert": MODULES,
    "dataset": mixed(st.one_of(st.none(), st.just(["some text"]))),
    "tokenizer": mixed(st.none()),
    "num_samples": mixed(INTS),
    "seqlen": mixed(INTS),
    "seed": mixed(INTS),
    "kernels": mixed(st.sampled_from(["auto", "exact", "off", "fast"])),
    "activations": ACTIVATIONS,
    "observer": mixed(st.sampled_from([None, "minmax", "percentile", "mse", "max"])),
    "observer_percentile": mixed(st.one_of(st.none(), st.floats(), st.sampled_from([99.99, 100, 0, 50]))),
    "plan": PLANS,
    "target_bits": mixed(st.one_of(st.floats(), st.sampled_from([2.5, 3.25, 4, 0, 33]))),
    "candidates": mixed(st.one_of(st.none(), st.lists(st.one_of(FORMAT, st.sampled_from(["int3-g128", "int2-g64"])),
                                                      max_size=4))),
    "calibration": mixed(st.one_of(st.none(), st.just({"dataset": "brown", "num_samples": 4}),
                                   st.dictionaries(st.text(max_size=3), NUMPY, min_size=1, max_size=1))),
    "base_model": mixed(st.one_of(st.none(), st.text(max_size=8))),
    "qat": mixed(st.booleans()),
    "qat_learn_scales": mixed(st.booleans()),
    "format_version": mixed(st.sampled_from([1, 2, 3, 2.0])),
    "quant_method": mixed(st.sampled_from(["hfquant", "gptq"])),
    "scale_rule": SCALE_RULE,  # a format field beyond the named ones (ternary)
    "gptq": mixed(st.fixed_dictionaries({}, optional=GPTQ_FIELDS)),  # method options as saved
    "hqq": mixed(st.fixed_dictionaries({}, optional=HQQ_FIELDS)),
    "awq": mixed(st.fixed_dictionaries({}, optional=AWQ_FIELDS)),
    "smoothquant": mixed(st.one_of(st.none(), st.floats(), st.sampled_from([0.5, 0, 1, 1.5, -0.1]))),
    "not_an_option": JUNK,
    **GPTQ_FIELDS,
    **HQQ_FIELDS,
    **AWQ_FIELDS,
}
METHOD_FIELDS = {"awq": AWQ_FIELDS, "gptq": GPTQ_FIELDS, "hqq": HQQ_FIELDS, "rtn": {}}  # every registered method's options
# what a field needs beside it to be meaningful: method options need their method, format fields their format
CONTEXT = {**{name: {"method": method} for method, fields in METHOD_FIELDS.items() for name in (*fields, method)},
           "scale_rule": {"format": "ternary"}, "candidates": {"target_bits": 4},
           "activations": {"format": "int8", "group_size": -1},
           "observer": {"format": "int8", "group_size": -1, "activations": "int8-static"},
           "observer_percentile": {"format": "int8", "group_size": -1, "activations": "int8-static",
                                   "observer": "percentile"}}


# --- the property ---------------------------------------------------------------------------------

def names_field(message: str, fields: list[str]) -> bool:
    """Whether the message names one of ``fields`` as a whole word (``format`` is not ``format_version``)."""
    return any(re.search(rf"(?<!\w){re.escape(f)}(?!\w)", message) for f in fields)


def field_names(kwargs: dict[str, Any]) -> list[str]:
    """What an error about ``kwargs`` may name: a field, or an option inside a saved method-options dict."""
    inner = [kwargs[m] for m in METHOD_FIELDS if isinstance(kwargs.get(m), dict)]
    options = [key for saved in inner for key in saved if isinstance(key, str) and key]
    return [*kwargs, *options]


def build_or_reject(kwargs: dict[str, Any], fields: list[str]) -> HfQuantConfig | None:
    """The config, or None after checking that the ValueError names one of ``fields``."""
    try:
        return HfQuantConfig(**kwargs)
    except ValueError as error:
        assert names_field(str(error), fields), f"{kwargs!r} -> {error}"
        return None


def assert_round_trips(config: HfQuantConfig) -> None:
    """``config.json`` (JSON, sorted keys, as saved) gives back an equal config."""
    saved = config.to_dict()
    again = HfQuantConfig.from_dict(json.loads(config.to_json_string()))
    assert again.to_dict() == saved
    assert json.loads(again.to_json_string()) == json.loads(config.to_json_string())


def test_strategies_cover_every_field_and_option() -> None:
    """A new config field, method or method option without a strategy here fails this test."""
    parameters = set(inspect.signature(HfQuantConfig.__init__).parameters) - {"self", "options"}
    assert parameters <= set(FIELDS), sorted(parameters - set(FIELDS))
    assert set(method_names()) == set(METHOD_FIELDS)
    for method, fields in METHOD_FIELDS.items():
        assert {f.name for f in dataclasses.fields(get_method(method).options)} == set(fields), method


@CONFIG_ONLY
@given(st.data())
def test_one_field_is_accepted_or_named(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(sorted(FIELDS)), label="field")
    value = data.draw(FIELDS[field], label="value")
    config = build_or_reject({**CONTEXT.get(field, {}), field: value}, field_names({field: value}))
    if config is not None:
        assert_round_trips(config)


@CONFIG_ONLY
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_any_fields_are_accepted_or_one_is_named(kwargs: dict[str, Any]) -> None:
    config = build_or_reject(kwargs, field_names(kwargs))
    if config is not None:
        assert_round_trips(config)


def _valid_format(name: str) -> st.SearchStrategy:
    """A format dict of ``name`` with fields it may take (some of them refused for formats without groups)."""
    optional = {"group_size": st.sampled_from([-1, 16, 32, np.int64(16)])}
    if name.startswith("int"):
        optional["sym"] = st.sampled_from([True, False, None])
    if name == "ternary":
        optional["scale_rule"] = st.sampled_from(["absmean", "absmax"])
    return st.fixed_dictionaries({"format": st.just(name)}, optional=optional)


VALID_FORMAT = st.sampled_from(format_names()).flatmap(_valid_format)
QUANTIZE_FORMAT = {  # always given, so that every format gets quantized by every data-free method
    "format": st.one_of(st.sampled_from(format_names()), VALID_FORMAT, st.sampled_from(format_names()).map(np.str_)),
    "method": st.sampled_from([name for name in sorted(METHOD_FIELDS) if not get_method(name).calibrated]),
    "num_samples": st.just(2),  # int8-static calibrates even with a data-free method: keep it small
    "seqlen": st.just(16),
}
QUANTIZE_FIELDS = {
    "group_size": st.one_of(st.sampled_from([-1, 16, 32, None]), st.sampled_from([16, 32]).map(np.int64),
                            st.sampled_from([-1, 16, 32, None]), JUNK),
    "rules": st.one_of(st.dictionaries(st.sampled_from(LLAMA_PATTERNS), st.one_of(
                           st.none(), st.sampled_from(format_names()), VALID_FORMAT), max_size=3),
                       st.just({"no_such_layer": "int8"}),
                       st.just([["mlp.down_proj", {"format": "int8", "group_size": np.int64(32)}]])),
    "modules_to_not_convert": st.one_of(st.none(), st.lists(st.sampled_from(LLAMA_PATTERNS + ["no_such_layer"]),
                                                            max_size=2)),
    "kernels": st.sampled_from(["auto", "exact", "off"]),
    "embeddings": st.one_of(st.none(), st.sampled_from(["int8", "int8-g128", "int4-g32"]), VALID_FORMAT),
    "activations": st.sampled_from([None, "int8-dynamic", "int8-dynamic", "int8-static"]),
    "iterations": st.sampled_from([0, 3]),  # hqq's (an error naming it for rtn)
    "seed": st.one_of(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), JUNK),
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@QUANTIZE
@given(st.fixed_dictionaries(QUANTIZE_FORMAT, optional=QUANTIZE_FIELDS))
def test_data_free_config_quantizes_saves_and_reloads_exactly(tiny_checkpoints: dict[str, Path],
                                                               kwargs: dict[str, Any]) -> None:
    config = build_or_reject(kwargs, list(kwargs))
    if config is None:
        return
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=config)
    except ValueError as error:  # rule patterns are checked against the model's layers when it loads
        assert names_field(str(error), list(kwargs)), f"{kwargs!r} -> {error}"
        return
    logits = _logits(model)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = AutoModelForCausalLM.from_pretrained(folder)
    hfquant.prepare_for_inference(again, kernels=config.kernels)  # kernels are never saved
    assert again.config.quantization_config.plan == model.config.quantization_config.plan
    assert torch.equal(_logits(again), logits)


# --- what the fuzz found, kept as examples ----------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(format=[]), "format"),  # was TypeError (unhashable) while splitting options
    (dict(format={"format": {"a": 1}}), "format"),  # same
    (dict(format=0), "format"),  # was silently int4 (a falsy format meant the default)
    (dict(format=""), "format"),  # same
    (dict(kernels=np.array([1, 2])), "kernels"),  # was numpy's "truth value ... is ambiguous", naming nothing
    (dict(quant_method=np.array([1, 2])), "quant_method"),  # same
    (dict(group_size=np.array([1, 2])), "group_size"),  # same, in WeightFormat.__post_init__
    (dict(format_version=np.array([1, 2])), "format_version"),  # same
    (dict(format_version=2.0), "format_version"),  # was accepted: a float is no version
    (dict(rules=[[["mlp"], "int8"]]), "rules"),  # was TypeError (unhashable pattern) building the dict
    (dict(rules=[["mlp.down_proj", "int8"], ["mlp.down_proj", "int2"]]), "rules"),  # was silently the last value
    (dict(plan={"schemes": [], "layers": {}}), "plan"),  # was AttributeError
    (dict(plan={"schemes": {}, "layers": []}), "plan"),  # was AttributeError
    (dict(plan={"schemes": {}, "layers": {"a": ["x"]}}), "plan"),  # was TypeError (unhashable)
    (dict(plan={"schemes": {**SCHEME}, "layers": {5: "int4-g32-asym"}}), "plan"),  # was accepted, broke JSON
    (dict(plan={"schemes": {"x": 1}, "layers": {}}), "plan"),  # was a ValueError not naming plan
    (dict(method="gptq", calibration=5), "calibration"),  # was accepted, broke the model card
    (dict(method="gptq", calibration={"seed": np.int64(0)}), "calibration"),  # was TypeError in to_json_string
    (dict(base_model=np.float32(1)), "base_model"),  # was TypeError in to_json_string
])
def test_found_by_fuzz_is_a_value_error_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        HfQuantConfig(**kwargs)
    assert names_field(str(info.value), [field]), str(info.value)


def test_numpy_values_in_rules_are_saved_as_python_values() -> None:
    """Was a TypeError in ``to_json_string`` (so in ``save_pretrained``): numpy scalars kept in the rules."""
    config = HfQuantConfig(rules={np.str_("mlp.down_proj"): {"format": np.str_("int8"), "group_size": np.int64(32)},
                                  "lm_head": np.str_("nf4")})
    assert config.rules == {"mlp.down_proj": {"format": "int8", "group_size": 32}, "lm_head": "nf4"}
    assert [type(v) for v in config.rules["mlp.down_proj"].values()] == [str, int]
    assert_round_trips(config)
