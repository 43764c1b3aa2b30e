"""Automatic mixtures: the server picks each request's adapters from its prompt, in the shared basis.

A request asks for routing with ``model: "auto"``, ``adapters: "auto"`` or
``adapters: {"auto": {"router": ..., "candidates": [...] | "tag": ..., "top_m": 1,
"temperature": 0.1, "threshold": ...}}`` (:class:`AutoSpec`). The service probes the
prompt with the *base* model (slot -1, ``Engine.probe``), a router scores every
candidate adapter, and the chosen ``(adapter, weight)`` pairs become an ordinary mixture,
served in the same batch as everyone else's. One mixture per request: the engine keeps
one slot per row, so per-token scores are aggregated into per-request weights.

Routers (pure functions below, on host float32 tensors):

- ``prototype``: the request's feature ``f`` (mean-pooled last hidden state of the base,
  L2-normalised, as in :mod:`adapters_zoo.signatures`) against each adapter's signature
  ``s_i`` (the same feature averaged over its training prompts)::

      score_i = <f, s_i>                                    cosine, in [-1, 1]

- ``spectral`` (after Arrow routing, arXiv 2405.11157, data-free): each adapter's
  dominant input directions in the basis are the right singular vectors of its core
  ``C = P Σ Qᵀ`` per layer (residuals ``B A`` are projected into the basis for routing:
  ``C + U_kᵀ B A V_k``). At layer ``l`` a token with input ``x`` gives ``h = V_kᵀ x`` and::

      a_il(t) = ‖C_il h‖ / (‖C_il‖₂ ‖h‖) = sqrt(Σ_j (σ_j/σ_1)² <q_j, h/‖h‖>²)   in [0, 1]
      score_i = mean over layers (where adapter i has a core) of mean over tokens a_il(t)

  using the top ``SPECTRAL_DIRECTIONS`` directions of each core.

The prototype router also scores the base model itself, with its own signature: the same
feature averaged over ``BASE_PROMPTS``, general requests no adapter is trained for (rendered
with the chat template when the model has one, as a chat request is). A candidate must beat
it by ``base_margin``, so a prompt that looks more like a general request than like any
adapter's prompts stays with the base. This fallback adapts to the base's own scale: on an
instruct model every prompt shares the chat template and scores ≥ 0.95 with every
signature, where a fixed cosine threshold separates nothing.

Then, for either router (:func:`select`): candidates scoring below ``threshold`` (and, for
the prototype router, below the base's score + ``base_margin``) are dropped, the ``top_m``
best are kept, weights are ``softmax(score / temperature)`` over them, quantized to
multiples of 1/20 (so near-equal decisions share one fused mixture and one device slot).
Nothing left: the request is served by the base model.

Candidates: the given refs, else every adapter of the served base with ``tag``, else
every adapter of the served base (latest version of each name). The prototype router
needs signatures: an explicitly named candidate without one is an error naming the
command that adds it (``specfuse registry sign``); adapters picked up by tag or by
default are skipped when unsigned (an error if none is left). An empty candidate list,
a tag no adapter has, or a base without adapters is an error (400), never a crash.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.cache import BoundedCache
from adapters_zoo.errors import IncompatibleAdapter, InvalidMixture, InvalidRequest
from adapters_zoo.format import Adapter
from adapters_zoo.registry.names import validate_tag
from adapters_zoo.signatures import signature_from_features, signature_of

AUTO = "auto"
ROUTERS = ("prototype", "spectral")
# Default thresholds, measured on the toy zoo (benchmarks/results/routing.md): a task's own test
# prompts score ≥ 0.87 cosine with its signature in 99% of cases, prompts no adapter is for
# (the other suite's, the base's own ops) ≤ 0.75 in 90%. The spectral score does not
# separate the two (0.44–0.55 either way), so it never falls back unless asked to. On an
# instruct base the base's own signature does the falling back (BASE_PROMPTS).
DEFAULT_THRESHOLD = {"prototype": 0.8, "spectral": 0.0}
# General requests: the base model's signature is its features of these (no adapter is for them;
# kept apart from the benchmark's off-task prompts, which measure the fallback).
BASE_PROMPTS = (
    "Hello! Can you help me with something?", "Tell me about yourself.", "What can you do?",
    "Write a short story about a dragon.", "What is the tallest mountain in Europe?",
    "How do I sort a dictionary by value in Python?", "Give me ideas for a birthday party.",
    "Explain how a car engine works.", "Write a thank-you note to a friend.", "What is 12 plus 30?",
    "Compose a short song about the rain.", "Why do cats purr?", "What should I cook for dinner tonight?",
    "Explain the difference between weather and climate.", "Write a C function that adds two integers.",
    "Who painted the Mona Lisa?",
)
# How much a candidate must outscore the base's signature by default. On SmolLM2-135M-Instruct
# (benchmarks/results/smollm2/routing.md) validation task prompts lead it by ≥ 0.016, general
# requests trail it by ≥ 0.003: 0.005 is inside that gap (a few held-out requests lead by up
# to 0.003, so 0 is too low). A small slack in cosine: on the toy base task prompts lead by ≥ 0.1.
DEFAULT_BASE_MARGIN = 0.005
BASE_MARGIN_RANGE = 2.0  # cosines differ by at most 2: base_margin -2 never falls back to the base
MAX_CANDIDATES = 256  # adapters scored per request; more: name a tag or a list
MAX_TOP_M = 16
SPECTRAL_DIRECTIONS = 8  # right singular vectors kept per core (Arrow keeps 1)
WEIGHT_QUANTUM = 20  # weights are multiples of 1/20
SOFT_DIGITS = 6  # soft weights, rounded: a mixture key that prints as it is
SIGN_HINT = "specfuse registry sign NAME --data SAMPLE.jsonl --model MODEL_DIR"


# --------------------------------------------------------------------------- the request's options


@dataclass(frozen=True)
class AutoSpec:
    router: str = "prototype"
    candidates: tuple[str, ...] | None = None  # refs; None: by tag, else every adapter of the base
    tag: str | None = None
    top_m: int = 1  # whole-task adapters lose each task when mixed: one adapter per request by default
    temperature: float = 0.1
    threshold: float | None = None  # None: DEFAULT_THRESHOLD[router]
    base_margin: float = DEFAULT_BASE_MARGIN  # prototype: how much a candidate must outscore the base's signature
    soft: bool = False  # the softmax weights as they are (every prompt its own mixture), not quantized

    FIELDS = ("router", "candidates", "tag", "top_m", "temperature", "threshold", "base_margin", "soft")

    @classmethod
    def parse(cls, value: Any) -> AutoSpec:
        """``"auto"`` or the object under ``adapters.auto``, validated (InvalidRequest names the field)."""
        if value == AUTO:
            return cls()
        if not isinstance(value, dict):
            raise InvalidRequest(f"adapters.auto must be an object of routing options, got {type(value).__name__}",
                                 param="adapters.auto")
        unknown = sorted(set(value) - set(cls.FIELDS))
        if unknown:
            raise InvalidRequest(f"unknown routing option {unknown[0]!r} (options: {', '.join(cls.FIELDS)})",
                                 param=f"adapters.auto.{unknown[0]}")
        return cls(**{k: value[k] for k in cls.FIELDS if k in value and value[k] is not None})

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> InvalidRequest:
            return InvalidRequest(f"adapters.auto.{name}: {message}", param=f"adapters.auto.{name}")

        if self.router not in ROUTERS:
            raise bad("router", f"unknown router {self.router!r} (routers: {', '.join(ROUTERS)})")
        if self.candidates is not None:
            if not isinstance(self.candidates, (list, tuple)) or not all(isinstance(c, str) for c in self.candidates):
                raise bad("candidates", "must be a list of adapter names (name or name@version)")
            if not self.candidates:
                raise bad("candidates", "is empty: name at least one adapter, or leave it out to route over "
                                        "every adapter of this base")
            if len(self.candidates) > MAX_CANDIDATES:
                raise bad("candidates", f"{len(self.candidates)} adapters given, at most {MAX_CANDIDATES}")
            object.__setattr__(self, "candidates", tuple(self.candidates))
            if self.tag is not None:
                raise bad("tag", "give either candidates or a tag, not both")
        if self.tag is not None:
            try:
                validate_tag(self.tag)
            except ValueError as err:
                raise bad("tag", str(err)) from None
        if isinstance(self.top_m, bool) or not isinstance(self.top_m, int) or not 1 <= self.top_m <= MAX_TOP_M:
            raise bad("top_m", f"must be an integer in [1, {MAX_TOP_M}], got {self.top_m!r}")
        if not _number(self.temperature) or not 1e-3 <= self.temperature <= 100:
            raise bad("temperature", f"must be a number in [0.001, 100], got {self.temperature!r}")
        if self.threshold is not None and (not _number(self.threshold) or not -1 <= self.threshold <= 1):
            raise bad("threshold", f"must be a number in [-1, 1], got {self.threshold!r}")
        if not isinstance(self.soft, bool):
            raise bad("soft", f"must be true or false, got {self.soft!r}")
        if not _number(self.base_margin) or not abs(self.base_margin) <= BASE_MARGIN_RANGE:
            raise bad("base_margin", f"must be a number in [-{BASE_MARGIN_RANGE:g}, {BASE_MARGIN_RANGE:g}], got "
                                     f"{self.base_margin!r}")

    @property
    def min_score(self) -> float:
        return DEFAULT_THRESHOLD[self.router] if self.threshold is None else float(self.threshold)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def auto_spec(model: str, adapters: Any, served_names: tuple[str, ...]) -> AutoSpec | None:
    """The routing a request asks for, or None when it names its mixture (or the base) itself.

    ``model: "auto"`` routes (an adapter named ``auto`` is reached as ``auto@VERSION``);
    ``adapters: "auto"`` or ``{"auto": {...}}`` routes when ``model`` is the base.
    """
    asks = adapters == AUTO or (isinstance(adapters, dict) and isinstance(adapters.get(AUTO), dict))
    if asks:
        if model not in (AUTO, *served_names):
            raise InvalidMixture(f"give the mixture either in model or in adapters, not both (model={model!r})")
        if isinstance(adapters, dict) and len(adapters) != 1:
            raise InvalidMixture("adapters.auto routes the whole mixture: it cannot be combined with named adapters")
        return AutoSpec.parse(adapters if adapters == AUTO else adapters[AUTO])
    if model == AUTO:
        if adapters is not None:
            raise InvalidMixture("model 'auto' picks the adapters itself: leave adapters out, or put routing "
                                 "options in adapters.auto")
        return AutoSpec()
    return None


# --------------------------------------------------------------------------- router math (pure)


def prototype_scores(features: torch.Tensor, signatures: torch.Tensor) -> torch.Tensor:
    """Cosine of each prompt's feature with each signature: (B, hidden), (n, hidden) -> (B, n)."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    s = torch.nn.functional.normalize(signatures.float(), dim=-1)
    return f @ s.T  # (B, n)


