"""Every safetensors file specfuse writes has canonical bytes: equal contents, equal bytes, in any process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters_zoo.files import canonicalize_file, save_safetensors, write_atomic

WRITE = """
import sys, torch
from adapters_zoo.files import save_safetensors
g = torch.Generator().manual_seed(0)
names = [f"layer{i}.{p}" for i in range(12) for p in ("a", "b", "c")]
tensors = {n: torch.randn(3, 5, generator=g) for n in names}
save_safetensors(dict(reversed(list(tensors.items()))) if sys.argv[2] == "rev" else tensors, sys.argv[1],
                 {"format": "pt", "note": "é"})
"""


def _header(path) -> bytes:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % 8 == 0  # tensor data stays aligned
    return data[8 : 8 + n].rstrip(b" ")


def test_two_processes_and_two_orders_write_the_same_bytes(tmp_path):
    paths = [tmp_path / f"t{i}.safetensors" for i in range(3)]
    for path, order in zip(paths, ("fwd", "rev", "fwd")):
        subprocess.run([sys.executable, "-c", WRITE, str(path), order], check=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    header = _header(paths[0])
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    with safe_open(str(paths[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "é"}
    g = torch.Generator().manual_seed(0)
    expected = {f"layer{i}.{p}": torch.randn(3, 5, generator=g) for i in range(12) for p in ("a", "b", "c")}
    loaded = load_file(str(paths[0]))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_canonicalize_file_keeps_the_tensors_and_sorts_the_header(tmp_path):
    tensors = {f"w{i}": torch.arange(i + 1, dtype=torch.float32) for i in range(30)}
    tensors["ids"] = torch.tensor([3, 1, 2], dtype=torch.int32)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    canonicalize_file(path)
    header = _header(path)
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    copy = tmp_path / "copy.safetensors"
    canonicalize_file(path, copy)  # canonical already: the same bytes again
    assert copy.read_bytes() == path.read_bytes()


def test_a_failed_save_leaves_the_old_file_and_no_temp_files(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors({"x": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors refuses them
        shared = torch.ones(4)
        save_safetensors({"x": shared, "y": shared}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_write_atomic_replaces_whole_files(tmp_path):
    path = write_atomic(tmp_path / "sub" / "r.json", b'{"a": 1}\n')
    write_atomic(path, b'{"a": 2}\n')
    assert path.read_bytes() == b'{"a": 2}\n'
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
