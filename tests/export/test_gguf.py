"""GGUF export: read back by gguf's reader, loaded by transformers' own GGUF loader (which dequantizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hfquant
from hfquant.bundled.model import unpermute_qk
from hfquant.export.gguf import BLOCK_TYPES, GGUF_FILE, llama_cpp_row_order
from hfquant.formats import parse_spec
from hfquant.hf.saving import save_quantized

TOKENS = 300  # the tokenizer's; the model's vocabulary is larger, so the GGUF token list is padded
IDS = torch.tensor([[5, 17, 260, 33, 299, 1, 120, 7, 64, 250, 310, 2, 90, 45, 11, 270]])


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 256: whole TQ2_0 blocks) with a trained byte-level BPE tokenizer."""
    folder = tmp_path_factory.mktemp("bpe_llama")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog 12345", "hello world, quantization is fun!"] * 20
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=TOKENS, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert backend.get_vocab_size() == TOKENS
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def _quantized(path: Path, spec: str, **fields) -> torch.nn.Module:
    config = hfquant.HfQuantConfig(**parse_spec(spec).to_dict(), kernels="off", **fields)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


def _loaded_by_transformers(out: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE).eval()


@pytest.mark.parametrize("block_type", BLOCK_TYPES, ids=lambda t: t.qtype.name)
def test_block_encoders_decode_as_the_gguf_package_reads_them(block_type) -> None:
    rng = np.random.default_rng(0)
    low, high = block_type.codes
    codes = rng.integers(low, high + 1, size=(3, 2, block_type.block))
    d = rng.normal(size=(3, 2)).astype(np.float16).astype(np.float32)
    m = rng.normal(size=(3, 2)).astype(np.float16).astype(np.float32) if block_type.with_min else None
    expected = codes * d[..., None] + (0 if m is None else m[..., None])
    decoded = dequantize(block_type.encode(codes, d, m), block_type.qtype)
    np.testing.assert_array_equal(decoded, expected.reshape(3, -1).astype(np.float32))


def test_row_order_is_undone_by_the_bundled_converter() -> None:
    weight = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(weight[llama_cpp_row_order(24, heads).numpy()], heads), weight)
    with pytest.raises(ValueError, match="rows=10 is not divisible by 2 \\* n_heads = 4"):
        llama_cpp_row_order(10, 2)


def _weights_differ_by_the_reported_error(model, theirs, report) -> None:
    """transformers' dequantized (and un-permuted) weights against hfquant's, layer by layer."""
    modules = dict(theirs.named_modules())
    for layer in report.layers:
        ours = dict(model.named_modules())[layer.layer].dequantized_weight(torch.float32)
        difference = (modules[layer.layer].weight.detach() - ours).abs().max().item()
        assert difference == pytest.approx(layer.max_abs_error, rel=1e-3, abs=1e-12), layer


@pytest.mark.parametrize("spec, qtype", [
    ("int8", QType.Q8_0),  # per channel: every block of a row gets the row's scale
    ("int4-g32-sym", QType.Q4_0),
    ("int3-g64-sym", QType.Q4_0),
    ("ternary-g256", QType.TQ2_0),
    ("ternary", QType.Q4_0),  # groups of 128: not whole TQ2_0 blocks
    ("fp4", QType.Q8_0),  # e2m1 values times 2 are integers
    ("fp16", QType.F16),
], ids=lambda value: getattr(value, "name", value))
def test_exact_mappings_load_in_transformers_with_equal_logits(spec, qtype, bpe_llama, tmp_path: Path) -> None:
    model = _quantized(bpe_llama, spec)
    report = hfquant.export(model, tmp_path / "g", to="gguf")
    assert report.counts() == {"exact": 14, "re-quantized": 0}
    assert {layer.target_type for layer in report.layers} == {qtype.name}
    reader = GGUFReader(tmp_path / "g" / GGUF_FILE)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.attn_q.weight"] == qtype and types["blk.0.ffn_down.weight"] == qtype
    assert types["token_embd.weight"] == QType.F32 and types["blk.0.attn_norm.weight"] == QType.F32
    theirs = _loaded_by_transformers(tmp_path / "g")
    _weights_differ_by_the_reported_error(model, theirs, report)
    with torch.no_grad():
        # the same weights: the same logits, up to float32 matmul rounding
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_q4_1_error_is_the_float16_rounding_of_the_min(bpe_llama, tmp_path: Path) -> None:
    model = _quantized(bpe_llama, "int4-g32-asym")
    report = hfquant.export(model, tmp_path / "g", to="gguf")
    layer = model.model.layers[0].mlp.up_proj
    minimum = layer.weight_zero.double() * layer.weight_scale.double()  # exact in float64
    rounding = (minimum.half().double() - minimum).abs().max().item()
    up = next(entry for entry in report.layers if entry.layer == "model.layers.0.mlp.up_proj")
    assert up.target_type == "Q4_1" and up.max_abs_error == pytest.approx(rounding, rel=1e-3)
    assert 0 < up.rel_rms_error < 1e-3
    theirs = _loaded_by_transformers(tmp_path / "g")
    _weights_differ_by_the_reported_error(model, theirs, report)
    with torch.no_grad():
        difference = (theirs(IDS).logits - model(IDS).logits).abs().max().item()
    assert difference < 1e-2  # measured 8e-4 for weight errors up to 3e-5


