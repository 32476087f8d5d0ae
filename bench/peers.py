"""hfquant side by side with its peers: speed, memory, size and quality, one fresh process per row.

    python bench/peers.py                      # every row, bundled SmolLM2-135M and the synthetic stack
    python bench/peers.py --models bundled --rows "hfquant int4 g128" "torchao int4 g128"
    python bench/peers.py --list               # the rows, and whether each one's environment exists

Every row loads the same float checkpoint through one library's own transformers integration (or
API) in its own process, with that library's Python: peers whose pins conflict live in their own
virtual environments (``VENVS``; see ``bench/README.md`` for how they were made). Figures per row:

* quantize s: ``from_pretrained`` wall time (quantizing on the fly; calibrated rows include calibration);
* prefill tok/s on one 512-token prompt; decode tok/s at batch 1 and 8 (median single-token forward
  with a KV cache after a 16-token prompt); the prompts are the same text for every row;
* peak RSS of the whole row (load, runs, evaluation) and RSS after loading;
* checkpoint MB: ``save_pretrained`` size on disk (or why it could not save);
* PPL: GPTQ-protocol perplexity on the bundled corpus's test split (bundled model only; the
  synthetic stack has random weights).

Ratios are against the fp32 row of the same model in the same run. A row that fails records its
error instead of disappearing. Writes ``bench/results/peers.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, PeakMemory, environment, rss_mib, write_results  # noqa: E402

VENV_ROOT = Path(os.environ.get("HFQUANT_PEER_VENVS", "/work/venvs"))
PREFILL_TOKENS = 512
PROMPT_TOKENS = 16
DECODE_STEPS = {1: 16, 8: 8}  # batch -> timed single-token steps (fewer when one step takes seconds)
PPL_SEQLEN, PPL_TOKENS = 512, 8 * 512
PPL_BUDGET_S = 400  # a row whose prefill speed predicts a longer PPL run skips it and says so
CALIBRATION = dict(num_samples=32, seqlen=512, seed=0)  # shared by every calibrated row
STACK = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=4096, max_position_embeddings=1024, num_hidden_layers=4)
ROW_TIMEOUT_S = 1200
HARNESS_VERSION = 2  # 1 also sampled memory from a thread during the timed steps; each row keeps its own


@dataclass(frozen=True)
class Row:
    """One configuration: ``library`` picks the loader in ``LOADERS`` and the Python (its venv)."""

    name: str
    library: str
    bits: float | None  # weight bits, for equal-bits comparisons; None: float
    dtype: str = "float32"  # activation (and float parts) dtype
    options: dict[str, Any] = field(default_factory=dict)
    calibrated: bool = False


ROWS: tuple[Row, ...] = (
    Row("fp32", "float", None),
    Row("bf16", "float", None, dtype="bfloat16"),
    Row("hfquant int8", "hfquant", 8, options={"bits": 8, "group_size": -1}),
    Row("hfquant int4 g128", "hfquant", 4, options={"bits": 4, "group_size": 128}),
    Row("hfquant int4 g64", "hfquant", 4, options={"bits": 4, "group_size": 64}),
    Row("hfquant int4 g128 (exact fp32 kernels)", "hfquant", 4,
        options={"bits": 4, "group_size": 128, "kernels": "exact"}),
    Row("hfquant int8 (bf16)", "hfquant", 8, dtype="bfloat16", options={"bits": 8, "group_size": -1}),
    Row("hfquant int4 g128 (bf16)", "hfquant", 4, dtype="bfloat16", options={"bits": 4, "group_size": 128}),
    Row("hfquant int8 + int8 embeddings", "hfquant", 8, options={"bits": 8, "group_size": -1, "embeddings": "int8"}),
    Row("hfquant int4 g128 + int8 embeddings", "hfquant", 4,
        options={"bits": 4, "group_size": 128, "embeddings": "int8"}),
    Row("hfquant HQQ int4 g64", "hfquant", 4, options={"bits": 4, "group_size": 64, "method": "hqq"}),
    Row("hfquant int3 g128 (widened)", "hfquant", 3, options={"bits": 3, "group_size": 128, "widen": True}),
    Row("hfquant int2 g64 (widened)", "hfquant", 2, options={"bits": 2, "group_size": 64, "widen": True}),
    Row("hfquant GPTQ int4 g128", "hfquant", 4, calibrated=True,
        options={"bits": 4, "group_size": 128, "method": "gptq"}),
    Row("hfquant GPTQ int4 g64 sym", "hfquant", 4, calibrated=True,
        options={"bits": 4, "group_size": 64, "sym": True, "method": "gptq"}),
    Row("quanto int8", "quanto", 8, options={"weights": "int8"}),
    Row("quanto int4", "quanto", 4, options={"weights": "int4"}),
    Row("torchao int8", "torchao", 8, options={"config": "int8"}),
    Row("torchao int4 g128", "torchao", 4, options={"config": "int4", "group_size": 128}),
    Row("torchao int4 g64", "torchao", 4, options={"config": "int4", "group_size": 64}),
    Row("torchao int4 g64 (bf16)", "torchao", 4, dtype="bfloat16", options={"config": "int4", "group_size": 64}),
    Row("hqq int4 g64", "hqq", 4, options={"nbits": 4, "group_size": 64}),
    Row("bitsandbytes int8", "bnb", 8, options={"load_in_8bit": True}),
    Row("bitsandbytes nf4", "bnb", 4, options={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    Row("bitsandbytes nf4 (bf16)", "bnb", 4, dtype="bfloat16",
        options={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    Row("llm-compressor GPTQ int4 g64 sym", "llmcompressor", 4, calibrated=True, options={"group_size": 64}),
)
STACK_ROWS = ("fp32", "bf16", "hfquant int8", "hfquant int4 g128", "hfquant int4 g128 (bf16)", "quanto int8",
              "torchao int8", "torchao int4 g128", "bitsandbytes nf4")

LIBRARY_VENV = {"float": None, "hfquant": None}  # None: this Python


def python_for(library: str) -> str | None:
    """The interpreter of ``library``'s environment, or None when it is missing."""
    venv = LIBRARY_VENV.get(library, library)
    if venv is None:
        return sys.executable
    python = VENV_ROOT / venv / "bin" / "python"
    return str(python) if python.exists() else None


