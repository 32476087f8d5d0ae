"""The tokenizer of a GGUF export: llama.cpp's ``tokenizer.ggml.*`` metadata from a ``tokenizer.json``.

GPT-2-style byte-level BPE only (``tokenizer.ggml.model = "gpt2"``): tokens in id order as the
vocabulary spells them, types NORMAL, added special tokens CONTROL, other added tokens USER_DEFINED,
and ``[PAD<id>]`` (UNUSED) up to the model's ``vocab_size`` (llama.cpp needs one token per embedding
row). llama.cpp picks its pre-tokenizer regexes by name (``tokenizer.ggml.pre``): the names of
:data:`PRE_TOKENIZERS`, matched on the ``tokenizer.json`` pre-tokenizer (``trim_offsets`` aside, which
changes offsets, not ids). Merges, special token ids, ``add_bos``/``add_eos`` and the chat template
come from ``gguf.SpecialVocab``. Anything else is refused, naming what the tokenizer has.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

TOKENIZER_FILE = "tokenizer.json"
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# llama.cpp's tokenizer.ggml.pre name -> the tokenizer.json pre_tokenizer it stands for
PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}
IGNORED_KEYS = ("trim_offsets",)


@dataclass(frozen=True)
class GgufVocab:
    """Everything llama.cpp and transformers' GGUF tokenizer read from ``tokenizer.ggml.*``."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    special: gguf.SpecialVocab

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)


def tokenizer_folder(model: Any) -> Path:
    """The local folder of ``model`` (its checkpoint or the float model it was quantized from) with a tokenizer."""
    folder = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
    if not (folder / TOKENIZER_FILE).is_file():
        raise ValueError(f"no {TOKENIZER_FILE} in the model's folder {str(folder)!r} (model.name_or_path); a GGUF file "
                         "carries its tokenizer: export a checkpoint saved with it "
                         "(save_quantized(model, folder, tokenizer=...), or `hfquant quantize`)")
    return folder


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    pre = _canonical(tokenizer.get("pre_tokenizer"))
    name = next((name for name, expected in PRE_TOKENIZERS.items() if pre == expected), None)
    if name is None:
        raise ValueError(f"tokenizer pre_tokenizer {json.dumps(tokenizer.get('pre_tokenizer'))} has no llama.cpp "
                         f"pre-tokenizer name here; supported: {list(PRE_TOKENIZERS)}")
    return name


def check_byte_level_bpe(tokenizer: dict[str, Any]) -> None:
    model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder") or {}
    found = {"model": model.get("type"), "byte_fallback": bool(model.get("byte_fallback")),
             "decoder": decoder.get("type"), "normalizer": (tokenizer.get("normalizer") or {}).get("type")}
    if found != {"model": "BPE", "byte_fallback": False, "decoder": "ByteLevel", "normalizer": None}:
        raise ValueError(f"tokenizer {found} cannot be exported to gguf: only GPT-2-style byte-level BPE "
                         "(model BPE without byte_fallback, ByteLevel decoder, no normalizer) is written")


def token_table(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their ``gguf.TokenType``, padded to ``vocab_size``."""
    by_id = {index: text for text, index in tokenizer["model"]["vocab"].items()}
    types = {index: int(gguf.TokenType.NORMAL) for index in by_id}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    count = max(by_id) + 1
    if sorted(by_id) != list(range(count)) or count > vocab_size:
        raise ValueError(f"tokenizer ids are not 0 .. n - 1 with n <= vocab_size={vocab_size} (found {len(by_id)} "
                         f"ids up to {count - 1}); llama.cpp needs one token per embedding row")
    tokens = [by_id[i] for i in range(count)] + [f"[PAD{i}]" for i in range(count, vocab_size)]
    return tokens, [types[i] for i in range(count)] + [int(gguf.TokenType.UNUSED)] * (vocab_size - count)


def read_vocab(folder: str | os.PathLike, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer of the ``tokenizer.json`` (and ``tokenizer_config.json``, ``config.json``) in ``folder``."""
    folder = Path(folder)
    tokenizer = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
    check_byte_level_bpe(tokenizer)
    pre = pre_tokenizer_name(tokenizer)
    tokens, types = token_table(tokenizer, vocab_size)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    return GgufVocab("gpt2", pre, tokens, types, special)