@pytest.mark.parametrize("spec, qtype", [
    ("nf4", QType.Q8_0), ("int4-g16-sym", QType.Q8_0),
], ids=lambda value: getattr(value, "name", value))
def test_formats_without_a_gguf_type_are_requantized_with_their_error(spec, qtype, bpe_llama, tmp_path: Path) -> None:
    model = _quantized(bpe_llama, spec)
    report = hfquant.export(model, tmp_path / "g", to="gguf")
    assert report.counts() == {"exact": 0, "re-quantized": 14}
    assert {layer.target_type for layer in report.layers} == {qtype.name}
    assert all(layer.rel_rms_error > 0 for layer in report.layers)
    saved = json.loads((tmp_path / "g" / "hfquant-export.json").read_text())
    assert saved["layers"][0]["status"] == "re-quantized" and saved["target"] == "gguf"
    _weights_differ_by_the_reported_error(model, _loaded_by_transformers(tmp_path / "g"), report)


def test_names_metadata_and_tokenizer(bpe_llama, tmp_path: Path) -> None:
    model = _quantized(bpe_llama, "int4-g32-sym")
    save_quantized(model, tmp_path / "q", tokenizer=AutoTokenizer.from_pretrained(bpe_llama))
    report = hfquant.export(tmp_path / "q", tmp_path / "g", to="gguf")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["hfquant-export.json", GGUF_FILE]
    assert report.files == [GGUF_FILE]
    reader = GGUFReader(tmp_path / "g" / GGUF_FILE)
    per_block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    assert {t.name for t in reader.tensors} == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in (0, 1) for name in per_block}
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 64
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 320 and tokens[310] == "[PAD310]" and types[310] == TokenType.UNUSED
    assert types[0] == TokenType.CONTROL and fields["tokenizer.ggml.eos_token_id"].contents() == 0
    ours, theirs = AutoTokenizer.from_pretrained(bpe_llama), AutoTokenizer.from_pretrained(tmp_path / "g",
                                                                                         gguf_file=GGUF_FILE)
    text = "the lazy fox 123, hello quantization!"
    assert theirs(text).input_ids == ours(text).input_ids


def test_cli_export(bpe_llama, tmp_path: Path) -> None:
    from hfquant.cli import main

    save_quantized(_quantized(bpe_llama, "int8"), tmp_path / "q", tokenizer=AutoTokenizer.from_pretrained(bpe_llama))
    main(["export", str(tmp_path / "q"), str(tmp_path / "g"), "--to", "gguf"])
    assert json.loads((tmp_path / "g" / "hfquant-export.json").read_text())["counts"] == {"exact": 14,
                                                                                         "re-quantized": 0}


def test_what_gguf_cannot_hold_is_refused(bpe_llama, tiny_checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "g"
    model = _quantized(bpe_llama, "int8", activations="int8-dynamic")
    name = model.model.layers[0].self_attn.q_proj.fmt.name
    with pytest.raises(ValueError, match=rf"layer model\.layers\.0\.self_attn\.q_proj: format {name} cannot be "
                                         "exported to gguf: its input mode 'int8-dynamic'"):
        hfquant.export(model, out, to="gguf")
    with pytest.raises(ValueError, match=r"model_type='qwen2' cannot be exported to gguf; supported: \['llama'\]"):
        hfquant.export(_quantized(tiny_checkpoints["qwen2"], "int8"), out, to="gguf")
    with pytest.raises(ValueError, match=r"tokenizer \{'model': 'WordLevel'.* only GPT-2-style byte-level BPE"):
        hfquant.export(_quantized(tiny_checkpoints["llama"], "int8"), out, to="gguf")
    assert not out.exists()


@pytest.mark.integration
@pytest.mark.slow  # about 70 s of CPU: the bundled model's quantization, export and 49k-token GGUF tokenizer
def test_bundled_smollm2_exports_exactly_with_its_tokenizer(tmp_path: Path) -> None:
    from hfquant.bundled import bundled_model_path

    path = bundled_model_path()
    model = _quantized(path, "int4-g32-sym")
    report = hfquant.export(model, tmp_path / "g", to="gguf")
    assert report.counts() == {"exact": 210, "re-quantized": 0}
    reader = GGUFReader(tmp_path / "g" / GGUF_FILE)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
    attn_q = next(t for t in reader.tensors if t.name == "blk.3.attn_q.weight")
    weight = unpermute_qk(dequantize(attn_q.data, attn_q.tensor_type), model.config.num_attention_heads)
    assert attn_q.tensor_type == QType.Q4_0 and "output.weight" not in {t.name for t in reader.tensors}  # tied
    np.testing.assert_array_equal(weight, model.model.layers[3].self_attn.q_proj.dequantized_weight().numpy())
    ours = AutoTokenizer.from_pretrained(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=GGUF_FILE)
    text = "In 2024, the 3 quick foxes   jumped.\n\nThen <|im_start|> arrived."
    assert theirs(text).input_ids == ours(text).input_ids
