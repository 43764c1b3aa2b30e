"""Every kind: identity at init, wrapped layer == x (W + ΔW)ᵀ, each paper's ΔW, and the papers' counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DebertaV2Config, GemmaConfig

from adapters_zoo.basis import basis_from_model
from adapters_zoo.cli import count_kind_params
from adapters_zoo.errors import InvalidConfig, UnknownKind
from adapters_zoo.format import count_params, new_adapter
from adapters_zoo.inject import SpectralLinear, attach, detach
from adapters_zoo.kinds import KINDS, get_kind
from adapters_zoo.kinds.rotation import cayley, skew
from adapters_zoo.kinds.svft import SvftConfig, pattern_indices, pattern_size

CASES = [  # (kind, config, basis k)
    ("scale", {"rank": 4}, 8),
    ("scale", {"rank": 4, "lora_rank": 2}, 8),
    ("scale", {"slice": "2:6"}, 8),
    ("svft", {"pattern": "plain"}, "full"),
    ("svft", {"pattern": "banded", "d": 2}, 8),
    ("svft", {"pattern": "random", "d": 1, "seed": 3}, 8),
    ("svft", {"pattern": "topk", "d": 1}, 8),
    ("svft", {"pattern": "banded", "d": 1, "slice": "2:7", "gate": False}, 8),
    ("rotation", {"rank": 4}, 8),
    ("rotation", {"rank": 4, "scale": False}, 8),
    ("rotation", {"slice": "3:8"}, 8),
    ("additive", {"rank": 3}, 8),
    ("additive", {"slice": "4:8"}, 8),
    ("lora", {"rank": 2}, 8),
    ("core", {}, 8),
    ("core", {"diagonal": True}, 8),
]
IDENTITY_CASES = [
    ("scale", {"rank": 4}), ("scale", {"rank": 4, "lora_rank": 2}), ("svft", {"pattern": "banded", "d": 1}),
    ("rotation", {"rank": 4}), ("additive", {"rank": 4}), ("lora", {"rank": 4}),
]


def _case_id(case) -> str:
    return "-".join([case[0]] + [f"{k}={v}" for k, v in case[1].items()])


@pytest.fixture(scope="module")
def models(model_dirs):
    return {arch: AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
            for arch, d in model_dirs.items()}


@pytest.fixture(scope="module")
def bases(models):
    cache = {}

    def get(arch: str, k):
        if (arch, k) not in cache:
            cache[arch, k] = basis_from_model(models[arch], k)
        return cache[arch, k]

    return get


def _perturbed(adapter, seed: int = 0, scale: float = 0.3):
    """The adapter with every trainable tensor moved off its initial value (indices kept)."""
    gen = torch.Generator().manual_seed(seed)
    frozen = adapter.kind_impl.frozen
    for params in adapter.params.values():
        for name, t in params.items():
            if name not in frozen:
                params[name] = t + scale * torch.randn(t.shape, generator=gen)
    return adapter


def _dense(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in), bias) of a Linear or a GPT-2 Conv1D."""
    w = module.weight.detach()
    return (w.T if type(module).__name__ == "Conv1D" else w), module.bias


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind,config", IDENTITY_CASES, ids=[_case_id(c) for c in IDENTITY_CASES])
def test_initial_adapter_leaves_logits_unchanged(models, bases, arch, kind, config):
    model, basis = models[arch], bases(arch, 8)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        attach(model, new_adapter(kind, config, basis), basis)
        try:
            adapted = model(ids).logits
        finally:
            detach(model)
    if kind == "additive":  # its core is P_U Σ P_Vᵀ − Σ with P = U_kᵀ U_s ≈ I: zero up to rounding
        torch.testing.assert_close(adapted, base, atol=1e-5, rtol=1e-5)
    else:  # the core and residual are exact zeros
        assert torch.equal(adapted, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind,config,k", CASES, ids=[_case_id(c) for c in CASES])
def test_wrapped_layer_equals_dense_update(models, bases, arch, kind, config, k):
    model, basis = models[arch], bases(arch, k)
    adapter = _perturbed(new_adapter(kind, config, basis))
    wrappers = attach(model, adapter, basis)
    try:
        assert len(wrappers) == len(basis.layers)
        gen = torch.Generator().manual_seed(2)
        for wrapper in wrappers:
            lb = basis[wrapper.layer]
            delta = torch.zeros(lb.out_features, lb.in_features)
            core = adapter.core(wrapper.layer, basis)
            if core is not None:
                assert core.shape == (lb.k, lb.k)
                delta += lb.U @ core @ lb.V.T  # (out, k)(k, k)(k, in)
            res = adapter.residual(wrapper.layer, basis)
            if res is not None:
                delta += res[0] @ res[1]  # (out, q)(q, in)
            assert delta.abs().max() > 1e-3, "a perturbed adapter must change the layer"
            w, bias = _dense(wrapper.base_layer)
            x = torch.randn(2, 5, lb.in_features, generator=gen)
            expected = x @ (w + delta).T + (bias if bias is not None else 0)
            with torch.no_grad():
                torch.testing.assert_close(wrapper(x), expected, atol=1e-4, rtol=1e-4)
    finally:
        detach(model)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())


