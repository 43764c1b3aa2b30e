"""Dense merge: W' = W + ΔW for every layer an adapter touches, in memory or shard by shard.

    merge_into_model(model, adapter, basis)                   in place, returns the model
    with merged(model, adapter, basis): ...                   in place for a block, W restored bit for bit
    merge_model_dir(model_dir, adapter, basis, out_dir)       a new transformers model dir

The directory merge streams: each safetensors shard is read, the adapter's ΔW added to
the target weights in their stored dtype and layout (GPT-2 ``Conv1D`` stores Wᵀ, so Wᵀ
gets ΔWᵀ), and the shard written under the same name before the next is read; peak
memory is one shard. Keys, the shard index, config and tokenizer files are kept as they
are, so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the merged model.
Before merging, the base weights are checked against the basis fingerprint: an adapter
merged into another model would silently produce garbage.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from adapters_zoo.basis import Basis, check_basis_matches_model, model_dir_fingerprint
from adapters_zoo.checkpoint import Checkpoint
from adapters_zoo.errors import BasisMismatch, IncompatibleAdapter, ModelDirError
from adapters_zoo.files import save_safetensors, write_atomic
from adapters_zoo.format import Adapter

PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # base weights specfuse never copies (nor reads)
MERGE_RECORD = "specfuse_merge.json"


def _add_delta(weight: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """weight (out, in) or, transposed, (in, out) in its dtype; delta (out, in) float32."""
    d = delta.t() if transposed else delta
    if tuple(weight.shape) != tuple(d.shape):
        raise BasisMismatch(f"weight of shape {tuple(weight.shape)} cannot take a ΔW of shape {tuple(d.shape)}")
    return (weight.to(torch.float32) + d.to(weight.device)).to(weight.dtype)


def merge_into_model(model: torch.nn.Module, adapter: Adapter, basis: Basis, check: bool = True) -> torch.nn.Module:
    """Add the adapter's ΔW into ``model``'s weights in place (``check``: verify the base first)."""
    adapter.check_against(basis)
    if check:
        check_basis_matches_model(basis, model)
    with torch.no_grad():
        for layer in adapter.layers:
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise IncompatibleAdapter(f"model has no layer {layer!r}") from None
            if not hasattr(module, "weight") or module.weight.dim() != 2:
                raise IncompatibleAdapter(f"layer {layer} is a {type(module).__name__}, not a linear layer "
                                          "(detach adapters before merging)")
            transposed = basis.transposed.get(layer, type(module).__name__ == "Conv1D")
            delta = adapter.delta(layer, basis)  # (out, in)
            module.weight.copy_(_add_delta(module.weight, delta, transposed))
    return model


@contextlib.contextmanager
def merged(model: torch.nn.Module, adapter: Adapter | None, basis: Basis) -> Iterator[torch.nn.Module]:
    """``model`` with W + ΔW(adapter) on every layer the adapter touches for the block; the original W
    (copied first) put back after, bit for bit: subtracting ΔW again would drift W by rounding.
    The caller has checked ``basis`` against the model (this runs often: no fingerprinting)."""
    if adapter is None:
        yield model
        return
    saved = {layer: model.get_submodule(layer).weight.detach().clone() for layer in adapter.layers}
    try:
        merge_into_model(model, adapter, basis, check=False)
        yield model
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                model.get_submodule(layer).weight.copy_(weight)


def check_model_dir(ckpt: Checkpoint, basis: Basis) -> None:
    fp = model_dir_fingerprint(ckpt, basis.layer_names())
    if fp != basis.fingerprint:
        raise BasisMismatch(
            f"{ckpt.dir}: its weights have fingerprint {fp}, the adapter's basis is of base {basis.fingerprint}: "
            "this is not the model the adapter was trained on"
        )


def _prepare_out_dir(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == model_dir.resolve():
        raise ModelDirError(f"{out_dir}: the merged model cannot overwrite its own base model directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelDirError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelDirError(f"{out_dir}: directory is not empty (choose a new one, or pass overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)


def _copy_side_files(model_dir: Path, out_dir: Path, shards: set[str]) -> list[str]:
    """Config, tokenizer, generation config, shard index: every plain file but weights."""
    copied = []
    for src in sorted(model_dir.iterdir()):
        if not src.is_file() or src.name in shards or src.name == MERGE_RECORD:
            continue
        if src.suffix in PICKLED_WEIGHTS or src.suffix == ".safetensors":
            continue  # stale base weights (or other safetensors, e.g. a basis file) would shadow the merge
        shutil.copy2(src, out_dir / src.name)
        copied.append(src.name)
    return copied


def merge_model_dir(
    model_dir: str | Path,
    adapter: Adapter,
    basis: Basis,
    out_dir: str | Path,
    progress: bool = True,
    check: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model_dir`` with ``adapter`` merged into its weights to ``out_dir``; returns out_dir."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    adapter.check_against(basis)
    ckpt = Checkpoint(model_dir)
    specs = {s.name: s for s in ckpt.linear_layers(adapter.layers)}
    missing = [layer for layer in adapter.layers if layer not in specs]
    if missing:
        raise IncompatibleAdapter(f"{model_dir}: the model has no linear layer {missing[0]!r}")
    if check:
        check_model_dir(ckpt, basis)
    key_to_layer = {ckpt.resolve(specs[layer].weight_key): layer for layer in adapter.layers}
    shards = ckpt.shard_files
    _prepare_out_dir(model_dir, out_dir, overwrite)

    merged = 0
    bar = tqdm(total=len(key_to_layer), desc="merge", unit="layer", disable=not progress)
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            shard_meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for key, layer in key_to_layer.items():
            if key in tensors:
                spec = specs[layer]
                with torch.no_grad():
                    tensors[key] = _add_delta(tensors[key], adapter.delta(layer, basis), spec.transposed)
                merged += 1
                bar.update(1)
        save_safetensors(tensors, out_dir / shard.name, metadata={"format": "pt", **shard_meta})
        del tensors
    bar.close()
    if merged != len(key_to_layer):
        raise ModelDirError(f"{model_dir}: merged {merged} of {len(key_to_layer)} target weights (shards changed?)")

    copied = _copy_side_files(model_dir, out_dir, {s.name for s in shards})
    record = {
        "base_model": str(model_dir),
        "base_fingerprint": basis.fingerprint,
        "basis_k": basis.rank,
        "adapter": {"kind": adapter.kind, "layers": len(adapter.layers), "meta": adapter.meta},
        "shards": [s.name for s in shards],
        "copied": copied,
    }
    write_atomic(out_dir / MERGE_RECORD, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())
    return out_dir
