"""Train one spectral adapter on prompt/completion pairs.

    W' = W + U_k C(θ) V_kᵀ (+ B(θ) A(θ))        θ: the kind's native parameters

The target layers of any transformers causal LM (Llama-, Qwen-, GPT-2-style) are wrapped
with :func:`adapters_zoo.inject.attach`; the base is frozen, so gradients reach exactly
the adapter parameters. The loss is the mean cross-entropy over completion tokens only
(labels −100 on the prompt and on padding), optionally plus ``kl_weight · KL(base ‖
adapted)`` on *preserve* prompts the adapter must leave alone. AdamW, linear warmup then
cosine decay to 0, gradient clipping at 1, seeded batches: :func:`optimize`, the one training
loop (distillation, the zoo's PEFT baseline and the demo base's pretraining use it too).

The base runs in eval mode (dropout off) during training: the adapter has few
parameters, and the KL term then compares the base and adapted models like for like.

Training data are JSON Lines of ``{"prompt": ..., "completion": ...}`` (the completion
ends with the tokenizer's EOS, so the adapter learns to stop) or ``{"messages": [...]}``
(rendered with the model's chat template, the loss on the assistant turns); every
problem with a file is a :class:`TrainingDataError` naming the file and line. The
adapter's routing signature (the base model's features of its prompts) is stored in its
metadata, so ``auto`` can route to anything trained here.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adapters_zoo.basis import Basis, check_basis_matches_model, default_device
from adapters_zoo.checkpoint import linear_layers
from adapters_zoo.errors import BasisMismatch, InvalidConfig, ModelDirError, TrainingDataError, TrainingDiverged
from adapters_zoo.format import Adapter, new_adapter
from adapters_zoo.inject import SpectralLinear, adapter_parameters, attach, detach, extract
from adapters_zoo.signatures import attach_signature, signature_from_prompts
from adapters_zoo.train_resume import load_checkpoint, save_checkpoint
from adapters_zoo.train_runtime import (
    PRECISIONS,
    all_reduce_grads,
    all_reduce_sum,
    autocast,
    cast_base,
    grad_scaler,
    gradient_checkpointing,
    precision_dtype,
    world,
)

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there
LOSS_WINDOW = 10  # final_loss is the mean over this many last steps (one batch is noisy)
# Prompts whose base features make the signature train stores: a forward pass over them costs
# minutes on a real base on CPU, and the centroid of the first 64 is already the task's.
TRAIN_SIGNATURE_PROMPTS = 64

Example = dict[str, Any]  # {prompt, completion} or {messages}


@dataclass
class TrainConfig:
    kind: str = "scale"
    kind_config: dict[str, Any] = field(default_factory=dict)  # the kind's own fields (rank, slice, pattern, ...)
    targets: str | list[str] | None = None  # layer names within the basis; None: every layer of the basis
    steps: int = 100
    lr: float = 1e-2  # adapters start at the identity with few parameters: larger than full fine-tuning
    batch_size: int = 8
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0  # decay pulls toward 0, which is not the identity for every kind (rotation's c)
    seed: int = 0
    preserve: str | None = None  # JSONL of prompts whose next-token distributions must stay the base's
    kl_weight: float = 1.0
    max_length: int = 256  # tokens per example (prompt + completion); longer completions are cut
    add_eos: bool = True  # end every completion with the tokenizer's EOS, so the adapter learns to stop (as TRL)
    signature: bool = True  # store the routing signature (base features of the prompts) for `auto`
    device: str | None = None  # None: cuda when present, else cpu
    precision: str = "fp32"  # dtype of the base weights: fp32 | bf16 | fp16 (the adapter stays float32)
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, more time
    save_every: int = 0  # steps between checkpoints (0: none); train_adapter's checkpoint= says where

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be ≥ 1, got {self.steps}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (self.kl_weight >= 0, f"kl_weight must be ≥ 0, got {self.kl_weight}"),
            (self.max_length >= 2, f"max_length must be ≥ 2, got {self.max_length}"),
            (self.grad_accum >= 1, f"grad_accum must be ≥ 1, got {self.grad_accum}"),
            (self.save_every >= 0, f"save_every must be ≥ 0, got {self.save_every}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r} (use {', '.join(PRECISIONS)})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidConfig(message)


@dataclass
class TrainStats:
    steps: int
    first_loss: float  # completion loss of the first batch
    final_loss: float  # mean completion loss over the last LOSS_WINDOW steps
    final_kl: float | None  # mean KL(base ‖ adapted) over the last LOSS_WINDOW steps, with --preserve
    seconds: float
    trainable_params: int
    examples: int
    truncated: int  # examples whose completion was cut at max_length
    device: str


# --------------------------------------------------------------------------- data


def load_examples(path: str | Path, need_completion: bool = True) -> list[Example]:
    """Read a JSON Lines training file, checking every line.

    Two shapes, as TRL reads them, one per file: ``{"prompt", "completion"}`` and
    ``{"messages": [{"role", "content"}, ...]}`` (rendered with the model's chat template;
    the loss on the assistant turns). With ``need_completion=False`` (preserve files) a
    prompt line needs only ``prompt`` and a messages line any turns. The list returned
    carries ``.where`` (``file:line`` of each example) so later errors name the line.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: training file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TrainingDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    examples = ExampleList()
    shape: tuple[str, int] | None = None  # (shape of the first example, its line)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            reason = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else "nested too deep"
            raise TrainingDataError(f"{where}: not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise TrainingDataError(f"{where}: expected an object with 'prompt' and 'completion', or 'messages', "
                                    f"got {type(record).__name__}")
        this = "messages" if "messages" in record else "prompt"
        if shape is None:
            shape = (this, lineno)
        elif this != shape[0]:
            raise TrainingDataError(f"{where}: a {this!r} example in a file of {shape[0]!r} examples (line "
                                    f"{shape[1]}): use one shape per file")
        example = _messages_example(record, where, need_completion) if this == "messages" else \
            _prompt_example(record, where, need_completion)
        examples.append(example)
        examples.where.append(where)
    if not examples:
        raise TrainingDataError(f"{path}: no examples (the file is empty)")
    return examples