# --------------------------------------------------------------------------- each paper's ΔW


LAYER = "model.layers.0.self_attn.k_proj"  # (16, 32): not square


def _sliced(basis, a: int, b: int):
    lb = basis[LAYER]
    return lb.U[:, a:b], lb.S[a:b], lb.V[:, a:b]


def test_scale_rescales_singular_values(bases):
    basis = bases("llama", 8)
    adapter = _perturbed(new_adapter("scale", {"slice": "2:6"}, basis))
    lam = adapter.params[LAYER]["lam"]
    U, S, V = _sliced(basis, 2, 6)
    expected = U @ torch.diag(S * (1 + lam)) @ V.T - U @ torch.diag(S) @ V.T  # σᵢ -> σᵢ(1 + λᵢ)
    torch.testing.assert_close(adapter.delta(LAYER, basis), expected, atol=1e-5, rtol=1e-5)
    assert get_kind("scale").diagonal


def test_rotation_rotates_singular_vectors(bases):
    basis = bases("llama", 8)
    adapter = _perturbed(new_adapter("rotation", {"slice": "1:5"}, basis))
    p = adapter.params[LAYER]
    r_u, r_v = cayley(skew(p["G_U"])), cayley(skew(p["G_V"]))
    for r in (r_u, r_v):
        torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)
        assert float(torch.linalg.det(r)) == pytest.approx(1.0, abs=1e-5)
    U, S, V = _sliced(basis, 1, 5)
    expected = (U @ r_u) @ torch.diag(S * p["c"]) @ (V @ r_v).T - U @ torch.diag(S) @ V.T
    torch.testing.assert_close(adapter.delta(LAYER, basis), expected, atol=1e-5, rtol=1e-5)


def test_additive_split_into_core_and_residual_is_exact(bases):
    basis = bases("llama", 8)
    adapter = _perturbed(new_adapter("additive", {"slice": "3:7"}, basis), scale=0.2)
    p = adapter.params[LAYER]
    U, S, V = _sliced(basis, 3, 7)
    expected = (U + p["A_U"]) @ torch.diag(S) @ (V + p["A_V"]).T - U @ torch.diag(S) @ V.T
    torch.testing.assert_close(adapter.delta(LAYER, basis), expected, atol=1e-5, rtol=1e-5)
    B, A = adapter.residual(LAYER, basis)
    assert B.shape == (16, 8) and A.shape == (8, 32)  # rank ≤ 2r outside the basis


def test_svft_core_is_gated_sparse_matrix_on_its_pattern(bases):
    basis = bases("llama", 8)
    adapter = _perturbed(new_adapter("svft", {"pattern": "banded", "d": 1}, basis))
    p = adapter.params[LAYER]
    M = torch.zeros(8, 8)
    M[p["idx"][:, 0], p["idx"][:, 1]] = p["M"]
    core = adapter.core(LAYER, basis)
    torch.testing.assert_close(core, torch.sigmoid(p["gate"]) * M)
    assert ((core != 0) <= ((torch.arange(8)[:, None] - torch.arange(8)).abs() <= 1)).all()


def test_lora_is_scaled_low_rank_product(bases):
    basis = bases("llama", 8)
    adapter = _perturbed(new_adapter("lora", {"rank": 3, "alpha": 6.0}, basis))
    p = adapter.params[LAYER]
    torch.testing.assert_close(adapter.delta(LAYER, basis), 2.0 * p["B"] @ p["A"], atol=1e-6, rtol=1e-6)
    assert adapter.core(LAYER, basis) is None


# --------------------------------------------------------------------------- parameter counts


ALL_GEMMA = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def gemma_2b_config(tmp_path_factory):
    cfg = GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                      num_key_value_heads=1, head_dim=256, vocab_size=256000)
    out = tmp_path_factory.mktemp("gemma-2b")
    cfg.save_pretrained(out)
    return out / "config.json"


