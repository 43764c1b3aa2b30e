"""Where the adapters being fused come from: the zoo's, and fusion-ready ones trained here.

    zoo = open_zoo(DIR)                             base model, basis, report, data splits (char or chat)
    plain = zoo_source(zoo, suite, "scale")         the zoo's adapters of one kind (plain training)
    peft = peft_source(zoo, suite)                  the zoo's real PEFT LoRA directories
    ready = trained_source(zoo, suite, VARIANTS["additive@slice+kl"], model, tokenizer, cache)

A *source* is one adapter per task of a suite, all trained the same way. Fusion-ready
variants separate what fusion can do from what training for fusion adds:

- ``+kl`` (``--preserve``): the task loss plus KL(base ‖ adapted) on prompts the adapter
  must leave alone: the other tasks of the suite and the base's own pretraining prompts.
- ``@slice`` (``--slice``): task i trains only basis directions [w·i, w·i + w), w = k / tasks,
  so the adapters of a suite occupy disjoint directions (Spectral Adapter's route to fusion).

A variant is named ``KIND[@slice][+kl[WEIGHT]]`` (:func:`variant`): ``scale@slice``,
``rotation@slice+kl``, ``scale+kl0.1`` (KL weight 0.1; ``+kl`` alone weighs it 1).

A zoo on the real base (``zoo.chat``: its settings name a fetched base, not ``char``) has
the chat suites of :mod:`adapters_zoo.tasks.chat`; its base model is the fetched directory.
There the preserve set is the other tasks of the suite (their training conversations) and,
for the base's own behaviour, conversations of the other chat suites' tasks.

They train with the zoo's steps, batch size, data and per-kind learning rate, and are
cached on disk (a file is reused when its recorded settings match).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_zoo.basis import Basis, load_basis
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.format import Adapter, adapter_to_bytes, load_adapter, save_adapter
from adapters_zoo.tasks import Task, make_split, pretraining_tasks, read_jsonl, suite_tasks
from adapters_zoo.tasks.chat import ChatTask, chat_suite_tasks
from adapters_zoo.zoo import CHAR_BASE

Example = dict[str, str]
PEFT = "peft-lora"
PRESERVE_PER_TASK = 64  # other-task examples per task in a preserve set
PRESERVE_PRETRAIN = 128  # pretraining examples (the base's own skills) in a preserve set
KL_WEIGHT = 1.0
UNION = "+"  # "records+skills": the tasks of both suites as one, all fused at once
VARIANT_FORMAT = 1  # bump when the fusion-ready training changes: invalidates cached adapters


@dataclass
class Zoo:
    root: Path
    report: dict[str, Any]
    basis: Basis

    @property
    def settings(self) -> dict[str, Any]:
        return self.report["settings"]

    @property
    def chat(self) -> bool:
        """A zoo on a real instruct base: chat suites, chat-template prompts, the tasks' checkers."""
        return self.settings.get("base", CHAR_BASE) != CHAR_BASE

    @property
    def base_name(self) -> str:
        return self.settings.get("base", CHAR_BASE)

    @property
    def base_dir(self) -> Path:
        if not self.chat:
            return self.root / "base"
        from adapters_zoo.bases import fetch_base

        return fetch_base(self.base_name, self.settings.get("bases_home"), progress=False).path

    @property
    def suites(self) -> list[str]:
        """The suites built; ``a+b`` (:meth:`has_suite`) also names the union of built suites."""
        return list(dict.fromkeys(e["suite"] for e in self.report["entries"]))

    def has_suite(self, suite: str) -> bool:
        return all(part in self.suites for part in suite.split(UNION))

    def kinds(self, suite: str) -> list[str]:
        """Kinds built for every part of ``suite``."""
        parts = suite.split(UNION)
        first = [e["kind"] for e in self.report["entries"] if e["suite"] == parts[0]]
        return [k for k in dict.fromkeys(first)
                if all(any((e["suite"], e["kind"]) == (p, k) for e in self.report["entries"]) for p in parts)]

    def suite_task_names(self, suite: str) -> list[str]:
        """Every task of ``suite`` in suite order (built or not): what a task's slice index counts."""
        return [t.name for part in suite.split(UNION)
                for t in (chat_suite_tasks(part) if self.chat else suite_tasks(part))]

    def tasks(self, suite: str) -> list[Task | ChatTask]:
        """The suite's tasks the zoo built adapters for, in suite order (part by part for a union)."""
        out = []
        for part in suite.split(UNION):
            built = {e["task"] for e in self.report["entries"] if e["suite"] == part}
            out += [t for t in (chat_suite_tasks(part) if self.chat else suite_tasks(part)) if t.name in built]
        return out

    def home(self, suite: str, task: str) -> str:
        """The built suite holding ``task`` (``suite`` itself unless it is a union)."""
        for part in suite.split(UNION):
            if any((e["suite"], e["task"]) == (part, task) for e in self.report["entries"]):
                return part
        raise InvalidConfig(f"the zoo has no task {task!r} in {suite}")

    def split(self, suite: str, task: str, split: str) -> list[Example]:
        path = self.root / "data" / self.home(suite, task) / f"{task}.{split}.jsonl"
        if not path.is_file():
            raise InvalidConfig(f"{path}: missing from the zoo (rebuild it with specfuse zoo build)")
        return read_jsonl(path)

    def entry(self, suite: str, task: str, kind: str) -> dict[str, Any]:
        home = self.home(suite, task)
        for e in self.report["entries"]:
            if (e["suite"], e["task"], e["kind"]) == (home, task, kind):
                return e
        raise InvalidConfig(f"the zoo has no {kind} adapter for {suite}/{task}")


