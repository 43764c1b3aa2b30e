"""The zoo: one base, its basis, and one adapter per task × kind, with a report.

    zoo/
      base/                        the char base only (the real base lives in HOME/bases/NAME)
      basis.safetensors            the base's top-k basis (also declared in the registry)
      data/{suite}/{task}.{split}.jsonl
      adapters/{suite}/{kind}/{task}.safetensors
      entries/{suite}/{kind}/{task}.json   one finished adapter's report row (what resume reads)
      peft/{suite}/{task}/         PEFT LoRA baselines (adapter_config.json + safetensors)
      registry/                    a registry home holding the basis and every adapter
      report.json, report.md       accuracy per task × kind, parameters, bytes, time

Two bases: ``smollm2-135m-instruct`` (the default: the real instruct LLM from
``specfuse base fetch``, with the chat suites ``records`` and ``skills`` of
:mod:`adapters_zoo.tasks.chat`) and ``char`` (a character-level Llama pretrained here in
minutes, with the string-op suites; a fixture for fast tests of internals). The build is
resumable: each adapter's row is written as it finishes, and a rerun with the same
settings reuses every finished row instead of training again.

Everything is seeded and runs with a fixed thread count and deterministic kernels, so
two builds with the same settings write identical adapter files (timings live only in
the report). Kinds train with the same steps, learning rate schedule and data as the
PEFT LoRA baseline ("a comparable budget"); only their learning rates differ, each
being the rate at which that kind trains well (see ``KIND_SETTINGS``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adapters_zoo.basis import Basis, basis_from_model, load_basis, save_basis
from adapters_zoo.data import encode_examples, pad_batch, pad_id_of
from adapters_zoo.demo_model import pretrain_base
from adapters_zoo.errors import AdapterNotFound
from adapters_zoo.files import canonicalize_file, write_atomic
from adapters_zoo.format import adapter_to_bytes, save_adapter
from adapters_zoo.inject import attach, detach
from adapters_zoo.loop import Batches, Schedule, completion_logits, completion_loss_sum, optimize
from adapters_zoo.models import load_model_dir
from adapters_zoo.tasks import evaluate, make_split, suite_tasks, write_jsonl
from adapters_zoo.tasks.chat import CHAT_SUITES, chat_suite_tasks, evaluate_chat, make_chat_split
from adapters_zoo.train import train_adapter
from adapters_zoo.train_config import TrainConfig

CHAR_BASE = "char"
REAL_BASE = "smollm2-135m-instruct"

# kind -> (kind config, learning rate). Ranks are chosen so every spectral kind has fewer
# trainable parameters than the rank-4 LoRA baseline.
KIND_SETTINGS: dict[str, tuple[dict[str, Any], float]] = {
    "scale": ({"rank": 32}, 5e-2),
    "svft": ({"pattern": "banded", "d": 2}, 2e-2),
    "rotation": ({"rank": 16}, 1e-2),
    "additive": ({"rank": 4}, 1e-2),
    "lora": ({"rank": 4, "alpha": 8.0}, 1e-2),
}
PEFT_RANK, PEFT_ALPHA, PEFT_LR = 4, 8.0, 1e-2
# The pretrained LLM moves further per step than the toy. Probed on order_date_iso, 24 steps:
# additive diverges at 5e-3 (its factors are scaled by the large top σ) and reaches 1.00 at
# 5e-4; rotation diverges at 2e-2, under-trains at 1e-2 (0.04), reaches 1.00 at 3e-3; LoRA 5e-3.
# svft under-trains at 2e-2 (name_last_first 0.00: the name, not reordered), so 5e-2 as scale.
REAL_LR_SCALE = {"additive": 0.05, "rotation": 0.3, "lora": 0.5, "svft": 2.5}


@dataclass
class ZooSettings:
    out: Path
    base: str = REAL_BASE  # a name in adapters_zoo.bases.BASES, or "char" (the toy: tests of internals)
    bases_home: Path | None = None  # where fetched bases live (default: $SPECFUSE_HOME, else ~/.specfuse)
    seed: int = 0
    quick: bool = False
    suites: tuple[str, ...] | None = None  # None: the base's suites (records, skills | conflicting, compatible)
    kinds: tuple[str, ...] = ("scale", "svft", "rotation", "additive")
    peft_lora: bool = True
    tasks_per_suite: int | None = None  # None: every task of the suite
    rank: int = 32  # basis k
    steps: int | None = None  # per adapter; None: real base 24 (quick 12; scale reaches loss 0.03 by ~25), char 300
    batch_size: int | None = None  # None: real base 8 (≈1.5–6 s a step on 2 cores), char 32
    n_train: int | None = None  # None: steps × batch examples (each seen once) for the real base, 2000 for char
    n_eval: int | None = None  # validation and test examples per task; None: real base 50 (quick 16), char 100
    max_new_tokens: int = 48  # evaluation: the longest answer (a JSON object) is ~25 tokens
    pretrain_steps: int | None = None  # char base: None = the demo base's quick / full default
    model_overrides: dict[str, Any] = field(default_factory=dict)  # char base: e.g. a tinier model for tests
    threads: int = 2
    train_missing: bool = True  # False: report the finished rows only (a report while a build still runs)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        chat = self.chat
        if self.suites is None:
            self.suites = tuple(CHAT_SUITES) if chat else ("conflicting", "compatible")
        self.suites = tuple(self.suites)
        if self.steps is None:
            self.steps = (12 if self.quick else 24) if chat else (80 if self.quick else 300)
        if self.batch_size is None:
            self.batch_size = 8 if chat else 32
        if self.n_train is None:
            self.n_train = self.steps * self.batch_size if chat else 2000
        if self.n_eval is None:
            self.n_eval = (16 if self.quick else 50) if chat else 100
        if self.quick and self.tasks_per_suite is None:
            self.tasks_per_suite = 2 if chat else 4

    @property
    def chat(self) -> bool:
        return self.base != CHAR_BASE


@dataclass
class ZooEntry:
    suite: str
    task: str
    kind: str  # a specfuse kind, or "peft-lora"
    name: str  # registry name (spectral kinds) or PEFT directory
    accuracy: float
    base_accuracy: float
    params: int
    bytes: int
    seconds: float
    final_loss: float


def registry_name(task: str, kind: str) -> str:
    return f"{task}-{kind}"


def _peft_train(model, tokenizer, examples, steps: int, batch_size: int, seed: int, lr: float):
    """A real PEFT LoRA (q,k,v,o,gate,up,down) trained with the same loop and budget as ours."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=PEFT_RANK, lora_alpha=PEFT_ALPHA, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    rows = [row[:2] for row in encode_examples(tokenizer, examples, 256)]
    batches = Batches(rows, batch_size, torch.Generator().manual_seed(seed))
    pad_id = pad_id_of(tokenizer)
    peft_model.eval()

    def loss_fn(step: int) -> torch.Tensor:
        batch = pad_batch(batches.next(), pad_id, "cpu")
        loss_sum, count = completion_loss_sum(completion_logits(peft_model, batch), batch["labels"])
        return loss_sum / max(count, 1)

    losses = optimize(params, loss_fn, Schedule.with_warmup_ratio(steps, lr, 0.06))
    return peft_model, sum(losses[-10:]) / len(losses[-10:]), sum(p.numel() for p in params)