# ------------------------------------------------------------------------------------------------
# Loaders: (checkpoint path, row, torch dtype, calibration ids) -> model; each runs in the row's process.
# Calibrated rows all get the same (num_samples, seqlen) token ids (CALIBRATION, from the train split).
# ------------------------------------------------------------------------------------------------


def load_float(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_hfquant(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    from transformers import AutoModelForCausalLM

    import hfquant
    options = dict(row.options)
    widen = options.pop("widen", False)
    if row.calibrated:
        options["dataset"] = calibration
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=hfquant.HfQuantConfig(**options))
    if widen:
        hfquant.prepare_for_inference(model, widen=True)
    return model


def load_quanto(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    from transformers import AutoModelForCausalLM, QuantoConfig
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                quantization_config=QuantoConfig(**row.options))


def load_torchao(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig
    if row.options["config"] == "int8":
        config = Int8WeightOnlyConfig()
    else:  # torchao 0.18's CPU int4 layout (aten._weight_int4pack_mm_for_cpu)
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        config = PrototypeInt4WeightOnlyConfig(group_size=row.options["group_size"])
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                quantization_config=TorchAoConfig(config))


def load_hqq(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    """hqq's own API: transformers 5.24's HqqConfig path raises NotImplementedError. CPU backend: PYTORCH."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu")
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(axis=1, **row.options), compute_dtype=dtype,
                                  device="cpu")
    return model


def save_hqq(model: Any, folder: Path) -> None:
    from hqq.models.hf.base import AutoHQQHFModel
    AutoHQQHFModel.save_quantized(model, str(folder))


def load_bnb(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    options = dict(row.options, **({"bnb_4bit_compute_dtype": dtype} if row.options.get("load_in_4bit") else {}))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu",
                                                quantization_config=BitsAndBytesConfig(**options))


def load_llmcompressor(path: str, row: Row, dtype: Any, calibration: Any) -> Any:
    """GPTQ W4A16 (symmetric int4, groups) with ``oneshot``, saved compressed, reloaded by plain transformers.

    The stock ``W4A16`` preset (group 128) refuses SmolLM2: 576 input columns are no multiple of 128.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=row.options["group_size"]))
    data = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": [[1] * calibration.shape[1]] *
                              calibration.shape[0]})
    oneshot(model=model, dataset=data, recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
            tokenizer=AutoTokenizer.from_pretrained(path), max_seq_length=calibration.shape[1],
            num_calibration_samples=calibration.shape[0])
    with tempfile.TemporaryDirectory(prefix="llmc-") as folder:
        model.save_pretrained(folder, save_compressed=True)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu")