def open_zoo(root: str | Path) -> Zoo:
    """A built zoo (``specfuse zoo build``): its report, basis and base model directory."""
    root = Path(root)
    missing = [name for name in ("report.json", "basis.safetensors") if not (root / name).is_file()]
    if not missing and json.loads((root / "report.json").read_text())["settings"].get("base", CHAR_BASE) == CHAR_BASE:
        missing = [name for name in ("base/config.json",) if not (root / name).is_file()]
    if missing:
        raise InvalidConfig(f"{root}: not a finished zoo (no {missing[0]}); build one with "
                            f"`specfuse zoo build --out {root}` (add --quick for a small one)")
    report = json.loads((root / "report.json").read_text())
    basis = load_basis(root / "basis.safetensors")
    if basis.fingerprint != report.get("base_fingerprint"):
        raise InvalidConfig(f"{root}: basis.safetensors is not the basis of the zoo's base (report.json disagrees)")
    return Zoo(root, report, basis)


@dataclass
class Source:
    """One adapter per task, trained one way: what a fusion method combines."""

    name: str  # "scale", "additive@slice+kl", "peft-lora", ...
    suite: str
    family: str  # "spectral" (fused by fusion.fuse) | "peft" (merged by PEFT's add_weighted_adapter)
    training: str  # "plain" | "preserve" | "slices" | "slices+preserve"
    kind: str
    adapters: dict[str, Adapter]  # task -> adapter (PEFT sources: imported as kind lora, exact)
    peft_dirs: dict[str, Path] = field(default_factory=dict)  # task -> PEFT LoRA directory
    params: int = 0  # trainable parameters of one adapter
    bytes: int = 0  # bytes on disk of one adapter (mean over tasks)
    digest: str = ""  # hash of every adapter file: results cached under it

    @property
    def tasks(self) -> list[str]:
        return list(self.adapters)


