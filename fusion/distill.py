"""``distill``: fuse adapters by distilling every one of them into a single k×k core per layer.

The data-free methods (``linear``, ``ties``, ...) combine cores entry by entry and never see
what the adapters do; on a small model whose adapters each rewrite the same directions,
their sum answers no task at all. ``distill`` looks at behaviour instead, the route of
distillation-based merging (ProDistill, https://arxiv.org/abs/2502.12706, which also shows
that data-agnostic merging can be arbitrarily bad; it distills layer by layer on
activations, this distills end to end on output distributions): the fused adapter is a
student that must reproduce, on prompts of each source's own task, that source's
next-token distributions:

    min_C  Σₙ pₙ · E_{x ~ promptsₙ} KL( p(· | x; W + ΔWₙ) ‖ p(· | x; W + U_k C V_kᵀ) )

- The student is one dense ``core`` adapter (C per layer, k×k): the same size whatever the
  number of sources, stored, served and exported like any fused adapter. It starts from
  the mean of the sources' cores (``init``: any registered method, residuals projected).
- Teachers are the sources at full strength; the mixture weights pₙ (normalised to sum 1)
  are the share of each source's prompts in the training batches.
- Data are prompts only: each teacher completes its own prompts greedily (up to eos), so
  no labels are needed. Examples that carry a ``completion`` use it instead.
- The KL is taken on the positions that predict the completion (and its end), where the
  teacher's behaviour is the task; AdamW with warmup and cosine decay, clipping at 1.

Teacher logits are computed on the fly (each source's ΔW merged into the frozen base for
its rows of the batch, the exact weights restored after), so memory stays at one model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from adapters_zoo.basis import Basis, check_basis_matches_model
from adapters_zoo.data import IGNORE_INDEX, encode_example, pad_batch, pad_id_of
from adapters_zoo.errors import InvalidMixture, TrainingDataError
from adapters_zoo.format import Adapter, core_adapter
from adapters_zoo.inject import adapter_parameters, attach, extract
from adapters_zoo.loop import Batches, Schedule, completion_logits, optimize
from adapters_zoo.models import adapter_disabled, frozen_base, resolve_device
from fusion.distill_config import DistillConfig
from fusion.fuse import check_same_basis, check_weights, fuse
from fusion.merge import merged

Example = dict[str, str]
PAPER = "https://arxiv.org/abs/2502.12706"


@dataclass
class DistillStats:
    steps: int
    first_kl: float
    final_kl: float  # mean over the last 10 steps
    seconds: float
    examples: list[int]  # per source
    generated: int  # completions written by the teachers
    trainable_params: int


def on_device(adapter: Adapter, device) -> Adapter:
    """The same adapter with its tensors on ``device`` (teachers are merged there every step)."""
    params = {layer: {n: t.to(device) for n, t in p.items()} for layer, p in adapter.params.items()}
    return dataclasses.replace(adapter, params=params)


def dense_core(adapter: Adapter, layers: list[str], basis: Basis) -> Adapter:
    """A ``core`` adapter with a dense k×k C on every one of ``layers`` (zeros where ``adapter`` has none)."""
    cores = {}
    for layer in layers:
        C = adapter.core(layer, basis) if layer in adapter.params else None
        C = torch.zeros(basis[layer].k, basis[layer].k) if C is None else C
        cores[layer] = C.detach().to("cpu", torch.float32).clone()
    return core_adapter(basis, cores, meta=adapter.meta)


@torch.no_grad()
def teacher_rows(model, tokenizer, teacher: Adapter, basis: Basis, examples: list[Example], cfg: DistillConfig,
                 device) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(input ids, labels) per example: the given completion, or the teacher's greedy one (ids up to eos)."""
    rows: list[tuple[list[int], list[int]] | None] = [None] * len(examples)
    open_ = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) or not ex["prompt"]:
            raise TrainingDataError(f"example #{i}: expected {{'prompt': str[, 'completion': str]}}, got {ex!r}")
        if ex.get("completion"):
            rows[i] = encode_example(tokenizer, ex, cfg.max_length)[:2]
        else:
            open_.append(i)
    if open_:
        pad, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
        prompts = [encode_example(tokenizer, examples[i], cfg.max_length)[0] for i in open_]  # checks the length
        with merged(model, teacher, basis):
            for start in range(0, len(open_), cfg.batch_size):
                chunk = prompts[start : start + cfg.batch_size]
                batch = pad_batch([(p, []) for p in chunk], pad, device, left=True)
                width = batch["input_ids"].shape[1]
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad)[:, width:].tolist()
                for r, (p, gen) in enumerate(zip(chunk, out)):
                    if eos is not None and eos in gen:
                        gen = gen[: gen.index(eos) + 1]  # the student learns to stop too
                    gen = gen[: cfg.max_length - len(p)]
                    rows[open_[start + r]] = (p + gen, [IGNORE_INDEX] * len(p) + gen)
    return rows, len(open_)