LOADERS: dict[str, Callable[[str, Row, Any, Any], Any]] = {
    "float": load_float, "hfquant": load_hfquant, "quanto": load_quanto, "torchao": load_torchao, "hqq": load_hqq,
    "bnb": load_bnb, "llmcompressor": load_llmcompressor}
SAVERS: dict[str, Callable[[Any, Path], None]] = {"hqq": save_hqq}  # default: model.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------
# One row, in a child process
# ------------------------------------------------------------------------------------------------


def _corpus_ids(tokenizer: Any, split: str) -> Any:
    """The bundled corpus split as one token stream, exactly as ``hfquant eval`` scores it."""
    from hfquant.calibration.data import load_text
    from hfquant.evaluation import tokenize_corpus
    return tokenize_corpus(tokenizer, load_text(None, split=split))


def _prompts(ids: Any, vocab: int) -> tuple[Any, Any]:
    """A 512-token prompt and 8 prompts of 16 tokens: from the test-split ``ids``, or fixed random ids if None."""
    import torch
    if ids is None:
        gen = torch.Generator().manual_seed(0)
        return (torch.randint(vocab, (1, PREFILL_TOKENS), generator=gen),
                torch.randint(vocab, (8, PROMPT_TOKENS), generator=gen))
    decode = ids[PREFILL_TOKENS:PREFILL_TOKENS + 8 * PROMPT_TOKENS].reshape(8, PROMPT_TOKENS)
    return ids[:PREFILL_TOKENS][None], decode


def _time_prefill(model: Any, ids: Any) -> float:
    """Best of up to 3 after a warm-up, tokens/s (noise on a shared machine only ever adds time)."""
    start = time.perf_counter()
    model(ids, use_cache=False)
    times = [time.perf_counter() - start]
    for _ in range(3 if times[0] < 20 else 0):
        start = time.perf_counter()
        model(ids, use_cache=False)
        times.append(time.perf_counter() - start)
    return ids.numel() / min(times[1:] or times)


