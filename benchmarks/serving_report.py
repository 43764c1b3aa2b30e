"""The serving benchmark's report: the goals read off its rows, the Markdown tables and the plot.

Imported by ``bench_serving.py`` (which measures); ``--render RESULT.json`` rewrites a report from here.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common import environment_line

GOALS = {"diagonal": 1.15, "dense": 1.25, "flat": 0.05}  # issue 16: time per token vs base; spread of cached rows
KIND_CORES = {"scale": "diagonal", "rotation": "dense"}
FETCHED = {"smollm2": "smollm2-135m-instruct"}  # --base name -> `specfuse base fetch` name


def goals(rows: list) -> dict:
    """Issue 16's goals, read off the rows (None where the run has no such row)."""
    step = {r.kind: r for r in rows if r.config in ("step:scale", "step:rotation")}
    out = {}
    for kind, cores in KIND_CORES.items():
        served = [r.ratio for r in rows if r.kind == kind and r.config in ("one", "cached")]
        prefill = [r.ratio for r in rows if r.config == f"prefill:{kind}"]
        out[cores] = {"goal": GOALS[cores], "step_ratio": step[kind].ratio if kind in step else None,
                      "prefill_ratio": prefill[0] if prefill else None,
                      "step_cpu_ratio": step[kind].cpu_ratio if kind in step else None,
                      "served_ratio_median": round(statistics.median(served), 3) if served else None}
        cached = [r for r in rows if r.kind == kind and r.config == "cached"]  # ratios: the base drifts with the load
        out[f"{cores}_cached_spread"] = spread([r.ratio for r in cached])
        out[f"{cores}_cached_cpu_spread"] = spread([r.cpu_ratio for r in cached])
        paired = [r for r in rows if r.kind == kind and r.config == "step:cached"]  # each step beside a base step
        out[f"{cores}_step_cached"] = {f"N={r.n_adapters} m={r.m}": r.ratio for r in paired}
        out[f"{cores}_step_spread"] = spread([r.ratio for r in paired])
        # flat in N and flat in m, each over the other: the mean ratio at each N (each m), their spread
        for axis, of in (("n", lambda r: r.n_adapters), ("m", lambda r: r.m)):
            means = {v: statistics.mean(r.ratio for r in paired if of(r) == v) for v in sorted({of(r) for r in paired})}
            out[f"{cores}_step_by_{axis}"] = {str(v): round(x, 3) for v, x in means.items()}
            out[f"{cores}_step_spread_by_{axis}"] = spread(list(means.values()))
        out[f"{cores}_step_cpu_spread"] = spread([r.cpu_ratio for r in paired])
        http = [r.ratio for r in rows if r.kind == kind and r.config == "http:cached"]
        out[cores]["http_ratio_median"] = round(statistics.median(http), 3) if http else None
    out["noise"] = {"base_runs_spread": spread([r.ratio for r in rows if r.config == "base"]),  # no adapter at all
                    "base_runs_cpu_spread": spread([r.cpu_ratio for r in rows if r.config == "base"]),
                    "http_base_runs_spread": spread([r.ratio for r in rows if r.config == "http:base"])}
    fuse = [r.fuse_ms_per_mixture for r in rows if r.fuse_ms_per_mixture is not None]
    out["fuse_ms_per_mixture"] = {"min": min(fuse), "max": max(fuse)} if fuse else None
    return out


def spread(values: list[float]) -> float | None:
    """max / min - 1 over the rows that should be equal (None for fewer than two)."""
    return round(max(values) / min(values) - 1, 3) if len(values) > 1 else None


