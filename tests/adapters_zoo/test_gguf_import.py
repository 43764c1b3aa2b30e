"""GGUF import on synthetic files: names and layouts equal to transformers' own GGUF loading, per
architecture; shards; errors for bad files, architectures and tensor types; a second import does no work."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from gguf_files import CHAT_TEMPLATE, write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters_zoo import gguf_import
from adapters_zoo.checkpoint import Checkpoint
from adapters_zoo.gguf_import import GGUFImportError, import_gguf
from adapters_zoo.models import load_model_dir
from serving.cli import main

Q = gguf.GGMLQuantizationType
# qwen3: head_dim 128, the value transformers' qwen3 GGUF config reader assumes
SHAPES = {"llama": {}, "mistral": {}, "qwen2": {}, "gemma3": {}, "qwen3": {"hidden": 256, "heads": 2, "kv_heads": 1}}


def _reference(path):
    """The state dict transformers' own GGUF loader builds from ``path`` (float32)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_every_tensor_equals_transformers_gguf_loading(tmp_path, arch):
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, **SHAPES[arch])
    imported = import_gguf(path, home=tmp_path / "home", progress=False)
    ckpt = Checkpoint(imported.path)
    reference = _reference(path)
    assert set(reference) - set(ckpt.keys()) == {"lm_head.weight"}  # tied: the embedding is the head
    for key in ckpt.keys():
        assert torch.equal(ckpt.get(key), reference[key]), key
    config = json.loads((imported.path / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(imported.path)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert imported.architecture == arch and imported.parameters == sum(ckpt.get(k).numel() for k in ckpt.keys())


def test_llama_q_k_rows_are_unpermuted_and_gemma_norms_lose_their_one(tmp_path):
    """The two layout fixes, checked against the raw GGUF tensors (not only against transformers)."""
    from gguf import GGUFReader

    llama = write_gguf(tmp_path / "l.gguf", "llama", tensor_types={"blk.0.attn_q.weight": Q.F32})
    q_raw = next(t for t in GGUFReader(llama).tensors if t.name == "blk.0.attn_q.weight").data  # (64, 64)
    q = Checkpoint(import_gguf(llama, home=tmp_path, progress=False).path).get("model.layers.0.self_attn.q_proj.weight")
    heads, half = 4, 64 // 4 // 2  # llama.cpp interleaves the two rotary halves of each head's rows
    expected = torch.from_numpy(q_raw.copy()).reshape(heads, half, 2, 64).transpose(1, 2).reshape(64, 64)
    assert torch.equal(q, expected) and not torch.equal(q, torch.from_numpy(q_raw.copy()))
    gemma = write_gguf(tmp_path / "g.gguf", "gemma3")
    norm_raw = next(t for t in GGUFReader(gemma).tensors if t.name == "blk.0.attn_norm.weight").data
    norm = Checkpoint(import_gguf(gemma, home=tmp_path, progress=False).path).get(
        "model.layers.0.input_layernorm.weight")
    assert torch.equal(norm, torch.from_numpy(norm_raw - 1))


def test_untied_head_bfloat16_and_shards_load_as_one_model(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", "llama", tied=False, qtype=Q.Q4_0,
                      tensor_types={"blk.1.ffn_up.weight": Q.F16, "blk.1.ffn_down.weight": Q.BF16})
    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 40_000)
    imported = import_gguf(path, "shards", "bfloat16", tmp_path / "home", progress=False)
    index = json.loads((imported.path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((imported.path / f).stat().st_size < 40_000 + 4096 for f in files)
    ckpt, reference = Checkpoint(imported.path), _reference(path)
    assert set(ckpt.keys()) == set(reference)
    for key in ckpt.keys():
        value = ckpt.get(key)
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key].to(torch.bfloat16)), key
    model, _ = load_model_dir(imported.path, "cpu")  # the shards load as one model, head not tied
    assert not torch.equal(model.state_dict()["lm_head.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_a_second_import_does_no_work_and_a_changed_file_is_redone(tmp_path, monkeypatch, capsys):
    path = write_gguf(tmp_path / "m.gguf")
    home = tmp_path / "home"
    assert main(["base", "import", str(path), "--home", str(home), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    calls = []
    real = gguf_import._convert
    monkeypatch.setattr(gguf_import, "_convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = import_gguf(path, home=home, progress=False)
    assert calls == [] and again.fingerprint == first["fingerprint"] and str(again.path) == first["path"]
    write_gguf(path, seed=1)  # same name, other weights
    changed = import_gguf(path, home=home, progress=False)
    assert len(calls) == 1 and changed.fingerprint != first["fingerprint"]
    assert [p.name for p in (home / "bases").iterdir()] == ["m"]  # no staging left


def test_bad_files_are_one_clear_error_and_leave_nothing(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    (tmp_path / "cut-header.gguf").write_bytes(data[:3000])
    (tmp_path / "text.gguf").write_bytes(b"not a gguf file at all")
    for name, message in (("cut.gguf", "truncated"), ("cut-header.gguf", "truncated"), ("text.gguf", "not a GGUF file"),
                          ("missing.gguf", "no such file")):
        with pytest.raises(GGUFImportError, match=message):
            import_gguf(tmp_path / name, home=tmp_path / "home", progress=False)
        assert main(["base", "import", str(tmp_path / name), "--home", str(tmp_path / "home")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "home" / "bases").exists() or not any((tmp_path / "home" / "bases").iterdir())
    with pytest.raises(GGUFImportError, match="dtype 'float16' is not one of float32, bfloat16"):
        import_gguf(path, dtype="float16", home=tmp_path / "home")


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    supported = r"\(supported: llama, mistral, qwen2, qwen3, gemma3\)"
    with pytest.raises(GGUFImportError, match=f"architecture 'phi3' is not supported {supported}"):
        import_gguf(path, home=tmp_path, progress=False)


def test_a_tensor_type_gguf_cannot_dequantize_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "i8.gguf"), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(8, 32, dtype=torch.int8).numpy())  # I8: no dequantizer
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="token_embd.weight has type I8, which gguf cannot dequantize"):
        import_gguf(tmp_path / "i8.gguf", home=tmp_path, progress=False)
