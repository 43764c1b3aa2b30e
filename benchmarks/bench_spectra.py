"""Does full fine-tuning mostly amplify the top singular values? (SpecLoRA, arXiv 2505.23099)

The paper (https://arxiv.org/abs/2505.23099) finds that full fine-tuning mostly amplifies
the top singular values of each weight, reorients the top singular vectors and leaves the
rest of the spectrum stable. This script checks that on a real fine-tune:

1. the base: SmolLM2-135M-Instruct (``specfuse base fetch``; default), or the toy char base
   (``--base char``: the demo base, pretrained here and cached);
2. for each task (chat tasks of :mod:`adapters_zoo.tasks.chat` on the real base, string ops
   on the char base) and learning rate, fully fine-tune a copy of the base on its train split
   (AdamW on every parameter, the loss on the answer only: the assistant turn, or the
   completion), with :func:`adapters_zoo.loop.optimize`, and save it;
3. test accuracy before and after (the task's checker, greedy decoding), so we know the
   fine-tune learned the task; ``adapters_zoo.analysis_report.analyze(base, tuned)`` on every
   linear layer (q, k, v, o, gate, up, down of every block).

Writes ``benchmarks/results/smollm2/spectra.{md,json,png}`` (the char base:
``benchmarks/results/spectra.*``) and each run's report (Markdown and plots) under
``spectra/<run>/`` beside them. Checkpoints, the full per-layer reports and the per-run cache
live in ``benchmarks/results/tmp/`` (ignored by git); a rerun reuses every finished fine-tune.

    python benchmarks/bench_spectra.py            # real base, 3 tasks
    python benchmarks/bench_spectra.py --quick    # one task, 6 steps, two blocks analysed: minutes
    python benchmarks/bench_spectra.py --base char
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# On a busy machine, spinning OpenMP threads make a 2-thread run up to 10x slower (measured);
# must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import RESULTS, SCRATCH, environment, environment_line, read_cached, set_threads, write_cached  # noqa: E402

from adapters_zoo.analysis_report import analyze, markdown_table, write_report  # noqa: E402
from adapters_zoo.data import encode_examples, pad_batch, pad_id_of  # noqa: E402
from adapters_zoo.loop import Batches, Schedule, completion_logits, completion_loss_sum, optimize  # noqa: E402
from adapters_zoo.models import load_model_dir  # noqa: E402

REAL_BASE = "smollm2-135m-instruct"
CHAR_BASE = "char"
MAX_LENGTH = 256  # chat examples are < 160 tokens, string-op examples < 40
SHARE_KS = (1, 4, 8, 16, 32, 64)  # where the md table reads the share curves
PROFILE_MID = (4, 6)  # profile bins averaged as "the middle of the spectrum"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Settings:
    base: str = REAL_BASE
    tasks: tuple[str, ...] = ("order_date_iso", "phone_digits", "job_upper")
    lrs: tuple[float, ...] = (1e-5,)
    steps: int = 30
    batch_size: int = 8
    n_train: int = 240  # steps × batch: each example seen once
    n_test: int = 50
    top: int = 32  # top-k directions: the zoo's basis k
    seed: int = 0
    threads: int = 2
    blocks: tuple[int, ...] | None = None  # blocks analysed (None: every block); quick: the first and last
    max_new_tokens: int = 48
    model_dir: Path | None = None  # a model directory instead of fetching ``base`` (tests: a tiny model)
    bases_home: Path | None = None
    work: Path | None = None  # checkpoints and cache; None: benchmarks/results/tmp/spectra-{base}
    out: Path | None = None  # None: benchmarks/results/smollm2 (char: benchmarks/results)
    stem: str = "spectra"
    note: str = ""  # shown under the title (e.g. what a partial run left out)

    @classmethod
    def for_base(cls, base: str, quick: bool, **overrides) -> Settings:
        """Defaults per base; ``quick``: one task, a few steps, the first and last block analysed."""
        s = cls(base=base)
        if base == CHAR_BASE:
            s.tasks, s.lrs, s.steps, s.batch_size, s.n_train, s.n_test, s.top = (
                ("reverse", "cipher", "sort"), (1e-4, 3e-4, 1e-3), 300, 32, 2000, 100, 16)
        if quick:
            s.tasks, s.lrs, s.steps, s.batch_size, s.n_train, s.n_test = s.tasks[:1], s.lrs[:1], 6, 4, 24, 8
            s.top, s.blocks, s.stem = min(s.top, 16), (0, -1), "spectra_quick"
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        s.work = Path(s.work) if s.work else SCRATCH / f"spectra-{base}"
        s.out = Path(s.out) if s.out else (RESULTS if base == CHAR_BASE else RESULTS / "smollm2")
        return s


# ---------------------------------------------------------------- the base and its tasks


@dataclass
class TaskFamily:
    """What differs between the two bases' tasks: how a task is found, split and scored."""

    task: Callable[[str], Any]
    split: Callable[[Any, str, int, int], list[dict]]
    score: Callable[[Any, Any, Any, list[dict]], float]  # (model, tokenizer, task, examples) -> accuracy


