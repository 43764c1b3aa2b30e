"""The import's memory bound, on a file with 7B-sized matrices (hidden 4096, MLP 11008) and two layers.

The bound is the largest tensor in float32 plus 1 GiB. The file holds 404M weights (1.6 GB in
float32, 227 MB on disk in Q4_0), so an import that held the model in float32 would break it; the
import runs in a child process whose peak RSS (``ru_maxrss``) is the measure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
from gguf_files import write_gguf

HIDDEN, FFN, LAYERS = 4096, 11008, 2
GIB = 1 << 30

_CHILD = """
import json, resource, sys
from adapters_zoo.gguf_import import import_gguf
imported = import_gguf(sys.argv[1], "big", "bfloat16", sys.argv[2], progress=False)
print(json.dumps({"parameters": imported.parameters, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_peak_memory_is_the_largest_tensor_in_float32_plus_one_gib(tmp_path):
    path = write_gguf(tmp_path / "big.gguf", "llama", hidden=HIDDEN, ffn=FFN, layers=LAYERS, heads=32,
                      kv_heads=32, qtype=gguf.GGMLQuantizationType.Q4_0, repeat_rows=True)
    largest = HIDDEN * FFN * 4
    bound = largest + GIB
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "home")], env=env,
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["parameters"] * 4 > bound  # holding the model in float32 would break the bound
    peak = result["peak_kib"] * 1024
    print(f"peak RSS {peak / GIB:.2f} GiB, bound {bound / GIB:.2f} GiB")
    assert peak <= bound, f"peak RSS {peak / GIB:.2f} GiB > bound {bound / GIB:.2f} GiB"
    size = (tmp_path / "home" / "bases" / "big" / "model.safetensors").stat().st_size  # one 0.8 GB shard
    assert 0 < size - result["parameters"] * 2 < 1 << 16  # bfloat16 data and a header
