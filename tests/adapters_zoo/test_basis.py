"""The basis: streamed from shards equals the in-memory SVD; fingerprints; files; Conv1D layouts."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_zoo.basis import (
    basis_from_model,
    check_basis_matches_model,
    compute_basis,
    fingerprint_model,
    load_basis,
    save_basis,
    svd_layer,
)
from adapters_zoo.checkpoint import Checkpoint, linear_layers
from adapters_zoo.errors import AdapterFormatError, BasisMismatch, InvalidConfig, ModelDirError


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


class _ReadLog:
    """Counts what ``Checkpoint`` reads, and how many full matrices are alive at once."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        self.alive = 0
        self.max_alive = 0
        get, weight = Checkpoint.get, Checkpoint.weight

        def logged_get(ckpt, key):
            self.keys.append(key)
            return get(ckpt, key)

        def logged_weight(ckpt, spec):
            w = weight(ckpt, spec)
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
            weakref.finalize(w, self._freed)
            return w

        monkeypatch.setattr(Checkpoint, "get", logged_get)
        monkeypatch.setattr(Checkpoint, "weight", logged_weight)

    def _freed(self):
        self.alive -= 1


def test_streamed_basis_of_sharded_model_equals_in_memory_svd(tiny_llama_sharded_dir, monkeypatch):
    log = _ReadLog(monkeypatch)
    streamed = compute_basis(tiny_llama_sharded_dir, 8, progress=False, device="cpu")
    monkeypatch.undo()

    specs = Checkpoint(tiny_llama_sharded_dir).linear_layers(None)
    assert len(Checkpoint(tiny_llama_sharded_dir).shard_files) >= 2
    # only the target matrices were read, each once, and one at a time: never the whole model
    assert sorted(log.keys) == sorted(s.weight_key for s in specs)
    assert log.max_alive == 1

    model = _load(tiny_llama_sharded_dir)
    in_memory = basis_from_model(model, 8)
    assert streamed.fingerprint == in_memory.fingerprint == fingerprint_model(model, streamed.layer_names())
    assert streamed.layer_names() == in_memory.layer_names() == [s.name for s in specs]
    for name, lb in streamed.layers.items():
        ref = in_memory[name]
        torch.testing.assert_close(lb.S, ref.S, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lb.U, ref.U, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lb.V, ref.V, rtol=1e-5, atol=1e-5)