@dataclass
class SpectralProfile:
    """One adapter's dominant input directions per layer (None where it has no part in the basis)."""

    directions: dict[str, torch.Tensor | None]  # layer -> Q (k, r): the top right singular vectors of C
    weights: dict[str, torch.Tensor | None]  # layer -> (σ_j / σ_1)² (r,)


def spectral_profile(adapter: Adapter, basis: Basis, directions: int = SPECTRAL_DIRECTIONS) -> SpectralProfile:
    """Right singular vectors of each layer's effective core (core + residual projected into the basis)."""
    qs: dict[str, torch.Tensor | None] = {}
    ws: dict[str, torch.Tensor | None] = {}
    for layer in basis.layer_names():
        qs[layer] = ws[layer] = None
        if layer not in adapter.params:
            continue
        lb = basis[layer]
        core = adapter.core(layer, basis)
        c = torch.zeros(lb.k, lb.k) if core is None else core.detach().float().cpu()  # (k, k)
        res = adapter.residual(layer, basis)
        if res is not None:
            B, A = (t.detach().float().cpu() for t in res)
            c = c + (lb.U.T.float() @ B) @ (A @ lb.V.float())  # U_kᵀ B A V_k, (k, k)
        _, s, vh = torch.linalg.svd(c)  # c = P diag(s) Qᵀ, vh = Qᵀ
        if not bool(s[0] > 0):
            continue  # the identity here: nothing to route on
        r = min(directions, s.shape[0])
        qs[layer] = vh[:r].T.contiguous()  # (k, r)
        ws[layer] = (s[:r] / s[0]) ** 2  # (r,)
    return SpectralProfile(qs, ws)


