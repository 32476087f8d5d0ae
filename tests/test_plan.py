import pytest

from hfquant.plan import is_skipped, name_matches


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
