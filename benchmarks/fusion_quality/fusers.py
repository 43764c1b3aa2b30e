"""The two ways a set of task adapters becomes one model, behind one interface.

    fuser.individual(source, task)                       -> context: the model with that task's adapter
    fuser.fused(source, tasks, method, weight, params)   -> context: (model, FusedInfo) with the merge applied

- :class:`SpectralFuser`: ``fusion.fuse`` on k×k cores (every registered method), the
  fused adapter's dense ΔW added into the base weights for the block (exact, and as fast
  to run as the base). Also runs exact task arithmetic on the PEFT LoRAs (imported as
  kind ``lora``: Σ λ·(α/r)·B A on dense ΔW), the reference every LoRA merge approximates.
- :class:`PeftFuser`: real PEFT, ``PeftModel.load_adapter`` for every task directory and
  ``add_weighted_adapter`` for each merge; the merged adapter is applied with PEFT's own
  ``merge_adapter`` (W + s·B A, what ``merge_and_unload`` ships), evaluated, unmerged (the
  base weights restored bit for bit) and deleted.

Methods are named as in the results: spectral methods by their registry name (``+proj``:
with the residual outside the basis projected into it, so the fused adapter is k×k cores
only), PEFT's combinations as ``peft:{combination_type}``, dense task arithmetic as ``dense_ta``.
Every method gets the same uniform weight λ per adapter; density (and a seed for the
random ones) where the method has them.

``distill`` (``fusion.distill``) is the one method that looks at data: one dense k×k core
per layer trained so that, on each task's training *prompts* (no answers: every source
completes its own prompts), the fused model's next-token distributions match that task's
adapter. ``distill:lora`` runs the same distillation, same prompts, steps and seed, into
a LoRA of the PEFT baselines' rank from the PEFT LoRAs as teachers: the like-for-like
control of what distillation gives LoRA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.format import adapter_to_bytes, new_adapter
from adapters_zoo.tasks.chat import prompt_messages, reference_answer, render_prompt
from fusion.distill_config import DistillConfig
from fusion_quality.scoring import merged_weights
from fusion_quality.sources import Source

SPECTRAL_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "iso_c", "tsv", "geodesic",
                    "slices", "linear+proj", "ties+proj", "distill")
PROJECT = "+proj"  # residuals outside the basis projected into it (fuse(project=True)): k×k cores only
PEFT_COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "ties_svd", "magnitude_prune")
DISTILL_LORA = "distill:lora"
PEFT_METHODS = tuple(f"peft:{c}" for c in PEFT_COMBINATIONS) + ("dense_ta", DISTILL_LORA)
ON_SPECTRAL_FUSER = ("dense_ta", DISTILL_LORA)  # PEFT sources' methods run on their exact imports, not by PEFT
WITH_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd"}  # the name after "peft:"
RANDOM = {"dare_linear", "dare_ties", "distill"}
DISTILL_PROMPTS = 128  # training prompts per task the distillation sees
TINY_MODEL = 20_000_000  # parameters below which distillation runs on one thread


def base_name(method: str) -> str:
    """``peft:ties`` -> ``ties``; ``ties+proj`` -> ``ties``; ``distill:lora`` -> ``distill``."""
    if method == DISTILL_LORA:
        return "distill"
    return method.split(":", 1)[-1].removesuffix(PROJECT)


def is_distill(method: str) -> bool:
    return base_name(method) == "distill"


def uses_density(method: str) -> bool:
    return base_name(method) in WITH_DENSITY


def is_random(method: str) -> bool:
    return base_name(method) in RANDOM


def methods_for(source: Source, wanted: tuple[str, ...]) -> list[str]:
    """The methods of ``wanted`` that apply to ``source`` (geodesic: rotation kinds; slices: sliced sources)."""
    if source.family == "peft":
        return [m for m in wanted if m in PEFT_METHODS]
    out = []
    for m in wanted:
        if m not in SPECTRAL_METHODS:
            continue
        if is_distill(m) and source.training != "plain":
            continue  # distillation needs no fusion-ready training: run on the plain adapters only
        if m == "geodesic" and source.kind != "rotation":
            continue
        if m == "slices" and "slices" not in source.training:
            continue
        if m.endswith(PROJECT) and source.kind not in ("additive", "lora"):
            continue  # nothing outside the basis to project
        out.append(m)
    return out


@dataclass
class FusedInfo:
    params: int  # parameters of the fused artifact (core entries + residual factors, or LoRA factors)
    bytes: int  # its size as a file (safetensors)
    seconds: float  # time to fuse (cores or factors already in memory)
    rank: int | None = None  # LoRA rank of a PEFT merge


class SpectralFuser:
    """``fusion.fuse`` (and ``fusion.distill``) on the sources' adapters, the result merged into ``model``.

    ``prompts(suite, task)`` gives the training prompts a distillation sees (answers dropped).
    """

    family = "spectral"

    def __init__(self, model: torch.nn.Module, tokenizer, basis: Basis,
                 prompts: Callable[[str, str], list[dict[str, str]]] | None = None,
                 distill: DistillConfig | None = None):
        self.model, self.tokenizer, self.basis = model, tokenizer, basis
        self.prompts = prompts
        self.distill_cfg = distill or DistillConfig()

    def settings(self, method: str) -> dict:
        """What a method's scores depend on beyond source, tasks, weight, density and seed (for the cache)."""
        if not is_distill(method):
            return {}
        cfg = {k: v for k, v in dataclasses.asdict(self.distill_cfg).items() if k not in ("seed", "device")}
        return {"distill": cfg | {"prompts": DISTILL_PROMPTS}}

    def distill(self, source: Source, tasks: list[str], method: str, seed: int):
        from fusion.distill import distill_fuse

        if self.prompts is None:
            raise InvalidConfig("distill needs the tasks' prompts: SpectralFuser(prompts=...)")
        adapters = [source.adapters[t] for t in tasks]
        data = [[self._distill_example(ex) for ex in self.prompts(source.suite, t)[:DISTILL_PROMPTS]] for t in tasks]
        student = None
        if method == DISTILL_LORA:  # a fresh LoRA of the sources' rank on the layers they touch
            first = adapters[0]
            layers = [n for n in self.basis.layer_names() if any(n in a.params for a in adapters)]
            student = new_adapter("lora", {"rank": first.cfg.rank, "alpha": first.cfg.alpha}, self.basis, layers)
        cfg = dataclasses.replace(self.distill_cfg, seed=seed)
        threads = torch.get_num_threads()
        if sum(p.numel() for p in self.model.parameters()) < TINY_MODEL:
            torch.set_num_threads(1)  # small batches on a tiny model: dispatch-bound, one thread is ~2x faster
        try:
            fused, stats = distill_fuse(self.model, self.tokenizer, self.basis, adapters, [1.0] * len(adapters), data,
                                        cfg, student=student, verify_basis=False)
        finally:
            torch.set_num_threads(threads)
        return fused, FusedInfo(fused.num_params(), len(adapter_to_bytes(fused)), stats.seconds)

    def _distill_example(self, ex: dict) -> dict[str, str]:
        """A char example's prompt alone (each teacher completes it); a chat example's prompt under the chat
        template with its reference answer as the completion (no teacher decoding: the KL is still to each
        teacher's distributions, on the positions of that answer)."""
        if "messages" not in ex:
            return {"prompt": ex["prompt"]}
        return {"prompt": render_prompt(self.tokenizer, prompt_messages(ex)), "completion": reference_answer(ex)}

    @contextlib.contextmanager
    def individual(self, source: Source, task: str) -> Iterator[torch.nn.Module]:
        with merged_weights(self.model, source.adapters[task], self.basis) as model:
            yield model

    def fuse(self, source: Source, tasks: list[str], method: str, weight: float, density: float | None = None,
             seed: int = 0):
        from fusion.cores import clear_cache
        from fusion.fuse import fuse

        if is_distill(method):
            return self.distill(source, tasks, method, seed)
        adapters = [source.adapters[t] for t in tasks]
        params = {}
        project = method.endswith(PROJECT)
        method = "linear" if method == "dense_ta" else base_name(method)
        if uses_density(method):
            params["density"] = density
        if is_random(method):
            params["seed"] = seed
        clear_cache()  # timed from the adapters' own parameters, as a server meeting them the first time
        start = time.perf_counter()
        fused = fuse(adapters, [weight] * len(adapters), self.basis, method, project=project, **params)
        seconds = time.perf_counter() - start
        return fused, FusedInfo(fused.num_params(), len(adapter_to_bytes(fused)), seconds)

    @contextlib.contextmanager
    def fused(self, source: Source, tasks: list[str], method: str, weight: float, density: float | None = None,
              seed: int = 0) -> Iterator[tuple[torch.nn.Module, FusedInfo]]:
        adapter, info = self.fuse(source, tasks, method, weight, density, seed)
        with merged_weights(self.model, adapter, self.basis) as model:
            yield model, info