def _kl_on_completions(teacher_logits, logits, labels) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over the positions that predict a completion token."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    log_p = F.log_softmax(teacher_logits, dim=-1)
    log_q = F.log_softmax(logits, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def distill_fuse(model: torch.nn.Module, tokenizer, basis: Basis, adapters: list[Adapter], weights: list[float],
                 data: list[list[Example]], cfg: DistillConfig | None = None, student: Adapter | None = None,
                 progress: bool = False, verify_basis: bool = True) -> tuple[Adapter, DistillStats]:
    """One dense ``core`` adapter distilled from ``adapters`` on their prompts ``data`` (see the module doc).

    ``student`` overrides the starting point (any trainable kind: a LoRA to compare like for
    like); the model is left as it came. Raises ``InvalidMixture`` for bad weights,
    ``TrainingDataError`` for missing or bad data, ``BasisMismatch`` when ``basis`` is not
    ``model``'s (``verify_basis=False`` when the caller checked already).
    """
    cfg = cfg or DistillConfig()
    cfg.validate()
    weights = check_weights(adapters, weights)
    check_same_basis(adapters, basis)
    if len(data) != len(adapters):
        raise TrainingDataError(f"{len(adapters)} adapters but {len(data)} prompt sets: one per adapter")
    total = sum(weights)
    if total <= 0:
        raise InvalidMixture("every weight is 0: nothing to distill")
    for i, (a, exs, w) in enumerate(zip(adapters, data, weights)):
        if w > 0 and not exs:
            raise TrainingDataError(f"adapter #{i} ({a.meta.get('name', a.kind)}) has weight {w} but no prompts")
    if verify_basis:
        check_basis_matches_model(basis, model)
    device = resolve_device(cfg.device)
    share = [w / total for w in weights]

    touched = sorted(set().union(*(a.params for a in adapters)), key=basis.layer_names().index)
    if student is None:
        start = fuse(adapters, share, basis, cfg.init, project=True)
        student = dense_core(start, touched, basis)
    student.check_against(basis)

    start_time = time.perf_counter()
    with frozen_base(model, device):
        teachers = [on_device(a, device) for a in adapters]
        rows, generated = [], 0
        for a, exs, w in zip(teachers, data, weights):
            r, g = teacher_rows(model, tokenizer, a, basis, exs, cfg, device) if w > 0 else ([], 0)
            rows.append(r)
            generated += g
        gen = torch.Generator().manual_seed(cfg.seed)
        draws = [Batches([(n, row) for row in r], 1, gen) if r else None for n, r in enumerate(rows)]
        pad = pad_id_of(tokenizer)
        attach(model, student, basis)

        def loss_fn(step: int) -> torch.Tensor:
            sources = torch.multinomial(torch.tensor(share), cfg.batch_size, replacement=True, generator=gen)
            picked = [draws[n].next()[0] for n in sorted(sources.tolist())]  # grouped by source
            batch = pad_batch([row for _, row in picked], pad, device)
            with torch.no_grad(), adapter_disabled(model):
                parts = []
                for n in sorted(set(sources.tolist())):  # each teacher on its own rows
                    index = [i for i, (m, _) in enumerate(picked) if m == n]
                    with merged(model, teachers[n], basis):
                        parts.append((index, completion_logits(model, {k: v[index] for k, v in batch.items()})))
                teacher = torch.cat([logits for _, logits in parts])  # rows already in source order
            return _kl_on_completions(teacher, completion_logits(model, batch), batch["labels"])

        def report(step: int, kl: float) -> None:
            if progress and (step % 50 == 0 or step == cfg.steps - 1):
                print(f"distill step {step + 1}/{cfg.steps}: KL {kl:.4f}", flush=True)

        kls = optimize(adapter_parameters(model), loss_fn,
                       Schedule.with_warmup_ratio(cfg.steps, cfg.lr, cfg.warmup_ratio), on_step=report,
                       diverged=lambda kl, step: f"distillation loss became {kl} at step {step}: lower lr "
                                                 f"(now {cfg.lr})")
        fused = extract(model, student)

    stats = DistillStats(cfg.steps, kls[0], sum(kls[-10:]) / len(kls[-10:]), round(time.perf_counter() - start_time, 3),
                         [len(r) for r in rows], generated, fused.num_params())
    fused.meta = {k: v for k, v in fused.meta.items() if k not in ("fusion", "projection", "train")}
    fused.meta["fusion"] = {
        "method": "distill",
        "paper": PAPER,
        "params": {k: v for k, v in asdict(cfg).items() if k != "device"},
        "weights": weights,
        "sources": [{"name": a.meta.get("name"), "kind": a.kind, "layers": len(a.params)} for a in adapters],
        "residuals": "distilled into the cores",
        "notes": [],
        "stats": asdict(stats),
    }
    return fused, stats

