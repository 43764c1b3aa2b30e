"""``specfuse fuse | merge | export-lora | import-lora`` through the real entry point and a real registry."""

from __future__ import annotations

import json

import pytest
import torch
from fusion_helpers import LORA_CONFIG, load_model, logits, make_peft_lora, moved, peft_delta
from peft import PeftModel

from adapters_zoo.format import load_adapter
from adapters_zoo.inject import attach
from adapters_zoo.registry import Registry
from fusion.fuse import fuse
from serving.cli import main


@pytest.fixture
def home(tmp_path, llama_basis):
    home = tmp_path / "home"
    with Registry(home) as reg:
        reg.add_basis(llama_basis)
        reg.add(moved("scale", {"rank": 8, "lora_rank": 2}, llama_basis, 1), "math")
        reg.add(moved("rotation", {"rank": 4}, llama_basis, 2), "code")
        reg.add(moved("svft", {"pattern": "banded", "d": 1}, llama_basis, 3), "style")
    return home


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fuse_into_the_registry_with_provenance(home, llama_basis, capsys):
    code, out, _ = run(capsys, "fuse", "math:0.7,code:0.3", "--method", "ties", "--density", "0.5",
                       "--name", "mix", "--home", home, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["ref"] == "mix@1" and summary["method"] == "ties" and summary["params"]["density"] == 0.5
    assert summary["mixture"] == [{"ref": "math@1", "weight": 0.7}, {"ref": "code@1", "weight": 0.3}]
    with Registry(home) as reg:
        stored = reg.load("mix")
        expected = fuse([reg.load("math"), reg.load("code")], [0.7, 0.3], llama_basis, "ties", density=0.5)
    assert [s["name"] for s in stored.meta["fusion"]["sources"]] == ["math@1", "code@1"]
    assert stored.meta["fusion"]["mixture"] == "math:0.7,code:0.3"
    for layer in llama_basis.layer_names():
        torch.testing.assert_close(stored.delta(layer, llama_basis), expected.delta(layer, llama_basis))


def test_fuse_to_a_file_with_extra_params(home, llama_basis, tmp_path, capsys):
    out_file = tmp_path / "mix.safetensors"
    code, out, _ = run(capsys, "fuse", "math,style:0.5", "--method", "iso_c", "--param", "scale=0.8",
                       "--param", "norm=frobenius", "--project", "--out", out_file, "--home", home)
    assert code == 0 and "fused 2 adapters (iso_c)" in out and "residual energy lost" in out
    adapter = load_adapter(out_file, llama_basis)
    assert adapter.meta["fusion"]["params"] == {"scale": 0.8, "norm": "frobenius"}
    assert 0 < adapter.meta["projection"]["energy_lost"] <= 1


def test_merge_writes_a_model_transformers_loads(home, llama_basis, tiny_llama_dir, tmp_path, ids, capsys):
    code, out, _ = run(capsys, "merge", tiny_llama_dir, "math:0.5,code", "--out", tmp_path / "merged",
                       "--home", home, "--json")
    assert code == 0 and json.loads(out)["out"] == str(tmp_path / "merged")
    with Registry(home) as reg:
        fused = fuse([reg.load("math"), reg.load("code")], [0.5, 1.0], llama_basis)
    model = load_model(tiny_llama_dir)
    attach(model, fused, llama_basis)
    torch.testing.assert_close(logits(load_model(tmp_path / "merged"), ids), logits(model, ids),
                               atol=5e-4, rtol=1e-4)


def test_export_lora_loads_in_peft(home, llama_basis, tiny_llama_dir, tmp_path, ids, capsys):
    code, out, _ = run(capsys, "export-lora", "math:0.5,code:0.5,style", "--out", tmp_path / "lora",
                       "--base-model", "tiny", "--home", home, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["r"] >= 1 and summary["fan_in_fan_out"] is False
    with Registry(home) as reg:
        fused = fuse([reg.load(n) for n in ("math", "code", "style")], [0.5, 0.5, 1.0], llama_basis)
    ours = load_model(tiny_llama_dir)
    attach(ours, fused, llama_basis)
    theirs = PeftModel.from_pretrained(load_model(tiny_llama_dir), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=5e-4, rtol=1e-4)


def test_import_lora_finds_the_basis_of_the_model_dir(home, llama_basis, tiny_llama_dir, tmp_path, capsys):
    original = make_peft_lora(tiny_llama_dir, tmp_path / "peft", **LORA_CONFIG)
    code, out, _ = run(capsys, "import-lora", tmp_path / "peft", "--base", tiny_llama_dir, "--name", "ext",
                       "--home", home, "--json")
    assert code == 0 and json.loads(out)["ref"] == "ext@1"
    code, out, _ = run(capsys, "import-lora", tmp_path / "peft", "--base", tiny_llama_dir, "--name", "ext-proj",
                       "--project", "--home", home)
    assert code == 0 and "of the LoRA's energy lost" in out
    with Registry(home) as reg:
        imported, projected = reg.load("ext"), reg.load("ext-proj")
    assert imported.meta["base_model"] == str(tiny_llama_dir) and projected.kind == "core"
    for layer in imported.layers:
        torch.testing.assert_close(imported.delta(layer, llama_basis), peft_delta(original, layer),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fuse", "math", "--method", "average", "--out", "x.safetensors"], "unknown fusion method 'average'"),
        (["fuse", "math", "--param", "scale", "--out", "x.safetensors"], "--param takes KEY=VALUE"),
        (["fuse", "math", "--density", "0.3", "--out", "x.safetensors"], "'linear' has no parameter density"),
        (["fuse", "nobody:1", "--name", "x"], "no adapter named 'nobody'"),
        (["fuse", "math:-1", "--name", "x"], "negative"),
        (["export-lora", "math,math", "--out", "x"], "appears twice"),
    ],
)
def test_errors_are_one_line_and_exit_2(home, capsys, argv, message):
    code, out, err = run(capsys, *argv, "--home", home)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_import_lora_without_a_declared_basis_names_the_command(home, other_llama_dir, tiny_llama_dir, tmp_path,
                                                                capsys):
    make_peft_lora(tiny_llama_dir, tmp_path / "peft", r=2, lora_alpha=2, target_modules=["q_proj"])
    code, _, err = run(capsys, "import-lora", tmp_path / "peft", "--base", other_llama_dir, "--name", "x",
                       "--home", home)
    assert code == 2 and "holds no basis of the model" in err and f"specfuse basis {other_llama_dir}" in err