class ExampleList(list):
    """Examples read from a file, with ``where[i]`` = ``file:line`` of example i."""

    def __init__(self, *args):
        super().__init__(*args)
        self.where: list[str] = []


def encode_examples(tokenizer, examples: list[Example], max_length: int, add_eos: bool = True):
    """encode_example over ``examples``; an error names the file and line of the example (when known)."""
    where = getattr(examples, "where", None)
    encoded = []
    for i, ex in enumerate(examples):
        try:
            encoded.append(encode_example(tokenizer, ex, max_length, add_eos))
        except TrainingDataError as err:
            raise TrainingDataError(f"{where[i]}: {err}" if where else str(err)) from None
    return encoded


def _prompt_example(record: dict, where: str, need_completion: bool) -> Example:
    keys = ("prompt", "completion") if need_completion else ("prompt",)
    for key in keys:
        if key not in record:
            raise TrainingDataError(f"{where}: missing key {key!r}")
    for key in ("prompt", "completion"):
        if key in record and not isinstance(record[key], str):
            raise TrainingDataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if need_completion and not record["completion"]:
        raise TrainingDataError(f"{where}: 'completion' is empty (the loss is on the completion)")
    return {k: record[k] for k in ("prompt", "completion") if k in record}


def _messages_example(record: dict, where: str, need_completion: bool) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, turn in enumerate(messages):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise TrainingDataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if need_completion and not any(turn["role"] == "assistant" for turn in messages):
        raise TrainingDataError(f"{where}: no assistant turn (the loss is on the assistant turns)")
    return {"messages": [{"role": t["role"], "content": t["content"]} for t in messages]}


def _chat_template(tokenizer, example: Example):
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError("a 'messages' example, but the model's tokenizer has no chat template "
                                "(use prompt/completion lines)")
    return tokenizer.apply_chat_template


def prompt_text(tokenizer, example: Example) -> str:
    """What the model reads before it answers: the prompt, or the chat up to the last assistant turn."""
    if "messages" not in example:
        return example["prompt"]
    render = _chat_template(tokenizer, example)
    turns = example["messages"]
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    return render(turns[:last], tokenize=False, add_generation_prompt=True)


