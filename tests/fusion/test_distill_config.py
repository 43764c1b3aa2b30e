"""``specfuse fuse --method distill`` flags are DistillConfig's fields, with its defaults; none given
means none set (so other methods can refuse them)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from adapters_zoo.config_flags import flag_of, from_args, given_flags
from fusion.cli import register_cli
from fusion.distill_config import DistillConfig


def parse_fuse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["fuse", "a:0.5,b:0.5", "--name", "n", *argv])


def test_the_defaults_of_the_distill_flags_are_distill_config():
    args = parse_fuse()
    assert from_args(DistillConfig, args) == DistillConfig()
    assert given_flags(args, DistillConfig) == []


def test_every_distill_config_field_is_a_fuse_flag():
    assert [f.name for f in fields(DistillConfig) if flag_of(f) is None] == ["seed"]  # --seed, shared with dare_*
    values = {"steps": 7, "lr": 0.5, "batch_size": 3, "warmup_ratio": 0.25, "max_length": 64, "max_new_tokens": 5,
              "init": "ties", "seed": 9, "device": "cpu"}
    assert set(values) == {f.name for f in fields(DistillConfig)}
    argv = [arg for name, value in values.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    args = parse_fuse(*argv)
    assert from_args(DistillConfig, args) == DistillConfig(**values)
    assert given_flags(args, DistillConfig) == [f"--{flag_of(f)}" for f in fields(DistillConfig) if flag_of(f)]


def test_fuse_help_shows_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["fuse"].format_help()
    assert f"(default {DistillConfig.steps})" in help_text and f"(default {DistillConfig.init})" in help_text
