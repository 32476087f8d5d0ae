import json

import pytest
from huggingface_hub.repocard_data import model_index_to_eval_results

from hfquant.evaluation import (
    DriftResult,
    EvalReport,
    PerplexityResult,
    markdown_table,
    model_index,
    plot_ppl_vs_size,
    save_with_evaluate,
)


def gptq_ppl(ppl: float) -> PerplexityResult:
    return PerplexityResult(ppl=ppl, nll=0.0, num_tokens=1000, protocol="gptq", params={"seqlen": 2048})


@pytest.fixture
def baseline() -> EvalReport:
    return EvalReport(
        model_id="org/tiny",
        perplexity={
            "gptq": gptq_ppl(10.0),
            "strided": PerplexityResult(9.5, 2.25, 1200, "strided", {"max_length": 1024, "stride": 512}),
        },
        size_bytes=4_000_000,
        bits_per_weight=16.0,
    )


@pytest.fixture
def quantized() -> EvalReport:
    return EvalReport(
        model_id="org/tiny",
        config={"method": "gptq", "bits": 4, "group_size": 128},
        perplexity={"gptq": gptq_ppl(10.5)},
        drift=DriftResult(mean_kl=0.0123, p99_kl=0.2, max_kl=1.5, top1_agreement=0.9512, num_tokens=1000),
        size_bytes=1_250_000,
        bits_per_weight=4.156,
        quantize_seconds=12.34,
    )


def test_json_round_trip(quantized, baseline, tmp_path):
    for report in (quantized, baseline):
        path = report.to_json(tmp_path / "report.json")
        assert json.loads(path.read_text())["perplexity"]["gptq"]["params"] == {"seqlen": 2048}
        assert EvalReport.from_json(path) == report
        assert EvalReport.from_dict(report.to_dict()) == report
    assert EvalReport.from_dict({"model_id": "m"}) == EvalReport(model_id="m")


def test_save_with_evaluate_adds_metadata_and_reads_back(quantized, tmp_path):
    path = save_with_evaluate(quantized, tmp_path / "results")
    assert path.parent == tmp_path / "results"
    saved = json.loads(path.read_text())
    assert "_timestamp" in saved and saved["size_bytes"] == 1_250_000
    assert EvalReport.from_json(path) == quantized


def test_model_index(baseline):
    index = model_index(baseline, "tiny-gptq", "WikiText-2", "wikitext")
    assert index == [
        {
            "name": "tiny-gptq",
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": "WikiText-2", "type": "wikitext"},
                    "metrics": [
                        {"type": "perplexity", "value": 10.0, "name": "Perplexity (gptq, seqlen=2048)"},
                        {
                            "type": "perplexity",
                            "value": 9.5,
                            "name": "Perplexity (strided, max_length=1024, stride=512)",
                        },
                    ],
                }
            ],
        }
    ]
    name, eval_results = model_index_to_eval_results(index)
    assert name == "tiny-gptq"
    assert [result.metric_value for result in eval_results] == [10.0, 9.5]


def test_model_index_requires_perplexity():
    with pytest.raises(ValueError, match="report"):
        model_index(EvalReport(model_id="m"), "m", "wikitext")


def test_markdown_table_with_baseline(baseline, quantized):
    header = (
        "| config | bits/weight | size (MB) | PPL (gptq) | ΔPPL (gptq) | PPL (strided) | ΔPPL (strided) "
        "| mean KL | top-1 | median / p99 / max KL | mean Δp | PPL ratio | quantize time (s) |"
    )
    assert markdown_table([baseline, quantized], baseline).splitlines() == [
        header,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| org/tiny | 16.000 | 4.00 | 10.000 | +0.000 | 9.500 | +0.000 | – | – | – | – | – | – |",
        "| method=gptq, bits=4, group_size=128 | 4.156 | 1.25 | 10.500 | +0.500 | – | – | 0.01230 | 95.12% | – | – | – "
        "| 12.3 |",
    ]


def test_markdown_table_shows_uncertainties(quantized):
    quantized.drift = DriftResult(mean_kl=0.0123, p99_kl=0.2, max_kl=1.5, top1_agreement=0.9512, num_tokens=1000,
                                  mean_kl_stderr=0.0004, median_kl=0.004, top1_agreement_stderr=0.0068,
                                  mean_delta_p=-0.0123, mean_delta_p_stderr=0.001, ppl_ratio=1.05,
                                  ppl_ratio_stderr=0.0031)
    row = markdown_table([quantized]).splitlines()[2]
    assert row == ("| method=gptq, bits=4, group_size=128 | 4.156 | 1.25 | 10.500 | 0.01230 ± 0.00040 | 95.12% ± 0.68% "
                   "| 0.0040 / 0.2000 / 1.5000 | -1.23% ± 0.10% | 1.0500 ± 0.0031 | 12.3 |")


def test_markdown_table_without_baseline_has_no_delta_columns(quantized):
    header, _, row = markdown_table([quantized]).splitlines()
    assert "ΔPPL" not in header
    assert row == "| method=gptq, bits=4, group_size=128 | 4.156 | 1.25 | 10.500 | 0.01230 | 95.12% | – | – | – | 12.3 |"


def test_plot_ppl_vs_size_writes_png(baseline, quantized, tmp_path):
    path = plot_ppl_vs_size([baseline, quantized], tmp_path / "ppl_vs_size.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_ppl_vs_size_needs_a_point(tmp_path):
    with pytest.raises(ValueError, match="size_bytes"):
        plot_ppl_vs_size([EvalReport(model_id="m", perplexity={"gptq": gptq_ppl(1.0)})], tmp_path / "x.png")
