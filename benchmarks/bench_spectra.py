"""Does full fine-tuning mostly amplify the top singular values? (SpecLoRA, arXiv 2505.23099)

The paper (https://arxiv.org/abs/2505.23099) finds that full fine-tuning mostly amplifies
the top singular values of each weight, reorients the top singular vectors and leaves the
rest of the spectrum stable. This script checks that on the demo base:

1. pretrain the demo base (``adapters_zoo.demo_model.pretrain_base``, cached);
2. for each task, write its train split as JSON Lines, fully fine-tune a copy of the base
   on it (AdamW, every parameter, loss on the completion), save it;
3. ``adapters_zoo.analysis.analyze(base, tuned)`` on every linear layer; exact match on the
   test split before and after, so we know the fine-tune learned the task.

Writes benchmarks/results/spectra.md, spectra.json, spectra.png, and one full analysis
report per run (task × learning rate) under benchmarks/results/spectra/<run>/. Checkpoints
go to benchmarks/results/tmp/ (ignored by git). 9 fine-tunes take about 5 minutes on 2 busy
CPU cores, plus 2.5 minutes to pretrain the base the first time (cached after):

    python benchmarks/bench_spectra.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

# On a busy machine, spinning OpenMP threads make a 2-thread run up to 10x slower (measured);
# must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from adapters_zoo.analysis_report import analyze, markdown_table, write_report  # noqa: E402
from adapters_zoo.demo_model import QUICK_STEPS, pretrain_base, save_model  # noqa: E402
from adapters_zoo.tasks import evaluate, make_split, suite_tasks, write_jsonl  # noqa: E402
from adapters_zoo.train import encode_example, load_examples, load_model_dir, pad_batch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Conflicting suite: one input kind (lowercase strings), three unrelated skills.
DEFAULT_TASKS = ("reverse", "cipher", "sort")
SHARE_KS = (1, 4, 8, 16, 32, 64)  # where the md table reads the share curves
MAX_LENGTH = 256  # task sequences are < 40 tokens


def _batch(tokenizer, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Prompt+completion, right padded; labels only on the completion (eos included), as `specfuse train`."""
    rows = [encode_example(tokenizer, ex, MAX_LENGTH)[:2] for ex in examples]
    return pad_batch(rows, tokenizer.pad_token_id, "cpu")