def task_family(settings: Settings) -> TaskFamily:
    if settings.base == CHAR_BASE:
        from adapters_zoo.tasks import evaluate, make_split, suite_tasks

        tasks = {t.name: t for t in suite_tasks("conflicting")}
        return TaskFamily(tasks.__getitem__, make_split, lambda model, tok, task, ex: evaluate(model, tok, ex))
    from adapters_zoo.tasks.chat import chat_task, evaluate_chat, make_chat_split

    return TaskFamily(chat_task, make_chat_split, lambda model, tok, task, ex: evaluate_chat(
        model, tok, task, ex, settings.max_new_tokens))


def base_dir(settings: Settings) -> Path:
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    if settings.base == CHAR_BASE:
        from adapters_zoo.demo_model import QUICK_STEPS, pretrain_base

        return pretrain_base(settings.work / "base", seed=settings.seed, steps=QUICK_STEPS)
    from adapters_zoo.bases import fetch_base

    return fetch_base(settings.base, settings.bases_home, progress=False).path


def analysed_targets(model_dir: Path, blocks: tuple[int, ...] | None) -> list[str] | None:
    """Layer names of ``blocks`` (negative: from the end); None = every linear layer."""
    if blocks is None:
        return None
    n = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return [f"layers.{b % n}.{m}" for b in dict.fromkeys(b % n for b in blocks) for m in MODULES]


# ---------------------------------------------------------------- fine-tune, score, analyse


