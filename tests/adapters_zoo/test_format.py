"""Adapter files: exact round trips for every kind, and typed errors for every way a file can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters_zoo.basis import basis_from_model
from adapters_zoo.errors import AdapterFormatError, IncompatibleAdapter, UnknownKind
from adapters_zoo.format import adapter_from_bytes, adapter_to_bytes, load_adapter, new_adapter, save_adapter

KIND_CONFIGS = [
    ("scale", {"rank": 4, "lora_rank": 2}),
    ("svft", {"pattern": "random", "d": 2, "seed": 5}),
    ("rotation", {"slice": "2:6"}),
    ("additive", {"rank": 3}),
    ("lora", {"rank": 2}),
    ("core", {}),
]


@pytest.fixture(scope="module")
def basis(tiny_llama_dir):
    return basis_from_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True), 8)


@pytest.fixture(scope="module")
def other_basis(other_llama_dir):
    return basis_from_model(AutoModelForCausalLM.from_pretrained(other_llama_dir, local_files_only=True), 8)


def _trained_like(kind: str, config: dict, basis, seed: int = 0):
    adapter = new_adapter(kind, config, basis, meta={"name": kind, "metrics": {"acc": 0.5}})
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.params.values():
        for name, t in params.items():
            if name not in adapter.kind_impl.frozen:
                params[name] = t + torch.randn(t.shape, generator=gen)
    return adapter


@pytest.fixture
def scale_file(basis, tmp_path):
    return save_adapter(_trained_like("scale", {"rank": 4}, basis), tmp_path / "scale.safetensors")


def _contents(data: bytes) -> tuple[dict, dict]:
    """(metadata, {key: (dtype, shape, raw bytes)}) of a safetensors file."""
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    tensors = {k: (str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for k, t in load_bytes(data).items()}
    return header.pop("__metadata__"), tensors


def _rewrite(src, dst, tensors=None, meta=None):
    """Write a copy of the adapter file ``src`` with its tensors and/or metadata edited."""
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    data = load_file(src)
    if tensors:
        tensors(data)
    if meta:
        meta(metadata)
    save_file(data, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("kind,config", KIND_CONFIGS, ids=[k for k, _ in KIND_CONFIGS])
def test_round_trip_is_bit_for_bit(basis, tmp_path, kind, config):
    adapter = _trained_like(kind, config, basis)
    path = save_adapter(adapter, tmp_path / f"{kind}.safetensors")
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file is renamed away"
    loaded = load_adapter(path, basis)
    assert (loaded.kind, loaded.config, loaded.base_fingerprint, loaded.basis_k, loaded.meta) == (
        adapter.kind, adapter.config, adapter.base_fingerprint, adapter.basis_k, adapter.meta)
    assert loaded.layers == adapter.layers
    for layer in adapter.layers:
        assert loaded.params[layer].keys() == adapter.params[layer].keys()
        for name, t in adapter.params[layer].items():
            assert loaded.params[layer][name].dtype == t.dtype
            assert torch.equal(loaded.params[layer][name], t), (layer, name)
        assert torch.equal(loaded.delta(layer, basis), adapter.delta(layer, basis))
    # Saved again, the file is the same byte for byte (the header is written canonically).
    assert adapter_to_bytes(loaded) == path.read_bytes()
    assert adapter_to_bytes(adapter_from_bytes(path.read_bytes(), basis)) == path.read_bytes()
    assert _contents(adapter_to_bytes(loaded)) == _contents(path.read_bytes())
    assert loaded.num_params() == adapter.num_params() > 0


def test_scale_adapter_is_small(basis):
    adapter = new_adapter("scale", {"rank": 8}, basis)
    assert adapter.num_params() == 8 * len(basis.layers)
    assert len(adapter_to_bytes(adapter)) < 8 * 1024  # 14 layers × 8 floats plus the header


def test_adapter_of_another_base_is_refused(basis, other_basis, scale_file):
    with pytest.raises(IncompatibleAdapter, match=f"trained on base {basis.fingerprint}"):
        load_adapter(scale_file, other_basis)
    with pytest.raises(IncompatibleAdapter, match="k=8"):
        load_adapter(scale_file, basis_like_rank(basis, 6))


def basis_like_rank(basis, k: int):
    from adapters_zoo.basis import Basis, LayerBasis

    layers = {n: LayerBasis(lb.U[:, :k], lb.S[:k], lb.V[:, :k]) for n, lb in basis.layers.items()}
    return Basis(layers, basis.fingerprint, k)


def test_truncated_and_corrupt_files_are_format_errors(scale_file, tmp_path):
    data = scale_file.read_bytes()
    for name, blob in [("half", data[: len(data) // 2]), ("header", data[:20]), ("empty", b""),
                       ("garbage", b"\x00\x01not a safetensors file" * 10)]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(AdapterFormatError, match="truncated or corrupt|not a readable"):
            load_adapter(bad)
        with pytest.raises(AdapterFormatError):
            adapter_from_bytes(blob)
    with pytest.raises(AdapterFormatError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")


def test_nan_parameter_is_refused(scale_file, tmp_path):
    def poison(tensors):
        key = next(k for k in tensors if k.endswith(".lam"))
        tensors[key][1] = float("nan")

    bad = _rewrite(scale_file, tmp_path / "nan.safetensors", tensors=poison)
    with pytest.raises(AdapterFormatError, match="NaN or infinite"):
        load_adapter(bad)
    with pytest.raises(AdapterFormatError, match="NaN or infinite"):
        adapter_from_bytes(bad.read_bytes())


def test_unknown_kind_in_file_is_refused(scale_file, tmp_path):
    bad = _rewrite(scale_file, tmp_path / "kind.safetensors", meta=lambda m: m.update(kind="dora"))
    with pytest.raises(UnknownKind, match="'dora'"):
        load_adapter(bad)


def test_foreign_and_inconsistent_files_are_refused(basis, scale_file, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(AdapterFormatError, match="not a specfuse adapter"):
        load_adapter(foreign)
    cases = {
        "version": (None, lambda m: m.update(format_version="9"), "version '9' is not supported"),
        "no-kind": (None, lambda m: m.pop("kind"), "'kind' is missing"),
        "config": (None, lambda m: m.update(config="{not json"), "not valid JSON"),
        "bad-config": (None, lambda m: m.update(config=json.dumps({"rank": -1})), "bad scale config"),
        "stray": (lambda t: t.update({"nowhere.lam": torch.zeros(4)}), None, "belongs to no target layer"),
        "int-values": (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}), None, "floating point"),
    }
    for name, (tensors, meta, message) in cases.items():
        bad = _rewrite(scale_file, tmp_path / f"{name}.safetensors", tensors=tensors, meta=meta)
        with pytest.raises(AdapterFormatError, match=message):
            load_adapter(bad)
    wrong_shape = _rewrite(scale_file, tmp_path / "shape.safetensors",
                           tensors=lambda t: t.update({k: torch.zeros(5) for k in t}))
    load_adapter(wrong_shape)  # readable on its own...
    with pytest.raises(AdapterFormatError, match=r"shape \(5,\), expected \(4,\)"):
        load_adapter(wrong_shape, basis)  # ...but not in this basis
