"""A small QAT job: random windows of a corpus split, Adam, optional distillation, a progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hfquant.qat.distill import distillation_loss
from hfquant.validation import require_int


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int, batch_size: int = 4, seqlen: int = 256,
          lr: float = 1e-5, teacher: torch.nn.Module | None = None, seed: int = 0,
          progress: bool = True) -> TrainResult:
    """Train ``model`` (fake-quantized) for ``steps`` steps on windows of the 1-D token ids ``ids``.

    With ``teacher`` the loss is KL to its logits (:func:`distillation_loss`), otherwise cross-entropy.
    """
    steps, batch_size, seqlen = (require_int(n, v, 1) for n, v in
                                 (("steps", steps), ("batch_size", batch_size), ("seqlen", seqlen)))
    if ids.numel() <= seqlen:
        raise ValueError(f"seqlen={seqlen} is not allowed; the training text has only {ids.numel()} tokens")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    result, start = TrainResult(), time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc="qat", disable=not progress)
    for _ in bar:
        offsets = torch.randint(0, ids.numel() - seqlen, (batch_size,), generator=generator)
        batch = torch.stack([ids[o:o + seqlen] for o in offsets.tolist()])
        if teacher is None:
            loss = model(batch, labels=batch).loss
        else:
            with torch.no_grad():
                teacher_logits = teacher(batch).logits
            loss = distillation_loss(model(batch).logits, teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
