"""Automatic mixtures (``model: "auto"``) against the per-request oracle and static fusion, on a zoo.

    python benchmarks/bench_routing.py [--zoo DIR] [--kinds scale,svft] [--n 50] [--quick] [--threads 2]

The zoo (``specfuse zoo build``; default: the real-base zoo of ``bench_zoo.py``) is served as
``specfuse serve`` serves it (``build_service``: engine, scheduler, service), float32 on CPU;
chat zoos' prompts are rendered with the model's chat template, as ``/v1/chat/completions``
does. Per kind, the candidates of ``auto`` are every adapter of that kind (both suites: what
``model: "auto"`` routes over); per suite, on the test split (``n`` prompts per task):

- ``oracle``: every prompt with its own task's adapter (a per-request mixture named explicitly);
- ``auto/<router> default``: the mixture the router picks with its default threshold, top_m 1;
- ``auto/<router> τ=…``: the same with the fallback threshold re-measured on the validation split;
- ``base`` and ``static λ=…``: the suite's adapters fused into one static adapter (linear, uniform
  λ ∈ {1/N, 1}; the better λ on the test split is reported, an optimistic choice for fusion).

Off-task prompts, which no adapter is for and ``auto`` should leave to the base: on a chat zoo
the fixed list ``OFF_TASK`` (general instruct requests, written for this benchmark), on the
toy zoo the base's own pretraining ops. Thresholds are calibrated on the validation split
plus one half of them (even positions), and reported on the test split plus the other half:
the threshold maximizing balanced accuracy = ½ (task prompts routed to their own adapter +
off-task prompts left to the base).

Scores come from ``Service.route`` (base-model probe, then the router) over every candidate
of the kind, once per prompt; each configuration's decision is ``routing.select`` on them,
which is what ``Service.route`` does with that configuration's options (checked on a sample).
Each distinct (prompt, mixture) pair is generated once, all in one mixed batch (greedy, cut
at the end of turn), so an auto prompt routed right reuses the oracle's generation.
Each finished kind is cached in ``benchmarks/results/tmp/routing/`` (keyed on the settings, the
base and that kind's adapter files), so a rerun, or a run cut short and restarted, measures
only the kinds not yet done. Results: ``benchmarks/results/[smollm2/]routing[_quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import RESULTS, SCRATCH, environment, read_cached, set_threads, write_cached, write_results
from routing_report import NOTES, OFF, goal_lines, markdown, plot

ROUTERS = ("prototype", "spectral")
CHUNK = 32  # prompts per routed job (MAX_PROMPTS of a completion request)
CHECKED = 32  # prompts per router and kind whose offline decisions are compared with Service.route

# General instruct requests no zoo adapter is for: creative, factual, coding, arithmetic,
# advice, and a few that read like a task's input (an email, a list, a phone call).
OFF_TASK = (
    "Write a haiku about autumn.", "What is the capital of Australia?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain photosynthesis in two sentences.", "Give me three tips for sleeping better.",
    'Translate "good morning, how are you?" into French.', "What is 17 times 23?",
    "Who wrote the novel Pride and Prejudice?", "Write a short poem about the sea.",
    "How do I reverse a list in JavaScript?", "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What causes the seasons on Earth?", "Suggest a name for a bakery that sells vegan cakes.",
    "Write a SQL query that counts the rows of a table called orders.",
    "What is the boiling point of water in Fahrenheit?", "Tell me a joke about cats.",
    "Explain what a neural network is to a ten-year-old.", "List five fruits that are high in vitamin C.",
    "Write a limerick about a programmer who loves coffee.", "How many continents are there, and what are they?",
    "What is the difference between a virus and a bacterium?",
    "Write a bash command that finds every .txt file under the current folder.",
    "Give me a recipe for a simple tomato soup.", "Why is the sky blue?",
    "Write a motivational message for someone starting a new job.",
    "What year did the first person walk on the Moon?", "Explain recursion with a short example.",
    "Draft a polite email declining a meeting invitation.", "What are the main causes of inflation?",
    "Write a regular expression that matches a US ZIP code.", "Describe the water cycle.",
    "What is the largest planet in the solar system?",
    "Rewrite this sentence in the passive voice: The cat chased the mouse.",
    "Give me a packing list for a weekend camping trip.", "What does HTTP stand for?",
    "Write a two-line dialogue between a robot and a child.", "How do I convert Celsius to Fahrenheit?",
    "Recommend three classic science fiction novels.", "What is the square root of 144?",
    "Write a tweet announcing the launch of a new coffee shop.",
)


@dataclass
class Settings:
    zoo: Path
    kinds: tuple[str, ...]
    n: int  # test prompts per task
    n_validation: int  # validation prompts per task (calibration)
    threads: int
    quick: bool = False
    bases_home: Path | None = None  # where the fetched base lives: None = the zoo's, else $SPECFUSE_HOME
    max_batch: int = 128
    cache: Path | None = SCRATCH / "routing"  # one file per kind: a rerun (or a run cut short) keeps finished kinds


# --------------------------------------------------------------------------- the zoo's data


@dataclass
class Zoo:
    path: Path
    base: str  # the base's name (adapters_zoo.bases), or "char"
    chat: bool  # the real instruct base with chat suites; else the toy char base
    base_dir: Path
    adapters: dict[str, dict[str, list[str]]]  # kind -> suite -> tasks with a finished adapter
    max_new_tokens: int


def open_zoo(path: Path, bases_home: Path | None = None) -> Zoo:
    """A built zoo's finished adapters (its per-adapter rows: a zoo still being built has some)."""
    from adapters_zoo.tasks import suite_tasks
    from adapters_zoo.tasks.chat import chat_suite_tasks

    report = path / "report.json"
    if not report.is_file():
        sys.exit(f"bench_routing: {path} has no report.json (not a zoo: build one with `specfuse zoo build`)")
    settings = json.loads(report.read_text())["settings"]
    chat = settings.get("base", "char") != "char"
    if chat:
        from adapters_zoo.bases import fetch_base

        base_dir = fetch_base(settings["base"], bases_home or settings.get("bases_home"), progress=False).path
    else:
        base_dir = path / "base"
    adapters: dict[str, dict[str, list[str]]] = {}
    for suite in settings["suites"]:
        order = [t.name for t in (chat_suite_tasks(suite) if chat else suite_tasks(suite))]
        for kind in settings["kinds"]:
            done = {p.stem for p in (path / "entries" / suite / kind).glob("*.json")}
            if done:
                adapters.setdefault(kind, {})[suite] = [t for t in order if t in done]
    budget = 48 if chat else 16  # new tokens: the zoo's own evaluation budgets
    return Zoo(path, settings.get("base", "char"), chat, base_dir, adapters, budget)


