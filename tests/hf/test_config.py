import json

import pytest

import hfquant
from hfquant import HfQuantConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(bits=5), "bits"),
        (dict(bits="4"), "bits"),
        (dict(bits=True), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-2), "group_size"),
        (dict(group_size=12.5), "group_size"),
        (dict(sym="yes"), "sym"),
        (dict(method="awq-typo"), "method"),
        (dict(method=3), "method"),
        (dict(modules_to_not_convert="lm_head"), "modules_to_not_convert"),
        (dict(modules_to_not_convert=[""]), "modules_to_not_convert"),  # names the offending entry, ''
        (dict(num_samples=0), "num_samples"),
        (dict(seqlen=1), "seqlen"),
        (dict(seed=-1), "seed"),
        (dict(dataset=["some text"]), "dataset"),
        (dict(quant_method="gptq"), "quant_method"),
        (dict(format_version=99), "format_version"),
        (dict(damp_percent=0.1), "damp_percent"),
        (dict(kernels="fast"), "kernels"),
        (dict(kernels=None), "kernels"),
    ],
)
def test_invalid_field_names_field_and_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        HfQuantConfig(**kwargs)
    message = str(info.value)
    assert field in message
    value = next(iter(kwargs.values()))
    if field == "modules_to_not_convert" and isinstance(value, list):  # a bad entry: the message names it
        value = next(v for v in value if not v)
    assert repr(value) in message or field == "damp_percent"


def test_defaults_and_auto_symmetry() -> None:
    assert HfQuantConfig().weight_format.sym is False
    assert HfQuantConfig(bits=8).weight_format.sym is True
    assert HfQuantConfig(bits=4, sym=True).weight_format.sym is True


def test_round_trips_through_json() -> None:
    config = HfQuantConfig(bits=3, group_size=64, modules_to_not_convert=["lm_head", "re:.*down_proj"])
    data = json.loads(config.to_json_string())
    assert data == {"quant_method": "hfquant", "format_version": 2, "format": "int3", "group_size": 64, "sym": False,
                    "activations": None, "rules": None, "method": "rtn", "modules_to_not_convert": ["lm_head", "re:.*down_proj"],
                    "plan": None, "base_model": None}
    again = HfQuantConfig.from_dict(data)
    assert again.to_dict() == config.to_dict()


def test_registered_with_transformers() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hfquant"] is HfQuantConfig
    assert AUTO_QUANTIZER_MAPPING["hfquant"] is hfquant.HfQuantQuantizer
    hfquant.register()  # a second registration (e.g. importlib.reload) is harmless
    assert AUTO_QUANTIZER_MAPPING["hfquant"] is hfquant.HfQuantQuantizer
