"""The pieces TIES, DARE and magnitude pruning share: trim, drop, elect a sign, disjoint mean.

All act on stacked core entries ``x (L, N, E)``: L layers, N adapters, E entries per core.
"""

from __future__ import annotations

import math

import torch

from adapters_zoo.errors import InvalidConfig

SIGN_METHODS = ("total", "frequency")


def check_majority_sign(method: str) -> None:
    if method not in SIGN_METHODS:
        raise InvalidConfig(f"majority_sign must be one of {', '.join(SIGN_METHODS)}, got {method!r}")


def magnitude_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, per (layer, adapter), the ``density`` fraction of its nonzero entries largest in |x|.

    The fraction is of each core's own nonzero entries (its parameters), not of all k·k
    positions: a diagonal or banded core is trimmed as densely as a dense one. Entries tied
    with the threshold are kept.
    """
    if density >= 1.0:
        return x
    mag = x.abs()  # (L, N, E)
    nnz = (mag > 0).sum(dim=-1)  # (L, N)
    keep = torch.ceil(torch.round(nnz.to(torch.float64) * density, decimals=6)).long().clamp(min=1)
    E = x.shape[-1]
    if bool((keep == keep.flatten()[0]).all()):  # the usual case: one count for every core, no sort
        threshold = mag.kthvalue(E - int(keep.flatten()[0]) + 1, dim=-1, keepdim=True).values  # (L, N, 1)
    else:
        ordered = mag.sort(dim=-1, descending=True).values  # (L, N, E)
        threshold = ordered.gather(-1, (keep - 1).clamp(max=E - 1).unsqueeze(-1))  # (L, N, 1)
    return torch.where((mag >= threshold) & (mag > 0), x, torch.zeros_like(x))


def random_drop(x: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability p = 1 − density, rescale survivors by 1/(1 − p)."""
    if density >= 1.0:
        return x
    keep = torch.rand(x.shape, generator=generator, dtype=torch.float64) < density  # drawn on CPU: seeded anywhere
    return torch.where(keep.to(x.device), x / density, torch.zeros_like(x))


def elect_sign(x: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election over adapters: (L, N, E) -> (L, E) of ±1 (ties go to +1).

    ``total`` elects the sign of the summed mass Σₙ xₙ; ``frequency`` the sign most adapters have.
    """
    if method == "total":
        mass = x.sum(dim=1)
    else:
        check_majority_sign(method)
        mass = x.sign().sum(dim=1)
    return torch.where(mass >= 0, 1.0, -1.0).to(x)


def disjoint_mean(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: per entry, the mean over the adapters whose entry has the elected sign."""
    agree = x.sign() == sign.unsqueeze(1)  # (L, N, E); zero entries never agree
    total = (x * agree).sum(dim=1)  # (L, E)
    count = agree.sum(dim=1).clamp(min=1)  # (L, E)
    return total / count


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63))


def ceil_fraction(n: int, fraction: float) -> int:
    return max(1, math.ceil(round(n * fraction, 6)))
