"""Server settings are written once: every config field is a serve flag with the field's default."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from serving.config import SECTIONS, EngineConfig, Limits, SchedulerConfig, ServerSettings
from serving.serve_cli import register_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["serve", "MODEL", *argv])


def test_defaults_of_the_flags_are_the_dataclasses():
    settings = ServerSettings.from_args(parse(), Path("MODEL"), None)
    assert (settings.engine, settings.scheduler, settings.limits) == (EngineConfig(), SchedulerConfig(), Limits())


def test_every_field_is_a_flag():
    argv, expected = [], {}
    for cls in SECTIONS.values():
        for i, f in enumerate(fields(cls)):
            flag = f.metadata.get("flag", f.name.replace("_", "-"))
            choices = f.metadata.get("choices")
            value = choices[-1] if choices else 3 + i
            argv += [f"--{flag}", str(value)]
            expected[f.name] = value * f.metadata.get("unit", 1) if not choices else value
    settings = ServerSettings.from_args(parse(*argv), Path("MODEL"), None)
    got = {f.name: getattr(getattr(settings, section), f.name) for section, cls in SECTIONS.items()
           for f in fields(cls)}
    assert got == expected
    assert ServerSettings(Path("m"), slots=5, max_batch=2, max_mixture=3).engine.slots == 5
    with pytest.raises(TypeError, match="no setting 'slot'"):
        ServerSettings(Path("m"), slot=5)


def test_serve_help_does_not_import_torch():
    code = ("import sys\nfrom serving.cli import build_parser\nbuild_parser()\n"
            "assert 'torch' not in sys.modules, 'the command line imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
