"""A generation request made ready to queue: its prompts encoded and its mixture reduced.

A request's mixture is named in ``model`` (``base``, ``math``, ``math@2``,
``math:0.7,code:0.3``) or given as ``adapters: {"math": 0.7}`` (then ``model`` is ``base``
or the served model's name). It is resolved in the registry once (one read per ref: a
new version is a new mixture, :func:`adapters_zoo.registry.mixture.resolve`) and reduced
by the engine (fused at most once while cached). ``model: "auto"`` (or ``adapters:
"auto"`` / ``{"auto": {...}}``) lets :mod:`serving.routing` pick each prompt's mixture
from a base-model probe of the prompt; the router's choice is already resolved (its
candidates are registry records), so it reaches the engine without another registry
read. Every bound a request can push (prompt tokens, max_tokens, mixture length) is
checked here with a typed error. Blocking: run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters_zoo.cache import BoundedCache
from adapters_zoo.errors import InvalidMixture, InvalidRequest, PayloadTooLarge
from adapters_zoo.format import Adapter
from adapters_zoo.registry import Registry
from adapters_zoo.registry.mixture import Component, Mixture, resolve
from fusion.cores import adapter_cores
from fusion.mixture import MixtureCores
from serving.config import Limits
from serving.engine import Engine
from serving.generation import SamplingParams
from serving.routing import AutoRouter, AutoSpec, Candidate, RouteDecision, auto_spec, resolve_candidates

BASE = "base"
ADAPTER_CACHE = 1024  # parsed registry adapters kept in memory (they are small: k-sized tensors per layer)

Mixtures = MixtureCores | None | list[MixtureCores | None]  # one for every prompt, or one per prompt (auto)


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


class RequestPreparer:
    def __init__(self, engine: Engine, registry: Registry, limits: Limits, model_name: str = BASE):
        self.engine = engine
        self.registry = registry
        self.limits = limits
        self.served_names = (BASE, model_name)
        self.fingerprint = engine.basis.fingerprint
        # sha256 -> a parsed registry adapter, checked and evaluated on the served basis once (blobs are
        # content-addressed: never stale); its bytes count the cores it keeps alive (fusion.cores)
        self.adapters: BoundedCache[str, Adapter] = BoundedCache(ADAPTER_CACHE, engine.config.adapter_cache_bytes,
                                                                 sizeof=self._held_bytes)
        self.router = AutoRouter(engine)

    def _adapter(self, sha256: str, read: Callable[[], Adapter]) -> Adapter:
        """The registry adapter ``sha256``: read, checked against the served basis, its cores evaluated and
        packed for linear mixtures, all once while cached."""
        def load() -> Adapter:
            adapter = read()
            adapter_cores(adapter, self.engine.basis).packed(self.engine.basis)
            return adapter

        return self.adapters.get_or_build(sha256, load)

    def _held_bytes(self, adapter: Adapter) -> int:
        params = sum(t.numel() * t.element_size() for p in adapter.params.values() for t in p.values())
        return params + adapter_cores(adapter, self.engine.basis).nbytes

    def prepare(self, job: Job) -> tuple[list[list[int]], Mixtures]:
        """Everything a generation needs before it is queued: token ids, and the mixture (one per prompt
        for ``auto``, chosen from the prompt)."""
        prompts = self.encode(job)
        spec = auto_spec(job.model, job.adapters, self.served_names)
        if spec is None:
            return prompts, self.prepare_mixture(job.model, job.adapters, job.fusion_method, job.fusion_params)
        decisions, candidates = self._route(prompts, spec)
        by_ref = {c.ref: c for c in candidates}
        return prompts, [self._decided(d, by_ref, job.fusion_method, job.fusion_params) for d in decisions]

    # ------------------------------------------------------------------ mixtures

    def mixture(self, model: str, adapters: dict[str, Any] | None = None, method: str | None = None,
                params: dict[str, Any] | None = None) -> Mixture:
        """The mixture a request names, resolved in the registry (one read per ref); empty: the base model."""
        if adapters is not None:
            if model not in self.served_names:
                raise InvalidMixture(f"give the mixture either in model or in adapters, not both (model={model!r})")
            if not adapters:
                raise InvalidMixture("adapters is empty: name at least one adapter, or use model 'base'")
            source: str | dict[str, Any] = adapters
        elif model in self.served_names:
            if method is not None or params:
                raise InvalidMixture("fusion_method / fusion_params need a mixture of adapters")
            return Mixture()
        else:
            source = model
        return resolve(self.registry, source, "linear" if method is None else method, params,
                       fingerprint=self.fingerprint, max_entries=self.limits.max_mixture)

    def prepare_mixture(self, model: str, adapters=None, method=None, params=None) -> MixtureCores | None:
        """Resolve and reduce a mixture (blocking: registry reads, maybe fusion). None: the base model."""
        mixture = self.mixture(model, adapters, method, params)
        return self.engine.prepare(mixture, self._registry_adapter)

    def _registry_adapter(self, component: Component) -> Adapter:
        return self._adapter(component.sha256, lambda: self.registry.load_record(component.record))

    def _decided(self, decision: RouteDecision, by_ref: dict[str, Candidate], method: str | None,
                 params: dict[str, Any] | None) -> MixtureCores | None:
        """The mixture routing chose, from its candidates (resolved and loaded already)."""
        if not decision.pairs:
            return None
        mixture = Mixture.of(decision.pairs, "linear" if method is None else method, params,
                             {ref: by_ref[ref].sha256 for ref, _ in decision.pairs})
        return self.engine.prepare(mixture, lambda c: by_ref[c.ref].adapter)

    def route(self, prompts: list[list[int]], spec: AutoSpec) -> list[RouteDecision]:
        """The mixture ``spec`` picks for each prompt (token ids): base-model probe, then a router."""
        return self._route(prompts, spec)[0]

    def _route(self, prompts: list[list[int]], spec: AutoSpec) -> tuple[list[RouteDecision], list[Candidate]]:
        if spec.top_m > self.limits.max_mixture:
            raise InvalidRequest(f"adapters.auto.top_m is {spec.top_m}, this server mixes at most "
                                 f"{self.limits.max_mixture} adapters", param="adapters.auto.top_m")
        candidates = resolve_candidates(self.registry, self.fingerprint, spec, self._candidate)
        return self.router.route(prompts, spec, candidates), candidates

    def _candidate(self, ref: str, sha256: str) -> Adapter:
        return self._adapter(sha256, lambda: self.registry.load(ref))

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
                f"{self.engine.context_name} of {self.engine.max_positions} tokens", param="max_tokens")
