"""Spectral analysis of a weight change: what fine-tuning does in the base's SVD basis.

SpecLoRA (arXiv 2505.23099, https://arxiv.org/abs/2505.23099) reports that full
fine-tuning mostly amplifies the top singular values of each weight, reorients the top
singular vectors, and leaves the rest of the spectrum stable. This module measures that
for any pair of checkpoints of one architecture (or a base plus a spectral adapter):

    W = U Σ Vᵀ (base),  W' = U' Σ' V'ᵀ (tuned),  ΔW = W' − W

per linear layer:
- ``σ'ᵢ / σᵢ`` by index (top-k in full, the whole spectrum as a 10-bin profile);
- the share of ‖ΔW‖_F² inside the base's top-k directions: two-sided
  ‖U_kᵀ ΔW V_k‖² / ‖ΔW‖², left ‖U_kᵀ ΔW‖² / ‖ΔW‖², right ‖ΔW V_k‖² / ‖ΔW‖²,
  as curves over k, with the share a random ΔW would put there (k²/(out·in), k/out, k/in);
- principal angles between span(U_k) and span(U'_k) (and V), in degrees.

This module is the math: pure functions on tensors (:func:`analyze_pair`, :func:`analyze_delta`),
computed in float64, and :func:`summarize` across layers. :mod:`adapters_zoo.analysis_report`
streams checkpoints through it (``analyze``) and writes the report; ``specfuse analyze`` is in
:mod:`adapters_zoo.cli`.
"""

from __future__ import annotations

import math
import statistics

import torch

from adapters_zoo.errors import IncompatibleAdapter, InvalidConfig, ModelDirError

SHARE_THRESHOLDS = (0.5, 0.8, 0.9)
PROFILE_BINS = 10  # the whole spectrum, index-normalised, so layers of any size average
# A base σ below this fraction of σ_max is numerically zero: its ratio is undefined.
_RATIO_FLOOR = 1e-6


# ---------------------------------------------------------------- pure spectral math


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(A) and span(B), both orthonormal (n, k).

    cos θ from svd(AᵀB) loses precision near 0°, sin θ from svd(B − A AᵀB) near 90°;
    each angle is taken from whichever is accurate (Björck & Golub).
    """
    cos = torch.linalg.svdvals(A.T @ B).clamp(0.0, 1.0)  # (k,) descending -> θ ascending
    sin = torch.linalg.svdvals(B - A @ (A.T @ B)).clamp(0.0, 1.0).flip(0)  # ascending -> θ ascending
    theta = torch.where(sin**2 < 0.5, torch.arcsin(sin), torch.arccos(cos))
    return torch.rad2deg(theta)


def _first_k_reaching(curve: torch.Tensor, threshold: float) -> int | None:
    """Smallest k (1-based) with curve[k-1] ≥ threshold, None if never."""
    hits = (curve >= threshold - 1e-12).nonzero()
    return int(hits[0]) + 1 if len(hits) else None


def k_grid(k: int, rank: int) -> list[int]:
    """Powers of two up to rank, plus k and rank: where share curves are kept in the report."""
    grid = {rank, k}
    p = 1
    while p < rank:
        grid.add(p)
        p *= 2
    return sorted(grid)


def _ratio_profile(ratio: torch.Tensor) -> list[float | None]:
    """Mean σ'/σ over PROFILE_BINS equal slices of the spectrum index."""
    r = len(ratio)
    out = []
    for b in range(PROFILE_BINS):
        lo, hi = (b * r) // PROFILE_BINS, max(((b + 1) * r) // PROFILE_BINS, (b * r) // PROFILE_BINS + 1)
        out.append(_nanmean(ratio[lo:hi]))
    return out


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~x.isnan()]
    return float(x.mean()) if len(x) else None


def _floats(x: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in x.tolist()]