@dataclass
class Item:
    """One prompt: its task (or OFF), its token ids, the reference answer (None: off-task chat)."""

    task: str
    ids: list[int]
    answer: str | None
    text: str


def task_items(zoo: Zoo, tok, suite: str, task: str, split: str, n: int) -> list[Item]:
    from adapters_zoo.tasks import read_jsonl
    from adapters_zoo.tasks.chat import prompt_messages, reference_answer, render_prompt

    examples = read_jsonl(zoo.path / "data" / suite / f"{task}.{split}.jsonl")[:n]
    if zoo.chat:
        texts = [render_prompt(tok, prompt_messages(ex)) for ex in examples]
        return [Item(task, tok(t, add_special_tokens=False)["input_ids"], reference_answer(ex), t)
                for t, ex in zip(texts, examples)]
    return [Item(task, tok(ex["prompt"])["input_ids"], ex["completion"], ex["prompt"]) for ex in examples]


def off_items(zoo: Zoo, tok, half: int, per_op: int = 3) -> list[Item]:
    """Off-task prompts: half 0 calibrates, half 1 is held out."""
    if zoo.chat:
        from adapters_zoo.tasks.chat import render_prompt

        texts = [render_prompt(tok, [{"role": "user", "content": p}]) for p in OFF_TASK[half::2]]
        return [Item(OFF, tok(t, add_special_tokens=False)["input_ids"], None, t) for t in texts]
    from adapters_zoo.tasks import make_split, pretraining_tasks

    split = ("validation", "test")[half]
    return [Item(OFF, tok(ex["prompt"])["input_ids"], ex["completion"], ex["prompt"])
            for t in pretraining_tasks() for ex in make_split(t, split, per_op)]


