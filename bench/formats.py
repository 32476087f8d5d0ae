"""Weight formats side by side on two real models: the bundled causal LM and the bundled float32 encoder.

    python bench/formats.py --specs fp32 int8 int4-g128 nf4-g64 fp8 ternary binary bf16 fp16 \\
        gptq:int4-g128 mixed:rules.json

Each spec is one row; ``fp32`` (the unquantized model) is the baseline and is added first when missing.
Other specs become ``HfQuantConfig`` keyword arguments through ``hfquant.workflows.parse_spec``, except
``mixed:<rules.json>``, which is ``{"format": "int4", "group_size": 128, "rules": <the JSON file>}``. The
keyword arguments are passed on as they are (calibrated methods get ``--num-samples`` x
``--calib-seqlen`` tokens, seed 0, on the bundled corpus's train split, as in ``bench/quality.py``).

Every row runs in two fresh processes, one per model:

- causal: SmolLM2-135M-Instruct (``hfquant.bundled.bundled_model_path``; its float32 weights are
  dequantized Q4_1, i.e. already on a 4-bit grid with groups of 32, so 4-bit formats aligned to groups of
  32 can look lossless; rows here use other group sizes, and the caveat goes with the results). Stored
  bits per weight (``hfquant.stats.storage_stats``), checkpoint MB (``save_pretrained`` into a temporary
  folder, ``hfquant.stats.checkpoint_bytes``), perplexity under both protocols (``workflows.evaluate``
  on the first ``--max-tokens`` tokens of the bundled Brown test split, ``--seqlen`` windows, strided
  protocol with ``--stride``), mean KL(fp32 || row), p99 KL and top-1 agreement (``evaluation.drift``),
  the standard errors of the mean KL (``DriftResult``: over tokens and over windows), quantize seconds.
- encoder: all-MiniLM-L6-v2 (``hfquant.bundled.bundled_encoder_path``, trained and stored in float32),
  the same quantization keyword arguments through ``AutoModel.from_pretrained``; mean / min / p01 cosine
  of each sentence embedding to the float model's and agreement of the pairwise-similarity matrices on
  the first ``--sentences`` sentences of the Brown test split (``hfquant.evaluation.embedding_drift``).

Each process records the load average when it starts and ends (timings on a busy machine are slower).
Writes ``bench/results/<out-name>.{json,md,png}``; the PNG has mean KL (causal) and 1 - mean cosine
(encoder) against stored bits per weight, both on log scales.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout's hfquant

from _common import RESULTS, PeakMemory, environment, load_average, write_results  # noqa: E402

BASELINE = "fp32"
MIXED_PREFIX = "mixed:"
PARTS = ("causal", "encoder")
MARKER = "HFQUANT_FORMATS_ROW "  # starts the child's result line on stdout
GRID_CAVEAT = ("SmolLM2's float32 weights are its GGUF's Q4_1 values dequantized (4-bit grid, groups of 32 "
               "along the input); 4-bit formats aligned to it can look lossless there. The encoder "
               "(all-MiniLM-L6-v2) was trained and stored in float32 and never sat on a grid.")


def spec_kwargs(spec: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """``HfQuantConfig`` keyword arguments of a row; ``None`` for the fp32 baseline."""
    from hfquant import workflows

    if spec == BASELINE:
        return None
    if spec.startswith(MIXED_PREFIX):
        rules_path = Path(spec[len(MIXED_PREFIX):])
        kwargs = {"format": "int4", "group_size": 128, "rules": json.loads(rules_path.read_text())}
    else:
        kwargs = workflows.parse_spec(spec)
    if kwargs.get("method") == "gptq":
        kwargs.update(num_samples=args.num_samples, seqlen=args.calib_seqlen, seed=0)
    return kwargs


def run_causal(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """One row on the bundled causal model (runs in a child process)."""
    import torch
    from transformers import AutoTokenizer

    from hfquant import workflows
    from hfquant.stats import checkpoint_bytes, storage_stats

    path = workflows.resolve_model(args.model)
    settings = workflows.EvalSettings(seqlen=args.seqlen, stride=args.stride, max_tokens=args.max_tokens,
                                      progress=False)
    ids = workflows.eval_tokens(AutoTokenizer.from_pretrained(path), settings)
    kwargs = spec_kwargs(spec, args)
    row: dict[str, Any] = {"model": path, "kwargs": kwargs, "num_eval_tokens": len(ids)}
    with PeakMemory() as peak:
        model, seconds = workflows.load(path, kwargs, device_map=args.device)
    row.update(quantize_seconds=seconds if kwargs else None, load_seconds=seconds,
               quantize_peak_rss_mib=peak.peak_rss_mib(), quantize_peak_anon_mib=peak.peak_anon_mib)
    row["storage"] = storage_stats(model).to_dict()
    with tempfile.TemporaryDirectory(prefix="hfquant-formats-") as folder:
        start = time.perf_counter()
        model.save_pretrained(folder)
        row.update(save_seconds=time.perf_counter() - start, checkpoint_bytes=checkpoint_bytes(folder))
    base = workflows.load(path, device_map=args.device)[0] if kwargs else None
    start = time.perf_counter()
    report = workflows.evaluate(model, ids, settings, model_id=path, config={"format": spec}, base=base,
                                quantize_seconds=row["quantize_seconds"])
    row["report"] = report.to_dict()
    row["bits_per_weight"] = report.bits_per_weight
    row["eval_seconds"] = time.perf_counter() - start
    if torch.cuda.is_available():
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_encoder(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """One row on the bundled float32 encoder (runs in a child process)."""
    from transformers import AutoModel, AutoTokenizer

    import hfquant
    from hfquant.bundled import bundled_encoder_path
    from hfquant.evaluation import embedding_drift, test_sentences
    from hfquant.stats import storage_stats

    path = bundled_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = test_sentences(args.sentences)
    kwargs = spec_kwargs(spec, args)
    base = AutoModel.from_pretrained(path, device_map=args.device).eval()
    row: dict[str, Any] = {"model": str(path), "kwargs": kwargs}
    if kwargs is None:
        model, seconds = base, None
    else:
        start = time.perf_counter()
        model = AutoModel.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(**kwargs),
                                          device_map=args.device).eval()
        seconds = time.perf_counter() - start
    stats = storage_stats(model)
    row.update(quantize_seconds=seconds, storage=stats.to_dict(),
               bits_per_weight=stats.bits_per_weight if stats.quantized_layers
               else 8.0 * next(model.parameters()).element_size())
    start = time.perf_counter()
    row["drift"] = embedding_drift(model, base, tokenizer, sentences, batch_size=32, max_length=128).to_dict()
    row["eval_seconds"] = time.perf_counter() - start
    return row


def run_part(args: argparse.Namespace) -> dict[str, Any]:
    start, load_start = time.perf_counter(), load_average()
    row = (run_causal if args.part == "causal" else run_encoder)(args, args.row)
    return {**row, "load_average_start": load_start, "load_average_end": load_average(),
            "wall_seconds": time.perf_counter() - start}


def _f(value: Any, template: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else template.format(value)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def _load(part: dict[str, Any]) -> str:
    return f"{part['load_average_start'][0]:.1f} → {part['load_average_end'][0]:.1f}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    causal = [(r["spec"], r["causal"]) for r in rows if "error" not in r["causal"]]
    encoder = [(r["spec"], r["encoder"]) for r in rows if "error" not in r["encoder"]]
    base_ppl = next((part["report"]["perplexity"] for spec, part in causal if spec == BASELINE), {})
    lines = [
        (f"Causal: bundled SmolLM2-135M-Instruct, first {args.max_tokens} tokens of the Brown test split, "
         f"seqlen {args.seqlen} (gptq protocol: non-overlapping windows; strided: stride {args.stride}); KL and "
         f"top-1 against fp32 on the non-overlapping windows. Encoder: bundled all-MiniLM-L6-v2, first "
         f"{args.sentences} Brown test sentences (>= 5 words), mean-pooled, max_length 128. GPTQ rows: "
         f"{args.num_samples} x {args.calib_seqlen} calibration tokens, seed 0. device={args.device}."),
        "",
        f"Caveat: {GRID_CAVEAT}",
        "",
        ("| row | bits/weight | checkpoint MB | PPL (gptq) | ΔPPL (gptq) | PPL (strided) | ΔPPL (strided) | "
         "mean KL ± SE | SE (windows) | median KL | p99 KL | max KL | top-1 ± SE | mean Δp ± SE | "
         "PPL ratio ± SE | quantize s | load avg 1 min |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, part in causal:
        report = part["report"]
        ppl = {protocol: result["ppl"] for protocol, result in report["perplexity"].items()}
        deltas = {p: ppl[p] - base_ppl[p]["ppl"] if p in base_ppl and p in ppl else None for p in ppl}
        drift = report["drift"] or {}
        lines.append(
            f"| {spec} | {_f(part['bits_per_weight'], '{:.3f}')} | {part['checkpoint_bytes'] / 1e6:.2f} | "
            f"{_f(ppl.get('gptq'), '{:.3f}')} | {_f(deltas.get('gptq'), '{:+.3f}')} | "
            f"{_f(ppl.get('strided'), '{:.3f}')} | {_f(deltas.get('strided'), '{:+.3f}')} | "
            f"{_pm(drift, 'mean_kl', '{:.5f}')} | {_f(drift.get('mean_kl_stderr_windows'), '{:.5f}')} | "
            f"{_f(drift.get('median_kl'), '{:.4f}')} | {_f(drift.get('p99_kl'), '{:.4f}')} | "
            f"{_f(drift.get('max_kl'), '{:.3f}')} | {_pm(drift, 'top1_agreement', '{:.2%}')} | "
            f"{_pm(drift, 'mean_delta_p', '{:+.2%}')} | {_pm(drift, 'ppl_ratio', '{:.4f}')} | "
            f"{_f(part['quantize_seconds'], '{:.1f}')} | {_load(part)} |")
    lines += [
        "",
        ("| row | bits/weight | mean cos | min cos | p01 cos | 1 − mean cos | similarity Pearson | "
         "similarity Spearman | similarity mean abs diff | quantize s | load avg 1 min |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, part in encoder:
        d = part["drift"]
        lines.append(
            f"| {spec} | {_f(part['bits_per_weight'], '{:.3f}')} | {d['mean_cosine']:.5f} | {d['min_cosine']:.5f} | "
            f"{d['p01_cosine']:.5f} | {max(0.0, 1 - d['mean_cosine']):.2e} | {d['similarity_pearson']:.5f} | "
            f"{d['similarity_spearman']:.5f} | {d['similarity_mean_abs_diff']:.5f} | "
            f"{_f(part['quantize_seconds'], '{:.1f}')} | {_load(part)} |")
    lines += ["", ("SE: standard error over tokens (tokens as independent, as llama.cpp's perplexity tool); "
                   f"SE (windows): of the mean KL over the per-window means of the {args.seqlen}-token windows. "
                   "mean Δp: the change of the correct next token's probability; PPL ratio: PPL(row)/PPL(fp32) "
                   "on the same targets (SE by the delta method). Load average: 1-minute value when the row's "
                   "process started → ended.")]
    failed = [f"- {r['spec']} ({part}): {_last_line(r[part]['error'])}" for r in rows for part in PARTS
              if "error" in r[part]]
    return "\n".join(lines + (["", "Failed rows:", *failed] if failed else []))


def _pm(drift: dict[str, Any], key: str, template: str) -> str:
    """``value ± SE`` of a drift statistic (its ``<key>_stderr``), or the value alone."""
    value, error = drift.get(key), drift.get(f"{key}_stderr")
    if value is None:
        return "–"
    return template.format(value) + ("" if error is None else " ± " + template.format(error).lstrip("+"))


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two panels against stored bits/weight: causal mean KL and encoder 1 - mean cosine, log y."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.5), dpi=130)
    FigureCanvasAgg(figure)
    causal_axes, encoder_axes = figure.subplots(1, 2)
    panels = [
        (causal_axes, "causal", lambda p: p["report"]["drift"] and p["report"]["drift"]["mean_kl"],
         lambda p: (p["report"].get("drift") or {}).get("mean_kl_stderr"), "mean KL(fp32 ‖ row), nats/token (bars: ± SE over tokens)",
         "SmolLM2-135M (weights on a Q4_1 grid): KL vs fp32"),
        (encoder_axes, "encoder", lambda p: 1 - p["drift"]["mean_cosine"], lambda p: None,
         "1 − mean cosine to fp32 embedding", "all-MiniLM-L6-v2 (float32): embedding drift"),
    ]
    for axes, part, value, error, ylabel, title in panels:
        points = [(r[part]["bits_per_weight"], value(r[part]), error(r[part]), r["spec"]) for r in rows
                  if "error" not in r[part] and r["spec"] != BASELINE]
        points = [p for p in points if p[1] is not None and p[1] > 0 and math.isfinite(p[0])]
        if points:
            bits, values, errors, labels = zip(*points)
            axes.errorbar(bits, values, yerr=[e or 0 for e in errors], fmt="o", capsize=3)
            for x, y, text in zip(bits, values, labels):
                axes.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
            axes.set_yscale("log")
            axes.margins(x=0.15, y=0.15)
        else:
            axes.text(0.5, 0.5, "no rows to plot", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel("stored bits per quantized weight (scales included)")
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3, which="both")
    figure.suptitle("Weight formats: drift from fp32 vs storage (fp32 itself is 0, not shown)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", required=True,
                        help="rows: fp32, parse_spec specs (int8, int4-g128, gptq:int4-g128, ...), mixed:<rules.json>")
    parser.add_argument("--out-name", default="formats", help="results file stem under bench/results/")
    parser.add_argument("--model", default=None, help="causal model (default: the bundled SmolLM2-135M)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256, help="strided protocol only")
    parser.add_argument("--sentences", type=int, default=256, help="Brown test sentences for the encoder")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration samples (calibrated methods)")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration sample length (<= 512: BERT)")
    parser.add_argument("--device", default=None, help="device_map for from_pretrained, e.g. cuda")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print("\n" + MARKER + json.dumps(run_part(args)))
        return

    specs = list(dict.fromkeys([BASELINE, *args.specs]))
    for spec in specs:  # fail early on a spec that cannot become kwargs (a missing rules file, a typo)
        if spec.startswith(MIXED_PREFIX) and not Path(spec[len(MIXED_PREFIX):]).is_file():
            parser.error(f"{spec}: no such rules file")
    environment_start = {**environment(), "load_average": load_average()}
    rows = []
    for spec in specs:
        row: dict[str, Any] = {"spec": spec}
        for part in PARTS:
            command = [sys.executable, __file__, *sys.argv[1:], "--row", spec, "--part", part]
            proc = subprocess.run(command, check=False, capture_output=True, text=True)
            results = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
            if proc.returncode != 0 or not results:
                row[part] = {"error": proc.stderr[-3000:], "returncode": proc.returncode}
                print(f"{spec} {part}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            else:
                row[part] = json.loads(results[-1][len(MARKER):])
                print(f"{spec} {part}: done in {row[part]['wall_seconds']:.0f} s", file=sys.stderr)
        rows.append(row)
    payload = {"env": environment_start, "env_end": {"load_average": load_average()}, "args": vars(args),
               "caveat": GRID_CAVEAT, "rows": rows}
    write_results(args.out_name, payload, markdown(rows, args))
    plot(rows, RESULTS / f"{args.out_name}.png")


if __name__ == "__main__":
    main()
