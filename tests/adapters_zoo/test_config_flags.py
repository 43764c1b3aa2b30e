"""Flags are generated from config dataclasses: every TrainConfig field is a ``specfuse train`` flag
with the field's default, and a flag given on the command line reaches the config."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import pytest

from adapters_zoo.cli import register_cli
from adapters_zoo.config_flags import add_flags, flag_of, from_args, given_flags, option
from adapters_zoo.train_config import TrainConfig


def parse_train(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["train", "MODEL", "--data", "d.jsonl", "--out", "a.safetensors", "--kind", "scale",
                              *argv])


def changed_value(f) -> tuple[list[str], object]:
    """(argv that sets field f to something other than its default, that value)."""
    flag = f"--{flag_of(f)}"
    if f.type == "bool":
        return [flag], not f.default
    if f.metadata.get("choices"):
        return [flag, f.metadata["choices"][-1]], f.metadata["choices"][-1]
    if f.type == "int":
        return [flag, str(f.default + 3)], f.default + 3
    if f.type == "float":
        return [flag, str(f.default / 2 + 0.25)], f.default / 2 + 0.25
    return [flag, "bf16" if f.name == "precision" else "x.jsonl"], "bf16" if f.name == "precision" else "x.jsonl"


def test_the_defaults_of_the_train_flags_are_train_config():
    assert from_args(TrainConfig, parse_train()) == TrainConfig()


def test_every_train_config_field_is_a_train_flag():
    without_flag = {f.name for f in fields(TrainConfig) if flag_of(f) is None}
    assert without_flag == {"kind", "kind_config"}  # --kind and the kind options (--rank, --pattern, ...)
    argv, expected = [], {}
    for f in fields(TrainConfig):
        if flag_of(f) is not None:
            flag_argv, expected[f.name] = changed_value(f)
            argv += flag_argv
    cfg = from_args(TrainConfig, parse_train(*argv), kind_config={"rank": 4})
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert (cfg.kind, cfg.kind_config) == ("scale", {"rank": 4})
    assert from_args(TrainConfig, parse_train("--no-eos", "--lr", "0.5")) == TrainConfig(add_eos=False, lr=0.5)


@dataclass
class Toy:
    size_bytes: int = option(2 << 20, "bytes", flag="size-mb", unit=1 << 20)
    on: bool = option(True, "turn off")
    name: str | None = option(None, "a name", choices=["a", "b"])


def test_switches_units_and_given_only():
    parser = argparse.ArgumentParser()
    add_flags(parser, Toy)
    assert from_args(Toy, parser.parse_args([])) == Toy()
    assert from_args(Toy, parser.parse_args(["--size-mb", "0.5", "--no-on", "--name", "b"])) == \
        Toy(size_bytes=1 << 19, on=False, name="b")
    assert "(default 2.0)" in parser.format_help() or "(default 2)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "c"])
    given = argparse.ArgumentParser()
    add_flags(given, Toy, given_only=True)
    assert given_flags(given.parse_args([]), Toy) == [] and from_args(Toy, given.parse_args([])) == Toy()
    assert given_flags(given.parse_args(["--no-on", "--size-mb", "1"]), Toy) == ["--size-mb", "--no-on"]
