"""The serving engine: one base model on the device, every row of a batch its own mixture.

    Engine(model, tokenizer, basis, EngineConfig())          or  Engine.load(model_dir, basis)
    mixture = engine.prepare(Mixture.of([("math@1", 0.7), ("code@2", 0.3)]), load)   # load: component -> Adapter
    slot    = engine.slots.acquire(mixture)                   # -1 for the base model
    logits  = engine.forward(input_ids, attention_mask, position_ids, cache, row_slots=[slot, -1, ...])

Every target layer of the basis is wrapped by a :class:`serving.backend.RoutedLinear`
reading the slot tables; ``forward`` sets the step's routing once for all of them. A
mixture (its key: :class:`adapters_zoo.registry.mixture.Mixture`) is reduced once by
:func:`fusion.mixture.reduce` to k×k cores (+ residuals), cached on the host
(an :class:`adapters_zoo.cache.BoundedCache`) and copied into a device slot on demand
(:class:`serving.slots.SlotTable`). Nothing here imports the HTTP stack: the engine runs
where fastapi / pydantic are not installed.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from adapters_zoo import models
from adapters_zoo.basis import Basis, check_basis_matches_model
from adapters_zoo.cache import BoundedCache
from adapters_zoo.errors import IncompatibleAdapter, ModelDirError
from adapters_zoo.registry.mixture import Mixture
from adapters_zoo.signatures import pool_features
from fusion.mixture import AdapterLoader, MixtureCores, reduce
from serving.backend import (
    Backend,
    LayerSlots,
    RoutedLinear,
    Routing,
    RoutingContext,
    TorchBackend,
    allocate_groups,
    shared_input_groups,
)
from serving.config import EngineConfig
from serving.generation import RowKV, left_pad, positions_of
from serving.heap import keep_freed_memory
from serving.slots import SlotTable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config.DTYPE_NAMES
ROUTING_ROWS = 64  # rows the routing buffers hold before they grow (the scheduler's max_batch is 32)


def served_context(config) -> tuple[int, str]:
    """(the longest prompt + completion served, what sets it). A model with sliding-window layers (Gemma 3,
    Mistral's local attention) is served up to its window: the running rows keep every token in every
    layer, which equals local attention exactly while a row fits the window."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    context = int(getattr(text, "max_position_embeddings", 0) or 2**31)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    sliding = "sliding_attention" in types if types else bool(window) and getattr(text, "use_sliding_window", True)
    if sliding and window and int(window) < context:
        return int(window), "sliding window"
    return context, "context"


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = models.resolve_device(config.device)
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
        if self.device.type == "cpu":
            keep_freed_memory()  # activations reuse freed heap blocks instead of faulting in fresh pages
        self.basis = basis.to("cpu", torch.float32)  # host copy: fusion and reduction run here
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.backend = backend or TorchBackend()
        self.context = RoutingContext()
        self.lock = threading.Lock()  # one forward at a time, whichever thread calls
        self.prober: Callable[[list[list[int]], bool], PromptProbe] | None = None  # a running scheduler's probe
        tables = {}
        shapes = {name: (lb.in_features, lb.k) for name, lb in self.basis.layers.items()}
        members = shared_input_groups(shapes)  # q/k/v and gate/up: one shrink each
        groups = allocate_groups([[(self.basis[n].U, self.basis[n].V) for n in names] for names in members],
                                 self.config.slots, self.config.residual_slots, self.config.max_residual_rank,
                                 self.dtype, self.device)  # one core store per k: a new mixture is one copy
        for names, group in zip(members, groups):
            for name, table in zip(names, group.layers):
                tables[name] = table
                self._wrap(name, table)
        tables = {name: tables[name] for name in self.basis.layers}  # the basis's order
        self.slots = SlotTable(tables, self.config.residual_slots, self.config.max_residual_rank)
        self._routing = Routing(self.slots.num_slots, ROUTING_ROWS, self.device)  # filled in place every step
        self.mixtures: BoundedCache[Mixture, MixtureCores] = BoundedCache(
            self.config.mixture_cache, self.config.mixture_cache_bytes, sizeof=lambda m: m.nbytes)
        self.max_positions, self.context_name = served_context(model.config)
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = int(pad)
        self._cache_arg = cache_argument(model)
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
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        try:
            RowKV.check_layers(cache)
        except TypeError as err:
            raise ModelDirError(f"this model cannot be served with per-row batching: {err}") from err

    # ------------------------------------------------------------------ mixtures

    def prepare(self, mixture: Mixture, load: AdapterLoader) -> MixtureCores | None:
        """The mixture reduced to cores (None for the base model), reduced at most once while cached;
        ``load`` is called only on a miss."""
        if mixture.is_base:
            return None

        def build() -> MixtureCores:
            cores = reduce(mixture, load, self.basis)
            self.slots.check_fits(cores)  # once, before it is cached: a cached mixture fits
            return cores

        return self.mixtures.get_or_build(mixture, build)

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> DynamicCache:
        """A prefill's cache: every layer keeps every token (contexts fit the sliding window, ``served_context``)."""
        return DynamicCache()

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
                                 use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
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

    def probe(self, prompts: list[list[int]], projections: bool = False) -> PromptProbe:
        """The base model's view of prompts (slot -1, no cache), for routing: pooled features, and
        ``h = V_kᵀ x`` at every target layer when ``projections``. Safe to call from any thread.

        While a scheduler runs (``prober`` set), the probe is a phase of its loop, run between
        its steps on its thread; otherwise it runs here (``run_probe``)."""
        if self.prober is not None:
            return self.prober(prompts, projections)
        return self.run_probe(prompts, projections)

    @torch.inference_mode()
    def run_probe(self, prompts: list[list[int]], projections: bool = False) -> PromptProbe:
        """``probe`` on the calling thread."""
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
        features = pool_features(out.hidden_states[-1], mask)
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
    return models.load_model_dir(model_dir, "cpu")


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes the KV cache: ``cache`` where transformers has
    renamed it, ``past_key_values`` on the releases before (passing the old name to a new release warns)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
