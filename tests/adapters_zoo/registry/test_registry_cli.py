"""``specfuse registry …`` through the real entry point (serving.cli.main)."""

from __future__ import annotations

import json
import os

import pytest
from registry_fixtures import TARGETS, K

from adapters_zoo.basis import save_basis
from adapters_zoo.registry import Registry
from serving.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_show_rm_gc_round_trip(capsys, registry, adapter_files):
    home = registry.home
    code, out, _ = _run(capsys, "registry", "add", adapter_files["math"], "--name", "math", "--tag", "skill",
                        "--tag", "arith", "--metrics", '{"acc": 0.75}', "--description", "adds", "--home", home,
                        "--json")
    assert code == 0
    rec = json.loads(out)
    assert (rec["ref"], rec["kind"], rec["tags"], rec["metrics"], rec["basis_k"]) == (
        "math@1", "scale", ["arith", "skill"], {"acc": 0.75}, K
    )
    code, out, _ = _run(capsys, "registry", "add", adapter_files["code"], "--name", "code", "--version", "v1",
                        "--home", home)
    assert code == 0 and out.startswith("added code@v1 (svft")

    code, out, _ = _run(capsys, "registry", "list", "--home", home, "--json")
    assert [r["ref"] for r in json.loads(out)] == ["code@v1", "math@1"]
    code, out, _ = _run(capsys, "registry", "list", "--tag", "skill", "--home", home)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["REF", "KIND", "K"] and len(lines) == 2 and lines[1].startswith("math@1")
    code, out, _ = _run(capsys, "registry", "list", "--kind", "lora", "--home", home)
    assert out.strip() == "no adapters"

    code, out, _ = _run(capsys, "registry", "show", "math", "--home", home)
    assert code == 0 and "ref:              math@1" in out and '"acc": 0.75' in out
    code, out, _ = _run(capsys, "registry", "show", "code@v1", "--home", home, "--json")
    assert json.loads(out)["kind"] == "svft"

    code, out, _ = _run(capsys, "registry", "bases", "--home", home, "--json")
    assert [(b["k"], b["adapters"]) for b in json.loads(out)] == [(K, 2)]

    code, out, _ = _run(capsys, "registry", "rm", "math", "--home", home, "--json")
    assert code == 0 and [r["ref"] for r in json.loads(out)] == ["math@1"]
    code, out, _ = _run(capsys, "registry", "gc", "--home", home, "--json")
    assert code == 0 and json.loads(out) == {"removed": 1}
    code, out, _ = _run(capsys, "registry", "verify", "--home", home)
    assert code == 0 and out.startswith("ok: 1 adapter version(s)")


def test_verify_exits_non_zero_on_a_tampered_blob(capsys, registry, adapter_files):
    rec = registry.add(adapter_files["math"], "math")
    blob = registry.store.path(rec.sha256)
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x7f")
    code, out, _ = _run(capsys, "registry", "verify", "--home", registry.home)
    assert code == 1 and out.startswith("PROBLEM math@1: blob") and "altered" in out
    code, out, _ = _run(capsys, "registry", "verify", "--home", registry.home, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and len(report["problems"]) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["registry", "show", "mth"], "did you mean: math"),
        (["registry", "rm", "math@9"], "has no version '9'"),
        (["registry", "show", "../etc"], "looks like a path"),
        (["registry", "add", "missing.safetensors", "--name", "x"], "adapter file not found"),
        (["registry", "add", "FILE", "--name", "x", "--metrics", "{not json"], "--metrics is not valid JSON"),
        (["registry", "add", "FILE", "--name", "x", "--version", ""], "version must not be empty"),
        (["registry", "add", "OTHER", "--name", "x"], "specfuse basis MODEL_DIR --rank 4 --home"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, registry, adapter_files, argv, needle):
    registry.add(adapter_files["math"], "math")
    argv = [{"FILE": adapter_files["math"], "OTHER": adapter_files["other_base"]}.get(a, a) for a in argv]
    code, out, err = _run(capsys, *argv, "--home", registry.home)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("specfuse registry: error: ") and needle in err


def test_home_from_the_environment(capsys, monkeypatch, tmp_path, basis, adapter_files):
    basis_file = save_basis(basis, tmp_path / "basis.safetensors")
    monkeypatch.setenv("SPECFUSE_HOME", str(tmp_path / "env-home"))
    code, out, _ = _run(capsys, "registry", "add-basis", basis_file)
    assert code == 0 and out.startswith(f"declared base {basis.fingerprint} (k={K}")
    assert _run(capsys, "registry", "add", adapter_files["lora"], "--name", "lora")[0] == 0
    with Registry(tmp_path / "env-home") as reg:
        assert [r.ref for r in reg.list()] == ["lora@1"]


def test_the_basis_command_named_in_the_error_declares_the_base(capsys, model_dirs, adapter_files, tmp_path):
    home = tmp_path / "home"
    code, _, err = _run(capsys, "registry", "add", adapter_files["math"], "--name", "math", "--home", home)
    assert code == 2 and "specfuse basis MODEL_DIR" in err
    code, _, _ = _run(capsys, "basis", model_dirs[0], "--rank", K, "--targets", TARGETS, "--out",
                      tmp_path / "basis.safetensors", "--home", home)
    assert code == 0
    code, out, _ = _run(capsys, "registry", "add", adapter_files["math"], "--name", "math", "--home", home)
    assert code == 0 and out.startswith("added math@1")