def _pairs(means: dict | None) -> str:
    return ", ".join(f"{key}: {value:.3f}×" for key, value in (means or {}).items()) or "–"


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    s, model, machine, g = result["settings"], result["model"], result["machine"], result["goals"]
    name = "SmolLM2-135M-Instruct (fetched)" if s["base"] in FETCHED else f"random-weight Llama ({s['base']} shape)"
    lines = [
        f"# Serving speed: {name}, {s['device']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {environment_line(result['environment'])}; {machine['threads']} torch thread(s), "
        f"OMP_WAIT_POLICY={machine['omp_wait_policy']}; load average {machine['load_average_at_start']} at the start,"
        f" {machine['load_average_at_end']} at the end ({machine['logical_cpus']} logical CPUs: other jobs shared "
        "the machine when the load exceeds the threads used).",
        "",
        f"Model: {model['parameters'] / 1e6:.1f}M parameters, hidden {model['hidden_size']}, {model['layers']} layers, "
        f"{model['target_layers']} target layers, basis k={s['k']}. {s['requests']} concurrent requests of "
        f"{s['prompt_tokens']} prompt tokens, {s['max_tokens']} generated tokens each (greedy, eos ignored), all at "
        f"t=0, through the server's Service + Scheduler + Engine with its default configuration. The adapter math "
        f"is {result['adapter_flops']['ratio_to_model']:.1%} of the model's matmul FLOPs "
        f"({result['adapter_flops']['ratio_to_target_layers']:.1%} of the target layers').",
        "",
        "Ratio = time per token over the base model's (1.00 = free): `step:` rows, the median of per-step ratios "
        "(each step beside a base step); engine rows, against the base runs just before and after (listed); the "
        "others, against the mean of every engine base run. `cpu` = the same on the CPU time of the thread that "
        "runs the model (the scheduler's, which excludes fusing new mixtures), which other jobs on the machine "
        "disturb less than wall time.",
        "",
        "## Goals (issue 16)",
        "",
    ]
    for cores in ("diagonal", "dense"):
        d = g[cores]
        lines.append(f"- {cores} cores (≤ {d['goal']}×): decode step {_fmt(d['step_ratio'], '.3f')}× "
                     f"(cpu {_fmt(d['step_cpu_ratio'], '.3f')}×); prefill {_fmt(d.get('prefill_ratio'), '.3f')}×; "
                     "through the scheduler (one + cached runs, median) "
                     f"{_fmt(d['served_ratio_median'], '.3f')}×; over HTTP from `specfuse serve` (median) "
                     f"{_fmt(d.get('http_ratio_median'), '.3f')}×.")
        lines.append(f"  - flat in N and m (goal: within {GOALS['flat']:.0%}): the cached mixtures' decode steps, "
                     f"each beside a base step, spread {_fmt(g.get(f'{cores}_step_spread'), '.1%')} (wall), "
                     f"{_fmt(g.get(f'{cores}_step_cpu_spread'), '.1%')} (CPU) over "
                     + (", ".join(f"{key}: {v:.3f}×" for key, v in g.get(f"{cores}_step_cached", {}).items()) or "–")
                     + f"; by N (mean over m) {_fmt(g.get(f'{cores}_step_spread_by_n'), '.1%')} "
                     f"({_pairs(g.get(f'{cores}_step_by_n'))}), by m (mean over N) "
                     f"{_fmt(g.get(f'{cores}_step_spread_by_m'), '.1%')} ({_pairs(g.get(f'{cores}_step_by_m'))}); "
                     f"the whole cached runs spread {_fmt(g[f'{cores}_cached_spread'], '.1%')} (wall), "
                     f"{_fmt(g.get(f'{cores}_cached_cpu_spread'), '.1%')} (CPU).")
    if g.get("noise"):
        lines.append(f"- Noise floor: the base runs against the base runs beside them spread "
                     f"{_fmt(g['noise']['base_runs_spread'], '.1%')} (wall), "
                     f"{_fmt(g['noise']['base_runs_cpu_spread'], '.1%')} (CPU) with no adapter at all (HTTP base runs: "
                     f"{_fmt(g['noise'].get('http_base_runs_spread'), '.1%')}); a spread of whole runs below that is "
                     "flat within what this machine can resolve.")
    if g["fuse_ms_per_mixture"]:
        lines.append(f"- A new mixture's resolve + fuse, off the decode thread: {g['fuse_ms_per_mixture']['min']}–"
                     f"{g['fuse_ms_per_mixture']['max']} ms per mixture (by N and m: the `new` rows).")
    lines += [
        "",
        "| # | config | kind | N | m | tokens/s | ratio | cpu ratio | p50 s | p99 s | TTFT p50 s | TTFT p99 s | "
        "CPU ms/token | load | fuse ms/mixture | vs base rows | note |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, r in enumerate(result["rows"]):
        lines.append(
            f"| {i} | {r['config']} | {r['kind'] or '–'} | {r['n_adapters']} | {r['m']} | {r['tokens_per_s']:.1f} | "
            f"{r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
            f"{_fmt(r['ttft_p50_s'], '.3f')} | {_fmt(r['ttft_p99_s'], '.3f')} | {r['cpu_ms_per_token']:.1f} | "
            f"{r['load_average']} | {_fmt(r['fuse_ms_per_mixture'], '.1f')} | "
            f"{','.join(str(i) for i in r['base_runs']) or '–'} | {r['note']} |")
    lines += [
        "",
        "- **step:** one decode step of every request's row together; `scale` rows each on their own diagonal "
        "mixture (the elementwise path), `rotation` rows on dense k×k cores (the gathered path).",
        "- **prefill:** every prompt prefilled together (16 × 32 tokens), base vs the step rows' mixtures, "
        "interleaved: the prompt side of a request's cost (tokens/s counts prompt tokens).",
        "- **step:cached**: the decode step of each `cached` run's mixtures (every row its own, in a slot), paired "
        "step by step with a base step: the flat-in-N-and-m measure with the machine's load taken out.",
        "- **base / one / new / cached**: whole runs through the scheduler (prefill, decode, sampling, text): "
        "`vs base rows` are the rows (#) of the base runs each is compared to.",
        "- **http:**: the same requests streamed over HTTP from concurrent clients to `specfuse serve` (its own "
        "process, default settings) on 127.0.0.1; CPU is the server process's (HTTP, tokenizing and the model).",
        "- **hf:base / peft / merge**: transformers `generate`; PEFT holds the N LoRA adapters and routes each row "
        "to one (`adapter_names=`); merge folds each request's mixture into the dense weights and generates alone.",
        f"- Setup: basis {result['setup_seconds']['basis']} s, registering adapters "
        f"{result['setup_seconds']['register_adapters']} s; whole run {result['total_seconds']} s.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['config']} {r['kind']} N={r['n_adapters']} m={r['m']}".replace("  ", " ") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    colors = ["#999" if r["config"] in ("base", "step:base", "hf:base", "http:base", "prefill:base") else
              "#4c72b0" if r["kind"] == "scale" and r["config"] not in ("peft", "merge") else
              "#dd8452" if r["kind"] == "rotation" else "#c44e52" for r in rows]
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for goal, style in ((GOALS["diagonal"], "--"), (GOALS["dense"], ":")):
        ax.axvline(goal, color="k", linestyle=style, linewidth=0.8)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("time per token / base model's (log; dashed 1.15 diagonal goal, dotted 1.25 dense goal)")
    ax.set_title(f"Serving overhead vs base, {result['model']['base']} on {result['settings']['device']}, "
                 f"{result['machine']['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
