"""Checkpoints in, report out: the IO around the spectral math of :mod:`adapters_zoo.analysis`.

:func:`analyze` streams two checkpoints (or a base and a spectral adapter) one layer at a
time (memory: two matrices and their SVDs); :func:`write_report` writes report.json,
report.md and PNG plots. Plots use matplotlib's Agg backend (no display), imported only
when a report is written; each shows the mean over layers with the 10–90% band across layers.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from adapters_zoo.analysis import PROFILE_BINS, analyze_delta, k_grid, layer_metric, summarize
from adapters_zoo.checkpoint import Checkpoint, LayerSpec, parse_targets
from adapters_zoo.errors import BasisMismatch, IncompatibleAdapter, InvalidConfig, ModelDirError

# ---------------------------------------------------------------- checkpoints in


def _check_finite(w: torch.Tensor, where: str) -> torch.Tensor:
    if not w.isfinite().all():
        raise IncompatibleAdapter(f"{where}: adapter delta has NaN or infinite values")
    return w


def _matching_layers(base: Checkpoint, tuned: Checkpoint, targets) -> list[LayerSpec]:
    """The base's target layers, after checking the tuned checkpoint has the same ones, same shapes."""
    base_specs = base.linear_layers(targets)
    tuned_specs = {s.name: s for s in tuned.linear_layers(targets)}
    for spec in base_specs:
        other = tuned_specs.pop(spec.name, None)
        if other is None:
            raise ModelDirError(f"{tuned.dir}: no layer {spec.name} (architectures differ from {base.dir})")
        if (other.out_features, other.in_features) != (spec.out_features, spec.in_features):
            raise ModelDirError(
                f"{spec.name}: shape ({spec.out_features}, {spec.in_features}) in {base.dir} "
                f"but ({other.out_features}, {other.in_features}) in {tuned.dir}"
            )
    if tuned_specs:
        extra = next(iter(tuned_specs))
        raise ModelDirError(f"{base.dir}: no layer {extra} (architectures differ from {tuned.dir})")
    return base_specs


def _adapter_deltas(base: Checkpoint, adapter_file: str | Path, basis_file: str | Path | None, targets):
    """(layer specs, delta_of(spec, W_base)) for base + a spectral adapter trained in ``basis_file``."""
    # Imported here: the adapter format pulls in kinds/, which comparing two checkpoints never needs.
    from adapters_zoo.basis import load_basis
    from adapters_zoo.format import load_adapter

    if basis_file is None:
        raise IncompatibleAdapter(f"{adapter_file}: --adapter needs the basis it was trained in (--basis FILE)")
    basis = load_basis(basis_file)
    adapter = load_adapter(adapter_file, basis)  # checks fingerprint, k and layers against the basis
    all_specs = {s.name: s for s in base.linear_layers(None)}
    missing = [n for n in adapter.layers if n not in all_specs]
    if missing:
        raise IncompatibleAdapter(f"{adapter_file}: layer {missing[0]} is not a linear layer of {base.dir}")
    wanted = {s.name for s in base.linear_layers(targets)} if targets else set(all_specs)
    specs = [all_specs[n] for n in adapter.layers if n in wanted]
    if not specs:
        raise IncompatibleAdapter(f"{adapter_file}: no adapter layer matches targets {targets}")

    def delta_of(spec: LayerSpec, W: torch.Tensor) -> torch.Tensor:  # W: (out, in) of the base
        lb = basis[spec.name]
        if (lb.out_features, lb.in_features) != (spec.out_features, spec.in_features):
            raise BasisMismatch(
                f"{spec.name}: basis shape ({lb.out_features}, {lb.in_features}) != "
                f"({spec.out_features}, {spec.in_features}) in {base.dir}"
            )
        # The basis must be this base's SVD: W V_k = U_k diag(S_k), up to float32 storage.
        residual = float((W @ lb.V - lb.U * lb.S).norm())
        if residual > 1e-2 * float(lb.S.norm()):
            raise BasisMismatch(f"{spec.name}: {basis_file} is not the SVD of this layer in {base.dir}")
        return _check_finite(adapter.delta(spec.name, basis), f"{adapter_file}: {spec.name}")

    return specs, delta_of


