"""The one training loop, :func:`optimize`, and the losses it minimises.

    for step in schedule: loss_fn(step).backward(); clip to 1; AdamW at lr · schedule.factor(step)

Train, distillation, the zoo's PEFT baseline and the demo base's pretraining all step through
:func:`optimize`; a step's batch comes from :class:`Batches` (seeded epochs). The losses are
on completions only: token t predicts labels[t + 1], where labels are not ``IGNORE_INDEX``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adapters_zoo.data import IGNORE_INDEX, Example, encode_example, pad_batch, pad_id_of
from adapters_zoo.errors import TrainingDataError, TrainingDiverged


@dataclass(frozen=True)
class Schedule:
    """The learning rate of step t (0-based): ``lr · factor(t)``, a linear warmup over ``warmup`` steps,
    then a cosine from 1 down to ``floor`` at the last step."""

    steps: int
    lr: float
    warmup: int = 0  # steps
    floor: float = 0.0  # the factor the cosine ends at

    @classmethod
    def with_warmup_ratio(cls, steps: int, lr: float, warmup_ratio: float) -> Schedule:
        return cls(steps, lr, math.ceil(warmup_ratio * steps))

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimize(
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor | Iterable[torch.Tensor]],
    schedule: Schedule,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float = 1.0,
    diverged: Callable[[float, int], str] | None = None,
    progress: str | None = None,
    on_step: Callable[[int, float], dict[str, str] | None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    reduce_grads: Callable[[list[torch.nn.Parameter]], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_save: Callable[[int, dict[str, Any]], None] | None = None,
    save_every: int = 0,
) -> list[float]:
    """The one training loop: minimise ``loss_fn(step)`` over ``params``; returns every step's loss.

    ``loss_fn(step)`` is the step's loss, or an iterable of micro-batch losses (gradient
    accumulation: each is backpropagated as it comes, the step's loss is their sum).
    AdamW at ``schedule``'s rate, gradients clipped to norm ``max_grad_norm``. ``diverged(loss, step)``
    is the TrainingDiverged message for a non-finite loss (None: no check). ``progress``: the
    description of a progress bar (None: no bar); ``on_step(step, loss)`` runs after each update and
    what it returns is shown on the bar. ``scaler``: loss scaling (fp16); ``reduce_grads(params)``
    runs after backward, before clipping (the all-reduce of data-parallel ranks). ``on_save(done, state)``
    runs every ``save_every`` steps with the optimizer's (and scaler's) state; ``resume`` is such a state
    plus ``step``, the steps done: the loop continues from there (the caller restores the parameters).
    """
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, betas=betas, weight_decay=weight_decay)
    first = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        first = resume["step"]
    values: list[float] = []
    bar = tqdm(range(first, schedule.steps), desc=progress, unit="step", disable=progress is None,
               initial=first, total=schedule.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr * schedule.factor(step)
        optimizer.zero_grad(set_to_none=True)
        out = loss_fn(step)
        total = 0.0
        for loss in [out] if isinstance(out, torch.Tensor) else out:
            if diverged is not None and not torch.isfinite(loss):
                raise TrainingDiverged(diverged(loss.item(), step + 1))
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
        if reduce_grads is not None:
            reduce_grads(params)
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        values.append(total)
        if on_save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < schedule.steps:
            on_save(step + 1, {"optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict() if scaler is not None else None})
        shown = on_step(step, values[-1]) if on_step is not None else None
        if shown:
            bar.set_postfix(**shown)
    return values


class Batches:
    """Seeded epochs: each epoch is a fresh permutation of the examples."""

    def __init__(self, rows: list, batch_size: int, gen: torch.Generator):
        self.rows, self.batch_size, self.gen = rows, min(batch_size, len(rows)), gen
        self.order: list[int] = []

    def next(self) -> list:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.rows), generator=self.gen).tolist()
        picked, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.rows[i] for i in picked]


def completion_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits.float()  # (B, T, vocab)


def completion_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over completion tokens, their count); token t predicts labels[t + 1]."""
    pred, target = logits[:, :-1], labels[:, 1:]  # (B, T-1, vocab), (B, T-1)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def kl_base_to_adapted(base_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(p_base ‖ p_adapted) = Σ p_base (log p_base − log p_adapted)."""
    return kl_sum(base_logits, logits, mask) / mask.sum().clamp(min=1)


def kl_sum(base_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_adapted) summed over the real tokens (mask 1)."""
    log_p = F.log_softmax(base_logits, dim=-1)  # (B, T, vocab)
    log_q = F.log_softmax(logits, dim=-1)  # (B, T, vocab)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (B, T)
    return (kl * mask.to(kl.dtype)).sum()


@torch.no_grad()
def eval_loss(model, tokenizer, examples: list[Example], batch_size: int = 16, max_length: int = 256) -> float:
    """Mean cross-entropy per completion token over ``examples`` (held-out evaluation)."""
    if not examples:
        raise TrainingDataError("eval_loss needs at least one example")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            rows = [encode_example(tokenizer, ex, max_length)[:2] for ex in examples[start : start + batch_size]]
            batch = pad_batch(rows, pad_id_of(tokenizer), device)
            loss, n = completion_loss_sum(completion_logits(model, batch), batch["labels"])
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)
