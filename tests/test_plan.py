import pytest

from hfquant.formats import make_format
from hfquant.plan import QuantPlan, ResolvedPlan, is_skipped, name_matches, plan_from_rules, unmatched
from hfquant.schemes import LayerScheme


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("lm_head", "lm_head", True),
        ("model.layers.3.mlp.down_proj", "down_proj", True),
        ("model.layers.3.mlp.down_proj", "mlp.down_proj", True),
        ("model.layers.3.mlp.down_proj", "model.layers.3", True),
        ("model.layers.31.mlp.down_proj", "model.layers.3", False),
        ("model.layers.3.self_attn.q_proj", "proj", False),
        ("model.layers.3.self_attn.q_proj", "re:.*\\.q_proj", True),
        ("model.layers.3.self_attn.q_proj", "re:q_proj", False),
    ],
)
def test_name_matches(name: str, pattern: str, expected: bool) -> None:
    assert name_matches(name, pattern) is expected


def test_is_skipped_any() -> None:
    assert is_skipped("a.b.c", ["x", "b"])
    assert not is_skipped("a.b.c", [])


LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
          "model.layers.1.mlp.down_proj", "lm_head"]
INT4 = LayerScheme(make_format("int4", group_size=32))
INT8 = LayerScheme(make_format("int8"))


def test_resolve_precedence_skip_then_first_rule_then_default() -> None:
    plan = plan_from_rules(INT4, {"mlp.down_proj": "int8", "re:.*\\.1\\..*": None,
                                  "model.layers.1.mlp.down_proj": {"format": "int2", "group_size": 16},
                                  "lm_head": "int8"})
    resolved = plan.resolve(LAYERS, skip=["lm_head"])
    assert resolved.layers == {"model.layers.0.self_attn.q_proj": INT4,  # default
                               "model.layers.0.mlp.down_proj": INT8,  # first matching rule
                               "model.layers.1.mlp.down_proj": INT8}  # first rule wins over later ones
    assert list(resolved.layers) == [n for n in LAYERS if n in resolved.layers]  # model order
    assert resolved.counts() == {"int4-g32-asym": 1, "int8-gc-sym": 2}


def test_rule_matching_no_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\['mlp.down_prj'\] match no linear layer"):
        plan_from_rules(INT4, {"mlp.down_prj": "int8"}).resolve(LAYERS)
    assert unmatched(["mlp.down_prj", "lm_head"], LAYERS) == ["mlp.down_prj"]


def test_resolved_plan_round_trips_through_its_dict() -> None:
    resolved = QuantPlan(INT4, (("down_proj", INT8),)).resolve(LAYERS, skip=["lm_head"])
    data = resolved.to_dict()
    assert data == {"schemes": {"int4-g32-asym": {"weight": {"format": "int4", "group_size": 32, "sym": False}},
                                "int8-gc-sym": {"weight": {"format": "int8", "group_size": -1, "sym": True}}},
                    "layers": {"model.layers.0.self_attn.q_proj": "int4-g32-asym",
                               "model.layers.0.mlp.down_proj": "int8-gc-sym",
                               "model.layers.1.self_attn.q_proj": "int4-g32-asym",
                               "model.layers.1.mlp.down_proj": "int8-gc-sym"}}
    assert ResolvedPlan.from_dict(data) == resolved
    data["schemes"]["int8-gc-sym"]["weight"]["group_size"] = 128  # the key no longer names its scheme
    with pytest.raises(ValueError, match="inconsistent"):
        ResolvedPlan.from_dict(data)
