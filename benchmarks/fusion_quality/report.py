"""Summaries, the goals' status, Markdown tables and plots from the runs of one benchmark.

Everything here reads the result dict the script writes as JSON (no model, no torch), so
the report can be rebuilt from a JSON file alone.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

GOAL_COMPATIBLE = 0.80  # normalized accuracy the 8-task fusion must keep on the compatible suite
ISO_CTS_VIT_B32 = 0.737  # best published LoRA merge (Iso-CTS, ViT-B/32, 8 tasks), for scale
GOAL_DISTILL = 0.95  # real base: distill keeps this much with all tasks fused (and beats its LoRA control)
CORE_SPACE_TSV = 0.9416  # Core Space + TSV, normalized accuracy, Llama-3-8B, 6 NLI tasks (published reference)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (suite, source, method, n): mean ± std over runs (draws and seeds)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["suite"], r["source"], r["method"], r["n"])].append(r)
    rows = []
    for (suite, source, method, n), rs in groups.items():
        norm, norm_std = _mean_std([r["mean_normalized"] for r in rs])
        acc, acc_std = _mean_std([r["mean_accuracy"] for r in rs])
        gen, _ = _mean_std([r.get("normalized_generation") for r in rs])
        chosen = Counter(_candidate_label(r["chosen"]) for r in rs).most_common()
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            for task, v in r["normalized"].items():
                if v is not None:
                    per_task[task].append(v)
        rows.append({
            "suite": suite, "source": source, "family": rs[0]["family"], "training": rs[0]["training"],
            "method": method, "n": n, "runs": len(rs),
            "mean_normalized": norm, "std_normalized": norm_std, "mean_accuracy": acc, "std_accuracy": acc_std,
            "normalized_generation": gen,
            "disagree": sum(r["disagree"] for r in rs if r.get("disagree") is not None),
            "per_task_normalized": {t: statistics.fmean(v) for t, v in per_task.items()},
            "chosen": ", ".join(f"{label} ×{count}" if len(rs) > 1 else label for label, count in chosen),
            "params": round(statistics.fmean(r["params"] for r in rs)),
            "bytes": round(statistics.fmean(r["bytes"] for r in rs)),
            "fusion_ms": statistics.median(r["fusion_ms"] for r in rs),
        })
    rows.sort(key=lambda r: (r["suite"], r["n"], -(r["mean_normalized"] or 0.0)))
    return rows


def mean_normalized(fused: dict[str, float], alone: dict[str, float]) -> float | None:
    """Mean over tasks of fused / individual accuracy (tasks whose adapter scores 0 alone left out)."""
    values = [fused[t] / alone[t] for t in fused if alone.get(t, 0) > 0]
    return statistics.fmean(values) if values else None


def _candidate_label(cand: dict[str, Any]) -> str:
    label = f"λ={cand['weight']:g}"
    return label + (f", d={cand['density']:g}" if cand.get("density") is not None else "")


def _is_naive(row: dict[str, Any]) -> bool:
    return row["family"] == "spectral" and row["training"] == "plain" and row["method"] == "linear"


def _is_distill(row: dict[str, Any]) -> bool:
    return row["method"] in ("distill", "distill:lora")


def _is_lora_merge(row: dict[str, Any]) -> bool:
    """PEFT's merges and exact task arithmetic on the LoRAs (not the LoRA distillation control)."""
    return (row["family"] == "peft" or row["method"] == "dense_ta") and not _is_distill(row)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(rows, key=lambda r: r["mean_normalized"], default=None)


