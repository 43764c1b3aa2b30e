"""``svft``: a sparse trainable core on the singular vectors (SVFT).

Paper: SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors, https://arxiv.org/abs/2405.19597
``W' = U (Σ + M) Vᵀ`` with ``M`` sparse on a fixed pattern over the r×r block of
directions [a, b); here ``core = sigmoid(g) · M``.

Patterns (n = r directions, d off-diagonals):
  plain    the diagonal                                  n values
  banded   |i − j| ≤ d                                   n(2d+1) − d(d+1) values
  random   the diagonal plus the same number of off-diagonal positions as banded,
           drawn without replacement from a generator seeded by (seed, layer)
  topk     the diagonal plus the off-diagonal (i, j) with the largest |⟨uᵢ, vⱼ⟩| (vectors
           truncated to min(out, in) coordinates when the layer is not square), same count

Choices where the paper is silent or differs: SVFT's reference code starts M at a small
random value; here M starts at exactly 0 so an untrained adapter is the base model
(gradients still reach M because the gate multiplies it). The gate ``g`` is one scalar
per layer starting at 0 (sigmoid = 0.5). Parameter counts reported by ``count_params``
include the gate; the paper's figures (e.g. Gemma-2B plain = 193,536) exclude it and are
reproduced with ``gate=False``. Indices are stored in the file beside the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_zoo.basis import LayerBasis
from adapters_zoo.errors import AdapterFormatError, InvalidConfig
from adapters_zoo.kinds.base import Kind, Params, SpectralConfig, embed_block, layer_generator

PATTERNS = ("plain", "banded", "random", "topk")


@dataclass
class SvftConfig(SpectralConfig):
    rank: int = 10**9  # SVFT adapts every direction of the basis (use with k = full)
    pattern: str = "plain"
    d: int = 0  # off-diagonals (banded), or the matching count (random, topk)
    gate: bool = True

    def validate(self) -> None:
        super().validate()
        if self.pattern not in PATTERNS:
            raise InvalidConfig(f"svft pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.d < 0:
            raise InvalidConfig(f"d must be ≥ 0, got {self.d}")


def pattern_size(n: int, d: int, pattern: str) -> int:
    if pattern == "plain":
        return n
    d = min(d, n - 1)
    return n * (2 * d + 1) - d * (d + 1)


def pattern_indices(n: int, cfg: SvftConfig, lb: LayerBasis | None, layer: str) -> torch.Tensor:
    """(nnz, 2) int64 positions of the trainable entries in the n×n block."""
    diag = torch.arange(n)
    diag_idx = torch.stack([diag, diag], dim=1)
    if cfg.pattern == "plain" or cfg.d == 0:
        return diag_idx
    if cfg.pattern == "banded":
        i, j = torch.meshgrid(diag, diag, indexing="ij")
        mask = (i - j).abs() <= cfg.d
        return torch.stack([i[mask], j[mask]], dim=1)
    extra = pattern_size(n, cfg.d, "banded") - n
    off = ~torch.eye(n, dtype=torch.bool)
    off_pos = off.nonzero()  # (n² − n, 2), row-major
    if cfg.pattern == "random":
        choice = torch.randperm(off_pos.shape[0], generator=layer_generator(cfg.seed, layer))[:extra]
    else:  # topk
        if lb is None:
            raise InvalidConfig("the topk pattern needs the basis to choose its positions")
        a, b = cfg.directions(lb.k)
        m = min(lb.out_features, lb.in_features)
        score = (lb.U[:m, a:b].T @ lb.V[:m, a:b]).abs()  # (n, n)
        choice = score[off].argsort(descending=True, stable=True)[:extra]
    picked = off_pos[choice.sort().values]
    idx = torch.cat([diag_idx, picked])
    order = (idx[:, 0] * n + idx[:, 1]).argsort()
    return idx[order]


class SvftKind(Kind):
    name = "svft"
    paper = "https://arxiv.org/abs/2405.19597"
    Config = SvftConfig
    frozen = ("idx",)

    def param_shapes(self, out_f, in_f, k, cfg: SvftConfig):
        a, b = cfg.directions(k)
        nnz = pattern_size(b - a, cfg.d, cfg.pattern)
        shapes = {"M": (nnz,), "idx": (nnz, 2)}
        if cfg.gate:
            shapes["gate"] = (1,)
        return shapes

    def init_params(self, lb: LayerBasis, cfg: SvftConfig, layer: str) -> Params:
        a, b = cfg.directions(lb.k)
        idx = pattern_indices(b - a, cfg, lb, layer)
        params = {"M": torch.zeros(idx.shape[0]), "idx": idx}
        if cfg.gate:
            params["gate"] = torch.zeros(1)
        return params

    def core(self, params: Params, lb: LayerBasis, cfg: SvftConfig) -> torch.Tensor:
        a, b = cfg.directions(lb.k)
        n = b - a
        idx = params["idx"].long()
        values = params["M"]
        if cfg.gate:
            values = values * torch.sigmoid(params["gate"])
        flat = torch.zeros(n * n, dtype=values.dtype, device=values.device)
        flat = flat.index_put((idx[:, 0] * n + idx[:, 1],), values)
        return embed_block(flat.view(n, n), a, lb.k)

    def check_params(self, params: Params, lb: LayerBasis, cfg: SvftConfig, layer: str) -> None:
        super().check_params(params, lb, cfg, layer)
        a, b = cfg.directions(lb.k)
        idx = params["idx"]
        if idx.dtype not in (torch.int64, torch.int32):
            raise AdapterFormatError(f"layer {layer}: idx must be an integer tensor, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= b - a):
            raise AdapterFormatError(f"layer {layer}: idx has positions outside the {b - a}×{b - a} block")
        flat = idx[:, 0].long() * (b - a) + idx[:, 1].long()
        if flat.unique().numel() != flat.numel():
            raise AdapterFormatError(f"layer {layer}: idx has repeated positions")

    def count_params(self, out_f, in_f, k, cfg: SvftConfig) -> int:
        a, b = cfg.directions(k)
        return pattern_size(b - a, cfg.d, cfg.pattern) + (1 if cfg.gate else 0)
