"""Human-readable summaries of evaluation reports: a markdown table and a PPL-vs-size plot."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hfquant.evaluation.results import EvalReport

MISSING = "–"


def markdown_table(reports: list[EvalReport], baseline: EvalReport | None = None) -> str:
    """One row per report; PPL columns per protocol present, ΔPPL columns only when ``baseline`` is given.

    ``baseline`` only provides the reference for ΔPPL; include it in ``reports`` to give it a row. Sizes are in
    MB (10^6 bytes).
    """
    protocols = list(dict.fromkeys(protocol for report in reports for protocol in report.perplexity))
    header = ["config", "bits/weight", "size (MB)"]
    for protocol in protocols:
        header.append(f"PPL ({protocol})")
        if baseline is not None:
            header.append(f"ΔPPL ({protocol})")
    header += ["mean KL", "top-1", "quantize time (s)"]

    rows = []
    for report in reports:
        row = [
            label(report).replace("|", "\\|"),
            _format(report.bits_per_weight, "{:.3f}"),
            _format(report.size_bytes and report.size_bytes / 1e6, "{:.2f}"),
        ]
        for protocol in protocols:
            result = report.perplexity.get(protocol)
            row.append(_format(result and result.ppl, "{:.3f}"))
            if baseline is not None:
                reference = baseline.perplexity.get(protocol)
                delta = result.ppl - reference.ppl if result and reference else None
                row.append(_format(delta, "{:+.3f}"))
        row += [
            _format(report.drift and report.drift.mean_kl, "{:.5f}"),
            _format(report.drift and report.drift.top1_agreement, "{:.2%}"),
            _format(report.quantize_seconds, "{:.1f}"),
        ]
        rows.append(row)

    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def plot_ppl_vs_size(reports: list[EvalReport], path: str | Path) -> Path:
    """Write a PNG scatter of perplexity (one series per protocol) against size in MB, each point labelled."""
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    protocols = list(dict.fromkeys(protocol for report in reports for protocol in report.perplexity))
    plotted = False
    for protocol in protocols:
        points = [
            (report.size_bytes / 1e6, report.perplexity[protocol].ppl, label(report))
            for report in reports
            if report.size_bytes is not None and protocol in report.perplexity
        ]
        if not points:
            continue
        sizes, ppls, _ = zip(*points)
        axes.scatter(sizes, ppls, label=f"PPL ({protocol})")
        for size, ppl, text in points:
            axes.annotate(text, (size, ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
        plotted = True
    if not plotted:
        raise ValueError("reports contain no (size_bytes, perplexity) pair to plot")
    axes.set_xlabel("size (MB)")
    axes.set_ylabel("perplexity")
    axes.margins(x=0.15, y=0.1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def label(report: EvalReport) -> str:
    """Short row/point label: the config as ``key=value`` pairs, or the model id when the config is empty."""
    return ", ".join(f"{key}={value}" for key, value in report.config.items()) or report.model_id


def _format(value: float | None, template: str) -> str:
    return MISSING if value is None else template.format(value)