def analyze(
    base_dir: str | Path,
    tuned_dir: str | Path | None = None,
    *,
    adapter_file: str | Path | None = None,
    basis_file: str | Path | None = None,
    top_k: int = 32,
    targets: str | list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Compare a base checkpoint with a tuned one (or with base + adapter), layer by layer.

    Exactly one of ``tuned_dir`` / ``adapter_file`` is given. Returns
    ``{"meta": ..., "layers": {name: analyze_delta(...)}, "summary": summarize(...)}``.
    Raises ModelDirError (unreadable or mismatched checkpoints) or IncompatibleAdapter.
    """
    if (tuned_dir is None) == (adapter_file is None):
        raise InvalidConfig("analyze: give exactly one of tuned_dir and adapter_file")
    if top_k < 1:
        raise InvalidConfig(f"top_k must be ≥ 1, got {top_k}")
    base = Checkpoint(base_dir)
    if tuned_dir is not None:
        tuned = Checkpoint(tuned_dir)
        specs = _matching_layers(base, tuned, targets)

        def delta_of(spec: LayerSpec, W: torch.Tensor) -> torch.Tensor:
            return tuned.weight(spec).double() - W.double()  # weight() checks shape and finiteness
    else:
        specs, delta_of = _adapter_deltas(base, adapter_file, basis_file, targets)

    layers: dict[str, dict] = {}
    for spec in _progress(specs, progress, "analyze"):
        W = base.weight(spec)  # (out, in) float32, shape and finiteness checked by the reader
        layers[spec.name] = analyze_delta(W, delta_of(spec, W), top_k)

    meta = {
        "base_dir": str(base_dir),
        "tuned_dir": None if tuned_dir is None else str(tuned_dir),
        "adapter_file": None if adapter_file is None else str(adapter_file),
        "basis_file": None if basis_file is None else str(basis_file),
        "top_k": top_k,
        "targets": parse_targets(targets),
        "n_layers": len(layers),
        "paper": "https://arxiv.org/abs/2505.23099",
    }
    return {"meta": meta, "layers": layers, "summary": summarize(layers)}


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="layer")


# ---------------------------------------------------------------- report out


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1):
        return str(int(v))
    return f"{v:.{digits}g}"


def findings(result: dict) -> list[str]:
    """Plain-language lines on the paper's three claims, from the summary means."""
    s = result["summary"]["all"]

    def mean(name: str):
        return s[name]["mean"] if s.get(name) else None

    k = result["meta"]["top_k"]
    top, tail = mean("sigma.top_ratio_mean"), mean("sigma.tail_ratio_mean")
    top_rc, tail_rc = mean("sigma.top_rel_change"), mean("sigma.tail_rel_change")
    share, rand = mean("share.two_sided"), mean("share_random.two_sided")
    lines = [
        f"Top-{k} singular values: mean ratio tuned/base {_fmt(top)} "
        f"({_fmt(mean('sigma.top_amplified_frac'))} of them grew); rest of the spectrum {_fmt(tail)}. "
        f"Relative change of σ: top {_fmt(top_rc)}, rest {_fmt(tail_rc)}.",
        f"Share of ‖ΔW‖² in the base's top-{k} directions: two-sided {_fmt(share)} "
        f"(a random ΔW: {_fmt(rand)}), left {_fmt(mean('share.left'))}, right {_fmt(mean('share.right'))}.",
        f"Two-sided share reaches 50% / 80% / 90% at median k = "
        f"{_fmt(_median(s, 'k_for_share.0.5'))} / {_fmt(_median(s, 'k_for_share.0.8'))} / "
        f"{_fmt(_median(s, 'k_for_share.0.9'))} (one-sided 90%: left {_fmt(_median(s, 'k_for_share_left.0.9'))}, "
        f"right {_fmt(_median(s, 'k_for_share_right.0.9'))}); ΔW's own rank for 90% of its energy: "
        f"median {_fmt(_median(s, 'delta_rank_for_share.0.9'))}.",
        f"Principal angles of the top-{k} subspaces: left mean {_fmt(mean('angles.left_mean'))}°, "
        f"max {_fmt(s['angles.left_max']['max'] if s.get('angles.left_max') else None)}°; right mean "
        f"{_fmt(mean('angles.right_mean'))}°, max "
        f"{_fmt(s['angles.right_max']['max'] if s.get('angles.right_max') else None)}°. "
        f"Median ‖ΔW‖₂ / (σ_k − σ_k+1) = {_fmt(_median(s, 'gap.delta_over_gap'))} "
        "(≳ 1: the k-th direction can trade places with its neighbours, so the last angles are large "
        "whatever the change does to the leading directions).",
    ]
    return lines


def _median(summary: dict, name: str):
    return summary[name]["median"] if summary.get(name) else None


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# columns of the per-type and per-layer tables: metric names of analysis.SUMMARY_METRICS
_COLUMNS = [
    "rel_delta", "sigma.top_ratio_mean", "sigma.tail_ratio_mean", "share.two_sided", "share.left",
    "share.right", "k_for_share.0.9", "angles.left_mean", "angles.right_mean", "gap.delta_over_gap",
]  # fmt: skip


def _markdown(result: dict, plots: list[str]) -> str:
    meta, layers, summary = result["meta"], result["layers"], result["summary"]
    other = meta["tuned_dir"] or f"{meta['base_dir']} + adapter {meta['adapter_file']}"
    out = [
        "# Spectral analysis",
        "",
        f"Base `{meta['base_dir']}` vs tuned `{other}`; {meta['n_layers']} layers, top_k = {meta['top_k']}, "
        f"targets {','.join(meta['targets'])}. Claims tested: SpecLoRA, {meta['paper']}.",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in findings(result)],
        "",
        "## Summary over layers",
        "",
    ]
    stats = ("mean", "median", "min", "max")
    out += markdown_table(
        ["metric", *stats], [[name] + [_fmt(st[s]) for s in stats] for name, st in summary["all"].items() if st]
    )
    out += ["", "## By module type (means)", ""]
    out += markdown_table(
        ["type", *_COLUMNS],
        [[t] + [_fmt(st[c]["mean"] if st[c] else None) for c in _COLUMNS] for t, st in summary["by_type"].items()],
    )
    out += ["", "## Per layer", ""]
    rows = []
    for name, lay in layers.items():
        cells = [_fmt(layer_metric(lay, *(c.split(".", 1) if "." in c else ("", c)))) for c in _COLUMNS]
        rows.append([name, f"{lay['shape'][0]}×{lay['shape'][1]}", *cells])
    out += markdown_table(["layer", "shape", *_COLUMNS], rows)
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += [
        "Definitions: ratio = σ_tuned[i] / σ_base[i] by index; shares are fractions of ‖ΔW‖_F² "
        "(two-sided ‖U_kᵀΔWV_k‖², left ‖U_kᵀΔW‖², right ‖ΔWV_k‖²); k_for_share.t = smallest k whose "
        "two-sided share ≥ t (k_for_share_left/right: one-sided); delta_rank_for_share.0.9 = rank ΔW itself "
        "needs for 90% of its energy; angles = principal angles between the base and tuned top-k singular "
        "subspaces; gap.rel = (σ_k − σ_k+1)/σ_k of the base; gap.delta_over_gap = ‖ΔW‖₂ / (σ_k − σ_k+1), "
        "Wedin's bound on how far the top-k subspaces can move, up to a constant.",
        "",
    ]
    return "\n".join(out)


