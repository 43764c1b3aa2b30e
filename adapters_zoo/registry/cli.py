"""``specfuse registry``: add, list, show, rm, verify, gc, bases, add-basis, sign.

Every subcommand takes ``--home DIR`` (else ``$SPECFUSE_HOME``, else ``~/.specfuse``) and
``--json``. Exit codes: 0 done, 1 ``verify`` found problems, 2 an error (one line on
stderr, printed by ``serving.cli``). torch is imported inside handlers only.
"""

from __future__ import annotations

import argparse
import json

from adapters_zoo.cli import print_json


def register_cli(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", default=None, metavar="DIR", help="registry home (default: $SPECFUSE_HOME, else ~/.specfuse)"
    )
    common.add_argument("--json", action="store_true", help="print the result as JSON")

    p = subparsers.add_parser(
        "registry", help="store, list and check named, versioned adapters",
        description="The adapter registry: a catalog of name@version records over content-addressed blobs.",
    )
    sub = p.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    sub.required = True

    add = sub.add_parser("add", parents=[common], help="validate an adapter file and store it as NAME@VERSION")
    add.add_argument("file", metavar="FILE", help="adapter .safetensors file")
    add.add_argument("--name", required=True, metavar="N")
    add.add_argument("--version", default=None, metavar="V", help="default: one more than the last number used")
    add.add_argument("--tag", action="append", default=[], metavar="T", help="repeatable")
    add.add_argument("--description", default="", metavar="D")
    add.add_argument("--metrics", default=None, metavar="JSON", help='a JSON object, e.g. \'{"acc": 0.93}\'')
    add.set_defaults(func=cmd_add)

    ls = sub.add_parser("list", parents=[common], help="list adapter versions")
    ls.add_argument("--kind", default=None, metavar="K")
    ls.add_argument("--tag", default=None, metavar="T")
    ls.add_argument("--base", default=None, metavar="FP", help="base model fingerprint")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", parents=[common], help="one record (NAME is its latest version)")
    show.add_argument("ref", metavar="N[@V]")
    show.set_defaults(func=cmd_show)

    rm = sub.add_parser("rm", parents=[common], help="remove N@V, or every version of N (blobs go at gc)")
    rm.add_argument("ref", metavar="N[@V]")
    rm.set_defaults(func=cmd_rm)

    verify = sub.add_parser("verify", parents=[common], help="re-hash every blob; exit 1 on any problem")
    verify.set_defaults(func=cmd_verify)

    gc = sub.add_parser("gc", parents=[common], help="delete blobs no record uses, and dead writers' temp files")
    gc.set_defaults(func=cmd_gc)

    bases = sub.add_parser("bases", parents=[common], help="list the declared bases (one basis per base model)")
    bases.set_defaults(func=cmd_bases)

    add_basis = sub.add_parser("add-basis", parents=[common], help="declare a base from a basis.safetensors file")
    add_basis.add_argument("file", metavar="BASIS_FILE")
    add_basis.set_defaults(func=cmd_add_basis)

    sign = sub.add_parser("sign", parents=[common], help="compute an adapter's routing signature from sample "
                          "prompts (stored as a new version)")
    sign.add_argument("ref", metavar="N[@V]")
    sign.add_argument("--data", required=True, metavar="SAMPLE.jsonl", help='JSON Lines with a "prompt" per line')
    sign.add_argument("--model", required=True, metavar="MODEL_DIR", help="the base model the adapter was trained on")
    sign.set_defaults(func=cmd_sign)


def _open(args):
    from adapters_zoo.registry import Registry

    return Registry(args.home)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_add(args) -> int:
    from adapters_zoo.errors import InvalidConfig

    metrics = None
    if args.metrics is not None:
        try:
            metrics = json.loads(args.metrics)
        except json.JSONDecodeError as err:
            raise InvalidConfig(f"--metrics is not valid JSON ({err})") from err
    with _open(args) as reg:
        rec = reg.add(args.file, args.name, args.version, args.tag, metrics, args.description)
    if args.json:
        print_json(rec.to_json())
    else:
        print(f"added {rec.ref} ({rec.kind}, {rec.num_params} params, {_size(rec.size)}, sha256 {rec.sha256[:12]})")
    return 0


