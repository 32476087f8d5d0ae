"""Automatic bit allocation against uniform formats and naive mixes at equal stored size, on a real model.

    python bench/mixed.py --budgets 2.5 3.25 4.25 --max-tokens 8192

Rows (each in its own process, all scored on the same test tokens against the float model):

* ``uniform:<spec>`` — every layer in one format (int2-g64 = 2.5, int3-g128 = 3.25, int4-g128 = 4.25
  stored bits/weight with their fp16 scales and zero points);
* ``auto:<bits>`` — ``HfQuantConfig(target_bits=bits, candidates=...)``: per-layer formats from the
  measured sensitivity (calibration on the train split);
* ``naive:<bits>`` — the usual hand-made mix: the first and last decoder blocks in int8, every other
  layer in the largest candidate that fits what is left, then upgraded one step at a time in model
  order while the budget allows (so it stores as much as the automatic plan, within one layer).

All rows round with RTN (the allocation is what is compared, not the rounding method). Also measured:
how the sensitivity proxy ranks layers against the end-to-end KL of quantizing that layer alone
(Spearman's rho over a sample of layers). Writes ``bench/results/<name>.{json,md,png}``; the plot
shows bits by depth for each automatic plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, run_rows_persisted, write_results  # noqa: E402

CANDIDATES = ["int2-g64", "int3-g128", "int4-g128", "int8"]
UNIFORM = {2.5: "int2-g64", 3.25: "int3-g128", 4.25: "int4-g128"}


def _layers(model) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    """Name -> (in, out) of the layers quantized by default (the output head stays float)."""
    from hfquant.hf.integration import linear_layers, linear_shape

    head = model.get_output_embeddings()
    return {name: linear_shape(m) for name, m in linear_layers(model) if m is not head}


def naive_rules(layers: dict[str, tuple[int, int]], budget_bits: float, num_blocks: int) -> dict[str, str]:
    """First and last blocks int8; the rest at the largest candidate that fits, then upgraded in model order."""
    from hfquant.formats import parse_spec

    formats = [parse_spec(c) for c in CANDIDATES]
    size = {n: [f.stored_bits(o, i) for f in formats] for n, (i, o) in layers.items()}
    edge = {f".layers.{0}.", f".layers.{num_blocks - 1}."}
    fixed = {n: len(formats) - 1 for n in layers if any(e in n for e in edge)}
    budget = budget_bits * sum(i * o for i, o in layers.values()) - sum(size[n][k] for n, k in fixed.items())
    rest = [n for n in layers if n not in fixed]
    level = max((k for k in range(len(formats)) if sum(size[n][k] for n in rest) <= budget), default=None)
    if level is None:
        raise ValueError(f"the first and last blocks in int8 leave too little of {budget_bits} bits/weight "
                         "for the other layers at the smallest candidate")
    choice = {**fixed, **{n: level for n in rest}}
    used = sum(size[n][k] for n, k in choice.items() if n in rest)
    for name in rest:
        if choice[name] + 1 < len(formats):
            extra = size[name][choice[name] + 1] - size[name][choice[name]]
            if used + extra <= budget:
                choice[name] += 1
                used += extra
    return {name: CANDIDATES[k] for name, k in choice.items()}


def run_row(args: argparse.Namespace, row: str) -> dict:
    """Quantize and score one row in this process."""
    from transformers import AutoTokenizer

    from hfquant import workflows
    from hfquant.calibration.data import calibration_batches
    from hfquant.formats import parse_spec
    from hfquant.nn.qlinear import QuantLinear

    path = workflows.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = workflows.EvalSettings(seqlen=args.seqlen, max_tokens=args.max_tokens, protocols=("gptq",),
                                      progress=False)
    ids = workflows.eval_tokens(tokenizer, settings)
    base = workflows.load(path)[0]
    kind, _, value = row.partition(":")
    calib = calibration_batches(tokenizer, None, num_samples=args.num_samples, seqlen=args.calib_seqlen, seed=0)
    if kind == "rank":
        return {"row": row, "rank": rank_check(base, ids[: args.rank_tokens], args, calib)}
    kwargs = None
    if kind == "uniform":
        kwargs = workflows.parse_spec(value)
    elif kind == "auto":
        kwargs = {"target_bits": float(value), "candidates": CANDIDATES, "dataset": calib}
    elif kind == "naive":
        rules = naive_rules(_layers(base), float(value), base.config.num_hidden_layers)
        kwargs = {"format": parse_spec(CANDIDATES[0]).to_dict(), "rules": {n: parse_spec(s).to_dict()
                                                                          for n, s in rules.items()}}
    result: dict = {"row": row}
    if kwargs is None:
        model, seconds = base, 0.0
    else:
        model, seconds = workflows.load(path, kwargs)
    report = workflows.evaluate(model, ids, settings, model_id=path, config={"format": row},
                                base=None if kwargs is None else base, quantize_seconds=seconds)
    result["report"] = report.to_dict()
    result["plan"] = {n: m.scheme.weight.code_bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return result


def rank_check(base, ids, args: argparse.Namespace, calib) -> dict:  # noqa: ANN001
    """Spearman's rho between the proxy (int2-g64 output error) and the KL of quantizing one layer alone."""
    import copy

    import torch

    from hfquant.algorithms import get_method
    from hfquant.evaluation.drift import drift
    from hfquant.formats import parse_spec
    from hfquant.hf.integration import float_weight, quantize_layer_in_place
    from hfquant.schemes import LayerScheme
    from hfquant.sensitivity import measure_sensitivity

    fmt = parse_spec(CANDIDATES[0])
    rtn = get_method("rtn")
    names = list(_layers(base))
    sample = names[:: max(1, len(names) // args.rank_layers)][: args.rank_layers]
    probe_model = copy.deepcopy(base)
    proxies = {}
    for weighted in (True, False):
        errors = measure_sensitivity(probe_model, list(calib.split(8)),
                                     {n: probe_model.get_submodule(n) for n in sample}, [fmt],
                                     lambda w, f: rtn.quantize(w, f, rtn.options()), float_weight, fisher=weighted,
                                     progress=False)
        proxies["fisher" if weighted else "unweighted"] = torch.tensor([errors[n][0] for n in sample])
    del probe_model
    measured = {}
    for name in sample:
        model = copy.deepcopy(base)
        weight = float_weight(model.get_submodule(name)).detach().float()
        quantize_layer_in_place(model, name, rtn.quantize(weight, fmt, rtn.options()), LayerScheme(fmt))
        measured[name] = drift(model, base, ids, seqlen=args.seqlen, progress=False).mean_kl
        del model
    kl = torch.tensor([measured[n] for n in sample])
    rho = {k: float(torch.corrcoef(torch.stack([_ranks(v), _ranks(kl)]))[0, 1]) for k, v in proxies.items()}
    return {"layers": sample, "proxy": {k: v.tolist() for k, v in proxies.items()}, "kl": kl.tolist(),
            "spearman_rho": rho}


def _ranks(values):  # noqa: ANN001, ANN202
    import torch

    return torch.argsort(torch.argsort(values)).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mixed")
    parser.add_argument("--model", default=None)
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.25, 4.25])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--rank-layers", type=int, default=16, help="layers in the proxy-vs-KL rank check (0: skip)")
    parser.add_argument("--rank-tokens", type=int, default=2048)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print("ROW" + json.dumps(run_row(args, args.row)))
        return

    from hfquant.evaluation import EvalReport, markdown_table

    rows = ["fp32"]
    for budget in args.budgets:
        rows += [f"uniform:{UNIFORM[budget]}"] if budget in UNIFORM else []
        rows += [f"auto:{budget}", f"naive:{budget}"]
    rows += ["rank"] if args.rank_layers else []
    results, loads = run_rows_persisted(__file__, sys.argv[1:], rows, args.name)
    ok = [r for r in results if "report" in r]
    ranks = [r["rank"] for r in results if "rank" in r]
    reports = [EvalReport.from_dict(r["report"]) for r in ok]
    lines = [f"RTN rounding in every row; eval: {args.max_tokens} test tokens in windows of {args.seqlen}; "
             f"allocation calibrated on {args.num_samples} x {args.calib_seqlen} train tokens; candidates "
             f"{CANDIDATES}; load average before each row: {loads}", "", markdown_table(reports, baseline=reports[0])]
    if ranks:
        rho = ranks[0]["spearman_rho"]
        lines += ["", f"Sensitivity proxy vs end-to-end KL of that layer alone ({len(ranks[0]['layers'])} layers, "
                      f"int2-g64, {args.rank_tokens} tokens): Spearman's rho = {rho['fisher']:.3f} (Fisher-weighted, "
                      f"the allocator's), {rho['unweighted']:.3f} (unweighted output error)"]
    lines += [f"- {r['row']}: failed: {r['error'].splitlines()[-1] if r['error'] else '?'}" for r in results
              if "error" in r]
    payload = {"env": environment(), "args": vars(args), "rows": results}
    write_results(args.name, payload, "\n".join(lines))
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    plot_plans([r for r in ok if r["row"].startswith("auto:")], RESULTS / f"{args.name}.png")


def plot_plans(rows: list[dict], path: Path) -> None:
    """Code bits of every layer, in model order, one line per automatic plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for r in rows:
        bits = list(r["plan"].values())
        ax.step(range(len(bits)), bits, where="mid", label=f"target {r['row'].split(':')[1]} bits/weight")
    ax.set_xlabel("layer (model order: q, k, v, o, gate, up, down per block)")
    ax.set_ylabel("code bits")
    ax.set_yticks([2, 3, 4, 8])
    ax.legend()
    ax.set_title("Automatic allocation: bits by depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
