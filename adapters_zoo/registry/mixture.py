"""Mixtures of adapters as users write them: ``math``, ``math@2``, ``math:0.7,code:0.3``.

    mixture  entry ("," entry)*        at most MAX_MIXTURE entries
    entry    ref [":" weight]          weight defaults to 1
    weight   decimal number            finite, |weight| ≤ MAX_WEIGHT, ≥ 0 unless allow_negative

A mixture is a list of (ref, weight) pairs in the order given; refs are checked as
names (``names.parse_ref``) but not looked up here: ``Registry.resolve_mixture`` does
that. Duplicated refs, NaN/inf, negative weights (unless allowed, for task-vector
subtraction) and all-zero mixtures are refused with InvalidMixture.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from adapters_zoo.errors import InvalidMixture, InvalidName
from adapters_zoo.registry.names import MAX_NAME_LEN, parse_ref

MAX_MIXTURE = 64
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
