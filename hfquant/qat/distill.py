"""Distillation from the float model: KL(teacher ‖ student) on the logits, as a loss and a Trainer subclass."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher/T) ‖ softmax(student/T)) · T²`` (logits ``(..., vocab)``)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not allowed; expected a positive number")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


class DistillationTrainer(Trainer):
    """A Trainer whose loss is ``alpha · KL(teacher ‖ student) + (1 − alpha) · cross-entropy``.

    ``teacher`` is the float model (kept in eval mode, no gradients).
    """

    def __init__(self, *args: Any, teacher: torch.nn.Module, alpha: float = 1.0, temperature: float = 1.0,
                 **kwargs: Any) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is not allowed; expected a number in [0, 1]")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> Any:
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        loss = self.alpha * distillation_loss(outputs.logits, teacher_logits, self.temperature)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * outputs.loss
        return (loss, outputs) if return_outputs else loss