def goals(summary: list[dict[str, Any]], suites: list[str], sizes: dict[str, int], chat: bool = False
          ) -> list[dict[str, Any]]:
    """The stated goals checked against the numbers, one entry per goal and suite."""
    if chat:
        return chat_goals(summary, suites, sizes)
    out = []
    for suite in suites:
        n = sizes[suite]
        rows = [r for r in summary if r["suite"] == suite and r["n"] == n and r["mean_normalized"] is not None]
        spectral = [r for r in rows if r["family"] == "spectral" and not r["source"].startswith("peft")]
        best_lora = _best([r for r in rows if _is_lora_merge(r)])
        best_spectral = _best(spectral)
        winners = [r for r in spectral if best_lora and r["mean_normalized"] > best_lora["mean_normalized"]
                   and r["bytes"] <= best_lora["bytes"]]
        best_small = _best(winners)
        out.append({
            "suite": suite, "n": n, "goal": "spectral fusion beats the best PEFT LoRA merge at equal or smaller size",
            "met": best_small is not None, "best_lora": _brief(best_lora), "best_spectral": _brief(best_spectral),
            "best_spectral_not_larger": _brief(best_small),
            "best_plain_task_arithmetic": _brief(_best([r for r in rows if _is_naive(r)])),
            "best_spectral_data_free": _brief(_best([r for r in spectral if not _is_distill(r)])),
            "lora_distilled": _brief(_best([r for r in rows if r["method"] == "distill:lora"])),
        })
        if suite == "compatible":
            out.append({
                "suite": suite, "n": n, "goal": f"{n}-task fusion keeps ≥ {GOAL_COMPATIBLE:.0%} normalized accuracy",
                "met": bool(best_spectral and best_spectral["mean_normalized"] >= GOAL_COMPATIBLE),
                "best_spectral": _brief(best_spectral), "reference": f"Iso-CTS {ISO_CTS_VIT_B32:.1%} on ViT-B/32",
            })
    return out


def chat_goals(summary: list[dict[str, Any]], suites: list[str], sizes: dict[str, int]) -> list[dict[str, Any]]:
    """The real base's goals: distill keeps ≥ 95% with all tasks and beats its LoRA control; the best
    data-free spectral method is at least as good as the best PEFT merge at equal or fewer bytes."""
    out = []
    for suite in suites:
        n = sizes[suite]
        rows = [r for r in summary if r["suite"] == suite and r["n"] == n and r["mean_normalized"] is not None]
        distill = _best([r for r in rows if r["method"] == "distill"])
        control = _best([r for r in rows if r["method"] == "distill:lora"])
        met = bool(distill and distill["mean_normalized"] >= GOAL_DISTILL
                   and (control is None or distill["mean_normalized"] >= control["mean_normalized"]))
        out.append({"suite": suite, "n": n, "kind": "distill",
                    "goal": f"distill keeps ≥ {GOAL_DISTILL:.0%} normalized accuracy with all tasks and ≥ its LoRA "
                            "control", "met": met, "distill": _brief(distill), "lora_distilled": _brief(control),
                    "measured": distill is not None, "control_measured": control is not None})
        best_peft = _best([r for r in rows if r["method"].startswith("peft:")])
        data_free = [r for r in rows if r["family"] == "spectral" and not r["source"].startswith("peft")
                     and not _is_distill(r)]
        winners = [r for r in data_free if best_peft and r["mean_normalized"] >= best_peft["mean_normalized"]
                   and r["bytes"] <= best_peft["bytes"]]
        out.append({"suite": suite, "n": n, "kind": "data-free",
                    "goal": "the best data-free spectral method ≥ the best PEFT merge at equal or fewer bytes",
                    "met": bool(winners), "best_peft": _brief(best_peft), "best_spectral_data_free": _brief(
                        _best(data_free)), "best_spectral_not_larger": _brief(_best(winners)),
                    "dense_task_arithmetic": _brief(_best([r for r in rows if r["method"] == "dense_ta"]))})
    return out


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row[k] for k in ("source", "training", "method", "mean_normalized", "std_normalized", "mean_accuracy",
                                "bytes", "chosen")}


# --------------------------------------------------------------------------- Markdown


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{v:.1%}" + (f" ± {std:.1%}" if std else "")


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _describe(b: dict[str, Any] | None) -> str:
    if b is None:
        return "none"
    return (f"{b['source']} + {b['method']} ({_pct(b['mean_normalized'], b['std_normalized'])} normalized, "
            f"{_size(b['bytes'])}, {b['chosen']})")


