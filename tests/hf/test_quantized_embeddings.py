"""Quantized token embeddings and output heads through transformers (``HfQuantConfig(embeddings=...)``).

Tied models (tiny Qwen2, GPT-2 and OPT tie ``lm_head`` to the token embedding; tiny Llama does
not) keep ONE stored table: the saved safetensors file has no tensor under the head's name and
its size is exactly the tensors it should hold; a reload in a fresh process gives the same logits
bit for bit and shares the table again. Untied models quantize the embedding and the head apart.
``modules_to_not_convert`` and ``rules`` decide the embedding and head like any layer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.export import TARGETS
from hfquant.formats import format_names, make_format
from hfquant.nn.qembedding import QuantEmbedding, shares_table
from hfquant.nn.qlinear import QuantLinear
from hfquant.stats import storage_stats
from test_roundtrip import IDS, RELOAD_SCRIPT, _logits, _run_fresh

EMBEDDING = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "opt": "model.decoder.embed_tokens",
             "gpt2": "transformer.wte"}
TIED = {"llama": False, "qwen2": True, "opt": True, "gpt2": True}


def _config(**kwargs) -> hfquant.HfQuantConfig:
    return hfquant.HfQuantConfig(**{"format": "int4", "group_size": 32, "embeddings": "int8", **kwargs})


def _header(file: Path) -> dict:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def test_tiny_models_tie_as_the_tests_assume(tiny_checkpoints: dict) -> None:
    for arch, tied in TIED.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied, arch


@pytest.mark.parametrize("arch", list(EMBEDDING))
def test_embedding_and_head_are_quantized_and_reload_bit_exactly(arch: str, tiny_checkpoints: dict,
                                                                 tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=_config())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantEmbedding) and isinstance(head, QuantLinear)
    assert embedding.scheme.name == head.scheme.name == "int8-gc-sym"
    assert shares_table(head, embedding) == TIED[arch]
    assert model.dtype == torch.float32  # not the float16 of the table's scales
    logits = _logits(model)
    reference = _logits(base)
    assert 0 < (logits - reference).norm() / reference.norm() < 0.3

    model.save_pretrained(tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    header = _header(file)
    name = EMBEDDING[arch]
    head_keys = [k for k in header if k.startswith("lm_head.")]
    assert head_keys == ([] if TIED[arch] else ["lm_head.weight", "lm_head.weight_scale"])
    assert header[f"{name}.weight"]["dtype"] == "I32"
    # the file holds exactly the state dict with the table once: the size proves the head stores nothing
    stored = sum(end - start for key, v in header.items() if key != "__metadata__"
                 for start, end in [v["data_offsets"]])
    assert stored == storage_stats(model).total_bytes
    plan = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["plan"]["layers"]
    assert plan[name] == plan["lm_head"] == "int8-gc-sym"

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert shares_table(again.get_output_embeddings(), again.get_input_embeddings()) == TIED[arch]
    hfquant.prepare_for_inference(again)
    assert torch.equal(_logits(again), logits)
    if arch in ("llama", "qwen2"):  # one untied and one tied model also in a fresh process (a few seconds each)
        result = _run_fresh(RELOAD_SCRIPT.format(imports="import hfquant", ids=IDS.tolist()),
                            str(tmp_path / "q"), str(tmp_path / "logits.safetensors"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "MISSING" not in result.stderr and "UNEXPECTED" not in result.stderr, result.stderr[-3000:]
        assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], logits)


def test_a_tied_table_is_stored_once(tiny_checkpoints: dict, tmp_path: Path) -> None:
    """Checkpoint size: quantizing the tied table to int8 saves the float table minus the int8 table, once."""
    sizes = {}
    for embeddings in (None, "int8"):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"],
                                                     quantization_config=_config(embeddings=embeddings))
        model.save_pretrained(tmp_path / str(embeddings))
        sizes[embeddings] = (tmp_path / str(embeddings) / "model.safetensors").stat().st_size
    table = model.get_input_embeddings()
    float_bytes = table.num_embeddings * table.embedding_dim * 4
    int8_bytes = table.fmt.stored_bits(table.num_embeddings, table.embedding_dim) // 8
    saved = sizes[None] - sizes["int8"]
    header_slack = 2048  # header JSON (plan, tensor names) differs a little
    assert abs(saved - (float_bytes - int8_bytes)) < header_slack, (saved, float_bytes, int8_bytes)


def test_rules_and_modules_to_not_convert_decide_like_any_layer(tiny_checkpoints: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_config(
        modules_to_not_convert=["lm_head"]))
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_config(
        rules={"lm_head": "int4", "embed_tokens": None}))
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert model.get_output_embeddings().scheme.name == "int4-g128-asym"
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_config(
        embeddings=None, rules={"embed_tokens": "int8"}))
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert "lm_head" in model.config.quantization_config.modules_to_not_convert  # the default skip is unchanged
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config(
        rules={"re:(lm_head|model\\.embed_tokens)": "int4"}))  # a tied pair may take any format, the same for both
    assert shares_table(model.get_output_embeddings(), model.get_input_embeddings())
    assert model.get_input_embeddings().scheme.name == "int4-g128-asym"


@pytest.mark.parametrize("kwargs", [dict(modules_to_not_convert=["lm_head"]), dict(rules={"lm_head": "int4"}),
                                    dict(modules_to_not_convert=[], embeddings=None, rules={"embed_tokens": "int8"})])
def test_a_tied_pair_with_two_schemes_is_refused(kwargs: dict, tiny_checkpoints: dict) -> None:
    with pytest.raises(ValueError, match=r"tied (to other tensors|output head lm_head .* allowed: the same scheme)"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config(**kwargs))


def test_default_skips_win_over_a_rule_without_embeddings(tiny_checkpoints: dict) -> None:
    """Precedence as for any layer: without ``embeddings``, the default skips keep a tied pair float."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config(
        embeddings=None, rules={"embed_tokens": "int8"}))
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