def _padded(rows: list[list], width: int) -> torch.Tensor:
    """Rows of unequal length (None = missing) -> (n, width) float tensor padded with NaN."""
    t = torch.full((len(rows), width), math.nan, dtype=torch.float64)
    for i, row in enumerate(rows):
        vals = [math.nan if v is None else v for v in row[:width]]
        t[i, : len(vals)] = torch.tensor(vals, dtype=torch.float64)
    return t


def _band(ax, x, rows: torch.Tensor, label: str, color: str) -> None:
    """Mean line with the 10–90% band across layers (NaNs ignored)."""
    mean = torch.nanmean(rows, 0)
    lo, hi = torch.nanquantile(rows, 0.1, 0), torch.nanquantile(rows, 0.9, 0)
    ax.plot(x, mean.numpy(), color=color, label=label)
    ax.fill_between(x, lo.numpy(), hi.numpy(), color=color, alpha=0.2)


def _plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(result["layers"].values())
    if not layers:
        return []
    k = max(lay["k"] for lay in layers)
    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # 1. σ ratio by index in the top-k, and over the whole spectrum
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = list(range(1, k + 1))
    _band(a1, x, _padded([lay["sigma_ratio_topk"] for lay in layers], k), "mean over layers", "C0")
    a1.axhline(1.0, color="grey", lw=0.8, ls="--")
    a1.set(xlabel="singular value index i", ylabel="σ_tuned[i] / σ_base[i]", title=f"top-{k} singular values")
    a1.legend()
    xb = [(b + 0.5) / PROFILE_BINS for b in range(PROFILE_BINS)]
    _band(
        a2,
        xb,
        _padded([lay["sigma_ratio_profile"] for lay in layers], PROFILE_BINS),
        "mean over layers",
        "C1",
    )
    a2.axhline(1.0, color="grey", lw=0.8, ls="--")
    a2.set(xlabel="position in spectrum (i / rank)", ylabel="mean σ ratio in bin", title="whole spectrum")
    save(fig, "sigma_ratio.png")

    # 2. share of ‖ΔW‖² vs k, against a random ΔW
    with_delta = [lay for lay in layers if lay["share_curve"]["two_sided"] is not None]
    if with_delta:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        rank = max(lay["rank"] for lay in with_delta)
        grid = k_grid(k, rank)
        for key, color in (("two_sided", "C0"), ("left", "C1"), ("right", "C2")):
            rows = [_on_grid(lay["share_curve"]["k"], lay["share_curve"][key], grid) for lay in with_delta]
            _band(ax, grid, _padded(rows, len(grid)), key, color)
        rand = [
            statistics.fmean(min(g, lay["rank"]) ** 2 / (lay["shape"][0] * lay["shape"][1]) for lay in with_delta)
            for g in grid
        ]
        ax.plot(grid, rand, color="grey", ls="--", label="two-sided, random ΔW")
        ax.axvline(k, color="grey", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            xlabel="k (base top-k directions)",
            ylabel="share of ‖ΔW‖²",
            ylim=(0, 1.02),
            title="where the change lives in the base basis",
        )
        ax.legend()
        save(fig, "energy_share.png")

    # 3. principal angles by index
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _band(ax, x, _padded([lay["angles_left_deg"] for lay in layers], k), "left (U)", "C0")
    _band(ax, x, _padded([lay["angles_right_deg"] for lay in layers], k), "right (V)", "C2")
    for key, color in (("vector_angles_left_deg", "C0"), ("vector_angles_right_deg", "C2")):
        rows = _padded([lay[key] for lay in layers], k)
        side = "u_i vs u'_i" if "left" in key else "v_i vs v'_i"
        ax.plot(x, torch.nanmean(rows, 0).numpy(), ":", color=color, label=f"{side}, by index")
    ax.set(
        xlabel="principal angle (ascending) / singular index",
        ylabel="degrees",
        title=f"base vs tuned top-{k} subspaces",
    )
    ax.legend()
    save(fig, "principal_angles.png")

    # 4. per layer: share and mean angle
    names = list(result["layers"])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(7, 0.22 * len(names)), 6), sharex=True)
    pos = list(range(len(names)))
    a1.bar(pos, [lay["share"]["two_sided"] or 0 for lay in layers], color="C0", label="two-sided")
    a1.plot(pos, [lay["share"]["left"] or 0 for lay in layers], "o", ms=3, color="C1", label="left")
    a1.plot(pos, [lay["share"]["right"] or 0 for lay in layers], "o", ms=3, color="C2", label="right")
    a1.set(ylabel=f"share of ‖ΔW‖² in top-{k}", ylim=(0, 1.02))
    a1.legend(fontsize=7)
    a2.bar(pos, [lay["angles"]["left_mean"] for lay in layers], width=0.4, color="C0", label="left")
    a2.bar(
        [p + 0.4 for p in pos],
        [lay["angles"]["right_mean"] for lay in layers],
        width=0.4,
        color="C2",
        label="right",
    )
    a2.set(ylabel="mean principal angle (°)")
    a2.set_xticks(pos, names, rotation=90, fontsize=6)
    a2.legend(fontsize=7)
    save(fig, "per_layer.png")

    # 5. the most changed layer's two spectra
    name, lay = max(result["layers"].items(), key=lambda kv: kv[1]["rel_delta"] or 0)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x[: lay["k"]], lay["sigma_base_topk"], "o-", ms=3, label="base")
    ax.plot(x[: lay["k"]], lay["sigma_tuned_topk"], "o-", ms=3, label="tuned")
    ax.set(xlabel="index", ylabel="σ", title=f"{name} (largest ‖ΔW‖/‖W‖)")
    ax.legend()
    save(fig, "top_layer_spectrum.png")
    return written


def _on_grid(ks: list[int], values: list, grid: list[int]) -> list:
    """A layer's share curve (kept at its own grid) read at ``grid``; beyond its rank it stays flat."""
    table = dict(zip(ks, values))
    out, last = [], None
    for g in grid:
        if g in table:
            last = table[g]
            out.append(last)
        elif g > ks[-1]:
            out.append(last)
        else:
            out.append(None)
    return out


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots into ``out_dir``; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(result, out)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(_markdown(result, plots))
    return {name: out / name for name in ["report.json", "report.md", *plots]}