@dataclass
class SpectralTable:
    """Profiles of n candidates stacked per layer: one batched product scores them all."""

    layers: list[str]
    Q: torch.Tensor  # (L, k, n·r), zero columns where a candidate has no core
    lam: torch.Tensor  # (L, n·r)
    present: torch.Tensor  # (L, n) float: 1 where candidate i has a core at layer l
    n: int
    r: int

    @classmethod
    def stack(cls, profiles: list[SpectralProfile], layers: list[str], k: int,
              directions: int = SPECTRAL_DIRECTIONS) -> SpectralTable:
        n, r = len(profiles), min(directions, k)
        Q = torch.zeros(len(layers), k, n, r)
        lam = torch.zeros(len(layers), n, r)
        present = torch.zeros(len(layers), n)
        for li, layer in enumerate(layers):
            for i, p in enumerate(profiles):
                q, w = p.directions.get(layer), p.weights.get(layer)
                if q is None:
                    continue
                Q[li, :, i, : q.shape[1]] = q
                lam[li, i, : w.shape[0]] = w
                present[li, i] = 1.0
        return cls(layers, Q.reshape(len(layers), k, n * r), lam.reshape(len(layers), n * r), present, n, r)


def spectral_scores(projections: torch.Tensor, table: SpectralTable) -> torch.Tensor:
    """One prompt's ``h = V_kᵀ x`` at every layer, (L, T, k) (real tokens only) -> scores (n,)."""
    h = torch.nn.functional.normalize(projections.float(), dim=-1)  # (L, T, k)
    p = torch.bmm(h, table.Q)  # (L, T, n·r): <q_j, h/‖h‖>
    a = (p.square() * table.lam.unsqueeze(1)).reshape(*p.shape[:2], table.n, table.r).sum(-1).sqrt()  # (L, T, n)
    per_layer = a.mean(1)  # (L, n)
    counts = table.present.sum(0)  # (n,)
    return (per_layer * table.present).sum(0) / counts.clamp(min=1)  # (n,); 0 for an adapter with no core


