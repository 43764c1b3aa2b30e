"""Automatic mixtures (``model: "auto"``) on the demo zoo: accuracy against the per-request oracle, cost.

    python benchmarks/bench_routing.py [--zoo DIR] [--kinds scale,rotation] [--n 100] [--threads 2]

Zoo: ``--zoo``, else ``/work/zoo-full`` when its ``report.json`` exists, else a quick zoo
built (once) at ``/tmp/zoo-quick-routing`` (``specfuse zoo build --quick``). The zoo's
registry is served as ``specfuse serve`` serves it (``build_service``: engine, scheduler,
service), float32 on CPU. For each suite and kind, candidates = that suite's adapters of
that kind, on the test split (``n`` prompts per task), all configurations in one mixed batch:

- ``oracle``: every prompt with its own task's adapter (a per-request mixture named explicitly);
- ``auto/prototype``, ``auto/spectral``: the mixture ``Service.route`` picks (default options:
  top_m 1, the routers' default thresholds), then served exactly like an explicit mixture;
- ``base`` and ``static/linear``: the suite's adapters fused into one static adapter (task
  arithmetic, uniform weight λ ∈ {1/N, 1}; the better λ on the test split is reported, an
  optimistic choice for fusion).

Also: routing decision accuracy (the top adapter is the prompt's task's, a fallback to the
base counts as wrong), the same over every adapter of the kind in both suites, prompts no
adapter is for (the base's own pretraining ops: does ``auto`` leave them to the base?),
and the cost: routing latency for one prompt, end-to-end latency of one request on an
idle server, and wall time of a burst of requests, auto vs the same mixtures named.
Results: ``benchmarks/results/routing.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import RESULTS, write_results  # benchmarks/ is the script folder: first on sys.path

FULL_ZOO = Path("/work/zoo-full")
QUICK_ZOO = Path("/tmp/zoo-quick-routing")
MAX_NEW_TOKENS = 16  # the zoo's evaluation budget; answers are shorter
CHUNK = 32  # prompts per routed job (MAX_PROMPTS of a completion request)
GOAL = 0.95  # auto / oracle accuracy the benchmark tracks
ROUTERS = ("prototype", "spectral")


@dataclass
class Settings:
    zoo: Path
    kinds: tuple[str, ...]
    n: int
    threads: int
    max_batch: int = 128
    latency_requests: int = 30  # single requests timed one after another, per configuration
    burst: int = 256  # requests submitted at once for the throughput comparison


# --------------------------------------------------------------------------- zoo and service


def ensure_zoo(path: Path | None) -> Path:
    if path is not None:
        if not (path / "report.json").is_file():
            sys.exit(f"bench_routing: {path} has no report.json (not a finished zoo)")
        return path
    if (FULL_ZOO / "report.json").is_file():
        return FULL_ZOO
    if not (QUICK_ZOO / "report.json").is_file():
        print(f"bench_routing: building the quick zoo in {QUICK_ZOO}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "serving.cli", "zoo", "build", "--quick", "--out", str(QUICK_ZOO)],
                       check=True)
    return QUICK_ZOO


def open_service(zoo: Path, settings: Settings):
    from serving.serve_cli import ServerSettings, build_service

    return build_service(ServerSettings(zoo / "base", zoo / "registry", device="cpu", dtype="float32", slots=64,
                                        residual_slots=16, max_batch=settings.max_batch, max_queue=100_000,
                                        max_prompt_tokens=256, max_tokens=MAX_NEW_TOKENS, max_mixture=16))


def test_examples(zoo: Path, suite: str, task: str, n: int) -> list[dict[str, str]]:
    from adapters_zoo.tasks import read_jsonl

    return read_jsonl(zoo / "data" / suite / f"{task}.test.jsonl")[:n]


def adapter_name(task: str, kind: str) -> str:
    from adapters_zoo.zoo import registry_name

    return registry_name(task, kind)


# --------------------------------------------------------------------------- serving rows


@dataclass
class Row:
    config: str  # oracle | base | static/λ | auto/<router>
    task: str
    example: dict[str, str]
    mixture: object = None  # MixtureCores | None, set before serving
    chosen: str = ""  # auto: the decision's label ("base" when nothing matched)
    top: str = ""  # auto: the name of the best adapter chosen, or "base"
    top_score: float = 0.0  # auto: the best candidate's score


def params():
    from serving.generation import SamplingParams

    return SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)


def tokenize(service, rows: list[Row]) -> list[list[int]]:
    tok = service.engine.tokenizer
    return [tok(r.example["prompt"])["input_ids"] for r in rows]


def route_rows(service, rows: list[Row], spec) -> float:
    """Route ``rows`` as auto jobs of CHUNK prompts (what ``Service.prepare`` does); returns seconds."""
    from serving.services import BASE

    start = time.perf_counter()
    for i in range(0, len(rows), CHUNK):
        chunk = rows[i : i + CHUNK]
        for row, decision in zip(chunk, service.route(tokenize(service, chunk), spec)):
            row.chosen = decision.label
            row.top = decision.pairs[0][0].split("@")[0] if decision.pairs else "base"
            row.top_score = max(decision.scores.values())
            row.mixture = service.prepare_mixture(BASE, dict(decision.pairs)) if decision.pairs else None
    return time.perf_counter() - start


def serve(service, rows: list[Row]) -> list[str]:
    """Every row in one mixed batch (iteration-level scheduler), greedy, cut at eos."""
    from serving.scheduler import GenerationRequest, generate

    requests = [GenerationRequest(ids, params(), row.mixture) for ids, row in zip(tokenize(service, rows), rows)]
    events = generate(service.scheduler, requests, timeout=6 * 3600)
    bad = [e for e in events if e.kind == "error"]
    if bad:
        raise bad[0].error
    return [e.output for e in events]


def hits(service, rows: list[Row], outputs: list[str]) -> list[bool]:
    from adapters_zoo.tasks import exact_match

    eos = service.engine.tokenizer.eos_token
    return [exact_match(out, row.example["completion"], eos) for row, out in zip(rows, outputs)]


def per_task(rows: list[Row], ok: list[bool], config: str) -> dict[str, float]:
    out: dict[str, list[bool]] = {}
    for row, hit in zip(rows, ok):
        if row.config == config:
            out.setdefault(row.task, []).append(hit)
    return {task: sum(v) / len(v) for task, v in out.items()}


# --------------------------------------------------------------------------- one suite × kind


def suite_kind(service, zoo: Path, report: dict, suite: str, kind: str, settings: Settings) -> dict:
    from serving.routing import AutoSpec

    tasks = [e["task"] for e in report["entries"] if e["suite"] == suite and e["kind"] == kind]
    names = [adapter_name(t, kind) for t in tasks]
    examples = {t: test_examples(zoo, suite, t, settings.n) for t in tasks}
    rows: list[Row] = []
    for task, name in zip(tasks, names):
        oracle = service.prepare_mixture(name)
        rows += [Row("oracle", task, ex, oracle) for ex in examples[task]]
        rows += [Row("base", task, ex, None) for ex in examples[task]]
    lambdas = {"static/linear λ=1/N": 1.0 / len(names), "static/linear λ=1": 1.0}
    for config, lam in lambdas.items():
        fused = service.prepare_mixture("base", {n: lam for n in names})
        rows += [Row(config, t, ex, fused) for t in tasks for ex in examples[t]]
    route_seconds = {}
    for router in ROUTERS:
        auto_rows = [Row(f"auto/{router}", t, ex) for t in tasks for ex in examples[t]]
        route_seconds[router] = route_rows(service, auto_rows, AutoSpec(router, candidates=tuple(names)))
        rows += auto_rows
    start = time.perf_counter()
    outputs = serve(service, rows)
    serve_seconds = time.perf_counter() - start
    ok = hits(service, rows, outputs)
    configs = list(dict.fromkeys(r.config for r in rows))
    accuracy = {c: per_task(rows, ok, c) for c in configs}
    mean = {c: sum(a.values()) / len(a) for c, a in accuracy.items()}
    oracle_out = {(r.task, r.example["prompt"]): out for r, out in zip(rows, outputs) if r.config == "oracle"}
    result = {"suite": suite, "kind": kind, "tasks": tasks, "candidates": names, "prompts_per_task": settings.n,
              "accuracy": accuracy, "mean": mean, "serve_seconds": round(serve_seconds, 1),
              "route_seconds": {k: round(v, 2) for k, v in route_seconds.items()}}
    best_static = max((c for c in configs if c.startswith("static/")), key=lambda c: mean[c])
    result["best_static"] = best_static
    result["routers"] = {}
    for router in ROUTERS:
        config = f"auto/{router}"
        mine = [(r, out) for r, out in zip(rows, outputs) if r.config == config]
        right = [r.top == adapter_name(r.task, kind) for r, _ in mine]
        same_when_right = [out == oracle_out[(r.task, r.example["prompt"])] for (r, out), good in zip(mine, right)
                           if good]
        confusions: dict[str, int] = {}
        for (r, _), good in zip(mine, right):
            if not good:
                key = f"{r.task} -> {r.top}"
                confusions[key] = confusions.get(key, 0) + 1
        result["routers"][router] = {
            "decision_accuracy": sum(right) / len(right),
            "to_base": sum(1 for r, _ in mine if r.chosen == "base") / len(mine),
            "normalized": mean[config] / mean["oracle"] if mean["oracle"] else None,
            "normalized_per_task": {t: (accuracy[config][t] / accuracy["oracle"][t] if accuracy["oracle"][t] else None)
                                    for t in tasks},
            "equal_to_oracle_when_routed_right": (sum(same_when_right) / len(same_when_right)
                                                  if same_when_right else None),
            "confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:6]),
        }
    return result


# --------------------------------------------------------------------------- across suites, off-task prompts


def across_suites(service, zoo: Path, report: dict, kind: str, settings: Settings) -> dict:
    """Decision accuracy when every adapter of ``kind`` in both suites is a candidate."""
    from serving.routing import AutoSpec

    pairs = [(e["suite"], e["task"]) for e in report["entries"] if e["kind"] == kind]
    names = tuple(adapter_name(t, kind) for _, t in pairs)
    out = {"candidates": len(names)}
    for router in ROUTERS:
        rows = [Row(f"auto/{router}", t, ex) for s, t in pairs for ex in test_examples(zoo, s, t, settings.n)]
        seconds = route_rows(service, rows, AutoSpec(router, candidates=names))
        right = [r.top == adapter_name(r.task, kind) for r in rows]
        out[router] = {"decision_accuracy": sum(right) / len(right), "route_ms_per_prompt":
                       round(1000 * seconds / len(rows), 3), "top_score": quantiles([r.top_score for r in rows])}
    return out


def quantiles(values: list[float]) -> dict[str, float]:
    """The 1st, 10th, 50th, 90th and 99th percentiles (nearest rank)."""
    ordered = sorted(values)
    return {f"p{q}": round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3) for q in (1, 10, 50, 90, 99)}


def off_task(service, report: dict, kind: str, per_task_n: int = 10) -> dict:
    """Prompts of the base's own ops (no adapter is for them): accuracy of base vs auto, share left to the base."""
    from adapters_zoo.tasks import make_split, pretraining_tasks
    from serving.routing import AutoSpec

    names = tuple(adapter_name(e["task"], kind) for e in report["entries"] if e["kind"] == kind)
    examples = [(t.name, ex) for t in pretraining_tasks() for ex in make_split(t, "test", per_task_n)]
    rows = [Row("base", t, ex) for t, ex in examples]
    variants = {"auto/prototype": AutoSpec("prototype", candidates=names),
                "auto/prototype no threshold": AutoSpec("prototype", candidates=names, threshold=-1.0),
                "auto/spectral": AutoSpec("spectral", candidates=names)}
    for config, spec in variants.items():
        routed = [Row(config, t, ex) for t, ex in examples]
        route_rows(service, routed, spec)
        rows += routed
    ok = hits(service, rows, serve(service, rows))
    out = {"prompts": len(examples), "candidates": len(names)}
    for config in ["base", *variants]:
        mine = [(r, h) for r, h in zip(rows, ok) if r.config == config]
        out[config] = {"accuracy": sum(h for _, h in mine) / len(mine),
                       "to_base": sum(1 for r, _ in mine if r.config == "base" or r.chosen == "base") / len(mine)}
        if config != "base":
            out[config]["top_score"] = quantiles([r.top_score for r, _ in mine])
    return out


