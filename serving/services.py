"""What the HTTP routes do, without HTTP: one :class:`Service` over the engine, scheduler and registry.

    service.prepare(job)            -> (token ids, mixture)   serving.preparation (blocking)
    service.start(prompts, ...)     -> Generation             serving.streaming (in the event loop)
    service.admin.models() ...      registry records, uploads, removal, fusion   serving.admin (blocking)
    service.health(), service.metrics

Routes parse and format; the work is in those modules, which import downward only
(engine, scheduler, registry, fusion), never this one. Every bound a request can push is
checked there with a typed error; the app maps error classes to status codes in one
handler.
"""

from __future__ import annotations

import time
from typing import Any

from adapters_zoo.registry import Registry
from fusion.mixture import MixtureCores
from serving.admin import RegistryAdmin
from serving.config import Limits
from serving.engine import Engine
from serving.generation import SamplingParams
from serving.metrics import Metrics
from serving.preparation import BASE, Job, RequestPreparer
from serving.routing import AutoSpec, RouteDecision
from serving.scheduler import Scheduler
from serving.streaming import Generation

__all__ = ["BASE", "Job", "Limits", "Service"]


class Service:
    def __init__(self, engine: Engine, scheduler: Scheduler, registry: Registry, limits: Limits | None = None,
                 metrics: Metrics | None = None, model_name: str = BASE):
        self.engine = engine
        self.scheduler = scheduler
        self.registry = registry
        self.limits = limits or Limits()
        self.limits.validate()
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.fingerprint = engine.basis.fingerprint
        self.started = int(time.time())
        self.preparer = RequestPreparer(engine, registry, self.limits, model_name)
        self.router = self.preparer.router
        self.admin = RegistryAdmin(registry, engine.basis, self.limits, model_name, self.started)
        self._watch()

    def _watch(self) -> None:
        m, slots, mixtures, router = self.metrics, self.engine.slots, self.engine.mixtures, self.router
        scheduler, adapters = self.scheduler, self.preparer.adapters
        slots.on_ready = m.mixture_ready.observe
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
        m.watch("specfuse_adapter_cache_bytes", "host memory of the parsed registry adapters", lambda: adapters.nbytes)
        m.watch("specfuse_slots_occupied", "device slots holding a mixture", lambda: slots.occupied)
        m.watch("specfuse_slots_pinned", "device slots used by running requests", lambda: slots.pinned)
        m.watch("specfuse_requests_running", "rows in the running batch", lambda: scheduler.running)
        m.watch("specfuse_requests_waiting", "requests waiting for a row", lambda: scheduler.waiting)
        m.watch("specfuse_routed_prompts_total", "prompts given a mixture by model auto", lambda: router.routed,
                "counter")
        m.watch("specfuse_routed_to_base_total", "auto prompts no adapter matched (served by the base)",
                lambda: router.to_base, "counter")

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

    def prepare(self, job: Job) -> tuple[list[list[int]], MixtureCores | None | list[MixtureCores | None]]:
        """Token ids and mixture(s) of a job, bounds checked (blocking; run it in a worker thread)."""
        return self.preparer.prepare(job)

    def prepare_mixture(self, model: str, adapters=None, method=None, params=None) -> MixtureCores | None:
        """A mixture named as a request names it, resolved and reduced. None: the base model."""
        return self.preparer.prepare_mixture(model, adapters, method, params)

    def route(self, prompts: list[list[int]], spec: AutoSpec) -> list[RouteDecision]:
        """The mixture ``spec`` picks for each prompt (token ids)."""
        return self.preparer.route(prompts, spec)

    def start(self, prompts: list[list[int]], params: SamplingParams, n: int,
              mixture: MixtureCores | None | list[MixtureCores | None]) -> Generation:
        """Queue ``len(prompts) * n`` generations now (ServerBusy if the queue is full); in the event loop."""
        return Generation(self.scheduler, self.metrics, prompts, params, n, mixture)

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.scheduler.alive else "stopped", "model": self.model_name,
                "base_fingerprint": self.fingerprint, "device": str(self.engine.device),
                "running": self.scheduler.running, "waiting": self.scheduler.waiting,
                "slots": {"total": self.engine.slots.num_slots, "occupied": self.engine.slots.occupied,
                          "pinned": self.engine.slots.pinned}}
