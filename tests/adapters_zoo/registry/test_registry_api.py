"""The Registry facade on real files: add / get / load / remove / verify / gc / bases / mixtures."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from registry_fixtures import K, perturbed
from safetensors import safe_open
from safetensors.torch import save_file

from adapters_zoo.basis import Basis, LayerBasis
from adapters_zoo.errors import (
    AdapterExists,
    AdapterFormatError,
    AdapterNotFound,
    BaseNotDeclared,
    IncompatibleAdapter,
    IntegrityError,
    InvalidConfig,
    InvalidMixture,
    InvalidName,
    RegistryError,
    UnknownKind,
)
from adapters_zoo.format import adapter_to_bytes, load_adapter, new_adapter
from adapters_zoo.registry import AdapterRecord, Registry, default_home
from adapters_zoo.registry.mixture import resolve
from adapters_zoo.registry.store import HOST_TAG


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_params(a, b) -> bool:
    return a.params.keys() == b.params.keys() and all(
        a.params[layer].keys() == b.params[layer].keys()
        and all(torch.equal(a.params[layer][n], b.params[layer][n]) for n in a.params[layer])
        for layer in a.params
    )


def _tamper(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor value
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- add / get / load


def test_add_stores_the_file_content_addressed_and_loads_it_back(registry, adapter_files, basis):
    rec = registry.add(adapter_files["code"], "code", tags=["skill", "py"], metrics={"acc": 0.9}, description="x")
    assert (rec.name, rec.version, rec.kind, rec.base_fingerprint, rec.basis_k) == ("code", "1", "svft",
                                                                                      basis.fingerprint, K)
    assert rec.sha256 == _sha(adapter_files["code"]) and rec.size == adapter_files["code"].stat().st_size
    blob = registry.home / "blobs" / rec.sha256[:2] / rec.sha256
    assert blob.read_bytes() == adapter_files["code"].read_bytes()
    assert rec.tags == ("py", "skill") and rec.metrics == {"acc": 0.9} and rec.description == "x"
    assert rec.num_params == load_adapter(adapter_files["code"]).num_params() > 0
    assert rec.ref == "code@1" and json.loads(json.dumps(rec.to_json()))["ref"] == "code@1"

    loaded = registry.load("code")
    original = load_adapter(adapter_files["code"], basis)
    assert _same_params(loaded, original)
    for layer in basis.layer_names():
        assert torch.equal(loaded.delta(layer, basis), original.delta(layer, basis))
    assert registry.get("code@1") == rec == registry.resolve("code")[0]


def test_bytes_adapter_object_and_file_sources_store_the_same_adapter(registry, adapter_files):
    path = adapter_files["math"]
    by_file = registry.add(path, "a")
    by_bytes = registry.add(path.read_bytes(), "b")
    by_str = registry.add(str(path), "d")
    assert by_file.sha256 == by_bytes.sha256 == by_str.sha256  # identical bytes: one blob
    assert len(list(registry.store)) == 2  # that blob and the basis blob
    # safetensors writes metadata in hash-map order, so re-serialising may give other bytes
    registry.add(load_adapter(path), "c")
    assert _same_params(registry.load("c"), registry.load("a"))


def test_versions_auto_increment_and_are_never_reused(registry, adapter_files):
    f = adapter_files["math"]
    assert [registry.add(f, "math").version for _ in range(3)] == ["1", "2", "3"]
    assert registry.get("math").version == "3" and registry.get("math@2").version == "2"
    assert registry.add(f, "math", version="v2-beta.1").version == "v2-beta.1"
    assert registry.get("math").version == "v2-beta.1"  # latest = added last
    assert registry.add(f, "math").version == "4"
    assert registry.add(f, "math", version="10").version == "10"
    assert registry.add(f, "math").version == "11"
    with pytest.raises(AdapterExists, match="math@10"):
        registry.add(f, "math", version="10")
    registry.remove("math@11")
    assert registry.add(f, "math").version == "12"
    registry.remove("math")
    assert registry.add(f, "math").version == "13"


def test_add_validates_format_kind_and_values_and_stores_nothing_on_failure(registry, adapter_files, tmp_path):
    good = adapter_files["math"].read_bytes()
    with safe_open(str(adapter_files["math"]), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterFormatError, match="truncated"):
        registry.add(truncated, "bad")

    nan = dict(tensors)
    key = next(iter(nan))
    nan[key] = nan[key].clone()
    nan[key][0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(AdapterFormatError, match="NaN"):
        registry.add(tmp_path / "nan.safetensors", "bad")

    save_file(tensors, tmp_path / "kind.safetensors", metadata=meta | {"kind": "nope"})
    with pytest.raises(UnknownKind, match="nope"):
        registry.add(tmp_path / "kind.safetensors", "bad")

    save_file(tensors, tmp_path / "foreign.safetensors")  # no specfuse metadata
    with pytest.raises(AdapterFormatError, match="not a specfuse adapter"):
        registry.add(tmp_path / "foreign.safetensors", "bad")

    wrong_shape = dict(tensors)
    wrong_shape[key] = torch.zeros(K + 1)
    save_file(wrong_shape, tmp_path / "shape.safetensors", metadata=meta)
    with pytest.raises(AdapterFormatError, match="shape"):
        registry.add(tmp_path / "shape.safetensors", "bad")

    with pytest.raises(AdapterFormatError, match="not found"):
        registry.add(tmp_path / "missing.safetensors", "bad")
    with pytest.raises(AdapterFormatError):
        registry.add(b"\x00" * 4, "bad")
    with pytest.raises(InvalidConfig, match="path, bytes or an Adapter"):
        registry.add(12, "bad")
    with pytest.raises(InvalidConfig, match="finite"):
        registry.add(good, "bad", metrics={"acc": float("nan")})
    with pytest.raises(InvalidConfig, match="metrics"):
        registry.add(good, "bad", metrics=[1, 2])
    with pytest.raises(InvalidName, match="tag"):
        registry.add(good, "bad", tags=["ok", "no/slash"])

    assert registry.list() == [] and registry.unreferenced() == []


def test_adapter_of_an_undeclared_base_is_refused_naming_the_basis_command(registry, adapter_files, bases):
    with pytest.raises(BaseNotDeclared) as err:
        registry.add(adapter_files["other_base"], "other")
    message = str(err.value)
    assert bases[1].fingerprint in message and f"specfuse basis MODEL_DIR --rank {K} --home {registry.home}" in message
    assert "\n" not in message and registry.list() == []
    registry.add_basis(bases[1])
    assert registry.add(adapter_files["other_base"], "other").base_fingerprint == bases[1].fingerprint


def test_adapter_for_another_k_of_a_declared_base_is_refused(registry, basis):
    small = Basis(
        {n: LayerBasis(lb.U[:, :2], lb.S[:2], lb.V[:, :2]) for n, lb in basis.layers.items()}, basis.fingerprint, 2
    )
    adapter = new_adapter("scale", {"rank": 2}, small)
    with pytest.raises(IncompatibleAdapter, match="k=2"):
        registry.add(adapter, "small")
    assert registry.list() == []


# --------------------------------------------------------------------------- list / names / errors


def test_list_filters_by_kind_tag_and_base(registry, adapter_files, bases):
    registry.add_basis(bases[1])
    registry.add(adapter_files["math"], "math", tags=["skill"])
    registry.add(adapter_files["code"], "code", tags=["skill", "py"])
    registry.add(adapter_files["style"], "style", tags=["style"])
    registry.add(adapter_files["other_base"], "other", tags=["skill"])
    assert [r.ref for r in registry.list()] == ["code@1", "math@1", "other@1", "style@1"]
    assert [r.ref for r in registry.list(kind="scale")] == ["math@1", "other@1"]
    assert [r.ref for r in registry.list(tag="skill")] == ["code@1", "math@1", "other@1"]
    assert [r.ref for r in registry.list(tag="skill", base=bases[0].fingerprint)] == ["code@1", "math@1"]
    assert [r.ref for r in registry.compatible(bases[1].fingerprint)] == ["other@1"]
    assert registry.list(kind="lora") == [] and registry.list(tag="nope") == []
    assert all(isinstance(r, AdapterRecord) for r in registry.list())


@pytest.mark.parametrize("bad", ["../x", "", "a" * 129, "a/b", "..", ".hidden", "a b", "-x", "x\n", "é", "a@b@c"])
def test_bad_names_are_refused_everywhere(registry, adapter_files, bad):
    with pytest.raises(InvalidName):
        registry.add(adapter_files["math"], bad)
    with pytest.raises(InvalidName):
        registry.get(bad)
    with pytest.raises(InvalidName):
        registry.add(adapter_files["math"], "fine", version=bad)
    assert registry.list() == []


def test_longest_allowed_name_works(registry, adapter_files):
    name = "a" * 128
    assert registry.add(adapter_files["math"], name, version="b" * 128).ref == f"{name}@{'b' * 128}"


def test_unknown_names_give_one_line_with_close_matches(registry, adapter_files):
    registry.add(adapter_files["math"], "math")
    registry.add(adapter_files["math"], "math-v2")
    registry.add(adapter_files["code"], "code")
    with pytest.raises(AdapterNotFound) as err:
        registry.get("mth")
    assert "'mth'" in str(err.value) and "did you mean: math" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AdapterNotFound, match=r"no version '7' \(versions: 1\)"):
        registry.load("math@7")
    with pytest.raises(AdapterNotFound, match="1 adapter|3 adapters"):
        registry.remove("zzzzzz")
    assert isinstance(err.value, KeyError)  # callers that catch KeyError keep working


# --------------------------------------------------------------------------- tampering, verify, gc


def test_a_blob_altered_on_disk_is_caught_by_load_and_verify(registry, adapter_files):
    rec = registry.add(adapter_files["math"], "math")
    registry.add(adapter_files["code"], "code")
    assert registry.load("math") is not None and registry.verify() == []
    _tamper(registry.store.path(rec.sha256))
    with pytest.raises(IntegrityError, match="altered"):
        registry.load("math")
    with pytest.raises(IntegrityError):
        Registry(registry.home).load("math@1")  # a fresh process sees it too
    problems = registry.verify()
    assert len(problems) == 1 and problems[0].startswith("math@1:") and "altered" in problems[0]
    assert registry.load("code") is not None  # the others still load

    registry.add(adapter_files["math"], "math")  # re-adding the same bytes repairs the blob
    assert registry.verify() == [] and registry.load("math@1") is not None


def test_a_missing_blob_and_a_tampered_basis_are_reported(registry, adapter_files, basis):
    rec = registry.add(adapter_files["math"], "math")
    registry.store.path(rec.sha256).unlink()
    assert registry.verify() == [f"math@1: blob {rec.sha256} is missing"]
    with pytest.raises(IntegrityError, match="missing"):
        registry.load("math")

    basis_sha = registry.bases()[0]["sha256"]
    _tamper(registry.store.path(basis_sha))
    fresh = Registry(registry.home)  # no cached basis
    assert any(p.startswith(f"basis {basis.fingerprint}:") for p in fresh.verify())
    with pytest.raises(IntegrityError, match=f"basis {basis.fingerprint}"):
        fresh.basis(basis.fingerprint)


def test_remove_and_gc_collect_only_unreferenced_blobs(registry, adapter_files, basis):
    a = registry.add(adapter_files["math"], "math")
    registry.add(adapter_files["math"], "math-copy")  # same bytes, same blob
    registry.add(adapter_files["code"], "code")
    assert [r.ref for r in registry.remove("math")] == ["math@1"]
    assert registry.gc() == 0 and registry.store.has(a.sha256)  # math-copy still uses it
    registry.remove("math-copy@1")
    assert registry.unreferenced() == [a.sha256]
    assert registry.gc() == 1 and not registry.store.has(a.sha256)
    assert registry.load("code") is not None and registry.basis(basis.fingerprint) is not None
    assert registry.verify() == [] and registry.gc() == 0


def test_gc_sweeps_orphans_and_dead_writers_temp_files_only(registry):
    orphan, _ = registry.store.put_bytes(b"left by a writer that died before its commit")
    dead = registry.store.tmp_dir / f"2147483646-{HOST_TAG}-deadbeef.part"  # no such pid
    alive = registry.store.tmp_dir / f"{os.getpid()}-{HOST_TAG}-cafe.part"  # this process: in flight
    dead.write_bytes(b"partial")
    alive.write_bytes(b"partial")
    assert registry.gc() == 1 and not registry.store.has(orphan)
    assert not dead.exists() and alive.exists()


# --------------------------------------------------------------------------- bases


def test_bases_are_declared_once_cached_and_counted(registry, adapter_files, basis, bases):
    assert registry.add_basis(basis) == basis.fingerprint  # idempotent
    registry.add(adapter_files["math"], "math")
    [row] = registry.bases()
    assert (row["fingerprint"], row["k"], row["num_layers"], row["adapters"]) == (basis.fingerprint, K, 4, 1)
    held = registry.basis(basis.fingerprint)
    assert held is registry.basis(basis.fingerprint)  # cached
    for name, lb in basis.layers.items():
        assert torch.equal(held[name].U, lb.U) and torch.equal(held[name].S, lb.S)
    with pytest.raises(BaseNotDeclared, match="specfuse basis"):
        registry.basis(bases[1].fingerprint)
    registry.add_basis(bases[1])
    assert {b["fingerprint"] for b in registry.bases()} == {bases[0].fingerprint, bases[1].fingerprint}


def test_a_base_switches_k_only_while_no_adapter_uses_it(registry, adapter_files, basis):
    small = Basis(
        {n: LayerBasis(lb.U[:, :2], lb.S[:2], lb.V[:, :2]) for n, lb in basis.layers.items()}, basis.fingerprint, 2
    )
    registry.add(adapter_files["math"], "math")
    with pytest.raises(RegistryError, match="1 adapter version"):
        registry.add_basis(small)
    registry.remove("math")
    registry.add_basis(small)
    assert registry.basis(basis.fingerprint).rank == 2 and registry.bases()[0]["k"] == 2
    assert registry.add(new_adapter("scale", {"rank": 2}, small), "small").basis_k == 2


# --------------------------------------------------------------------------- mixtures


def test_resolve_returns_versions_records_and_weights(registry, adapter_files, bases):
    registry.add(adapter_files["math"], "math")
    registry.add(adapter_files["math"], "math")
    registry.add(adapter_files["code"], "code")
    mix = resolve(registry, "math:0.7, code@1:0.3").given
    assert [(c.ref, c.weight) for c in mix] == [("math@2", 0.7), ("code@1", 0.3)]
    assert [registry.load_record(c.record).kind for c in mix] == ["scale", "svft"]
    assert [(c.ref, c.weight) for c in resolve(registry, {"code": 1.0, "math@1": 0.5}).given] == [
        ("code@1", 1.0), ("math@1", 0.5)
    ]
    with pytest.raises(InvalidMixture, match="same adapter"):
        resolve(registry, "math,math@2")
    with pytest.raises(AdapterNotFound, match="did you mean: code"):
        resolve(registry, "math:0.5,cod:0.5")
    with pytest.raises(InvalidMixture, match="negative"):
        resolve(registry, {"math": -1.0})
    assert resolve(registry, "math:1,code:-0.5", allow_negative=True).given[1].weight == -0.5

    registry.add_basis(bases[1])
    registry.add(adapter_files["other_base"], "other")
    with pytest.raises(IncompatibleAdapter, match="one basis"):
        resolve(registry, "math,other")


# --------------------------------------------------------------------------- home


def test_home_comes_from_the_argument_then_the_environment_then_the_user_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFUSE_HOME", str(tmp_path / "env-home"))
    assert default_home() == tmp_path / "env-home"
    with Registry() as reg:
        assert reg.home == tmp_path / "env-home" and (reg.home / "catalog.db").is_file()
    monkeypatch.delenv("SPECFUSE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_home() == tmp_path / "user" / ".specfuse"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(tmp_path / "file")
    with pytest.raises(InvalidConfig, match="not supported"):
        Registry(tmp_path / "h", catalog_url="mysql://x/y")


def test_adapter_bytes_survive_a_round_trip_through_the_catalog(registry, basis):
    adapter = perturbed("additive", {"rank": 2}, basis, seed=11)
    rec = registry.add(adapter, "additive")
    assert rec.sha256 == _sha(registry.store.path(rec.sha256)) and rec.size == len(adapter_to_bytes(adapter))
    assert _same_params(registry.load("additive"), adapter)
