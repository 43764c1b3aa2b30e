"""Dense merge: in memory and shard by shard, loadable by transformers, same logits as the attached adapter."""

from __future__ import annotations

import json

import pytest
import torch
from fusion_helpers import K, load_model, logits, moved
from safetensors import safe_open
from transformers import AutoTokenizer

from adapters_zoo.basis import compute_basis
from adapters_zoo.checkpoint import Checkpoint
from adapters_zoo.errors import BasisMismatch, ModelDirError
from adapters_zoo.inject import attach, detach
from fusion.fuse import fuse
from fusion.merge import MERGE_RECORD, merge_into_model, merge_model_dir


def attached_logits(model_dir, adapter, basis, ids):
    model = load_model(model_dir)
    base = logits(model, ids)
    attach(model, adapter, basis)
    out = logits(model, ids)
    detach(model)
    assert (out - base).abs().max() > 0.5  # the adapter visibly moves the logits
    return out


def test_merge_into_model_gives_the_attached_logits(mixed, llama_basis, tiny_llama_dir, ids):
    fused = fuse(*mixed, llama_basis)
    expected = attached_logits(tiny_llama_dir, fused, llama_basis, ids)
    model = merge_into_model(load_model(tiny_llama_dir), fused, llama_basis)
    torch.testing.assert_close(logits(model, ids), expected, atol=5e-4, rtol=1e-4)


def test_merged_sharded_dir_loads_with_transformers_and_gives_the_same_logits(
    mixed, llama_basis, tiny_llama_sharded_dir, tmp_path, ids
):
    fused = fuse(*mixed, llama_basis)
    expected = attached_logits(tiny_llama_sharded_dir, fused, llama_basis, ids)
    out = merge_model_dir(tiny_llama_sharded_dir, fused, llama_basis, tmp_path / "merged", progress=False)
    src_shards = sorted(p.name for p in tiny_llama_sharded_dir.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == src_shards and len(src_shards) >= 2
    assert (out / "model.safetensors.index.json").read_text() == \
        (tiny_llama_sharded_dir / "model.safetensors.index.json").read_text()
    torch.testing.assert_close(logits(load_model(out), ids), expected, atol=5e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_llama_sharded_dir)("ab")["input_ids"]
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["base_fingerprint"] == llama_basis.fingerprint and record["adapter"]["kind"] == "core"
    # tensors that are not target weights are copied bit for bit
    src, dst = Checkpoint(tiny_llama_sharded_dir), Checkpoint(out)
    for key in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"):
        assert torch.equal(src.get(key), dst.get(key))
    again = merge_model_dir(tiny_llama_sharded_dir, fused, llama_basis, tmp_path / "again", progress=False)
    for name in [*src_shards, MERGE_RECORD]:  # canonical bytes: a second merge writes the same files
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_gpt2_conv1d_weights_take_the_transposed_update(gpt2_basis, tiny_gpt2_dir, tmp_path, ids):
    assert all(gpt2_basis.transposed.values())
    adapters = [moved("rotation", {"rank": 4}, gpt2_basis, 1), moved("lora", {"rank": 2}, gpt2_basis, 2)]
    fused = fuse(adapters, [1.0, 0.6], gpt2_basis)
    expected = attached_logits(tiny_gpt2_dir, fused, gpt2_basis, ids)
    out = merge_model_dir(tiny_gpt2_dir, fused, gpt2_basis, tmp_path / "merged", progress=False)
    torch.testing.assert_close(logits(load_model(out), ids), expected, atol=5e-4, rtol=1e-4)
    in_memory = merge_into_model(load_model(tiny_gpt2_dir), fused, gpt2_basis)
    torch.testing.assert_close(logits(in_memory, ids), expected, atol=5e-4, rtol=1e-4)


def test_the_stored_dtype_is_kept(tiny_llama_dir, tmp_path):
    bf16_dir = tmp_path / "bf16"
    load_model(tiny_llama_dir, torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True)
    basis = compute_basis(bf16_dir, K, progress=False)
    adapter = moved("scale", {"rank": 8}, basis, 3)
    out = merge_model_dir(bf16_dir, adapter, basis, tmp_path / "merged", progress=False)
    layer = "model.layers.0.mlp.down_proj"
    key = f"{layer}.weight"
    with safe_open(str(bf16_dir / "model.safetensors"), "pt") as f:
        before = f.get_tensor(key)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        after = f.get_tensor(key)
    assert after.dtype == torch.bfloat16
    assert torch.equal(after, (before.float() + adapter.delta(layer, basis)).to(torch.bfloat16))


def test_another_base_or_a_bad_out_dir_is_refused(llama_basis, other_llama_dir, tiny_llama_dir, tmp_path):
    adapter = moved("scale", None, llama_basis, 1)
    with pytest.raises(BasisMismatch, match="not the model the adapter was trained on"):
        merge_model_dir(other_llama_dir, adapter, llama_basis, tmp_path / "x", progress=False)
    with pytest.raises(BasisMismatch):
        merge_into_model(load_model(other_llama_dir), adapter, llama_basis)
    with pytest.raises(ModelDirError, match="cannot overwrite its own base"):
        merge_model_dir(tiny_llama_dir, adapter, llama_basis, tiny_llama_dir, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ModelDirError, match="not empty"):
        merge_model_dir(tiny_llama_dir, adapter, llama_basis, busy, progress=False)
    assert merge_model_dir(tiny_llama_dir, adapter, llama_basis, busy, progress=False, overwrite=True) == busy
    assert not (tmp_path / "x").exists()  # refused before anything was written
