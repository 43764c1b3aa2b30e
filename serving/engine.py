"""The serving engine: one base model on the device, every row of a batch its own mixture.

    Engine(model, tokenizer, basis, EngineConfig())          or  Engine.load(model_dir, basis)
    mixture = engine.prepare(MixtureSpec.of([("math@1", 0.7), ("code@2", 0.3)]), load)
    slot    = engine.slots.acquire(mixture)                   # -1 for the base model
    logits  = engine.forward(input_ids, attention_mask, position_ids, cache, row_slots=[slot, -1, ...])

Every target layer of the basis is wrapped by a :class:`serving.backend.RoutedLinear`
reading the slot tables; ``forward`` sets the step's routing once for all of them. A
mixture is reduced once with the fusion API (any registered method) to k×k cores (+
residuals), cached on the host (:class:`serving.slots.MixtureCache`) and copied into a
device slot on demand (:class:`serving.slots.SlotTable`). Nothing here imports the HTTP
stack: the engine runs where fastapi / pydantic are not installed.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from adapters_zoo import train
from adapters_zoo.basis import Basis, check_basis_matches_model
from adapters_zoo.errors import IncompatibleAdapter, InvalidConfig, InvalidMixture, ModelDirError
from adapters_zoo.format import Adapter, check_delta
from serving.backend import (
    Backend,
    LayerSlots,
    RoutedLinear,
    Routing,
    RoutingContext,
    SlotGroup,
    TorchBackend,
    shared_input_groups,
)
from serving.generation import BatchKV, left_pad, positions_of
from serving.slots import MixtureCache, MixtureCores, SlotTable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUTING_ROWS = 64  # rows the routing buffers hold before they grow (the scheduler's max_batch is 32)


@dataclass(frozen=True)
class MixtureSpec:
    """A mixture as the caches key it: sorted (name@version, weight), method, params (canonical JSON), digests."""

    components: tuple[tuple[str, float], ...] = ()
    method: str = "linear"
    params: str = "{}"
    digests: tuple[str, ...] = ()  # content hashes of the components: a re-added name@version is a new key

    @classmethod
    def of(cls, components: list[tuple[str, float]] | tuple = (), method: str = "linear",
           params: dict[str, Any] | None = None, digests: dict[str, str] | None = None) -> MixtureSpec:
        comps = tuple(sorted((str(ref), float(w)) for ref, w in components))
        if any(not math.isfinite(w) for _, w in comps):
            raise InvalidMixture("mixture weights must be finite numbers")
        try:
            params_json = json.dumps(params or {}, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidMixture(f"fusion params must be plain JSON values ({err})") from err
        return cls(comps, method, params_json, tuple((digests or {}).get(ref, "") for ref, _ in comps))

    @property
    def is_base(self) -> bool:
        return not self.components

    @property
    def fusion_params(self) -> dict[str, Any]:
        return json.loads(self.params)

    @property
    def label(self) -> str:
        if self.is_base:
            return "base"
        text = ",".join(f"{ref}:{w:g}" for ref, w in self.components)
        return text if self.method == "linear" and self.params == "{}" else f"{text} ({self.method})"


AdapterLoader = Callable[[], list[tuple[Adapter, float]]]  # called only when the mixture is not cached


@dataclass
class EngineConfig:
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # None: bfloat16 (float16 without bf16 support) on GPU, float32 on CPU
    slots: int = 32  # mixtures resident on the device at once
    residual_slots: int = 8  # of which this many also hold a residual outside the basis
    max_residual_rank: int = 64  # q of the largest residual a slot holds (concatenated LoRAs grow it)
    mixture_cache: int = 1024  # reduced mixtures kept on the host
    mixture_cache_bytes: int = 256 << 20  # ... and the host memory they may take (cores + residuals)

    def validate(self) -> None:
        if self.slots < 1:
            raise InvalidConfig(f"slots must be ≥ 1, got {self.slots}")
        if not 0 <= self.residual_slots <= self.slots:
            raise InvalidConfig(f"residual_slots must be in [0, slots={self.slots}], got {self.residual_slots}")
        if self.max_residual_rank < 0 or self.mixture_cache < 1 or self.mixture_cache_bytes < 1:
            raise InvalidConfig("max_residual_rank must be ≥ 0, mixture_cache and mixture_cache_bytes ≥ 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidConfig(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise InvalidConfig(f"device must be cpu or cuda, got {self.device!r}")


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = train.resolve_device(config.device)
    if config.dtype is not None:
        return device, DTYPES[config.dtype]
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, basis: Basis, config: EngineConfig | None = None,
                 backend: Backend | None = None):
        self.config = config or EngineConfig()
        self.config.validate()
        check_basis_matches_model(basis, model)  # on the weights as loaded, before any cast
        self.device, self.dtype = resolve_device(self.config)
        self.basis = basis.to("cpu", torch.float32)  # host copy: fusion and reduction run here
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.backend = backend or TorchBackend()
        self.context = RoutingContext()
        self.lock = threading.Lock()  # one forward at a time: the scheduler's steps and routing probes
        tables = {}
        shapes = {name: (lb.in_features, lb.k) for name, lb in self.basis.layers.items()}
        for names in shared_input_groups(shapes):  # q/k/v and gate/up: one shrink each
            group = SlotGroup.allocate([(self.basis[n].U, self.basis[n].V) for n in names], self.config.slots,
                                       self.config.residual_slots, self.config.max_residual_rank, self.dtype,
                                       self.device)
            for name, table in zip(names, group.layers):
                tables[name] = table
                self._wrap(name, table)
        tables = {name: tables[name] for name in self.basis.layers}  # the basis's order
        self.slots = SlotTable(tables, self.config.residual_slots, self.config.max_residual_rank)
        self._routing = Routing(self.slots.num_slots, ROUTING_ROWS, self.device)  # filled in place every step
        self.mixtures = MixtureCache(self.config.mixture_cache, self.config.mixture_cache_bytes)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = int(pad)
        self._check_cache()

    @classmethod
    def load(cls, model_dir: str | Path, basis: Basis, config: EngineConfig | None = None,
             backend: Backend | None = None) -> Engine:
        model, tokenizer = load_model_dir(model_dir)
        return cls(model, tokenizer, basis, config, backend)

    def _wrap(self, name: str, table: LayerSlots) -> None:
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise IncompatibleAdapter(f"the model has no layer {name!r}, which the basis names") from None
        parent_name, _, leaf = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, leaf, RoutedLinear(module, name, table, self.context, self.backend))

    def _check_cache(self) -> None:
        cache = self.new_cache()
        ids = torch.tensor([[self.pad_id]], device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        try:
            BatchKV.check_layers(cache)
        except TypeError as err:
            raise ModelDirError(f"this model cannot be served with per-row batching: {err}") from err

    # ------------------------------------------------------------------ mixtures

    def prepare(self, spec: MixtureSpec, load: AdapterLoader) -> MixtureCores | None:
        """The mixture reduced to cores (None for the base model), fused at most once while cached."""
        if spec.is_base:
            return None
        mixture = self.mixtures.get_or_build(spec, lambda: self._reduce(spec, load))
        self.slots.check_fits(mixture)
        return mixture

    def _reduce(self, spec: MixtureSpec, load: AdapterLoader) -> MixtureCores:
        pairs = load()
        if not pairs:
            raise InvalidMixture("the mixture names no adapter")
        for adapter, _ in pairs:
            adapter.check_against(self.basis)
        params = spec.fusion_params
        if len(pairs) == 1 and pairs[0][1] == 1.0 and spec.method == "linear" and not params:
            fused = pairs[0][0]  # one adapter at weight 1: it is its own mixture, exactly
        else:
            from fusion import fuse

            fused = fuse([a for a, _ in pairs], [w for _, w in pairs], self.basis, method=spec.method, **params)
        mixture = MixtureCores.from_adapter(spec, fused, self.basis)
        for layer, core in mixture.cores.items():  # a mixture that would blow the numbers up is a 400, not NaN
            check_delta(layer, core, mixture.residuals.get(layer), self.basis[layer])
        return mixture

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def routing(self, row_slots: list[int]) -> Routing:
        """This step's routing, written into the engine's one set of buffers (call it under the lock)."""
        return self._routing.update(row_slots, self.slots.diagonal, self.slots.residual_rank)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: DynamicCache, row_slots: list[int]) -> torch.Tensor:
        """Logits (rows, vocab) of the last position of every row; ``cache`` grows by the input."""
        if len(row_slots) != input_ids.shape[0]:
            raise ValueError(f"{len(row_slots)} slots for {input_ids.shape[0]} rows")
        with self.lock:
            self.context.begin(self.routing(row_slots))
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
            finally:
                self.context.end()
        return out.logits[:, -1]  # (rows, V)

    def prefill(self, prompts: list[list[int]], row_slots: list[int]) -> tuple[torch.Tensor, DynamicCache,
                                                                                 torch.Tensor]:
        """Run prompts (left padded together) -> (last logits (n, V), their cache, their mask (n, T))."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        cache = self.new_cache()
        logits = self.forward(ids, mask, positions_of(mask), cache, row_slots)
        return logits, cache, mask

    @torch.inference_mode()
    def probe(self, prompts: list[list[int]], projections: bool = False) -> PromptProbe:
        """The base model's view of prompts (slot -1, no cache), for routing: pooled features, and
        ``h = V_kᵀ x`` at every target layer when ``projections``. Safe to call from any thread."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        captured: dict[str, torch.Tensor] = {}

        def capture(module: RoutedLinear, args) -> None:
            captured[module.name] = (args[0] @ module.slots.V).float()  # (n, T, k)

        with self.lock:  # hooks only while this forward runs: the scheduler's steps never see them
            hooks = [m.register_forward_pre_hook(capture) for m in self.model.modules()
                     if projections and isinstance(m, RoutedLinear)]
            try:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=False,
                                 output_hidden_states=True, logits_to_keep=1)
            finally:
                for hook in hooks:
                    hook.remove()
        h = out.hidden_states[-1].float()  # (n, T, hidden)
        m = mask.unsqueeze(-1).to(h.dtype)  # (n, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (n, hidden): as adapters_zoo.signatures pools
        features = torch.nn.functional.normalize(pooled, dim=-1)
        return PromptProbe(features.cpu(), mask.cpu(), {k: v.cpu() for k, v in captured.items()})


@dataclass
class PromptProbe:
    """What a base-model pass over n left-padded prompts tells a router."""

    features: torch.Tensor  # (n, hidden) L2-normalised mean-pooled last hidden state
    mask: torch.Tensor  # (n, T) 1 on real tokens
    projections: dict[str, torch.Tensor]  # layer -> V_kᵀ x (n, T, k); empty unless asked for

    def layer_inputs(self, row: int, layers: list[str]) -> torch.Tensor:
        """Row ``row``'s real tokens at ``layers`` -> (L, T_row, k)."""
        real = self.mask[row].bool()
        return torch.stack([self.projections[name][row, real] for name in layers])


def load_model_dir(model_dir: str | Path):
    """(model on the cpu in its stored dtype, for the fingerprint check; tokenizer): the Engine moves and casts it."""
    return train.load_model_dir(model_dir, "cpu")


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
