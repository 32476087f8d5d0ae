"""Quality and cost of quantization on a real model: one row per configuration, each in its own process.

    python bench/quality.py --name rtn_quality --specs int8 int4-g128 int3-g128 int2-g64
    python bench/quality.py --name gptq_vs_rtn --specs int4-g128 gptq:int4-g128 int3-g128 gptq:int3-g128 ...
    python bench/quality.py --name w8a8 --specs "int8;activations=int8-dynamic" \
        "int8;activations=int8-dynamic;smoothquant=0.5" "awq:int4-g128;solver=gptq"

A spec is ``[method:]format-spec`` optionally followed by ``;field=value`` pairs of further
``HfQuantConfig`` keyword arguments (values parsed as JSON where they parse, else kept as text).

Every row is scored on the same tokens (the bundled corpus's test split, or --dataset) with both
perplexity protocols, KL divergence and top-1 agreement against the float model; rows record
stored bits per weight, quantize time and peak memory of the quantize step. GPTQ rows calibrate
on the train split with the same samples (every row whose config needs data: GPTQ, AWQ, SmoothQuant). Writes ``bench/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, PeakMemory, environment, run_row_process, write_results  # noqa: E402


def spec_kwargs(spec: str) -> dict:
    """``"[method:]format-spec;field=value;..."`` → HfQuantConfig keyword arguments."""
    from hfquant import workflows

    head, *pairs = spec.split(";")
    kwargs = workflows.parse_spec(head)
    for pair in pairs:
        field, _, text = pair.partition("=")
        try:
            kwargs[field.strip()] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[field.strip()] = text.strip()
    return kwargs


def run_row(args: argparse.Namespace, spec: str) -> dict:
    """Quantize and evaluate one configuration in this process (called in a child process)."""
    import torch
    from transformers import AutoTokenizer

    from hfquant import HfQuantConfig, workflows

    path = workflows.resolve_model(args.model)
    settings = workflows.EvalSettings(dataset=args.dataset, seqlen=args.seqlen, stride=args.stride,
                                      max_tokens=args.max_tokens, batch_size=args.batch_size, progress=False,
                                      protocols=tuple(args.protocols))
    ids = workflows.eval_tokens(AutoTokenizer.from_pretrained(path), settings)
    kwargs = None
    if spec != "fp32":
        kwargs = spec_kwargs(spec)
        if HfQuantConfig(**kwargs).calibrated:
            kwargs.update(num_samples=args.num_samples, seqlen=args.calib_seqlen, seed=0, dataset=args.dataset)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as peak:
        model, seconds = workflows.load(path, kwargs, device_map=args.device)
    row = {"spec": spec, "quantize_peak_anon_mib": peak.peak_anon_mib, "quantize_peak_rss_mib": peak.peak_rss_mib()}
    if torch.cuda.is_available():
        row["quantize_peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    base = workflows.load(path, device_map=args.device)[0] if kwargs else None
    report = workflows.evaluate(model, ids, settings, model_id=path, config={"format": spec}, base=base,
                                quantize_seconds=seconds if kwargs else None)
    row["report"] = report.to_dict()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="results file stem under bench/results/")
    parser.add_argument("--specs", nargs="+", required=True, help="fp32 is always added first")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--protocols", nargs="+", default=["gptq", "strided"],
                        help="perplexity protocols (with --stride equal to --seqlen they agree: one is enough)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=2048)
    parser.add_argument("--device", default=None, help="device_map for from_pretrained, e.g. cuda")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    if args.row:
        print("ROW" + json.dumps(run_row(args, args.row)))
        return

    from hfquant.evaluation import EvalReport, markdown_table, plot_ppl_vs_size

    rows = []
    for spec in ["fp32", *args.specs]:
        rows.append(run_row_process(__file__, sys.argv[1:], spec, key="spec"))
    ok = [r for r in rows if "report" in r]
    reports = [EvalReport.from_dict(r["report"]) for r in ok]
    table = markdown_table(reports, baseline=reports[0])
    memory = ["| config | quantize peak anon MiB | quantize peak RSS MiB |" +
              (" quantize peak CUDA MiB |" if any("quantize_peak_cuda_mib" in r for r in ok) else ""),
              "|---|---|---|" + ("---|" if any("quantize_peak_cuda_mib" in r for r in ok) else "")]
    for r in ok:
        cuda = f" {r['quantize_peak_cuda_mib']:.0f} |" if "quantize_peak_cuda_mib" in r else ""
        memory.append(f"| {r['spec']} | {r['quantize_peak_anon_mib']:.0f} | {r['quantize_peak_rss_mib']:.0f} |{cuda}")
    failed = [f"- {r['spec']}: failed: {r['error'].splitlines()[-1] if r['error'] else '?'}" for r in rows
              if "error" in r]
    settings = (f"eval: seqlen={args.seqlen}, stride={args.stride}, max_tokens={args.max_tokens}; "
                f"gptq calibration: {args.num_samples} x {args.calib_seqlen} tokens, seed 0; device={args.device}")
    text = "\n".join([settings, "", table, "\n".join(memory), *failed])
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    if reports:
        plot_ppl_vs_size(reports, out / f"{args.name}.png")
    payload = {"env": environment(), "args": vars(args), "rows": rows}
    if args.out:
        (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
        (out / f"{args.name}.md").write_text(text + "\n")
        print(text)
    else:
        write_results(args.name, payload, text)


if __name__ == "__main__":
    main()