def test_default_keeps_embeddings_and_head_in_full_precision(tiny_checkpoints: dict) -> None:
    for arch in ("llama", "qwen2"):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], quantization_config=_config(
            embeddings=None))
        assert type(model.get_input_embeddings()) is torch.nn.Embedding
        assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_an_input_mode_on_the_embedding_is_refused(tiny_checkpoints: dict) -> None:
    rule = {"format": "int8", "group_size": -1, "sym": True, "activations": "int8-dynamic"}
    with pytest.raises(ValueError, match="token embedding model.embed_tokens .* allowed: a weight-only scheme"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_config(
            rules={"embed_tokens": rule}))


def test_gptq_quantizes_a_tied_table_once(tiny_checkpoints: dict, tmp_path: Path) -> None:
    tokens = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config(
        method="gptq", dataset=tokens))
    assert shares_table(model.get_output_embeddings(), model.get_input_embeddings())
    logits = _logits(model)
    model.save_pretrained(tmp_path)
    assert not [k for k in _header(tmp_path / "model.safetensors") if k.startswith("lm_head.")]
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    hfquant.prepare_for_inference(again)
    assert torch.equal(_logits(again), logits)


def test_dequantize_gives_a_tied_float_model(tiny_checkpoints: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config())
    hfquant.prepare_for_inference(model, kernels="off")
    logits = _logits(model)
    model.dequantize()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embedding) is torch.nn.Embedding and head.weight is embedding.weight
    assert set(model.all_tied_weights_keys) == {"lm_head.weight"}
    assert torch.allclose(_logits(model), logits, atol=1e-4)


def test_header_check_covers_the_shared_table(tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config())
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    with safe_open(file, "pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    tensors["model.embed_tokens.weight_scale"] = tensors["model.embed_tokens.weight_scale"][:, :0].contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(ValueError, match="layer model.embed_tokens: tensor 'weight_scale' is F16"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_export_refuses_quantized_embeddings(tiny_checkpoints: dict, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=_config(
        format="int4", group_size=32, sym=True))
    for target in TARGETS:
        with pytest.raises(ValueError, match="quantized token embeddings are not exported yet"):
            hfquant.export(model, tmp_path / "out", to=target)
    assert not (tmp_path / "out").exists()


def test_cli_quantize_takes_embeddings(tiny_checkpoints: dict, tmp_path: Path) -> None:
    from hfquant.cli import main

    main(["quantize", str(tiny_checkpoints["qwen2"]), str(tmp_path / "q"), "--group-size", "32",
          "--embeddings", "int8-g32"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.get_input_embeddings().scheme.name == "int8-g32-sym"
    assert shares_table(model.get_output_embeddings(), model.get_input_embeddings())
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["embeddings"] == {
        "format": "int8", "group_size": 32, "sym": True}


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(embeddings="int9"), r"embeddings: format spec 'int9' is not understood"),
    (dict(embeddings="int8-x"), r"embeddings: .*'x' is not a word of format 'int8'"),
    (dict(embeddings=8), r"embeddings=8 is not allowed"),
    (dict(embeddings={"format": "int8", "group_size": -1, "sym": True, "activations": "int8-dynamic"}),
     r"embeddings=.* is not allowed; an embedding lookup has no input to quantize"),
    (dict(embeddings="int8", target_bits=4), r"embeddings='int8' with target_bits: allowed only embeddings=None"),
    (dict(embeddings="int8", qat=True), r"qat=True is not allowed with embeddings='int8-gc-sym'"),
])
def test_bad_embeddings_are_refused_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hfquant.HfQuantConfig(**kwargs)


def test_embeddings_round_trip_through_config_json() -> None:
    config = hfquant.HfQuantConfig(embeddings={"format": "int8", "group_size": 128})
    saved = json.loads(config.to_json_string())
    assert saved["embeddings"] == {"format": "int8", "group_size": 128, "sym": True}
    assert hfquant.HfQuantConfig.from_dict(saved).embeddings == config.embeddings
    assert "embeddings" not in hfquant.HfQuantConfig().to_dict()  # configs without it are saved as before


@pytest.mark.parametrize("name", format_names())
def test_every_format_serves_a_tied_table_and_reloads_exactly(name: str, tiny_checkpoints: dict,
                                                               tmp_path: Path) -> None:
    fmt = make_format(name, group_size=16) if make_format(name).grouped else make_format(name)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=_config(
        format="int8", embeddings=fmt.to_dict()))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.fmt == fmt and shares_table(head, embedding)
    hfquant.prepare_for_inference(model, kernels="off")
    hidden = torch.randn(1, 3, embedding.embedding_dim, generator=torch.Generator().manual_seed(0))
    table = embedding.dequantized_weight()
    assert torch.equal(embedding(IDS), torch.nn.functional.embedding(IDS, table))
    assert torch.equal(head(hidden), torch.nn.functional.linear(hidden, table))
    logits = _logits(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    hfquant.prepare_for_inference(again, kernels="off")
    assert shares_table(again.get_output_embeddings(), again.get_input_embeddings())
    assert torch.equal(_logits(again), logits)