def select(scores: torch.Tensor, top_m: int, temperature: float, threshold: float | None,
           soft: bool = False) -> list[tuple[int, float]]:
    """(candidate index, weight) of the chosen adapters, best first; [] = the base model.

    Keep scores ≥ threshold, the top_m best of them (ties: the earlier candidate), weights
    softmax(score / temperature) over those kept, quantized to multiples of 1/WEIGHT_QUANTUM
    (largest remainders; an adapter whose weight rounds to 0 is dropped), or with ``soft``
    as they are (to SOFT_DIGITS decimals; a new mixture costs a cached one's time, see
    ``fusion.mixture.reduce``).
    """
    order = sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i]), i))
    keep = [i for i in order[:top_m] if threshold is None or float(scores[i]) >= threshold]
    if not keep:
        return []
    w = torch.softmax(scores[keep].double() / temperature, dim=0)  # (m,)
    if soft:
        return [(i, round(float(x), SOFT_DIGITS)) for i, x in zip(keep, w) if round(float(x), SOFT_DIGITS) > 0]
    units = (w * WEIGHT_QUANTUM).tolist()
    whole = [math.floor(u) for u in units]
    for j in sorted(range(len(keep)), key=lambda j: (-(units[j] - whole[j]), j))[: WEIGHT_QUANTUM - sum(whole)]:
        whole[j] += 1
    return [(i, q / WEIGHT_QUANTUM) for i, q in zip(keep, whole) if q > 0]


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    ref: str  # name@version
    sha256: str
    adapter: Adapter
    explicit: bool  # named in the request (an unsigned one is an error, not skipped)


