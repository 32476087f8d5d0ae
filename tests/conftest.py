from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import BUILDERS, build, tiny_tokenizer  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny architecture saved once as a float32 safetensors checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for arch in BUILDERS:
        paths[arch] = root / arch
        build(arch).save_pretrained(paths[arch])
        tiny_tokenizer().save_pretrained(paths[arch])
    return paths
