"""Model cards for quantized checkpoints: metadata from the saved config and, when given, evaluation results."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hfquant.algorithms import get_method
from hfquant.evaluation.results import EvalReport, model_index
from hfquant.evaluation.report import markdown_table
from hfquant.plan import ResolvedPlan

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"  # the repo's model_cards/


def _template_text() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def render_card(quant_config: dict[str, Any], *, base_model: str | None, model_name: str,
                repo_or_path: str, storage: dict[str, Any] | None = None, report: EvalReport | None = None,
                dataset_name: str = "brown") -> ModelCard:
    """A model card for a checkpoint saved with ``quantization_config`` = ``quant_config`` (its dict form)."""
    method = get_method(quant_config["method"])
    plan = ResolvedPlan.from_dict(quant_config["plan"]) if quant_config.get("plan") else None
    formats = sorted({s.weight.format_name for s in plan.layers.values()}) if plan else []
    tags = ["hfquant", *formats, method.name, "quantized"]
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        tags=tags,
        model_name=model_name,
    )
    if report is not None and report.perplexity:
        data.model_index = model_index(report, model_name, dataset_name)
    config_rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(quant_config.items())
                            if key not in ("calibration", "plan"))
    body = _template_text().format(
        model_name=model_name,
        base_model=base_model or "a transformers model",
        method_sentence=method.description or f"method `{method.name}`.",
        config_rows=config_rows,
        formats_section=_formats_section(plan),
        size_section=_size_section(storage),
        calibration_section=_calibration_section(quant_config.get("calibration")),
        evaluation_section=markdown_table([report]) if report and (report.perplexity or report.drift) else
        "Not evaluated when this card was written; run `hfquant eval` on this folder.",
        repo_or_path=repo_or_path,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _formats_section(plan: ResolvedPlan | None) -> str:
    if plan is None:
        return "Not recorded."
    schemes = {s.name: s for s in plan.layers.values()}
    lines = [f"- {count} layer(s): {schemes[name].weight.describe()}" for name, count in sorted(plan.counts().items())]
    if len(schemes) > 1:
        lines += ["", "Per layer, by depth (the full plan is `quantization_config.plan` in `config.json`):", "",
                  depth_table(plan), "", f"![code bits by depth]({PLOT_NAME})"]
    return "\n".join(lines)


PLOT_NAME = "bits_by_depth.png"  # written next to the card for plans of more than one format
_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")  # "model.layers.3.mlp.up_proj" -> block "model.layers.3", "mlp.up_proj"


def depth_table(plan: ResolvedPlan) -> str:
    """A Markdown table: one row per block (or layer outside the blocks), one column per layer of a block."""
    rows: dict[str, dict[str, str]] = {}
    for name, scheme in plan.layers.items():
        match = _BLOCK.match(name)
        block, layer = match.groups() if match else (name, "")
        rows.setdefault(block, {})[layer] = scheme.name
    columns = list(dict.fromkeys(layer for row in rows.values() for layer in row))
    head = "| block | " + " | ".join(f"`{c}`" if c else "layer" for c in columns) + " |"
    body = [f"| `{block}` | " + " | ".join(row.get(c, "float") for c in columns) + " |" for block, row in rows.items()]
    return "\n".join([head, "|---|" + "---|" * len(columns), *body])


def plot_bits_by_depth(plan: ResolvedPlan, path: str | Path) -> None:
    """Code bits of every quantized layer in model order (a step plot), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [scheme.weight.code_bits for scheme in plan.layers.values()]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.step(range(len(bits)), bits, where="mid")
    ax.set_xlabel("quantized layer, in model order")
    ax.set_ylabel("code bits")
    ax.set_yticks(sorted(set(bits)))
    ax.set_title(f"{len(bits)} layers, {len(plan.counts())} formats")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _size_section(storage: dict[str, Any] | None) -> str:
    if not storage:
        return "Not recorded."
    return (f"{storage['quantized_layers']} quantized layers hold {storage['quantized_weights']:,} weights in "
            f"{storage['quantized_bytes'] / 1e6:.2f} MB ({storage['bits_per_weight']:.3f} bits per weight, "
            f"scales and zero points included); other parameters take {storage['other_bytes'] / 1e6:.2f} MB.")


def _calibration_section(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return "None: the method needs no data."
    return "\n".join(f"- {key}: `{value}`" for key, value in calibration.items())


def write_card(card: ModelCard, folder: str | Path, plan: ResolvedPlan | None = None) -> Path:
    """``README.md`` in ``folder``, and the bits-by-depth plot it shows when ``plan`` mixes formats."""
    path = Path(folder) / "README.md"
    card.save(path)
    if plan is not None and len(plan.counts()) > 1:
        plot_bits_by_depth(plan, Path(folder) / PLOT_NAME)
    return path