# --------------------------------------------------------------------------- cost


def cost(service, zoo: Path, report: dict, kind: str, settings: Settings) -> dict:
    """Added latency of routing (one prompt), single-request latency and a burst, auto vs explicit.

    Every request generates exactly MAX_NEW_TOKENS tokens (eos ignored), so a misrouted
    request does not look cheaper by stopping early; configurations take turns request by
    request (and burst by burst, twice, the faster kept) so the shared machine's load
    drifts over all of them alike.
    """
    from serving.generation import SamplingParams
    from serving.routing import AutoSpec
    from serving.scheduler import GenerationRequest, generate
    from serving.services import BASE

    fixed = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    pairs = [(e["suite"], e["task"]) for e in report["entries"] if e["kind"] == kind]
    names = tuple(adapter_name(t, kind) for _, t in pairs)
    examples = [(t, ex) for s, t in pairs for ex in test_examples(zoo, s, t, settings.n)]
    tok = service.engine.tokenizer
    step = max(1, len(examples) // settings.latency_requests)
    sample = examples[::step][: settings.latency_requests]
    specs = {f"auto/{router}": AutoSpec(router, candidates=names) for router in ROUTERS}

    def prepare(config: str, task: str, ex: dict[str, str]):
        if config == "explicit":
            return service.prepare_mixture(adapter_name(task, kind))
        [d] = service.route([tok(ex["prompt"])["input_ids"]], specs[config])
        return service.prepare_mixture(BASE, dict(d.pairs)) if d.pairs else None

    configs = ["explicit", *specs]
    for t, ex in sample[:3]:  # warm: candidates parsed, mixtures fused, slots written
        for config in configs:
            prepare(config, t, ex)
    prep: dict[str, list[float]] = {c: [] for c in configs}
    total: dict[str, list[float]] = {c: [] for c in configs}
    probe: dict[str, list[float]] = {"features": [], "features + V_kᵀx": []}
    for t, ex in sample:
        ids = tok(ex["prompt"])["input_ids"]
        for config in configs:
            start = time.perf_counter()
            mixture = prepare(config, t, ex)
            prepared = time.perf_counter()
            generate(service.scheduler, [GenerationRequest(ids, fixed, mixture)])
            prep[config].append(1000 * (prepared - start))
            total[config].append(1000 * (time.perf_counter() - start))
        for label, projections in (("features", False), ("features + V_kᵀx", True)):
            start = time.perf_counter()
            service.engine.probe([ids], projections=projections)
            probe[label].append(1000 * (time.perf_counter() - start))
    out: dict = {"candidates": len(names), "requests": len(sample), "new_tokens": MAX_NEW_TOKENS,
                 "probe_ms_p50": {k: round(statistics.median(v), 2) for k, v in probe.items()}}
    for config in configs:
        out[config] = {"prepare_ms_p50": round(statistics.median(prep[config]), 2),
                       "prepare_ms_p90": round(sorted(prep[config])[int(0.9 * (len(sample) - 1))], 2),
                       "request_ms_p50": round(statistics.median(total[config]), 2)}
    burst = (examples * (settings.burst // len(examples) + 1))[: settings.burst]
    for _ in range(2):
        for config in configs:
            start = time.perf_counter()
            if config == "explicit":
                mixtures = [prepare(config, t, ex) for t, ex in burst]
            else:
                rows = [Row(config, t, ex) for t, ex in burst]
                route_rows(service, rows, specs[config])
                mixtures = [r.mixture for r in rows]
            requests = [GenerationRequest(tok(ex["prompt"])["input_ids"], fixed, m)
                        for (_, ex), m in zip(burst, mixtures)]
            generate(service.scheduler, requests, timeout=3600)
            seconds = round(time.perf_counter() - start, 2)
            out[config]["burst_seconds"] = min(seconds, out[config].get("burst_seconds", seconds))
    for config in specs:
        mine, base = out[config], out["explicit"]
        mine["added_ms_p50"] = round(mine["prepare_ms_p50"] - base["prepare_ms_p50"], 2)
        mine["request_overhead"] = round(mine["request_ms_p50"] / base["request_ms_p50"] - 1, 3)
        mine["burst_overhead"] = round(mine["burst_seconds"] / base["burst_seconds"] - 1, 3)
    return out


# --------------------------------------------------------------------------- report


def environment(threads: int) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [
        "# Automatic mixtures (`model: \"auto\"`) on the demo zoo",
        "",
        f"Zoo `{s['zoo']}` ({'quick' if result['zoo_quick'] else 'full'}: {result['zoo_tasks']} tasks per suite), "
        f"{s['n']} test prompts per task, greedy, ≤ {MAX_NEW_TOKENS} new tokens, float32 on CPU "
        f"({env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}, commit {env['commit']}, "
        f"{env['date']}). `python benchmarks/bench_routing.py {result['argv']}`.",
        "",
        "Every configuration of a suite × kind is served in one mixed batch by the engine and scheduler "
        "(`build_service`, as `specfuse serve` runs them). `oracle`: each prompt names its own task's adapter. "
        "`auto/*`: `Service.route` picks the mixture from the prompt (top_m 1, default thresholds), then it is "
        "served like any named mixture. `static`: the suite's adapters fused once (linear, uniform λ; the better "
        "λ on the test split). Normalized = auto mean accuracy / oracle mean accuracy.",
        "",
        "## Accuracy (mean over the suite's tasks)",
        "",
        "| suite | kind | base | best static | oracle | auto/prototype | auto/spectral | prototype / oracle | "
        "spectral / oracle | decisions prototype | decisions spectral |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["suites"]:
        m, rt = r["mean"], r["routers"]
        lines.append(
            f"| {r['suite']} | {r['kind']} | {m['base']:.2f} | {m[r['best_static']]:.2f} | {m['oracle']:.2f} | "
            f"{m['auto/prototype']:.2f} | {m['auto/spectral']:.2f} | {pct(rt['prototype']['normalized'])} | "
            f"{pct(rt['spectral']['normalized'])} | {pct(rt['prototype']['decision_accuracy'])} | "
            f"{pct(rt['spectral']['decision_accuracy'])} |")
    lines += ["", "## Goal: auto ≥ 95% of the per-request oracle, far above the best static fusion", ""]
    lines += result["goal"]
    lines += ["", "## Per task (accuracy: oracle / auto prototype / auto spectral / best static)", ""]
    for r in result["suites"]:
        acc = r["accuracy"]
        cells = [f"{t} {acc['oracle'][t]:.2f} / {acc['auto/prototype'][t]:.2f} / {acc['auto/spectral'][t]:.2f} / "
                 f"{acc[r['best_static']][t]:.2f}" for t in r["tasks"]]
        lines.append(f"- **{r['suite']} × {r['kind']}** ({r['best_static']}): " + "; ".join(cells))
        for router in ROUTERS:
            conf = r["routers"][router]["confusions"]
            if conf:
                lines.append(f"  - {router} misroutes: " + ", ".join(f"{k} ({v})" for k, v in conf.items()))
    lines += ["", "## Routing over every adapter of a kind (both suites)", "",
              "| kind | candidates | decisions prototype | decisions spectral | route ms/prompt prototype | "
              "route ms/prompt spectral |", "|---|---|---|---|---|---|"]
    for kind, r in result["across_suites"].items():
        lines.append(f"| {kind} | {r['candidates']} | {pct(r['prototype']['decision_accuracy'])} | "
                     f"{pct(r['spectral']['decision_accuracy'])} | {r['prototype']['route_ms_per_prompt']} | "
                     f"{r['spectral']['route_ms_per_prompt']} |")
    lines += ["", "## Prompts no adapter is for (the base's own ops, e.g. `rev:abc=`)", "",
              "Candidates: every adapter of the kind. Accuracy, and the share served by the base model.", "",
              "| kind | base | auto/prototype | auto/prototype, no threshold | auto/spectral |",
              "|---|---|---|---|---|"]
    for kind, r in result["off_task"].items():
        cells = [f"{r[c]['accuracy']:.2f} ({pct(r[c]['to_base'])} to base)"
                 for c in ("auto/prototype", "auto/prototype no threshold", "auto/spectral")]
        lines.append(f"| {kind} | {r['base']['accuracy']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Best candidate's score (percentiles p1 / p10 / p50 / p90 / p99) for the suites' own test prompts "
              "and for these off-task prompts: what the default thresholds (prototype 0.8, spectral none) rest on.",
              "", "| kind | router | task prompts | off-task prompts |", "|---|---|---|---|"]
    for kind, r in result["off_task"].items():
        for router, config in (("prototype", "auto/prototype no threshold"), ("spectral", "auto/spectral")):
            inside = result["across_suites"][kind][router]["top_score"]
            lines.append(f"| {kind} | {router} | {' / '.join(f'{v:.2f}' for v in inside.values())} | "
                         f"{' / '.join(f'{v:.2f}' for v in r[config]['top_score'].values())} |")
    c = result["cost"]
    lines += ["", f"## Cost of routing ({c['kind']} adapters of both suites: {c['candidates']} candidates)", "",
              f"One request at a time on an idle server ({c['requests']} requests, each generating exactly "
              f"{c['new_tokens']} tokens; the configurations take turns): `prepare` = resolving the mixture "
              "(explicit: registry lookup of a cached mixture; auto: candidates, base-model probe of the prompt, "
              "scores, then the same lookup); request = prepare + generation. The probe alone (one prompt): "
              + ", ".join(f"{k} {v} ms" for k, v in c["probe_ms_p50"].items()) + f". Burst: {s['burst']} requests "
              "routed in jobs of 32 prompts, then served together (best of two).", "",
              "| configuration | prepare p50 ms | prepare p90 ms | added p50 ms | request p50 ms | request overhead | "
              "burst s | burst overhead |", "|---|---|---|---|---|---|---|---|"]
    for config in ("explicit", *(f"auto/{r}" for r in ROUTERS)):
        row = c[config]
        lines.append(f"| {config} | {row['prepare_ms_p50']} | {row['prepare_ms_p90']} | {row.get('added_ms_p50', 0)} | "
                     f"{row['request_ms_p50']} | {pct(row.get('request_overhead', 0.0))} | {row['burst_seconds']} | "
                     f"{pct(row.get('burst_overhead', 0.0))} |")
    lines.append("")
    lines += ["## Notes", ""]
    if result["zoo_quick"]:
        lines += [f"This is the quick zoo ({result['zoo_tasks']} tasks per suite, short training), built here because "
                  f"`{FULL_ZOO}` had no report.json; `python benchmarks/bench_routing.py` measures the full zoo "
                  "once it is built.", ""]
    for note in result["notes"]:
        lines += [note, ""]
    return "\n".join(lines)


def goal_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        m = r["mean"]
        for router in ROUTERS:
            rt = r["routers"][router]
            norm = rt["normalized"]
            status = "met" if norm is not None and norm >= GOAL else "missed"
            text = (f"- {r['suite']} × {r['kind']} × {router}: {pct(norm)} of the oracle ({status}); "
                    f"best static fusion {pct(m[r['best_static']] / m['oracle'] if m['oracle'] else None)}")
            if status == "missed":
                gap = GOAL - (norm or 0.0)
                text += (f". Short by {100 * gap:.1f} points: {pct(1 - rt['decision_accuracy'])} of prompts routed to "
                         f"another adapter ({pct(rt['to_base'])} to the base)")
                if rt["confusions"]:
                    text += ", mostly " + ", ".join(list(rt["confusions"])[:3])
            lines.append(text + ".")
    return lines


NOTES = [
    "Why the routers differ: the prototype router compares the base model's pooled last hidden state of the "
    "prompt with each adapter's signature (its training prompts' centroid); it sees the whole prompt, prefix "
    "included, so it separates tasks that read the same inputs (conflicting suite) as well as tasks with their "
    "own input kinds. The spectral router needs no data: it matches each token's `V_kᵀ x` with the right "
    "singular vectors of the adapter's core, per layer. It works where cores are directional (rotation, "
    "additive, svft) and cannot work for `scale`: a diagonal core's input directions are the basis axes "
    "themselves, the same for every scale adapter, which then differ only in per-axis gain.",
    "One mixture per request: the engine holds one slot per row, so per-token spectral scores are averaged over "
    "tokens and layers into per-request weights (per-token routing would need a slot per token).",
    "Routing is a base-model forward over the prompt (the probe), serialized with the scheduler's steps by the "
    "engine's lock; generation itself costs the same as for the named mixture (same slots, same batch).",
]


def run(settings: Settings, argv: str) -> dict:
    torch.set_num_threads(settings.threads)
    zoo = settings.zoo
    report = json.loads((zoo / "report.json").read_text())
    kinds = [k for k in settings.kinds if any(e["kind"] == k for e in report["entries"])]
    suites = list(dict.fromkeys(e["suite"] for e in report["entries"]))
    service = open_service(zoo, settings)
    try:
        results, across, off = [], {}, {}
        for kind in kinds:
            for suite in suites:
                start = time.perf_counter()
                results.append(suite_kind(service, zoo, report, suite, kind, settings))
                r = results[-1]
                m = r["mean"]
                print(f"{suite} × {kind}: oracle {m['oracle']:.2f}, prototype {m['auto/prototype']:.2f},"
                      f" spectral {r['mean']['auto/spectral']:.2f}, static {r['mean'][r['best_static']]:.2f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            across[kind] = across_suites(service, zoo, report, kind, settings)
            off[kind] = off_task(service, report, kind)
        cost_result = cost(service, zoo, report, kinds[0], settings)
        cost_result["kind"] = kinds[0]
    finally:
        service.scheduler.stop()
        service.registry.close()
    tasks_per_suite = len({e["task"] for e in report["entries"] if e["suite"] == suites[0]})
    return {"settings": {**asdict(settings), "zoo": str(zoo)}, "argv": argv,
            "environment": environment(settings.threads),
            "zoo_quick": bool(report["settings"].get("quick")), "zoo_tasks": tasks_per_suite,
            "suites": results, "goal": goal_lines(results), "across_suites": across, "off_task": off,
            "cost": cost_result, "notes": NOTES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=None, help=f"default: {FULL_ZOO} when built, else {QUICK_ZOO}")
    p.add_argument("--kinds", default="scale,svft,rotation,additive")
    p.add_argument("--n", type=int, default=100, help="test prompts per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="routing", help="results name under benchmarks/results/")
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, measure nothing")
    args = p.parse_args(argv)
    if args.markdown_only:
        result = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(result))
        return 0
    settings = Settings(ensure_zoo(args.zoo), tuple(k.strip() for k in args.kinds.split(",")), args.n, args.threads)
    result = run(settings, " ".join(sys.argv[1:] if argv is None else argv))
    paths = write_results(args.out, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1].name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
