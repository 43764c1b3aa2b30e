"""The measurement protocol, the same for every source and method.

For one source (one adapter per task), a subset of its tasks and a method:

1. every candidate of a small grid (uniform weight λ per adapter; density for the
   sparsifying methods) is fused and scored on the **validation** split of the subset's
   tasks (teacher-forced exact match); the score is the mean normalized accuracy
   (fused / individual, per task);
2. the best candidate is fused again and scored on the **test** split (teacher-forced
   always; by generation too where asked, and the agreement of the two is recorded).

Chat suites (the real base) report generation (the task's checker) on test everywhere,
and select with the teacher-forced scorer on validation; the char suites use the forward
scorer on test and decode the all-task fusions by generation as a check.

Seeds: random methods (DARE) are run once per seed; subsets smaller than the suite are
drawn several times. Each run selects on validation by itself, so the spread over runs
includes the selection's.

Every score is cached on disk under a key naming what was measured (source digest,
method, parameters, tasks, split, scorer), so an interrupted run resumes and a second
run only writes the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion_quality.fusers import FusedInfo, is_distill, is_random, uses_density
from fusion_quality.scoring import (
    accuracy,
    chat_forced_hits,
    chat_generation_hits,
    generation_hits,
    teacher_forced_hits,
)
from fusion_quality.sources import Source

SCORERS = ("forward", "generation", "generation+forward")


@dataclass(frozen=True)
class Grid:
    weights: tuple[float, ...] = (0.5, 1.0, 1.5)  # uniform λ per adapter
    densities: tuple[float, ...] = (0.2, 0.5)  # kept fraction (TIES 20%, DARE 50% are the papers' defaults)
    seeds: tuple[int, ...] = (0, 1, 2)  # DARE's drop masks, on the all-task fusion

    def candidates(self, method: str) -> list[dict[str, float]]:
        if is_distill(method):  # weights are shares of the prompts: uniform, nothing to choose
            return [{"weight": 1.0, "density": None}]
        densities = self.densities if uses_density(method) else (None,)
        return [{"weight": w, "density": d} for w in self.weights for d in densities]


class ResultCache:
    """A JSON file of ``key -> value``, rewritten atomically after every new entry."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {}
        if path is not None and path.is_file():
            self.data = json.loads(path.read_text())

    @staticmethod
    def key(desc: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, desc: dict[str, Any]) -> Any:
        return self.data.get(self.key(desc))

    def put(self, desc: dict[str, Any], value: Any) -> None:
        self.data[self.key(desc)] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)


class NotCached(Exception):
    """A score the cache does not hold, asked of an evaluator that measures nothing (``cached_only``)."""


@dataclass
class Score:
    accuracy: float
    hits: int
    n: int
    disagree: int | None = None  # generation only: examples where the forward check said otherwise


