"""Spectral analysis on constructed weight changes with known answers, and end to end on tiny Llamas."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_zoo.analysis import analyze_delta, analyze_pair, principal_angles
from adapters_zoo.analysis_report import analyze
from adapters_zoo.cli import register_cli
from adapters_zoo.errors import BasisMismatch, IncompatibleAdapter, ModelDirError

OUT, IN, K = 48, 32, 6


def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (n, m)


@pytest.fixture
def svd():
    """A (OUT, IN) base weight with a well-separated spectrum and its exact factors."""
    U, V = _orthonormal(OUT, IN, 0), _orthonormal(IN, IN, 1)  # (OUT, r), (IN, r)
    S = torch.linspace(10.0, 0.5, IN, dtype=torch.float64)  # distinct, descending
    return U, S, V, U @ torch.diag(S) @ V.T


def test_rescaling_top_values_gives_the_factors_and_no_rotation(svd):
    U, S, V, W = svd
    factors = torch.ones(IN, dtype=torch.float64)
    factors[:4] = torch.tensor([1.8, 1.5, 1.3, 1.1], dtype=torch.float64)  # keeps the order
    r = analyze_pair(W, U @ torch.diag(S * factors) @ V.T, K)
    assert r["sigma_ratio_topk"] == pytest.approx(factors[:K].tolist(), abs=1e-9)
    assert r["sigma"]["tail_ratio_mean"] == pytest.approx(1.0, abs=1e-9)
    assert r["sigma"]["tail_rel_change"] == pytest.approx(0.0, abs=1e-9)
    assert r["sigma"]["top_amplified_frac"] == pytest.approx(4 / K)
    assert r["share"] == pytest.approx({"two_sided": 1.0, "left": 1.0, "right": 1.0}, abs=1e-9)
    assert max(r["angles_left_deg"] + r["angles_right_deg"]) < 1e-6
    # ΔW lives on directions 1..4: two-sided share reaches 100% exactly at k = 4
    assert r["k_for_share"]["0.9"] <= 4 and r["delta_rank_for_share"]["0.9"] <= 4
    assert r["sigma_ratio_profile"][0] > 1 and r["sigma_ratio_profile"][-1] == pytest.approx(1.0)


def test_delta_inside_top_k_subspace_has_share_one(svd):
    U, _, V, W = svd
    C = 0.3 * torch.randn(K, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = analyze_delta(W, U[:, :K] @ C @ V[:, :K].T, K)
    assert r["share"] == pytest.approx({"two_sided": 1.0, "left": 1.0, "right": 1.0}, abs=1e-9)
    assert r["share_curve"]["k"][-1] == IN and r["share_curve"]["two_sided"][-1] == pytest.approx(1.0)
    # a change inside span(U_k) x span(V_k) cannot move the subspaces themselves (σ_k ≫ σ_k+1 here)
    assert max(r["angles_left_deg"] + r["angles_right_deg"]) < 1e-6


def test_delta_orthogonal_to_top_k_has_share_zero(svd):
    U, _, V, W = svd
    C = 0.3 * torch.randn(IN - K, IN - K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = analyze_delta(W, U[:, K:] @ C @ V[:, K:].T, K)
    assert r["share"] == pytest.approx({"two_sided": 0.0, "left": 0.0, "right": 0.0}, abs=1e-9)
    assert r["k_for_share"]["0.5"] > K


def test_one_sided_shares_tell_left_from_right(svd):
    U, _, V, W = svd
    # left factor inside the top-k, right factor outside: only the left share is 1
    r = analyze_delta(W, 0.1 * U[:, :K] @ V[:, K : 2 * K].T, K)
    assert r["share"] == pytest.approx({"two_sided": 0.0, "left": 1.0, "right": 0.0}, abs=1e-9)


def test_rotating_one_top_vector_out_of_the_subspace_gives_that_angle(svd):
    U, S, V, W = svd
    theta = math.radians(20.0)
    U2 = U.clone()
    U2[:, 0] = math.cos(theta) * U[:, 0] + math.sin(theta) * U[:, K]  # leaves span(U_k)
    U2[:, K] = -math.sin(theta) * U[:, 0] + math.cos(theta) * U[:, K]  # stays orthonormal
    r = analyze_pair(W, U2 @ torch.diag(S) @ V.T, K)
    assert r["sigma_ratio_topk"] == pytest.approx([1.0] * K, abs=1e-9)
    assert r["angles_left_deg"][-1] == pytest.approx(20.0, abs=1e-6)
    assert max(r["angles_left_deg"][:-1]) < 1e-6
    assert max(r["angles_right_deg"]) < 1e-6
    # by index, only u_1 moved
    assert r["vector_angles_left_deg"][0] == pytest.approx(20.0, abs=1e-6)
    assert max(r["vector_angles_left_deg"][1:] + r["vector_angles_right_deg"]) < 1e-5


def test_principal_angles_of_orthogonal_subspaces_are_ninety():
    eye = torch.eye(6, dtype=torch.float64)
    assert principal_angles(eye[:, :2], eye[:, 2:4]).tolist() == pytest.approx([90.0, 90.0])


def test_zero_delta_has_no_share_and_unit_ratios(svd):
    _, _, _, W = svd
    r = analyze_pair(W, W.clone(), K)
    assert r["fro_delta"] == 0 and r["share"]["two_sided"] is None
    assert r["sigma_ratio_topk"] == pytest.approx([1.0] * K)


def test_top_k_larger_than_rank_is_clamped(svd):
    _, _, _, W = svd
    r = analyze_pair(W, 1.1 * W, 1000)
    assert r["k"] == IN and len(r["angles_left_deg"]) == IN


# ------------------------------------------------------------------ checkpoints end to end


def _save_llama(path, seed: int, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=64)  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny base and a 'tuned' copy whose q_proj top singular values are amplified."""
    root = tmp_path_factory.mktemp("llamas")
    base = _save_llama(root / "base", seed=0)
    with torch.no_grad():
        for layer in base.model.layers:
            w = layer.self_attn.q_proj.weight
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            S[:3] *= 1.5
            w.copy_(U @ torch.diag(S) @ Vh)
            layer.mlp.down_proj.weight.add_(0.01 * torch.randn_like(layer.mlp.down_proj.weight))
    base.save_pretrained(root / "tuned", safe_serialization=True)
    return root


