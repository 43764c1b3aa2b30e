"""A miniature zoo build: real pretraining, basis, training, registry, report — tiny sizes."""

from pathlib import Path

import pytest
from safetensors import safe_open

from adapters_zoo.format import load_adapter
from adapters_zoo.registry import Registry
from adapters_zoo.zoo import ZooSettings, build_zoo, registry_name, report_markdown

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _settings(out: Path, **kw) -> ZooSettings:
    base = dict(out=out, base="char", suites=("compatible",), kinds=("scale", "rotation"), peft_lora=False,
                tasks_per_suite=2,
                rank=8, steps=6, batch_size=8, n_train=32, n_eval=8, pretrain_steps=8, model_overrides=TINY)
    base.update(kw)
    return ZooSettings(**base)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    return out, build_zoo(_settings(out), progress=False)


def test_build_writes_adapters_registry_and_report(zoo):
    out, report = zoo
    entries = report["entries"]
    assert {(e["task"], e["kind"]) for e in entries} == {
        (t, k) for t in ("reverse_upper", "sort_digits") for k in ("scale", "rotation")
    }
    registry = Registry(out / "registry")
    names = {r.name for r in registry.list()}
    assert names == {registry_name(e["task"], e["kind"]) for e in entries}
    adapter = registry.load(registry_name("sort_digits", "scale"))
    assert adapter.meta["task"] == "sort_digits"
    assert len(adapter.meta["signature"]) == TINY["hidden_size"]
    assert adapter.base_fingerprint == report["base_fingerprint"]
    for split in ("train", "validation", "test"):
        assert (out / "data" / "compatible" / f"sort_digits.{split}.jsonl").is_file()
    md = (out / "report.md").read_text()
    assert md == report_markdown(report) and "| sort_digits |" in md
    for e in entries:
        assert 0.0 <= e["accuracy"] <= 1.0 and e["params"] > 0 and e["bytes"] > 0


def test_same_seed_gives_identical_files(zoo, tmp_path):
    out, _ = zoo
    build_zoo(_settings(tmp_path), progress=False)
    files = sorted(p.relative_to(out) for p in (out / "adapters").rglob("*.safetensors"))
    assert files
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert (out / "base" / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors").read_bytes()


def test_rebuild_resumes_without_new_versions(zoo):
    out, _ = zoo
    build_zoo(_settings(out), progress=False)
    registry = Registry(out / "registry")
    assert all(r.version == "1" for r in registry.list())


def test_adapter_files_validate(zoo):
    out, _ = zoo
    for path in (out / "adapters").rglob("*.safetensors"):
        adapter = load_adapter(path)
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["kind"] == adapter.kind
