"""hfquant: weight quantization for Hugging Face transformers.

``import hfquant`` registers ``quant_method="hfquant"`` with transformers, so
``from_pretrained(path, quantization_config=hfquant.HfQuantConfig(...))`` quantizes a model and
``from_pretrained(saved)`` reloads a saved one.
"""

from hfquant.export import export
from hfquant.formats import WeightFormat, format_names, make_format
from hfquant.hf import HfQuantConfig, HfQuantQuantizer, register
from hfquant.nn.qlinear import prepare_for_inference
from hfquant.schemes import LayerScheme

register()

__version__ = "0.2.0"
__all__ = ["HfQuantConfig", "HfQuantQuantizer", "LayerScheme", "WeightFormat", "__version__", "export", "format_names",
           "make_format", "prepare_for_inference"]