def full_finetune(base_dir: Path, data: Path, out_dir: Path, lr: float, args) -> dict:
    """Every parameter trained with AdamW on ``data`` (JSONL); saves the tuned model in ``out_dir``."""
    model, tokenizer = load_model_dir(base_dir, "cpu")
    model.train()
    torch.manual_seed(args.seed)
    examples = load_examples(data)
    rng = random.Random(args.seed)
    # weight_decay 0: decay shrinks every σ alike and would blur "which σ moved"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:  # linear warmup over the first 10%, then constant
            group["lr"] = lr * min(1.0, (step + 1) / max(1, args.steps // 10))
        loss = model(**_batch(tokenizer, rng.sample(examples, args.batch_size))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    save_model(model.eval(), tokenizer, out_dir)
    return {"first_loss": statistics.fmean(losses[:10]), "last_loss": statistics.fmean(losses[-10:]),
            "seconds": round(seconds, 1)}  # fmt: skip


def exact_match(model_dir: Path, examples: list[dict[str, str]]) -> float:
    model, tokenizer = load_model_dir(model_dir, "cpu")
    return evaluate(model, tokenizer, examples)


def run_one(task, lr: float, base_dir: Path, before: float, args) -> dict:
    """Fine-tune ``task`` at ``lr``, score it, analyse base vs tuned; writes the run's full report."""
    name = f"{task.name}-lr{lr:g}"
    data = args.work / "data" / f"{task.name}.train.jsonl"
    if not data.is_file():
        write_jsonl(data, make_split(task, "train", args.n_train, args.seed))
    tuned_dir = args.work / f"tuned-{name}"
    print(f"[{name}] full fine-tune: {args.steps} steps", file=sys.stderr)
    train = full_finetune(base_dir, data, tuned_dir, lr, args)
    after = exact_match(tuned_dir, make_split(task, "test", args.n_test, args.seed))
    result = analyze(base_dir, tuned_dir, top_k=args.top, progress=False)
    write_report(result, RESULTS / "spectra" / name)
    layers = list(result["layers"].values())
    return {
        "run": name, "task": task.name, "lr": lr, "prompt": task.prompt("abc"), "train": train,
        "exact_match": {"before": before, "after": after}, "summary": result["summary"],
        "share_curve": _mean_share_curve(layers),
        "ratio_profile": _mean_rows([lay["sigma_ratio_profile"] for lay in layers]),
        "angles_left_deg": _mean_rows([lay["angles_left_deg"] for lay in layers]),
        "angles_right_deg": _mean_rows([lay["angles_right_deg"] for lay in layers]),
    }  # fmt: skip


def _mean_rows(rows: list[list]) -> list[float]:
    """Column means over layers (None skipped); layers here all have the same length."""
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


def _m(run: dict, metric: str, stat: str = "mean"):
    s = run["summary"]["all"].get(metric)
    return s[stat] if s else None


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    return str(int(v)) if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1 else f"{v:.{digits}g}"


def markdown(runs: list[dict], args, seconds: float) -> str:
    k = args.top
    lrs = ", ".join(f"{lr:g}" for lr in args.lrs)
    mid = PROFILE_MID
    lines = [
        "# Spectra of full fine-tuning (SpecLoRA's claim, arXiv 2505.23099)",
        "",
        "Claim tested (https://arxiv.org/abs/2505.23099): full fine-tuning mostly amplifies the top singular "
        "values, reorients the top singular vectors, and leaves the rest of the spectrum stable.",
        "",
        f"Setup: the demo base (Llama, hidden 128, 4 layers, {args.pretrain_steps} pretraining steps on every op "
        f"under its own key) fully fine-tuned on one task at a time (a new prefix for a known op): AdamW "
        f"(lr {lrs}; 10% warmup, then constant; no weight decay; grad clip 1), {args.steps} steps of batch "
        f"{args.batch_size} from {args.n_train} train examples. All 28 linear layers (q,k,v,o,gate,up,down × 4; "
        f"rank 128) analysed with `adapters_zoo.analysis.analyze`, top_k = {k}. "
        f"Total {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads.",
        "",
        "Reproduce: `python benchmarks/bench_spectra.py` (defaults: "
        + " ".join(
            f"--{a} {v}"
            for a, v in (
                ("steps", args.steps),
                ("lrs", ",".join(f"{x:g}" for x in args.lrs)),
                ("top", k),
                ("seed", args.seed),
            )
        )  # fmt: skip
        + ")",
        "",
        "## Verdict",
        "",
        *[f"- {v}" for v in verdict(runs, k)],
        "",
        "## Did the fine-tune learn the task?",
        "",
    ]
    lines += markdown_table(
        ["run", "prompt", "exact match before → after", "loss first → last", "‖ΔW‖/‖W‖ (mean)"],
        [[r["run"], f"`{r['prompt']}`", f"{r['exact_match']['before']:.2f} → {r['exact_match']['after']:.2f}",
          f"{r['train']['first_loss']:.3f} → {r['train']['last_loss']:.4f}", _f(_m(r, "rel_delta"))]
         for r in runs],
    )  # fmt: skip
    lines += [
        "",
        "## Singular values: amplified at the top, stable in the rest?",
        "",
        f"σ_tuned[i]/σ_base[i] by index, mean over layers: top-{k}, the rest, and the mean ratio in the first, "
        f"middle ({mid[0] * 10}–{(mid[1]) * 10}%) and last tenth of the spectrum; relative change "
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
    lines += [
        "",
        "## Where does ΔW live in the base's singular basis?",
        "",
        "Share of ‖ΔW‖_F² in the base's top-k directions, two-sided ‖U_kᵀΔWV_k‖², mean over layers; in "
        "brackets the share a random ΔW would have there (k²/(out·in)). At k = 128 the share is < 1 for the "
        "rectangular MLP layers, whose 128 directions do not span the 256-wide side.",
        "",
    ]
    c0 = runs[0]["share_curve"]["random_two_sided"]
    lines += markdown_table(
        ["run"] + [f"k={kk} ({_f(c0.get(kk), 2)})" for kk in SHARE_KS],
        [[r["run"]] + [_f(r["share_curve"]["two_sided"].get(kk)) for kk in SHARE_KS] for r in runs],
    )
    lines += [
        "",
        f"One-sided shares at k = {k} (random: {_f(k / 128, 2)} on a 128-wide side), and the k, median over "
        "layers, at which the share reaches 50/80/90%, against the rank ΔW itself needs for 90% of its energy:",
        "",
    ]
    lines += markdown_table(
        ["run", "left ‖U_kᵀΔW‖²", "right ‖ΔWV_k‖²", "k for 50% (two-sided)", "80%", "90%",
         "90% left / right", "rank(ΔW) for 90%"],
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
    lines += [
        "",
        "![spectra](spectra.png)",
        "",
        "Per-run reports (every layer, more plots): "
        + ", ".join(f"[{r['run']}](spectra/{r['run']}/report.md)" for r in runs),
        "",
    ]
    return "\n".join(lines)


PROFILE_MID = (4, 6)  # profile bins averaged as "the middle of the spectrum"


def verdict(runs: list[dict], k: int) -> list[str]:
    """Numbers, not adjectives: each claim's measurement over all runs (min–max)."""

    def span(values: list[float], digits: int = 3) -> str:
        lo, hi = min(values), max(values)
        return _f(lo, digits) if _f(lo, digits) == _f(hi, digits) else f"{_f(lo, digits)}–{_f(hi, digits)}"

    def over(metric: str, stat: str = "mean") -> list[float]:
        return [_m(r, metric, stat) for r in runs]

    first = [r["ratio_profile"][0] for r in runs]
    middle = [statistics.fmean(r["ratio_profile"][PROFILE_MID[0] : PROFILE_MID[1]]) for r in runs]
    last = [r["ratio_profile"][-1] for r in runs]
    concentration = [_m(r, "share.two_sided") / _m(r, "share_random.two_sided") for r in runs]
    k90, own90 = over("k_for_share.0.9", "median"), over("delta_rank_for_share.0.9", "median")
    spread = (
        "so ΔW is low-rank but mostly outside the base's top directions"
        if min(k90) > 64 and max(own90) < 32
        else "see the table below"
    )
    gaps = [a - b for a, b in zip(over("sigma.top_ratio_mean"), over("sigma.tail_ratio_mean"))]
    top_vs_rest = "more" if min(gaps) > 0 else "not always more"
    return [
        f"Amplification: the top-{k} singular values grow by a mean factor "
        f"{span(over('sigma.top_ratio_mean'), 4)}, {top_vs_rest} than the rest "
        f"({span(over('sigma.tail_ratio_mean'), 4)}); by tenth of the spectrum: first {span(first, 4)}, "
        f"middle {span(middle, 4)}, last {span(last, 4)}; {span(over('sigma.top_amplified_frac'), 2)} of the "
        f"top-{k} grow. Relative change of σ: top-{k} {span(over('sigma.top_rel_change'), 2)}, rest "
        f"{span(over('sigma.tail_rel_change'), 2)}.",
        f"Where ΔW lives: the top-{k} × top-{k} block holds {span(over('share.two_sided'), 2)} of ‖ΔW‖² "
        f"({span(concentration, 2)}× a random ΔW); one-sided {span(over('share.left'), 2)} (left) and "
        f"{span(over('share.right'), 2)} (right). Half of ‖ΔW‖² needs k ≈ "
        f"{span(over('k_for_share.0.5', 'median'))} of 128 (two-sided), 90% needs {span(k90)}, while ΔW "
        f"itself has 90% of its energy in rank {span(own90)}: {spread}.",
        f"Reorientation: mean principal angle of the top-{k} subspaces {span(over('angles.left_mean'), 2)}° "
        f"(left), {span(over('angles.right_mean'), 2)}° (right); the first singular vectors turn by "
        f"{span(over('angles.left_vec_first'), 2)}° (u_1) and {span(over('angles.right_vec_first'), 2)}° (v_1).",
    ]


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
        ks = sorted(r["share_curve"]["two_sided"])
        axes[1].plot(ks, [r["share_curve"]["two_sided"][kk] for kk in ks], ls, marker="o", ms=3, color=color,
                     label=r["run"])  # fmt: skip
        axes[2].plot(range(1, len(r["angles_left_deg"]) + 1), r["angles_left_deg"], ls, color=color, label=r["run"])
    c0 = runs[0]["share_curve"]["random_two_sided"]
    ks = sorted(c0)
    axes[1].plot(ks, [c0[kk] for kk in ks], color="grey", lw=2, alpha=0.6, label="random ΔW")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="task names of the conflicting suite")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="AdamW learning rates, one fine-tune each")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--top", type=int, default=16, help="top-k directions (of rank 128)")
    p.add_argument("--pretrain-steps", type=int, default=QUICK_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=RESULTS / "tmp" / "spectra", help="checkpoints (git-ignored)")
    args = p.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    torch.set_num_threads(2)

    start = time.perf_counter()
    tasks = {t.name: t for t in suite_tasks("conflicting")}
    unknown = [n for n in args.tasks.split(",") if n not in tasks]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}; known: {', '.join(tasks)}")
    base_dir = pretrain_base(args.work / "base", seed=args.seed, steps=args.pretrain_steps)
    runs = []
    for name in args.tasks.split(","):
        before = exact_match(base_dir, make_split(tasks[name], "test", args.n_test, args.seed))
        runs += [run_one(tasks[name], lr, base_dir, before, args) for lr in args.lrs]
    seconds = time.perf_counter() - start

    RESULTS.mkdir(parents=True, exist_ok=True)
    figure(runs, args.top, RESULTS / "spectra.png")
    settings = {k: str(v) for k, v in vars(args).items() if k != "work"}
    record = {"args": settings, "seconds": round(seconds, 1), "runs": runs}
    (RESULTS / "spectra.json").write_text(json.dumps(record, indent=1))
    md = markdown(runs, args, seconds)
    (RESULTS / "spectra.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