def goals_markdown(result: dict[str, Any]) -> list[str]:
    lines = ["## Where the goals stand", ""]
    for g in result["goals"]:
        mark = "**met**" if g["met"] else "**not met**"
        if g.get("kind") == "distill" and not g.get("measured", True):
            lines.append(f"- `{g['suite']}`, {g['n']} tasks fused — {g['goal']}: **not measured** "
                         "(`distill` is not among this run's methods).")
        elif g.get("kind") == "distill":
            control = _describe(g["lora_distilled"]) if g["control_measured"] else "not measured"
            lines.append(f"- `{g['suite']}`, {g['n']} tasks fused — {g['goal']}: {mark}. distill: "
                         f"{_describe(g['distill'])}; its LoRA control (`distill:lora`): {control}.")
        elif g.get("kind") == "data-free":
            lines.append(f"- `{g['suite']}`, {g['n']} tasks fused — {g['goal']}: {mark}. Best PEFT merge "
                         f"(`add_weighted_adapter`): {_describe(g['best_peft'])}; best data-free spectral method: "
                         f"{_describe(g['best_spectral_data_free'])}; the best one no larger and at least as good: "
                         f"{_describe(g['best_spectral_not_larger'])}. Exact task arithmetic on the LoRAs' dense ΔW: "
                         f"{_describe(g['dense_task_arithmetic'])}.")
        elif "best_lora" in g:
            lines.append(f"- `{g['suite']}`, {g['n']} tasks fused — {g['goal']}: {mark}. Best LoRA merge: "
                         f"{_describe(g['best_lora'])}; best spectral fusion: {_describe(g['best_spectral'])}; "
                         f"best spectral fusion no larger than that LoRA merge and better than it: "
                         f"{_describe(g['best_spectral_not_larger'])}. Plain task arithmetic on plainly trained "
                         f"spectral adapters (best kind): {_describe(g['best_plain_task_arithmetic'])}. "
                         f"Without data (every method but distill): {_describe(g.get('best_spectral_data_free'))}. "
                         "The control, the same distillation into a LoRA of the PEFT rank: "
                         f"{_describe(g.get('lora_distilled'))}.")
        else:
            lines.append(f"- `{g['suite']}` — {g['goal']}: {mark} (best: {_describe(g['best_spectral'])}; "
                         f"{g['reference']}).")
    for suite in result["suites"]:
        n = result["tasks_per_suite"][suite]
        rows = [r for r in result["summary"]
                if r["suite"] == suite and r["n"] == n and r["mean_normalized"] is not None]
        steps = [("plain task arithmetic", [r for r in rows if _is_naive(r)]),
                 ("any data-free method on plainly trained adapters",
                  [r for r in rows if r["training"] == "plain" and r["family"] == "spectral"
                   and r["method"] != "dense_ta" and not _is_distill(r)]),
                 ("PEFT LoRA merges", [r for r in rows if _is_lora_merge(r)]),
                 ("fusion-ready training (+kl, @slice)", [r for r in rows if r["training"] != "plain"]),
                 ("distillation on the tasks' prompts " + ("(with their reference answers)" if result.get("chat")
                                                           else "(no labels)") + ", k×k cores",
                  [r for r in rows if r["method"] == "distill"]),
                 ("the same into a LoRA", [r for r in rows if r["method"] == "distill:lora"])]
        parts = []
        for label, candidates in steps:
            best = max(candidates, key=lambda r: r["mean_normalized"], default=None)
            if best is not None:
                parts.append(f"{label} {_pct(best['mean_normalized'])} ({best['source']} + {best['method']})")
        served = (result.get("per_request") or {}).get(suite, {})
        if served:
            worst = min((v["normalized"] for v in served.values() if v["normalized"] is not None), default=None)
            parts.append(f"per-request serving {_pct(worst)} (worst source)")
        lines.append(f"- `{suite}`, {n} tasks, best normalized accuracy by route: " + "; ".join(parts) + ".")
    per_request = result.get("per_request") or {}
    if per_request:
        worst = min((v["normalized"] for s in per_request.values() for v in s.values() if v["normalized"] is not None),
                    default=None)
        lines.append(f"- Per-request mixtures (serving, each prompt with its own task's adapter in one mixed batch) "
                     f"keep {_pct(worst)} normalized accuracy in the worst source: the reference static fusion is "
                     "measured against.")
    return lines + [""]


