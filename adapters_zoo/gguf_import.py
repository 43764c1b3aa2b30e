"""A GGUF file -> a plain transformers model directory, streamed one tensor at a time.

    specfuse base import FILE.gguf [--name NAME] [--dtype float32|bfloat16] [--home DIR]
        -> HOME/bases/NAME/  (model.safetensors, or 2 GB shards + index; config, tokenizer, specfuse-base.json)

Each tensor is read from the file in row chunks (``os.pread``: no page of the file stays
mapped), dequantized by ``gguf.quants.dequantize`` into one float32 array, brought to the
transformers layout (llama.cpp's Q/K row permutation undone for llama and mistral, Gemma's
``norm + 1`` undone), cast to the output dtype and appended to its shard, whose header was
written before any data (every shape is known from the GGUF's tensor table). The most held
at once is one tensor in float32 plus its cast copy, whatever the model's size.

Config and tokenizer (with its chat template) come from the GGUF's metadata through
transformers' own GGUF readers, which read metadata only. The GGUF -> transformers tensor
names come from transformers' map too, built on a model on the meta device (no memory).

The directory appears atomically (written beside it, then renamed). Its manifest records the
file's size, mtime and sha256, so a second import of the same file does no work.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters_zoo.errors import SpecfuseError
from adapters_zoo.files import HEADER_SIZE_BYTES, write_atomic

MANIFEST = "specfuse-base.json"
SHARD_BYTES = 2 * 1000**3  # at most 2 GB of tensor data a shard
CHUNK_BYTES = 16 << 20  # float32 bytes dequantized at once: bounds the dequantizer's temporaries
DTYPES = ("float32", "bfloat16")
# GGUF architecture -> how its tensors differ from transformers' (mistral is llama in GGUF, told by its name).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


class GGUFImportError(SpecfuseError):
    """A GGUF file that cannot be imported: not a GGUF, truncated, an architecture or tensor type not handled."""


@dataclass(frozen=True)
class ImportedBase:
    name: str
    path: Path
    fingerprint: str
    parameters: int
    architecture: str
    dtype: str
    gguf_sha256: str


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # numpy (row-major) order
    qtype: object  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def imported_base(model_dir: Path) -> dict | None:
    """The manifest of a finished import in ``model_dir``, or None."""
    try:
        record = json.loads((model_dir / MANIFEST).read_text())
        return record if isinstance(record, dict) and "fingerprint" in record else None
    except (OSError, ValueError):
        return None


def import_gguf(gguf_path: str | Path, name: str | None = None, dtype: str = "float32",
                home: str | Path | None = None, *, extra: dict | None = None, progress: bool = True,
                keep: list[Path] = ()) -> ImportedBase:
    """Import ``gguf_path`` as base ``name`` under ``home``; a finished import of the same file is reused.

    ``extra`` is merged into the manifest (a fetched base records its package there); the files in
    ``keep`` (license terms) are copied into the directory.
    """
    from adapters_zoo.bases import bases_dir

    path = Path(gguf_path)
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    name = name or path.stem.lower()
    if not name or "/" in name or name.startswith("."):
        raise GGUFImportError(f"base name {name!r} is not a plain directory name")
    model_dir = bases_dir(home) / name
    stat = path.stat()
    done = imported_base(model_dir)
    if done is not None and done.get("dtype") == dtype and done.get("gguf_size") == stat.st_size:
        if done.get("gguf_mtime_ns") == stat.st_mtime_ns or done.get("gguf_sha256") == sha256_of(path):
            return _result(model_dir, done)
    digest = sha256_of(path)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=model_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model directory is not a secret
    try:
        record = _convert(path, staging, name, dtype, progress)
        record.update({"name": name, "gguf": path.name, "gguf_sha256": digest, "gguf_size": stat.st_size,
                       "gguf_mtime_ns": stat.st_mtime_ns, **(extra or {})})
        for path_kept in keep:
            shutil.copyfile(path_kept, staging / path_kept.name)
        write_atomic(staging / MANIFEST, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        if model_dir.exists():
            shutil.rmtree(model_dir)  # a stale or broken directory of an older import
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _result(model_dir, record)


def _result(model_dir: Path, record: dict) -> ImportedBase:
    return ImportedBase(record["name"], model_dir, record["fingerprint"], int(record["parameters"]),
                        record["architecture"], record["dtype"], record["gguf_sha256"])


# --------------------------------------------------------------------------- reading


def _open(path: Path):
    from gguf import GGUFReader

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFImportError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on a cut or damaged file
        raise GGUFImportError(f"{path}: truncated or damaged GGUF file ({type(err).__name__}: {err})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFImportError(f"{path}: truncated (tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                  f"the file has {size})")
    return reader


def _architecture(reader, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFImportError(f"{path}: no general.architecture in its metadata")
    arch = bytes(field.parts[field.data[0]]).decode()
    name_field = reader.fields.get("general.name")
    model_name = bytes(name_field.parts[name_field.data[0]]).decode().lower() if name_field else ""
    if arch == "llama" and "mistral" in model_name:
        arch = "mistral"  # transformers reads it as a mistral config, as llama.cpp writes it as llama
    if arch not in ARCHITECTURES:
        raise GGUFImportError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _check_types(reader, path: Path) -> None:
    """One clear error, before any work, for a tensor type ``gguf`` cannot dequantize."""
    from gguf.quants import dequantize

    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        try:
            dequantize(np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1])[:1], t.tensor_type)
        except (NotImplementedError, KeyError, ValueError, AttributeError) as err:
            raise GGUFImportError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot "
                                  f"dequantize ({type(err).__name__}: {err})") from None


def _read(fd: int, t: _Tensor) -> np.ndarray:
    """Tensor ``t`` dequantized to float32 in its numpy shape, read and dequantized a row chunk at a time."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    cols = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    block, block_bytes = GGML_QUANT_SIZES[t.qtype]
    row_bytes = cols // block * block_bytes
    if row_bytes * rows != t.n_bytes:
        raise GGUFImportError(f"tensor {t.gguf_name}: {t.n_bytes} bytes for shape {t.shape} of {t.qtype.name}")
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, CHUNK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        raw = os.pread(fd, n * row_bytes, t.offset + r * row_bytes)
        if len(raw) != n * row_bytes:
            raise GGUFImportError(f"tensor {t.gguf_name}: the file ends inside it (truncated)")
        out[r:r + n] = dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(n, row_bytes), t.qtype)
    return out.reshape(t.shape)