def encode_example(
    tokenizer, example: Example, max_length: int, add_eos: bool = True
) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, truncated): labels are −100 where there is no loss, the token's id where there is.

    prompt/completion: the loss on the completion, which ends with the tokenizer's EOS unless
    ``add_eos`` is False (or the completion already ends with it). messages: the loss on
    every assistant turn as the chat template renders it (its end-of-turn token included).
    """
    if "messages" in example:
        return _encode_messages(tokenizer, example, max_length)
    prompt = tokenizer(example["prompt"])["input_ids"]  # with the tokenizer's BOS, as at inference
    completion = tokenizer(example.get("completion", ""), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and completion and eos is not None and completion[-1] != eos:
        completion = completion + [eos]
    _check_prompt_fits(len(prompt), max_length, example)
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return ids, labels, len(prompt) + len(completion) > max_length


def _check_prompt_fits(prompt_tokens: int, max_length: int, example: Example) -> None:
    if prompt_tokens >= max_length:
        raise TrainingDataError(
            f"a prompt of {prompt_tokens} tokens leaves no room for its completion within "
            f"max_length={max_length}: {str(example.get('prompt', ''))[:60]!r}"
        )


def _encode_messages(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int], bool]:
    """Render the whole chat once; label the characters of each assistant turn (found by rendering the
    chat up to it with and without that turn), then the tokens whose text starts inside those spans."""
    render = _chat_template(tokenizer, example)
    turns = example["messages"]
    text = render(turns, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = len(render(turns[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(render(turns[: i + 1], tokenize=False))
        if text[:end] != render(turns[: i + 1], tokenize=False) or start > end:
            raise TrainingDataError("the chat template does not render turn by turn "
                                    "(a prefix of the chat is not a prefix of its text)")
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE_INDEX for tok, (a, _) in zip(ids, offsets)]
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    _check_prompt_fits(first, max_length, example)
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def pad_batch(
    rows: list[tuple[list[int], list[int]]], pad_id: int, device, left: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, each (B, T): right padded (training), or left padded (generation)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        real = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, real] = torch.tensor(ids, dtype=torch.long)
        labels[i, real.start : real.start + len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, real] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0  # padded positions are masked out and carry no loss: any id works


# --------------------------------------------------------------------------- losses


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


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module):
    """Run ``model`` as its base: every SpectralLinear is swapped for its base layer, then put back."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, SpectralLinear)]
    for name, module in wrapped:
        model.set_submodule(name, module.base_layer)
    try:
        yield model
    finally:
        for name, module in wrapped:
            model.set_submodule(name, module)


@contextlib.contextmanager
def attached(model: torch.nn.Module, adapter: Adapter, basis: Basis):
    """``model`` with ``adapter`` attached for the block, then restored to its base."""
    attach(model, adapter, basis)
    try:
        yield model
    finally:
        detach(model)


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


# --------------------------------------------------------------------------- training