def test_end_to_end_report(llama_pair, tmp_path):
    from adapters_zoo.analysis_report import write_report

    result = analyze(llama_pair / "base", llama_pair / "tuned", top_k=4, progress=False)
    assert result["meta"]["n_layers"] == 2 * 7  # q k v o gate up down per block
    q = result["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["sigma_ratio_topk"][:3] == pytest.approx([1.5] * 3, abs=1e-4)
    assert q["share"]["two_sided"] == pytest.approx(1.0, abs=1e-4)
    assert result["layers"]["model.layers.0.self_attn.k_proj"]["fro_delta"] == 0
    assert result["summary"]["all"]["share.two_sided"]["n"] == 4  # only changed layers have shares

    paths = write_report(result, tmp_path / "rep")
    for name in ["report.json", "report.md", "sigma_ratio.png", "energy_share.png", "principal_angles.png"]:
        assert paths[name].is_file() and paths[name].stat().st_size > 0
    assert paths["sigma_ratio.png"].read_bytes()[:4] == b"\x89PNG"
    loaded = json.loads(paths["report.json"].read_text())
    assert set(loaded["layers"]) == set(result["layers"])
    md = paths["report.md"].read_text()
    assert "model.layers.1.mlp.down_proj" in md and "![sigma_ratio.png](sigma_ratio.png)" in md


def test_cli_writes_report_and_json(llama_pair, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    base, tuned, out = (str(p) for p in (llama_pair / "base", llama_pair / "tuned", tmp_path / "cli"))
    args = parser.parse_args(["analyze", base, tuned, "--out", out, "--top", "3", "--targets", "q_proj", "--json"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["meta"]["n_layers"] == 2 and printed["meta"]["targets"] == ["q_proj"]
    assert (tmp_path / "cli" / "report.md").is_file()


def test_mismatched_shapes_name_the_layer(llama_pair, tmp_path):
    _save_llama(tmp_path / "wide", seed=0, intermediate_size=48)
    with pytest.raises(ModelDirError, match=r"model\.layers\.0\.mlp\.gate_proj: shape \(64, 32\)"):
        analyze(llama_pair / "base", tmp_path / "wide", progress=False)


def test_different_layer_sets_name_the_layer(llama_pair, tmp_path):
    _save_llama(tmp_path / "deep", seed=0, num_hidden_layers=3)
    with pytest.raises(ModelDirError, match=r"no layer model\.layers\.2\.self_attn\.q_proj"):
        analyze(llama_pair / "base", tmp_path / "deep", progress=False)


def test_missing_tensor_names_it(llama_pair, tmp_path):
    tuned = tmp_path / "broken"
    tuned.mkdir()
    (tuned / "config.json").write_text((llama_pair / "tuned" / "config.json").read_text())
    tensors = load_file(llama_pair / "tuned" / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        analyze(llama_pair / "base", tuned, progress=False)


def test_non_finite_weight_is_refused(llama_pair, tmp_path):
    tuned = tmp_path / "nan"
    tuned.mkdir()
    (tuned / "config.json").write_text((llama_pair / "tuned" / "config.json").read_text())
    tensors = load_file(llama_pair / "tuned" / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match=r"model\.layers\.0\.mlp\.up_proj.*(NaN|non-finite)"):
        analyze(llama_pair / "base", tuned, progress=False)


# ------------------------------------------------------------------ base + spectral adapter


def _scale_adapter(model_dir, out_dir, lam: list[float]):
    from adapters_zoo.basis import compute_basis, save_basis
    from adapters_zoo.format import new_adapter, save_adapter

    basis = compute_basis(model_dir, len(lam), targets="q_proj", progress=False)
    adapter = new_adapter("scale", {}, basis)
    for params in adapter.params.values():
        params["lam"] = torch.tensor(lam)
    return save_adapter(adapter, out_dir / "scale.safetensors"), save_basis(basis, out_dir / "basis.safetensors")


def test_adapter_mode_measures_the_adapters_rescaling(llama_pair, tmp_path):
    adapter_file, basis_file = _scale_adapter(llama_pair / "base", tmp_path, [0.5, 0.25, 0.0, 0.0])
    result = analyze(llama_pair / "base", adapter_file=adapter_file, basis_file=basis_file, top_k=4, progress=False)
    assert set(result["layers"]) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    for lay in result["layers"].values():
        assert lay["sigma_ratio_topk"] == pytest.approx([1.5, 1.25, 1.0, 1.0], abs=1e-4)
        assert lay["share"]["two_sided"] == pytest.approx(1.0, abs=1e-5)
        assert lay["angles"]["left_max"] < 0.1 and lay["angles"]["right_max"] < 0.1


def test_adapter_of_another_base_is_refused(llama_pair, tmp_path):
    _save_llama(tmp_path / "other", seed=1)
    adapter_file, basis_file = _scale_adapter(tmp_path / "other", tmp_path, [0.5, 0.0])
    with pytest.raises(BasisMismatch, match=r"model\.layers\.0\.self_attn\.q_proj"):
        analyze(llama_pair / "base", adapter_file=adapter_file, basis_file=basis_file, progress=False)


def test_adapter_mode_needs_the_basis(llama_pair, tmp_path):
    adapter_file, _ = _scale_adapter(llama_pair / "base", tmp_path, [0.5])
    with pytest.raises(IncompatibleAdapter, match="--basis"):
        analyze(llama_pair / "base", adapter_file=adapter_file, progress=False)