class Evaluator:
    """Scores model states on task splits, from the cache when it can (without building the state)."""

    def __init__(self, tokenizer, splits: dict[tuple[str, str, str], list[dict[str, str]]], cache: ResultCache,
                 chat_tasks: dict | None = None, twin=None, max_new_tokens: int | None = None,
                 cached_only: bool = False):
        """``chat_tasks``: task name -> ``ChatTask`` when the splits are chat examples (their checkers);
        ``twin``: a ``LowPrecisionTwin`` that scores every state (None: the model as it is)."""
        self.tokenizer = tokenizer
        self.splits = splits  # (suite, task, split) -> examples
        self.cache = cache
        self.chat_tasks = chat_tasks
        self.twin = twin
        self.max_new_tokens = max_new_tokens
        self.cached_only = cached_only
        self.test_scorer = "generation" if chat_tasks else "forward"  # what test numbers report
        self.precision = {"dtype": str(twin.dtype).removeprefix("torch.")} if twin is not None else {}
        self.digests = {key: hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:12]
                        for key, examples in splits.items()}  # a score is of these exact examples
        self.generated = 0  # examples decoded by generation (cost accounting)
        self.forwarded = 0
        self.cached = 0  # scores read from the cache instead

    def score_state(self, state: dict[str, Any], enter: Callable, wanted: list[tuple[str, str, str]],
                    suite: str) -> tuple[dict[tuple[str, str, str], Score], FusedInfo | None]:
        """Scores of ``wanted`` (task, split, scorer) for one model state; ``enter()`` builds it if needed.

        ``enter`` is a context manager factory yielding the model, or (model, FusedInfo).
        """
        found: dict[tuple[str, str, str], Score] = {}
        info = None
        info_desc = {"state": state, "info": True}
        cached_info = self.cache.get(info_desc)

        def desc(item: tuple[str, str, str]) -> dict[str, Any]:
            return {"state": state, "eval": list(item), "examples": self.digests[(suite, item[0], item[1])],
                    **self.precision}

        for item in wanted:
            hit = self.cache.get(desc(item))
            if hit is not None:
                found[item] = Score(**hit)
                self.cached += 1
        missing = [item for item in wanted if item not in found]
        if not missing and (cached_info is not None or not state.get("fused")):
            return found, FusedInfo(**cached_info) if cached_info else None
        if self.cached_only:
            raise NotCached(f"{len(missing)} scores of {state}")
        with enter() as entered:
            model, info = entered if isinstance(entered, tuple) else (entered, None)
            if self.twin is not None:
                model = self.twin.of(model)
            for task, split, scorer in missing:
                found[(task, split, scorer)] = self._score(model, suite, task, split, scorer)
                self.cache.put(desc((task, split, scorer)), asdict(found[(task, split, scorer)]))
        if info is not None:
            self.cache.put(info_desc, asdict(info))
        elif cached_info is not None:
            info = FusedInfo(**cached_info)
        return found, info

    def _score(self, model, suite: str, task: str, split: str, scorer: str) -> Score:
        if self.chat_tasks:
            return self._score_chat(model, suite, task, split, scorer)
        examples = self.splits[(suite, task, split)]
        forward = teacher_forced_hits(model, self.tokenizer, examples)
        self.forwarded += len(examples)
        if scorer == "forward":
            return Score(accuracy(forward), sum(forward), len(forward))
        generated = generation_hits(model, self.tokenizer, examples)
        self.generated += len(examples)
        disagree = sum(a != b for a, b in zip(forward, generated))
        return Score(accuracy(generated), sum(generated), len(generated), disagree)

    def _score_chat(self, model, suite: str, task: str, split: str, scorer: str) -> Score:
        """``forward``: teacher-forced; ``generation``: the checker on greedy replies; ``generation+forward``:
        both, the disagreement counted (the forward scorer's check, on the adapters alone)."""
        examples = self.splits[(suite, task, split)]
        tokens = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}
        forward = None
        if scorer in ("forward", "generation+forward"):
            forward = chat_forced_hits(model, self.tokenizer, examples, **tokens)
            self.forwarded += len(examples)
            if scorer == "forward":
                return Score(accuracy(forward), sum(forward), len(forward))
        generated = chat_generation_hits(model, self.tokenizer, self.chat_tasks[task], examples, **tokens)
        self.generated += len(examples)
        disagree = sum(a != b for a, b in zip(forward, generated)) if forward is not None else None
        return Score(accuracy(generated), sum(generated), len(generated), disagree)


# --------------------------------------------------------------------------- individual accuracy


def individual_scores(evaluator: Evaluator, fuser, source: Source, scorers: dict[str, tuple[str, ...]]
                      ) -> dict[str, dict[str, Score]]:
    """``{task: {"validation:forward": Score, "test:generation": Score, ...}}`` for each task's own adapter."""
    out: dict[str, dict[str, Score]] = {}
    for task in source.tasks:
        wanted = [(task, split, s) for split, names in scorers.items() for s in names]
        state = {"source": source.digest, "suite": source.suite, "individual": task, "family": source.family}
        scores, _ = evaluator.score_state(state, lambda t=task: fuser.individual(source, t), wanted, source.suite)
        out[task] = {f"{split}:{scorer.removesuffix('+forward')}": score
                     for (_, split, scorer), score in scores.items()}
    return out


def normalized(fused: float, alone: float) -> float | None:
    return fused / alone if alone > 0 else None


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    suite: str
    source: str
    family: str
    training: str
    method: str
    n: int  # tasks fused
    draw: int
    seed: int
    tasks: list[str]
    chosen: dict[str, float | None]  # the candidate selected on validation
    validation: float | None  # its mean normalized validation accuracy
    test: dict[str, float]  # task -> accuracy (teacher-forced)
    normalized: dict[str, float | None]  # task -> test / individual test
    mean_normalized: float | None
    mean_accuracy: float
    params: int
    bytes: int
    fusion_ms: float
    rank: int | None = None
    test_generation: dict[str, float] | None = None  # task -> accuracy by generation, where measured
    normalized_generation: float | None = None
    disagree: int | None = None  # test examples where the two scorers disagree
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate's validation score


