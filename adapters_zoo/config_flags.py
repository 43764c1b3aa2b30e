"""Command-line flags generated from a config dataclass, so every default is written once: in the field.

    steps: int = option(100, "optimizer steps", metavar="N")
    add_flags(parser.add_argument_group("training"), TrainConfig)   # --steps N  optimizer steps (default 100)
    cfg = from_args(TrainConfig, args, kind_config=kind_config)     # the flags, and what no flag gives

A field's flag is its name with dashes (``batch_size`` is ``--batch-size``); its type, default and
help come from the field. Metadata may add ``choices``, ``metavar``, ``flag`` (another name, or
None: no flag here, as when another group of options sets the field) and ``unit`` (the flag counts
in units of this many: ``mixture_cache_bytes`` as ``--mixture-cache-mb``). A bool field is a switch:
``--name`` when it defaults to False, ``--no-name`` when it defaults to True. With
``given_only=True`` every flag defaults to None, so a handler can tell which were given (the help
still shows the dataclass default). Nothing here imports torch, so ``specfuse --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from typing import Any

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def option(default: Any, help: str, **meta: Any) -> Any:
    """A config field with its flag's help (and any of ``flag``, ``unit``, ``choices``, ``metavar``)."""
    return field(default=default, metadata={"help": help, **meta})


def flag_of(f: Field) -> str | None:
    """The flag name of ``f`` without its dashes; None when the field has no flag here."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    return ("no-" if _inverted(f) else "") + f.name.replace("_", "-")


def add_flags(container: argparse.ArgumentParser | argparse._ArgumentGroup, config: type, *,
              given_only: bool = False) -> None:
    """One flag per field of ``config`` (a field whose ``flag`` is None gets none)."""
    for f in fields(config):
        flag = flag_of(f)
        if flag is None:
            continue
        unit = f.metadata.get("unit")
        default = f.default if f.default is not MISSING else None
        if unit is not None and default is not None:
            default = default / unit
        shown = "" if default is None or _type(f) is bool else f" (default {default:g})" \
            if isinstance(default, float) else f" (default {default})"
        common = {"dest": _dest(f), "help": f.metadata["help"] + shown}
        if _type(f) is bool:
            container.add_argument(f"--{flag}", action="store_true", default=None if given_only else False, **common)
            continue
        container.add_argument(f"--{flag}", type=float if unit is not None else _type(f),
                               default=None if given_only else default, choices=f.metadata.get("choices"),
                               metavar=f.metadata.get("metavar"), **common)


def values_from_args(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The fields of ``config`` the flags give (None: not given); a field without a flag is read by its name."""
    values = {}
    for f in fields(config):
        value = getattr(args, _dest(f), None)
        if value is None:
            continue
        unit = f.metadata.get("unit")
        if unit is not None:
            value = max(1, int(value * unit))
        values[f.name] = (not value) if _inverted(f) else value
    return values


def from_args(config: type, args: argparse.Namespace, **values: Any) -> Any:
    """``config`` of the flags in ``args``; ``values`` set what no flag gives."""
    return config(**{**values_from_args(args, config), **values})


def given_flags(args: argparse.Namespace, config: type) -> list[str]:
    """The flags of ``config`` given on the command line (added with ``given_only=True``)."""
    return [f"--{flag_of(f)}" for f in fields(config) if flag_of(f) is not None and getattr(args, _dest(f)) is not None]


def _dest(f: Field) -> str:
    return (flag_of(f) or f.name).replace("-", "_")


def _type(f: Field) -> type:
    return f.type if isinstance(f.type, type) else _TYPES.get(str(f.type).split(" |")[0], str)


def _inverted(f: Field) -> bool:
    """A switch that turns a True default off (``--no-eos`` for ``add_eos``)."""
    return _type(f) is bool and f.default is True
