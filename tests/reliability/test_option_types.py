"""Method options are type-checked against their dataclass's annotations, naming the option, before use."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

from hfquant import HfQuantConfig
from hfquant.algorithms import Method
from hfquant.algorithms.gptq import GPTQOptions
from hfquant.algorithms.rtn import round_to_nearest


@pytest.mark.parametrize(("option", "value"), [
    ("mse_clip", "no"), ("act_order", "no"), ("act_order", 1), ("mse_clip", None), ("static_groups", "yes"),
    ("static_groups", 0), ("damp_percent", True), ("damp_percent", "0.01"), ("damp_percent", math.nan),
    ("damp_percent", math.inf), ("damp_percent", None), ("damp_percent", 0), ("damp_percent", 1.5),
    ("block_size", True), ("block_size", 2.0), ("block_size", "128"), ("block_size", 0), ("block_size", 2**20 + 1),
    ("block_size", None),
])
def test_bad_gptq_option_is_a_value_error_naming_it(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{option}=") as info:
        HfQuantConfig(method="gptq", **{option: value})
    message = str(info.value)
    assert repr(value) in message or (type(value) is int and repr(float(value)) in message), message


def test_good_gptq_options_are_kept_and_normalised() -> None:
    options = HfQuantConfig(method="gptq", damp_percent=1, block_size=np.int64(2**20), act_order=True,
                            static_groups=None, mse_clip=False).options
    assert options == GPTQOptions(damp_percent=1.0, block_size=2**20, act_order=True, static_groups=None)
    assert type(options.damp_percent) is float and type(options.block_size) is int
    config = HfQuantConfig(method="gptq", damp_percent=np.float32(0.5), static_groups=True)
    assert type(config.options.damp_percent) is float
    again = HfQuantConfig.from_dict(json.loads(config.to_json_string()))  # what a reload reads from config.json
    assert again.options == config.options


def test_gptq_options_dataclass_checks_itself() -> None:
    with pytest.raises(ValueError, match="damp_percent='0.01'"):
        GPTQOptions(damp_percent="0.01")
    with pytest.raises(ValueError, match="block_size=True"):
        GPTQOptions(block_size=True)
    with pytest.raises(ValueError, match="act_order='no'"):
        GPTQOptions(act_order="no")


@dataclass(frozen=True)
class _Options:
    strength: float = 0.5
    steps: int | None = None
    mode: Literal["fast", "exact"] = "fast"
    verbose: bool = False


def test_parse_options_follows_any_methods_annotations() -> None:
    method = Method(name="custom", calibrated=False, options=_Options, quantize=round_to_nearest)
    assert method.parse_options({"strength": 2, "steps": None, "mode": "exact"}) == _Options(2.0, None, "exact")
    for option, value in [("strength", True), ("strength", "1"), ("steps", 1.0), ("steps", False), ("mode", "slow"),
                          ("verbose", "yes"), ("mode", None), ("strength", None)]:
        with pytest.raises(ValueError, match=rf"^{option}="):
            method.parse_options({option: value})


def test_unsupported_option_annotation_is_refused_at_registration() -> None:
    @dataclass(frozen=True)
    class Weird:
        table: dict = None

    with pytest.raises(TypeError, match="table"):
        Method(name="weird", calibrated=False, options=Weird, quantize=round_to_nearest)
