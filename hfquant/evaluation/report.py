"""Human-readable summaries of evaluation reports: a markdown table (with llama.cpp-style KL statistics and
their standard errors) and a PPL-vs-size plot on a log axis."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hfquant.evaluation.results import DriftResult, EvalReport

MISSING = "–"
LABEL_OFFSETS = ((5, 4), (5, -11), (-11, 4), (-11, -11))  # points, around a marker


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
    header += ["mean KL", "top-1", "median / p99 / max KL", "mean Δp", "PPL ratio", "quantize time (s)"]

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
        row += [*_drift_cells(report.drift), _format(report.quantize_seconds, "{:.1f}")]
        rows.append(row)

    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _drift_cells(drift: DriftResult | None) -> list[str]:
    """mean KL ± SE, top-1 ± SE, median / p99 / max KL, mean Δp ± SE, PPL ratio ± SE (llama.cpp's statistics)."""
    if drift is None:
        return [MISSING] * 5
    spread = (" / ".join(_format(v, "{:.4f}") for v in (drift.median_kl, drift.p99_kl, drift.max_kl))
              if drift.median_kl is not None else MISSING)
    return [
        _with_error(drift.mean_kl, drift.mean_kl_stderr, "{:.5f}"),
        _with_error(drift.top1_agreement, drift.top1_agreement_stderr, "{:.2%}"),
        spread,
        _with_error(drift.mean_delta_p, drift.mean_delta_p_stderr, "{:+.2%}"),
        _with_error(drift.ppl_ratio, drift.ppl_ratio_stderr, "{:.4f}"),
    ]


def _with_error(value: float | None, error: float | None, template: str) -> str:
    if value is None:
        return MISSING
    return template.format(value) if error is None else f"{template.format(value)} ± {template.format(abs(error)).lstrip('+')}"


def plot_ppl_vs_size(reports: list[EvalReport], path: str | Path) -> Path:
    """Write a PNG scatter of perplexity (log axis; one series per protocol) against size in MB.

    Points carry numbers and a key beside the axes names them, so labels never overlap each other or the points.
    """
    figure = Figure(figsize=(9, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.09, 0.11, 0.55, 0.84))
    numbers = {id(report): index for index, report in enumerate(reports, start=1)}
    protocols = list(dict.fromkeys(protocol for report in reports for protocol in report.perplexity))
    plotted = False
    for protocol in protocols:
        points = [
            (report.size_bytes / 1e6, report.perplexity[protocol].ppl, numbers[id(report)])
            for report in reports
            if report.size_bytes is not None and protocol in report.perplexity
        ]
        if not points:
            continue
        sizes, ppls, _ = zip(*points)
        axes.scatter(sizes, ppls, label=f"PPL ({protocol})")
        # neighbours in size get different corners; of two at one size, the higher point's number goes above
        for rank, (size, ppl, number) in enumerate(sorted(points, key=lambda point: (point[0], -point[1]))):
            axes.annotate(str(number), (size, ppl), textcoords="offset points", xytext=LABEL_OFFSETS[rank % 4],
                          fontsize=8)
        plotted = True
    if not plotted:
        raise ValueError("reports contain no (size_bytes, perplexity) pair to plot")
    axes.set_xlabel("size (MB)")
    axes.set_yscale("log")
    axes.set_ylabel("perplexity (log scale)")
    axes.margins(x=0.1, y=0.1)
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    key = "\n".join(f"{numbers[id(report)]}: {_shorten(label(report))}" for report in reports)
    figure.text(0.67, 0.95, key, fontsize=7, va="top", family="monospace")
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def label(report: EvalReport) -> str:
    """Short row/point label: the config as ``key=value`` pairs, or the model id when the config is empty."""
    return ", ".join(f"{key}={value}" for key, value in report.config.items()) or report.model_id


def _shorten(text: str, width: int = 44) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _format(value: float | None, template: str) -> str:
    return MISSING if value is None else template.format(value)
