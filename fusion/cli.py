"""``specfuse fuse | merge | export-lora | import-lora``: fusion from the command line.

    specfuse fuse MIXTURE --method M [--density D --seed S --project --param K=V] (--name N | --out FILE)
    specfuse fuse MIXTURE --method distill --base MODEL_DIR --data A.jsonl --data B.jsonl ... (--name N | --out FILE)
    specfuse merge MODEL_DIR MIXTURE --out DIR          dense merged model, transformers layout
    specfuse export-lora MIXTURE --out DIR              PEFT LoRA dir (PEFT and vLLM load it)
    specfuse import-lora PEFT_DIR --base MODEL_DIR --name N [--project]

MIXTURE (``name``, ``name@version``, ``a:0.7,b:0.3``) is resolved through the registry
(``--home``, else ``$SPECFUSE_HOME``, else ``~/.specfuse``), which also holds the basis.
Fused and imported adapters go into the registry with their provenance in ``meta``.
torch is imported inside handlers only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapters_zoo import config_flags
from adapters_zoo.cli import print_json
from fusion.distill_config import DistillConfig


def register_cli(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=None, metavar="DIR",
                        help="registry home (default: $SPECFUSE_HOME, else ~/.specfuse)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")

    method = argparse.ArgumentParser(add_help=False)
    m = method.add_argument_group("fusion method")
    m.add_argument("--method", default="linear", metavar="M",
                   help="linear, ties, dare_linear, dare_ties, magnitude_prune, iso_c, tsv, geodesic, slices; "
                        "distill (fuse only: needs --base and --data)")
    m.add_argument("--density", type=float, default=None, metavar="D", help="ties, dare_*, magnitude_prune")
    m.add_argument("--seed", type=int, default=None, metavar="S", help="dare_*")
    m.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="any other method parameter, e.g. scale=0.8, on_overlap=warn (repeatable)")
    m.add_argument("--project", action="store_true",
                   help="project residuals (LoRA terms) into the basis instead of concatenating them")

    record = argparse.ArgumentParser(add_help=False)
    r = record.add_argument_group("registry record")
    r.add_argument("--version", default=None, metavar="V")
    r.add_argument("--tag", action="append", default=[], metavar="T", help="repeatable")
    r.add_argument("--description", default="", metavar="D")

    p = subparsers.add_parser("fuse", parents=[method, record, common], help="fuse a mixture into one adapter",
                              description="Fusion on k×k cores in the shared basis; no dense matrices.")
    p.add_argument("mixture", metavar="MIXTURE", help="name, name@version, or a:0.7,b:0.3")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--name", default=None, metavar="N", help="store the fused adapter in the registry as N")
    dest.add_argument("--out", default=None, metavar="FILE", help="write the fused adapter to FILE")
    d = p.add_argument_group("distill (--method distill: one k×k core per layer trained to match every source)")
    d.add_argument("--base", default=None, metavar="MODEL_DIR", help="the base model the adapters belong to")
    d.add_argument("--data", action="append", default=[], metavar="JSONL",
                   help="prompts of one source, in mixture order (repeat once per source); lines "
                        "{\"prompt\"} (the source completes them) or {\"prompt\", \"completion\"}")
    config_flags.add_flags(d, DistillConfig, given_only=True)  # None when not given: not for other methods
    p.set_defaults(func=cmd_fuse)

    p = subparsers.add_parser("merge", parents=[method, common], help="write a dense model with a mixture merged in",
                              description="Streams shard by shard; output loads with AutoModelForCausalLM.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("mixture", metavar="MIXTURE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("export-lora", parents=[method, common], help="write a mixture as a PEFT LoRA directory",
                              description="B = U_k C, A = V_kᵀ (rank ≤ k, + residual rank), lora_alpha = r.")
    p.add_argument("mixture", metavar="MIXTURE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--base-model", default=None, metavar="NAME", help="base_model_name_or_path in adapter_config.json")
    p.add_argument("--ranks", default="pad", choices=["pad", "pattern"],
                   help="layers of different rank: zero-pad to one r (vLLM), or PEFT rank_pattern")
    p.set_defaults(func=cmd_export_lora)

    p = subparsers.add_parser("import-lora", parents=[record, common], help="import a PEFT LoRA into the registry",
                              description="Reads adapter_model.safetensors only (never a pickled .bin).")
    p.add_argument("peft_dir", metavar="PEFT_DIR")
    p.add_argument("--base", required=True, metavar="MODEL_DIR", help="the base model the LoRA was trained on")
    p.add_argument("--name", required=True, metavar="N")
    p.add_argument("--project", action="store_true", help="project into the basis (kind core), report energy lost")
    p.set_defaults(func=cmd_import_lora)


def method_params(args) -> dict[str, Any]:
    """--density/--seed when given, and every --param K=V (V read as JSON when it parses)."""
    from adapters_zoo.errors import InvalidConfig

    params: dict[str, Any] = {}
    if args.density is not None:
        params["density"] = args.density
    if args.seed is not None:
        params["seed"] = args.seed
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidConfig(f"--param takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def _registry(args):
    from adapters_zoo.registry import Registry

    return Registry(args.home)


def fused_mixture(reg, args):
    """(fused adapter, its basis, [(ref, weight)]) of args.mixture under args' method."""
    from fusion.mixture import fuse_mixture

    return fuse_mixture(reg, args.mixture, args.method, method_params(args), args.project)


def _summary(adapter, mixture: list[tuple[str, float]]) -> dict[str, Any]:
    info = adapter.meta.get("fusion", {})
    return {
        "kind": adapter.kind, "diagonal": adapter.config.get("diagonal"), "layers": len(adapter.layers),
        "num_params": adapter.num_params(), "method": info.get("method"), "params": info.get("params"),
        "mixture": [{"ref": ref, "weight": w} for ref, w in mixture], "notes": info.get("notes", []),
        "projection": adapter.meta.get("projection"),
    }


