"""What every adapter kind provides, and the pieces they share.

A kind turns its native per-layer parameters into the two objects the rest of specfuse
works with:

    core(params, basis)      C (k, k)    ΔW_in_basis = U_k C V_kᵀ
    residual(params, basis)  (B, A)      ΔW_outside  = B A,  B (out, q), A (q, in)

so ``ΔW = U_k C V_kᵀ + B A`` for every kind. Both are differentiable functions of the
parameters: training backpropagates through them, fusion and serving evaluate them once.

Spectral kinds act on a contiguous slice ``[a, b)`` of the basis directions (default
``[0, rank)``): their trainable block is (b−a)×(b−a) and is embedded into the k×k core.
Adapters on disjoint slices never overlap in the basis, so they add without interference.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from adapters_zoo.basis import LayerBasis
from adapters_zoo.errors import AdapterFormatError, InvalidConfig

Params = dict[str, torch.Tensor]


@dataclass
class SpectralConfig:
    rank: int = 8  # number of top directions adapted (r ≤ k); ignored when slice is set
    slice: tuple[int, int] | None = None  # directions [a, b) instead of [0, rank)
    seed: int = 0

    def validate(self) -> None:
        if self.slice is not None:
            a, b = self.slice
            if not (0 <= a < b):
                raise InvalidConfig(f"slice must be A:B with 0 ≤ A < B, got {a}:{b}")
        elif self.rank < 1:
            raise InvalidConfig(f"rank must be ≥ 1, got {self.rank}")

    def directions(self, k: int) -> tuple[int, int]:
        """The slice [a, b) of this layer's k directions (clipped to k)."""
        a, b = self.slice if self.slice is not None else (0, self.rank)
        b = min(b, k)
        if a >= b:
            raise InvalidConfig(f"slice {a}:{b} is empty for a layer whose basis has k={k}")
        return a, b


def parse_config(cls: type, raw: dict[str, Any] | None) -> Any:
    """Build a config dataclass from a JSON-like dict, naming any bad field."""
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InvalidConfig(f"unknown {cls.__name__} field(s): {', '.join(unknown)} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(name, hints[name], value)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if isinstance(value, str) and ":" in value:
            value = value.split(":")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise InvalidConfig(f"{name} must be a pair A:B, got {value!r}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InvalidConfig(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InvalidConfig(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise InvalidConfig(f"{name} must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise InvalidConfig(f"{name} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise InvalidConfig(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise InvalidConfig(f"{name} must be finite, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise InvalidConfig(f"{name} must be a string, got {value!r}")
        return value
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def embed_block(block: torch.Tensor, a: int, k: int) -> torch.Tensor:
    """Place an r×r block at [a:a+r, a:a+r] of a zero k×k core (differentiable)."""
    r = block.shape[0]
    return F.pad(block, (a, k - a - r, a, k - a - r))


def layer_generator(seed: int, layer: str) -> torch.Generator:
    """A generator seeded by (seed, layer name): the same init on every machine."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.encode()))


def kaiming_uniform(shape: tuple[int, int], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    # PEFT's LoRA A init (kaiming_uniform with a=√5) has bound 1/√fan_in.
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class Kind(ABC):
    """One adapter kind: its config, parameters, core and residual."""

    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type] = SpectralConfig
    diagonal: ClassVar[bool] = False  # the core is always diagonal (elementwise fast path)
    has_core: ClassVar[bool] = True
    frozen: ClassVar[tuple[str, ...]] = ()  # stored but not trained (e.g. sparse indices)

    def config(self, raw: dict[str, Any] | None) -> Any:
        return parse_config(self.Config, raw)

    @abstractmethod
    def param_shapes(self, out_f: int, in_f: int, k: int, cfg: Any) -> dict[str, tuple[int, ...]]:
        """name -> shape of every stored tensor of one layer."""

    @abstractmethod
    def init_params(self, lb: LayerBasis, cfg: Any, layer: str) -> Params:
        """The layer's initial parameters: the identity (ΔW = 0) for every trainable kind."""

    def core(self, params: Params, lb: LayerBasis, cfg: Any) -> torch.Tensor | None:
        return None

    def residual(self, params: Params, lb: LayerBasis, cfg: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def count_params(self, out_f: int, in_f: int, k: int, cfg: Any) -> int:
        shapes = self.param_shapes(out_f, in_f, k, cfg)
        return sum(math.prod(s) for n, s in shapes.items() if n not in self.frozen)

    def check_params(self, params: Params, lb: LayerBasis, cfg: Any, layer: str) -> None:
        """Raise AdapterFormatError unless ``params`` have exactly the expected names and shapes."""
        expected = self.param_shapes(lb.out_features, lb.in_features, lb.k, cfg)
        _check_names(params, expected, layer)
        for name, shape in expected.items():
            if tuple(params[name].shape) != tuple(shape):
                raise AdapterFormatError(
                    f"layer {layer}: tensor {name} has shape {tuple(params[name].shape)}, expected {tuple(shape)}"
                )


def _check_names(params: Params, expected: dict, layer: str) -> None:
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise AdapterFormatError(f"layer {layer}: missing tensors {missing}, unexpected tensors {extra}")