def _digest(chunks: list[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(hashlib.sha256(chunk).digest())
    return h.hexdigest()[:16]


def _spectral(name: str, suite: str, training: str, adapters: dict[str, Adapter]) -> Source:
    blobs = [adapter_to_bytes(a) for a in adapters.values()]
    first = next(iter(adapters.values()))
    for task, adapter in adapters.items():
        adapter.meta.setdefault("name", f"{task}-{name}")  # fusion notes name the sources
    return Source(name, suite, "spectral", training, first.kind, adapters, params=first.num_params(),
                  bytes=sum(map(len, blobs)) // len(blobs), digest=_digest(blobs))


def zoo_source(zoo: Zoo, suite: str, kind: str) -> Source:
    """The zoo's ``kind`` adapters of ``suite`` (trained plainly, one task at a time)."""
    adapters = {}
    for task in zoo.tasks(suite):
        path = zoo.root / "adapters" / zoo.home(suite, task.name) / kind / f"{task.name}.safetensors"
        if not path.is_file():
            raise InvalidConfig(f"{path}: the zoo has no {kind} adapter for {suite}/{task.name}")
        adapters[task.name] = load_adapter(path, zoo.basis)
    return _spectral(kind, suite, "plain", adapters)


def peft_source(zoo: Zoo, suite: str) -> Source:
    """The zoo's PEFT LoRA baselines: directories for PEFT, and the same LoRAs imported exactly."""
    from fusion.lora_io import import_peft_lora

    dirs, adapters, chunks = {}, {}, []
    for task in zoo.tasks(suite):
        path = zoo.root / "peft" / zoo.home(suite, task.name) / task.name
        if not (path / "adapter_model.safetensors").is_file():
            raise InvalidConfig(f"{path}: the zoo has no PEFT LoRA for {suite}/{task.name} (built with --no-peft?)")
        dirs[task.name] = path
        adapters[task.name] = import_peft_lora(path, zoo.basis)  # kind lora: ΔW = (α/r) B A exactly
        chunks.append((path / "adapter_model.safetensors").read_bytes())
    sizes = [len(c) for c in chunks]
    params = zoo.entry(suite, next(iter(dirs)), PEFT)["params"]
    return Source(PEFT, suite, "peft", "plain", "lora", adapters, dirs, params, sum(sizes) // len(sizes),
                  _digest(chunks))


# --------------------------------------------------------------------------- fusion-ready training


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    slices: bool  # disjoint direction slices per task
    preserve: bool  # KL to the base on other tasks' and pretraining prompts
    kl_weight: float = KL_WEIGHT

    @property
    def training(self) -> str:
        return "+".join(p for p, on in (("slices", self.slices), ("preserve", self.preserve)) if on) or "plain"


VARIANT_KINDS = ("scale", "svft", "rotation", "additive")
VARIANTS = {v.name: v for v in (  # the char run's default set
    Variant("scale+kl", "scale", slices=False, preserve=True),
    Variant("additive@slice", "additive", slices=True, preserve=False),
    Variant("additive@slice+kl", "additive", slices=True, preserve=True),
)}


def variant(name: str) -> Variant:
    """The variant named ``KIND[@slice][+kl[WEIGHT]]`` (``scale@slice``, ``rotation@slice+kl0.1``)."""
    rest, plus, kl = name.partition("+")
    kind, at, where = rest.partition("@")
    weight = KL_WEIGHT
    problem = None
    if kind not in VARIANT_KINDS:
        problem = f"its kind {kind!r} is not one of {', '.join(VARIANT_KINDS)}"
    elif at and where != "slice":
        problem = f"'@{where}' is not '@slice'"
    elif plus and not kl.startswith("kl"):
        problem = f"'+{kl}' is not '+kl' or '+klWEIGHT'"
    elif plus and kl != "kl":
        try:
            weight = float(kl[2:])
        except ValueError:
            problem = f"the KL weight {kl[2:]!r} is not a number"
        else:
            if not weight > 0:
                problem = f"the KL weight must be > 0, got {kl[2:]}"
    if not (at or plus) and problem is None:
        problem = "it names neither @slice nor +kl (plain adapters come from the zoo: --kinds)"
    if problem is not None:
        raise InvalidConfig(f"variant {name!r}: {problem} (form KIND[@slice][+kl[WEIGHT]], e.g. scale@slice+kl0.1)")
    return Variant(name, kind, slices=bool(at), preserve=bool(plus), kl_weight=weight)


def slice_of(index: int, n_tasks: int, k: int) -> tuple[int, int]:
    """Directions [w·i, w·i + w) of task i out of n, w = k // n (k=32, 8 tasks: [4i, 4i+4))."""
    width = k // n_tasks
    if width < 1:
        raise InvalidConfig(f"a basis of k={k} cannot give {n_tasks} tasks a direction each")
    return width * index, width * (index + 1)


def chat_preserve_examples(zoo: Zoo, suite: str, task: str) -> list[Example]:
    """On a chat zoo: the other tasks' training conversations, and some of the other suites' tasks'."""
    from adapters_zoo.tasks.chat import CHAT_SUITES, make_chat_split

    examples = [ex for other in zoo.tasks(suite) if other.name != task
                for ex in zoo.split(suite, other.name, "train")[:PRESERVE_PER_TASK]]
    general = [t for s in CHAT_SUITES if s not in suite.split(UNION) for t in chat_suite_tasks(s)]
    per_task = max(1, PRESERVE_PRETRAIN // max(len(general), 1))
    examples += [ex for t in general for ex in make_chat_split(t, "train", per_task, zoo.settings["seed"])]
    return examples


def preserve_examples(suite: str, task: str, seed: int) -> list[Example]:
    """What adapter ``task`` must leave alone: every other task of the suite and the base's pretraining."""
    examples = [ex for part in suite.split(UNION) for other in suite_tasks(part) if other.name != task
                for ex in make_split(other, "train", PRESERVE_PER_TASK, seed)]
    pretrain = pretraining_tasks()
    per_task = max(1, PRESERVE_PRETRAIN // len(pretrain))
    examples += [ex for t in pretrain for ex in make_split(t, "train", per_task, seed)]
    return examples


def variant_settings(zoo: Zoo, suite: str, variant: Variant, index: int) -> dict[str, Any]:
    """Everything that determines a fusion-ready adapter (its cache key)."""
    kind_settings = zoo.report["kind_settings"][variant.kind]
    config = dict(kind_settings["config"], seed=zoo.settings["seed"])
    if variant.slices:
        n_tasks = len(zoo.suite_task_names(suite))
        config = {"slice": list(slice_of(index, n_tasks, int(zoo.basis.rank))), "seed": zoo.settings["seed"]}
    return {
        "format": VARIANT_FORMAT, "variant": variant.name, "kind": variant.kind, "kind_config": config,
        "lr": kind_settings["lr"], "steps": zoo.settings["steps"], "batch_size": zoo.settings["batch_size"],
        "seed": zoo.settings["seed"], "preserve": variant.preserve, "kl_weight": variant.kl_weight,
        "base_fingerprint": zoo.basis.fingerprint,
    }


def trained_source(zoo: Zoo, suite: str, variant: Variant, model, tokenizer, cache_dir: Path,
                   log=None, train: bool = True) -> tuple[Source | None, int]:
    """The variant's adapter for every zoo task of ``suite``, trained here or read from ``cache_dir``.

    Returns the source and how many adapters had to be trained now; ``log(message)`` hears of each.
    With ``train=False`` an adapter missing from the cache gives ``(None, 0)``.
    """
    from adapters_zoo.train import train_adapter
    from adapters_zoo.train_config import TrainConfig

    adapters = {}
    trained = 0
    suite_names = zoo.suite_task_names(suite)
    for task in zoo.tasks(suite):
        settings = variant_settings(zoo, suite, variant, suite_names.index(task.name))
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        path = cache_dir / suite / variant.name / f"{task.name}.{key}.safetensors"  # one file per setting
        if path.is_file():
            cached = load_adapter(path, zoo.basis)
            if cached.meta.get("bench_settings") == settings:
                adapters[task.name] = cached
                continue
        if not train:
            return None, 0
        cfg = TrainConfig(kind=variant.kind, kind_config=settings["kind_config"], steps=settings["steps"],
                          lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"],
                          kl_weight=variant.kl_weight, device="cpu")
        preserve = None
        if variant.preserve:
            preserve = (chat_preserve_examples(zoo, suite, task.name) if zoo.chat
                        else preserve_examples(suite, task.name, settings["seed"]))
        adapter, stats = train_adapter(model, tokenizer, zoo.basis, zoo.split(suite, task.name, "train"), cfg,
                                       preserve_examples=preserve, progress=False, verify_basis=False)
        adapter.meta["train"]["stats"].pop("seconds", None)
        adapter.meta.update(suite=suite, task=task.name, bench_settings=settings)
        save_adapter(adapter, path)
        adapters[task.name] = adapter
        trained += 1
        if log is not None:
            kl = f", KL {stats.final_kl:.4f}" if stats.final_kl is not None else ""
            log(f"{suite}: trained {variant.name} for {task.name} in {stats.seconds:.0f} s "
                f"(loss {stats.final_loss:.4f}{kl})")
    return _spectral(variant.name, suite, variant.training, adapters), trained
