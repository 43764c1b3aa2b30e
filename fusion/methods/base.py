"""What every fusion method provides, and the registry of methods by name.

A method combines the cores of N adapters on a group of L layers that share one basis
rank k. All tensors carry the layer batch first so one call fuses every layer at once:

    elementwise methods   combine(x (L, N, E), w (N,), p, ctx) -> (L, E)
                          E entries per core: k (diagonal cores) or k·k (dense cores);
                          they never mix entries, so diagonal cores stay diagonal
    matrix methods        combine(C (L, N, k, k), w (N,), p, ctx) -> (L, k, k)

A core that an adapter does not have on a layer is zero in the stack (``ctx.present``
says which are real). Parameters are a dataclass per method, declared once and parsed
from keyword arguments; an unknown or bad parameter is an ``InvalidConfig`` naming it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adapters_zoo.basis import Basis
from adapters_zoo.errors import InvalidConfig
from adapters_zoo.format import Adapter
from adapters_zoo.kinds.base import config_to_dict, parse_config


@dataclass
class NoParams:
    def validate(self) -> None:
        pass


@dataclass
class FusionContext:
    """What a method may look at beyond the stacked cores of one layer group."""

    layers: list[str]  # the L layer names, in stack order
    adapters: list[Adapter]  # the N sources, in stack order
    basis: Basis
    present: torch.Tensor  # (L, N) bool: adapter n has a core on layer l
    diagonal: bool  # elementwise methods get diagonals (E = k) instead of flat k×k cores
    notes: list[str] = field(default_factory=list)  # warnings that go into the fused adapter's meta

    @property
    def k(self) -> int:
        return self.basis[self.layers[0]].k


class FusionMethod(ABC):
    """One fusion method: its name, paper, parameters and the combine function."""

    name: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type] = NoParams
    elementwise: ClassVar[bool] = True  # works entry by entry (keeps diagonal cores diagonal)

    def params(self, raw: dict[str, Any]) -> Any:
        known = [f.name for f in dataclasses.fields(self.Params)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InvalidConfig(
                f"fusion method {self.name!r} has no parameter {', '.join(unknown)} "
                f"(its parameters: {', '.join(known) or 'none'})"
            )
        try:
            return parse_config(self.Params, raw)
        except InvalidConfig as err:
            raise InvalidConfig(f"fusion method {self.name!r}: {err}") from err

    def params_dict(self, p: Any) -> dict[str, Any]:
        return config_to_dict(p)

    @abstractmethod
    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: Any, ctx: FusionContext) -> torch.Tensor:
        """The fused cores of the group (see the module docstring for the shapes)."""


METHODS: dict[str, FusionMethod] = {}


def register(cls: type[FusionMethod]) -> type[FusionMethod]:
    if cls.name in METHODS:
        raise RuntimeError(f"fusion method {cls.name!r} registered twice")
    METHODS[cls.name] = cls()
    return cls


OFFLINE = {"distill": "`specfuse fuse MIXTURE --method distill --base MODEL_DIR --data ... --name N` "
                      "(fusion.distill.distill_fuse)"}  # methods that train, so need a model and data


def get_method(name: str) -> FusionMethod:
    try:
        return METHODS[name]
    except KeyError:
        if name in OFFLINE:
            raise InvalidConfig(f"fusion method {name!r} trains on prompts with the base model, so it runs offline: "
                                f"{OFFLINE[name]}, then use the fused adapter N by name") from None
        raise InvalidConfig(f"unknown fusion method {name!r} (known: {', '.join(METHODS)})") from None


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise InvalidConfig(f"density must be in (0, 1], got {density}")


def weighted(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """wₙ · xₙ for x (L, N, ...) and w (N,)."""
    return x * weights.view(1, -1, *([1] * (x.dim() - 2))).to(x)