def resolve_candidates(registry, fingerprint: str, spec: AutoSpec,
                       load: Callable[[str, str], Adapter]) -> list[Candidate]:
    """The adapters a request may be routed to, sorted by ref; ``load(ref, sha256)`` parses one."""
    if spec.candidates is not None:
        records = []
        for ref in spec.candidates:
            rec = registry.get(ref)
            if rec.base_fingerprint != fingerprint:
                raise IncompatibleAdapter(f"candidate {rec.ref} belongs to base {rec.base_fingerprint}, this server "
                                          f"serves {fingerprint}")
            if any(r.ref == rec.ref for r in records):
                raise InvalidMixture(f"candidates name {rec.ref} twice")
            records.append(rec)
    else:
        latest: dict[str, Any] = {}
        for rec in registry.list(tag=spec.tag, base=fingerprint):  # by name, then age: the last one wins
            latest[rec.name] = rec
        records = list(latest.values())
        if not records:
            where = f"with tag {spec.tag!r}" if spec.tag is not None else "at all"
            raise InvalidRequest(f"auto: this server has no adapter of its base {where} to route to",
                                 param="adapters.auto.tag" if spec.tag is not None else "model")
        if len(records) > MAX_CANDIDATES:
            raise InvalidRequest(f"auto: {len(records)} adapters would be candidates, at most {MAX_CANDIDATES}; "
                                 "narrow them with adapters.auto.tag or adapters.auto.candidates",
                                 param="adapters.auto")
    explicit = spec.candidates is not None
    return sorted((Candidate(r.ref, r.sha256, load(r.ref, r.sha256), explicit) for r in records),
                  key=lambda c: c.ref)


# --------------------------------------------------------------------------- routing a request


@dataclass
class RouteDecision:
    router: str
    pairs: list[tuple[str, float]]  # (name@version, weight), best first; [] = the base model
    scores: dict[str, float] = field(default_factory=dict)  # every candidate's score
    base_score: float | None = None  # prototype: the base's own signature's score

    @property
    def label(self) -> str:
        return ",".join(f"{ref}:{w:g}" for ref, w in self.pairs) if self.pairs else "base"


