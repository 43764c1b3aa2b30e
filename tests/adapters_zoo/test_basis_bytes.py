"""basis.safetensors is byte-reproducible: the same basis, saved twice (two processes), gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from adapters_zoo.basis import basis_from_model, load_basis, save_basis
from adapters_zoo.demo_model import build_tiny_model

SAVE = """
import sys
from adapters_zoo.basis import basis_from_model, save_basis
from adapters_zoo.demo_model import build_tiny_model
save_basis(basis_from_model(build_tiny_model(0), rank=4), sys.argv[1])
"""


def test_two_processes_write_the_same_basis_bytes(tmp_path):
    paths = [tmp_path / f"basis{i}.safetensors" for i in range(3)]
    # hash-map order (the old header order) differs between processes, and between saves
    subprocess.run([sys.executable, "-c", SAVE, str(paths[0])], check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    basis = basis_from_model(build_tiny_model(0), rank=4)
    for path in paths[1:]:
        save_basis(basis, path)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 1
    data = paths[0].read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].rstrip(b" ")
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    assert load_basis(paths[0]).fingerprint == basis.fingerprint