@pytest.fixture(scope="module")
def deberta_v3_base_config(tmp_path_factory):
    cfg = DebertaV2Config(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                          vocab_size=128100, relative_attention=True, pos_att_type=["p2c", "c2p"],
                          share_att_key=True, position_buckets=256, norm_rel_ebd="layer_norm",
                          max_relative_positions=-1)
    out = tmp_path_factory.mktemp("deberta-v3-base")
    cfg.save_pretrained(out)
    return out / "config.json"


def test_svft_plain_on_gemma_2b_matches_the_paper(gemma_2b_config):
    counted = count_kind_params(gemma_2b_config, "svft", {"pattern": "plain", "gate": False}, ALL_GEMMA, "full")
    assert counted["total"] == 193_536  # SVFT paper, Gemma-2B, plain
    assert counted["layers"] == 18 * 7
    assert counted["by_type"]["k_proj"] == 18 * 256  # one kv head of 256: min(256, 2048)
    with_gate = count_kind_params(gemma_2b_config, "svft", {"pattern": "plain"}, ALL_GEMMA, "full")
    assert with_gate["total"] == 193_536 + 18 * 7


def test_svft_plain_on_deberta_v3_base_matches_the_paper(deberta_v3_base_config):
    counted = count_kind_params(deberta_v3_base_config, "svft", {"pattern": "plain", "gate": False}, "all-linear",
                                "full")
    assert counted["total"] == 55_296  # SVFT paper, DeBERTaV3-base, plain, all linear layers
    assert counted["layers"] == 12 * 6


@pytest.mark.parametrize("r", [1, 4, 16])
def test_rotation_has_two_r_squared_per_layer(bases, r):
    shapes = {"layer": (64, 32, 32)}
    assert count_params("rotation", {"rank": r, "scale": False}, shapes) == 2 * r * r
    assert count_params("rotation", {"rank": r}, shapes) == 2 * r * r + r
    if r <= 8:
        basis = bases("llama", 8)
        assert new_adapter("rotation", {"rank": r}, basis).num_params() == len(basis.layers) * (2 * r * r + r)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_svft_pattern_sizes_follow_the_banded_formula(n):
    assert pattern_size(n, n + 3, "banded") == n * n  # d is capped at n − 1: the dense block
    for d in sorted({0, 1, 2, 4, n - 1}):
        if d > n - 1:
            continue
        banded = n * (2 * d + 1) - d * (d + 1)
        brute = int(((torch.arange(n)[:, None] - torch.arange(n)).abs() <= d).sum())
        assert pattern_size(n, d, "banded") == banded == brute
        for pattern in ("banded", "random", "topk"):
            cfg = SvftConfig(rank=n, pattern=pattern, d=d)
            lb = basis_like(n)
            idx = pattern_indices(n, cfg, lb, "layer")
            assert idx.shape == (banded, 2), (pattern, n, d)
            flat = idx[:, 0] * n + idx[:, 1]
            assert flat.unique().numel() == banded  # no repeats
            assert (idx[:, 0] == idx[:, 1]).sum() == n  # the diagonal is always there
            assert count_params("svft", {"rank": n, "pattern": pattern, "d": d, "gate": False},
                                {"layer": (2 * n, n, n)}) == banded


def basis_like(n: int):
    from adapters_zoo.basis import LayerBasis

    g = torch.Generator().manual_seed(n)
    U, _ = torch.linalg.qr(torch.randn(2 * n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return LayerBasis(U, torch.linspace(2, 1, n), V)


def test_scale_and_lora_counts():
    shapes = {"a": (64, 32, 8), "b": (16, 32, 8)}
    assert count_params("scale", {"rank": 8}, shapes) == 16
    assert count_params("scale", {"rank": 8, "lora_rank": 2}, shapes) == 16 + 2 * (64 + 32) + 2 * (16 + 32)
    assert count_params("lora", {"rank": 4}, shapes) == 4 * (64 + 32) + 4 * (16 + 32)


def test_unknown_kind_and_bad_configs_are_typed_errors(bases):
    with pytest.raises(UnknownKind, match="unknown adapter kind 'dora'.*known: scale"):
        get_kind("dora")
    basis = bases("llama", 8)
    with pytest.raises(UnknownKind):
        new_adapter("dora", {}, basis)
    bad = [("svft", {"pattern": "diagonal"}, "pattern"), ("scale", {"slice": "6:2"}, "slice"),
           ("scale", {"ranks": 4}, "unknown ScaleConfig field"), ("rotation", {"rank": "four"}, "integer"),
           ("lora", {"rank": 0}, "rank"), ("scale", {"slice": "9:12"}, "empty")]
    for kind, config, message in bad:
        with pytest.raises(InvalidConfig, match=message):
            new_adapter(kind, config, basis)
    assert set(KINDS) == {"scale", "svft", "rotation", "additive", "lora", "core"}