def full_finetune(model_dir: Path, examples: list[dict], out_dir: Path, lr: float, settings: Settings) -> dict:
    """Every parameter trained with AdamW on ``examples`` (loss on the answer); saves the model in ``out_dir``."""
    model, tokenizer = load_model_dir(model_dir, "cpu")
    model.train()  # SmolLM2 and the char base have no dropout: train mode changes nothing but intent
    model.requires_grad_(True)
    torch.manual_seed(settings.seed)
    rows = [row[:2] for row in encode_examples(tokenizer, examples, MAX_LENGTH)]
    batches = Batches(rows, settings.batch_size, torch.Generator().manual_seed(settings.seed))
    pad_id = pad_id_of(tokenizer)
    step_seconds: list[float] = []
    clock = [time.perf_counter()]

    def loss_fn(step: int) -> torch.Tensor:
        batch = pad_batch(batches.next(), pad_id, "cpu")
        loss_sum, count = completion_loss_sum(completion_logits(model, batch), batch["labels"])
        return loss_sum / max(count, 1)

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        step_seconds.append(now - clock[0])
        clock[0] = now

    # weight decay 0: decay shrinks every σ alike and would blur "which σ moved"
    losses = optimize(model.parameters(), loss_fn, Schedule.with_warmup_ratio(settings.steps, lr, 0.1),
                      on_step=on_step)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    window = max(1, min(10, len(losses) // 3))
    return {"first_loss": statistics.fmean(losses[:window]), "last_loss": statistics.fmean(losses[-window:]),
            "seconds": round(sum(step_seconds), 1), "seconds_per_step": round(statistics.median(step_seconds), 2)}


def accuracy(model_dir: Path, family: TaskFamily, task, examples: list[dict]) -> float:
    model, tokenizer = load_model_dir(model_dir, "cpu")
    return family.score(model, tokenizer, task, examples)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def before_accuracy(model_dir: Path, family: TaskFamily, name: str, test: list[dict], settings: Settings) -> float:
    key = {"model": str(model_dir), "test": _digest(test), "max_new_tokens": settings.max_new_tokens}
    path = settings.work / "cache" / f"before-{name}.json"
    done = read_cached(path, key)
    if done is None:
        done = {"accuracy": accuracy(model_dir, family, family.task(name), test)}
        write_cached(path, key, done)
    return done["accuracy"]


def run_one(name: str, lr: float, model_dir: Path, family: TaskFamily, settings: Settings) -> dict:
    """Fine-tune task ``name`` at ``lr``, score it, analyse base vs tuned (cached per run)."""
    run = f"{name}-lr{lr:g}"
    task = family.task(name)
    train = family.split(task, "train", settings.n_train, settings.seed)
    test = family.split(task, "test", settings.n_test, settings.seed)
    targets = analysed_targets(model_dir, settings.blocks)
    key = {"model": str(model_dir), "lr": lr, "steps": settings.steps, "batch_size": settings.batch_size,
           "seed": settings.seed, "train": _digest(train), "test": _digest(test), "top": settings.top,
           "targets": targets, "max_new_tokens": settings.max_new_tokens}
    cache = settings.work / "cache" / f"run-{run}.json"
    done = read_cached(cache, key)
    if done is not None:
        return done
    before = before_accuracy(model_dir, family, name, test, settings)
    tuned_dir = settings.work / f"tuned-{run}"
    train_key = {k: key[k] for k in ("model", "lr", "steps", "batch_size", "seed", "train")}
    stats = read_cached(tuned_dir / "train.json", train_key)
    if stats is None:
        print(f"[{run}] full fine-tune: {settings.steps} steps of batch {settings.batch_size}", file=sys.stderr)
        stats = full_finetune(model_dir, train, tuned_dir, lr, settings)
        write_cached(tuned_dir / "train.json", train_key, stats)
    after = accuracy(tuned_dir, family, task, test)
    print(f"[{run}] accuracy {before:.2f} -> {after:.2f}; analysing", file=sys.stderr)
    result = analyze(model_dir, tuned_dir, top_k=settings.top, targets=targets, progress=False)
    report_dir = settings.work / "reports" / run
    written = write_report(result, report_dir)
    shown = settings.out / settings.stem / run  # the report and plots; the per-layer JSON stays in work
    shown.mkdir(parents=True, exist_ok=True)
    for path in written.values():
        if path.suffix in (".md", ".png"):
            shutil.copyfile(path, shown / path.name)
    layers = list(result["layers"].values())
    record = {
        "run": run, "task": name, "lr": lr, "train": stats, "accuracy": {"before": before, "after": after},
        "n_layers": len(layers), "shapes": sorted({tuple(lay["shape"]) for lay in layers}),
        "summary": result["summary"], "share_curve": _mean_share_curve(layers),
        "ratio_profile": _mean_rows([lay["sigma_ratio_profile"] for lay in layers]),
        "angles_left_deg": _mean_rows([lay["angles_left_deg"] for lay in layers]),
        "angles_right_deg": _mean_rows([lay["angles_right_deg"] for lay in layers]),
    }  # fmt: skip
    write_cached(cache, key, record)
    return json.loads(json.dumps(record))  # as a cached record reads back (tuples become lists)


def _mean_rows(rows: list[list]) -> list[float]:
    """Column means over layers (None skipped), over the columns every layer has."""
    return [statistics.fmean(v for v in col if v is not None) for col in zip(*rows)]


def _mean_share_curve(layers: list[dict]) -> dict[str, dict[int, float]]:
    """Mean over layers of each share curve, at the k every layer keeps (powers of two, top_k)."""
    curves = [lay["share_curve"] for lay in layers if lay["share_curve"]["two_sided"]]
    common = sorted(set.intersection(*(set(c["k"]) for c in curves)))
    out: dict[str, dict[int, float]] = {}
    for key in ("two_sided", "left", "right"):
        out[key] = {k: statistics.fmean(c[key][c["k"].index(k)] for c in curves) for k in common}
    shapes = [lay["shape"] for lay in layers]
    out["random_two_sided"] = {k: statistics.fmean(min(k, min(s)) ** 2 / (s[0] * s[1]) for s in shapes)
                               for k in common}  # fmt: skip
    return out


# ---------------------------------------------------------------- report


def _m(run: dict, metric: str, stat: str = "mean", group: str | None = None):
    s = (run["summary"]["by_type"][group] if group else run["summary"]["all"]).get(metric)
    return s[stat] if s else None


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    return str(int(v)) if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1 else f"{v:.{digits}g}"


def _span(values: list[float], digits: int = 3) -> str:
    lo, hi = min(values), max(values)
    return _f(lo, digits) if _f(lo, digits) == _f(hi, digits) else f"{_f(lo, digits)}–{_f(hi, digits)}"


def _curve(run: dict, name: str, k: int):
    return run["share_curve"][name].get(str(k), run["share_curve"][name].get(k))


def verdict(runs: list[dict], k: int) -> list[str]:
    """Numbers, not adjectives: each claim's measurement over all runs (min–max)."""

    def over(metric: str, stat: str = "mean") -> list[float]:
        return [_m(r, metric, stat) for r in runs]

    first = [r["ratio_profile"][0] for r in runs]
    middle = [statistics.fmean(r["ratio_profile"][PROFILE_MID[0] : PROFILE_MID[1]]) for r in runs]
    last = [r["ratio_profile"][-1] for r in runs]
    concentration = [_m(r, "share.two_sided") / _m(r, "share_random.two_sided") for r in runs]
    k90, own90 = over("k_for_share.0.9", "median"), over("delta_rank_for_share.0.9", "median")
    top_rel, tail_rel = over("sigma.top_rel_change"), over("sigma.tail_rel_change")
    gaps = [a - b for a, b in zip(over("sigma.top_ratio_mean"), over("sigma.tail_ratio_mean"))]
    amplified = min(gaps) > 0 and min(over("sigma.top_amplified_frac")) > 0.5
    left, right = over("angles.left_mean"), over("angles.right_mean")
    return [
        f"Amplification ({'holds' if amplified else 'does not hold'}): the top-{k} singular values change by a "
        f"mean factor {_span(over('sigma.top_ratio_mean'), 4)}, the rest by {_span(over('sigma.tail_ratio_mean'), 4)}; "
        f"{_span(over('sigma.top_amplified_frac'), 2)} of the top-{k} grow. By tenth of the spectrum: first "
        f"{_span(first, 4)}, middle {_span(middle, 4)}, last {_span(last, 4)}. Relative change of σ: top-{k} "
        f"{_span(top_rel, 2)}, rest {_span(tail_rel, 2)}.",
        f"Where ΔW lives: the top-{k} × top-{k} block holds {_span(over('share.two_sided'), 2)} of ‖ΔW‖² "
        f"({_span(concentration, 2)}× a random ΔW); one-sided {_span(over('share.left'), 2)} (left) and "
        f"{_span(over('share.right'), 2)} (right). 90% of ‖ΔW‖² needs k ≈ {_span(k90)} base directions "
        f"(two-sided, median over layers), while ΔW itself has 90% of its energy in rank {_span(own90)}.",
        f"Reorientation: mean principal angle between the base and tuned top-{k} subspaces {_span(left, 2)}° "
        f"(left), {_span(right, 2)}° (right), largest {_span(over('angles.left_max', 'max'), 2)}°; the first "
        f"singular vectors turn by {_span(over('angles.left_vec_first'), 2)}° (u_1) and "
        f"{_span(over('angles.right_vec_first'), 2)}° (v_1); ‖ΔW‖₂ / (σ_k − σ_k+1) "
        f"{_span(over('gap.delta_over_gap', 'median'), 2)} (median over layers).",
    ]


def verdict_lines(runs: list[dict], k: int) -> list[str]:
    """The verdict as Markdown bullets: one group per learning rate when the runs have several."""
    lrs = sorted({r["lr"] for r in runs})
    if len(lrs) == 1:
        return [f"- {v}" for v in verdict(runs, k)]
    lines = []
    for lr in lrs:
        group = [r for r in runs if r["lr"] == lr]
        strength = _span([_m(r, "rel_delta") for r in group], 2)
        lines += [f"At lr {lr:g} ({len(group)} runs, ‖ΔW‖/‖W‖ {strength}):", "",
                  *[f"- {v}" for v in verdict(group, k)], ""]
    return lines[:-1]


def _setup_line(record: dict) -> str:
    s, runs = record["settings"], record["runs"]
    shapes = ", ".join("×".join(map(str, sh)) for sh in runs[0]["shapes"])
    base = ("the toy char base (Llama, hidden 128, 4 layers, pretrained here)" if s["base"] == CHAR_BASE
            else f"`{s['base']}`")
    return (f"Setup: {base} fully fine-tuned on one task at a time: AdamW on every parameter (lr "
            f"{', '.join(f'{x:g}' for x in s['lrs'])}; 10% linear warmup, then cosine to 0; no weight decay; "
            f"gradient clip 1), {s['steps']} steps of batch {s['batch_size']} from {s['n_train']} train examples "
            f"(each seen about once), loss on the answer only. Accuracy on {s['n_test']} test examples (greedy, "
            f"the task's checker). {runs[0]['n_layers']} linear layers analysed (shapes {shapes}) with "
            f"`adapters_zoo.analysis_report.analyze`, top_k = {s['top']}. This invocation took "
        f"{record['seconds'] / 60:.1f} min (finished runs are read from the cache; training times per run below).")


def markdown(record: dict) -> str:
    runs, k = record["runs"], record["settings"]["top"]
    mid = PROFILE_MID
    lines = [
        "# Spectra of full fine-tuning (SpecLoRA's claim, arXiv 2505.23099)",
        "",
        *([f"> {record['settings']['note']}", ""] if record["settings"].get("note") else []),
        "Claim tested (https://arxiv.org/abs/2505.23099): full fine-tuning mostly amplifies the top singular "
        "values, reorients the top singular vectors, and leaves the rest of the spectrum stable.",
        "",
        _setup_line(record),
        "",
        f"Hardware: {environment_line(record['environment'])}. Seed {record['settings']['seed']}.",
        "",
        f"Reproduce: `{record['command']}`",
        "",
        "## Verdict",
        "",
        *verdict_lines(runs, k),
        "",
        "## Did the fine-tune learn the task?",
        "",
    ]
    lines += markdown_table(
        ["run", "accuracy before → after", "loss first → last", "s / step", "‖ΔW‖/‖W‖ (mean)"],
        [[r["run"], f"{r['accuracy']['before']:.2f} → {r['accuracy']['after']:.2f}",
          f"{r['train']['first_loss']:.3f} → {r['train']['last_loss']:.4f}", _f(r["train"]["seconds_per_step"]),
          _f(_m(r, "rel_delta"))] for r in runs],
    )  # fmt: skip
    lines += [
        "",
        "## Singular values: amplified at the top, stable in the rest?",
        "",
        f"σ_tuned[i]/σ_base[i] by index, mean over layers: top-{k}, the rest, and the mean ratio in the first, "
        f"middle ({mid[0] * 10}–{mid[1] * 10}%) and last tenth of the spectrum; relative change "
        f"‖σ'−σ‖/‖σ‖ of the top-{k} and of the rest.",
        "",
    ]
    lines += markdown_table(
        ["run", f"top-{k}", "rest", f"share of top-{k} that grew", "first 10%", "middle", "last 10%",
         f"rel. change top-{k}", "rel. change rest"],
        [[r["run"], _f(_m(r, "sigma.top_ratio_mean"), 4), _f(_m(r, "sigma.tail_ratio_mean"), 4),
          _f(_m(r, "sigma.top_amplified_frac")), _f(r["ratio_profile"][0], 4),
          _f(statistics.fmean(r["ratio_profile"][mid[0]:mid[1]]), 4), _f(r["ratio_profile"][-1], 4),
          _f(_m(r, "sigma.top_rel_change")), _f(_m(r, "sigma.tail_rel_change"))] for r in runs],
    )  # fmt: skip
    types = list(runs[0]["summary"]["by_type"])
    lines += ["", f"By module type (mean over runs and blocks): top-{k} σ ratio / rest σ ratio / relative "
              f"change top-{k} / rest / mean principal angle (left, °).", ""]
    lines += markdown_table(
        ["module", f"top-{k} ratio", "rest ratio", f"rel. change top-{k}", "rel. change rest", "angle left"],
        [[t] + [_f(statistics.fmean(_m(r, metric, group=t) for r in runs), 4)
                for metric in ("sigma.top_ratio_mean", "sigma.tail_ratio_mean", "sigma.top_rel_change",
                               "sigma.tail_rel_change", "angles.left_mean")] for t in types],
    )  # fmt: skip
    lines += [
        "",
        "## Where does ΔW live in the base's singular basis?",
        "",
        "Share of ‖ΔW‖_F² in the base's top-k directions, two-sided ‖U_kᵀΔWV_k‖², mean over layers; in "
        "brackets the share a random ΔW would have there (k²/(out·in)).",
        "",
    ]
    ks = [kk for kk in SHARE_KS if _curve(runs[0], "random_two_sided", kk) is not None]
    lines += markdown_table(
        ["run"] + [f"k={kk} ({_f(_curve(runs[0], 'random_two_sided', kk), 2)})" for kk in ks],
        [[r["run"]] + [_f(_curve(r, "two_sided", kk)) for kk in ks] for r in runs],
    )
    lines += [
        "",
        f"One-sided shares at k = {k}, and the k, median over layers, at which the two-sided share reaches "
        "50/80/90%, against the rank ΔW itself needs for 90% of its energy:",
        "",
    ]
    lines += markdown_table(
        ["run", "left ‖U_kᵀΔW‖²", "right ‖ΔWV_k‖²", "k for 50%", "80%", "90%", "90% left / right",
         "rank(ΔW) for 90%"],
        [[r["run"], _f(_m(r, "share.left")), _f(_m(r, "share.right"))]
         + [_f(_m(r, f"k_for_share.{t}", "median")) for t in ("0.5", "0.8", "0.9")]
         + [f"{_f(_m(r, 'k_for_share_left.0.9', 'median'))} / {_f(_m(r, 'k_for_share_right.0.9', 'median'))}",
            _f(_m(r, "delta_rank_for_share.0.9", "median"))] for r in runs],
    )  # fmt: skip
    lines += [
        "",
        f"## Top-{k} singular vectors: reoriented?",
        "",
        f"Principal angles (degrees) between the base and tuned top-{k} singular subspaces (mean over layers of "
        "each layer's mean, and the largest anywhere); the angle between the first singular vectors, "
        "∠(u_1, u'_1) and ∠(v_1, v'_1), mean over layers; and ‖ΔW‖₂ / (σ_k − σ_k+1), median over layers: "
        "at ≳ 1 the k-th direction can trade places with its neighbours, so the largest principal angles "
        "say little about the leading directions.",
        "",
    ]
    lines += markdown_table(
        ["run", "left mean", "left max", "right mean", "right max", "∠(u_1, u'_1)", "∠(v_1, v'_1)", "‖ΔW‖₂/gap_k"],
        [[r["run"], _f(_m(r, "angles.left_mean")), _f(_m(r, "angles.left_max", "max")),
          _f(_m(r, "angles.right_mean")), _f(_m(r, "angles.right_max", "max")),
          _f(_m(r, "angles.left_vec_first")), _f(_m(r, "angles.right_vec_first")),
          _f(_m(r, "gap.delta_over_gap", "median"))] for r in runs],
    )  # fmt: skip
    stem = record["settings"]["stem"]
    lines += ["", f"![spectra]({stem}.png)", "",
              "Per-run reports (every layer, more plots): "
              + ", ".join(f"[{r['run']}]({stem}/{r['run']}/report.md)" for r in runs), ""]
    return "\n".join(lines)


def figure(runs: list[dict], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    lrs = sorted({r["lr"] for r in runs})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in runs:
        color, ls = f"C{tasks.index(r['task'])}", styles[lrs.index(r["lr"]) % len(styles)]
        bins = len(r["ratio_profile"])
        axes[0].plot([(b + 0.5) / bins for b in range(bins)], r["ratio_profile"], ls, marker="o", ms=3,
                     color=color, label=r["run"])  # fmt: skip
        ks = sorted(int(kk) for kk in r["share_curve"]["two_sided"])
        axes[1].plot(ks, [_curve(r, "two_sided", kk) for kk in ks], ls, marker="o", ms=3, color=color,
                     label=r["run"])  # fmt: skip
        axes[2].plot(range(1, len(r["angles_left_deg"]) + 1), r["angles_left_deg"], ls, color=color, label=r["run"])
    ks = sorted(int(kk) for kk in runs[0]["share_curve"]["random_two_sided"])
    axes[1].plot(ks, [_curve(runs[0], "random_two_sided", kk) for kk in ks], color="grey", lw=2, alpha=0.6,
                 label="random ΔW")  # fmt: skip
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="position in spectrum (i / rank)", ylabel="mean σ_tuned / σ_base (over layers)",
                title="singular value ratio across the spectrum")  # fmt: skip
    axes[1].set(xscale="log", xlabel="k", ylabel="share of ‖ΔW‖² in U_k × V_k (mean over layers)", ylim=(0, 1.02),
                title="ΔW inside the base's top-k directions")  # fmt: skip
    axes[2].set(xlabel="principal angle index (ascending)", ylabel="degrees (mean over layers)",
                title=f"left top-{k} subspaces, base vs tuned")  # fmt: skip
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("colour: task; line style: learning rate", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(settings: Settings, command: str) -> dict:
    """Every task × learning rate (finished runs reused); writes the JSON, Markdown and plot; returns the record."""
    set_threads(settings.threads)
    start = time.perf_counter()
    family = task_family(settings)
    model_dir = base_dir(settings)
    runs = [run_one(name, lr, model_dir, family, settings) for name in settings.tasks for lr in settings.lrs]
    record = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
              "command": command, "environment": environment(), "seconds": round(time.perf_counter() - start, 1),
              "paper": "https://arxiv.org/abs/2505.23099", "runs": runs}  # fmt: skip
    settings.out.mkdir(parents=True, exist_ok=True)
    figure(runs, settings.top, settings.out / f"{settings.stem}.png")
    (settings.out / f"{settings.stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (settings.out / f"{settings.stem}.md").write_text(markdown(record))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=REAL_BASE, choices=(REAL_BASE, CHAR_BASE))
    p.add_argument("--quick", action="store_true", help="one task, 6 steps, two blocks analysed: minutes")
    p.add_argument("--tasks", help="comma-separated task names (default: per base)")
    p.add_argument("--lrs", help="comma-separated AdamW learning rates, one fine-tune each")
    for name in ("steps", "batch-size", "n-train", "n-test", "top", "seed", "threads"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--model-dir", type=Path, help="a model directory to fine-tune instead of the named base")
    p.add_argument("--bases-home", type=Path, help="where fetched bases live (default: $SPECFUSE_HOME)")
    p.add_argument("--work", type=Path, help="checkpoints and cache (default under benchmarks/results/tmp)")
    p.add_argument("--out", type=Path, help="results folder")
    p.add_argument("--note", help="a line shown under the report's title")
    args = p.parse_args(argv)
    settings = Settings.for_base(
        args.base, args.quick, tasks=tuple(args.tasks.split(",")) if args.tasks else None,
        lrs=tuple(float(x) for x in args.lrs.split(",")) if args.lrs else None, steps=args.steps,
        batch_size=args.batch_size, n_train=args.n_train, n_test=args.n_test, top=args.top, seed=args.seed,
        threads=args.threads, model_dir=args.model_dir, bases_home=args.bases_home, work=args.work, out=args.out,
        note=args.note)
    command = "python " + shlex.join(["benchmarks/bench_spectra.py", *(argv if argv is not None else sys.argv[1:])])
    record = run(settings, command)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