def hit(zoo: Zoo, item: Item, output: str, eos: str) -> bool | None:
    if item.answer is None:
        return None
    if zoo.chat:
        from adapters_zoo.tasks.chat import chat_task, check

        return check(chat_task(item.task), output, item.answer)
    from adapters_zoo.tasks import exact_match

    return exact_match(output, item.answer, eos)


def open_service(zoo: Zoo, settings: Settings):
    from serving.serve_cli import ServerSettings, build_service

    return build_service(ServerSettings(zoo.base_dir, zoo.path / "registry", device="cpu", dtype="float32", slots=64,
                                        residual_slots=16, max_batch=settings.max_batch, max_queue=100_000,
                                        max_prompt_tokens=512, max_tokens=zoo.max_new_tokens, max_mixture=16))


# --------------------------------------------------------------------------- scores and decisions


@dataclass
class Scored:
    """Every candidate's score for a list of items, from one ``Service.route`` per chunk."""

    items: list[Item]
    scores: torch.Tensor  # (B, n)
    base: torch.Tensor | None  # (B,) the base's own signature's score (prototype router)
    seconds: float = 0.0

    def subset(self, rows: list[int]) -> Scored:
        return Scored([self.items[i] for i in rows], self.scores[rows],
                      None if self.base is None else self.base[rows])


@dataclass(frozen=True)
class Rule:
    """When a prompt falls back to the base: best score < threshold, or < the base's score + margin."""

    threshold: float
    margin: float | None = None  # None: the base's score plays no part

    @classmethod
    def default(cls, router: str) -> Rule:
        from serving.routing import AutoSpec

        spec = AutoSpec(router)
        return cls(spec.min_score, spec.base_margin if router == "prototype" else None)

    @property
    def label(self) -> str:
        return f"τ={self.threshold:.4g}" if self.margin is None else f"τ={self.threshold:.4g}, m={self.margin:.4g}"


def score(service, refs: list[str], items: list[Item], router: str) -> Scored:
    from serving.routing import AutoSpec

    # -1 and -2 drop nothing: every score is kept
    spec = AutoSpec(router, candidates=tuple(refs), threshold=-1.0, base_margin=-2.0)
    rows, base, start = [], [], time.perf_counter()
    for i in range(0, len(items), CHUNK):
        for d in service.route([it.ids for it in items[i : i + CHUNK]], spec):
            rows.append([d.scores[r] for r in refs])
            base.append(d.base_score)
    return Scored(items, torch.tensor(rows, dtype=torch.float64).reshape(len(items), len(refs)),
                  None if router != "prototype" else torch.tensor(base, dtype=torch.float64),
                  time.perf_counter() - start)


def decide(scored: Scored, keep: list[int], rule: Rule) -> list[int | None]:
    """The candidate each item is routed to among ``keep`` (indices), or None for the base."""
    from serving.routing import select

    out = []
    for i, row in enumerate(scored.scores):
        floor = rule.threshold if rule.margin is None else max(rule.threshold, float(scored.base[i]) + rule.margin)
        chosen = select(row[keep].float(), 1, 0.1, floor)
        out.append(keep[chosen[0][0]] if chosen else None)
    return out


