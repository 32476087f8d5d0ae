"""Distillation loss against a reference, the DistillationTrainer, and the `hfquant qat` verb on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import hfquant
import hfquant.qat
from hfquant import cli
from hfquant.qat import DistillationTrainer, distillation_loss
from tiny_models import build, tiny_tokenizer


def test_distillation_loss_is_the_mean_token_kl() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p, q = teacher.softmax(-1), student.softmax(-1)
    reference = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), reference)
    assert distillation_loss(teacher, teacher).abs() < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, temperature=0)


def test_distillation_trainer_brings_the_student_closer_to_the_teacher(tmp_path: Path) -> None:
    teacher = build("llama")
    student = hfquant.qat.prepare(build("llama"), hfquant.HfQuantConfig(format="int2", group_size=32, qat=True))
    torch.manual_seed(0)
    rows = [{"input_ids": row, "labels": row} for row in torch.randint(0, 128, (8, 16))]
    ids = torch.stack([r["input_ids"] for r in rows])

    def kl() -> float:
        with torch.no_grad():
            return distillation_loss(student(ids).logits, teacher(ids).logits).item()

    before = kl()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-4,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    DistillationTrainer(model=student, args=args, train_dataset=rows, teacher=teacher).train()
    student.eval()
    assert kl() < before


def test_qat_verb_trains_evaluates_converts_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build("llama").save_pretrained(tmp_path / "float")
    tiny_tokenizer().save_pretrained(tmp_path / "float")
    cli.main(["qat", str(tmp_path / "float"), str(tmp_path / "out"), "--format", "int4", "--group-size", "32",
              "--steps", "3", "--train-seqlen", "32", "--batch-size-train", "2", "--lr", "1e-3", "--distill",
              "--seqlen", "64", "--max-tokens", "256", "--protocol", "gptq"])
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and "saved to" in printed
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "int4" and "qat" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, hfquant.nn.qlinear.QuantLinear)