def _time_decode(model: Any, prompts: Any, steps: int) -> float:
    """Greedy single-token steps with a KV cache after ``prompts``; batch tokens/s over the median step."""
    out = model(prompts, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    times: list[float] = []
    while len(times) < 2 + steps:  # the first two steps warm up
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
        steps = min(steps, max(3, int(30 / times[-1])))  # about 30 s at most
    return prompts.shape[0] / statistics.median(times[2:])


def _checkpoint_mb(model: Any, library: str) -> tuple[float | None, str | None]:
    folder = Path(tempfile.mkdtemp(prefix="peer-ckpt-"))
    try:
        SAVERS.get(library, lambda m, f: m.save_pretrained(f))(model, folder)
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, None
    except Exception as error:  # noqa: BLE001 - a peer that cannot save is reported, not fatal
        return None, f"{type(error).__name__}: {error}"[:300]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _float_linears(model: Any) -> int:
    """``nn.Linear`` layers (besides the output head) still holding a plain float weight.

    A library may skip shapes it cannot take (e.g. ``in_features`` not a multiple of its group size);
    those layers stay float and this count shows it.
    """
    import torch
    head = model.get_output_embeddings()
    weights = [getattr(m, "weight", None) for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    return sum(1 for w in weights if w is not None and type(w.data) is torch.Tensor and w.is_floating_point())


def measure(path: str, row: Row, real: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from hfquant.calibration.data import calibration_batches
    from hfquant.evaluation import perplexity_gptq

    result: dict[str, Any] = {"load_avg": round(os.getloadavg()[0], 1), "threads": torch.get_num_threads(),
                              "harness": HARNESS_VERSION}
    tokenizer = AutoTokenizer.from_pretrained(path) if real else None
    test_ids = _corpus_ids(tokenizer, "test") if real else None
    calibration = calibration_batches(tokenizer, **CALIBRATION) if row.calibrated else None
    # Peak RSS from getrusage, no sampler thread: a third runnable thread on 2 cores slows the timed steps.
    start = time.perf_counter()
    model = LOADERS[row.library](path, row, getattr(torch, row.dtype), calibration).eval()
    result["quantize_s"] = time.perf_counter() - start
    result["rss_after_load_mib"] = rss_mib()
    result["float_linears"] = _float_linears(model)
    result["checkpoint_mb"], result["save_error"] = _checkpoint_mb(model, row.library)
    prefill, prompts = _prompts(test_ids, model.config.vocab_size)
    with torch.no_grad():  # not inference_mode: quanto int4 fails under it
        result["prefill_tok_s"] = _time_prefill(model, prefill)
        for batch, steps in DECODE_STEPS.items():
            result[f"decode_b{batch}_tok_s"] = _time_decode(model, prompts[:batch], steps)
        estimate_s = PPL_TOKENS / result["prefill_tok_s"]
        if real and estimate_s > PPL_BUDGET_S:
            result["ppl_skipped"] = f"would take about {estimate_s:.0f} s"
        elif real:
            try:
                result["ppl"] = perplexity_gptq(model, test_ids[:PPL_TOKENS], PPL_SEQLEN, progress=False).ppl
            except Exception as error:  # noqa: BLE001 - keep the speed figures, report why PPL failed
                result["ppl_skipped"] = f"failed: {type(error).__name__}: {error}"[:200]
    result["peak_rss_mib"] = PeakMemory.peak_rss_mib()
    return result


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def run_row(path: str, row: Row, real: bool) -> dict[str, Any]:
    python = python_for(row.library)
    if python is None:
        return {"error": f"no environment for {row.library} at {VENV_ROOT / LIBRARY_VENV.get(row.library, row.library)}"}
    args = [python, __file__, "--child", path, json.dumps(asdict(row)), "real" if real else "synthetic"]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=ROW_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {ROW_TIMEOUT_S} s"}
    if proc.returncode or "RESULT" not in proc.stdout:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit status {proc.returncode}")[:400],
                "stderr_tail": proc.stderr[-3000:]}
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def synthetic_checkpoint(folder: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**STACK)).save_pretrained(folder)
    return str(folder)


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: dict[str, dict[str, dict]], rows: dict[str, Row]) -> str:
    head = ("| model | row | bits | act dtype | quantize s | prefill tok/s (vs fp32) | decode b1 tok/s (vs fp32) | "
            "decode b8 tok/s (vs fp32) | peak RSS MiB | checkpoint MB | PPL | float linears left | load avg |")
    lines = [head, "|" + "---|" * 13]
    for model, by_row in results.items():
        base = by_row.get("fp32", {})
        for name, r in by_row.items():
            row = rows[name]
            bits = "float" if row.bits is None else str(row.bits)
            name = name if r.get("harness") == HARNESS_VERSION else f"{name} (†)"
            if "error" in r:
                lines.append(f"| {model} | {name} | {bits} | {row.dtype} | error: {r['error'][:160]} |" + " |" * 8)
                continue

            def rel(key: str, r: dict = r, base: dict = base) -> str:
                same_run = r.get("harness") == base.get("harness")  # ratios only within one invocation
                ratio = f" ({r[key] / base[key]:.2f}x)" if base.get(key) and same_run else ""
                return f"{_fmt(r[key])}{ratio}"
            ppl = f"skipped: {r['ppl_skipped']}" if "ppl_skipped" in r else _fmt(r.get("ppl"), 2)
            size = _fmt(r["checkpoint_mb"]) if r["checkpoint_mb"] is not None else f"not saved: {r['save_error'][:60]}"
            lines.append(f"| {model} | {name} | {bits} | {row.dtype} | {_fmt(r['quantize_s'])} | "
                         f"{rel('prefill_tok_s')} | {rel('decode_b1_tok_s')} | {rel('decode_b8_tok_s')} | "
                         f"{_fmt(r['peak_rss_mib'], 0)} | {size} | {ppl} | {r['float_linears']} | "
                         f"{r['load_avg']} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], rows: dict[str, Row], out: Path) -> None:
    """Per model: decode speedup at batch 1 over fp32 per row; for the real model also PPL against size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, by_row in results.items() if by_row.get("fp32", {}).get("decode_b1_tok_s")]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(7 * (len(models) + 1), 7), squeeze=False)
    colors = {}
    for ax, model in zip(axes[0], models, strict=False):
        harness = results[model]["fp32"].get("harness")  # bars only for rows of the fp32 row's invocation
        by_row = {n: r for n, r in results[model].items() if "error" not in r and r.get("harness") == harness}
        base = by_row["fp32"]["decode_b1_tok_s"]
        names = list(by_row)
        for i, name in enumerate(names):
            library = rows[name].library
            color = colors.setdefault(library, f"C{len(colors)}")
            ax.barh(i, by_row[name]["decode_b1_tok_s"] / base, color=color)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("decode tokens/s at batch 1, vs fp32 (same run)")
        ax.set_title(model)
    ax = axes[0][-1]
    for model in models:
        for name, r in results[model].items():
            if r.get("ppl") and r.get("checkpoint_mb") and r["ppl"] < 3 * results[model]["fp32"].get("ppl", 0):
                color = colors.setdefault(rows[name].library, f"C{len(colors)}")
                ax.scatter(r["checkpoint_mb"], r["ppl"], color=color)
                ax.annotate(name, (r["checkpoint_mb"], r["ppl"]), fontsize=7)
    ax.set_xlabel("checkpoint MB (rows within 3x of fp32 PPL)")
    ax.set_ylabel("perplexity (test split, GPTQ protocol)")
    ax.set_title("quality against size")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["bundled", "stack"], choices=["bundled", "stack"])
    parser.add_argument("--rows", nargs="*", default=None, help="row names (default: all)")
    parser.add_argument("--merge", action="store_true", help="keep rows of an existing bench/results/peers.json")
    parser.add_argument("--list", action="store_true", help="list the rows and their environments")
    parser.add_argument("--render", action="store_true", help="rewrite the table and chart from peers.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, row, kind = args.child
        print("RESULT" + json.dumps(measure(path, Row(**json.loads(row)), kind == "real")))
        return
    rows = {row.name: row for row in ROWS}
    if args.list:
        for row in ROWS:
            print(f"{row.name:40s} {row.library:14s} {python_for(row.library) or 'MISSING environment'}")
        return
    chosen = [rows[name] for name in (args.rows or rows)]
    previous = RESULTS / "peers.json"
    results: dict[str, dict[str, dict]] = json.loads(previous.read_text())["results"] if (
        (args.merge or args.render) and previous.exists()) else {}
    if args.render:
        chosen = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if "bundled" in args.models and chosen:
            from hfquant.bundled import bundled_model_path
            models["SmolLM2-135M"] = (str(bundled_model_path()), True)
        if "stack" in args.models and chosen:
            models["llama-stack 4x(2048, 5632)"] = (synthetic_checkpoint(Path(tmp) / "stack"), False)
        for model, (path, real) in models.items():
            by_row = results.setdefault(model, {})
            for row in chosen:
                if not real and row.name not in STACK_ROWS:
                    continue  # the stack has random weights: no quality rows, no calibration
                by_row[row.name] = run_row(path, row, real)
                print(model, row.name, json.dumps(by_row[row.name])[:400], flush=True)
    config = {"prefill_tokens": PREFILL_TOKENS, "prompt_tokens": PROMPT_TOKENS, "decode_steps": DECODE_STEPS,
              "ppl": {"protocol": "gptq", "seqlen": PPL_SEQLEN, "tokens": PPL_TOKENS}, "calibration": CALIBRATION,
              "stack": STACK, "rows": {name: asdict(row) for name, row in rows.items()}}
    intro = (f"CPU ({os.cpu_count()} cores), torch threads as each row reports; each row in a fresh process. "
             f"Prefill: one {PREFILL_TOKENS}-token prompt, best of 3. Decode: median single-token step with a KV cache "
             f"after a {PROMPT_TOKENS}-token prompt (batch 1: {DECODE_STEPS[1]} steps, batch 8: {DECODE_STEPS[8]}). "
             f"PPL: GPTQ protocol, {PPL_TOKENS} test-split tokens in windows of {PPL_SEQLEN}. Calibrated rows: "
             f"{CALIBRATION['num_samples']} x {CALIBRATION['seqlen']} train-split tokens. 'load avg' above ~2 on "
             "this 2-core machine means other processes competed. (†): measured in an earlier invocation, by the first "
             "version of this harness (it also sampled memory from a thread); no ratio is given against "
             "the fp32 row of the later invocation.\n\n")
    env = json.loads(previous.read_text())["env"] if args.render else environment()
    write_results("peers", {"env": env, "config": config, "results": results}, intro + table(results, rows))
    plot(results, rows, RESULTS / "peers.png")


if __name__ == "__main__":
    main()
