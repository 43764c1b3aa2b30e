"""A mixture of adapters, parsed and resolved: ``math``, ``math@2``, ``math:0.7,code:0.3``.

    mixture  entry ("," entry)*        at most MAX_MIXTURE entries
    entry    ref [":" weight]          weight defaults to 1
    weight   decimal number            finite, |weight| ≤ MAX_WEIGHT, ≥ 0 unless allow_negative

    pairs    = mixture_pairs("a:0.7,b@2:0.3")          # [("a", 0.7), ("b@2", 0.3)], weights validated here
    mixture  = resolve(registry, "a:0.7,b@2:0.3", "ties", {"density": 0.5})
                   # Mixture: (name@version, weight, sha256) per component, method, params; one Registry.get per ref

Parsing refuses duplicated refs, NaN/inf, negative weights (unless allowed, for
task-vector subtraction) and all-zero mixtures with InvalidMixture; this is the one place
a mixture's weights are checked. Resolving looks every ref up once and refuses two refs
of one version and adapters of two bases. Reducing a resolved mixture to cores needs the
fusion layer: :mod:`fusion.mixture`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapters_zoo.errors import IncompatibleAdapter, InvalidMixture, InvalidName
from adapters_zoo.registry.names import MAX_NAME_LEN, parse_ref

if TYPE_CHECKING:
    from adapters_zoo.registry.catalog import AdapterRecord

MAX_MIXTURE = 64  # entries the parser takes (offline: fuse, merge, export-lora)
SERVED_MIXTURE = 16  # adapters in one served mixture (specfuse serve --max-mixture, the vLLM bridge)
# Task arithmetic uses weights around 1; a weight past 10 turns an adapter into something its
# training never saw (and feeds the cores' norm bound, format.MAX_DELTA_RATIO, a 400 anyway).
MAX_WEIGHT = 10.0
MAX_ENTRY_CHARS = 2 * MAX_NAME_LEN + 40  # name@version:weight, generous for the weight
_WEIGHT_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # no nan/inf/hex/underscores


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _parse_weight(raw: str, entry: str) -> float:
    raw = raw.strip()
    if not _WEIGHT_RE.fullmatch(raw):
        raise InvalidMixture(f"weight {_shown(raw)} of {_shown(entry)} is not a finite decimal number")
    return float(raw)  # may still overflow to inf: checked with the others


def check_mixture(
    pairs: Iterable[tuple[str, float]], *, allow_negative: bool = False, max_entries: int = MAX_MIXTURE
) -> list[tuple[str, float]]:
    """Validate (ref, weight) pairs: refs well-formed and distinct, weights finite, ≥ 0, not all 0."""
    pairs = list(pairs)
    if not pairs:
        raise InvalidMixture("the mixture is empty: name at least one adapter")
    if len(pairs) > max_entries:
        raise InvalidMixture(f"the mixture has {len(pairs)} adapters, at most {max_entries} are allowed")
    seen: set[str] = set()
    out = []
    for ref, weight in pairs:
        try:
            parse_ref(ref)
        except InvalidName as err:
            raise InvalidMixture(f"bad adapter in mixture: {err}") from err
        if ref in seen:
            raise InvalidMixture(f"adapter {ref!r} appears twice in the mixture")
        seen.add(ref)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidMixture(f"weight of {ref!r} must be a number, got {weight!r}")
        weight = float(weight)
        if not math.isfinite(weight):
            raise InvalidMixture(f"weight of {ref!r} must be finite, got {weight}")
        if abs(weight) > MAX_WEIGHT:
            raise InvalidMixture(f"weight of {ref!r} is {weight:g}, past the bound |weight| ≤ {MAX_WEIGHT:g} "
                                 "(max mixture weight)")
        if weight < 0 and not allow_negative:
            raise InvalidMixture(f"weight of {ref!r} is negative ({weight}); negative weights are not allowed here")
        out.append((ref, weight))
    if all(w == 0 for _, w in out):
        raise InvalidMixture("every weight in the mixture is 0: the mixture would change nothing")
    return out


def parse_mixture(
    s: str, *, allow_negative: bool = False, max_entries: int = MAX_MIXTURE
) -> list[tuple[str, float]]:
    """``"a:0.7,b@2:0.3"`` -> ``[("a", 0.7), ("b@2", 0.3)]``; a bare ``name`` has weight 1."""
    if not isinstance(s, str):
        raise InvalidMixture(f"a mixture must be a string like 'a:0.7,b:0.3', got {type(s).__name__}")
    if len(s) > max_entries * MAX_ENTRY_CHARS:
        raise InvalidMixture(f"the mixture string is {len(s)} characters long, too long for {max_entries} adapters")
    if not s.strip():
        raise InvalidMixture("the mixture is empty: name at least one adapter")
    entries = s.split(",")
    if len(entries) > max_entries:
        raise InvalidMixture(f"the mixture has {len(entries)} entries, at most {max_entries} are allowed")
    pairs = []
    for i, entry in enumerate(entries, 1):
        entry = entry.strip()
        if not entry:
            raise InvalidMixture(f"entry {i} of mixture {_shown(s)} is empty (stray comma?)")
        ref, colon, raw_weight = entry.partition(":")
        if colon and ":" in raw_weight:
            raise InvalidMixture(f"entry {_shown(entry)} has more than one ':' (write name:weight)")
        pairs.append((ref.strip(), _parse_weight(raw_weight, entry) if colon else 1.0))
    return check_mixture(pairs, allow_negative=allow_negative, max_entries=max_entries)


def mixture_pairs(
    mixture: str | Mapping[str, float], *, allow_negative: bool = False, max_entries: int = MAX_MIXTURE
) -> list[tuple[str, float]]:
    """A mixture given as a string or as ``{ref: weight}`` (HTTP bodies), validated the same way."""
    if isinstance(mixture, str):
        return parse_mixture(mixture, allow_negative=allow_negative, max_entries=max_entries)
    if not isinstance(mixture, Mapping):
        raise InvalidMixture(f"a mixture must be a string or a {{name: weight}} map, got {type(mixture).__name__}")
    if len(mixture) > max_entries:
        raise InvalidMixture(f"the mixture has {len(mixture)} adapters, at most {max_entries} are allowed")
    for ref in mixture:
        if not isinstance(ref, str):
            raise InvalidMixture(f"adapter names in a mixture must be strings, got {ref!r}")
    return check_mixture(mixture.items(), allow_negative=allow_negative, max_entries=max_entries)


def resolve(
    registry,
    mixture: str | Mapping[str, float],
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
    *,
    fingerprint: str | None = None,
    allow_negative: bool = False,
    max_entries: int = MAX_MIXTURE,
) -> Mixture:
    """Parse ``mixture`` and look every ref up once: the :class:`Mixture` of its records.

    Two refs of one version are refused (InvalidMixture), so are adapters of two bases or
    basis ranks, and, when ``fingerprint`` is given, adapters of another base (IncompatibleAdapter).
    """
    out: list[Component] = []
    seen: dict[str, str] = {}
    for ref, weight in mixture_pairs(mixture, allow_negative=allow_negative, max_entries=max_entries):
        rec = registry.get(ref)
        if fingerprint is not None and rec.base_fingerprint != fingerprint:
            raise IncompatibleAdapter(f"adapter {rec.ref} belongs to base {rec.base_fingerprint}, not to the "
                                      f"served base {fingerprint}")
        if rec.ref in seen:
            raise InvalidMixture(f"{ref!r} and {seen[rec.ref]!r} are the same adapter ({rec.ref})")
        seen[rec.ref] = ref
        first = out[0].record if out else rec
        if (rec.base_fingerprint, str(rec.basis_k)) != (first.base_fingerprint, str(first.basis_k)):
            raise IncompatibleAdapter(
                f"{rec.ref} is of base {rec.base_fingerprint} (k={rec.basis_k}) but {first.ref} is of "
                f"base {first.base_fingerprint} (k={first.basis_k}): a mixture lives in one basis"
            )
        out.append(Component(rec.ref, weight, rec.sha256, rec))
    return Mixture.of(out, method, params)


def format_pairs(pairs: Iterable[tuple[str, float]]) -> str:
    """(ref, weight) pairs as a mixture string ``a:0.7,b@2:0.3`` (what ``parse_mixture`` reads)."""
    return ",".join(f"{ref}:{w:g}" for ref, w in pairs)


@dataclass(frozen=True)
class Component:
    """One adapter of a mixture: its name@version, weight and blob (a re-added name@version is another
    component); ``record`` is the registry's, when resolved there (not part of the key)."""

    ref: str
    weight: float
    sha256: str = ""
    record: AdapterRecord | None = field(default=None, compare=False, repr=False)