# --------------------------------------------------------------------------- converting


def _convert(path: Path, out_dir: Path, name: str, dtype: str, progress: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = _open(path)
    arch = _architecture(reader, path)
    _check_types(reader, path)
    field = reader.fields.get(f"{'llama' if arch == 'mistral' else arch}.attention.key_length")
    key_length = None if field is None else int(field.parts[field.data[0]][0])
    listed = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type, int(t.data_offset),
               int(t.n_bytes)) for t in reader.tensors]
    del reader, field  # its parsed metadata (a large vocabulary) goes before transformers parses the file again
    gc.collect()
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # transformers' metadata readers raise whatever they meet
        raise GGUFImportError(f"{path}: cannot read its config or tokenizer ({type(err).__name__}: {err})") from None
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = key_length  # transformers' qwen3 map drops it
    config.name_or_path = name
    config.dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gguf_arch = "llama" if arch == "mistral" else arch
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(model, processor)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()

    tensors = []
    for gguf_name, shape, qtype, offset, n_bytes in listed:
        hf_name = name_map.get(gguf_name)
        if hf_name is None or hf_name in tied:
            continue  # tensors transformers does not keep (rope frequency tables)
        if hf_name not in expected or expected[hf_name] != shape:
            raise GGUFImportError(f"{path}: tensor {gguf_name} has shape {shape}; {hf_name} of the config "
                                  f"wants {expected.get(hf_name)}")
        tensors.append(_Tensor(gguf_name, hf_name, shape, qtype, offset, n_bytes))
    missing = sorted(set(expected) - tied - {t.hf_name for t in tensors})
    if missing:
        raise GGUFImportError(f"{path}: no tensor for {missing[0]} ({len(missing)} missing)")
    config.architectures = [type(model).__name__]
    del model

    out_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    shards = _plan_shards(sorted(tensors, key=lambda t: t.hf_name), itemsize)
    fd = os.open(path, os.O_RDONLY)
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            # one shard is model.safetensors with no index, as transformers saves it
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            if progress:
                print(f"specfuse base: {fname} ({len(shard)} tensors, {dtype})", file=sys.stderr)
            _write_shard(out_dir / fname, shard, fd, processor, out_dtype, itemsize)
            weight_map.update({t.hf_name: fname for t in shard})
    finally:
        os.close(fd)
    total = sum(math.prod(t.shape) * itemsize for t in tensors)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(out_dir / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    parameters = sum(math.prod(t.shape) for t in tensors)
    return {"architecture": arch, "dtype": dtype, "parameters": parameters,
            "fingerprint": _fingerprint(out_dir), "tensor_types": sorted({t.qtype.name for t in tensors})}


def _plan_shards(tensors: list[_Tensor], itemsize: int) -> list[list[_Tensor]]:
    shards, current, size = [], [], 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += n
    return [*shards, current] if current else shards


_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16"}


def _write_shard(dest: Path, shard: list[_Tensor], fd: int, processor, out_dtype, itemsize: int) -> None:
    """A safetensors file whose header (sorted keys, offsets in that order) is written before its data."""
    import torch

    header, offset = {}, 0
    for t in shard:
        n = math.prod(t.shape) * itemsize
        header[t.hf_name] = {"dtype": _SAFETENSORS_DTYPE[str(out_dtype).removeprefix("torch.")],
                             "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dest, "wb") as f:
        f.write(len(text).to_bytes(HEADER_SIZE_BYTES, "little") + text)
        for t in shard:
            weights = processor.process(weights=_read(fd, t), name=t.gguf_name).weights  # (out, in) float32
            w = torch.from_numpy(np.ascontiguousarray(weights)).reshape(-1)
            del weights
            step = CHUNK_BYTES // 4
            for start in range(0, w.numel(), step):  # cast a chunk at a time: no second copy of the tensor
                part = w[start:start + step]
                f.write(part.to(out_dtype).contiguous().view(torch.uint8).numpy().data)
            del w
        f.flush()
        os.fsync(f.fileno())


def _fingerprint(model_dir: Path) -> str:
    """The value ``specfuse basis`` writes for this directory: every linear layer, streamed."""
    from adapters_zoo.basis import model_dir_fingerprint
    from adapters_zoo.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    return model_dir_fingerprint(ckpt, [s.name for s in ckpt.linear_layers(None)])
