"""PEFT LoRA export and import, checked against real PEFT models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fusion_helpers import LORA_CONFIG, core_adapter, load_model, logits, make_peft_lora, moved, peft_delta
from peft import PeftModel
from safetensors.torch import load_file, save_file

from adapters_zoo.errors import AdapterFormatError, IncompatibleAdapter
from adapters_zoo.inject import attach
from fusion.fuse import fuse
from fusion.lora_io import export_peft_lora, import_peft_lora


def peft_logits(model_dir, peft_dir, ids):
    model = PeftModel.from_pretrained(load_model(model_dir), str(peft_dir)).eval()
    return logits(model, ids)


def attached_logits(model_dir, adapter, basis, ids):
    model = load_model(model_dir)
    attach(model, adapter, basis)
    return logits(model, ids)


@pytest.mark.parametrize("ranks", ["pad", "pattern"])
def test_exported_mixture_gives_our_logits_under_peft(mixed, llama_basis, tiny_llama_dir, tmp_path, ids, ranks):
    fused = fuse(*mixed, llama_basis)
    export = export_peft_lora(fused, llama_basis, tmp_path / "lora", "tiny-llama", ranks=ranks)
    expected = attached_logits(tiny_llama_dir, fused, llama_basis, ids)
    assert (expected - logits(load_model(tiny_llama_dir), ids)).abs().max() > 1.0
    torch.testing.assert_close(peft_logits(tiny_llama_dir, export.path, ids), expected, atol=5e-4, rtol=1e-4)

    config = json.loads((export.path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == export.r and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama" and config["fan_in_fan_out"] is False
    tensors = load_file(export.path / "adapter_model.safetensors")
    layer = "model.layers.1.mlp.down_proj"
    A, B = tensors[f"base_model.model.{layer}.lora_A.weight"], tensors[f"base_model.model.{layer}.lora_B.weight"]
    assert A.shape[1] == 64 and B.shape[0] == 32 and A.shape[0] == B.shape[1]
    # rank ≤ k + residual rank: core (8) + scale's LoRA term (2) + additive (2·3) + lora (3 on even layers)
    assert max(export.ranks.values()) <= 8 + 2 + 6 + 3
    if ranks == "pad":
        assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {export.r} and not config["rank_pattern"]
    else:
        assert config["rank_pattern"] == config["alpha_pattern"] and config["rank_pattern"]


def test_low_rank_cores_export_at_their_rank(llama_basis, tmp_path):
    scale = moved("scale", {"rank": 3}, llama_basis, 1)  # diagonal, 3 nonzero values
    assert set(export_peft_lora(scale, llama_basis, tmp_path / "scale").ranks.values()) == {3}
    u, v = torch.randn(8, 2), torch.randn(2, 8)
    low = core_adapter(llama_basis, {layer: u @ v for layer in llama_basis.layer_names()})
    assert set(export_peft_lora(low, llama_basis, tmp_path / "low").ranks.values()) == {2}


def test_gpt2_export_sets_fan_in_fan_out_and_matches(gpt2_basis, tiny_gpt2_dir, tmp_path, ids):
    adapter = fuse([moved("rotation", {"rank": 4}, gpt2_basis, 1), moved("scale", {"rank": 8}, gpt2_basis, 2)],
                   [1.0, 0.5], gpt2_basis)
    export = export_peft_lora(adapter, gpt2_basis, tmp_path / "lora")
    assert export.fan_in_fan_out and sorted(export.target_modules) == ["c_attn", "c_fc", "c_proj"]
    expected = attached_logits(tiny_gpt2_dir, adapter, gpt2_basis, ids)
    torch.testing.assert_close(peft_logits(tiny_gpt2_dir, export.path, ids), expected, atol=5e-4, rtol=1e-4)


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("rslora", [False, True])
def test_import_applies_peft_scaling_and_export_reproduces_the_delta(
    llama_basis, tiny_llama_dir, tmp_path, ids, rslora
):
    original = make_peft_lora(tiny_llama_dir, tmp_path / "peft", use_rslora=rslora, **LORA_CONFIG)
    imported = import_peft_lora(tmp_path / "peft", llama_basis)
    assert imported.kind == "core"  # ranks 4 and 2: residual-only layers of a core adapter
    assert len(imported.layers) == 6 and imported.meta["source"]["use_rslora"] is rslora
    for layer in imported.layers:
        torch.testing.assert_close(imported.delta(layer, llama_basis), peft_delta(original, layer),
                                   atol=1e-6, rtol=1e-5)

    export = export_peft_lora(imported, llama_basis, tmp_path / "again")
    again = PeftModel.from_pretrained(load_model(tiny_llama_dir), str(export.path)).eval()
    for layer in imported.layers:
        torch.testing.assert_close(peft_delta(again, layer), peft_delta(original, layer), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(again, ids), logits(original, ids), atol=5e-4, rtol=1e-4)


def test_one_rank_imports_as_kind_lora(llama_basis, tiny_llama_dir, tmp_path):
    original = make_peft_lora(tiny_llama_dir, tmp_path / "peft", r=3, lora_alpha=6, target_modules=["o_proj"])
    imported = import_peft_lora(tmp_path / "peft", llama_basis)
    assert imported.kind == "lora" and imported.config["rank"] == 3
    for layer in imported.layers:
        torch.testing.assert_close(imported.delta(layer, llama_basis), peft_delta(original, layer))


def test_gpt2_lora_round_trips(gpt2_basis, tiny_gpt2_dir, tmp_path, ids):
    original = make_peft_lora(tiny_gpt2_dir, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                              fan_in_fan_out=True)
    imported = import_peft_lora(tmp_path / "peft", gpt2_basis)
    export = export_peft_lora(imported, gpt2_basis, tmp_path / "again")
    torch.testing.assert_close(peft_logits(tiny_gpt2_dir, export.path, ids), logits(original, ids),
                               atol=5e-4, rtol=1e-4)


def test_project_keeps_the_part_in_the_basis_and_reports_the_loss(llama_basis, tiny_llama_dir, tmp_path):
    original = make_peft_lora(tiny_llama_dir, tmp_path / "peft", **LORA_CONFIG)
    projected = import_peft_lora(tmp_path / "peft", llama_basis, project=True)
    assert projected.kind == "core" and all(set(p) == {"C"} for p in projected.params.values())
    total = lost = 0.0
    for layer in projected.layers:
        lb = llama_basis[layer]
        dw = peft_delta(original, layer)
        inside = lb.U @ lb.U.T @ dw @ lb.V @ lb.V.T
        torch.testing.assert_close(projected.delta(layer, llama_basis), inside, atol=1e-6, rtol=1e-5)
        total, lost = total + float(dw.square().sum()), lost + float((dw - inside).square().sum())
    assert projected.meta["projection"]["energy_lost"] == pytest.approx(lost / total, rel=1e-4)


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def peft_dir(tiny_llama_dir, tmp_path):
    make_peft_lora(tiny_llama_dir, tmp_path / "peft", r=2, lora_alpha=2, target_modules=["q_proj"])
    return tmp_path / "peft"


def test_a_pickled_only_directory_is_refused_without_unpickling(peft_dir, llama_basis):
    weights = peft_dir / "adapter_model.safetensors"
    (peft_dir / "adapter_model.bin").write_bytes(b"\x80\x04 not even a real pickle")
    weights.unlink()
    with pytest.raises(AdapterFormatError, match="only adapter_model.bin .* never unpickles"):
        import_peft_lora(peft_dir, llama_basis)


def _edit_config(peft_dir, **changes):
    path = peft_dir / "adapter_config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "biases"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 3}, "has rank 2 but the config says r=3"),
    ],
)
def test_configs_we_cannot_represent_are_refused(peft_dir, llama_basis, changes, message):
    _edit_config(peft_dir, **changes)
    with pytest.raises(AdapterFormatError, match=message):
        import_peft_lora(peft_dir, llama_basis)


def _edit_weights(peft_dir, edit):
    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_bad_tensors_are_refused(peft_dir, llama_basis, other_basis):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    good = copy.deepcopy(load_file(peft_dir / "adapter_model.safetensors"))

    def put(name, value):
        return lambda t: t.__setitem__(name, value)

    cases = [
        (put(key, torch.full_like(good[key], float("nan"))), "NaN or infinite"),
        (put(key, torch.zeros(5, 2)), r"lora_B \(5, 2\)"),
        (put("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(2, 3)), "not a LoRA factor"),
        (put("base_model.model.model.layers.0.mlp.nope.lora_A.weight", torch.zeros(2, 3)), "not in the basis"),
        (lambda t: t.pop(key), "not both"),
    ]
    for edit, message in cases:
        save_file(good, peft_dir / "adapter_model.safetensors")
        _edit_weights(peft_dir, edit)
        with pytest.raises((AdapterFormatError, IncompatibleAdapter), match=message):
            import_peft_lora(peft_dir, llama_basis)
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        import_peft_lora(peft_dir.parent, llama_basis)


def test_two_exports_of_one_adapter_are_byte_identical(llama_basis, tmp_path):
    scale = moved("scale", {"rank": 3}, llama_basis, 1)
    first = export_peft_lora(scale, llama_basis, tmp_path / "a").path
    second = export_peft_lora(scale, llama_basis, tmp_path / "b").path
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    data = (first / "adapter_model.safetensors").read_bytes()
    header = data[8 : 8 + int.from_bytes(data[:8], "little")].rstrip(b" ")
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