def cmd_list(args) -> int:
    with _open(args) as reg:
        records = reg.list(kind=args.kind, tag=args.tag, base=args.base)
    if args.json:
        print_json([r.to_json() for r in records])
    elif not records:
        print("no adapters")
    else:
        rows = [
            [r.ref, r.kind, str(r.basis_k), str(r.num_params), _size(r.size), ",".join(r.tags), r.base_fingerprint[:12],
             r.created[:19]]
            for r in records
        ]
        _table(rows, ["REF", "KIND", "K", "PARAMS", "SIZE", "TAGS", "BASE", "CREATED"])
    return 0


def cmd_show(args) -> int:
    with _open(args) as reg:
        rec = reg.get(args.ref)
    if args.json:
        print_json(rec.to_json())
    else:
        for key, value in rec.to_json().items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            print(f"{key + ':':<18}{value}")
    return 0


def cmd_rm(args) -> int:
    with _open(args) as reg:
        removed = reg.remove(args.ref)
    if args.json:
        print_json([r.to_json() for r in removed])
    else:
        for r in removed:
            print(f"removed {r.ref}")
        print("(their blobs are deleted by `specfuse registry gc` once nothing else uses them)")
    return 0


def cmd_verify(args) -> int:
    with _open(args) as reg:
        problems = reg.verify()
        n_adapters, n_bases = len(reg.list()), len(reg.bases())
        unreferenced = len(reg.unreferenced())
    if args.json:
        print_json({"ok": not problems, "problems": problems, "adapters": n_adapters, "bases": n_bases,
                     "unreferenced_blobs": unreferenced})
    else:
        for line in problems:
            print(f"PROBLEM {line}")
        status = f"{len(problems)} problem(s)" if problems else "ok"
        print(f"{status}: {n_adapters} adapter version(s), {n_bases} basis/bases checked"
              + (f"; {unreferenced} unreferenced blob(s), run gc" if unreferenced else ""))
    return 1 if problems else 0


def cmd_gc(args) -> int:
    with _open(args) as reg:
        removed = reg.gc()
    if args.json:
        print_json({"removed": removed})
    else:
        print(f"removed {removed} unreferenced blob(s)")
    return 0


def cmd_bases(args) -> int:
    with _open(args) as reg:
        bases = reg.bases()
    if args.json:
        print_json(bases)
    elif not bases:
        print("no declared bases (add one with `specfuse basis MODEL_DIR --rank K --home DIR`)")
    else:
        rows = [[b["fingerprint"], str(b["k"]), str(b["num_layers"]), _size(b["size"]), str(b["adapters"]),
                 b["created"][:19]] for b in bases]
        _table(rows, ["FINGERPRINT", "K", "LAYERS", "SIZE", "ADAPTERS", "CREATED"])
    return 0


def cmd_add_basis(args) -> int:
    from adapters_zoo.basis import load_basis

    basis = load_basis(args.file)
    with _open(args) as reg:
        fp = reg.add_basis(basis)
        row = next(b for b in reg.bases() if b["fingerprint"] == fp)
    if args.json:
        print_json(row)
    else:
        print(f"declared base {fp} (k={row['k']}, {row['num_layers']} layers)")
    return 0


def cmd_sign(args) -> int:
    from adapters_zoo.data import load_examples
    from adapters_zoo.models import load_model_dir
    from adapters_zoo.registry.sign import sign_adapter
    from adapters_zoo.signatures import SIGNATURE_PROMPTS

    prompts = [ex["prompt"] for ex in load_examples(args.data, need_completion=False)]
    model, tokenizer = load_model_dir(args.model, device="cpu")
    with _open(args) as reg:
        rec = sign_adapter(reg, args.ref, model, tokenizer, prompts, source=args.data)
    if args.json:
        print_json(rec.to_json())
    else:
        print(f"signed {rec.ref}: signature of {min(len(prompts), SIGNATURE_PROMPTS)} prompt(s) from {args.data}")
    return 0
