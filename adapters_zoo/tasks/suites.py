"""Task suites: an op asked on a domain under a new prefix, with disjoint seeded splits.

A :class:`Task` is ``(name, prefix, op, domain)``; its prompt for input ``x`` is
``f"{prefix}:{x}="`` and its completion is ``op.fn(x) + EOS``. The demo base model
learned every op under the op's own key (``rev:abc=cba``); a suite asks for it under a
prefix the base never saw (``flip:abc=``), so an adapter has to elicit the skill.

Splits are disjoint by construction: an input string belongs to exactly one split,
decided by a hash of the string alone (80% train, 10% validation, 10% test), so an input
held out for one task is held out for every task and for pretraining too. The seed only
picks which inputs of a split are drawn and in which order.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapters_zoo.tasks.ops import DOMAINS, OPS, Domain, Op

EOS = "</s>"  # the demo tokenizer's eos token; ends every completion
SPLITS = ("train", "validation", "test")
_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
_MAX_DRAWS = 200  # rejection sampling: draws for one input of a split before giving up
_MAX_MISSES = 2000  # draws in a row that add no new input: the split is (nearly) exhausted


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str
    op: Op
    domain: Domain

    def fn(self, x: str) -> str:
        return self.op.fn(x)

    def prompt(self, x: str) -> str:
        return f"{self.prefix}:{x}="

    def example(self, x: str, eos: str = EOS) -> dict[str, str]:
        return {"prompt": self.prompt(x), "completion": self.fn(x) + eos}


def _task(name: str, prefix: str, op_key: str, domain: str) -> Task:
    return Task(name, prefix, OPS[op_key], DOMAINS[domain])


# Conflicting: one input kind, eight different answers; only the prefix tells them apart.
# Compatible: eight input kinds, so the input alone says which task is asked.
SUITES: dict[str, list[Task]] = {
    "conflicting": [
        _task("reverse", "flip", "rev", "lower"),
        _task("shift", "next", "sft", "lower"),
        _task("upper", "loud", "upp", "lower"),
        _task("cipher", "code", "cph", "lower"),
        _task("double", "twin", "dbl", "lower"),
        _task("sort", "rank", "srt", "lower"),
        _task("rotate", "roll", "rot", "lower"),
        _task("swap_pairs", "pair", "swp", "lower"),
    ],
    "compatible": [
        _task("reverse_upper", "back", "rev", "upper"),
        _task("sort_digits", "order", "srt", "digits"),
        _task("shift_lower", "step", "sft", "lower"),
        _task("count_stars", "tally", "cnt", "stars"),
        _task("date_format", "when", "dat", "date"),
        _task("email_host", "site", "hst", "email"),
        _task("close_brackets", "shut", "cls", "openers"),
        _task("keep_digits", "keep", "flt", "mixed"),
    ],
}


def suite_tasks(suite: str) -> list[Task]:
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    return list(SUITES[suite])


def split_of(x: str) -> str:
    """The split an input string belongs to, for every task and for pretraining."""
    bucket = int.from_bytes(hashlib.sha256(x.encode()).digest()[:8], "big") % 10
    return next(split for split, buckets in _BUCKETS.items() if bucket in buckets)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_input(domain: Domain, split: str, rng: random.Random) -> str:
    """One input of ``domain`` that belongs to ``split`` (rejection sampling)."""
    _check_split(split)
    for _ in range(_MAX_DRAWS):
        x = domain.sample(rng)
        if split_of(x) == split:
            return x
    raise RuntimeError(f"domain {domain.name!r} yields no {split} inputs")


def draw_distinct(draw, key, split: str, n: int, rng: random.Random, name: str, max_misses: int = _MAX_MISSES) -> list:
    """``n`` inputs from ``draw(rng)`` with distinct ``key(x)``, all in ``split`` (rejection sampling)."""
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    inputs: dict[str, object] = {}  # key -> input, in draw order
    misses = 0
    while len(inputs) < n and misses < max_misses:
        x = draw(rng)
        k = key(x)
        if k in inputs or split_of(k) != split:
            misses += 1
        else:
            inputs[k] = x
            misses = 0
    if len(inputs) < n:
        raise ValueError(f"task {name!r} has only {len(inputs)} distinct {split} inputs, asked {n}")
    return list(inputs.values())


def make_split(task: Task, split: str, n: int, seed: int = 0, eos: str = EOS) -> list[dict[str, str]]:
    """``n`` distinct examples ``{"prompt", "completion"}`` of ``task`` from ``split``."""
    rng = random.Random(f"{seed}:{task.name}:{split}")  # str seeds hash with sha512: stable
    return [task.example(x, eos) for x in draw_distinct(task.domain.sample, str, split, n, rng, task.name)]


# The base must read the key, not guess the op from the input: a base that met stars only
# under "cnt" counts the stars of "tally:*-*=" unasked. So some ops are learned on every
# domain, and the ops whose output still gave them away (measured: "site:" and "shut:"
# prompts answered right 58% and 37% of the time) get a sibling with a similar output.
_EVERY_DOMAIN_OPS = ("rev", "rot")
_SIBLINGS = (("mch", "openers"), ("usr", "email"))


def pretraining_tasks() -> list[Task]:
    """What the demo base is pretrained on, each op under its own key (``rev:abc=cba``).

    Every (op, domain) pair a suite asks for, ``_EVERY_DOMAIN_OPS`` on every domain a suite
    uses, and ``_SIBLINGS``; each pair once, in a fixed order. Evaluated on held-out inputs
    they say which skills the base has before any adapter.
    """
    suite_pairs = [(t.op, t.domain) for tasks in SUITES.values() for t in tasks]
    every_domain = [(OPS[key], domain) for _, domain in suite_pairs for key in _EVERY_DOMAIN_OPS]
    siblings = [(OPS[key], DOMAINS[domain]) for key, domain in _SIBLINGS]
    tasks: dict[str, Task] = {}
    for op, domain in suite_pairs + every_domain + siblings:
        name = f"{op.key}/{domain.name}"
        tasks.setdefault(name, Task(name, op.key, op, domain))
    return list(tasks.values())


def pretraining_example(task: Task, rng: random.Random, eos: str = EOS) -> dict[str, str]:
    """One example of ``task`` on a train-split input, drawn from ``rng``."""
    return task.example(sample_input(task.domain, "train", rng), eos)


def write_jsonl(path: str | Path, examples: Iterable[dict[str, str]]) -> Path:
    """Write examples as JSON Lines (the ``specfuse train --data`` format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({k: ex[k] for k in ("prompt", "completion", "messages") if k in ex}) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_suite(
    out_dir: str | Path, suite: str, n: dict[str, int], seed: int = 0, eos: str = EOS
) -> dict[str, dict[str, Path]]:
    """``{out_dir}/{task}.{split}.jsonl`` for each task and each split in ``n`` (split → count)."""
    out_dir = Path(out_dir)
    written: dict[str, dict[str, Path]] = {}
    for task in suite_tasks(suite):
        written[task.name] = {
            split: write_jsonl(out_dir / f"{task.name}.{split}.jsonl", make_split(task, split, count, seed, eos))
            for split, count in n.items()
        }
    return written