class AutoRouter:
    """Scores candidates for prompts with the engine's base-model probe; caches per-adapter router state.

    Thread-safe: the HTTP worker threads route concurrently; the engine serializes the probes
    with its forward passes.
    """

    def __init__(self, engine, cache_size: int = 1024):
        self.engine = engine
        self.basis: Basis = engine.basis
        self.fingerprint = engine.basis.fingerprint
        self.hidden = int(engine.model.get_input_embeddings().embedding_dim)
        self.cache_size = cache_size
        # sha256 -> signature | None, sha256 -> SpectralProfile, candidate shas -> SpectralTable: content
        # hashes, never stale
        self._caches: dict[str, BoundedCache] = {name: BoundedCache(cache_size)
                                                 for name in ("signature", "profile", "table", "base")}
        self._lock = threading.Lock()  # the counters
        self.routed = 0  # prompts routed
        self.to_base = 0  # of which no candidate matched

    def _memo(self, cache: str, key, build: Callable[[], Any]) -> Any:
        return self._caches[cache].get_or_build(key, build)

    def signatures(self, candidates: list[Candidate]) -> tuple[list[Candidate], torch.Tensor]:
        """The candidates the prototype router can score and their signatures (n, hidden)."""
        sigs = [self._memo("signature", c.sha256, lambda c=c: signature_of(c.adapter.meta, self.fingerprint,
                                                                          self.hidden)) for c in candidates]
        missing = [c.ref for c, s in zip(candidates, sigs) if s is None]
        named = [c.ref for c in candidates if c.explicit and c.ref in missing]
        if named:
            raise InvalidRequest(
                f"auto: candidate(s) {', '.join(named[:5])} have no signature for this base, which the prototype "
                f"router needs; add one with `{SIGN_HINT}`, or use router 'spectral'", param="adapters.auto.candidates")
        kept = [(c, s) for c, s in zip(candidates, sigs) if s is not None]
        if not kept:
            raise InvalidRequest(
                f"auto: none of the {len(candidates)} candidate adapter(s) has a signature for this base; add them "
                f"with `{SIGN_HINT}`, or use router 'spectral'", param="adapters.auto")
        return [c for c, _ in kept], torch.stack([s for _, s in kept])

    def base_signature(self) -> torch.Tensor:
        """The base model's own signature (hidden,): its features of BASE_PROMPTS, probed once."""
        def build() -> torch.Tensor:
            tok = self.engine.tokenizer
            if getattr(tok, "chat_template", None):  # as a chat request reads them
                texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in BASE_PROMPTS]
                ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            else:
                ids = [tok(p)["input_ids"] for p in BASE_PROMPTS]
            return signature_from_features(self.engine.probe(ids).features)

        return self._memo("base", self.fingerprint, build)

    def table(self, candidates: list[Candidate]) -> SpectralTable:
        """The candidates' spectral profiles, stacked (cached per candidate set)."""
        def build() -> SpectralTable:
            profiles = [self._memo("profile", c.sha256, lambda c=c: spectral_profile(c.adapter, self.basis))
                        for c in candidates]
            return SpectralTable.stack(profiles, self.basis.layer_names(), next(iter(self.basis.layers.values())).k)

        return self._memo("table", tuple(c.sha256 for c in candidates), build)

    def route(self, prompts: list[list[int]], spec: AutoSpec, candidates: list[Candidate]) -> list[RouteDecision]:
        """One decision per prompt (token ids), from one base-model probe of all of them."""
        if not candidates:
            raise InvalidRequest("auto: no candidate adapters to route to", param="adapters.auto.candidates")
        base: list[float | None] = [None] * len(prompts)
        floors = [spec.min_score] * len(prompts)
        if spec.router == "prototype":
            candidates, sigs = self.signatures(candidates)
            probe = self.engine.probe(prompts)
            scores = prototype_scores(probe.features, sigs)  # (B, n)
            base = prototype_scores(probe.features, self.base_signature()[None])[:, 0].tolist()  # (B,)
            floors = [max(spec.min_score, b + spec.base_margin) for b in base]
        else:
            table = self.table(candidates)
            probe = self.engine.probe(prompts, projections=True)
            scores = torch.stack([spectral_scores(probe.layer_inputs(i, table.layers), table)
                                  for i in range(len(prompts))])  # (B, n)
        decisions = []
        with self._lock:
            self.routed += len(prompts)
        for row, floor, base_score in zip(scores, floors, base):
            chosen = select(row, spec.top_m, spec.temperature, floor, spec.soft)
            decisions.append(RouteDecision(spec.router, [(candidates[i].ref, w) for i, w in chosen],
                                           {c.ref: round(float(s), 6) for c, s in zip(candidates, row)},
                                           None if base_score is None else round(base_score, 6)))
        with self._lock:
            self.to_base += sum(1 for d in decisions if not d.pairs)
        return decisions
