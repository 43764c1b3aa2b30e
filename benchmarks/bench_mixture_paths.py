"""Two ways to serve a batch where every row is its own linear mixture, at the real base's shapes.

    packed  every row's mixture reduced once to one k×k core (``fusion.mixture.reduce`` on the
            adapters' packed cores) and written into one slot: the decode step gathers one
            core per row (diagonal: one elementwise scale)
    pairs   no reduction: the adapters sit in slots and every row carries its m (slot, weight)
            pairs; the step forms Σ wⱼ Cⱼ per row and layer (gather m cores, weighted sum)
            before the same shared shrink (x V_k) and expand (· U_kᵀ)

Timed per decode step of R rows (one token each) over every target layer of the model:
the base layers alone (x Wᵀ), and base + each path, interleaved repetition by repetition;
reported as the median ratio to base. Also: the slots each path needs for the batch, and
a new mixture's readiness (packed: ``reduce`` + one slot write; pairs: nothing to reduce,
but up to m adapters to place). Results: ``benchmarks/results/{base}/mixture_paths.{json,md,png}``.

    python benchmarks/bench_mixture_paths.py --base smollm2 --home /work/devhome   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_serving import FETCHED, basis_of, load_base, make_adapters, settings_for
from common import RESULTS, environment, environment_line, set_threads, write_results

from adapters_zoo.format import Adapter
from adapters_zoo.registry.mixture import Component, Mixture
from fusion.mixture import reduce

KINDS = {"scale": "diagonal", "rotation": "dense"}


def step_time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(basis, weights: dict[str, torch.Tensor], kind: str, n: int, m: int, rows: int, reps: int,
            seed: int) -> dict:
    rng = random.Random(seed)
    adapters = make_adapters(kind, basis, n, seed)

    def load(component: Component) -> Adapter:
        return adapters[int(component.ref)]

    names = basis.layer_names()
    mixtures = [[(j, rng.uniform(0.1, 1.0)) for j in rng.sample(range(n), m)] for _ in range(rows)]
    ready = []
    per_row: list = []
    for j in sorted({j for mix in mixtures for j, _ in mix}):
        reduce(Mixture.of([(str(j), 1.0)]), load, basis)  # evaluate and pack every adapter once: the mixtures
        # are new, the adapters are not
    for mix in mixtures:
        t = time.perf_counter()
        per_row.append(reduce(Mixture.of([(str(j), w) for j, w in mix]), load, basis))
        ready.append(time.perf_counter() - t)
    diagonal = KINDS[kind] == "diagonal"
    used = sorted({j for mix in mixtures for j, _ in mix})
    slot_of = {j: s for s, j in enumerate(used)}
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for name in names:
        lb = basis[name]
        packed = torch.stack([r.cores[name] for r in per_row])  # (rows, k, k): one slot per row
        own = torch.stack([adapters[j].core(name, basis).float() for j in used])  # (slots, k, k): one per adapter
        idx = torch.tensor([[slot_of[j] for j, _ in mix] for mix in mixtures])  # (rows, m)
        w = torch.tensor([[w for _, w in mix] for mix in mixtures])  # (rows, m)
        layers.append(dict(W=weights[name], Ut=lb.U.T.contiguous(), V=lb.V.contiguous(),
                           packed=packed.diagonal(dim1=-2, dim2=-1).contiguous() if diagonal else packed,
                           own=own.diagonal(dim1=-2, dim2=-1).contiguous() if diagonal else own, idx=idx, w=w,
                           x=torch.randn(rows, lb.V.shape[0], generator=gen)))
        cores = packed
        h = layers[-1]["x"] @ lb.V
        if diagonal:
            got = h * cores.diagonal(dim1=-2, dim2=-1)
            want = h * (w.unsqueeze(-1) * own.diagonal(dim1=-2, dim2=-1)[idx]).sum(1)
        else:
            got = torch.bmm(cores, h.unsqueeze(-1)).squeeze(-1)
            want = torch.bmm((w[..., None, None] * own[idx]).sum(1), h.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # both paths compute one product

    def base():
        for L in layers:
            L["x"] @ L["W"].T

    def with_packed():
        for L in layers:
            y = L["x"] @ L["W"].T
            h = L["x"] @ L["V"]
            h = h * L["packed"] if diagonal else torch.bmm(L["packed"], h.unsqueeze(-1)).squeeze(-1)
            y.addmm_(h, L["Ut"])

    def with_pairs():
        for L in layers:
            y = L["x"] @ L["W"].T
            h = L["x"] @ L["V"]
            core = (L["w"].unsqueeze(-1) * L["own"][L["idx"]]) if diagonal else (
                L["w"][..., None, None] * L["own"][L["idx"]])
            core = core.sum(1)  # (rows, k) or (rows, k, k): this row's mixture, every step
            h = h * core if diagonal else torch.bmm(core, h.unsqueeze(-1)).squeeze(-1)
            y.addmm_(h, L["Ut"])

    times = {"base": [], "packed": [], "pairs": []}
    for fn in (base, with_packed, with_pairs):
        fn()  # warm
    for _ in range(reps):  # interleaved: the load drifts
        for key, fn in (("base", base), ("packed", with_packed), ("pairs", with_pairs)):
            times[key] += step_time(fn, 1)
    ratios = {key: [t / b for t, b in zip(times[key], times["base"])] for key in ("packed", "pairs")}
    return {"kind": kind, "cores": KINDS[kind], "n": n, "m": m, "rows": rows, "reps": reps,
            "base_ms": round(1000 * statistics.median(times["base"]), 3),
            "packed_ratio": round(statistics.median(ratios["packed"]), 3),
            "pairs_ratio": round(statistics.median(ratios["pairs"]), 3),
            "packed_slots": rows, "pairs_slots": len(used),
            "packed_ready_ms_p50": round(1000 * statistics.median(ready), 3)}


def markdown(result: dict) -> str:
    out = ["# Packed cores vs per-row (slot, weight) pairs", "", f"`{result['command']}`", "",
           environment_line(result["environment"]), "",
           f"One decode step of {result['rows']} rows (one token each) over all {result['layers']} target layers of "
           f"`{result['base']}` (k = {result['k']}), median over {result['reps']} interleaved repetitions; ratio = "
           f"(base layers + adapter path) / base layers. Load average {result['load_average']}.", "",
           "| cores | N | m | base ms | packed × base | pairs × base | slots packed | slots pairs | "
           "packed ready p50 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        out.append(f"| {r['cores']} | {r['n']} | {r['m']} | {r['base_ms']:.2f} | {r['packed_ratio']:.3f} | "
                   f"{r['pairs_ratio']:.3f} | {r['packed_slots']} | {r['pairs_slots']} | "
                   f"{r['packed_ready_ms_p50']:.2f} |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], [r["packed_ratio"] for r in runs], 0.4, label="packed (one core per row)")
    ax.bar([x + 0.2 for x in xs], [r["pairs_ratio"] for r in runs], 0.4, label="pairs (m per row)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), [f"{r['cores']}\nN={r['n']} m={r['m']}" for r in runs], fontsize=7)
    ax.set_ylabel("decode step / base")
    ax.set_ylim(0.9, max(max(r["pairs_ratio"], r["packed_ratio"]) for r in runs) * 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2", choices=(*FETCHED, "tiny", "small"))
    p.add_argument("--home", default=None)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--counts", default="16,256")
    p.add_argument("--sizes", default="2,4,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    settings = settings_for(args.base, "cpu", False, args.threads)
    model, _, _, cache_key = load_base(settings, args.home)
    basis = basis_of(model, settings.k, cache_key)
    weights = {name: model.get_submodule(name).weight.detach().float() for name in basis.layer_names()}
    runs = []
    for kind in KINDS:
        for n in (int(x) for x in args.counts.split(",")):
            for m in (int(x) for x in args.sizes.split(",")):
                runs.append(measure(basis, weights, kind, n, m, args.rows, args.reps, seed=n * 10 + m))
                print(json.dumps(runs[-1]), flush=True)
    import os

    result = {"command": " ".join(["python benchmarks/bench_mixture_paths.py", *(sys.argv[1:] if argv is None
                                                                                   else argv)]),
              "environment": environment(), "base": args.base, "k": settings.k, "layers": len(basis.layers),
              "rows": args.rows, "reps": args.reps, "load_average": [round(x, 1) for x in os.getloadavg()],
              "runs": runs}
    out = Path(args.out_dir) if args.out_dir else RESULTS / args.base
    paths = write_results("mixture_paths", result, markdown(result), out=out)
    paths.append(plot(result, out / "mixture_paths.png"))
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