def resolve_device(device: str | None) -> torch.device:
    """``device``, or cuda when present, else cpu; asking for cuda without one is an InvalidConfig."""
    if not device:
        return default_device()
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidConfig(f"unknown device {device!r} (use cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfig(f"device {device!r} asked for, but no CUDA device is available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InvalidConfig(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return resolved


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


def lr_factor(step: int, steps: int, warmup_ratio: float) -> float:
    """Linear warmup over ⌈warmup_ratio·steps⌉ steps, then cosine decay toward 0 (step is 0-based)."""
    return Schedule.with_warmup_ratio(steps, 1.0, warmup_ratio).factor(step)


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


def target_layers(model: torch.nn.Module, basis: Basis, targets: str | list[str] | None) -> list[str]:
    """The basis layers selected by ``targets`` (all of them when None), in model order."""
    if targets is None:
        return basis.layer_names()
    wanted = [spec.name for spec in linear_layers(model, targets)]
    missing = [name for name in wanted if name not in basis.layers]
    if missing:
        raise BasisMismatch(
            f"layer {missing[0]!r} is selected by the targets but not in the basis "
            f"({len(basis.layers)} layers): compute the basis with these targets"
        )
    return wanted


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


@contextlib.contextmanager
def frozen_base(model: torch.nn.Module, device: torch.device):
    """``model`` on ``device``, in eval mode with every weight frozen, for adapters attached inside the
    block; after it (also on error) every adapter is detached and the grad flags and mode restored."""
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.to(device).eval()
    try:
        model.requires_grad_(False)
        yield model
    finally:
        detach(model)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        model.train(was_training)


def train_adapter(
    model: torch.nn.Module,
    tokenizer,
    basis: Basis,
    examples: list[Example],
    cfg: TrainConfig,
    preserve_examples: list[Example] | None = None,
    progress: bool = True,
    verify_basis: bool = True,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> tuple[Adapter, TrainStats]:
    """Train a ``cfg.kind`` adapter on ``examples``; the model is left as it came (moved to the device, its
    weights in ``cfg.precision``'s dtype). Inside torch.distributed, one rank of a data-parallel run.

    Raises BasisMismatch when ``basis`` was not computed from ``model``'s weights (pass
    ``verify_basis=False`` when the caller has checked already: hashing a large model takes a while).
    ``checkpoint``: the file ``cfg.save_every`` writes to (rank 0), and ``resume=True`` continues from;
    it is removed when the run completes.
    """
    cfg.validate()
    if not examples:
        raise TrainingDataError("no training examples")
    if preserve_examples is None and cfg.preserve:
        preserve_examples = load_examples(cfg.preserve, need_completion=False)
    device = resolve_device(cfg.device)
    if verify_basis:
        check_basis_matches_model(basis, model)
    layers = target_layers(model, basis, cfg.targets)
    adapter = new_adapter(cfg.kind, cfg.kind_config, basis, layers)

    encoded = encode_examples(tokenizer, examples, cfg.max_length, cfg.add_eos)
    rows = [(ids, labels) for ids, labels, _ in encoded]
    truncated = sum(cut for _, _, cut in encoded)
    preserve_rows = [row[:2] for row in encode_examples(tokenizer, preserve_examples or [], cfg.max_length)]
    rank, ranks = world()
    # Every rank draws the same global batch (same seed) and computes its shard of it.
    global_batch = cfg.batch_size * cfg.grad_accum * ranks
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = Batches(rows, global_batch, gen)
    preserve_batches = Batches(preserve_rows, global_batch, gen) if preserve_rows and cfg.kl_weight > 0 else None
    pad_id = pad_id_of(tokenizer)
    dtype = precision_dtype(cfg.precision, device)

    with frozen_base(model, device):
        prompts = [prompt_text(tokenizer, ex) for ex in examples[:TRAIN_SIGNATURE_PROMPTS]]
        # From the base as it came (before any cast), on rank 0 only: one signature per adapter.
        signature = signature_from_prompts(model, tokenizer, prompts) if cfg.signature and rank == 0 else None
        cast_base(model, dtype)
        attach(model, adapter, basis)
        losses, kls = [], []
        params = adapter_parameters(model)
        settings = _resume_settings(cfg)
        state = load_checkpoint(checkpoint, settings, ranks) if resume else None
        if state is not None:
            with torch.no_grad():
                for p, saved in zip(params, state["params"]):
                    p.copy_(saved)
            gen.set_state(state["gen"])
            batches.order = list(state["order"])
            if preserve_batches is not None:
                preserve_batches.order = list(state["preserve_order"])
            losses, kls = list(state["losses"]), list(state["kls"])

        def save(done: int, loop_state: dict[str, Any]) -> None:
            if rank == 0:
                save_checkpoint(checkpoint, {
                    "step": done, "ranks": ranks, "settings": settings, **loop_state,
                    "params": [p.detach().cpu().clone() for p in params], "gen": gen.get_state(),
                    "order": list(batches.order),
                    "preserve_order": list(preserve_batches.order) if preserve_batches is not None else [],
                    "losses": list(losses), "kls": list(kls)})

        def micro_batches(picked: list) -> list[dict[str, torch.Tensor]]:
            mine = picked[rank::ranks]
            size = math.ceil(len(mine) / cfg.grad_accum) if mine else 1
            return [pad_batch(mine[i : i + size], pad_id, device) for i in range(0, len(mine), size)]

        def loss_fn(step: int):
            """Micro-batch losses, each a sum over its tokens divided by the global batch's count."""
            picked = batches.next()
            count = max(1, sum(sum(lab != IGNORE_INDEX for lab in labels[1:]) for _, labels in picked))
            kept = preserve_batches.next() if preserve_batches is not None else []
            kept_count = max(1, sum(len(ids) for ids, _ in kept))
            step_loss = torch.zeros(2)  # (completion loss, KL) of the global batch
            for batch, kept_batch in itertools.zip_longest(micro_batches(picked), micro_batches(kept) if kept else []):
                loss = torch.zeros((), device=device)
                if batch is not None:
                    with autocast(device, dtype):
                        loss_sum, _ = completion_loss_sum(completion_logits(model, batch), batch["labels"])
                    loss = loss_sum / count
                    step_loss[0] += loss.item()
                if kept_batch is not None:
                    with torch.no_grad(), adapter_disabled(model), autocast(device, dtype):
                        base_logits = completion_logits(model, kept_batch)
                    with autocast(device, dtype):
                        logits = completion_logits(model, kept_batch)
                    kl = kl_sum(base_logits, logits, kept_batch["attention_mask"]) / kept_count
                    step_loss[1] += kl.item()
                    loss = loss + cfg.kl_weight * kl
                yield loss
            all_reduce_sum([step_loss])
            losses.append(step_loss[0].item())
            if kept:
                kls.append(step_loss[1].item())

        start = time.perf_counter()
        with gradient_checkpointing(model, cfg.gradient_checkpointing):
            optimize(params, loss_fn,
                     Schedule.with_warmup_ratio(cfg.steps, cfg.lr, cfg.warmup_ratio),
                     weight_decay=cfg.weight_decay, progress=f"train {cfg.kind}" if progress and rank == 0 else None,
                     diverged=lambda loss, step: f"loss became {loss} at step {step}: lower --lr (now {cfg.lr})",
                     on_step=lambda step, _: {"loss": f"{losses[-1]:.4f}",
                                              **({"kl": f"{kls[-1]:.4f}"} if kls else {})},
                     scaler=grad_scaler(device, dtype), reduce_grads=all_reduce_grads if ranks > 1 else None,
                     resume=state, on_save=save if checkpoint is not None else None, save_every=cfg.save_every)
        seconds = time.perf_counter() - start
        trained = extract(model, adapter)
    if checkpoint is not None and rank == 0:
        Path(checkpoint).unlink(missing_ok=True)  # the run is complete: the adapter file replaces it

    stats = TrainStats(
        steps=cfg.steps,
        first_loss=losses[0],
        final_loss=sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]),
        final_kl=sum(kls[-LOSS_WINDOW:]) / len(kls[-LOSS_WINDOW:]) if kls else None,
        seconds=round(seconds, 3),
        trainable_params=trained.num_params(),
        examples=len(examples),
        truncated=truncated,
        device=str(device) if ranks == 1 else f"{device} × {ranks} ranks",
    )
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("kind", "kind_config", "device")}
    trained.meta["train"] = {"settings": settings, "stats": asdict(stats)}
    if signature is not None:  # from the base, adapter off: every adapter's signature lives in one space
        trained.meta = attach_signature(trained.meta, signature, basis.fingerprint)
    return trained, stats


def _resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (the schedule and the batches depend on it)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("device", "save_every")}


# --------------------------------------------------------------------------- model dirs


def load_model_dir(model_dir: str | Path, device: str | None = None):
    """(model, tokenizer) from a local transformers directory; weights keep their stored dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    device = resolve_device(device)  # before the slow part
    if not (model_dir / "config.json").is_file():
        raise ModelDirError(f"{model_dir}: not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelDirError(f"{model_dir}: no usable tokenizer ({type(err).__name__}: {err})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto",
                                                     use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelDirError(f"{model_dir}: cannot load the model ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), tokenizer