class PeftFuser:
    """A PeftModel on its own copy of the base holding every task's LoRA of every PEFT source loaded."""

    family = "peft"

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.base, self.tokenizer = model, tokenizer
        self.peft = None
        self.names: dict[tuple[str, str], str] = {}  # (suite, task) -> adapter name in the PeftModel
        self._merges = 0

    def settings(self, method: str) -> dict:
        return {}

    def load(self, source: Source) -> None:
        from peft import PeftModel

        new = [(task, path) for task, path in source.peft_dirs.items() if (source.suite, task) not in self.names]
        for task, path in new:
            name = f"{source.suite}__{task}"
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self.names[(source.suite, task)] = name
        if new:
            self.peft.eval()
            self._snapshot = [(p, p.detach().clone()) for p in self._base_weights()]  # nothing merged now

    def _base_weights(self) -> list[torch.nn.Parameter]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m.get_base_layer().weight for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def _merged(self, name: str) -> Iterator[torch.nn.Module]:
        """The PeftModel with adapter ``name`` merged into the base weights by PEFT (W + s·B A): base speed.

        Unmerging subtracts the same ΔW in floating point, which drifts W by rounding over hundreds of
        merges; the snapshot taken at load restores W bit for bit.
        """
        self.peft.set_adapter(name)
        self.peft.merge_adapter()
        try:
            yield self.peft
        finally:
            self.peft.unmerge_adapter()
            with torch.no_grad():
                for param, saved in self._snapshot:
                    param.copy_(saved)

    @contextlib.contextmanager
    def individual(self, source: Source, task: str) -> Iterator[torch.nn.Module]:
        self.load(source)
        with self._merged(self.names[(source.suite, task)]) as model:
            yield model

    @contextlib.contextmanager
    def fused(self, source: Source, tasks: list[str], method: str, weight: float, density: float | None = None,
              seed: int = 0) -> Iterator[tuple[torch.nn.Module, FusedInfo]]:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save

        combination = base_name(method)
        if not method.startswith("peft:") or combination not in PEFT_COMBINATIONS:
            raise InvalidConfig(f"{method!r} is not a PEFT merge (known: {', '.join(PEFT_METHODS)})")
        self.load(source)
        names = [self.names[(source.suite, t)] for t in tasks]
        self._merges += 1
        merged = f"merge{self._merges}"
        kwargs = {"density": density} if uses_density(method) else {}
        torch.manual_seed(seed)  # PEFT's DARE draws its masks from the global generator
        start = time.perf_counter()
        self.peft.add_weighted_adapter(names, [weight] * len(names), merged, combination_type=combination, **kwargs)
        seconds = time.perf_counter() - start
        try:
            state = {k: v.detach().contiguous() for k, v in
                     get_peft_model_state_dict(self.peft, adapter_name=merged).items()}
            info = FusedInfo(sum(t.numel() for t in state.values()), len(save(state)), seconds,
                             self.peft.peft_config[merged].r)
            with self._merged(merged) as model:
                yield model, info
        finally:
            self.peft.set_adapter(names[0])
            self.peft.delete_adapter(merged)