ParamValue = str | int | float | bool | None | tuple


@dataclass(frozen=True)
class Mixture:
    """A mixture as every layer passes it, built once (:func:`resolve`, or :meth:`of` for adapters
    held elsewhere) and hashable: the caches' key.

    ``components`` are sorted by ref, the one order every reduction runs in (order-dependent
    methods, DARE's masks, then give one result per mixture however it was typed); ``given``
    keeps the order typed, for reports. ``params`` are the fusion method's, frozen: sorted
    (name, value) pairs of JSON scalars (lists as tuples). The empty mixture is the base model.
    """

    components: tuple[Component, ...] = ()
    method: str = "linear"
    params: tuple[tuple[str, ParamValue], ...] = ()
    given: tuple[Component, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, components: Iterable[Component | tuple[str, float]] = (), method: str = "linear",
           params: Mapping[str, Any] | None = None, digests: Mapping[str, str] | None = None) -> Mixture:
        """The mixture of already validated components, or (ref, weight) pairs (``digests``: ref -> sha256)."""
        digests = digests or {}
        given = tuple(c if isinstance(c, Component) else Component(str(c[0]), float(c[1]), digests.get(c[0], ""))
                      for c in components)
        return cls(tuple(sorted(given, key=lambda c: c.ref)), method, _frozen_params(params), given)

    @property
    def is_base(self) -> bool:
        return not self.components

    @property
    def is_plain_sum(self) -> bool:
        """Σ wₙ adapterₙ: linear, no params."""
        return self.method == "linear" and not self.params

    @property
    def pairs(self) -> tuple[tuple[str, float], ...]:
        """(ref, weight) in the key's order."""
        return tuple((c.ref, c.weight) for c in self.components)

    @property
    def weights(self) -> list[float]:
        return [c.weight for c in self.components]

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(c.sha256 for c in self.components)

    @property
    def fusion_params(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.params}

    @property
    def label(self) -> str:
        if self.is_base:
            return "base"
        text = format_pairs(self.pairs)
        return text if self.is_plain_sum else f"{text} ({self.method})"


def _frozen_params(params: Mapping[str, Any] | None) -> tuple[tuple[str, ParamValue], ...]:
    out = []
    for name, value in (params or {}).items():
        if not isinstance(name, str):
            raise InvalidMixture(f"fusion params must be plain JSON values (a name is {name!r})")
        frozen = tuple(value) if isinstance(value, list) else value
        for item in frozen if isinstance(frozen, tuple) else (frozen,):
            if item is not None and not isinstance(item, (str, int, float, bool)):
                raise InvalidMixture(f"fusion params must be plain JSON values ({name} is {type(item).__name__})")
            if isinstance(item, float) and not math.isfinite(item):
                raise InvalidMixture(f"fusion params must be plain JSON values ({name} is {item})")
        out.append((name, frozen))
    return tuple(sorted(out))