def analyze_delta(
    W_base: torch.Tensor,
    delta: torch.Tensor,
    top_k: int,
    *,
    base_svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Spectral comparison of ``W_base`` (out, in) with ``W_base + delta``; see the module doc.

    ``base_svd`` = (U, S, Vh) of W_base (reduced) saves recomputing it across calls.
    Returns plain Python numbers and lists (JSON-ready); shares are None when ΔW = 0.
    """
    if W_base.ndim != 2 or W_base.shape != delta.shape:
        raise IncompatibleAdapter(f"weight shape {tuple(W_base.shape)} and delta shape {tuple(delta.shape)} differ")
    if top_k < 1:
        raise InvalidConfig(f"top_k must be ≥ 1, got {top_k}")

    W = W_base.to(torch.float64)
    dW = delta.to(torch.float64)
    out_f, in_f = W.shape
    rank = min(out_f, in_f)
    k = min(top_k, rank)

    if base_svd is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, r), (r,), (r, in)
    else:
        U, S, Vh = (t.to(torch.float64) for t in base_svd)
    V = Vh.T  # (in, r)
    U2, S2, Vh2 = torch.linalg.svd(W + dW, full_matrices=False)
    V2 = Vh2.T

    # singular values, matched by index (both spectra sorted descending)
    floor = _RATIO_FLOOR * float(S[0]) if float(S[0]) > 0 else math.inf
    ratio = torch.where(S > floor, S2 / S.clamp_min(1e-300), torch.full_like(S, math.nan))  # (r,)
    top, tail = slice(0, k), slice(k, rank)

    def rel_change(sl: slice) -> float | None:
        base_norm = float(S[sl].norm())
        return float((S2[sl] - S[sl]).norm()) / base_norm if base_norm > 0 else None

    # where ΔW lives in the base's basis
    energy = float(dW.pow(2).sum())
    shares: dict = {"two_sided": None, "left": None, "right": None}
    curve: dict = {"k": k_grid(k, rank), "two_sided": None, "left": None, "right": None}
    nothing = {str(t): None for t in SHARE_THRESHOLDS}
    k_for, k_for_left, k_for_right, delta_rank_for = nothing, nothing, nothing, nothing
    delta_sigma = torch.linalg.svdvals(dW)  # (r,) ΔW's own spectrum
    if energy > 0:
        M = U.T @ dW @ V  # (r, r): ΔW in base coordinates
        two = M.pow(2).cumsum(0).cumsum(1).diagonal() / energy  # (r,) share of U_k..V_k, k = 1..r
        left = (U.T @ dW).pow(2).sum(1).cumsum(0) / energy  # (r,)
        right = (dW @ V).pow(2).sum(0).cumsum(0) / energy  # (r,)
        shares = {"two_sided": float(two[k - 1]), "left": float(left[k - 1]), "right": float(right[k - 1])}
        idx = [g - 1 for g in curve["k"]]
        curve.update(two_sided=_floats(two[idx]), left=_floats(left[idx]), right=_floats(right[idx]))
        own = delta_sigma.pow(2).cumsum(0) / energy  # ΔW's own best rank-k capture

        def k_reaching(curve: torch.Tensor) -> dict:
            return {str(t): _first_k_reaching(curve, t) for t in SHARE_THRESHOLDS}

        k_for, k_for_left, k_for_right, delta_rank_for = map(k_reaching, (two, left, right, own))

    # Wedin: the top-k subspaces move by at most ~‖ΔW‖₂ / gap. A ratio ≳ 1 means large angles
    # can come from mixing the k-th direction with near-equal neighbours, not a real reorientation.
    gap = float(S[k - 1] - S[k]) if k < rank else None
    delta_over_gap = None
    if gap is not None:
        delta_over_gap = float(delta_sigma[0]) / gap if gap > 0 else math.inf

    angles_u = principal_angles(U[:, :k], U2[:, :k])  # (k,)
    angles_v = principal_angles(V[:, :k], V2[:, :k])  # (k,)
    # per direction, by index: angle between u_i and u'_i (sign-free); ill-defined where σ_i ≈ σ_i±1
    vec_u = torch.rad2deg(torch.arccos((U[:, :k] * U2[:, :k]).sum(0).abs().clamp(max=1.0)))  # (k,)
    vec_v = torch.rad2deg(torch.arccos((V[:, :k] * V2[:, :k]).sum(0).abs().clamp(max=1.0)))  # (k,)

    fro_base = float(S.norm())
    return {
        "shape": [out_f, in_f],
        "rank": rank,
        "k": k,
        "fro_base": fro_base,
        "fro_delta": math.sqrt(energy),
        "rel_delta": math.sqrt(energy) / fro_base if fro_base > 0 else None,
        "sigma_base_topk": _floats(S[top]),
        "sigma_tuned_topk": _floats(S2[top]),
        "sigma_ratio_topk": _floats(ratio[top]),
        "sigma_ratio_profile": _ratio_profile(ratio),
        "sigma": {
            "top_ratio_mean": _nanmean(ratio[top]),
            "tail_ratio_mean": _nanmean(ratio[tail]),
            "top_amplified_frac": float((ratio[top] > 1).double().mean()),
            "top_rel_change": rel_change(top),  # ‖σ'_top − σ_top‖ / ‖σ_top‖
            "tail_rel_change": rel_change(tail),
        },
        "share": shares,
        "share_random": {"two_sided": k * k / (out_f * in_f), "left": k / out_f, "right": k / in_f},
        "share_curve": curve,
        "k_for_share": k_for,
        "k_for_share_left": k_for_left,
        "k_for_share_right": k_for_right,
        "delta_rank_for_share": delta_rank_for,
        "angles_left_deg": _floats(angles_u),
        "angles_right_deg": _floats(angles_v),
        "vector_angles_left_deg": _floats(vec_u),
        "vector_angles_right_deg": _floats(vec_v),
        "angles": {
            "left_max": float(angles_u.max()),
            "left_mean": float(angles_u.mean()),
            "right_max": float(angles_v.max()),
            "right_mean": float(angles_v.mean()),
            "left_vec_first": float(vec_u[0]),  # u_1 vs u'_1
            "right_vec_first": float(vec_v[0]),
        },
        "gap": {
            "rel": gap / float(S[k - 1]) if gap is not None and float(S[k - 1]) > 0 else None,  # (σ_k−σ_k+1)/σ_k
            "delta_over_gap": delta_over_gap,  # ‖ΔW‖₂ / (σ_k − σ_k+1)
        },
    }


def analyze_pair(W_base: torch.Tensor, W_tuned: torch.Tensor, top_k: int) -> dict:
    """Spectral comparison of a base weight and its fine-tuned version, both (out, in)."""
    if W_base.shape != W_tuned.shape:
        raise ModelDirError(f"base shape {tuple(W_base.shape)} != tuned shape {tuple(W_tuned.shape)}")
    return analyze_delta(W_base, W_tuned.double() - W_base.double(), top_k)


# ---------------------------------------------------------------- summary across layers

# (group, key) of every scalar summarised across layers, in report order
SUMMARY_METRICS: list[tuple[str, str]] = [
    ("", "rel_delta"),
    ("sigma", "top_ratio_mean"),
    ("sigma", "tail_ratio_mean"),
    ("sigma", "top_amplified_frac"),
    ("sigma", "top_rel_change"),
    ("sigma", "tail_rel_change"),
    ("share", "two_sided"),
    ("share", "left"),
    ("share", "right"),
    ("share_random", "two_sided"),
    ("k_for_share", "0.5"),
    ("k_for_share", "0.8"),
    ("k_for_share", "0.9"),
    ("k_for_share_left", "0.9"),
    ("k_for_share_right", "0.9"),
    ("delta_rank_for_share", "0.9"),
    ("angles", "left_max"),
    ("angles", "left_mean"),
    ("angles", "right_max"),
    ("angles", "right_mean"),
    ("angles", "left_vec_first"),
    ("angles", "right_vec_first"),
    ("gap", "rel"),
    ("gap", "delta_over_gap"),
]


def layer_metric(layer: dict, group: str, key: str):
    return layer[key] if not group else layer[group][key]


def metric_name(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def _stats(values: list) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {
        "mean": statistics.fmean(vals),
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def summarize(layers: dict[str, dict]) -> dict:
    """mean/median/min/max of every SUMMARY_METRICS scalar, over all layers and per module type."""

    def over(names: list[str]) -> dict:
        return {metric_name(g, k): _stats([layer_metric(layers[n], g, k) for n in names]) for g, k in SUMMARY_METRICS}

    by_type: dict[str, list[str]] = {}
    for name in layers:
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return {"all": over(list(layers)), "by_type": {t: over(names) for t, names in by_type.items()}}