def test_sharded_and_single_file_checkpoints_have_the_same_fingerprint(tiny_llama_dir, tiny_llama_sharded_dir):
    a = compute_basis(tiny_llama_dir, 4, "q_proj,v_proj", progress=False, device="cpu")
    b = compute_basis(tiny_llama_sharded_dir, 4, "q_proj,v_proj", progress=False, device="cpu")
    assert a.fingerprint == b.fingerprint
    assert a.layer_names() == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_top_k_basis_is_the_best_rank_k_approximation(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    basis = basis_from_model(model, 4, "k_proj")
    w = model.model.layers[0].self_attn.k_proj.weight.detach().double()  # (16, 32)
    lb = basis["model.layers.0.self_attn.k_proj"]
    assert lb.U.shape == (16, 4) and lb.S.shape == (4,) and lb.V.shape == (32, 4)
    S_all = torch.linalg.svdvals(w)
    torch.testing.assert_close(lb.S.double(), S_all[:4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lb.U.T.double() @ lb.U.double(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    approx = lb.U.double() @ torch.diag(lb.S.double()) @ lb.V.T.double()
    err = torch.linalg.matrix_norm(w - approx) ** 2
    assert float(err) == pytest.approx(float(S_all[4:].pow(2).sum()), rel=1e-4)  # Eckart–Young
    energy = basis.energy["model.layers.0.self_attn.k_proj"]
    assert energy == pytest.approx(float(S_all[:4].pow(2).sum() / S_all.pow(2).sum()), rel=1e-6)


def test_full_rank_reconstructs_every_layer(model_dirs):
    for arch, model_dir in model_dirs.items():
        basis = compute_basis(model_dir, "full", progress=False, device="cpu")
        ckpt = Checkpoint(model_dir)
        for spec in ckpt.linear_layers(None):
            lb = basis[spec.name]
            assert lb.k == min(spec.out_features, spec.in_features), (arch, spec.name)
            rebuilt = lb.U @ torch.diag(lb.S) @ lb.V.T  # (out, in)
            torch.testing.assert_close(rebuilt, ckpt.weight(spec), atol=1e-5, rtol=1e-5)
            assert basis.energy[spec.name] == pytest.approx(1.0, abs=1e-6)


def test_gpt2_conv1d_layers_are_read_in_the_out_in_convention(tiny_gpt2_dir):
    model = _load(tiny_gpt2_dir)
    specs = linear_layers(model, "c_attn")
    assert [s.transposed for s in specs] == [True, True]
    assert (specs[0].out_features, specs[0].in_features) == (96, 32)  # c_attn maps 32 -> 3·32
    basis = compute_basis(tiny_gpt2_dir, "full", "c_attn", progress=False, device="cpu")
    assert basis.transposed == {s.name: True for s in specs}
    lb = basis["transformer.h.0.attn.c_attn"]
    x = torch.randn(3, 32)
    y_ref = model.transformer.h[0].attn.c_attn(x) - model.transformer.h[0].attn.c_attn.bias  # x W (Conv1D)
    torch.testing.assert_close(x @ lb.V @ torch.diag(lb.S) @ lb.U.T, y_ref, atol=1e-5, rtol=1e-5)


def test_randomized_svd_agrees_with_exact_on_the_top_values():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(200, 60, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(120, 60, generator=g))
    w = q1 @ torch.diag(torch.logspace(1, -2, 60)) @ q2.T  # (200, 120), decaying spectrum
    exact, e_exact, m1 = svd_layer(w, 8, "exact")
    approx, e_approx, m2 = svd_layer(w, 8, "randomized")
    assert (m1, m2) == ("exact", "randomized")
    torch.testing.assert_close(approx.S, exact.S, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(approx.U, exact.U, atol=1e-3, rtol=0)  # signs are normalised: same columns
    assert e_approx == pytest.approx(e_exact, rel=1e-4)


def test_basis_file_round_trip_is_exact(tiny_llama_dir, tmp_path):
    basis = compute_basis(tiny_llama_dir, 6, progress=False, device="cpu")
    loaded = load_basis(save_basis(basis, tmp_path / "b.safetensors"))
    assert (loaded.fingerprint, loaded.rank, loaded.method) == (basis.fingerprint, 6, basis.method)
    assert loaded.energy == basis.energy and loaded.transposed == basis.transposed
    for name, lb in basis.layers.items():
        for a, b in zip((lb.U, lb.S, lb.V), (loaded[name].U, loaded[name].S, loaded[name].V)):
            assert torch.equal(a, b)


def test_fingerprint_tells_base_models_apart(tiny_llama_dir, other_llama_dir):
    basis = compute_basis(tiny_llama_dir, 4, progress=False, device="cpu")
    check_basis_matches_model(basis, _load(tiny_llama_dir))
    with pytest.raises(BasisMismatch, match="another base model"):
        check_basis_matches_model(basis, _load(other_llama_dir))


def test_bad_inputs_raise_typed_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(InvalidConfig, match="rank"):
        compute_basis(tiny_llama_dir, "half", progress=False)
    with pytest.raises(InvalidConfig, match="rank"):
        compute_basis(tiny_llama_dir, 0, progress=False)
    with pytest.raises(ModelDirError, match="no linear layer"):
        compute_basis(tiny_llama_dir, 4, "no_such_proj", progress=False)
    with pytest.raises(ModelDirError, match="not a directory"):
        compute_basis(tmp_path / "missing", 4, progress=False)

    path = save_basis(compute_basis(tiny_llama_dir, 4, "q_proj", progress=False, device="cpu"), tmp_path / "b.st")
    data = path.read_bytes()
    (tmp_path / "cut.st").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="unreadable basis file"):
        load_basis(tmp_path / "cut.st")
    with pytest.raises(AdapterFormatError, match="not found"):
        load_basis(tmp_path / "nothing.st")


def test_non_finite_weight_is_refused(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_llama_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match="up_proj.weight has NaN"):
        compute_basis(bad, 4, progress=False, device="cpu")
