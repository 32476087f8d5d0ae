"""Integration: the bundled SmolLM2-135M and Brown corpus, quantized and evaluated for real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfquant
from hfquant.bundled import bundled_model_path
from hfquant.calibration.data import calibration_batches
from hfquant.stats import checkpoint_bytes, storage_stats
from hfquant.workflows import EvalSettings, eval_tokens, evaluate

pytestmark = pytest.mark.integration
SETTINGS = EvalSettings(seqlen=512, stride=256, max_tokens=2048, progress=False)


@pytest.fixture(scope="module")
def real() -> dict:
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = eval_tokens(tokenizer, SETTINGS)
    return {"path": path, "tokenizer": tokenizer, "base": base, "ids": ids,
            "report": evaluate(base, ids, SETTINGS, model_id=str(path))}


def _quantized(real: dict, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(real["path"], quantization_config=hfquant.HfQuantConfig(**kwargs))


def test_float_model_is_a_real_language_model(real: dict) -> None:
    assert real["ids"].numel() == 2048
    assert 5 < real["report"].perplexity["gptq"].ppl < 60


def test_rtn_quality_orders_by_bits(real: dict, tmp_path: Path) -> None:
    reports = {}
    for name, kwargs in {"int8": dict(bits=8, group_size=-1), "int4": dict(bits=4, group_size=128),
                         "int2": dict(bits=2, group_size=64)}.items():
        model = _quantized(real, **kwargs)
        reports[name] = evaluate(model, real["ids"], SETTINGS, model_id=name, base=real["base"])
    base_ppl = real["report"].perplexity["gptq"].ppl
    assert reports["int8"].drift.mean_kl < reports["int4"].drift.mean_kl < reports["int2"].drift.mean_kl
    assert reports["int8"].drift.top1_agreement > 0.95
    assert abs(reports["int8"].perplexity["gptq"].ppl - base_ppl) / base_ppl < 0.01
    assert reports["int2"].perplexity["gptq"].ppl > base_ppl
    assert 4.1 < reports["int4"].bits_per_weight < 4.3


def test_save_reload_is_exact_and_compact(real: dict, tmp_path: Path) -> None:
    model = _quantized(real, bits=4, group_size=128)
    model.save_pretrained(tmp_path)
    assert checkpoint_bytes(tmp_path) < 0.35 * checkpoint_bytes(real["path"])
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = real["ids"][:64].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert storage_stats(again).to_dict() == storage_stats(model).to_dict()


def test_gptq_beats_rtn_at_3_bits(real: dict) -> None:
    calib = calibration_batches(real["tokenizer"], None, num_samples=8, seqlen=256, seed=0)
    rtn = _quantized(real, bits=3, group_size=128)
    gptq = _quantized(real, bits=3, group_size=128, method="gptq", dataset=calib)
    rtn_report = evaluate(rtn, real["ids"], SETTINGS, model_id="rtn", base=real["base"])
    gptq_report = evaluate(gptq, real["ids"], SETTINGS, model_id="gptq", base=real["base"])
    assert gptq_report.drift.mean_kl < rtn_report.drift.mean_kl
    assert gptq_report.perplexity["gptq"].ppl < rtn_report.perplexity["gptq"].ppl
