"""The adapter kinds, registered by name (the name string is the single source of truth)."""

from adapters_zoo.errors import UnknownKind
from adapters_zoo.kinds.additive import AdditiveKind
from adapters_zoo.kinds.base import Kind
from adapters_zoo.kinds.core import CoreKind
from adapters_zoo.kinds.lora import LoraKind
from adapters_zoo.kinds.rotation import RotationKind
from adapters_zoo.kinds.scale import ScaleKind
from adapters_zoo.kinds.svft import SvftKind

KINDS: dict[str, Kind] = {
    k.name: k for k in (ScaleKind(), SvftKind(), RotationKind(), AdditiveKind(), LoraKind(), CoreKind())
}
TRAINABLE_KINDS = ("scale", "svft", "rotation", "additive", "lora")


def get_kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKind(f"unknown adapter kind {name!r} (known: {', '.join(KINDS)})") from None


__all__ = ["KINDS", "TRAINABLE_KINDS", "Kind", "get_kind"]