def distilled_mixture(reg, args):
    """(fused adapter, basis, [(ref, weight)]) of args.mixture by ``fusion.distill`` on args.data."""
    from adapters_zoo.data import load_examples
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.models import load_model_dir
    from adapters_zoo.registry.mixture import resolve
    from fusion.distill import distill_fuse

    if args.base is None or not args.data:
        raise InvalidConfig("--method distill needs --base MODEL_DIR and one --data JSONL per source")
    if args.density is not None or args.param or args.project:
        raise InvalidConfig("--method distill takes no --density, --param or --project (see the distill options)")
    resolved = resolve(reg, args.mixture).given  # in mixture order, as the --data files are
    if len(args.data) != len(resolved):
        raise InvalidConfig(f"the mixture has {len(resolved)} sources but {len(args.data)} --data files "
                            "were given: one per source, in mixture order")
    data = [load_examples(path, need_completion=False) for path in args.data]  # every file checked first
    cfg = config_flags.from_args(DistillConfig, args)
    cfg.validate()
    basis = reg.basis(resolved[0].record.base_fingerprint)
    adapters = [reg.load_record(c.record) for c in resolved]
    model, tokenizer = load_model_dir(args.base, cfg.device)
    fused, _ = distill_fuse(model, tokenizer, basis.to(next(model.parameters()).device), adapters,
                            [c.weight for c in resolved], data, cfg, progress=not args.json)
    for source, c, path in zip(fused.meta["fusion"]["sources"], resolved, args.data):
        source["name"], source["data"] = c.ref, str(path)
    fused.meta["fusion"]["mixture"] = args.mixture
    return fused, basis, [(c.ref, c.weight) for c in resolved]


def cmd_fuse(args) -> int:
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.format import save_adapter

    if args.method != "distill":
        given = (["--base"] if args.base is not None else []) + config_flags.given_flags(args, DistillConfig) + \
            (["--data"] if args.data else [])
        if given:
            raise InvalidConfig(f"{', '.join(given)}: only for --method distill")
    with _registry(args) as reg:
        fused, _, mixture = (distilled_mixture if args.method == "distill" else fused_mixture)(reg, args)
        fused.meta["name"] = args.name or Path(args.out).stem
        summary = _summary(fused, mixture)
        if args.name:
            rec = reg.add(fused, args.name, args.version, args.tag, description=args.description
                          or f"{args.method} fusion of {args.mixture}")
            summary |= {"ref": rec.ref, "sha256": rec.sha256, "size": rec.size}
        else:
            summary["path"] = str(save_adapter(fused, args.out))
    if args.json:
        print_json(summary)
    else:
        where = summary.get("ref") or summary["path"]
        print(f"fused {len(mixture)} adapters ({args.method}) into {where}: {summary['layers']} layers, "
              f"{summary['num_params']} params" + (", diagonal" if summary["diagonal"] else ""))
        _print_notes(summary)
    return 0


def _print_notes(summary: dict[str, Any]) -> None:
    for note in summary["notes"]:
        print(f"note: {note}")
    if summary.get("projection"):
        print(f"projection: {100 * summary['projection']['energy_lost']:.2f}% of the residual energy lost")


def cmd_merge(args) -> int:
    from fusion.merge import merge_model_dir

    with _registry(args) as reg:
        fused, basis, mixture = fused_mixture(reg, args)
    out = merge_model_dir(args.model_dir, fused, basis, args.out, progress=not args.json, overwrite=args.overwrite)
    summary = _summary(fused, mixture) | {"out": str(out), "base_model": args.model_dir}
    if args.json:
        print_json(summary)
    else:
        print(f"merged {args.mixture} into {summary['layers']} layers of {args.model_dir} -> {out}")
        _print_notes(summary)
    return 0


def cmd_export_lora(args) -> int:
    from fusion.lora_io import export_peft_lora

    with _registry(args) as reg:
        fused, basis, mixture = fused_mixture(reg, args)
    export = export_peft_lora(fused, basis, args.out, args.base_model, ranks=args.ranks)
    summary = _summary(fused, mixture) | {
        "out": str(export.path), "r": export.r, "max_layer_rank": max(export.ranks.values()),
        "target_modules": export.target_modules, "fan_in_fan_out": export.fan_in_fan_out,
        "rank_pattern": export.rank_pattern,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"exported {args.mixture} as a PEFT LoRA of r={export.r} on {', '.join(export.target_modules)} "
              f"-> {export.path}")
        _print_notes(summary)
    return 0


def cmd_import_lora(args) -> int:
    from adapters_zoo.registry import basis_for_model
    from fusion.lora_io import import_peft_lora

    with _registry(args) as reg:
        basis = basis_for_model(reg, args.base)
        adapter = import_peft_lora(args.peft_dir, basis, project=args.project)
        adapter.meta["name"] = args.name
        adapter.meta["base_model"] = str(args.base)
        rec = reg.add(adapter, args.name, args.version, args.tag,
                      description=args.description or f"PEFT LoRA imported from {args.peft_dir}")
    summary = {
        "ref": rec.ref, "kind": adapter.kind, "layers": len(adapter.layers), "num_params": adapter.num_params(),
        "sha256": rec.sha256, "projection": adapter.meta.get("projection"),
    }
    if args.json:
        print_json(summary)
    else:
        print(f"imported {args.peft_dir} as {rec.ref} ({adapter.kind}, {summary['layers']} layers)")
        if summary["projection"]:
            print(f"projection: {100 * summary['projection']['energy_lost']:.2f}% of the LoRA's energy lost")
    return 0