def balanced(decisions: list[int | None], items: list[Item], own: dict[str, int]) -> dict[str, float]:
    """Task prompts sent to their own adapter, off-task prompts left to the base, and their mean."""
    task = [d == own[it.task] for d, it in zip(decisions, items) if it.task != OFF]
    off = [d is None for d, it in zip(decisions, items) if it.task == OFF]
    right, to_base = sum(task) / max(1, len(task)), sum(off) / max(1, len(off))
    return {"task_right": right, "off_to_base": to_base, "balanced": (right + to_base) / 2}


def calibrate(scored: Scored, own: dict[str, int], relative: bool, floor: float) -> tuple[Rule, list[dict]]:
    """The rule with the best balanced accuracy (the middle one of a tie) and the sweep: over the
    absolute threshold, or (``relative``) over the margin above the base's score, ``floor`` kept."""
    every = list(range(scored.scores.shape[1]))
    top = scored.scores.max(1).values
    values = sorted(set((top - scored.base if relative else top).tolist()))
    cuts = [values[0] - 1e-3, *((a + b) / 2 for a, b in zip(values, values[1:])), values[-1] + 1e-3]
    sweep = []
    for cut in cuts:
        rule = Rule(floor, cut) if relative else Rule(cut)
        sweep.append({"cut": round(cut, 6), **balanced(decide(scored, every, rule), scored.items, own)})
    best = max(s["balanced"] for s in sweep)
    ties = [s["cut"] for s in sweep if s["balanced"] == best]
    cut = ties[len(ties) // 2]
    return (Rule(floor, cut) if relative else Rule(cut)), sweep


def check_offline(service, scored: Scored, refs: list[str], router: str) -> str:
    """How many of CHECKED prompts ``Service.route`` (default options) routes as ``decide`` does."""
    from serving.routing import AutoSpec

    rows = list(range(len(scored.items)))[:: max(1, len(scored.items) // CHECKED)][:CHECKED]
    offline = decide(scored.subset(rows), list(range(len(refs))), Rule.default(router))
    online = service.route([scored.items[i].ids for i in rows], AutoSpec(router, candidates=tuple(refs)))
    same = sum((refs[o] if o is not None else None) == (d.pairs[0][0] if d.pairs else None)
               for o, d in zip(offline, online))
    return f"{same}/{len(rows)}"


# --------------------------------------------------------------------------- generation


@dataclass
class Batch:
    """Distinct (prompt, mixture) pairs to generate; a mixture is a tuple of (ref, weight), () = the base."""

    jobs: dict[tuple, int] = field(default_factory=dict)

    def add(self, item: Item, mixture: tuple) -> tuple:
        key = (tuple(item.ids), mixture)
        self.jobs.setdefault(key, len(self.jobs))
        return key

    def run(self, service, max_new_tokens: int) -> dict[tuple, str]:
        from serving.generation import SamplingParams
        from serving.scheduler import GenerationRequest, generate
        from serving.services import BASE

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        mixtures = {m: service.prepare_mixture(BASE, dict(m)) if m else None for _, m in self.jobs}
        keys = list(self.jobs)
        events = generate(service.scheduler, [GenerationRequest(list(ids), params, mixtures[m]) for ids, m in keys],
                          timeout=6 * 3600)
        bad = [e for e in events if e.kind == "error"]
        if bad:
            raise bad[0].error
        return {k: e.output for k, e in zip(keys, events)}


# --------------------------------------------------------------------------- one kind


def run_kind(service, zoo: Zoo, kind: str, settings: Settings, log) -> dict:
    tok = service.engine.tokenizer
    suites = zoo.adapters[kind]
    pairs = [(s, t) for s, tasks in suites.items() for t in tasks]
    refs = [service.registry.get(f"{t}-{kind}").ref for _, t in pairs]  # the zoo's registry names
    own = {t: i for i, (_, t) in enumerate(pairs)}
    split_items = {split: [it for s, t in pairs for it in task_items(zoo, tok, s, t, split, n)]
                   for split, n in (("validation", settings.n_validation), ("test", settings.n))}
    val = split_items["validation"] + off_items(zoo, tok, 0)
    test = split_items["test"] + off_items(zoo, tok, 1)
    out: dict = {"kind": kind, "candidates": refs, "routers": {}}
    configs: dict[str, list[int | None]] = {}  # auto config -> decision per test item (all candidates)
    per_suite: dict[str, dict[str, list[int | None]]] = {s: {} for s in suites}
    for router in ROUTERS:
        start = time.perf_counter()
        scored_val, scored_test = score(service, refs, val, router), score(service, refs, test, router)
        default = Rule.default(router)
        rules = {"default": default}
        r: dict = {"route_ms_per_prompt": round(1000 * scored_test.seconds / len(test), 2),
                   "offline_equals_service": check_offline(service, scored_test, refs, router), "sweeps": {}}
        if router == "prototype":
            rules["threshold only"] = Rule(default.threshold)  # the fallback before the base competed
            rules["calibrated margin"], r["sweeps"]["margin"] = calibrate(scored_val, own, True, default.threshold)
        rules["calibrated threshold"], r["sweeps"]["threshold"] = calibrate(scored_val, own, False, 0.0)
        every = list(range(len(refs)))
        r["rules"] = {}
        for name, rule in rules.items():
            config = f"auto/{router} {rule.label}" + (" (default)" if name == "default" else "")
            decisions = decide(scored_test, every, rule)
            r["rules"][name] = {"config": config, **asdict(rule), "test": balanced(decisions, test, own),
                                "validation": balanced(decide(scored_val, every, rule), scored_val.items, own)}
            configs[config] = decisions
            for suite, tasks in suites.items():  # candidates: this suite's adapters only
                mine = [i for i, it in enumerate(test) if it.task in tasks]
                per_suite[suite][config] = decide(scored_test.subset(mine), [own[t] for t in tasks], rule)
        task_rows = [i for i, it in enumerate(test) if it.task != OFF]
        off_rows = [i for i, it in enumerate(test) if it.task == OFF]
        for label, rows in (("task", task_rows), (OFF, off_rows)):
            top = scored_test.scores[rows].max(1).values
            r.setdefault("top_score_test", {})[label] = quantiles(top.tolist())
            if scored_test.base is not None:
                r.setdefault("top_minus_base_test", {})[label] = quantiles((top - scored_test.base[rows]).tolist())
        out["routers"][router] = r
        log(f"{kind} × {router}: " + "; ".join(f"{v['config']} → {v['test']}" for v in r["rules"].values())
            + f" ({time.perf_counter() - start:.0f} s)")
    # generation: every suite's configurations and the off-task prompts, one mixed batch
    batch = Batch()
    ref_of = {i: ((ref, 1.0),) for i, ref in enumerate(refs)}
    rows: list[tuple[str, str, Item, tuple]] = []  # (suite, config, item, key)
    for suite, tasks in suites.items():
        items = [it for it in test if it.task in tasks]
        static = {f"static λ=1/{len(tasks)}": 1.0 / len(tasks), "static λ=1": 1.0}
        for it in items:
            fixed = {"oracle": ref_of[own[it.task]], "base": (),
                     **{c: tuple((refs[own[t]], w) for t in tasks) for c, w in static.items()}}
            rows += [(suite, config, it, batch.add(it, mixture)) for config, mixture in fixed.items()]
        for config, decisions in per_suite[suite].items():
            rows += [(suite, config, it, batch.add(it, ref_of.get(d, ()))) for it, d in zip(items, decisions)]
    off_test = [i for i, it in enumerate(test) if it.task == OFF]
    for config, decisions in {"base": [None] * len(test), **configs}.items():
        rows += [(OFF, config, test[i], batch.add(test[i], ref_of.get(decisions[i], ()))) for i in off_test]
    start = time.perf_counter()
    outputs = batch.run(service, zoo.max_new_tokens)
    out["generated"], out["generate_seconds"] = len(batch.jobs), round(time.perf_counter() - start, 1)
    log(f"{kind}: {len(batch.jobs)} generations for {len(rows)} rows ({out['generate_seconds']} s)")
    eos = tok.eos_token
    out["suites"] = [suite_result(zoo, suite, tasks, [r for r in rows if r[0] == suite], outputs, own, refs, eos)
                     for suite, tasks in suites.items()]
    out["off_task"] = off_result(zoo, [r for r in rows if r[0] == OFF], outputs, eos)
    return out


def suite_result(zoo: Zoo, suite: str, tasks: list[str], rows: list, outputs: dict, own: dict, refs: list[str],
                 eos: str) -> dict:
    hits: dict[str, dict[str, list[bool]]] = {}
    routed: dict[str, list[tuple[Item, tuple]]] = {}
    for _, config, item, key in rows:
        hits.setdefault(config, {}).setdefault(item.task, []).append(hit(zoo, item, outputs[key], eos))
        routed.setdefault(config, []).append((item, key[1]))
    accuracy = {c: {t: sum(v) / len(v) for t, v in per.items()} for c, per in hits.items()}
    mean = {c: sum(a.values()) / len(a) for c, a in accuracy.items()}
    statics = [c for c in mean if c.startswith("static")]
    best_static = max(statics, key=lambda c: mean[c])
    result = {"suite": suite, "tasks": tasks, "prompts_per_task": len(hits["oracle"][tasks[0]]), "accuracy": accuracy,
              "mean": mean, "best_static": best_static, "auto": {}}
    for config in (c for c in mean if c.startswith("auto/")):
        confusions: dict[str, int] = {}
        right = 0
        for item, mixture in routed[config]:
            target = mixture[0][0].split("@")[0] if mixture else "base"
            if mixture == ((refs[own[item.task]], 1.0),):
                right += 1
            else:
                confusions[f"{item.task} -> {target}"] = confusions.get(f"{item.task} -> {target}", 0) + 1
        result["auto"][config] = {
            "normalized": mean[config] / mean["oracle"] if mean["oracle"] else None,
            "decision_accuracy": right / len(routed[config]),
            "to_base": sum(1 for _, m in routed[config] if not m) / len(routed[config]),
            "confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:4])}
    return result


def off_result(zoo: Zoo, rows: list, outputs: dict, eos: str) -> dict:
    """Share of off-task prompts left to the base, accuracy (toy ops) or a sample of answers (chat)."""
    out: dict = {"prompts": sum(1 for r in rows if r[1] == "base")}
    for config in dict.fromkeys(r[1] for r in rows):
        mine = [(item, key) for _, c, item, key in rows if c == config]
        entry = {"to_base": sum(1 for _, key in mine if not key[1]) / len(mine)}
        scored = [hit(zoo, item, outputs[key], eos) for item, key in mine]
        if scored[0] is not None:
            entry["accuracy"] = sum(scored) / len(scored)
        else:  # what an adapter makes of a general request
            entry["answers"] = [{"prompt": OFF_TASK[1::2][i], "adapter": key[1][0][0], "answer": outputs[key]}
                                for i, (_, key) in enumerate(mine) if key[1]][:3]
        out[config] = entry
    return out


def quantiles(values: list[float]) -> dict[str, float]:
    """The 0th, 10th, 50th, 90th and 100th percentiles (nearest rank)."""
    ordered = sorted(values)
    return {f"p{q}": round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 4)
            for q in (0, 10, 50, 90, 100)}


# --------------------------------------------------------------------------- main


def kind_key(settings: Settings, zoo: Zoo, kind: str) -> dict:
    """What one kind's result depends on: the settings, the base, the kind's adapter files, the off-task list."""
    h = hashlib.sha256()
    for path in sorted((zoo.path / "adapters").glob(f"*/{kind}/**/*")):
        if path.is_file():
            h.update(str(path.relative_to(zoo.path)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return {"kind": kind, "n": settings.n, "n_validation": settings.n_validation, "quick": settings.quick,
            "max_batch": settings.max_batch, "base": zoo.base, "base_dir": str(zoo.base_dir),
            "adapters": h.hexdigest()[:16], "off_task": hashlib.sha256("\n".join(OFF_TASK).encode()).hexdigest()[:16],
            "routers": list(ROUTERS)}


def kind_cache(settings: Settings, zoo: Zoo, kind: str) -> Path:
    return settings.cache / f"{hashlib.sha256(str(zoo.path.resolve()).encode()).hexdigest()[:12]}-{kind}.json"




def run(settings: Settings, command: str) -> dict:
    set_threads(settings.threads)
    zoo = open_zoo(settings.zoo, settings.bases_home)
    kinds = [k for k in settings.kinds if k in zoo.adapters]
    if not kinds:
        sys.exit(f"bench_routing: no adapters of {', '.join(settings.kinds)} in {settings.zoo}")

    def log(text: str) -> None:
        print(f"bench_routing: {text}", file=sys.stderr, flush=True)

    results: dict[str, dict] = {}
    for kind in kinds:
        done = read_cached(kind_cache(settings, zoo, kind), kind_key(settings, zoo, kind)) if settings.cache else None
        if done is not None:
            log(f"{kind}: read from the cache")
            results[kind] = done
    missing = [k for k in kinds if k not in results]
    if missing:
        service = open_service(zoo, settings)
        try:
            for kind in missing:
                results[kind] = run_kind(service, zoo, kind, settings, log)
                if settings.cache:
                    results[kind] = write_cached(kind_cache(settings, zoo, kind), kind_key(settings, zoo, kind),
                                                 json.loads(json.dumps(results[kind])))
        finally:
            service.close()
    results = [results[k] for k in kinds]
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k != "cache"}
    return {"settings": plain, "command": command,
            "environment": environment(), "base": zoo.base if zoo.chat else "the toy char base", "chat": zoo.chat,
            "max_new_tokens": zoo.max_new_tokens, "off_task_prompts": list(OFF_TASK) if zoo.chat else "pretraining ops",
            "kinds": results, "goal": goal_lines(results), "notes": NOTES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=SCRATCH / "zoo-smollm2", help="a built zoo (bench_zoo.py's default)")
    p.add_argument("--kinds", default="scale,svft,rotation,additive")
    p.add_argument("--n", type=int, default=None, help="test prompts per task (default 50, quick 8)")
    p.add_argument("--n-validation", type=int, default=None, help="validation prompts per task (default 25, quick 8)")
    p.add_argument("--quick", action="store_true", help="8 prompts per task, scale only: minutes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bases-home", type=Path, default=None, help="where the fetched base lives (default: "
                   "the zoo's, else $SPECFUSE_HOME)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/smollm2 for a chat zoo)")
    p.add_argument("--cache", type=Path, default=SCRATCH / "routing",
                   help="one finished kind per file, reused by a rerun (default benchmarks/results/tmp/routing)")
    p.add_argument("--no-cache", action="store_true", help="measure every kind again")
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = p.parse_args(argv)
    kinds = ("scale",) if args.quick and args.kinds == p.get_default("kinds") else tuple(args.kinds.split(","))
    settings = Settings(args.zoo, kinds, args.n or (8 if args.quick else 50),
                        args.n_validation or (8 if args.quick else 25), args.threads, args.quick,
                        args.bases_home, cache=None if args.no_cache else args.cache)
    chat = json.loads((args.zoo / "report.json").read_text())["settings"].get("base") != "char"
    out = args.out or (RESULTS / "smollm2" if chat else RESULTS)
    stem = "routing_quick" if args.quick else "routing"
    if args.markdown_only:
        result = json.loads((out / f"{stem}.json").read_text())
    else:
        command = "python benchmarks/bench_routing.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result = run(settings, command.strip())
    write_results(stem, result, markdown(result), out)
    plot(result, out / f"{stem}.png")
    print(f"bench_routing: wrote {out / stem}.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
