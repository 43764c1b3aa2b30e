"""Train one spectral adapter on prompt/completion pairs.

    W' = W + U_k C(θ) V_kᵀ (+ B(θ) A(θ))        θ: the kind's native parameters

The target layers of any transformers causal LM (Llama-, Qwen-, GPT-2-style) are wrapped
with :func:`adapters_zoo.inject.attach`; the base is frozen, so gradients reach exactly
the adapter parameters. The loss is the mean cross-entropy over completion tokens only
(labels −100 on the prompt and on padding), optionally plus ``kl_weight · KL(base ‖
adapted)`` on *preserve* prompts the adapter must leave alone. AdamW, linear warmup then
cosine decay to 0, gradient clipping at 1, seeded batches: :func:`adapters_zoo.loop.optimize`,
the one training loop (distillation, the zoo's PEFT baseline and the demo base's pretraining use it too).

The base runs in eval mode (dropout off) during training: the adapter has few
parameters, and the KL term then compares the base and adapted models like for like.

Training data are JSON Lines of ``{"prompt": ..., "completion": ...}`` (the completion
ends with the tokenizer's EOS, so the adapter learns to stop) or ``{"messages": [...]}``
(rendered with the model's chat template, the loss on the assistant turns), read and
encoded by :mod:`adapters_zoo.data`; what a run is asked to do is a
:class:`adapters_zoo.train_config.TrainConfig`. The adapter's routing signature (the base
model's features of its prompts) is stored in its metadata, so ``auto`` can route to
anything trained here; a run killed midway resumes from its checkpoint
(:mod:`adapters_zoo.train_resume`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adapters_zoo.basis import Basis, check_basis_matches_model
from adapters_zoo.data import IGNORE_INDEX, Example, encode_examples, load_examples, pad_batch, pad_id_of, prompt_text
from adapters_zoo.errors import TrainingDataError
from adapters_zoo.format import Adapter, new_adapter
from adapters_zoo.inject import adapter_parameters, attach, extract
from adapters_zoo.loop import Batches, Schedule, completion_logits, completion_loss_sum, kl_sum, optimize
from adapters_zoo.models import adapter_disabled, frozen_base, resolve_device, target_layers
from adapters_zoo.signatures import attach_signature, signature_from_prompts
from adapters_zoo.train_config import TrainConfig
from adapters_zoo.train_resume import load_checkpoint, save_checkpoint
from adapters_zoo.train_runtime import (
    all_reduce_grads,
    all_reduce_sum,
    autocast,
    cast_base,
    grad_scaler,
    gradient_checkpointing,
    precision_dtype,
    world,
)

LOSS_WINDOW = 10  # final_loss is the mean over this many last steps (one batch is noisy)
# Prompts whose base features make the signature train stores: a forward pass over them costs
# minutes on a real base on CPU, and the centroid of the first 64 is already the task's.
TRAIN_SIGNATURE_PROMPTS = 64


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
