"""GPTQ int3 on the bundled model, calibrated on the bundled corpus's train split; compared with RTN.

    python examples/gptq_calibrated.py
"""

from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.bundled import bundled_model_path
from hfquant.workflows import EvalSettings, eval_tokens, evaluate

path = str(bundled_model_path())
settings = EvalSettings(seqlen=512, max_tokens=8192, protocols=("gptq",))
ids = eval_tokens(AutoTokenizer.from_pretrained(path), settings)
base = AutoModelForCausalLM.from_pretrained(path)

for name, config in {
    "rtn int3 g128": hfquant.HfQuantConfig(bits=3, group_size=128),
    "gptq int3 g128": hfquant.HfQuantConfig(bits=3, group_size=128, method="gptq", num_samples=32, seqlen=512),
}.items():
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    report = evaluate(model, ids, settings, model_id=name, base=base)
    print(f"{name}: PPL {report.perplexity['gptq'].ppl:.2f}, mean KL {report.drift.mean_kl:.4f}, "
          f"top-1 {report.drift.top1_agreement:.1%}")
