"""The foundation commands through the real ``specfuse`` entry point: basis, train, count-params, inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DebertaV2Config, GemmaConfig

from adapters_zoo.basis import compute_basis, load_basis, save_basis
from adapters_zoo.format import load_adapter
from adapters_zoo.registry import Registry
from serving.cli import main

GEMMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str, command: str) -> str:
    """The one error line of a failed command (progress bars may precede it on stderr)."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("specfuse ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert errors[0].startswith(f"specfuse {command}: error: ")
    return errors[0]


def fails(capsys, command: str, *argv, quiet: bool = True) -> str:
    """Run a command that must fail: exit 2 and one clear line (the only stderr line when ``quiet``)."""
    rc, out, err = run(capsys, command, *argv)
    assert rc == 2, (rc, out, err)
    line = error_line(err, command)
    if quiet:
        assert err.strip() == line
    return line


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path):
    return shutil.copytree(tiny_llama_dir, tmp_path / "model")


# --------------------------------------------------------------------------- basis


def test_basis_command_writes_the_basis_and_declares_it(capsys, model_copy, tmp_path):
    home = tmp_path / "home"
    rc, out, err = run(capsys, "basis", model_copy, "--rank", "8", "--json", "--home", home)
    assert rc == 0
    summary = json.loads(out)
    path = model_copy / "basis.safetensors"  # the default place
    assert summary["path"] == str(path) and summary["layers"] == 14 and summary["k"] == 8
    assert 0 < summary["energy_min"] <= summary["energy_mean"] < 1
    basis = load_basis(path)
    assert basis.fingerprint == summary["fingerprint"] == compute_basis(model_copy, 8, progress=False).fingerprint
    with Registry(home) as registry:
        assert [b["fingerprint"] for b in registry.bases()] == [basis.fingerprint]
    assert "basis (SVD)" in err  # progress on stderr, JSON alone on stdout

    rc, out, _ = run(capsys, "basis", model_copy, "--rank", "full", "--targets", "q_proj,v_proj", "--method", "exact",
                     "--out", tmp_path / "qv.safetensors", "--home", home)
    assert rc == 0 and "basis of 4 layers, k=full (exact SVD)" in out and "energy kept: mean 1.0000" in out
    assert load_basis(tmp_path / "qv.safetensors").shapes()["model.layers.0.self_attn.v_proj"] == (16, 32, 16)


def test_basis_of_a_sharded_model(capsys, tiny_llama_sharded_dir, tiny_llama_dir, tmp_path):
    rc, out, _ = run(capsys, "basis", tiny_llama_sharded_dir, "--rank", "4", "--out", tmp_path / "b.safetensors",
                     "--json")
    assert rc == 0
    assert json.loads(out)["fingerprint"] == compute_basis(tiny_llama_dir, 4, progress=False).fingerprint


# --------------------------------------------------------------------------- train


