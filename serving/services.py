"""What the HTTP routes do, without HTTP: mixtures, prompts, generation, the registry.

Routes parse and format; everything else is here. A request's mixture is named in
``model`` (``base``, ``math``, ``math@2``, ``math:0.7,code:0.3``) or given as
``adapters: {"math": 0.7}`` (then ``model`` is ``base`` or the served model's name); refs
are resolved to ``name@version`` in the registry, so a new version is a new mixture, and
the mixture is reduced by the engine (fused at most once while cached). ``model: "auto"``
(or ``adapters: "auto"`` / ``{"auto": {...}}``) lets :mod:`serving.routing` pick each
prompt's mixture from a base-model probe of the prompt before it is queued. Every bound a
request can push (prompt tokens, max_tokens, mixture length, n) is checked here with a
typed error; the app maps error classes to status codes in one handler.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from adapters_zoo.errors import (
    AdapterNotFound,
    IncompatibleAdapter,
    InvalidMixture,
    InvalidRequest,
    PayloadTooLarge,
)
from adapters_zoo.format import Adapter, adapter_from_bytes
from adapters_zoo.registry import Registry, mixture_pairs
from serving.engine import Engine, MixtureSpec
from serving.generation import SamplingParams
from serving.metrics import Metrics
from serving.routing import AUTO, AutoRouter, AutoSpec, RouteDecision, auto_spec, resolve_candidates
from serving.scheduler import Event, GenerationRequest, RequestHandle, Scheduler
from serving.slots import MixtureCores

BASE = "base"
ADAPTER_CACHE = 1024  # parsed registry adapters kept in memory (they are small: k-sized tensors per layer)
ADAPTER_CACHE_BYTES = 64 << 20  # ... and the memory they may take


@dataclass
class Limits:
    max_prompt_tokens: int = 2048  # per prompt; past it: 413
    max_tokens: int = 1024  # per request; past it: 400
    max_mixture: int = 16  # adapters in one mixture; past it: 400
    max_body_bytes: int = 1 << 20  # JSON bodies; past it: 413
    max_upload_bytes: int = 64 << 20  # adapter uploads; past it: 413
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions
    default_chat_tokens: int = 256


@dataclass
class Job:
    """A generation request as the services see it."""

    endpoint: str  # "completion" | "chat"
    model: str
    prompts: list[str | list[int]]  # completion: text or token ids per prompt
    messages: list[dict[str, str]] | None  # chat
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    adapters: dict[str, Any] | str | None  # a weight map, or "auto" / {"auto": {...}} (serving.routing)
    fusion_method: str | None
    fusion_params: dict[str, Any] | None




class Service:
    def __init__(self, engine: Engine, scheduler: Scheduler, registry: Registry, limits: Limits | None = None,
                 metrics: Metrics | None = None, model_name: str = BASE):
        self.engine = engine
        self.scheduler = scheduler
        self.registry = registry
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.fingerprint = engine.basis.fingerprint
        self.started = int(time.time())
        self._adapters: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()  # sha256 -> (adapter, bytes)
        self._adapter_bytes = 0
        self._adapter_lock = threading.Lock()
        self.router = AutoRouter(engine)
        m = self.metrics
        slots, mixtures = engine.slots, engine.mixtures
        m.watch("specfuse_slot_cache_hits_total", "mixture found in a device slot", lambda: slots.hits, "counter")
        m.watch("specfuse_slot_cache_misses_total", "mixture copied into a device slot", lambda: slots.misses,
                "counter")
        m.watch("specfuse_slot_cache_evictions_total", "mixtures evicted from a slot", lambda: slots.evictions,
                "counter")
        m.watch("specfuse_mixture_cache_hits_total", "fused mixture found on the host", lambda: mixtures.hits,
                "counter")
        m.watch("specfuse_mixture_cache_misses_total", "mixtures fused", lambda: mixtures.misses, "counter")
        m.watch("specfuse_mixture_cache_evictions_total", "fused mixtures dropped from the host cache",
                lambda: mixtures.evictions, "counter")
        m.watch("specfuse_mixture_cache_bytes", "host memory of the cached fused mixtures", lambda: mixtures.nbytes)
        m.watch("specfuse_adapter_cache_bytes", "host memory of the parsed registry adapters",
                lambda: self._adapter_bytes)
        m.watch("specfuse_slots_occupied", "device slots holding a mixture", lambda: slots.occupied)
        m.watch("specfuse_slots_pinned", "device slots used by running requests", lambda: slots.pinned)
        m.watch("specfuse_requests_running", "rows in the running batch", lambda: scheduler.running)
        m.watch("specfuse_requests_waiting", "requests waiting for a row", lambda: scheduler.waiting)
        m.watch("specfuse_routed_prompts_total", "prompts given a mixture by model auto", lambda: self.router.routed,
                "counter")
        m.watch("specfuse_routed_to_base_total", "auto prompts no adapter matched (served by the base)",
                lambda: self.router.to_base, "counter")

    def close(self) -> None:
        """Stop the scheduler thread (new requests then get 503) and close the registry."""
        try:
            self.scheduler.stop()
        finally:
            self.registry.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ mixtures

    def mixture_spec(self, model: str, adapters: dict[str, Any] | None = None, method: str | None = None,
                     params: dict[str, Any] | None = None) -> tuple[MixtureSpec, Callable[[], list]]:
        """-> (the cache key, a loader of (Adapter, weight) pairs called only on a cache miss)."""
        if adapters is not None:
            if model not in (BASE, self.model_name):
                raise InvalidMixture(f"give the mixture either in model or in adapters, not both (model={model!r})")
            if not adapters:
                raise InvalidMixture("adapters is empty: name at least one adapter, or use model 'base'")
            source: str | dict[str, Any] = adapters
        elif model in (BASE, self.model_name):
            if method is not None or params:
                raise InvalidMixture("fusion_method / fusion_params need a mixture of adapters")
            return MixtureSpec(), list
        else:
            source = model
        pairs = mixture_pairs(source, max_entries=self.limits.max_mixture)
        records, digests = [], {}
        for ref, weight in pairs:
            rec = self.registry.get(ref)
            if rec.base_fingerprint != self.fingerprint:
                raise IncompatibleAdapter(
                    f"adapter {rec.ref} belongs to base {rec.base_fingerprint}, this server serves {self.fingerprint}"
                )
            if rec.ref in digests:
                raise InvalidMixture(f"the mixture names {rec.ref} twice")
            records.append((rec.ref, weight))
            digests[rec.ref] = rec.sha256
        spec = MixtureSpec.of(records, "linear" if method is None else method, params, digests)

        def load() -> list[tuple[Adapter, float]]:
            return [(self._adapter(ref, sha), weight) for (ref, weight), sha in zip(spec.components, spec.digests)]

        return spec, load

    def _adapter(self, ref: str, sha256: str) -> Adapter:
        """A registry adapter, parsed once per content hash (blobs are content-addressed: never stale)."""
        with self._adapter_lock:
            if sha256 in self._adapters:
                self._adapters.move_to_end(sha256)
                return self._adapters[sha256][0]
        adapter = self.registry.load(ref)
        size = sum(t.numel() * t.element_size() for p in adapter.params.values() for t in p.values())
        with self._adapter_lock:
            if sha256 not in self._adapters:
                self._adapters[sha256] = (adapter, size)
                self._adapter_bytes += size
            while len(self._adapters) > 1 and (len(self._adapters) > ADAPTER_CACHE
                                               or self._adapter_bytes > ADAPTER_CACHE_BYTES):
                self._adapter_bytes -= self._adapters.popitem(last=False)[1][1]
        return adapter

    def prepare_mixture(self, model: str, adapters=None, method=None, params=None) -> MixtureCores | None:
        """Resolve and reduce a mixture (blocking: registry reads, maybe fusion). None: the base model."""
        spec, load = self.mixture_spec(model, adapters, method, params)
        return self.engine.prepare(spec, load)

    # ------------------------------------------------------------------ prompts

    def encode(self, job: Job) -> list[list[int]]:
        """Token ids of every prompt (the chat template for chat), bounds checked."""
        tok = self.engine.tokenizer
        if job.endpoint == "chat":
            if not getattr(tok, "chat_template", None):
                raise InvalidRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
            try:
                text = tok.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # the model's own Jinja template refusing these messages (e.g. a system role)
                raise InvalidRequest(f"the model's chat template refused these messages: {err}", "messages") from err
            prompts = [tok(text, add_special_tokens=False)["input_ids"]]
        else:
            prompts = []
            for p in job.prompts:
                if isinstance(p, str):
                    if len(p) > 16 * self.limits.max_prompt_tokens:  # don't tokenize megabytes to refuse them
                        raise PayloadTooLarge(f"the prompt is {len(p)} characters long, too long", param="prompt")
                    prompts.append(tok(p)["input_ids"])
                else:
                    vocab = len(tok)
                    bad = [t for t in p if not 0 <= t < vocab]
                    if bad:
                        raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
                    prompts.append(list(p))
        for ids in prompts:
            self.check_prompt(ids, job.params)
        return prompts

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        params.validate(self.limits.max_tokens)
        if not ids:
            raise InvalidRequest("the prompt has no tokens", param="prompt")
        limit = min(self.limits.max_prompt_tokens, self.engine.max_positions - 1)
        if len(ids) > limit:
            raise PayloadTooLarge(f"the prompt has {len(ids)} tokens, at most {limit} are allowed", param="prompt")
        if len(ids) + params.max_tokens > self.engine.max_positions:
            raise InvalidRequest(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.engine.max_positions} tokens", param="max_tokens")

    def prepare(self, job: Job) -> tuple[list[list[int]], MixtureCores | None | list[MixtureCores | None]]:
        """Everything a generation needs before it is queued (blocking; run it in a worker thread).

        An ``auto`` job gets one mixture per prompt, chosen from the prompt (``route``)."""
        prompts = self.encode(job)
        spec = auto_spec(job.model, job.adapters, (BASE, self.model_name))
        if spec is None:
            return prompts, self.prepare_mixture(job.model, job.adapters, job.fusion_method, job.fusion_params)
        return prompts, [None if not d.pairs else self.prepare_mixture(BASE, dict(d.pairs), job.fusion_method,
                                                                       job.fusion_params)
                         for d in self.route(prompts, spec)]

    def route(self, prompts: list[list[int]], spec: AutoSpec) -> list[RouteDecision]:
        """The mixture ``spec`` picks for each prompt (token ids): base-model probe, then a router."""
        if spec.top_m > self.limits.max_mixture:
            raise InvalidRequest(f"adapters.auto.top_m is {spec.top_m}, this server mixes at most "
                                 f"{self.limits.max_mixture} adapters", param="adapters.auto.top_m")
        candidates = resolve_candidates(self.registry, self.fingerprint, spec, self._adapter)
        return self.router.route(prompts, spec, candidates)

    # ------------------------------------------------------------------ generation

    def start(self, prompts: list[list[int]], params: SamplingParams, n: int,
              mixture: MixtureCores | None | list[MixtureCores | None]) -> Generation:
        """Queue ``len(prompts) * n`` generations now (ServerBusy if the queue is full)."""
        return Generation(self, prompts, params, n, mixture)

    # ------------------------------------------------------------------ registry

    def models(self) -> list[dict[str, Any]]:
        """``base`` and every adapter of this base (latest version by name; all versions listed)."""
        out = [{"id": BASE, "object": "model", "created": self.started, "owned_by": "specfuse",
                "root": self.model_name, "parent": None},
               {"id": AUTO, "object": "model", "created": self.started, "owned_by": "specfuse",
                "root": self.model_name, "parent": BASE, "kind": "router"}]  # each prompt picks its adapters
        by_name: dict[str, list] = {}
        for rec in self.registry.compatible(self.fingerprint):
            by_name.setdefault(rec.name, []).append(rec)
        for name, recs in sorted(by_name.items()):
            out.append(self._model_entry(name, recs[-1], [r.version for r in recs]))  # listed oldest first
        return out

    def _model_entry(self, model_id: str, rec, versions: list[str]) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _epoch(rec.created), "owned_by": "specfuse",
                "root": rec.ref, "parent": BASE, "kind": rec.kind, "tags": list(rec.tags), "versions": versions}

    def model(self, model_id: str) -> dict[str, Any]:
        """One entry of ``models``: ``base``, an adapter name or ``name@version`` (AdapterNotFound otherwise)."""
        if model_id in (BASE, self.model_name):
            return self.models()[0]
        if model_id == AUTO:
            return self.models()[1]
        rec = self.registry.get(model_id)
        if rec.base_fingerprint != self.fingerprint:
            raise AdapterNotFound(f"adapter {rec.ref} belongs to another base than the one served here")
        return self._model_entry(model_id, rec, [rec.version])

    def adapters(self, kind: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        return [rec.to_json() for rec in self.registry.list(kind=kind, tag=tag, base=self.fingerprint)]

    def adapter(self, ref: str) -> dict[str, Any]:
        return self.registry.get(ref).to_json()

    def upload(self, data: bytes, name: str, version: str | None, tags: list[str], description: str) -> dict:
        if len(data) > self.limits.max_upload_bytes:
            raise PayloadTooLarge(f"the upload is {len(data)} bytes, at most {self.limits.max_upload_bytes}")
        adapter = adapter_from_bytes(data, origin="upload")
        if adapter.base_fingerprint != self.fingerprint:
            raise IncompatibleAdapter(
                f"the upload belongs to base {adapter.base_fingerprint}, this server serves {self.fingerprint}"
            )
        adapter.check_against(self.engine.basis)
        return self.registry.add(data, name, version=version, tags=tags, description=description).to_json()

    def remove(self, ref: str) -> list[dict[str, Any]]:
        self.registry.get(ref)  # AdapterNotFound before anything else
        return [rec.to_json() for rec in self.registry.remove(ref)]

    def fuse(self, mixture: str | dict[str, Any], method: str, params: dict[str, Any], project: bool, name: str,
             version: str | None, tags: list[str], description: str) -> dict[str, Any]:
        """Fuse a mixture offline into a new registry adapter (a ``core`` adapter)."""
        from fusion import fuse

        resolved = self.registry.resolve_mixture(mixture, max_entries=self.limits.max_mixture)
        for ref, adapter, _ in resolved:
            if adapter.base_fingerprint != self.fingerprint:
                raise IncompatibleAdapter(f"adapter {ref} belongs to another base than this server's")
        fused = fuse([a for _, a, _ in resolved], [w for _, _, w in resolved], self.engine.basis, method=method,
                     project=project, **params)
        fused.meta["name"] = name
        fused.meta.setdefault("fusion", {})["refs"] = [ref for ref, _, _ in resolved]
        return self.registry.add(fused, name, version=version, tags=tags, description=description).to_json()

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.scheduler.alive else "stopped", "model": self.model_name,
                "base_fingerprint": self.fingerprint, "device": str(self.engine.device),
                "running": self.scheduler.running, "waiting": self.scheduler.waiting,
                "slots": {"total": self.engine.slots.num_slots, "occupied": self.engine.slots.occupied,
                          "pinned": self.engine.slots.pinned}}


class Generation:
    """Generations queued for one HTTP request, read back as (choice index, event).

    Built inside the event loop. ``cancel`` (or leaving ``events`` early: a client that
    went away) cancels whatever still runs, which frees its row and unpins its slot at
    the scheduler's next iteration.
    """

    def __init__(self, service: Service, prompts: list[list[int]], params: SamplingParams, n: int,
                 mixture: MixtureCores | None | list[MixtureCores | None]):
        self.service = service
        mixtures = mixture if isinstance(mixture, list) else [mixture] * len(prompts)  # a list: one per prompt
        self.count = len(prompts) * n
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._handles: list[RequestHandle] = []
        self._start = time.perf_counter()
        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    p = params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)
                    request = GenerationRequest(ids, p, mixtures[i])
                    self._handles.append(service.scheduler.submit(request, self._callback(i * n + j)))
        except BaseException:
            self.cancel()
            raise

    def _callback(self, index: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
        return on_event

    async def events(self, disconnected: Callable[[], Awaitable[bool]] | None = None,
                     poll_s: float = 0.5) -> AsyncIterator[tuple[int, Event]]:
        remaining, first = self.count, True
        checked = time.perf_counter()
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(self._queue.get(), timeout=poll_s)
                except asyncio.TimeoutError:
                    index, event = -1, None
                if disconnected is not None and time.perf_counter() - checked >= poll_s:
                    checked = time.perf_counter()  # checked between events too: a busy stream still notices
                    if await disconnected():
                        return
                if event is None:
                    continue
                if first:
                    self.service.metrics.ttft.observe(time.perf_counter() - self._start)
                    first = False
                if event.kind != "text":
                    remaining -= 1
                yield index, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for handle in self._handles:
            if not handle.finished:
                handle.cancel()


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
