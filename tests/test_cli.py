"""The hfquant CLI and the jobs behind it, on tiny models with a character-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.cli import main
from hfquant.nn.qlinear import QuantLinear
from hfquant.workflows import EvalSettings, parse_spec

TEXT = "\n\n".join(f"Paragraph {i}. The committee met on Tuesday and voted to adjourn." for i in range(40))


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("int8", dict(format=dict(format="int8", group_size=-1, sym=True))),
        ("int4-g128", dict(format=dict(format="int4", group_size=128, sym=False))),
        ("int3-gc-sym", dict(format=dict(format="int3", group_size=-1, sym=True))),
        ("gptq:int2-g64-asym", dict(format=dict(format="int2", group_size=64, sym=False), method="gptq")),
    ],
)
def test_parse_spec(spec: str, expected: dict) -> None:
    assert parse_spec(spec) == expected
    config = hfquant.HfQuantConfig(**parse_spec(spec))  # the kwargs build the config they describe
    assert config.weight_format.to_dict() == expected["format"] and config.method == expected.get("method", "rtn")


def test_parse_spec_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="'int4g128'"):
        parse_spec("int4g128")


def test_eval_settings_validation() -> None:
    with pytest.raises(ValueError, match="protocols"):
        EvalSettings(protocols=("wikitext",))
    with pytest.raises(ValueError, match="max_tokens=10"):
        EvalSettings(max_tokens=10, seqlen=64)


def test_quantize_writes_checkpoint_and_card(tiny_checkpoints: dict, tmp_path: Path) -> None:
    out = tmp_path / "q"
    main(["quantize", str(tiny_checkpoints["llama"]), str(out), "--bits", "4", "--group-size", "32"])
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md", "tokenizer.json"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(tiny_checkpoints["llama"])
    assert card.data.base_model_relation == "quantized"
    assert "hfquant" in card.data.tags and "int4" in card.data.tags
    assert "import hfquant" in card.text and "bits per weight" in card.text


def test_save_pretrained_writes_a_card(tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gpt2"],
                                                 quantization_config=hfquant.HfQuantConfig(bits=8))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.tags[:2] == ["hfquant", "int8"]


def test_eval_and_compare(tiny_checkpoints: dict, text_file: Path, tmp_path: Path, capsys) -> None:
    common = ["--dataset", str(text_file), "--seqlen", "64", "--stride", "32", "--max-tokens", "512"]
    main(["eval", str(tiny_checkpoints["opt"]), "--out", str(tmp_path / "r.json"), *common])
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["perplexity"]) == {"gptq", "strided"}
    assert report["perplexity"]["gptq"]["num_tokens"] == 8 * 63

    main(["compare", str(tiny_checkpoints["opt"]), "--configs", "int8", "int2-g32", "--out", str(tmp_path / "cmp"),
          *common])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "int8" in table and "int2-g32" in table and "ΔPPL (gptq)" in table
    assert (tmp_path / "cmp" / "ppl_vs_size.png").stat().st_size > 1000
    int8 = json.loads((tmp_path / "cmp" / "int8.json").read_text())
    int2 = json.loads((tmp_path / "cmp" / "int2-g32.json").read_text())
    assert int8["drift"]["mean_kl"] < int2["drift"]["mean_kl"]
    assert int8["bits_per_weight"] > int2["bits_per_weight"]
    assert "int2-g32" in capsys.readouterr().out


def test_bad_config_is_a_clean_error(tiny_checkpoints: dict, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--bits", "5"])
    assert info.value.code == 2
    assert "bits=5" in capsys.readouterr().err


def test_push_refuses_non_hfquant_folder(tiny_checkpoints: dict) -> None:
    with pytest.raises(SystemExit, match="not an hfquant checkpoint"):
        main(["push", str(tiny_checkpoints["llama"]), "someone/model"])


def test_push_reports_network_failure(tiny_checkpoints: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--bits", "8"])
    with pytest.raises(SystemExit, match="upload to 'someone/model' failed"):
        main(["push", str(tmp_path / "q"), "someone/model", "--token", "hf_fake"])


CLI_RULES = {"re:.*\\.mlp\\.down_proj": "int8", "re:model\\.layers\\.0\\..*": {"format": "ternary", "group_size": 32},
             "lm_head": None}


def test_quantize_takes_a_format_and_a_rules_file(tiny_checkpoints: dict, tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(CLI_RULES))
    main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--format", "nf4", "--group-size", "32",
          "--rules", str(rules)])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    formats = {name: module.fmt.name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    assert formats["model.layers.0.mlp.down_proj"] == "int8-gc-sym"  # first match wins
    assert formats["model.layers.0.self_attn.q_proj"] == "ternary-g32-absmean"
    assert formats["model.layers.1.self_attn.q_proj"] == "nf4-g32"  # the --format default
    assert "lm_head" not in formats
    api = hfquant.HfQuantConfig(format="nf4", group_size=32, rules=CLI_RULES)
    assert list(model.config.quantization_config.rules.items()) == list(api.rules.items())


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"), ("{bad", "is not JSON"), ("[1, 2]", "expected a JSON object"),
    ('{"re:.*typo_proj": "int8"}', "re:.*typo_proj"), ('{"lm_head": "int9"}', "int9"),
])
def test_bad_rules_file_is_one_clear_error(tiny_checkpoints: dict, tmp_path: Path, capsys, content: str | None,
                                           message: str) -> None:
    rules = tmp_path / "rules.json"
    if content is not None:
        rules.write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--rules", str(rules)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "rules" in err
    assert not (tmp_path / "q").exists()


def test_help_lists_every_registered_format_and_method() -> None:
    from hfquant.algorithms import method_names
    from hfquant.cli import build_parser
    from hfquant.formats import format_names

    parser = build_parser()
    for command in ("quantize", "compare"):
        subparser = parser._subparsers._group_actions[0].choices[command]
        text = " ".join(subparser.format_help().split())
        assert all(name in text for name in format_names() + method_names()), command


def test_compare_takes_every_kind_of_format(tiny_checkpoints: dict, text_file: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"lm_head": None}))
    main(["compare", str(tiny_checkpoints["opt"]), "--configs", "nf4-g32", "fp8", "ternary-g32", "bf16",
          "--rules", str(rules), "--out", str(tmp_path / "cmp"), "--dataset", str(text_file), "--seqlen", "64",
          "--stride", "32", "--max-tokens", "256"])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert all(label in table for label in ("nf4-g32", "fp8", "ternary-g32", "bf16"))
    kl = {spec: json.loads((tmp_path / "cmp" / f"{spec}.json").read_text())["drift"]["mean_kl"]
          for spec in ("bf16", "fp8", "nf4-g32", "ternary-g32")}
    assert kl["bf16"] < kl["fp8"] < kl["ternary-g32"] and kl["nf4-g32"] < kl["ternary-g32"]


def test_calibration_flags_in_compare_need_a_calibrated_spec(tiny_checkpoints: dict, tmp_path: Path,
                                                             capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", str(tiny_checkpoints["opt"]), "--configs", "int8", "--num-samples", "4",
              "--out", str(tmp_path / "cmp")])
    assert info.value.code == 2 and "--num-samples" in capsys.readouterr().err


def test_quantize_takes_activations_and_an_observer(tiny_checkpoints: dict, text_file: Path, tmp_path: Path,
                                                    capsys) -> None:
    main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "q"), "--format", "int8", "--group-size", "-1",
          "--activations", "int8-static", "--observer", "percentile", "--observer-percentile", "99.5",
          "--calib-dataset", str(text_file), "--num-samples", "2", "--calib-seqlen", "16"])
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (saved["activations"], saved["observer"], saved["observer_percentile"]) == ("int8-static", "percentile", 99.5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(float(m.input_scale) > 0 for m in model.modules() if isinstance(m, QuantLinear))
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tiny_checkpoints["llama"]), str(tmp_path / "d"), "--format", "int8",
              "--activations", "int8-dynamic", "--observer", "mse"])
    assert info.value.code == 2 and "observer='mse' is not allowed" in capsys.readouterr().err