def _deterministic(threads: int):
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return previous


def build_zoo(settings: ZooSettings, home: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (or complete) the zoo under ``settings.out``; returns the report as a dict.

    ``home``: the registry to register the basis and adapters in (default ``out/registry``).
    Finished adapters (file + row under ``entries/``, same settings) are reused, so an
    interrupted build resumes where it stopped.
    """
    from adapters_zoo.registry import Registry

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    previous = _deterministic(settings.threads)
    started = time.perf_counter()
    try:
        model, tokenizer, basis = _base_and_basis(settings, progress)
        registry = Registry(home if home is not None else out / "registry")
        registry.add_basis(basis)
        entries: list[ZooEntry] = []
        for suite in settings.suites:
            tasks = _suite_tasks(settings, suite)[: settings.tasks_per_suite]
            for task in tqdm(tasks, desc=f"zoo {suite}", unit="task", disable=not progress):
                entries += _build_task(settings, suite, task, model, tokenizer, basis, registry, progress)
        registry.close()
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
    report = _report(settings, basis, entries, time.perf_counter() - started)
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(out / "report.md", report_markdown(report).encode())
    return report


def base_model_dir(settings: ZooSettings, progress: bool = True) -> Path:
    """The zoo's base model directory: fetched (real base) or pretrained into ``out/base`` (char)."""
    if not settings.chat:
        return pretrain_base(settings.out / "base", seed=settings.seed, steps=settings.pretrain_steps,
                             quick=settings.quick, model_overrides=settings.model_overrides or None,
                             progress=progress, threads=settings.threads)
    from adapters_zoo.bases import fetch_base

    return fetch_base(settings.base, settings.bases_home, progress=progress).path


def _base_and_basis(settings: ZooSettings, progress: bool):
    """(model, tokenizer, basis); the real base's basis is cached in ``out/basis.safetensors`` (an SVD of
    210 layers takes ~45 s) and recomputed only when k or the base's fingerprint differs."""
    from adapters_zoo.basis import fingerprint_model

    model_dir = base_model_dir(settings, progress)
    model, tokenizer = load_model_dir(model_dir, "cpu")
    cached = settings.out / "basis.safetensors"
    basis = load_basis(cached) if settings.chat and cached.is_file() else None
    if basis is None or basis.rank != settings.rank or \
            fingerprint_model(model, basis.layer_names()) != basis.fingerprint:
        basis = basis_from_model(model, settings.rank)
        save_basis(basis, cached)
    return model, tokenizer, basis


def _suite_tasks(settings: ZooSettings, suite: str) -> list:
    return chat_suite_tasks(suite) if settings.chat else suite_tasks(suite)


def _split(settings: ZooSettings, task, split: str, n: int) -> list[dict]:
    return make_chat_split(task, split, n, settings.seed) if settings.chat else make_split(task, split, n,
                                                                                             settings.seed)


def score(settings: ZooSettings, model, tokenizer, task, examples: list[dict]) -> float:
    """Accuracy of ``model`` on ``examples`` of ``task`` (the task's checker; greedy decoding)."""
    if settings.chat:
        return evaluate_chat(model, tokenizer, task, examples, settings.max_new_tokens)
    return evaluate(model, tokenizer, examples)


def _row_key(settings: ZooSettings, kind: str, data: str) -> dict[str, Any]:
    """What a finished row depends on: a resumed build reuses a row only when all of it matches."""
    if kind == "base":  # the base model's accuracy: no training settings
        return {"base": settings.base, "seed": settings.seed, "n_eval": settings.n_eval, "data": data}
    kind_config, lr = KIND_SETTINGS.get(kind, ({"rank": PEFT_RANK, "alpha": PEFT_ALPHA}, PEFT_LR))
    return {"base": settings.base, "seed": settings.seed, "rank": settings.rank, "steps": settings.steps,
            "batch_size": settings.batch_size, "n_train": settings.n_train, "n_eval": settings.n_eval,
            "kind_config": kind_config, "lr": _lr(settings, kind, lr), "data": data}


def _data_digest(*splits: list[dict]) -> str:
    """sha256 of the task's examples: a change of task text invalidates its rows."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]


def _lr(settings: ZooSettings, kind: str, lr: float) -> float:
    return lr * REAL_LR_SCALE.get("lora" if kind == "peft-lora" else kind, 1.0) if settings.chat else lr


def _finished(settings: ZooSettings, suite: str, kind: str, task: str, data: str) -> ZooEntry | None:
    row = settings.out / "entries" / suite / kind / f"{task}.json"
    try:
        record = json.loads(row.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != _row_key(settings, kind, data):
        return None
    return ZooEntry(**record["entry"])


def _save_row(settings: ZooSettings, entry: ZooEntry, data: str) -> None:
    row = settings.out / "entries" / entry.suite / entry.kind / f"{entry.task}.json"
    record = {"key": _row_key(settings, entry.kind, data), "entry": asdict(entry)}
    write_atomic(row, (json.dumps(record, indent=1) + "\n").encode())


def _build_task(settings: ZooSettings, suite: str, task, model, tokenizer, basis: Basis, registry,
                progress: bool) -> list[ZooEntry]:
    data_dir = settings.out / "data" / suite
    train = _split(settings, task, "train", settings.n_train)
    validation = _split(settings, task, "validation", settings.n_eval)
    test = _split(settings, task, "test", settings.n_eval)
    for split, examples in (("train", train), ("validation", validation), ("test", test)):
        write_jsonl(data_dir / f"{task.name}.{split}.jsonl", examples)
    data = _data_digest(train, test)
    base_accuracy: float | None = None
    entries = []
    for kind in settings.kinds:
        path = settings.out / "adapters" / suite / kind / f"{task.name}.safetensors"
        done = _finished(settings, suite, kind, task.name, data)
        if done is not None and path.is_file():
            _register(registry, path, registry_name(task.name, kind), suite, task.name, kind, done.accuracy)
            entries.append(done)
            continue
        if not settings.train_missing:
            continue
        if base_accuracy is None:
            base_accuracy = _base_accuracy(settings, suite, task, model, tokenizer, test, data)
        kind_config, lr = KIND_SETTINGS[kind]
        cfg = TrainConfig(kind=kind, kind_config=dict(kind_config, seed=settings.seed), steps=settings.steps,
                          lr=_lr(settings, kind, lr), batch_size=settings.batch_size, seed=settings.seed,
                          device="cpu")
        start = time.perf_counter()
        adapter, stats = train_adapter(model, tokenizer, basis, train, cfg, progress=progress, verify_basis=False)
        seconds = time.perf_counter() - start
        adapter.meta["train"]["stats"].pop("seconds", None)  # timings in the report, not the file
        adapter.meta.update(suite=suite, task=task.name, base=settings.base)
        attach(model, adapter, basis)
        try:
            accuracy = score(settings, model, tokenizer, task, test)
        finally:
            detach(model)
        adapter.meta["metrics"] = {"test_accuracy" if settings.chat else "test_exact_match": accuracy}
        save_adapter(adapter, path)
        name = registry_name(task.name, kind)
        _register(registry, path, name, suite, task.name, kind, accuracy)
        entry = ZooEntry(suite, task.name, kind, name, accuracy, base_accuracy, adapter.num_params(),
                         len(adapter_to_bytes(adapter)), round(seconds, 2), round(stats.final_loss, 4))
        _save_row(settings, entry, data)
        entries.append(entry)
    if settings.peft_lora:
        done = _finished(settings, suite, "peft-lora", task.name, data)
        if done is None and not settings.train_missing:
            return entries
        if done is None:
            if base_accuracy is None:
                base_accuracy = _base_accuracy(settings, suite, task, model, tokenizer, test, data)
            done = _build_peft(settings, suite, task, model, tokenizer, train, test, base_accuracy)
            _save_row(settings, done, data)
        entries.append(done)
    return entries


def _base_accuracy(settings: ZooSettings, suite: str, task, model, tokenizer, test, data: str) -> float:
    """The base model's accuracy on ``test``, cached beside the rows (a real-base evaluation takes a while)."""
    done = _finished(settings, suite, "base", task.name, data)
    if done is not None:
        return done.accuracy
    accuracy = score(settings, model, tokenizer, task, test)
    _save_row(settings, ZooEntry(suite, task.name, "base", "base", accuracy, accuracy, 0, 0, 0.0, 0.0), data)
    return accuracy


def register_once(registry, path: Path, name: str, **fields) -> None:
    """``registry.add(path, name, **fields)`` unless ``name``'s latest version already has these bytes (a rerun)."""
    from adapters_zoo.registry.store import sha256_file

    try:
        current = registry.get(name)
    except AdapterNotFound:
        current = None
    if current is not None and current.sha256 == sha256_file(path)[0]:
        return
    registry.add(path, name, **fields)


def _register(registry, path: Path, name: str, suite: str, task: str, kind: str, accuracy: float) -> None:
    register_once(registry, path, name, tags=("zoo", suite, task, kind), metrics={"test_exact_match": accuracy},
                  description=f"{kind} adapter for the {suite} task {task}")


def _build_peft(settings: ZooSettings, suite: str, task, model, tokenizer, train, test, base_accuracy) -> ZooEntry:
    out_dir = settings.out / "peft" / suite / task.name
    start = time.perf_counter()
    peft_model, final_loss, params = _peft_train(model, tokenizer, train, settings.steps, settings.batch_size,
                                                 settings.seed, _lr(settings, "peft-lora", PEFT_LR))
    seconds = time.perf_counter() - start
    try:
        accuracy = score(settings, peft_model, tokenizer, task, test)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        peft_model.save_pretrained(out_dir, safe_serialization=True)
        canonicalize_file(out_dir / "adapter_model.safetensors")
    finally:
        peft_model.unload()  # the base modules back, weights untouched
    size = (out_dir / "adapter_model.safetensors").stat().st_size
    return ZooEntry(suite, task.name, "peft-lora", str(out_dir.relative_to(settings.out)), accuracy, base_accuracy,
                    params, size, round(seconds, 2), round(final_loss, 4))


def _report(settings: ZooSettings, basis: Basis, entries: list[ZooEntry], seconds: float) -> dict[str, Any]:
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
    return {
        "settings": cfg,
        "base_fingerprint": basis.fingerprint,
        "basis_k": basis.rank,
        "kind_settings": {k: {"config": c, "lr": _lr(settings, k, lr)} for k, (c, lr) in KIND_SETTINGS.items()},
        "peft": {"rank": PEFT_RANK, "alpha": PEFT_ALPHA, "lr": PEFT_LR},
        "torch": torch.__version__,
        "threads": settings.threads,
        "seconds": round(seconds, 1),
        "entries": [asdict(e) for e in entries],
    }


def report_markdown(report: dict[str, Any]) -> str:
    entries = report["entries"]
    kinds = list(dict.fromkeys(e["kind"] for e in entries))
    s = report["settings"]
    lines = [
        "# Zoo report",
        "",
        f"Base `{s.get('base', CHAR_BASE)}`, fingerprint `{report['base_fingerprint']}`, "
        f"basis k = {report['basis_k']}, "
        f"{s['steps']} steps per adapter (batch {s['batch_size']}, {s['n_train']} train examples), "
        f"seed {s['seed']}, quick = {s['quick']}, torch {report['torch']}, {report['threads']} CPU threads, "
        f"built in {report['seconds']} s.",
        "",
        "Accuracy on each task's test split (greedy decoding; "
        + ("the task's checker: exact match, or equal JSON" if s.get("base", CHAR_BASE) != CHAR_BASE
           else "exact match") + ").",
        "",
    ]
    for suite in dict.fromkeys(e["suite"] for e in entries):
        rows = [e for e in entries if e["suite"] == suite]
        tasks = list(dict.fromkeys(e["task"] for e in rows))
        lines += [f"## Suite `{suite}`", "", "| task | base | " + " | ".join(kinds) + " |",
                  "|---|---|" + "---|" * len(kinds)]
        for task in tasks:
            by_kind = {e["kind"]: e for e in rows if e["task"] == task}
            base = next(iter(by_kind.values()))["base_accuracy"]
            cells = [f"{by_kind[k]['accuracy']:.2f}" if k in by_kind else "–" for k in kinds]
            lines.append(f"| {task} | {base:.2f} | " + " | ".join(cells) + " |")
        means = []
        for k in kinds:
            accs = [e["accuracy"] for e in rows if e["kind"] == k]
            means.append(f"{sum(accs) / len(accs):.2f}" if accs else "–")
        base_mean = sum(e["base_accuracy"] for e in rows if e["kind"] == rows[0]["kind"]) / len(tasks)
        lines += [f"| **mean** | {base_mean:.2f} | " + " | ".join(means) + " |", ""]
        weak = [e for e in rows if e["accuracy"] < 0.5]
        if weak:
            lines.append("Adapters below 50% exact match: "
                         + ", ".join(f"{e['task']}/{e['kind']} ({e['accuracy']:.2f})" for e in weak) + ".")
            lines.append("")
    lines += ["## Size and cost per adapter (mean over tasks)", "",
              "| kind | trainable params | bytes on disk | training seconds |", "|---|---|---|---|"]
    for k in kinds:
        rows = [e for e in entries if e["kind"] == k]
        lines.append(f"| {k} | {rows[0]['params']:,} | {sum(e['bytes'] for e in rows) // len(rows):,} | "
                     f"{sum(e['seconds'] for e in rows) / len(rows):.1f} |")
    lines.append("")
    return "\n".join(lines)


def default_zoo_dir() -> Path:
    import os

    home = os.environ.get("SPECFUSE_HOME")
    return (Path(home) if home else Path.home() / ".specfuse") / "zoo"
