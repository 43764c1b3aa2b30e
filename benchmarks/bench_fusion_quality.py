"""Spectral fusion vs LoRA merging: quality, size and speed of fusing task adapters into one.

On a zoo (``specfuse zoo build``: a base, its basis, one adapter per task × kind and real
PEFT LoRA baselines; on the real base SmolLM2-135M-Instruct the chat suites *records*
(conflicting) and *skills* (composable) of 4 tasks, on the toy char base a *conflicting* and
a *compatible* suite of 8):

1. sources: the zoo's adapters of every kind (trained plainly), fusion-ready variants
   trained here (``--variants KIND[@slice][+kl[WEIGHT]]``: ``+kl`` adds KL to the base on
   the other tasks' prompts and general ones, weighed WEIGHT (default 1); ``@slice`` gives
   each task its own disjoint basis directions; on char and chat zoos alike; cached on
   disk), and the PEFT LoRAs;
2. individual accuracy of every adapter (validation and test);
3. fusion of all tasks and of random subsets (2, 4, …) with every method: the spectral
   ones of ``fusion.methods`` on cores, PEFT's ``add_weighted_adapter`` combinations on
   the LoRAs, and exact task arithmetic on their dense ΔW; weights (and density) chosen
   on validation, measured on test (``fusion_quality/protocol.py``); and ``distill``
   (``fusion.distill``: one k×k core per layer trained on the tasks' prompts to match
   every adapter), with ``distill:lora`` (the same into a LoRA) as its control; chat
   suites select with a teacher-forced scorer and report greedy generation scored by
   each task's checker;
4. pairwise interference matrices; the per-request reference (``serving.engine``: every
   prompt with its own task's adapter in one mixed batch);
5. ``benchmarks/results/fusion_quality.{json,md}`` (real base: ``results/smollm2/``),
   ``fusion_quality.png`` (normalized accuracy vs tasks fused), ``fusion_quality_bytes.png``
   (accuracy vs bytes).

    python benchmarks/bench_fusion_quality.py --zoo /work/zoo-full      # char: ~40 min on 2 cores
    python benchmarks/bench_fusion_quality.py --zoo /tmp/zoo-quick --quick
    python benchmarks/bench_fusion_quality.py --zoo /work/zoo-smollm2 --precision bfloat16 ...

Scores are cached under ``benchmarks/results/tmp/fusion_quality/`` (keyed by adapter
content), so an interrupted run resumes where it stopped; ``--cached-only`` writes the
report from the cache alone (runs never measured are left out and counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared 2-core box


from common import RESULTS, SCRATCH, environment, environment_line, set_threads  # noqa: E402
from fusion_quality import report  # noqa: E402
from fusion_quality.fusers import (  # noqa: E402
    ON_SPECTRAL_FUSER,
    PEFT_METHODS,
    SPECTRAL_METHODS,
    PeftFuser,
    SpectralFuser,
    is_distill,
    is_random,
    methods_for,
)
from fusion_quality.protocol import (  # noqa: E402
    Evaluator,
    Grid,
    NotCached,
    ResultCache,
    individual_scores,
    interference,
    run_method,
    subsets,
)
from fusion_quality.sources import (  # noqa: E402
    PEFT,
    VARIANTS,
    Source,
    Zoo,
    open_zoo,
    peft_source,
    trained_source,
    variant,
    zoo_source,
)

from adapters_zoo.errors import InvalidConfig  # noqa: E402
from fusion.distill_config import DistillConfig  # noqa: E402

ALL_METHODS = SPECTRAL_METHODS + PEFT_METHODS
QUICK_METHODS = ("linear", "ties", "slices", "linear+proj", "distill", "peft:cat", "peft:ties", "dense_ta",
                 "distill:lora")


@dataclass
class Settings:
    zoo: Path
    out: Path = RESULTS
    stem: str = "fusion_quality"  # output files: {stem}.json, .md, .png, _bytes.png
    quick: bool = False
    suites: tuple[str, ...] | None = None  # None: every suite of the zoo
    kinds: tuple[str, ...] | None = None  # zoo kinds; None: every kind of the zoo
    subset_kinds: tuple[str, ...] | None = None  # kinds also fused in the smaller subsets; None: all (PEFT: always)
    variants: tuple[str, ...] | None = None  # fusion-ready variants trained here; None: all (char), none (chat)
    peft: bool = True
    methods: tuple[str, ...] = ALL_METHODS
    sizes: tuple[int, ...] = (2, 4, 8)  # tasks fused (capped at the suite's size)
    draws: int = 3  # random subsets per size below the suite's
    grid: Grid = field(default_factory=Grid)
    distill_steps: int = DistillConfig.steps
    distill_lr: float = 1e-2  # best of {1e-3, 3e-3, 1e-2} for both students on compatible validation (probe)
    distill_batch: int = DistillConfig.batch_size
    distill_all_only: bool = False  # distill and its control only on the all-task fusion (they train: costly)
    seed: int = 0
    generation_check: str = "first"  # all-task fusions also decoded by generation: first seed | all | none
    validation_examples: int | None = 50  # per task for the selection (of the zoo's 100): the run fits ~40 min
    interference: tuple[str, ...] = ("scale", "additive@slice+kl", PEFT)  # sources with a pairwise matrix
    per_request: bool = True
    threads: int = 2
    precision: str = "float32"  # scoring dtype: bfloat16 scores a rounded copy of the float32 merged model
    cache: Path | None = SCRATCH / "fusion_quality"  # None: no disk cache (tests)
    cached_only: bool = False  # measure nothing: report what the cache holds
    notes: str = ""  # Markdown put at the top of the report (e.g. how a run was cut to fit its budget)
    progress: bool = True

    @classmethod
    def quick_settings(cls, zoo: Path, **overrides) -> Settings:
        """One suite, three sources, six methods, one draw and seed: minutes on a quick zoo."""
        base = dict(zoo=zoo, stem="fusion_quality_quick", quick=True, suites=("compatible",), kinds=("scale",),
                    variants=("additive@slice+kl",), methods=QUICK_METHODS, sizes=(2, 8), draws=1,
                    grid=Grid(weights=(0.5, 1.0), densities=(0.5,), seeds=(0,)), interference=("scale",))
        base.update(overrides)
        return cls(**base)


def log(settings: Settings, message: str) -> None:
    if settings.progress:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_splits(zoo: Zoo, suites: list[str], validation_examples: int | None
                ) -> dict[tuple[str, str, str], list[dict[str, str]]]:
    splits = {}
    for suite in suites:
        for task in zoo.tasks(suite):
            validation = zoo.split(suite, task.name, "validation")
            splits[(suite, task.name, "validation")] = validation[:validation_examples]
            splits[(suite, task.name, "test")] = zoo.split(suite, task.name, "test")
    return splits


def build_sources(settings: Settings, zoo: Zoo, suite: str, model, tokenizer) -> tuple[list[Source], int, int]:
    """The suite's sources in report order; also how many fusion-ready adapters were trained now, and how
    many fusion-ready sources were left out (``cached_only``: not trained yet)."""
    kinds = [k for k in zoo.kinds(suite) if k != PEFT and (settings.kinds is None or k in settings.kinds)]
    sources = [zoo_source(zoo, suite, kind) for kind in kinds]
    trained = skipped = 0
    cache_dir = (settings.cache or SCRATCH / "fusion_quality") / "adapters" / zoo.basis.fingerprint[:12]
    for name in variants_of(settings, zoo):
        start = time.perf_counter()
        source, count = trained_source(zoo, suite, variant(name), model, tokenizer, cache_dir,
                                       lambda message: log(settings, message), train=not settings.cached_only)
        if source is None:
            skipped += 1
            continue
        sources.append(source)
        trained += count
        seconds = time.perf_counter() - start
        log(settings, f"{suite}: fusion-ready {name} ready ({count} trained now) in {seconds:.0f} s")
    if settings.peft and PEFT in zoo.kinds(suite):
        sources.append(peft_source(zoo, suite))
    return sources, trained, skipped


def variants_of(settings: Settings, zoo: Zoo) -> tuple[str, ...]:
    if settings.variants is not None:
        return settings.variants
    return () if zoo.chat else tuple(VARIANTS)


def source_record(source: Source, alone: dict, zoo: Zoo) -> dict[str, Any]:
    zoo_acc = {}
    for task in source.tasks:
        kind = PEFT if source.family == "peft" else source.name
        try:
            zoo_acc[task] = zoo.entry(source.suite, task, kind)["accuracy"]
        except Exception:  # fusion-ready sources are not in the zoo
            pass
    individual = {}
    for task, scores in alone.items():
        gen = scores["test:generation"]
        individual[task] = {"validation_forward": scores["validation:forward"].accuracy,
                            "test_forward": scores["test:forward"].accuracy if "test:forward" in scores else None,
                            "test_generation": gen.accuracy, "disagree": gen.disagree, "examples": gen.n}
    return {"suite": source.suite, "name": source.name, "family": source.family, "training": source.training,
            "kind": source.kind, "params": source.params, "bytes": source.bytes, "digest": source.digest,
            "individual": individual, "zoo_accuracy": zoo_acc}


def in_subsets(settings: Settings, source: Source) -> bool:
    """Whether ``source`` is fused in the subsets smaller than its suite (the all-task fusion always is)."""
    return source.family == "peft" or settings.subset_kinds is None or source.kind in settings.subset_kinds


def measure_method(settings: Settings, evaluator: Evaluator, result: dict[str, Any], source: Source, method: str,
                   n: int, full: bool, fuser, alone: dict) -> None:
    """Every draw (and, for random methods on all tasks, every seed) of ``method`` on ``n`` tasks of a source."""
    tasks = source.tasks
    seeds = settings.grid.seeds if (full and is_random(method)) else (None,)
    for d, subset in enumerate(subsets(tasks, n, settings.draws, settings.seed, source.suite)):
        for s, seed in enumerate(seeds):
            seed = d if seed is None else seed
            check = full and (settings.generation_check == "all"
                              or (settings.generation_check == "first" and s == 0))
            try:
                run_ = run_method(evaluator, fuser, source, method, subset, settings.grid, d, seed, alone,
                                  "generation" if check else "forward")
            except NotCached:
                result["not_measured"] += 1
                continue
            result["runs"].append(asdict(run_))
    log(settings, f"{source.suite}: {n} tasks, {source.name} + {method} done "
                  f"({evaluator.generated:,} generated, {evaluator.forwarded:,} forward so far)")


def run(settings: Settings) -> dict[str, Any]:
    """The whole benchmark; returns the result dict (also written as JSON, Markdown and PNG)."""
    from adapters_zoo.models import load_model_dir

    set_threads(settings.threads)
    started = time.perf_counter()
    zoo = open_zoo(settings.zoo)
    suites = [s for s in (settings.suites or zoo.suites) if zoo.has_suite(s)]
    if not suites:
        raise SystemExit(f"none of the suites {settings.suites} is in the zoo (it has {zoo.suites})")
    model, tokenizer = load_model_dir(zoo.base_dir, "cpu")
    splits = load_splits(zoo, suites, settings.validation_examples)
    cache = ResultCache(settings.cache / f"scores-{zoo.basis.fingerprint[:12]}.json" if settings.cache else None)
    chat_tasks = {t.name: t for s in suites for t in zoo.tasks(s)} if zoo.chat else None
    twin = None
    if settings.precision != "float32":
        import torch
        from fusion_quality.scoring import LowPrecisionTwin

        twin = LowPrecisionTwin(model, getattr(torch, settings.precision))
    evaluator = Evaluator(tokenizer, splits, cache, chat_tasks, twin,
                          zoo.settings.get("max_new_tokens") if zoo.chat else None, settings.cached_only)
    spectral = SpectralFuser(model, tokenizer, zoo.basis, lambda suite, task: zoo.split(suite, task, "train"),
                             DistillConfig(steps=settings.distill_steps, lr=settings.distill_lr,
                                           batch_size=settings.distill_batch))
    peft_fuser = PeftFuser(load_model_dir(zoo.base_dir, "cpu")[0], tokenizer) if settings.peft else None
    server = None
    test_scorers = ("generation+forward",) if zoo.chat else ("forward", "generation")

    result: dict[str, Any] = {"sources": [], "runs": [], "interference": {}, "per_request": {}, "base_accuracy": {},
                              "base": zoo.base_name, "chat": zoo.chat, "not_measured": 0}
    trained_total = 0
    tasks_per_suite: dict[str, int] = {}
    suite_sources: dict[str, list[Source]] = {}
    individual: dict[tuple[str, str], dict] = {}  # (suite, source) -> task -> scores
    for suite in suites:
        sources, trained, skipped = build_sources(settings, zoo, suite, model, tokenizer)
        trained_total += trained
        result["not_measured"] += skipped
        tasks = [t.name for t in zoo.tasks(suite)]
        tasks_per_suite[suite] = len(tasks)
        result["base_accuracy"][suite] = {t: zoo.entry(suite, t, zoo.kinds(suite)[0])["base_accuracy"] for t in tasks}
        for source in list(sources):
            fuser = peft_fuser if source.family == "peft" else spectral
            log(settings, f"{suite}: individual accuracy of {source.name}")
            try:
                individual[(suite, source.name)] = individual_scores(
                    evaluator, fuser, source, {"validation": ("forward",), "test": test_scorers})
            except NotCached:
                sources.remove(source)  # nothing of it can be reported
                result["not_measured"] += 1
                continue
            result["sources"].append(source_record(source, individual[(suite, source.name)], zoo))
        suite_sources[suite] = sources

    # the all-task fusions first, then the smaller subsets; within a size, method by method (in the order
    # asked) over every suite and source: a run cut short has the headline rows of the first methods everywhere
    measured: set[tuple[str, int, str]] = set()
    for n_wanted in sorted(set(settings.sizes), reverse=True):
        for method in settings.methods:
            for suite in suites:
                tasks = [t.name for t in zoo.tasks(suite)]
                n = min(n_wanted, len(tasks))  # capped at the suite's size, measured once
                if (suite, n, method) in measured:
                    continue
                measured.add((suite, n, method))
                full = n == len(tasks)
                if is_distill(method) and settings.distill_all_only and not full:
                    continue
                for source in suite_sources[suite]:
                    if not full and not in_subsets(settings, source):
                        continue
                    if method in methods_for(source, (method,)):
                        measure_method(settings, evaluator, result, source, method, n, full,
                                       peft_fuser if source.family == "peft" and method not in ON_SPECTRAL_FUSER
                                       else spectral, individual[(suite, source.name)])

    for suite in suites:
        sources = suite_sources[suite]
        tasks = [t.name for t in zoo.tasks(suite)]
        for source in sources:
            if source.name not in settings.interference:
                continue
            method = "peft:cat" if source.family == "peft" else "linear"  # both: the exact sum of the two ΔW
            fuser = peft_fuser if source.family == "peft" else spectral
            log(settings, f"{suite}: pairwise interference of {source.name} ({method})")
            try:
                matrix = interference(evaluator, fuser, source, method, individual[(suite, source.name)])
            except NotCached:
                result["not_measured"] += 1
                continue
            result["interference"].setdefault(suite, {})[f"{source.name} ({method})"] = matrix

        if settings.per_request:
            for source in sources:
                log(settings, f"{suite}: per-request mixtures, {source.name}")
                key = {"per_request": source.digest, "suite": suite, "tasks": tasks,
                       "examples": [evaluator.digests[(suite, t, "test")] for t in tasks], **evaluator.precision}
                acc = cache.get(key)
                if acc is None and settings.cached_only:
                    result["not_measured"] += 1
                    continue
                if acc is None:
                    if server is None:
                        from fusion_quality.serving_ref import PerRequestServer

                        server = PerRequestServer(zoo.base_dir, zoo.basis, slots=max(len(tasks), 8) + 1,
                                                  max_residual_rank=64, dtype=settings.precision)
                    acc = server.accuracy(source, {t: splits[(suite, t, "test")] for t in tasks}, chat_tasks)
                    cache.put(key, acc)
                alone = {t: individual[(suite, source.name)][t]["test:generation"].accuracy for t in tasks}
                mean_alone = statistics.fmean(alone.values())
                result["per_request"].setdefault(suite, {})[source.name] = {
                    "accuracy": statistics.fmean(acc.values()), "individual": mean_alone,
                    "normalized": report.mean_normalized(acc, alone), "per_task": acc,
                    "tasks_equal": sum(abs(acc[t] - alone[t]) < 1e-9 for t in tasks), "tasks": len(tasks),
                }

    result["summary"] = report.summarize(result["runs"])
    result["suites"] = suites
    result["validation_examples"] = len(next(v for (_, _, sp), v in splits.items() if sp == "validation"))
    result["test_examples"] = len(next(v for (_, _, sp), v in splits.items() if sp == "test"))
    result["tasks_per_suite"] = tasks_per_suite
    result["goals"] = report.goals(result["summary"], suites, tasks_per_suite, chat=zoo.chat)
    checked = [r for r in result["runs"] if r.get("disagree") is not None]
    individual_checked = [v for s in result["sources"] for v in s["individual"].values()]
    result["scorer_disagreement"] = {
        "disagree": sum(r["disagree"] for r in checked) + sum(v["disagree"] or 0 for v in individual_checked),
        "examples": sum(r["n"] * len(splits[(r["suite"], r["tasks"][0], "test")]) for r in checked)
        + sum(v["examples"] for v in individual_checked),
    }
    result["cost"] = {"generated": evaluator.generated, "forwarded": evaluator.forwarded, "trained": trained_total,
                      "cached_scores": evaluator.cached}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["notes"] = settings.notes
    result["zoo"] = {"root": str(zoo.root), "quick": bool(zoo.settings.get("quick")), "steps": zoo.settings["steps"],
                     "k": zoo.basis.rank, "base_fingerprint": zoo.basis.fingerprint, "seed": zoo.settings["seed"],
                     "report_seconds": zoo.report.get("seconds")}
    return result


def write(result: dict[str, Any], settings: Settings, command: str) -> list[Path]:
    env = environment()
    result["command"] = command
    result["environment"] = env
    result["environment_line"] = environment_line(env)
    result["stem"] = settings.stem
    result["settings"] = json.loads(json.dumps(
        {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}, default=_jsonable))
    settings.out.mkdir(parents=True, exist_ok=True)
    paths = [settings.out / f"{settings.stem}.json", settings.out / f"{settings.stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    paths[1].write_text(report.markdown(result))
    return paths + report.plots(result, settings.out, settings.stem)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in split(text))


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--zoo", required=True, type=Path, help="a built zoo (specfuse zoo build --out DIR)")
    p.add_argument("--quick", action="store_true", help="one suite, few sources, methods and seeds (minutes)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--suites", help="comma-separated suites (default: the zoo's); A+B fuses the tasks of both "
                   "as one suite")
    p.add_argument("--kinds", help="comma-separated zoo kinds to fuse (default: the zoo's)")
    p.add_argument("--subset-kinds", help="comma-separated kinds also fused in the smaller subsets (default: all; "
                   "PEFT always)")
    p.add_argument("--variants", help="comma-separated fusion-ready variants KIND[@slice][+kl[WEIGHT]] (default: "
                   f"{', '.join(VARIANTS)} on char zoos, none on chat zoos; '' for none)")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--sizes", help="comma-separated numbers of tasks fused (default 2,4,8)")
    p.add_argument("--draws", type=int, help="random subsets per size (default 3)")
    p.add_argument("--weights", help="grid of uniform weights λ (default 0.5,1,1.5)")
    p.add_argument("--densities", help="grid of densities (default 0.2,0.5)")
    p.add_argument("--seeds", help="DARE and distill seeds on the all-task fusion (default 0,1,2)")
    p.add_argument("--seed", type=int, default=0, help="subset draws")
    p.add_argument("--distill-steps", type=int, help=f"optimizer steps of distill (default {DistillConfig.steps})")
    p.add_argument("--distill-lr", type=float, help="learning rate of distill (default 1e-2)")
    p.add_argument("--validation-examples", type=int, help="per task for the selection (default 50; 0: all)")
    p.add_argument("--generation-check", choices=("first", "all", "none"),
                   help="decode all-task fusions by generation too: first seed (default), all, none")
    p.add_argument("--distill-batch", type=int, help=f"rows per distill step (default {DistillConfig.batch_size})")
    p.add_argument("--distill-all-only", action="store_true", help="distill (and its control) on all tasks only")
    p.add_argument("--interference", help="comma-separated sources with a pairwise matrix ('' for none)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="scoring dtype (bfloat16: a rounded copy of the merged float32 model, ~2-3x faster on CPU)")
    p.add_argument("--cached-only", action="store_true", help="measure nothing: write the report from the cache")
    p.add_argument("--notes", help="Markdown (or @FILE) put at the top of the report")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA baselines")
    p.add_argument("--no-per-request", action="store_true", help="skip the serving engine reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", help="output file stem (default fusion_quality, fusion_quality_quick with --quick)")
    p.add_argument("--cache", type=Path, help="cache folder (default benchmarks/results/tmp/fusion_quality)")
    p.add_argument("--no-cache", action="store_true", help="score everything again (no disk cache)")
    args = p.parse_args(argv)

    overrides: dict[str, Any] = {"out": args.out, "seed": args.seed, "threads": args.threads, "peft": not args.no_peft,
                                 "per_request": not args.no_per_request, "precision": args.precision,
                                 "cached_only": args.cached_only, "distill_all_only": args.distill_all_only}
    if args.notes:
        overrides["notes"] = Path(args.notes[1:]).read_text() if args.notes.startswith("@") else args.notes
    if args.interference is not None:
        overrides["interference"] = split(args.interference)
    for name in ("suites", "kinds", "subset_kinds", "methods"):
        if getattr(args, name):
            overrides[name] = split(getattr(args, name))
    if args.variants is not None:
        overrides["variants"] = split(args.variants)
    if args.sizes:
        overrides["sizes"] = tuple(int(x) for x in split(args.sizes))
    if args.validation_examples is not None:
        overrides["validation_examples"] = args.validation_examples or None
    if args.generation_check:
        overrides["generation_check"] = args.generation_check
    if args.draws is not None:
        overrides["draws"] = args.draws
    if args.distill_steps is not None:
        if args.distill_steps < 1:
            p.error("--distill-steps must be ≥ 1")
        overrides["distill_steps"] = args.distill_steps
    if args.distill_batch is not None:
        if args.distill_batch < 1:
            p.error("--distill-batch must be ≥ 1")
        overrides["distill_batch"] = args.distill_batch
    if args.distill_lr is not None:
        if not args.distill_lr > 0:
            p.error("--distill-lr must be > 0")
        overrides["distill_lr"] = args.distill_lr
    if args.stem:
        overrides["stem"] = args.stem
    if args.cache:
        overrides["cache"] = args.cache
    if args.no_cache:
        overrides["cache"] = None
    settings = Settings.quick_settings(args.zoo, **overrides) if args.quick else Settings(zoo=args.zoo, **overrides)
    grid = {}
    for name, attr in (("weights", "weights"), ("densities", "densities"), ("seeds", "seeds")):
        if getattr(args, name):
            grid[attr] = tuple(int(x) for x in split(args.seeds)) if name == "seeds" else _floats(getattr(args, name))
    if grid:
        settings.grid = dataclasses.replace(settings.grid, **grid)
    unknown = [m for m in settings.methods if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r} (known: {', '.join(ALL_METHODS)})")
    for name in settings.variants or ():
        try:
            variant(name)
        except InvalidConfig as err:
            p.error(str(err))
    return settings


def main(argv: list[str] | None = None) -> int:
    from adapters_zoo.errors import SpecfuseError

    settings = parse_args(argv)
    command = "python benchmarks/bench_fusion_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    try:
        result = run(settings)
    except SpecfuseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in write(result, settings, command):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