def individual_markdown(result: dict[str, Any], suite: str) -> list[str]:
    sources = [s for s in result["sources"] if s["suite"] == suite]
    if not sources:
        return [f"### Individual test accuracy, `{suite}`: not measured", ""]
    tasks = list(sources[0]["individual"])
    lines = [f"### Individual test accuracy, `{suite}` (greedy generation; zoo's own number in brackets)", "",
             "| task | base | " + " | ".join(f"{s['name']}" for s in sources) + " |",
             "|---|---|" + "---|" * len(sources)]
    for task in tasks:
        base = result["base_accuracy"][suite].get(task)
        cells = []
        for s in sources:
            mine = s["individual"][task]["test_generation"]
            zoo = s["zoo_accuracy"].get(task)
            cells.append(f"{mine:.2f}" + (f" ({zoo:.2f})" if zoo is not None and abs(zoo - mine) > 1e-9 else ""))
        lines.append(f"| {task} | {_pct(base) if base is not None else '–'} | " + " | ".join(cells) + " |")
    means = [statistics.fmean(s["individual"][t]["test_generation"] for t in tasks) for s in sources]
    lines.append("| **mean** | | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    lines += ["", "| source | training | kind | params / adapter | bytes / adapter |", "|---|---|---|---|---|"]
    for s in sources:
        lines.append(f"| {s['name']} | {s['training']} | {s['kind']} | {s['params']:,} | {_size(s['bytes'])} |")
    return lines + [""]


def per_request_markdown(result: dict[str, Any], suite: str) -> list[str]:
    rows = (result.get("per_request") or {}).get(suite)
    if not rows:
        return []
    lines = [f"### Per-request mixtures, `{suite}` (one mixed batch, each row its own task's adapter)", "",
             "| source | per-request accuracy | individual accuracy | normalized | tasks equal |",
             "|---|---|---|---|---|"]
    for source, v in rows.items():
        lines.append(f"| {source} | {_pct(v['accuracy'])} | {_pct(v['individual'])} | {_pct(v['normalized'])} | "
                     f"{v['tasks_equal']}/{v['tasks']} |")
    return lines + [""]


def runs_markdown(summary: list[dict[str, Any]], suite: str, n: int, all_tasks: bool) -> list[str]:
    rows = [r for r in summary if r["suite"] == suite and r["n"] == n]
    if not rows:
        return []
    drawn = "" if all_tasks else " (random subsets; runs = draws × seeds)"
    title = f"### `{suite}`: {n} tasks fused" + (" (all)" if all_tasks else drawn)
    lines = [title, "",
             "| source | training | method | normalized acc. | accuracy | runs | chosen on validation | params | "
             "bytes | fusion ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['training']} | {r['method']} | {_pct(r['mean_normalized'], r['std_normalized'])} | "
            f"{_pct(r['mean_accuracy'])} | {r['runs']} | {r['chosen']} | {r['params']:,} | {_size(r['bytes'])} | "
            f"{r['fusion_ms']:.1f} |")
    if all_tasks:
        tasks = list(rows[0]["per_task_normalized"])
        lines += ["", f"Per-task normalized accuracy, {n} tasks fused:", "",
                  "| source | method | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for r in rows:
            cells = [_pct(r["per_task_normalized"].get(t)) for t in tasks]
            lines.append(f"| {r['source']} | {r['method']} | " + " | ".join(cells) + " |")
    return lines + [""]


def interference_markdown(result: dict[str, Any], suite: str) -> list[str]:
    lines = []
    for label, matrix in (result.get("interference") or {}).get(suite, {}).items():
        tasks = list(matrix)
        lines += [f"### Pairwise interference, `{suite}`, {label}", "",
                  "Row i, column j: test accuracy on task i with i and j fused (weights 1, 1), normalized by i alone.",
                  "", "| task | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for i in tasks:
            lines.append(f"| {i} | " + " | ".join(_pct(matrix[i].get(j)) for j in tasks) + " |")
        lines.append("")
    return lines


def markdown(result: dict[str, Any]) -> str:
    s, env, zoo = result["settings"], result["environment"], result["zoo"]
    g = s["grid"]
    lines = [
        "# Fusion quality: spectral fusion vs LoRA merging",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- Zoo: `{zoo['root']}` ({'quick' if zoo['quick'] else 'full'} build: {zoo['steps']} training steps per "
        f"adapter, basis k = {zoo['k']}, base `{zoo['base_fingerprint'][:12]}`, zoo seed {zoo['seed']}).",
        f"- Seeds: benchmark seed {s['seed']}; DARE and distill seeds {list(g['seeds'])} on the all-task fusion; "
        f"{s['draws']} seeded draws per smaller subset size"
        + (f" (sources fused in them: {', '.join(s['subset_kinds'])} and the PEFT LoRAs)." if s.get("subset_kinds")
           else "."),
        f"- Hardware: {result['environment_line']}.",
        f"- Wall time of this invocation {result['seconds'] / 60:.1f} min: {result['cost']['generated']:,} examples "
        f"decoded by generation, {result['cost']['forwarded']:,} scored by one forward pass, "
        f"{result['cost']['trained']} fusion-ready adapters trained, {result['cost']['cached_scores']:,} scores read "
        "from the cache of an earlier invocation.",
        f"- Date: {env['date']}.",
        "",
    ]
    if result.get("not_measured"):
        lines += [f"**Partial results**: {result['not_measured']} measurements (a run, a source's individual "
                  "scores or a per-request reference) were not made in the time available; this report holds what "
                  "was measured. Rerunning the command"
                  + (" without `--cached-only`" if s.get("cached_only") else "")
                  + " completes it (every score is cached).", ""]
    if result.get("notes"):
        lines += [result["notes"].strip(), ""]
    lines += goals_markdown(result)
    if result.get("chat"):
        return "\n".join(lines + chat_protocol(result) + _tables(result)).rstrip() + "\n"
    lines += [
        "## Protocol", "",
        "Adapters: the zoo's (trained one task at a time: *plain*) and fusion-ready ones trained here with the zoo's "
        "steps, data and learning rates: `+kl` adds KL(base ‖ adapted) on the other tasks' and the pretraining "
        "prompts (`--preserve`), `@slice` gives task i its own basis directions [w·i, w·i+w), w = k / 8 (`--slice`). "
        "PEFT LoRA baselines (rank 4, q,k,v,o,gate,up,down) are merged with PEFT's `add_weighted_adapter` "
        "(`peft:*`) and by exact task arithmetic on their dense ΔW (`dense_ta`).",
        "",
        "`distill` (`fusion.distill`) is the one method that sees data: starting from the mean of the cores, one "
        "dense k×k core per layer is trained (AdamW, "
        f"{s.get('distill_steps', 300)} steps of 32 rows, lr {s.get('distill_lr', 1e-2):g}) so that on each task's "
        "training prompts (128 per task, answers dropped: every adapter completes its own prompts greedily) the "
        "fused model's next-token distributions match that task's adapter (KL on the completion positions). It "
        "runs on the plainly trained adapters, one run per subset draw and per seed; its fusion time is the whole "
        "distillation on one CPU thread. `distill:lora` is the control: the same distillation, prompts, steps and "
        "seeds into a fresh LoRA of the PEFT baselines' rank, taught by the PEFT LoRAs.",
        "",
        f"Every method: uniform weight λ ∈ {list(g['weights'])} per adapter, density ∈ {list(g['densities'])} where "
        "the method has one, chosen by the mean normalized accuracy on the validation split "
        f"({result['validation_examples']} examples per task), then measured on the test split "
        f"({result['test_examples']} per task). Normalized accuracy = fused accuracy / the same adapter's individual "
        "accuracy on the same examples, per task, then averaged (tasks whose adapter scores 0 alone are left out). "
        "Bytes: the fused artifact as a safetensors file (fused core adapter, or the merged PEFT LoRA). Fusion time: "
        "fusing from adapters in memory (spectral: `fusion.fuse` with cold core caches; PEFT: "
        "`add_weighted_adapter`).",
        "",
        "Exact match of greedy decoding is computed two ways: by `generate` (what `adapters_zoo.tasks.evaluate` "
        "does) and by one teacher-forced forward pass (the argmax at every answer position is the answer, then eos). "
        "They are the same test up to floating-point near-ties; selection and subset runs use the forward pass, the "
        "individual accuracies and the all-task fusions (first seed) are decoded by generation too, and the examples "
        f"where the two disagree are counted: **{result['scorer_disagreement']['disagree']} of "
        f"{result['scorer_disagreement']['examples']:,}**.",
        "",
    ]
    return "\n".join(lines + _tables(result)).rstrip() + "\n"


def chat_protocol(result: dict[str, Any]) -> list[str]:
    """The protocol on the real base (chat suites), as this run measured it."""
    s, zoo, g = result["settings"], result["zoo"], result["settings"]["grid"]
    agree = result["scorer_disagreement"]
    return [
        "## Protocol", "",
        f"Base `{result['base']}`. Adapters: the zoo's (one task at a time, {zoo['steps']} steps; basis k = "
        f"{zoo['k']}) of the kinds {', '.join(f'`{k}`' for k in s['kinds'] or ['all'])}, and its PEFT LoRA baselines "
        "(rank 4, α 8 on q,k,v,o,gate,up,down), merged by PEFT's `add_weighted_adapter` (`peft:*`, the merged "
        "adapter applied with PEFT's own `merge_adapter`) and by exact task arithmetic on their dense ΔW "
        "(`dense_ta`). Suites: `records` (the tasks conflict: the same order records, different questions) and "
        "`skills` (the tasks compose: each its own input and format), 4 tasks each.",
        "",
        f"`distill` (`fusion.distill`): one dense k×k core per layer, from the mean of the cores, trained "
        f"{s['distill_steps']} AdamW steps of {s['distill_batch']} rows (lr {s['distill_lr']:g}) so that on each "
        "task's training prompts (chat template; 128 per task) the fused model's next-token distributions match that "
        "task's adapter (KL on the positions of the reference answer: the prompts carry their answer, so no "
        "teacher decodes). `distill:lora` is its control: the same distillation into a fresh LoRA of the PEFT rank "
        "taught by the PEFT LoRAs." + (" Both run on the all-task fusion only." if s.get("distill_all_only") else ""),
        "",
        f"Every other method: uniform weight λ ∈ {list(g['weights'])} per adapter, density ∈ {list(g['densities'])} "
        "where the method has one, chosen on the validation split "
        f"({result['validation_examples']} examples per task) by the mean normalized accuracy of a teacher-forced "
        "scorer (one forward pass: every answer token, then the end of turn, is the argmax), then measured on the "
        f"test split ({result['test_examples']} per task) by greedy generation under the chat template (at most "
        "48 new tokens, the zoo's budget) scored by the task's checker (`adapters_zoo.tasks.chat.check`: exact "
        "after trimming, or equal JSON). Normalized accuracy = fused accuracy / the same adapter's individual "
        "accuracy on the same test examples, per task, then averaged (tasks whose adapter scores 0 alone are left "
        "out). Bytes: the fused artifact as a safetensors file.",
        "",
        f"Scoring precision: {s.get('precision', 'float32')}"
        + (" (every merge is done in float32, exactly, and restored bit for bit; a bfloat16 copy of the merged "
           "model scores it: the CPU's AMX units make that ~2–3× faster; the individual accuracies are measured "
           "the same way, so the zoo's float32 numbers are shown beside them)" if s.get("precision") == "bfloat16"
           else "") + ". "
        f"On the adapters alone, the teacher-forced scorer and generation + checker disagree on **{agree['disagree']} "
        f"of {agree['examples']:,}** test examples (the forward scorer is stricter: it wants the reference's exact "
        "tokens, the checker accepts equal JSON and surrounding whitespace).",
        "",
        f"Published reference: Core Space + TSV keep {CORE_SPACE_TSV:.2%} normalized accuracy merging LoRAs of "
        "Llama-3-8B on 6 NLI tasks (a far larger base, classification tasks).",
        "",
    ]


def _tables(result: dict[str, Any]) -> list[str]:
    lines = ["## Individual adapters", ""]
    for suite in result["suites"]:
        lines += individual_markdown(result, suite)
        lines += per_request_markdown(result, suite)
    stem = result.get("stem", "fusion_quality")
    lines += ["## Fusion", "", f"![normalized accuracy vs tasks fused]({stem}.png)", "",
              f"![accuracy vs bytes]({stem}_bytes.png)", ""]
    for suite in result["suites"]:
        all_n = result["tasks_per_suite"][suite]
        for n in sorted({r["n"] for r in result["summary"] if r["suite"] == suite}):
            lines += runs_markdown(result["summary"], suite, n, n == all_n)
    interference = [line for suite in result["suites"] for line in interference_markdown(result, suite)]
    if interference:
        lines += ["## Interference", ""] + interference
    return lines


# --------------------------------------------------------------------------- plots


def plots(result: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, suites = result["summary"], result["suites"]
    sources = list(dict.fromkeys(s["name"] for s in result["sources"]))  # report order: zoo kinds, fusion-ready, PEFT
    sources = sources or ["(nothing measured)"]
    sizes = sorted({r["n"] for r in summary})
    fig, axes = plt.subplots(len(suites), len(sources), figsize=(3.2 * len(sources), 3.0 * len(suites)),
                             squeeze=False, sharey=True)
    for i, suite in enumerate(suites):
        for j, source in enumerate(sources):
            ax = axes[i][j]
            rows = [r for r in summary if r["suite"] == suite and r["source"] == source]
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r["n"], r["mean_normalized"], r["std_normalized"] or 0.0) for r in rows
                             if r["method"] == method and r["mean_normalized"] is not None)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                markersize=3, capsize=2, linewidth=1, label=method)
            pr = (result.get("per_request") or {}).get(suite, {}).get(source)
            if pr and pr["normalized"] is not None:
                ax.axhline(pr["normalized"], color="black", linestyle=":", linewidth=1, label="per-request")
            if suite == "compatible":
                ax.axhline(GOAL_COMPATIBLE, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{suite} / {source}", fontsize=8)
            ax.set_xticks(sizes)
            ax.set_xlabel("tasks fused", fontsize=7)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("normalized accuracy", fontsize=7)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5, loc="best")
    fig.tight_layout()
    first = out_dir / f"{stem}.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suites), figsize=(6.0 * len(suites), 4.2), squeeze=False)
    markers = {"spectral": "o", "peft": "s"}
    for i, suite in enumerate(suites):
        ax = axes[0][i]
        n = result["tasks_per_suite"][suite]
        rows = [r for r in summary if r["suite"] == suite and r["n"] == n and r["mean_normalized"] is not None]
        colors = {s: plt.cm.tab10(k % 10) for k, s in enumerate(sources)}
        for r in rows:
            family = "peft" if r["family"] == "peft" or r["method"] == "dense_ta" else "spectral"  # LoRA-shaped
            ax.scatter(r["bytes"], r["mean_normalized"], color=colors[r["source"]], marker=markers[family], s=18)
            ax.annotate(r["method"], (r["bytes"], r["mean_normalized"]), fontsize=5, alpha=0.8)
        for s in sources:
            ax.scatter([], [], color=colors[s], label=s, s=18)
        if rows:
            ax.set_xscale("log")
        ax.set_xlabel("bytes of the fused adapter (log)")
        ax.set_ylabel("normalized accuracy")
        ax.set_title(f"{suite}: {n} tasks fused (squares: LoRA-shaped results)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    second = out_dir / f"{stem}_bytes.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]