def test_train_command_end_to_end(capsys, tiny_llama_dir, reverse_task, tmp_path):
    out_file = tmp_path / "rev.safetensors"
    rc, out, err = run(capsys, "train", tiny_llama_dir, "--kind", "rotation", "--rank", "6", "--data",
                       reverse_task["train"], "--eval", reverse_task["validation"], "--out", out_file, "--steps", "30",
                       "--lr", "0.05", "--batch-size", "16", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05
    assert summary["stats"]["steps"] == 30 and summary["layers"] == 14
    basis = load_basis(summary["basis"])  # computed with k = --rank and saved beside the adapter
    assert summary["basis"] == str(tmp_path / "rev.basis.safetensors") and basis.rank == 6
    adapter = load_adapter(out_file, basis)
    assert adapter.kind == "rotation" and adapter.config["rank"] == 6
    assert adapter.meta["eval"]["loss_after"] == summary["eval_loss_after"]
    assert adapter.meta["train"]["stats"]["trainable_params"] == adapter.num_params() == 14 * (2 * 36 + 6)
    assert adapter.meta["name"] == "rev" and "train rotation" in err
    with Registry() as registry:  # $SPECFUSE_HOME: the session's temporary home
        assert registry.basis(basis.fingerprint).rank == 6


def test_train_with_a_given_basis_slice_and_preserve(capsys, tiny_llama_dir, reverse_task, tmp_path):
    basis_file = tmp_path / "b16.safetensors"
    assert run(capsys, "basis", tiny_llama_dir, "--rank", "16", "--out", basis_file)[0] == 0
    keep = tmp_path / "keep.jsonl"
    keep.write_text("\n".join(json.dumps({"prompt": f"loud:{w}="}) for w in ("abc", "xyz", "hello")) + "\n")
    rc, out, err = run(capsys, "train", tiny_llama_dir, "--kind", "scale", "--slice", "8:16", "--lora-rank", "2",
                       "--targets", "q_proj,v_proj", "--basis", basis_file, "--data", reverse_task["train"],
                       "--preserve", keep, "--kl-weight", "2", "--steps", "5", "--out", tmp_path / "s.safetensors")
    assert rc == 0, err
    assert "trained scale on 4 layers" in out and f"basis {basis_file}" in out
    adapter = load_adapter(tmp_path / "s.safetensors", load_basis(basis_file))
    assert adapter.config["slice"] == [8, 16] and adapter.config["lora_rank"] == 2
    assert adapter.meta["train"]["stats"]["final_kl"] is not None
    assert adapter.meta["train"]["settings"]["preserve"] == str(keep)
    assert {p["lam"].shape for p in adapter.params.values()} == {(8,)}


def test_svft_on_a_full_basis_of_gpt2(capsys, tiny_gpt2_dir, reverse_task, tmp_path):
    rc, out, err = run(capsys, "train", tiny_gpt2_dir, "--kind", "svft", "--rank", "full", "--pattern", "banded",
                       "--d", "2", "--targets", "c_attn", "--data", reverse_task["train"], "--steps", "3",
                       "--out", tmp_path / "g.safetensors", "--json")
    assert rc == 0, err
    summary = json.loads(out)
    basis = load_basis(summary["basis"])
    assert basis.rank == "full" and basis.shapes()["transformer.h.0.attn.c_attn"] == (96, 32, 32)
    assert summary["stats"]["trainable_params"] == 2 * (32 * 5 - 6 + 1)  # n(2d+1) − d(d+1) + gate, 2 layers


# --------------------------------------------------------------------------- count-params


@pytest.fixture(scope="module")
def paper_configs(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper-configs")
    gemma = GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                        num_key_value_heads=1, head_dim=256, vocab_size=256000)
    deberta = DebertaV2Config(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                              vocab_size=128100, relative_attention=True, pos_att_type=["p2c", "c2p"],
                              share_att_key=True, position_buckets=256, norm_rel_ebd="layer_norm")
    gemma.save_pretrained(out / "gemma")
    deberta.save_pretrained(out / "deberta")
    return {"gemma": out / "gemma" / "config.json", "deberta": out / "deberta"}


def test_count_params_reproduces_the_papers(capsys, paper_configs):
    rc, out, _ = run(capsys, "count-params", paper_configs["gemma"], "--kind", "svft", "--targets", GEMMA_TARGETS,
                     "--rank", "full", "--pattern", "plain", "--no-gate", "--json")
    assert rc == 0 and json.loads(out)["total"] == 193_536
    rc, out, _ = run(capsys, "count-params", paper_configs["deberta"], "--kind", "svft", "--targets", "all-linear",
                     "--rank", "full", "--no-gate")
    assert rc == 0 and "55,296" in out.splitlines()[-1]
    rc, out, _ = run(capsys, "count-params", paper_configs["gemma"], "--kind", "rotation", "--targets", "q_proj",
                     "--rank", "16", "--json")
    assert rc == 0 and json.loads(out)["total"] == 18 * (2 * 16 * 16 + 16)


def test_count_params_of_a_model_dir(capsys, tiny_llama_dir):
    rc, out, _ = run(capsys, "count-params", tiny_llama_dir, "--kind", "scale", "--targets", "q_proj,v_proj",
                     "--rank", "4", "--lora-rank", "2", "--json")
    result = json.loads(out)
    assert rc == 0 and result["layers"] == 4
    assert result["by_type"] == {"q_proj": 2 * (4 + 2 * 64), "v_proj": 2 * (4 + 2 * 48)}
    rc, out, _ = run(capsys, "count-params", tiny_llama_dir, "--kind", "lora", "--targets", "k_proj", "--rank", "3",
                     "--json")
    assert rc == 0 and json.loads(out)["total"] == 2 * 3 * (16 + 32)


# --------------------------------------------------------------------------- inspect


def test_inspect_shows_a_trained_adapter(capsys, tiny_llama_dir, reverse_task, tmp_path):
    assert run(capsys, "train", tiny_llama_dir, "--kind", "lora", "--rank", "2", "--data", reverse_task["train"],
               "--steps", "2", "--out", tmp_path / "l.safetensors")[0] == 0
    rc, out, _ = run(capsys, "inspect", tmp_path / "l.safetensors", "--basis", tmp_path / "l.basis.safetensors",
                     "--json")
    info = json.loads(out)
    per_block = (32 + 32) + (16 + 32) + (16 + 32) + (32 + 32) + 2 * (64 + 32) + (32 + 64)  # q k v o gate up down
    assert rc == 0 and info["kind"] == "lora" and info["params"] == 2 * 2 * per_block  # 2 blocks, rank 2
    assert info["meta"]["train"]["stats"]["steps"] == 2 and info["checked_against_basis"]


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def scale_adapter(tiny_llama_dir, reverse_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale-adapter")
    rc = main(["train", str(tiny_llama_dir), "--kind", "scale", "--data", str(reverse_task["train"]), "--steps", "2",
               "--out", str(out / "a.safetensors")])
    assert rc == 0
    return out / "a.safetensors"


def test_wrong_base_is_one_clear_line(capsys, tiny_llama_dir, other_llama_dir, reverse_task, scale_adapter, tmp_path):
    other = save_basis(compute_basis(other_llama_dir, 8, progress=False), tmp_path / "other.safetensors")
    line = fails(capsys, "train", tiny_llama_dir, "--kind", "scale", "--basis", other, "--data",
                 reverse_task["train"], "--out", tmp_path / "x.safetensors", quiet=False)
    assert "basis fingerprint" in line and "another base model" in line
    assert not (tmp_path / "x.safetensors").exists()
    line = fails(capsys, "inspect", scale_adapter, "--basis", other)
    assert "adapter was trained on base" in line


def test_corrupt_and_truncated_files(capsys, tiny_llama_dir, reverse_task, scale_adapter, tmp_path):
    data = scale_adapter.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 7])
    assert "truncated or corrupt" in fails(capsys, "inspect", tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert "truncated or corrupt" in fails(capsys, "inspect", tmp_path / "junk.safetensors")
    basis = scale_adapter.with_name("a.basis.safetensors").read_bytes()
    (tmp_path / "cut-basis.safetensors").write_bytes(basis[:100])
    line = fails(capsys, "train", tiny_llama_dir, "--kind", "scale", "--basis", tmp_path / "cut-basis.safetensors",
                 "--data", reverse_task["train"], "--out", tmp_path / "x.safetensors")
    assert "unreadable basis file" in line


def test_nan_values_are_refused(capsys, scale_adapter, tiny_llama_dir, tmp_path):
    with safe_open(str(scale_adapter), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(scale_adapter)
    next(t for k, t in tensors.items() if k.endswith(".lam"))[0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    assert "NaN or infinite" in fails(capsys, "inspect", tmp_path / "nan.safetensors")

    bad = shutil.copytree(tiny_llama_dir, tmp_path / "nan-model")
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    line = fails(capsys, "basis", bad, "--rank", "4", "--out", tmp_path / "b.safetensors", quiet=False)
    assert "o_proj.weight has NaN or infinite values" in line


def test_unknown_kind_and_misplaced_flags(capsys, tiny_llama_dir, reverse_task, tmp_path):
    line = fails(capsys, "train", tiny_llama_dir, "--kind", "dora", "--data", reverse_task["train"], "--out",
                 tmp_path / "x.safetensors")
    assert "unknown adapter kind 'dora' (known: scale, svft, rotation, additive, lora, core)" in line
    assert "unknown adapter kind 'dora'" in fails(capsys, "count-params", tiny_llama_dir, "--kind", "dora",
                                                  "--targets", "q_proj")
    assert "--pattern does not apply to kind scale" in fails(capsys, "count-params", tiny_llama_dir, "--kind",
                                                             "scale", "--targets", "q_proj", "--pattern", "banded")
    assert "svft pattern must be one of" in fails(capsys, "count-params", tiny_llama_dir, "--kind", "svft",
                                                  "--targets", "q_proj", "--pattern", "dense")
    assert "rank must be" in fails(capsys, "basis", tiny_llama_dir, "--rank", "most")
    assert "no linear layer matches" in fails(capsys, "basis", tiny_llama_dir, "--rank", "4", "--targets", "qproj")
    assert "not a directory" in fails(capsys, "basis", tmp_path / "nowhere", "--rank", "4")
    assert "--basis-rank is for a basis train computes" in fails(
        capsys, "train", tiny_llama_dir, "--kind", "scale", "--basis", tmp_path / "b.st", "--basis-rank", "16",
        "--data", reverse_task["train"], "--out", tmp_path / "x.safetensors")
    assert "steps must be ≥ 1" in fails(capsys, "train", tiny_llama_dir, "--kind", "scale", "--steps", "0", "--data",
                                        reverse_task["train"], "--out", tmp_path / "x.safetensors")


def test_bad_training_files(capsys, tiny_llama_dir, tmp_path):
    def train(data) -> str:
        return fails(capsys, "train", tiny_llama_dir, "--kind", "scale", "--data", data, "--out", tmp_path / "x.st")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert train(empty).endswith("empty.jsonl: no examples (the file is empty)")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a=", "completion": "b"}\n{"prompt": "a=", "completion": "b"\n')
    assert "broken.jsonl:2: not valid JSON" in train(broken)
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"prompt": "a=", "answer": "b"}\n')
    assert "keyless.jsonl:1: missing key 'completion'" in train(keyless)
    assert "training file not found" in train(tmp_path / "absent.jsonl")
    assert not (tmp_path / "x.st").exists()


def test_the_installed_entry_point_exits_2_with_one_line(tmp_path):
    """A real process: ``python -m serving.cli`` (what the ``specfuse`` script runs)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "train", str(tmp_path), "--kind", "scale", "--data",
                           str(empty), "--out", str(tmp_path / "x.st")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"specfuse train: error: {empty}: no examples (the file is empty)"]
    helped = subprocess.run([sys.executable, "-m", "serving.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0
    for command in ("basis", "train", "count-params", "inspect"):
        assert command in helped.stdout
    lazy = subprocess.run([sys.executable, "-c", "import sys, adapters_zoo.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert lazy.stdout.strip() == "False"  # handlers import torch, registering the commands does not
