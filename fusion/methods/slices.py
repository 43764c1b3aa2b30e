"""``slices``: adapters on disjoint direction slices add without interference.

Paper: Spectral Adapter: Fine-Tuning in Spectral Space, https://arxiv.org/abs/2405.13952
(multi-adapter fusion by giving each adapter its own block of singular directions)

Each adapter occupies a set of the k basis directions on each layer: its declared slice
[a, b) for the spectral kinds (scale, svft, rotation, additive), the rows and columns its
core touches for an explicit ``core`` adapter, nothing for a plain ``lora``. When no
direction is occupied twice the weighted sum Σ wₙ Cₙ is exactly every adapter applied on
its own slice. Overlaps are refused (``on_overlap=error``, naming the layer and the
adapters) or reported in the fused adapter's meta and as a warning (``on_overlap=warn``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from adapters_zoo.errors import InvalidConfig, InvalidMixture
from fusion.methods.base import FusionContext, FusionMethod, register
from fusion.methods.linear import linear_sum

ON_OVERLAP = ("error", "warn")


@dataclass
class SlicesParams:
    on_overlap: str = "error"  # error | warn

    def validate(self) -> None:
        if self.on_overlap not in ON_OVERLAP:
            raise InvalidConfig(f"on_overlap must be one of {', '.join(ON_OVERLAP)}, got {self.on_overlap!r}")


def occupancy(cores: torch.Tensor, ctx: FusionContext) -> torch.Tensor:
    """(L, N, k) bool from entries (L, N, E): the directions each adapter occupies on each layer."""
    k = ctx.k
    if ctx.diagonal:
        support = cores != 0  # (L, N, k)
    else:
        touched = cores.reshape(*cores.shape[:2], k, k) != 0  # (L, N, k, k)
        support = touched.any(dim=-1) | touched.any(dim=-2)  # rows or columns touched
    occ = torch.zeros_like(support)
    for n, adapter in enumerate(ctx.adapters):
        if hasattr(adapter.cfg, "directions"):
            a, b = adapter.cfg.directions(k)
            occ[:, n, a:b] = True
        else:
            occ[:, n] = support[:, n]
    return occ & ctx.present.unsqueeze(-1)


def describe_overlap(occ: torch.Tensor, ctx: FusionContext) -> str:
    shared = occ.sum(dim=1) > 1  # (L, k)
    layer_i = int(shared.any(dim=1).nonzero()[0])
    directions = shared[layer_i].nonzero().flatten().tolist()
    who = occ[layer_i][:, directions].any(dim=1).nonzero().flatten().tolist()
    names = [str(ctx.adapters[n].meta.get("name", f"#{n}")) for n in who]
    return (
        f"adapters {', '.join(names)} overlap on layer {ctx.layers[layer_i]} "
        f"(directions {directions[0]}..{directions[-1]}, {len(directions)} shared)"
    )


@register
class Slices(FusionMethod):
    name = "slices"
    paper = "https://arxiv.org/abs/2405.13952"
    Params = SlicesParams

    def combine(self, cores: torch.Tensor, weights: torch.Tensor, p: SlicesParams, ctx: FusionContext):
        occ = occupancy(cores, ctx)
        if bool((occ.sum(dim=1) > 1).any()):
            message = describe_overlap(occ, ctx)
            if p.on_overlap == "error":
                raise InvalidMixture(f"slices: {message}; use disjoint --slice A:B or on_overlap=warn")
            warnings.warn(f"slices: {message}", stacklevel=2)
            ctx.notes.append(f"slices: {message}")
        return linear_sum(cores, weights)
