"""The demo zoo: one pretrained base, its basis, and one adapter per task × kind.

    zoo/
      base/                        the demo base model (transformers layout, char tokenizer)
      basis.safetensors            its top-k basis (also declared in the registry)
      data/{suite}/{task}.{split}.jsonl
      adapters/{suite}/{kind}/{task}.safetensors
      peft/{suite}/{task}/         PEFT LoRA baselines (adapter_config.json + safetensors)
      registry/                    a registry home holding the basis and every adapter
      report.json, report.md       accuracy per task × kind, parameters, bytes, time

Everything is seeded and runs with a fixed thread count and deterministic kernels, so
two builds with the same settings write identical adapter files (timings live only in
the report). Kinds train with the same steps, learning rate schedule and data as the
PEFT LoRA baseline ("a comparable budget"); only their learning rates differ, each
being the rate at which that kind trains well (see ``KIND_SETTINGS``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adapters_zoo.basis import Basis, basis_from_model, save_basis
from adapters_zoo.demo_model import load_base, pretrain_base
from adapters_zoo.errors import AdapterNotFound
from adapters_zoo.format import adapter_to_bytes, save_adapter
from adapters_zoo.inject import attach, detach
from adapters_zoo.signatures import attach_signature, signature_from_prompts
from adapters_zoo.tasks import evaluate, make_split, suite_tasks, write_jsonl
from adapters_zoo.train import (
    Batches,
    TrainConfig,
    completion_logits,
    completion_loss_sum,
    encode_example,
    lr_factor,
    pad_batch,
    pad_id_of,
    train_adapter,
)

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


@dataclass
class ZooSettings:
    out: Path
    seed: int = 0
    quick: bool = False
    suites: tuple[str, ...] = ("conflicting", "compatible")
    kinds: tuple[str, ...] = ("scale", "svft", "rotation", "additive")
    peft_lora: bool = True
    tasks_per_suite: int | None = None  # None: every task of the suite
    rank: int = 32  # basis k
    steps: int | None = None  # per adapter; None: 80 quick, 300 full
    batch_size: int = 32
    n_train: int = 2000
    n_eval: int = 100  # validation and test examples per task
    pretrain_steps: int | None = None  # None: the demo base's quick / full default
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. a tinier base for tests
    threads: int = 2

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.steps is None:
            self.steps = 80 if self.quick else 300
        if self.quick and self.tasks_per_suite is None:
            self.tasks_per_suite = 4


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


def _peft_train(model, tokenizer, examples, steps: int, batch_size: int, seed: int):
    """A real PEFT LoRA (q,k,v,o,gate,up,down) trained with the same loop and budget as ours."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=PEFT_RANK, lora_alpha=PEFT_ALPHA, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=PEFT_LR, weight_decay=0.0)
    rows = [encode_example(tokenizer, ex, 256)[:2] for ex in examples]
    batches = Batches(rows, batch_size, torch.Generator().manual_seed(seed))
    pad_id, losses = pad_id_of(tokenizer), []
    peft_model.eval()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = PEFT_LR * lr_factor(step, steps, 0.06)
        batch = pad_batch(batches.next(), pad_id, "cpu")
        loss_sum, count = completion_loss_sum(completion_logits(peft_model, batch), batch["labels"])
        loss = loss_sum / max(count, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    return peft_model, sum(losses[-10:]) / len(losses[-10:]), sum(p.numel() for p in params)


def _deterministic(threads: int):
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return previous


def build_zoo(settings: ZooSettings, home: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (or complete) the zoo under ``settings.out``; returns the report as a dict.

    ``home``: the registry to register the basis and adapters in (default ``out/registry``).
    Adapter files already present are reused, so an interrupted build resumes.
    """
    from adapters_zoo.registry import Registry

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    previous = _deterministic(settings.threads)
    started = time.perf_counter()
    try:
        base_dir = pretrain_base(out / "base", seed=settings.seed, steps=settings.pretrain_steps,
                                 quick=settings.quick, model_overrides=settings.model_overrides or None,
                                 progress=progress, threads=settings.threads)
        model, tokenizer = load_base(base_dir)
        basis = basis_from_model(model, settings.rank)
        save_basis(basis, out / "basis.safetensors")
        registry = Registry(home if home is not None else out / "registry")
        registry.add_basis(basis)
        entries: list[ZooEntry] = []
        for suite in settings.suites:
            tasks = suite_tasks(suite)[: settings.tasks_per_suite]
            for task in tqdm(tasks, desc=f"zoo {suite}", unit="task", disable=not progress):
                entries += _build_task(settings, suite, task, model, tokenizer, basis, registry, progress)
        registry.close()
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
    report = _report(settings, basis, entries, time.perf_counter() - started)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    return report


def _build_task(settings: ZooSettings, suite: str, task, model, tokenizer, basis: Basis, registry,
                progress: bool) -> list[ZooEntry]:
    data_dir = settings.out / "data" / suite
    train = make_split(task, "train", settings.n_train, settings.seed)
    validation = make_split(task, "validation", settings.n_eval, settings.seed)
    test = make_split(task, "test", settings.n_eval, settings.seed)
    for split, examples in (("train", train), ("validation", validation), ("test", test)):
        write_jsonl(data_dir / f"{task.name}.{split}.jsonl", examples)
    base_accuracy = evaluate(model, tokenizer, test)
    signature = signature_from_prompts(model, tokenizer, [ex["prompt"] for ex in train])
    entries = []
    for kind in settings.kinds:
        path = settings.out / "adapters" / suite / kind / f"{task.name}.safetensors"
        kind_config, lr = KIND_SETTINGS[kind]
        cfg = TrainConfig(kind=kind, kind_config=dict(kind_config, seed=settings.seed), steps=settings.steps,
                          lr=lr, batch_size=settings.batch_size, seed=settings.seed, device="cpu")
        start = time.perf_counter()
        adapter, stats = train_adapter(model, tokenizer, basis, train, cfg, progress=False, verify_basis=False)
        seconds = time.perf_counter() - start
        adapter.meta["train"]["stats"].pop("seconds", None)  # timings in the report, not the file
        adapter.meta.update(suite=suite, task=task.name, prefix=task.prefix)
        adapter.meta = attach_signature(adapter.meta, signature, basis.fingerprint)
        attach(model, adapter, basis)
        try:
            accuracy = evaluate(model, tokenizer, test)
        finally:
            detach(model)
        adapter.meta["metrics"] = {"test_exact_match": accuracy}
        save_adapter(adapter, path)
        name = registry_name(task.name, kind)
        _register(registry, path, name, suite, task.name, kind, accuracy)
        entries.append(ZooEntry(suite, task.name, kind, name, accuracy, base_accuracy, adapter.num_params(),
                                len(adapter_to_bytes(adapter)), round(seconds, 2), round(stats.final_loss, 4)))
    if settings.peft_lora:
        entries.append(_build_peft(settings, suite, task, model, tokenizer, train, test, base_accuracy))
    return entries


def _register(registry, path: Path, name: str, suite: str, task: str, kind: str, accuracy: float) -> None:
    from adapters_zoo.registry.store import sha256_file

    try:
        current = registry.get(name)
    except AdapterNotFound:
        current = None
    if current is not None and current.sha256 == sha256_file(path)[0]:
        return  # a resumed build: already registered
    registry.add(path, name, tags=("zoo", suite, task, kind), metrics={"test_exact_match": accuracy},
                 description=f"{kind} adapter for the {suite} task {task}")


def _build_peft(settings: ZooSettings, suite: str, task, model, tokenizer, train, test, base_accuracy) -> ZooEntry:
    out_dir = settings.out / "peft" / suite / task.name
    start = time.perf_counter()
    peft_model, final_loss, params = _peft_train(model, tokenizer, train, settings.steps, settings.batch_size,
                                                 settings.seed)
    seconds = time.perf_counter() - start
    try:
        accuracy = evaluate(peft_model, tokenizer, test)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        peft_model.save_pretrained(out_dir, safe_serialization=True)
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
        "kind_settings": {k: {"config": c, "lr": lr} for k, (c, lr) in KIND_SETTINGS.items()},
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
        "# Demo zoo report",
        "",
        f"Base fingerprint `{report['base_fingerprint']}`, basis k = {report['basis_k']}, "
        f"{s['steps']} steps per adapter (batch {s['batch_size']}, {s['n_train']} train examples), "
        f"seed {s['seed']}, quick = {s['quick']}, torch {report['torch']}, {report['threads']} CPU threads, "
        f"built in {report['seconds']} s.",
        "",
        "Exact-match accuracy on each task's test split (greedy decoding).",
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


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="build the demo zoo (base model, basis, task adapters)")
    sub = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    sub.required = True
    b = sub.add_parser("build", help="pretrain the demo base (cached), train one adapter per task × kind, report")
    b.add_argument("--out", default=None, help="zoo directory (default: $SPECFUSE_HOME/zoo or ~/.specfuse/zoo)")
    b.add_argument("--home", default=None, help="registry home (default: OUT/registry)")
    b.add_argument("--quick", action="store_true", help="4 tasks per suite, short training: minutes on 2 cores")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 80 quick, 300)")
    b.add_argument("--pretrain-steps", type=int, default=None, help="base pretraining steps (default: the demo's)")
    b.add_argument("--threads", type=int, default=2, help="torch threads (part of what makes builds reproducible)")
    b.add_argument("--kinds", default=None, help="comma-separated kinds (default: scale,svft,rotation,additive)")
    b.add_argument("--suites", default=None, help="comma-separated suites (default: conflicting,compatible)")
    b.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA baselines")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=cmd_zoo_build)


def default_zoo_dir() -> Path:
    import os

    home = os.environ.get("SPECFUSE_HOME")
    return (Path(home) if home else Path.home() / ".specfuse") / "zoo"


def cmd_zoo_build(args) -> int:
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.kinds import TRAINABLE_KINDS

    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else ZooSettings.kinds
    bad = [k for k in kinds if k not in TRAINABLE_KINDS]
    if bad:
        raise InvalidConfig(f"unknown kind {bad[0]!r} (trainable kinds: {', '.join(TRAINABLE_KINDS)})")
    suites = tuple(s.strip() for s in args.suites.split(",")) if args.suites else ZooSettings.suites
    from adapters_zoo.tasks import SUITES

    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise InvalidConfig(f"unknown suite {bad[0]!r} (known: {', '.join(SUITES)})")
    settings = ZooSettings(out=Path(args.out) if args.out else default_zoo_dir(), seed=args.seed, quick=args.quick,
                           steps=args.steps, kinds=kinds, suites=suites, peft_lora=not args.no_peft,
                           pretrain_steps=args.pretrain_steps, threads=args.threads)
    report = build_zoo(settings, home=args.home)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report_markdown(report))
        print(f"zoo written to {settings.out}")
    return 0