def subsets(tasks: list[str], n: int, draws: int, seed: int, suite: str) -> list[list[str]]:
    """The whole suite once when n covers it, else ``draws`` seeded random n-subsets (in suite order)."""
    if n >= len(tasks):
        return [list(tasks)]
    out = []
    for d in range(draws):
        picked = set(random.Random(f"{seed}:{suite}:{n}:{d}").sample(tasks, n))
        out.append([t for t in tasks if t in picked])
    return out


def run_method(evaluator: Evaluator, fuser, source: Source, method: str, tasks: list[str], grid: Grid, draw: int,
               seed: int, alone: dict[str, dict[str, Score]], test_scorer: str = "forward") -> Run:
    """Select the method's candidate on validation for this subset, then measure it on test."""
    def state(cand: dict[str, float | None]) -> dict[str, Any]:
        return {"source": source.digest, "suite": source.suite, "fused": True, "method": method, "tasks": tasks,
                "weight": cand["weight"], "density": cand["density"], "seed": seed if is_random(method) else 0,
                **fuser.settings(method)}

    def enter(cand):
        return lambda: fuser.fused(source, tasks, method, cand["weight"], cand["density"], seed)

    tried = []
    for cand in grid.candidates(method):
        scores, _ = evaluator.score_state(state(cand), enter(cand), [(t, "validation", "forward") for t in tasks],
                                          source.suite)
        value = mean([normalized(scores[(t, "validation", "forward")].accuracy,
                                 alone[t]["validation:forward"].accuracy) for t in tasks])
        raw = mean([scores[(t, "validation", "forward")].accuracy for t in tasks])
        tried.append({**cand, "validation": value, "validation_accuracy": raw})
    best = max(tried, key=lambda c: (c["validation"] if c["validation"] is not None else c["validation_accuracy"],
                                     -abs(c["weight"] - 1.0)))  # ties: the weight closest to plain addition
    cand = {"weight": best["weight"], "density": best["density"]}
    primary = evaluator.test_scorer
    wanted = [(t, "test", primary) for t in tasks]
    if test_scorer == "generation" and primary != "generation":
        wanted += [(t, "test", "generation") for t in tasks]
    scores, info = evaluator.score_state(state(cand), enter(cand), wanted, source.suite)
    test = {t: scores[(t, "test", primary)].accuracy for t in tasks}
    norm = {t: normalized(test[t], alone[t][f"test:{primary}"].accuracy) for t in tasks}
    run = Run(source.suite, source.name, source.family, source.training, method, len(tasks), draw, seed, tasks,
              cand, best["validation"], test, norm, mean(list(norm.values())), sum(test.values()) / len(test),
              info.params, info.bytes, round(info.seconds * 1000, 3), info.rank, candidates=tried)
    if primary == "generation":  # chat: the reported number is the generation already
        run.test_generation, run.normalized_generation = dict(test), run.mean_normalized
    elif test_scorer == "generation":
        run.test_generation = {t: scores[(t, "test", "generation")].accuracy for t in tasks}
        run.normalized_generation = mean([normalized(run.test_generation[t], alone[t]["test:generation"].accuracy)
                                          for t in tasks])
        run.disagree = sum(scores[(t, "test", "generation")].disagree or 0 for t in tasks)
    return run


def interference(evaluator: Evaluator, fuser, source: Source, method: str, alone: dict[str, dict[str, Score]]
                 ) -> dict[str, dict[str, float | None]]:
    """``m[i][j]``: test accuracy on task i of i fused with j (weights 1, 1), normalized by i alone; diagonal 1."""
    tasks = source.tasks
    scorer = evaluator.test_scorer
    matrix: dict[str, dict[str, float | None]] = {t: {} for t in tasks}
    for a, i in enumerate(tasks):
        matrix[i][i] = 1.0 if alone[i][f"test:{scorer}"].accuracy > 0 else None
        for j in tasks[a + 1 :]:
            pair = [i, j]
            state = {"source": source.digest, "suite": source.suite, "fused": True, "method": method, "tasks": pair,
                     "weight": 1.0, "density": None, "seed": 0}
            scores, _ = evaluator.score_state(
                state, lambda p=pair: fuser.fused(source, p, method, 1.0, None, 0),
                [(t, "test", scorer) for t in pair], source.suite)
            for x, y in ((i, j), (j, i)):
                matrix[x][y] = normalized(scores[(x, "test", scorer)].accuracy, alone[x][f"test:{scorer}"].accuracy)
    return matrix
