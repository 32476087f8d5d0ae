"""QAT against PTQ on a real model: the same training budget for every QAT row, each row in its own process.

    python bench/qat.py --formats int3-g128 ternary --steps 200 --batch-size 4 --train-seqlen 256

Per format: ``rtn`` (PTQ, no data), ``gptq`` (PTQ, calibrated on the train split), ``qat`` (fake-quantized
training with cross-entropy, then ``hfquant.qat.convert``) and ``qat-distill`` (KL to the float model's
logits). Every row is scored on the same test tokens (KL and top-1 against the float model, perplexity);
QAT rows also record the training wall time and the loss curve. Writes ``bench/results/<name>.{json,md,png}``
(the png: loss curves), persisting finished rows to ``<name>.partial.json`` as it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, run_rows_persisted, write_results  # noqa: E402

KINDS = ("rtn", "gptq", "qat", "qat-distill")


def run_row(args: argparse.Namespace, row: str) -> dict:
    """One ``FORMAT:KIND`` row (or ``fp32``), in this process (called in a child process)."""
    import torch
    from transformers import AutoTokenizer

    from hfquant import qat, workflows
    from hfquant.calibration.data import load_text
    from hfquant.evaluation.perplexity import tokenize_corpus
    from hfquant.qat import train as qat_train

    torch.manual_seed(0)
    path = workflows.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = workflows.EvalSettings(seqlen=args.seqlen, stride=args.seqlen, max_tokens=args.max_tokens,
                                      batch_size=1, progress=False)
    ids = workflows.eval_tokens(tokenizer, settings)
    out: dict = {"row": row}
    if row == "fp32":
        model = workflows.load(path)[0]
        out["report"] = workflows.evaluate(model, ids, settings, model_id=path, config={"format": "fp32"}).to_dict()
        return out
    spec, kind = row.rsplit(":", 1)
    kwargs = workflows.parse_spec(spec)
    if kind == "gptq":
        kwargs.update(method="gptq", num_samples=args.num_samples, seqlen=args.calib_seqlen, seed=0)
    if kind.startswith("qat"):
        kwargs.update(qat=True)
    model, seconds = workflows.load(path, kwargs)
    base = workflows.load(path)[0]
    if kind.startswith("qat"):
        train_ids = tokenize_corpus(tokenizer, load_text(None, split="train"))
        teacher = base if kind == "qat-distill" else None
        result = qat_train.train(model, train_ids, args.steps, args.batch_size, args.train_seqlen, args.lr, teacher,
                                 seed=0, progress=False)
        model = qat.convert(model)
        out.update(train_seconds=result.seconds, losses=result.losses)
    report = workflows.evaluate(model, ids, settings, model_id=path, config={"format": row}, base=base,
                                quantize_seconds=seconds)
    out["report"] = report.to_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="qat", help="results file stem under bench/results/")
    parser.add_argument("--formats", nargs="+", default=["int4-g128", "int3-g128", "int2-g64", "ternary", "binary"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seqlen", type=int, default=512, help="evaluation window")
    parser.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens (test split)")
    parser.add_argument("--num-samples", type=int, default=32, help="GPTQ calibration samples")
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--from-partial", action="store_true",
                        help="write the results of the rows finished so far (<name>.partial.json) and stop")
    parser.add_argument("--merge", action="store_true",
                        help="keep the finished rows of bench/results/<name>.json (same budget) and run only the others")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print("ROW" + json.dumps(run_row(args, args.row)))
        return
    if args.from_partial:
        partial = json.loads((RESULTS / f"{args.name}.partial.json").read_text())
        results, loads = partial["rows"], partial.get("loads", "not recorded")
    else:
        rows = ["fp32", *(f"{fmt}:{kind}" for fmt in args.formats for kind in args.kinds)]
        kept, kept_loads = rows_to_keep(args) if args.merge else ([], [])
        rows = [row for row in rows if row not in {r["row"] for r in kept}]
        results, loads = run_rows_persisted(__file__, sys.argv[1:], rows, args.name)
        results, loads = kept + results, kept_loads + loads
    write_report(args, results, loads)
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)


BUDGET_ARGS = ("steps", "batch_size", "train_seqlen", "lr", "seqlen", "max_tokens", "num_samples", "calib_seqlen")


def rows_to_keep(args: argparse.Namespace) -> tuple[list[dict], list]:
    """The finished rows of ``bench/results/<name>.json`` (``--merge``), if they ran on the same budget."""
    previous = RESULTS / f"{args.name}.json"
    if not previous.exists():
        return [], []
    saved = json.loads(previous.read_text())
    differing = [k for k in BUDGET_ARGS if saved["args"].get(k) != getattr(args, k)]
    if differing:
        raise SystemExit(f"--merge: {previous} ran with other {differing}; a table needs one budget for every row")
    rows = [r for r in saved["rows"] if "report" in r]
    loads = saved.get("loads", [None] * len(saved["rows"]))
    return rows, [load for r, load in zip(saved["rows"], loads) if "report" in r]


def write_report(args: argparse.Namespace, results: list[dict], loads: object) -> None:
    """``bench/results/<name>.{json,md,png}`` of the finished rows."""
    from hfquant.evaluation import EvalReport, markdown_table

    ok = [r for r in results if "report" in r]
    reports = [EvalReport.from_dict(r["report"]) for r in ok]
    budget = (f"QAT budget per row: {args.steps} steps x batch {args.batch_size} x {args.train_seqlen} tokens "
              f"({args.steps * args.batch_size * args.train_seqlen} train tokens), Adam lr {args.lr}; eval: "
              f"{args.max_tokens} test tokens in windows of {args.seqlen}; GPTQ: {args.num_samples} x "
              f"{args.calib_seqlen} train tokens; load average before each row: {loads}")
    training = ["| row | train s | first loss | last loss (mean of last 10) |", "|---|---|---|---|"]
    training += [f"| {r['row']} | {r['train_seconds']:.0f} | {r['losses'][0]:.4f} | "
                 f"{sum(r['losses'][-10:]) / len(r['losses'][-10:]):.4f} |" for r in ok if "losses" in r]
    failed = [f"- {r['row']}: failed: {r['error'].splitlines()[-1] if r['error'] else '?'}" for r in results
              if "error" in r]
    text = "\n".join([budget, "", markdown_table(reports, baseline=reports[0]), "", *training, *failed])
    write_results(args.name, {"env": environment(), "args": vars(args), "rows": results, "loads": loads}, text)
    plot_losses([r for r in ok if "losses" in r], RESULTS / f"{args.name}.png")


def plot_losses(rows: list[dict], path: Path) -> None:
    """Training loss by step (a 10-step running mean), one line per QAT row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        losses = r["losses"]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=r["row"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
