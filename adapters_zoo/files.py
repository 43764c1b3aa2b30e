"""Files are written one way everywhere: atomically, and with canonical bytes.

    write_atomic(path, data)                     temp file, fsync, rename: never half a file
    save_safetensors(tensors, path, metadata)    a safetensors file whose bytes depend only on its contents
    canonicalize_file(path)                      the same for a file another library wrote

safetensors writes its JSON header in hash-map order, which differs between processes (and
between saves), so two equal files could differ in bytes. Every safetensors file specfuse
writes (adapters, bases, LoRA exports, merged shards) has its header re-emitted with sorted
keys; the tensor data, its order fixed by the offsets, is left as it is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

HEADER_SIZE_BYTES = 8


def canonical_header(header: bytes) -> bytes:
    """A safetensors JSON header re-emitted with sorted keys, padded so the data stays 8-byte aligned."""
    out = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    return out + b" " * (-len(out) % 8)


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with a canonical header: equal contents, equal bytes."""
    n = int.from_bytes(data[:HEADER_SIZE_BYTES], "little")
    header = canonical_header(data[HEADER_SIZE_BYTES : HEADER_SIZE_BYTES + n])
    return len(header).to_bytes(HEADER_SIZE_BYTES, "little") + header + data[HEADER_SIZE_BYTES + n :]


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file beside it, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                     ) -> Path:
    """Save ``tensors`` with canonical bytes, atomically, streaming the data (no second copy in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(f".{path.name}.raw")
    try:
        save_file(tensors, str(raw), metadata=metadata)
        return canonicalize_file(raw, path)
    finally:
        raw.unlink(missing_ok=True)


def canonicalize_file(src: str | Path, dst: str | Path | None = None) -> Path:
    """Rewrite the safetensors file ``src`` with a canonical header into ``dst`` (default: in place), atomically."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            n = int.from_bytes(fin.read(HEADER_SIZE_BYTES), "little")
            header = canonical_header(fin.read(n))
            fout.write(len(header).to_bytes(HEADER_SIZE_BYTES, "little") + header)
            shutil.copyfileobj(fin, fout, length=1 << 24)
            fout.flush()
            os.fsync(fout.fileno())
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
